"""BatchMixingCheck: does example i's output depend on any other example of the batch?"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_debug.base import OneShotCheck
from lightning_debug.batches import check_probe_fns, default_input
from lightning_debug.distributed import reduce
from lightning_debug.isolation import isolated, probe_batches
from lightning_debug.stats import to_host

InputFn = Callable[[Any], Tensor]
ForwardFn = Callable[[pl.LightningModule, Any], Any]


class BatchMixingCheck(OneShotCheck):
    r"""Checklist item "use backprop to chart dependencies": prove that examples do not leak into each other.

    At ``on_train_start`` it takes one training batch, makes the input a leaf that requires gradients,
    runs the model forward, and for a few probe examples ``i`` backpropagates ``output[i].sum()`` to the
    input batch with :func:`torch.autograd.grad` (only with respect to the input: no parameter's ``.grad``
    is touched). A model that treats examples independently gives an exactly zero gradient on every other
    example ``j != i``; anything else means information crosses the batch dimension: a ``.view()`` /
    ``.reshape()`` where a ``.permute()`` / ``.transpose()`` belongs (e.g. ``(B, T, F) -> (T, B, F)``), a
    flatten that folds the batch into the features (``x.reshape(C, -1)``), or a reduction over dim 0
    (``x - x.mean(0)``, a softmax over the batch). Such a model still trains, it just learns to ignore its
    neighbours, and then behaves differently at batch size 1.

    The check runs in eval mode (BatchNorm uses its running statistics, which legitimately mixes nothing;
    dropout is off) and inside :func:`~lightning_debug.isolation.isolated`: the RNG streams, the loader's
    generators, BatchNorm buffers and every module's train/eval flag are restored, so training afterwards
    is bit-identical. Integer inputs (token ids) cannot carry a gradient: the output of the first
    :class:`~torch.nn.Embedding` that runs is probed instead.

    With ``causal_dim`` set (a sequence model whose input and output carry time on that dimension, e.g.
    ``causal_dim=1`` for ``(B, T, F)``), it also checks that the output at position ``t`` depends only on
    inputs at positions ``<= t`` (an autoregressive model must not see the future).

    Under DDP every rank probes its own batch and the leak magnitudes are reduced (max) across ranks. On
    resume from a checkpoint the check is not repeated.

    Logged scalars (step 0):

    ==========================  ==========================================================================
    tag                         meaning
    ==========================  ==========================================================================
    ``batch_mixing/leak``       largest gradient on another example, relative to the probe's own (0: clean)
    ``batch_mixing/causal``     largest gradient on a future position, relative to the past's (``causal_dim``)
    ==========================  ==========================================================================

    Findings:

    ============================  ========  ==============================================================
    check                         severity  when
    ============================  ========  ==============================================================
    ``batch_mixing.detected``     warning   example ``i``'s output has a gradient on another example
    ``batch_mixing.non_causal``   warning   the output at ``t`` has a gradient on an input after ``t``
    ``batch_mixing.not_checked``  info      no float input or embedding, batch of 1, output without the
                                            batch on dim 0, or the forward raised
    ============================  ========  ==============================================================

    Args:
        num_probes: how many examples to backpropagate from (first, last, and evenly in between).
        causal_dim: the time dimension of input and output for the causality check; ``None`` skips it.
        tolerance: a gradient on another example (or a future position) counts when it exceeds this fraction
            of the probe's own largest gradient; the exact answer for a clean model is 0.
        input_fn: maps a batch to the input tensor to probe (default: the batch itself if it is a tensor, its
            first element if a tuple/list, or ``x``/``input``/``inputs``/``image(s)``/``input_ids`` of a dict).
        forward_fn: ``forward_fn(pl_module, batch)`` returns the model's output for a batch in which the input
            tensor was replaced by the probe (default: ``pl_module(input)``). The output is that tensor, or
            the first floating-point tensor of a tuple/list/dict; its dim 0 must be the batch.

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import BatchMixingCheck

        trainer = Trainer(callbacks=[BatchMixingCheck(causal_dim=1)])
        trainer.fit(model, datamodule)   # a warning at step 0 if examples leak into each other
    """

    def __init__(
        self,
        num_probes: int = 3,
        *,
        causal_dim: int | None = None,
        tolerance: float = 1e-6,
        input_fn: InputFn | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(every_n_steps=None)
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"`num_probes` must be an integer >= 1, got {num_probes!r}")
        if causal_dim is not None and (
            isinstance(causal_dim, bool) or not isinstance(causal_dim, int) or causal_dim < 1
        ):
            raise ValueError(f"`causal_dim` must be None or an integer >= 1 (dim 0 is the batch), got {causal_dim!r}")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance)
            or not 0 <= tolerance < 1
        ):
            raise ValueError(f"`tolerance` must be a number in [0, 1), got {tolerance!r}")
        check_probe_fns(input_fn, forward_fn)
        self.num_probes = num_probes
        self.causal_dim = causal_dim
        self.tolerance = float(tolerance)
        self.input_fn = input_fn
        self.forward_fn = forward_fn
        self.result: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hook
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None:  # restored from a checkpoint: the architecture was checked at the start
            return
        local = self._measure(trainer, pl_module)
        self.result = self._judge(trainer, local)
        scalars = {"batch_mixing/leak": self.result.get("leak")}
        if self.causal_dim is not None:
            scalars["batch_mixing/causal"] = self.result.get("causal_leak")
        self.log_scalars(trainer, {k: float(v) for k, v in scalars.items() if v is not None}, step=0)

    # ------------------------------------------------------------------ measure (local, no collectives)
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        probe = probe_batches(trainer)
        if isinstance(probe, str):
            return {"problem": probe}
        batches, loaders = probe
        try:
            with isolated(pl_module, train_mode=False, loaders=loaders), torch.enable_grad():
                batch = next(iter(batches))
                batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
                return self._probe(trainer, pl_module, batch)
        except StopIteration:
            return {"problem": "the training dataloader is empty"}
        except Exception as err:  # the user's forward: training will meet it again, not our crash
            return {"problem": f"the forward pass raised {type(err).__name__}: {err}"}

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, Any]:
        inputs = self.input_fn(batch) if self.input_fn is not None else default_input(batch)
        if not isinstance(inputs, Tensor):
            return {"problem": f"no input tensor found in the batch ({type(batch).__name__}); pass input_fn"}
        if inputs.dim() == 0 or inputs.shape[0] < 2:
            return {"problem": f"the batch has {inputs.shape[0] if inputs.dim() else 0} example(s); need 2 or more"}
        batch_size = int(inputs.shape[0])
        embedding = None
        if inputs.is_floating_point():
            probe = inputs.detach().clone().requires_grad_(True)
            model_input: Tensor = probe
        else:
            embedding = _EmbeddingProbe(pl_module)
            model_input = inputs
        probed_batch = _replace(batch, inputs, model_input)
        with trainer.precision_plugin.forward_context():
            if embedding is not None:
                with embedding:
                    output = self._forward(pl_module, probed_batch, model_input)
                if embedding.output is None:
                    return {"problem": f"the input is {inputs.dtype} and no nn.Embedding ran; pass input_fn"}
                probe = embedding.output
            else:
                output = self._forward(pl_module, probed_batch, model_input)
        out = _first_float_tensor(output)
        if out is None:
            return {"problem": f"the model output ({type(output).__name__}) holds no floating-point tensor"}
        if out.dim() == 0 or out.shape[0] != batch_size or probe.shape[0] != batch_size:
            return {
                "problem": f"the output's dim 0 ({tuple(out.shape)}) is not the batch of {batch_size}; "
                "pass forward_fn returning a batch-first output"
            }
        if not out.requires_grad:
            return {"problem": "the output does not depend on the input through autograd (no gradient path)"}
        return self._gradients(out, probe, batch_size, "embedding output" if embedding is not None else "input")

    def _forward(self, pl_module: pl.LightningModule, batch: Any, model_input: Tensor) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        return pl_module(model_input)

    def _gradients(self, out: Tensor, probe: Tensor, batch_size: int, probed: str) -> dict[str, Any]:
        probes = sorted({round(k * (batch_size - 1) / max(self.num_probes - 1, 1)) for k in range(self.num_probes)})
        per_example: list[Tensor] = []  # (B,) largest |gradient| on each example, one row per probe
        for index in probes:
            (grad,) = torch.autograd.grad(out[index].float().sum(), probe, retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(probe) if grad is None else grad
            per_example.append(grad.detach().abs().reshape(batch_size, -1).amax(1).float())
        causal_rows: list[Tensor] = []
        positions: list[int] = []
        dim = self.causal_dim
        if dim is not None and dim < out.dim() and dim < probe.dim() and out.shape[dim] == probe.shape[dim] > 1:
            length = int(out.shape[dim])
            positions = sorted({0, length // 2})
            for t in positions:
                (grad,) = torch.autograd.grad(
                    out[0].select(dim - 1, t).float().sum(), probe, retain_graph=True, allow_unused=True
                )
                grad = torch.zeros_like(probe) if grad is None else grad
                per_position = grad[0].detach().abs().movedim(dim - 1, 0).reshape(length, -1).amax(1).float()
                causal_rows.append(per_position)
        host = to_host([v for row in per_example + causal_rows for v in row.unbind()])  # one transfer
        grads = [host[k * batch_size : (k + 1) * batch_size] for k in range(len(probes))]
        result: dict[str, Any] = {"batch_size": batch_size, "probes": probes, "probed": probed}
        result.update(_leaks(probes, grads, self.tolerance))
        if dim is not None:
            if not positions:
                result["causal_problem"] = (
                    f"input {tuple(probe.shape)} and output {tuple(out.shape)} do not share a time dimension "
                    f"{dim} longer than 1"
                )
            else:
                offset = len(probes) * batch_size
                length = len(host[offset:]) // len(positions)
                rows = [host[offset + k * length : offset + (k + 1) * length] for k in range(len(positions))]
                result.update(_causal_leaks(positions, rows, self.tolerance))
        return result

    # ------------------------------------------------------------------ judge (collectives: every rank)
    def _judge(self, trainer: pl.Trainer, local: dict[str, Any]) -> dict[str, Any]:
        device = trainer.strategy.root_device
        flags = torch.tensor(
            [
                float("problem" in local),
                _finite(local.get("leak", 0.0)),
                _finite(local.get("causal_leak", 0.0)),
                float("causal_problem" in local),
            ],
            dtype=torch.float64,
            device=device,
        )
        problem_any, leak, causal_leak, causal_problem_any = to_host(list(reduce(trainer, flags, "max").unbind()))
        result = {k: v for k, v in local.items() if k != "problem"}
        if problem_any > 0:
            reason = local.get("problem", "another rank could not run it")
            self.report(
                trainer,
                "batch_mixing.not_checked",
                "info",
                f"The batch-mixing check did not run: {reason}.",
                "Pass input_fn (batch -> float input tensor) and forward_fn (pl_module, batch -> batch-first output).",
            )
            return {"status": "not_checked", "reason": reason}
        result.update(leak=leak, status="ok")
        if leak > self.tolerance:
            result["status"] = "mixing"
            self.report(
                trainer,
                "batch_mixing.detected",
                "warning",
                self._mixing_message(local, leak),
                "Look for a .view()/.reshape() that moves the batch dimension where a .permute()/.transpose() "
                "belongs (x.permute(1, 0, 2), not x.view(T, B, F)), a flatten that folds the batch in "
                "(x.flatten(1) or x.reshape(len(x), -1), not x.reshape(C, -1)), or a reduction over dim 0 "
                "(mean/sum/softmax over the batch) in forward.",
                {
                    "leak": leak,
                    "pairs": local.get("pairs", []),
                    "probes": local.get("probes"),
                    "batch_size": local.get("batch_size"),
                },
            )
        if self.causal_dim is not None:
            if causal_problem_any > 0:
                self.report(
                    trainer,
                    "batch_mixing.not_checked",
                    "info",
                    f"The causality check did not run: {local.get('causal_problem', 'another rank could not run it')}.",
                    "Set causal_dim to the time dimension shared by the input and the output, or None.",
                )
            else:
                result["causal_leak"] = causal_leak
                if causal_leak > self.tolerance:
                    result["status"] = "non_causal" if result["status"] == "ok" else result["status"]
                    self.report(
                        trainer,
                        "batch_mixing.non_causal",
                        "warning",
                        self._causal_message(local, causal_leak),
                        "Make every layer causal: left-pad convolutions (padding=(k-1, 0), not symmetric), mask "
                        "attention with a lower-triangular mask (is_causal=True), use a unidirectional RNN, and "
                        "shift the targets by one step rather than the inputs.",
                        {"causal_leak": causal_leak, "future": local.get("future", []), "dim": self.causal_dim},
                    )
        return result

    def _mixing_message(self, local: dict[str, Any], leak: float) -> str:
        pairs = local.get("pairs") or []
        words = "; ".join(
            f"example {p['probe']}'s output depends on example(s) {', '.join(map(str, p['others']))}" for p in pairs[:3]
        )
        where = f" ({words})" if words else " (on another rank)"
        return (
            f"Backpropagating one example's output to the {local.get('probed', 'input')} gives a non-zero gradient "
            f"on other examples of the batch{where}: {_ratio_words(leak, 'the example')}, expected exactly 0. "
            "The model mixes information across the batch dimension."
        )

    def _causal_message(self, local: dict[str, Any], causal_leak: float) -> str:
        future = local.get("future") or []
        words = "; ".join(
            f"output at t={f['t']} depends on input positions {', '.join(map(str, f['positions']))}" for f in future
        )
        where = f" ({words})" if words else " (on another rank)"
        return (
            f"The output at position t depends on inputs after t along dim {self.causal_dim}{where}: "
            f"{_ratio_words(causal_leak, 'the past')}, expected exactly 0 on the future."
        )


class _EmbeddingProbe:
    """Replaces the first ``nn.Embedding`` output of a forward with a leaf that requires gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.output: Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _EmbeddingProbe:
        for module in self.model.modules():
            if isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.output is not None or not isinstance(output, Tensor):
            return None
        self.output = output.detach().requires_grad_(True)
        return self.output

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _replace(batch: Any, old: Tensor, new: Tensor) -> Any:
    """``batch`` with the tensor object ``old`` replaced by ``new`` (tuples, lists, dicts, namedtuples)."""
    if batch is old:
        return new
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_replace(v, old, new) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_replace(v, old, new) for v in batch)
    if isinstance(batch, Mapping):
        return {k: _replace(v, old, new) for k, v in batch.items()}
    return batch


def _first_float_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.is_floating_point() or output.is_complex() else None
    values: Sequence[Any] = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(values, (tuple, list)):
        for value in values:
            found = _first_float_tensor(value)
            if found is not None:
                return found
    return None


def _leaks(probes: list[int], grads: list[list[float]], tolerance: float) -> dict[str, Any]:
    """The largest gradient on another example relative to the probe's own, and who leaks into whom."""
    worst = 0.0
    pairs = []
    for index, row in zip(probes, grads):
        own = row[index]
        others = [(j, g) for j, g in enumerate(row) if j != index and g > 0]
        if not others:
            continue
        largest = max(g for _, g in others)
        relative = largest / own if own > 0 else math.inf
        worst = max(worst, relative)
        leaking = [j for j, g in others if (g / own if own > 0 else math.inf) > tolerance]
        if leaking:
            pairs.append({"probe": index, "others": leaking[:8], "count": len(leaking), "relative": relative})
    return {"leak": worst, "pairs": pairs}


def _causal_leaks(positions: list[int], rows: list[list[float]], tolerance: float) -> dict[str, Any]:
    worst = 0.0
    future = []
    for t, row in zip(positions, rows):
        past = max(row[: t + 1])
        after = row[t + 1 :]
        largest = max(after, default=0.0)
        if largest <= 0:
            continue
        relative = largest / past if past > 0 else math.inf
        worst = max(worst, relative)
        leaking = [t + 1 + k for k, g in enumerate(after) if (g / past if past > 0 else math.inf) > tolerance]
        if leaking:
            future.append({"t": t, "positions": leaking[:8], "count": len(leaking), "relative": relative})
    return {"causal_leak": worst, "future": future}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e30


def _ratio_words(value: float, own: str) -> str:
    if value >= 1e30:
        return f"the largest is non-zero while {own} itself gets no gradient at all"
    return f"the largest is {value:.3g}x the gradient on {own} itself"
