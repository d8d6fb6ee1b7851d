"""One call for the recommended set of callbacks."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import Callback

from lightning_debug.init_loss import InitLossCallback


def suite(
    num_classes: int | None = None,
    task: Literal["multiclass", "binary", "regression"] | None = None,
    every_n_steps: int | None = None,
) -> list[Callback]:
    """The recommended lightning_debug callbacks with their defaults.

    Args:
        num_classes: number of classes of a classifier (implies ``task="multiclass"`` when task is None).
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``; enables the init-loss check. Without a task
            and without ``num_classes`` the init-loss check is left out (it needs to know what to expect).
        every_n_steps: measurement cadence of the monitors; None follows ``Trainer(log_every_n_steps)``.

    Raises:
        ValueError: for an unknown ``task`` or a ``num_classes`` below 2.

    Example::

        trainer = Trainer(callbacks=lightning_debug.suite(num_classes=10))
    """
    if task is None and num_classes is not None:
        task = "multiclass"
    callbacks: list[Callback] = []
    if task is not None:
        callbacks.append(InitLossCallback(task=task, num_classes=num_classes if task == "multiclass" else None))
    del every_n_steps  # used by the monitors
    return callbacks
