"""Tensor statistics shared by the callbacks: fused over many tensors, one host transfer."""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def to_host(values: Sequence[Tensor]) -> list[float]:
    """Move many tensors to the host in one batched transfer (one sync, not one per value).

    Each tensor may have any shape; the result is their flattened values, concatenated in order.
    """
    if not values:
        return []
    device = values[0].device
    if all(v.ndim == 0 and v.device == device for v in values):  # many scalars (norms, sums): one stack
        with torch.no_grad(), contextlib.suppress(RuntimeError):  # mixed dtypes on an older torch: general path
            return torch.stack(list(values)).double().cpu().tolist()
    flat = [v.detach().reshape(-1).to(device=device, dtype=torch.float64) for v in values]
    return torch.cat(flat).cpu().tolist()


def foreach_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """L2 norms of many tensors with fused kernels, computed in float32 and grouped by device and dtype."""
    if not tensors:
        return []
    norms: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    for (_, dtype), indices in groups.items():
        # sparse gradients (nn.Embedding(sparse=True)) have no fused kernel: their stored values carry the norm
        group = [
            tensors[i].detach().coalesce().values() if tensors[i].is_sparse else tensors[i].detach() for i in indices
        ]
        if dtype in (torch.float16, torch.bfloat16):
            group = [t.float() for t in group]
        for i, norm in zip(indices, torch._foreach_norm(group)):
            norms[i] = norm.float()
    return [n for n in norms if n is not None]


def is_uniform(tensors: Sequence[Tensor]) -> bool:
    """Whether the tensors share one device and dtype and are dense (sparse ones take ``foreach_norms``' path)."""
    if not tensors:
        return False
    device, dtype = tensors[0].device, tensors[0].dtype
    return all(t.device == device and t.dtype == dtype and t.layout == torch.strided for t in tensors)


def fused_norms(tensors: Sequence[Tensor], uniform: bool | None = None) -> list[Tensor]:
    """``foreach_norms(tensors)`` (the same float32 values) with no per-tensor Python work in the common case.

    One device, one float32/float64 dtype, dense tensors (the usual case): a single ``torch._foreach_norm`` under
    ``no_grad`` instead of one ``detach()`` and one ``float()`` per tensor. Other cases (several devices or dtypes,
    half precision, sparse gradients) fall back to ``foreach_norms``.

    ``uniform=True`` says the caller knows the tensors share one device, dtype and dense layout (a per-tensor check
    costs ~1 us per tensor); should they not, the fused kernel's error still falls back to ``foreach_norms``.
    """
    if not tensors:
        return []
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return foreach_norms(tensors)
    if not (is_uniform(tensors) if uniform is None else uniform):
        return foreach_norms(tensors)
    grad_mode = torch.is_grad_enabled()  # like torch.no_grad(), without the context manager's cost
    torch.set_grad_enabled(False)
    try:
        norms = list(torch._foreach_norm(list(tensors)))
    except RuntimeError:  # not uniform after all (e.g. a sparse gradient)
        return foreach_norms(tensors)
    finally:
        torch.set_grad_enabled(grad_mode)
    if any(n.dtype != torch.float32 for n in (norms[0], norms[-1])):
        norms = [n.float() for n in norms]  # float64 tensors (or a dtype mix the check was told not to look for)
    return norms


class StepNorms(list):  # type: ignore[type-arg]
    """One step's gradient norms (0-d float32 tensors), with their stacked vector once some caller made it."""

    stacked: Tensor | None = None  # the norms as one vector
    source: tuple[Tensor, int] | None = None  # or a vector that holds them from this offset on (NaNGuard's)


def stacked(norms: StepNorms) -> Tensor:
    """``torch.stack(norms)``, made once per step and shared (NaNGuard hands over the vector it transfers)."""
    if norms.stacked is None:
        if norms.source is not None:
            vector, offset = norms.source
            norms.stacked = vector[offset : offset + len(norms)]
        else:
            norms.stacked = torch.stack(list(norms))
    return norms.stacked


def shared_grad_norms(grads: Sequence[Tensor], uniform: bool | None = None, share: bool = True) -> StepNorms:
    """``fused_norms(grads)``, computed once per step for all callers: the step's gradient norms are shared.

    GradNormMonitor, NaNGuard and UpdateRatioMonitor all need the norms of the same gradients in the same
    ``on_before_optimizer_step``: the first caller computes them (one fused norm), the others get the same
    object. It is reused only for the very same tensor objects (checked through weak references, so the memo keeps
    nothing alive) with the same ``_version`` (any in-place change since, e.g. clipping, recomputes). Callers must
    not modify it. ``uniform`` is :func:`fused_norms`'s. ``share=False``: the caller knows no one reads these
    gradients after it this step; it still takes the memo's norms when they are the same, but stores none (the key and
    the weak references cost ~1 us per gradient, with the caches cold after the backward).
    """
    if not grads:
        return StepNorms()
    memo = _NORM_MEMO
    first = memo.refs[0]() if memo.refs else None
    if first is grads[0]:  # else a miss for sure, without building the key (the usual case on a new step)
        key = (*map(id, grads), *map(_VERSION, grads))  # C-level maps
        if memo.key == key and all(ref() is t for ref, t in zip(memo.refs, grads)):
            return memo.norms
    norms = StepNorms(fused_norms(grads, uniform))
    if share:
        memo.key, memo.refs, memo.norms = (*map(id, grads), *map(_VERSION, grads)), list(map(weakref.ref, grads)), norms
    return norms


_VERSION = operator.attrgetter("_version")


class _NormMemo:
    def __init__(self) -> None:
        self.key: tuple[int, ...] | None = None
        self.refs: list[weakref.ref[Tensor]] = []
        self.norms = StepNorms()


_NORM_MEMO = _NormMemo()


def round_significant(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None, 0 and non-finite values unchanged)."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def weight_fingerprints(params: Sequence[Tensor]) -> Tensor:
    """A cheap fingerprint of each tensor's values, to tell later whether it changed: its L1 and L2 norms,
    accumulated in float64 (``(len(params), 2)``, on the first tensor's device). Any ordinary update moves both; only
    a change that leaves both norms exactly equal goes unseen (then the tensor reads as unchanged). Taken on measured
    steps only, for the few parameters suspected of never changing: one tensor at a time."""
    device = params[0].device
    with torch.no_grad():
        rows = [
            torch.stack([torch.linalg.vector_norm(p.detach(), order, dtype=torch.float64) for order in (1, 2)])
            for p in params
        ]
    return torch.stack([row.to(device) for row in rows])


def moved_since(marks: Sequence[tuple[Any, ...]]) -> Tensor:
    """How far each marked tensor moved since it was fingerprinted: ``marks`` holds ``(tensor, fingerprint, ...)``
    (:func:`weight_fingerprints`). Float64 on the first tensor's device: exactly 0 for a tensor whose values did not
    change; non-negative, so it survives averaging or summing across ranks (``reduce_squares``)."""
    now = weight_fingerprints([mark[0] for mark in marks])
    then = torch.stack([mark[1].to(now.device) for mark in marks])
    return (now - then).abs().sum(dim=1)
