"""Cross-rank helpers built on ``trainer.strategy``; identity on a single device.

Every helper here is a collective under DDP: call it on every rank, in the same order.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

ReduceOp = Literal["sum", "mean", "max", "min"]


def reduce(trainer: pl.Trainer, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
    """Reduce ``tensor`` across ranks and return a new tensor; the input is left untouched."""
    if trainer.world_size <= 1:
        return tensor.clone()
    value = tensor.detach().clone()
    if op in ("max", "min"):
        value = trainer.strategy.reduce(value, reduce_op=getattr(torch.distributed.ReduceOp, op.upper()))
    else:
        value = trainer.strategy.reduce(value, reduce_op=op)
    return value


def any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if trainer.world_size <= 1:
        return bool(flag)
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))


def all_ranks(trainer: pl.Trainer, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if trainer.world_size <= 1:
        return bool(flag)
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=True))


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether parameters are sharded across ranks (FSDP, DeepSpeed): norms then combine as sums of squares."""
    name = type(trainer.strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name


def reduce_squares(trainer: pl.Trainer, squares: Tensor) -> Tensor:
    """Combine squared norms across ranks: summed over shards (FSDP), else averaged (equal after DDP's all-reduce)."""
    if trainer.world_size <= 1:
        return squares
    return reduce(trainer, squares, "sum" if is_sharded(trainer) else "mean")
