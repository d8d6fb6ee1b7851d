"""One call for the recommended set of callbacks."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import Callback

from lightning_debug.activations import DeadActivationMonitor
from lightning_debug.batch_mixing import BatchMixingCheck
from lightning_debug.batchnorm import BatchNormCheck
from lightning_debug.data_inspector import DataInspector
from lightning_debug.grad_norm import GradNormMonitor
from lightning_debug.init_loss import InitLossCallback
from lightning_debug.loss_curve import LossCurveMonitor
from lightning_debug.loss_function import LossFunctionCheck
from lightning_debug.nan_guard import NaNGuard
from lightning_debug.predictions import PredictionDynamicsLogger
from lightning_debug.update_ratio import UpdateRatioMonitor
from lightning_debug.weight_stats import WeightStatsMonitor

# PredictionDynamicsLogger's task for each of suite()'s: a binary classifier's single logit is read with a sigmoid
_PREDICTION_TASKS: dict[str, Literal["classification", "regression"]] = {
    "multiclass": "classification",
    "binary": "classification",
    "regression": "regression",
}


def suite(
    num_classes: int | None = None,
    task: Literal["multiclass", "binary", "regression"] | None = None,
    every_n_steps: int | None = None,
    nan_guard: bool = True,
) -> list[Callback]:
    """The recommended lightning_debug callbacks with their defaults.

    InitLossCallback (when the task is known), LossFunctionCheck, GradNormMonitor, UpdateRatioMonitor,
    DeadActivationMonitor, PredictionDynamicsLogger (told the task: ``"binary"`` and ``"multiclass"`` are its
    ``"classification"``, ``"regression"`` its ``"regression"``; ``"auto"`` without a task), WeightStatsMonitor
    (without histograms: ``WeightStatsMonitor(histograms=True)`` adds them at the cost of copying every weight to
    the host on measured steps), LossCurveMonitor, DataInspector, BatchMixingCheck, BatchNormCheck, and NaNGuard.
    The monitors leave training bit-identical.

    Args:
        num_classes: number of classes of a classifier (implies ``task="multiclass"`` when task is None).
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``; enables the init-loss check. Without a task
            and without ``num_classes`` the init-loss check is left out (it needs to know what to expect).
        every_n_steps: measurement cadence of the monitors and of NaNGuard's parameter check and scalars; None:
            their defaults (every ``2 * log_every_n_steps`` steps; LossCurveMonitor every ``log_every_n_steps``).
        nan_guard: include :class:`~lightning_debug.NaNGuard`, the one callback that changes training (only when a
            step goes non-finite: it skips it, rolls back, backs off the LR, or halts).

    Raises:
        ValueError: for an unknown ``task`` or a ``num_classes`` below 2.

    Example::

        trainer = Trainer(callbacks=lightning_debug.suite(num_classes=10))
    """
    if task is None and num_classes is not None:
        task = "multiclass"
    if task is not None and task not in ("multiclass", "binary", "regression"):
        raise ValueError(f"`task` must be one of ('multiclass', 'binary', 'regression') or None, got {task!r}")
    callbacks: list[Callback] = []
    if task is not None:
        callbacks.append(InitLossCallback(task=task, num_classes=num_classes if task == "multiclass" else None))
    callbacks += [
        LossFunctionCheck(),
        GradNormMonitor(every_n_steps=every_n_steps),
        UpdateRatioMonitor(every_n_steps=every_n_steps),
        DeadActivationMonitor(every_n_steps=every_n_steps),
        PredictionDynamicsLogger(every_n_steps=every_n_steps, task=_PREDICTION_TASKS.get(task or "", "auto")),
        WeightStatsMonitor(every_n_steps=every_n_steps, histograms=False),
        LossCurveMonitor(every_n_steps=every_n_steps),
        DataInspector(num_classes=num_classes if task == "multiclass" else None),
        BatchMixingCheck(),
        BatchNormCheck(),
    ]
    if nan_guard:
        callbacks.append(NaNGuard(every_n_steps=every_n_steps))
    return callbacks
