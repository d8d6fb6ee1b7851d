"""lightning_debug: training diagnosis for PyTorch Lightning, switched on in every run."""

from lightning_debug.activations import DeadActivationMonitor
from lightning_debug.base import DiagnosticCallback
from lightning_debug.batch_mixing import BatchMixingCheck
from lightning_debug.batchnorm import BatchNormCheck
from lightning_debug.data_inspector import DataInspector
from lightning_debug.findings import SEVERITIES, Finding, Severity
from lightning_debug.grad_norm import GradNormMonitor
from lightning_debug.init_loss import InitLossCallback, InitLossError
from lightning_debug.loss_curve import LossCurveMonitor
from lightning_debug.loss_function import LossFunctionCheck
from lightning_debug.nan_guard import NaNGuard, NaNGuardError, NaNGuardHalt
from lightning_debug.predictions import PredictionDynamicsLogger
from lightning_debug.preset import suite
from lightning_debug.report import read_findings
from lightning_debug.update_ratio import UpdateRatioMonitor
from lightning_debug.weight_stats import WeightStatsMonitor

__version__ = "0.1.0"

__all__ = [
    "SEVERITIES",
    "BatchMixingCheck",
    "BatchNormCheck",
    "DataInspector",
    "DeadActivationMonitor",
    "DiagnosticCallback",
    "Finding",
    "GradNormMonitor",
    "InitLossCallback",
    "InitLossError",
    "LossCurveMonitor",
    "LossFunctionCheck",
    "NaNGuard",
    "NaNGuardError",
    "NaNGuardHalt",
    "PredictionDynamicsLogger",
    "Severity",
    "UpdateRatioMonitor",
    "WeightStatsMonitor",
    "__version__",
    "read_findings",
    "suite",
]
