"""Which optimizer, which parameters: the bookkeeping monitors of optimizer steps share."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer


def optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there, or the only one)."""
    optimizers = trainer.optimizers
    if len(optimizers) <= 1:
        return 0
    for index, candidate in enumerate(optimizers):
        if candidate is optimizer or getattr(candidate, "_optimizer", None) is optimizer:
            return index
    return 0


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
