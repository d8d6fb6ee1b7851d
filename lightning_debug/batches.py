"""Finding the model's inputs in a batch of the usual shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "input_ids")


def default_input(batch: Any) -> Tensor | None:
    """The input tensor of a batch: the batch itself, its first element, or a dict entry named like an input."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    return None


def check_probe_fns(input_fn: Any, forward_fn: Any) -> None:
    """Validate the ``input_fn`` / ``forward_fn`` arguments of the callbacks that run the model on a probe batch."""
    if input_fn is not None and not callable(input_fn):
        raise ValueError(f"`input_fn` must be a callable batch -> Tensor or None, got {input_fn!r}")
    if forward_fn is not None and not callable(forward_fn):
        raise ValueError(f"`forward_fn` must be a callable (pl_module, batch) -> output or None, got {forward_fn!r}")
