"""lightning_debug: training diagnosis for PyTorch Lightning, switched on in every run."""

from lightning_debug.base import DiagnosticCallback
from lightning_debug.findings import SEVERITIES, Finding, Severity
from lightning_debug.init_loss import InitLossCallback, InitLossError
from lightning_debug.preset import suite
from lightning_debug.report import read_findings

__version__ = "0.1.0"

__all__ = [
    "SEVERITIES",
    "DiagnosticCallback",
    "Finding",
    "InitLossCallback",
    "InitLossError",
    "Severity",
    "__version__",
    "read_findings",
    "suite",
]
