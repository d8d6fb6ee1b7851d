"""BatchMixingCheck: does example i's output depend on any other example of the batch?"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_debug.base import OneShotCheck
from lightning_debug.batches import check_probe_fns, default_input
from lightning_debug.distributed import reduce
from lightning_debug.isolation import isolated, on_device, probe_batches
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

    The batch is dim 0 of the input, or dim 1 when the batch size (the length of a 1-D label tensor in the batch,
    else the training DataLoader's ``batch_size``) is found on dim 1 and not on dim 0: a time-major ``(T, B, ...)``
    batch (``pad_sequence``'s default, ``nn.LSTM``'s layout) is probed along dim 1, and its output along dim 1 too
    (or dim 0, a per-sequence output). When no batch size tells, and examples leak only from earlier indices along
    dim 0 (index ``i`` depends on ``0..i``, never later: the signature of a time axis read by a recurrent layer),
    the result is an info, not a warning; with the batch size confirming dim 0, such a leak is a warning (a
    recurrent layer without ``batch_first=True`` reading the batch as time). When the batch size is on both dim 0 and
    dim 1 (a time-major batch whose sequence length equals the batch size, ``T == B``), both are probed: clean along
    dim 0 is clean; a leak along both is a warning; a leak along dim 0 only is an info, not a warning, because a
    correct time-major model and a batch-first model mixing dim 0 give the same gradients there (a batch size other
    than the sequence length tells them apart).

    BatchNorm layers without running statistics (``track_running_stats=False``: transductive BatchNorm in few-shot
    learning, MAML) normalise with the batch's statistics at evaluation too and mix the batch by design. The probe
    holds their statistics fixed (the same forward values, no gradient through the statistics), so a leak
    elsewhere in the model is still a warning; when they ran and nothing else leaks, the result is an info naming
    them.

    With ``causal_dim`` set (a sequence model whose input and output carry time on that dimension, e.g.
    ``causal_dim=1`` for ``(B, T, F)``; counted with the batch moved to dim 0 for a time-major batch), it also
    checks that the output at position ``t`` depends only on inputs at positions ``<= t`` (an autoregressive model
    must not see the future).

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
    ``batch_mixing.by_design``    info      only BatchNorm layers without running statistics mix the batch
    ``batch_mixing.not_checked``  info      no float input or embedding, batch of 1, output without the
                                            batch on dim 0, dim 0 looks like time or the batch size is on
                                            dims 0 and 1 and only dim 0 leaks (see above), or the forward
                                            raised
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
            the first floating-point tensor of a tuple/list/dict; its dim 0 must be the batch (or dim 1 for a
            time-major batch, see above).
        batch_dim: the input's batch dimension, 0 or 1 (time-major); ``None``: found from the batch size (see
            above), which cannot tell dim 0 from dim 1 when the sequence length equals the batch size.

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
        batch_dim: int | None = None,
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
        if (batch_dim is not None and batch_dim not in (0, 1)) or isinstance(batch_dim, bool):
            raise ValueError(f"`batch_dim` must be None, 0 or 1, got {batch_dim!r}")
        check_probe_fns(input_fn, forward_fn)
        self.batch_dim = batch_dim
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
                batch = on_device(trainer, next(iter(batches)))
                return self._probe(trainer, pl_module, batch, _loader_batch_size(loaders))
        except StopIteration:
            return {"problem": "the training dataloader is empty"}
        except Exception as err:  # the user's forward: training will meet it again, not our crash
            return {"problem": f"the forward pass raised {type(err).__name__}: {err}"}

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, loader_batch_size: int | None
    ) -> dict[str, Any]:
        inputs = self.input_fn(batch) if self.input_fn is not None else default_input(batch)
        if not isinstance(inputs, Tensor):
            return {"problem": f"no input tensor found in the batch ({type(batch).__name__}); pass input_fn"}
        reference = _labels_length(batch, inputs) or loader_batch_size
        # [0, 1] when the batch size is on both: ambiguous, unless batch_dim says
        candidates = _batch_dims(inputs, reference) if self.batch_dim is None else [self.batch_dim]
        if self.batch_dim is not None and inputs.dim() <= self.batch_dim:
            return {"problem": f"the input {tuple(inputs.shape)} has no dim {self.batch_dim} (batch_dim)"}
        batch_dim = candidates[0]
        if inputs.dim() == 0 or inputs.shape[batch_dim] < 2:
            return {"problem": f"the batch has {inputs.shape[0] if inputs.dim() else 0} example(s); need 2 or more"}
        batch_size = int(inputs.shape[batch_dim])
        embedding = None
        if inputs.is_floating_point():
            probe = inputs.detach().clone().requires_grad_(True)
            model_input: Tensor = probe
        else:
            embedding = _EmbeddingProbe(pl_module)
            model_input = inputs
        probed_batch = _replace(batch, inputs, model_input)
        batch_stats = _BatchStatistics(pl_module)
        with trainer.precision_plugin.forward_context(), batch_stats:
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
        out_dims = {
            dim: out_dim
            for dim in candidates
            if (out_dim := _output_batch_dim(out, dim, batch_size)) is not None
            and probe.dim() > dim
            and probe.shape[dim] == batch_size
        }
        if not out_dims:
            where = "dim 0" if candidates == [0] else "dim 0 or 1"
            return {
                "problem": f"the output's {where} ({tuple(out.shape)}) is not the batch of {batch_size}; "
                "pass forward_fn returning a batch-first output"
            }
        if not out.requires_grad:
            return {"problem": "the output does not depend on the input through autograd (no gradient path)"}
        probed = "embedding output" if embedding is not None else "input"
        results = []
        for dim, out_dim in out_dims.items():
            result = self._gradients(out.movedim(out_dim, 0), probe, dim, batch_size, probed)
            result["batch_dim"] = dim
            # a leak on earlier indices only: the signature of a time axis read by a recurrent layer
            result["earlier_only"] = bool(result.get("pairs")) and not result.pop("later", False)
            results.append(result)
        result = _choose(results, self.tolerance, tuple(probe.shape))
        # ... along a dimension no batch size confirms: a time axis rather than the batch
        result["time_like"] = result.pop("earlier_only") and reference != batch_size and self.batch_dim is None
        if batch_stats.ran:
            result["batch_statistics"] = batch_stats.ran
        return result

    def _forward(self, pl_module: pl.LightningModule, batch: Any, model_input: Tensor) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        return pl_module(model_input)

    def _gradients(self, out: Tensor, probe: Tensor, batch_dim: int, batch_size: int, probed: str) -> dict[str, Any]:
        """Per-example gradients of the batch-first ``out`` with respect to ``probe`` (batch on ``batch_dim``)."""

        def grad_of(value: Tensor) -> Tensor:  # |d value / d probe|, batch first
            (grad,) = torch.autograd.grad(value.float().sum(), probe, retain_graph=True, allow_unused=True)
            return (torch.zeros_like(probe) if grad is None else grad).detach().abs().movedim(batch_dim, 0)

        probes = sorted({round(k * (batch_size - 1) / max(self.num_probes - 1, 1)) for k in range(self.num_probes)})
        per_example: list[Tensor] = []  # (B,) largest |gradient| on each example, one row per probe
        for index in probes:
            per_example.append(grad_of(out[index]).reshape(batch_size, -1).amax(1).float())
        causal_rows: list[Tensor] = []
        positions: list[int] = []
        dim = self.causal_dim
        probe_shape = probe.movedim(batch_dim, 0).shape
        if dim is not None and dim < out.dim() and dim < len(probe_shape) and out.shape[dim] == probe_shape[dim] > 1:
            length = int(out.shape[dim])
            positions = sorted({0, length // 2})
            for t in positions:
                grad = grad_of(out[0].select(dim - 1, t))
                causal_rows.append(grad[0].movedim(dim - 1, 0).reshape(length, -1).amax(1).float())
        host = to_host([v for row in per_example + causal_rows for v in row.unbind()])  # one transfer
        grads = [host[k * batch_size : (k + 1) * batch_size] for k in range(len(probes))]
        result: dict[str, Any] = {"batch_size": batch_size, "probes": probes, "probed": probed}
        result.update(_leaks(probes, grads, self.tolerance))
        if dim is not None:
            if not positions:
                result["causal_problem"] = (
                    f"input {tuple(probe_shape)} and output {tuple(out.shape)} do not share a time dimension "
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
        local_leak = _finite(local.get("leak", 0.0))
        time_like = bool(local.get("time_like"))
        ambiguous = local.get("ambiguous")
        flags = torch.tensor(
            [
                float("problem" in local),
                0.0 if time_like else local_leak,
                _finite(local.get("causal_leak", 0.0)),
                float("causal_problem" in local),
                local_leak if time_like else 0.0,
                float(bool(local.get("batch_statistics"))),
                _finite(ambiguous["leak"]) if ambiguous else 0.0,
            ],
            dtype=torch.float64,
            device=device,
        )
        problem_any, leak, causal_leak, causal_problem_any, time_leak, batch_statistics_any, ambiguous_leak = to_host(
            list(reduce(trainer, flags, "max").unbind())
        )
        result = {k: v for k, v in local.items() if k not in ("problem", "time_like")}
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
        if leak <= self.tolerance and time_leak > self.tolerance:
            result.update(status="not_checked", reason="dim 0 looks like time", time_leak=time_leak)
            self.report(
                trainer,
                "batch_mixing.not_checked",
                "info",
                self._time_axis_message(local, time_leak),
                "If the batches are time-major (T, B, ...), e.g. pad_sequence's default batch_first=False for an "
                "nn.LSTM/GRU/RNN: pass input_fn and forward_fn that give the check a batch-first input and output "
                "(or collate with batch_first=True and build the layers with batch_first=True), or use a DataLoader "
                "with a batch_size so the check can find the batch dimension. If dim 0 is the batch, a recurrent or "
                "causal-attention layer built without batch_first=True reads the batch as time.",
                {"time_leak": time_leak, "pairs": local.get("pairs", []), "size": local.get("batch_size")},
            )
        elif leak <= self.tolerance and ambiguous_leak > self.tolerance:
            result.update(status="not_checked", reason="the batch dimension is ambiguous")
            self.report(
                trainer,
                "batch_mixing.not_checked",
                "info",
                self._ambiguous_message(local, ambiguous_leak),
                "Pass BatchMixingCheck(batch_dim=0 or 1), or run the check once with a batch size different from "
                "the sequence length, so it knows the batch dimension. Nothing to fix if "
                "dim 1 is the batch. If dim 0 is: build nn.LSTM/GRU/RNN/Transformer layers with batch_first=True for "
                "(B, T, F) inputs, and look for a .T/.transpose()/.view() that swaps the batch with another dimension "
                "or a reduction over dim 0.",
                {
                    "ambiguous_leak": ambiguous_leak,
                    "pairs": (ambiguous or {}).get("pairs", []),
                    "shape": local.get("shape"),
                    "batch_size": local.get("batch_size"),
                },
            )
        elif leak <= self.tolerance and batch_statistics_any > 0:
            names = local.get("batch_statistics") or ["(on another rank)"]
            result["by_design"] = names
            listed = ", ".join(f"`{name}`" for name in names[:5]) + (" and more" if len(names) > 5 else "")
            self.report(
                trainer,
                "batch_mixing.by_design",
                "info",
                f"{len(names)} BatchNorm layer(s) without running statistics ({listed}; track_running_stats=False) "
                "normalise with the statistics of the batch at evaluation too: they mix the batch by design. The rest "
                f"of the model was checked with their batch statistics held fixed: leak {leak:.3g}, expected 0.",
                "Nothing to fix for transductive batch normalisation (few-shot, MAML). Otherwise build them with "
                "track_running_stats=True (batch statistics in training only), or use GroupNorm or LayerNorm, which "
                "normalise each example on its own.",
                {"layers": names, "leak": leak},
            )
        if leak > self.tolerance:
            result["status"] = "mixing"
            self.report(
                trainer,
                "batch_mixing.detected",
                "warning",
                self._mixing_message(local, leak),
                "Look for a .view()/.reshape() that moves the batch dimension where a .permute()/.transpose() "
                "belongs (x.permute(1, 0, 2), not x.view(T, B, F)), a flatten that folds the batch in "
                "(x.flatten(1) or x.reshape(len(x), -1), not x.reshape(C, -1)), a reduction over dim 0 "
                "(mean/sum/softmax over the batch) in forward, or an nn.LSTM/GRU/RNN/Transformer layer built without "
                "batch_first=True given batch-first (B, T, F) inputs (example i then depends on examples 0..i).",
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
        both = (
            f" The batch size {local.get('batch_size')} is on both dim 0 and dim 1 of the "
            f"{local.get('probed', 'input')} {local.get('shape')}: it mixes along both "
            f"(shown: dim {local.get('batch_dim')})."
            if local.get("batch_dims")
            else ""
        )
        return (
            f"Backpropagating one example's output to the {local.get('probed', 'input')} gives a non-zero gradient "
            f"on other examples of the batch{where}: {_ratio_words(leak, 'the example')}, expected exactly 0. "
            f"The model mixes information across the batch dimension.{both}"
        )

    def _ambiguous_message(self, local: dict[str, Any], ambiguous_leak: float) -> str:
        ambiguous = local.get("ambiguous")
        if not ambiguous:
            return (
                "The batch-mixing check could not tell the batch dimension on another rank: the batch size is on both "
                "dim 0 and dim 1 of its input, and the model mixes the examples along dim 0 only."
            )
        words = "; ".join(
            f"index {p['probe']} depends on {', '.join(map(str, p['others']))}" for p in ambiguous["pairs"][:3]
        )
        how = (
            "each index on earlier ones only, as a recurrent layer built without batch_first=True reads a batch-first "
            "batch"
            if ambiguous.get("earlier_only")
            else "the examples are mixed"
        )
        return (
            f"The batch-mixing check could not tell the batch dimension: the batch size {local.get('batch_size')} is "
            f"on both dim 0 and dim 1 of the {local.get('probed', 'input')} {local.get('shape')}. Along dim 1 no "
            f"example leaks into another; along dim 0 they do ({words}: {_ratio_words(ambiguous_leak, 'the index')}). "
            "If dim 1 is the batch (a time-major (T, B, ...) batch, the layout of nn.LSTM/GRU/RNN without "
            f"batch_first), the model is correct and dim 0 is its time axis; if dim 0 is the batch, {how}."
        )

    def _time_axis_message(self, local: dict[str, Any], time_leak: float) -> str:
        size = local.get("batch_size")
        return (
            f"The batch-mixing check did not run: along dim 0 of the {local.get('probed', 'input')} (size {size}), "
            f"each index depends only on earlier ones ({_ratio_words(time_leak, 'the index')}), the signature of a "
            "time axis, and the batch size could not be read from the DataLoader or a 1-D label tensor to tell."
            if local.get("time_like")
            else "The batch-mixing check did not run: on another rank dim 0 of the input looks like a time axis."
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


class _BatchStatistics:
    """While active, BatchNorm layers without running statistics (which normalise with the batch's statistics in eval
    mode too) normalise with the same statistics held fixed (detached): the forward gives the same values, and the
    gradient no longer flows from one example to the others through the statistics. ``ran`` names those that ran."""

    _FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.running_mean is None
            and module.running_var is None
            and type(module).forward in self._FORWARDS
            and "forward" not in vars(module)
        ]
        self.ran: list[str] = []

    def __enter__(self) -> _BatchStatistics:
        for name, module in self.modules:
            module.forward = self._forward(name, module)  # type: ignore[method-assign,assignment]
        return self

    def _forward(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            if name not in self.ran:
                self.ran.append(name)
            dims = [0, *range(2, x.dim())]
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean = x.detach().mean(dims, keepdim=True)
            var = x.detach().var(dims, unbiased=False, keepdim=True)
            y = (x - mean) / torch.sqrt(var + module.eps)
            if module.weight is not None:
                y = y * module.weight.reshape(shape)
            if module.bias is not None:
                y = y + module.bias.reshape(shape)
            return y

        return forward

    def __exit__(self, *exc: Any) -> None:
        for _, module in self.modules:
            vars(module).pop("forward", None)


def _loader_batch_size(loaders: Sequence[Any]) -> int | None:
    """The examples in the first batch of the training DataLoader(s) (their ``batch_size``, or fewer when the sampler
    holds fewer), when they agree on one."""
    sizes = set()
    for loader in loaders:
        if isinstance(loader, DataLoader) and loader.batch_size:
            size = int(loader.batch_size)
            try:
                size = min(size, len(loader.sampler))  # type: ignore[arg-type]
            except TypeError:  # a sampler without a length
                pass
            sizes.add(size)
    return sizes.pop() if len(sizes) == 1 else None


def _labels_length(batch: Any, inputs: Tensor) -> int | None:
    """The length of the 1-D tensor(s) beside the input in a tuple/list/dict batch (labels: one per example)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else []
    lengths = {int(v.shape[0]) for v in values if isinstance(v, Tensor) and v is not inputs and v.dim() == 1}
    return lengths.pop() if len(lengths) == 1 else None


def _batch_dims(inputs: Tensor, reference: int | None) -> list[int]:
    """The candidate batch dimensions of the input: ``[1]`` for a time-major input (dim 0 is not the batch size the
    loader or the labels give, dim 1 is), ``[0, 1]`` when the batch size is on both (ambiguous), else ``[0]``."""
    if reference is None or reference < 2 or inputs.dim() < 2 or inputs.shape[1] != reference:
        return [0]
    return [0, 1] if inputs.shape[0] == reference else [1]


def _choose(results: list[dict[str, Any]], tolerance: float, shape: tuple[int, ...]) -> dict[str, Any]:
    """The verdict of the probes along the candidate batch dimensions (dims 0 and 1 when both have the batch size).

    Dim 0 clean is clean (dim 0 is the batch unless something says otherwise). Dim 0 leaking with dim 1 clean is
    ``ambiguous``: a time-major ``(T, B, ...)`` batch with ``T == B`` through a correct model gives the same gradients
    as a batch-first batch through a model that mixes dim 0 (e.g. a recurrent layer without ``batch_first=True``).
    Both leaking is mixing whichever is the batch, shown along the dimension with the smaller leak.
    """
    if len(results) == 1:
        return results[0]
    first, second = results
    both = {"batch_dims": [first["batch_dim"], second["batch_dim"]], "shape": shape}
    if first["leak"] <= tolerance:
        return first | both
    if second["leak"] <= tolerance:
        ambiguous = {
            "dim": first["batch_dim"],
            "leak": first["leak"],
            "pairs": first["pairs"],
            "earlier_only": first["earlier_only"],
        }
        return second | both | {"ambiguous": ambiguous}
    return min(results, key=lambda result: float(result["leak"])) | both


def _output_batch_dim(out: Tensor, batch_dim: int, batch_size: int) -> int | None:
    """The output's batch dimension: the input's if it has the batch size there, else dim 0 if that has it."""
    for dim in (batch_dim, 0) if batch_dim else (0,):
        if out.dim() > dim and out.shape[dim] == batch_size:
            return dim
    return None


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
    later = False  # a leak from an index after the probe (a time axis leaks from earlier ones only)
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
            later = later or leaking[-1] > index
            pairs.append({"probe": index, "others": leaking[:8], "count": len(leaking), "relative": relative})
    return {"leak": worst, "pairs": pairs, "later": later}


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
