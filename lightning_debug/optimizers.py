"""Which optimizer, which parameters: the bookkeeping monitors of optimizer steps share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
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

    def __init__(self, trainable_only: bool = True) -> None:
        self._cache: dict[int, tuple[tuple[int, ...], list[nn.Parameter]]] = {}
        self.trainable_only = trainable_only  # False: frozen ones too (unfreezing changes no group's size)

    def get(self, optimizer: Optimizer, refresh: bool = False) -> list[nn.Parameter]:
        signature = tuple(len(group["params"]) for group in optimizer.param_groups)
        cached = self._cache.get(id(optimizer))
        if refresh or cached is None or cached[0] != signature:
            cached = self._cache[id(optimizer)] = (signature, optimizer_params(optimizer, self.trainable_only))
        return cached[1]

    def clear(self) -> None:
        self._cache.clear()


def optimizer_params(optimizer: Optimizer, trainable_only: bool = True) -> list[nn.Parameter]:
    """The trainable parameters an optimizer updates (``trainable_only=False``: every parameter it holds), in
    param-group order, each once."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if (param.requires_grad or not trainable_only) and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


# Optimizers that add ``eps`` to the denominator of their update (sqrt(v) + eps, or |g| + eps for Adamax): with
# float16 weights their state and arithmetic are float16 too, and an eps below float16's smallest normal number
# (6.1e-05) rounds to 0 or to a coarse subnormal. Adadelta is not here: its eps goes inside a square root.
_EPS_IN_DENOMINATOR = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def float16_eps_problems(optimizers: Sequence[Optimizer]) -> list[dict[str, Any]]:
    """Param groups whose ``eps`` is below float16's smallest normal number while they hold float16 parameters.

    Such an optimizer divides by ``sqrt(v) + eps`` in float16: a gradient element below ~2.4e-4 squares to 0, the
    denominator is then eps alone (0 for Adam's default 1e-8), and the update is 0/0 = NaN or overflows 65504.
    One entry per param group: the optimizer's class name, its index, the group's index, eps and the number of
    float16 parameters.
    """
    tiny = torch.finfo(torch.float16).smallest_normal
    problems = []
    for index, optimizer in enumerate(optimizers):
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        if not isinstance(inner, _EPS_IN_DENOMINATOR):
            continue
        for group_index, group in enumerate(inner.param_groups):
            eps = group.get("eps")
            if not isinstance(eps, (int, float)) or eps >= tiny:
                continue
            count = sum(1 for p in group["params"] if p.dtype == torch.float16 and p.requires_grad)
            if count:
                problems.append(
                    {"optimizer": type(inner).__name__, "optimizer_index": index, "group": group_index,
                     "eps": float(eps), "as_float16": float(torch.tensor(eps, dtype=torch.float16)),
                     "float16_params": count}
                )  # fmt: skip
    return problems


def float16_eps_text(problems: Sequence[Mapping[str, Any]]) -> str:
    """One phrase naming the offending optimizers and their eps, e.g. "Adam's eps=1e-08 (0 in float16)"."""
    parts = []
    for problem in problems:
        as_half = problem["as_float16"]
        rounded = "0 in float16" if as_half == 0 else f"a float16 subnormal, {as_half:.3g}"
        parts.append(f"{problem['optimizer']}'s eps={problem['eps']:g} ({rounded})")
    return ", ".join(dict.fromkeys(parts))


# significant bits of the 16-bit dtypes: an update below 2^-(bits+1) to 2^-bits of a weight rounds away
SIGNIFICANT_BITS = {torch.float16: 11, torch.bfloat16: 8}


def rounded_away(params: Mapping[str, Tensor]) -> list[str]:
    """The 16-bit parameters among ``params`` whose gradient is non-zero now: if such a parameter never changes, its
    updates round away (one ``any()`` per parameter: for a report, not for every step)."""
    return [
        name
        for name, p in params.items()
        if p.dtype in SIGNIFICANT_BITS and p.grad is not None and bool(_grad_values(p.grad).any())
    ]


def _grad_values(grad: Tensor) -> Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


def rounded_away_text(names: Sequence[str], params: Mapping[str, Tensor]) -> tuple[str, str]:
    """The message and the hint for 16-bit parameters that never changed although they have a gradient."""
    dtypes = sorted({str(params[n].dtype).removeprefix("torch.") for n in names})
    bits = min(SIGNIFICANT_BITS[params[n].dtype] for n in names)
    listed = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    message = (
        f"{len(names)} {' and '.join(dtypes)} parameter(s) never changed although their gradient is non-zero: every "
        f"update rounded away ({' and '.join(dtypes)} keeps {bits} significant bits, so a weight moves only by more "
        f"than 2^-{bits + 1} to 2^-{bits} of itself; a norm scale at 1.0 needs updates above {2.0 ** -(bits + 1):.2g}, "
        f"and Adam's are about its lr): {listed}."
    )
    hint = (
        "Keep float32 master weights (precision='bf16-mixed' or '16-mixed' instead of '-true'), or keep these "
        "parameters in float32, or use an optimizer that rounds stochastically or keeps Kahan-compensated 16-bit "
        "weights; a larger learning rate for them would also move them."
    )
    return message, hint
