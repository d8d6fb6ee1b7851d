"""Finding the model's inputs in a batch of the usual shapes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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


class ForwardSignature:
    """The positional and named parameters of a model's ``forward``: how many inputs it takes."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        try:
            parameters = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):  # a builtin or wrapped forward without a signature: one argument
            parameters = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p for p in parameters if p.kind in kinds]
        self.positional = len(positional)
        self.required = sum(p.default is inspect.Parameter.empty for p in positional)
        self.var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.names = {p.name for p in parameters if p.kind in named}
        self.required_names = {p.name for p in parameters if p.kind in named and p.default is inspect.Parameter.empty}

    def takes(self, count: int) -> bool:
        """Whether ``count`` >= 2 inputs fit forward's positional parameters (it takes several)."""
        if count < 2 or self.positional < 2:
            return False
        return self.required <= count and (count <= self.positional or self.var_positional)


def target_index(length: int, signature: ForwardSignature | None) -> int:
    """Where the target sits in a tuple/list batch of ``length`` >= 2 elements.

    The last one for ``(inputs, target)``, and for ``(x1, ..., xn, target)`` when ``forward`` requires 2 or more
    positional inputs and takes those ``n``; otherwise the second: ``(inputs, target, ...)``, where what follows the
    target (sample weights, the examples' indices, sequence lengths) is no target.
    """
    if length <= 2 or (signature is not None and signature.required >= 2 and signature.takes(length - 1)):
        return length - 1
    return 1
