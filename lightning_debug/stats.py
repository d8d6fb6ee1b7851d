"""Tensor statistics shared by the callbacks: fused over many tensors, one host transfer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def to_host(values: Sequence[Tensor]) -> list[float]:
    """Move many tensors to the host in one batched transfer (one sync, not one per value).

    Each tensor may have any shape; the result is their flattened values, concatenated in order.
    """
    if not values:
        return []
    device = values[0].device
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


def global_norm(norms: Sequence[Tensor]) -> Tensor:
    """The L2 norm of the concatenation, from the per-tensor norms."""
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return torch.linalg.vector_norm(stacked)


def safe_log10(value: float, floor: float = 1e-30) -> float:
    return math.log10(max(value, floor)) if math.isfinite(value) else value
