"""The TensorBoard custom-scalars layout: one chart per checklist area, per-layer series together."""

from __future__ import annotations

from typing import Any

# category -> chart title -> tag regexes; every chart is a multiline chart of all matching tags.
LAYOUT: dict[str, dict[str, list[str]]] = {
    "lightning_debug: init loss": {
        "loss at init vs expected": [r"init_loss/(measured|expected|best_constant)$"],
        "final-layer output std": [r"init_loss/output_std$"],
    },
    "lightning_debug: gradients": {
        "global gradient norm and suggested clip": [r"grad_norm/global(_max)?$", r"grad_norm/suggested_clip$"],
        "per-parameter gradient norm": [
            r"grad_norm/(?!global(_opt\d+)?(_max)?$|(suggested_clip|skipped_steps|clip_fraction)(_opt\d+)?$).*"
        ],
        "GradScaler-skipped steps, fraction clipped": [r"grad_norm/skipped_steps$", r"grad_norm/clip_fraction$"],
    },
    "lightning_debug: updates": {
        "log10 update/weight ratio per parameter": [r"update_ratio/(?!skipped_steps$).*"],
    },
    "lightning_debug: activations": {
        "dead fraction per layer": [r"activations/.*dead.*"],
        "saturated fraction per layer": [r"activations/.*saturated.*"],
        "dormant fraction per layer": [r"activations/.*dormant.*"],
    },
    "lightning_debug: weights": {
        "weight std per parameter": [r"weight_stats/.*/std$"],
    },
    "lightning_debug: loss curve": {
        "training and validation loss": [r"loss_curve/.*"],
    },
    "lightning_debug: data and batch mixing": {
        "input statistics": [r"data/.*"],
        "cross-example gradient leak": [r"batch_mixing/.*"],
        "BatchNorm: evaluation std ratio, examples per device": [r"batchnorm/.*"],
    },
    "lightning_debug: NaN guard": {
        "learning-rate scale and backoffs": [r"nan_guard/.*"],
    },
    "lightning_debug: predictions on a fixed batch": {
        "loss and accuracy": [r"predictions/(loss|accuracy)$"],
        "jitter, movement and flips": [r"predictions/(jitter|movement|flips)$"],
    },
}


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The layout in the form ``SummaryWriter.add_custom_scalars`` takes."""
    return {
        category: {title: ["Multiline", list(patterns)] for title, patterns in charts.items()}
        for category, charts in LAYOUT.items()
    }


def write_layout(writer: Any) -> None:
    """Write the layout once into a run's event file (TensorBoard reads the latest one)."""
    writer.add_custom_scalars(custom_scalars_layout())
