"""lightning_debug: training diagnosis for PyTorch Lightning, switched on in every run."""

from lightning_debug.activations import DeadActivationMonitor
from lightning_debug.base import DiagnosticCallback
from lightning_debug.findings import SEVERITIES, Finding, Severity
from lightning_debug.grad_norm import GradNormMonitor
from lightning_debug.init_loss import InitLossCallback, InitLossError
from lightning_debug.nan_guard import NaNGuard, NaNGuardError, NaNGuardHalt
from lightning_debug.predictions import PredictionDynamicsLogger
from lightning_debug.preset import suite
from lightning_debug.report import read_findings
from lightning_debug.update_ratio import UpdateRatioMonitor

__version__ = "0.1.0"

__all__ = [
    "SEVERITIES",
    "DeadActivationMonitor",
    "DiagnosticCallback",
    "Finding",
    "GradNormMonitor",
    "InitLossCallback",
    "InitLossError",
    "NaNGuard",
    "NaNGuardError",
    "NaNGuardHalt",
    "PredictionDynamicsLogger",
    "Severity",
    "UpdateRatioMonitor",
    "__version__",
    "read_findings",
    "suite",
]
