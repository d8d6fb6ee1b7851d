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
