"""Which optimizer, which parameters: the bookkeeping monitors of optimizer steps share."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.optim import Optimizer


def max_lr(trainer: pl.Trainer) -> float:
    """The largest learning rate of the trainer's optimizers now (NaN without one)."""
    lrs = [group.get("lr") for optimizer in trainer.optimizers for group in optimizer.param_groups]
    values = [float(lr) for lr in lrs if isinstance(lr, (int, float, Tensor))]
    return max(values) if values else math.nan


def optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there, or the only one)."""
    optimizers = trainer.optimizers
    if len(optimizers) <= 1:
        return 0
    for index, candidate in enumerate(optimizers):
        if candidate is optimizer or getattr(candidate, "_optimizer", None) is optimizer:
            return index
    return 0


class OptimizerParams:
    """:func:`optimizer_params` per optimizer, kept between steps: re-read when the optimizer's param groups change
    size, or when asked to (``refresh=True``, e.g. once per measurement interval)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[int, ...], list[nn.Parameter]]] = {}

    def get(self, optimizer: Optimizer, refresh: bool = False) -> list[nn.Parameter]:
        signature = tuple(len(group["params"]) for group in optimizer.param_groups)
        cached = self._cache.get(id(optimizer))
        if refresh or cached is None or cached[0] != signature:
            cached = self._cache[id(optimizer)] = (signature, optimizer_params(optimizer))
        return cached[1]

    def clear(self) -> None:
        self._cache.clear()


def optimizer_params(optimizer: Optimizer) -> list[nn.Parameter]:
    """The trainable parameters an optimizer updates, in param-group order, each once."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params
