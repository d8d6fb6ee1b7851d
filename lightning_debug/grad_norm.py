"""GradNormMonitor: gradient norms every step on the device, spikes, vanishing or missing gradients, a clip value."""

from __future__ import annotations

import bisect
import math
import operator
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_debug.base import DiagnosticCallback
from lightning_debug.distributed import reduce_squares
from lightning_debug.optimizers import OptimizerParams, optimizer_index
from lightning_debug.stats import (
    StepNorms,
    is_uniform,
    moved_since,
    round_significant,
    shared_grad_norms,
    stacked,
    to_host,
    weight_fingerprints,
)
from lightning_debug.validation import check_float, check_int

GroupBy = Literal["parameter", "module"]
GROUP_BY: tuple[str, ...] = ("parameter", "module")


@dataclass
class _StepLog:
    """Host-side record of one optimizer's global gradient norms (filled on measured steps)."""

    # the unread steps: (global step, the step's per-gradient norms on the device, the factor the norms are
    # unscaled by or None). The norms are the ones shared with NaNGuard (stats.shared_grad_norms): keeping a
    # reference costs no device work; the global norms are summed up on the device when they are read.
    unread: list[tuple[int, StepNorms, Tensor | None]] = field(default_factory=list)
    uniform: bool | None = None  # the gradients share one device, float dtype and dense layout (checked on refresh)
    optimizer_steps: int = 0
    restored: list[tuple[int, float]] = field(default_factory=list)  # unread norms carried by a checkpoint
    recent: deque[float] = field(default_factory=deque)  # the running reference window
    ordered: list[float] = field(default_factory=list)  # the same values sorted: the median without a sort per step
    history: deque[float] = field(default_factory=deque)  # every finite norm (bounded) for clip fractions
    finite_steps: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)
    spikes: list[dict[str, float]] = field(default_factory=list)
    peak_median: float = 0.0  # the largest running median so far: the norms of the run at its most active
    judged_through: int = -1  # the latest step judged: NaNGuard's feed sends the steps after it
    stepping: int = -1  # the optimizer step seen last: a second call within it is a closure re-evaluation (LBFGS)


class GradNormMonitor(DiagnosticCallback):
    r"""Watch the gradients the optimizer is about to apply: spikes, vanishing or missing gradients, a clip value.

    In ``on_before_optimizer_step`` (after AMP unscaling, before Lightning's gradient clipping) it computes the
    L2 norm of every parameter's gradient with one fused kernel (``torch._foreach_norm``) and their global norm.

    - **Every optimizer step** the per-gradient norms stay on the device (the vector shared with NaNGuard; this
      monitor keeps a reference, at most ``every_n_steps + 1`` of them): no host sync, no extra kernel. On measured
      steps the unread steps' global norms are summed on the device and read in one batched transfer together with
      the per-parameter norms, so every step is judged and a spike between two measured steps is found.
      With NaNGuard in the same run (one process, one optimizer, automatic optimization, no GradScaler, no
      ``autoclip``), NaNGuard already brings every step's gradient norms to the host for its own check; this
      monitor takes them from it (``NaNGuard.grad_norm_feed``) and its hook runs on measured steps only.
    - **Spikes**: a step whose norm is at least ``spike_factor`` times the running median of the previous
      ``window`` finite norms (judged once ``min_history`` steps were seen). Healthy runs' norms drift 10-100x as
      the loss falls; the running median follows that, and a single step ~10x above it is normal. Measured on
      digits (MLP, BatchNorm CNN, RNN; batch 8-64, SGD and Adam, 13 runs, 141-376 steps): the largest healthy
      ratio was 11.6x; batches holding a record with inputs 500x too large gave 58x-356x. The default 25x sits
      between the two (the geometric mean of 11.6 and 58 is 26), with a ~2x margin on either side.
      A spike must also be ``clip_factor`` times the largest running median of the run so far (its norms at their
      most active): once the loss is ~0 most batches give almost no gradient and the median falls ~100x, while a
      batch with a not-yet-fitted example still reaches the norms the run trained through. Measured on digits
      (MLP, SGD under OneCycleLR to a training loss of ~0.001, 940 steps): such steps were 29x-157x the running
      median but at most 1.7x the run's largest running median; the corrupted-record spikes above were 56x-468x it.
    - **Clip suggestion**: ``suggested_clip_value = clip_factor x`` the running median (default 5x). Healthy steps
      exceed 5x their running median in ~1% of steps (measured p99 ratio 1.9-7.3), so it clips outliers and
      leaves ordinary steps alone. The summary states the statistic, the fraction of all recorded steps it would
      have clipped and the ``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")`` line. Norms early
      in training are often larger, so the fraction of *all* steps can exceed the recent one; ``autoclip=True``
      clips at the moving threshold instead.
    - If you already clip by norm, the summary says how often clipping fires; a threshold below the median norm
      rescales nearly every step: that is gradient normalisation, not outlier clipping (info finding).
    - Steps with non-finite gradients (with a GradScaler: the steps it skips for overflow) are counted apart and
      kept out of every statistic, ``grad_norm.no_grad`` included. Acting on them is NaNGuard's job.
    - **Missing gradients** are seen on measured steps. A parameter that had none on every measured step so far is
      fingerprinted (the L1 and L2 norms of its weights, on the device, on measured steps only and only while such
      parameters exist); if its weights moved by a later measured step (read in that step's transfer, or once when
      training ends), it got a gradient on a step in between and is not ``grad_norm.no_grad``: e.g. a multi-task
      head used on odd steps while the cadence measures even ones. A parameter whose gradient was an all-zero tensor
      while its param group has weight decay is not cleared so: decay moves weights without a gradient.
    - **Several closure evaluations per step** (LBFGS): Lightning calls ``on_before_optimizer_step`` after each.
      One optimizer step is one step here (counted, judged and logged once): its norms are those of the step's first
      closure evaluation, the gradient at the parameters the step starts from; the later evaluations are not
      recorded (with ``autoclip`` their gradients are clipped at the same threshold).
    - **Sparse gradients** (``nn.Embedding(sparse=True)``) are measured by the norm of their stored values.
    - **Embedding tables** (``nn.Embedding``, ``nn.EmbeddingBag``) and parameters with sparse gradients are logged
      but not judged vanishing: a batch's gradient reaches only the rows of the tokens it holds, so the RMS over
      the whole table falls with the vocabulary's size (17 of 100,000 rows per batch: ~1e-5 of the largest
      parameter's) although those rows learn normally.
    - **Training raises**: on a single device the unread norms are judged just before the end-of-run report is
      written, so a spike before the crash reaches it. Under DDP this is skipped: reading them is a collective,
      and the report is written on rank 0 alone.

    Under DDP the gradients agree after the all-reduce; norms are computed on every rank, averaged on measured
    steps (so every rank judges the same numbers) and logged from rank 0. Sharded strategies (FSDP, DeepSpeed)
    sum squared shard norms across ranks instead. Optimizers that unscale inside ``step`` (fused) have their
    norms divided by the scaler's scale. Several optimizers (manual optimization) each get their own history.

    Logged scalars:

    ====================================  ====================================================================
    tag                                   meaning
    ====================================  ====================================================================
    ``grad_norm/global``                  global L2 norm of the gradients on measured steps (every step with
                                          ``log_every_step=True``, written on measured steps at each step's own
                                          index); ``global_opt<i>`` for optimizer ``i > 0``
    ``grad_norm/global_max``              the largest global norm since the previous log (every step is
                                          measured on the device; this shows a spike between two logs)
    ``grad_norm/<param.dotted.name>``     one parameter's gradient norm (``group_by="module"``: one module's),
                                          on measured steps
    ``grad_norm/suggested_clip``          the clip value suggested now (``clip_factor`` x running median)
    ``grad_norm/skipped_steps``           steps with non-finite gradients so far (GradScaler-skipped)
    ``grad_norm/clip_fraction``           fraction of steps your ``gradient_clip_val`` clipped (when set)
    ====================================  ====================================================================

    Findings:

    ===========================  ========  ===============================================================
    check                        severity  when
    ===========================  ========  ===============================================================
    ``grad_norm.spike``          warning   a step's norm >= ``spike_factor`` x the running median (and
                                           >= ``clip_factor`` x the run's largest running median)
    ``grad_norm.no_grad``        warning   parameters with ``requires_grad=True`` in an optimizer that never
                                           got a gradient, or only zeros, over ``patience`` measured steps
                                           with finite gradients, and whose weights did not move in between
                                           (also at the end of training)
    ``grad_norm.vanishing``      warning   a weight (>= 2-D) whose gradient RMS stays below
                                           ``vanishing_ratio`` x the largest parameter's for ``patience``
                                           measured steps; ``info`` for 1-D parameters (biases, norms);
                                           embedding tables are not judged
    ``grad_norm.non_finite``     warning   non-finite gradients (``info`` with a GradScaler, which skips them)
    ``grad_norm.clip_normalises``  info    your ``gradient_clip_val`` is below the median norm
    ===========================  ========  ===============================================================

    Args:
        every_n_steps: measure every this many optimizer steps; ``None``: every ``2 * Trainer(log_every_n_steps)``
            steps (100 at Lightning's default; every step's global norm is still judged for spikes).
        group_by: ``"parameter"`` (one norm per parameter) or ``"module"`` (per owning module).
        window: steps in the running reference (median) window.
        min_history: finite steps needed before spikes are judged and a clip value is suggested.
        spike_factor: a step >= this many times the running median is a spike (> 1).
        clip_factor: the suggested clip is this many times the running median (> 1).
        vanishing_ratio: gradient RMS relative to the largest parameter's below which a layer is vanishing, in (0, 1).
        patience: measured steps a vanishing or missing gradient must persist before it is reported.
        autoclip: clip every step at ``clip_factor`` x the running median. **Changes training**; off by default.
        history_size: finite norms kept on the host for the clip fractions.
        log_every_step: log ``grad_norm/global`` at every optimizer step (one logger write per step, made on the
            measured steps) instead of at the measured steps with ``grad_norm/global_max``. Spikes are judged on
            every step either way.

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import GradNormMonitor

        monitor = GradNormMonitor(every_n_steps=25)
        trainer = Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        print(monitor.suggested_clip_value)  # 1.7 -> Trainer(gradient_clip_val=1.7, gradient_clip_algorithm="norm")
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        group_by: GroupBy = "parameter",
        window: int = 50,
        min_history: int = 20,
        spike_factor: float = 25.0,
        clip_factor: float = 5.0,
        vanishing_ratio: float = 1e-3,
        patience: int = 5,
        autoclip: bool = False,
        history_size: int = 10_000,
        log_every_step: bool = False,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        if group_by not in GROUP_BY:
            raise ValueError(f"`group_by` must be one of {GROUP_BY}, got {group_by!r}")
        check_int("window", window, 2)
        check_int("min_history", min_history, 1)
        check_int("patience", patience, 1)
        check_int("history_size", history_size, 1)
        if min_history > window:
            raise ValueError(f"`min_history` must be <= `window` ({window}), got {min_history!r}")
        check_float("spike_factor", spike_factor, low=1.0)
        check_float("clip_factor", clip_factor, low=1.0)
        check_float("vanishing_ratio", vanishing_ratio, low=0.0, high=1.0)
        if not isinstance(autoclip, bool):
            raise ValueError(f"`autoclip` must be True or False, got {autoclip!r}")
        if not isinstance(log_every_step, bool):
            raise ValueError(f"`log_every_step` must be True or False, got {log_every_step!r}")
        self.group_by = group_by
        self.window = window
        self.min_history = min_history
        self.spike_factor = float(spike_factor)
        self.clip_factor = float(clip_factor)
        self.vanishing_ratio = float(vanishing_ratio)
        self.patience = patience
        self.autoclip = autoclip
        self.history_size = history_size
        self.log_every_step = log_every_step
        self._logs: dict[int, _StepLog] = {}
        self._names: dict[int, str] = {}
        self._params = OptimizerParams()  # re-read on measured steps
        self._measured = 0
        self._finite_measured = 0  # measured steps whose per-parameter gradient norms were all finite
        self._grad_seen: dict[str, bool] = {}  # name -> ever a non-zero gradient
        # parameters without a gradient so far: their weights' fingerprint when first seen so (weight_fingerprints),
        # and whether weight decay may move them; weights that moved since got a gradient between measured steps
        self._marks: dict[str, tuple[nn.Parameter, Tensor, bool]] = {}
        self._zero_grads: set[str] = set()  # parameters whose gradient was an all-zero tensor on a measured step
        self._vanishing_run: dict[str, int] = {}  # name -> consecutive measured steps below vanishing_ratio
        self._reported: set[str] = set()  # "check:name" reported once
        self._last_rms_ratio: dict[str, float] = {}
        self._embeddings: set[str] = set()  # embedding tables: not judged vanishing (on_train_start)
        self._feed: list[tuple[int, list[float], int]] | None = None  # NaNGuard's per-step norms (on_train_start)
        self._guarded = False  # a NaNGuard is in the run (on_train_start)

    # ------------------------------------------------------------------ public
    @property
    def suggested_clip_value(self) -> float | None:
        """``clip_factor`` x the running median of the first optimizer's norms; None before ``min_history`` steps."""
        log = self._logs.get(0)
        return None if log is None else self._clip_value(log)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        tables = {id(m.weight) for m in pl_module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        self._embeddings = {name for key, name in self._names.items() if key in tables}
        self._params.clear()  # a new fit: new optimizers
        self._marks.clear()  # (the parameters they hold may be others now)
        for log in self._logs.values():
            log.stepping = -1
        self._feed = None
        guard = next((cb for cb in trainer.callbacks if callable(getattr(cb, "grad_norm_feed", None))), None)  # type: ignore[attr-defined]
        self._guarded = guard is not None  # NaNGuard skips the non-finite steps (the finding says so)
        if (
            guard is not None
            and not self.autoclip
            and trainer.world_size == 1
            and len(trainer.optimizers) == 1
            and pl_module.automatic_optimization
            and getattr(trainer.precision_plugin, "scaler", None) is None
        ):  # NaNGuard brings every step's gradient norms to the host: between measured steps this hook can doze
            self._feed = guard.grad_norm_feed()

    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_before_optimizer_step",) if self._feed is not None else ()

    def busy(self, step: int) -> bool:
        return step % (self._interval or 1) == 0  # the measured steps: the others' norms come from the feed

    def next_change(self, step: int) -> int | None:
        interval = self._interval or 1
        if interval == 1:
            return None
        position = step % interval
        return step + 1 if position == 0 else step + interval - position

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        log = self._logs.get(index)
        if log is None:
            log = self._logs[index] = _StepLog()
        step = self.global_step(trainer)
        if step == log.stepping:  # the closure evaluated again within the same optimizer step (LBFGS)
            if self.autoclip:
                self._clip_again(trainer, optimizer, log)
            return
        log.stepping = step
        measured = self.is_measured_optimizer_step(trainer, log.optimizer_steps)
        params = self._params.get(optimizer, refresh=measured)
        if not params:
            return
        grads = [g for g in map(_GRAD, params) if g is not None]  # one attribute read per parameter
        if measured or log.uniform is None:
            log.uniform = is_uniform(grads)
        norms = shared_grad_norms(grads, log.uniform)
        inv_scale = _inverse_grad_scale(trainer, optimizer)
        # the per-step work is the fused norm shared with NaNGuard; this monitor only keeps a reference to it
        if len(log.unread) > self.measure_interval(trainer):
            self._flush_log(trainer, index, log)  # cannot happen with one read per interval: read, lose nothing
        log.unread.append((step, norms, inv_scale))
        if self._feed:
            self._drain(log)  # the steps this hook dozed through (after the append: not this step twice)
        if self.autoclip and grads:
            global_sq = stacked(norms).double().square().sum()
            if inv_scale is not None:
                global_sq = global_sq * inv_scale.double().square()
            self._clip(log, grads, global_sq)
        log.optimizer_steps += 1
        if measured:
            self._measure(trainer, index, log, params, norms, inv_scale, optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        if self._marks and "no_grad" not in self._reported:  # moved since the last measured step: one transfer
            moved = to_host([reduce_squares(trainer, moved_since(list(self._marks.values())))])
            self._clear_moved(list(self._marks), moved)
        self._marks.clear()
        if self._measured:
            self._judge_no_grad(trainer)

    def flush_before_report(self, trainer: pl.Trainer) -> None:
        # judge the norms still unread on the device so that a spike before a crash reaches the report.
        # Single device only: under DDP the flush is a collective (the ranks' norms are averaged) and the report
        # is written on rank 0 alone.
        if trainer.world_size == 1:
            try:
                self._flush(trainer)
            except Exception:  # never mask the exception that ended training
                pass

    # ------------------------------------------------------------------ measure (device)
    def _clip_again(self, trainer: pl.Trainer, optimizer: Optimizer, log: _StepLog) -> None:
        """``autoclip`` on a repeated closure evaluation (LBFGS): its gradients are clipped like the first's, at the
        same threshold; nothing is recorded."""
        grads = [g for g in map(_GRAD, self._params.get(optimizer)) if g is not None]
        if not grads:
            return
        global_sq = stacked(shared_grad_norms(grads)).double().square().sum()
        inv_scale = _inverse_grad_scale(trainer, optimizer)
        if inv_scale is not None:
            global_sq = global_sq * inv_scale.double().square()
        self._clip(log, grads, global_sq)

    def _clip(self, log: _StepLog, grads: list[Tensor], global_sq: Tensor) -> None:
        threshold = self._clip_value(log)
        if threshold is None:
            return
        norm = global_sq.sqrt()
        factor = torch.clamp(threshold / (norm + 1e-6), max=1.0)
        factor = torch.where(torch.isfinite(norm), factor, torch.ones_like(factor))
        for dtype_grads in _by_dtype(grads):
            torch._foreach_mul_(dtype_grads, factor.to(dtype_grads[0].dtype))

    @staticmethod
    def _unread(log: _StepLog) -> Tensor | None:
        """The squared global gradient norms (float64, on the device) of the steps not read yet."""
        if not log.unread:
            return None
        steps = [norms for _, norms, _ in log.unread]
        if not any(steps):
            return torch.zeros(len(steps), dtype=torch.float64)
        width = len(steps[0])
        sources = [norms.source for norms in steps]
        first = sources[0]
        if first is not None and all(
            source is not None and len(norms) == width and source[1] == first[1] and source[0].shape == first[0].shape
            for norms, source in zip(steps, sources)
        ):  # every step's norms sit at the same place of NaNGuard's transfer vectors: one stack, one slice
            offset = first[1]
            rows = torch.stack([source[0] for source in sources if source is not None])[:, offset : offset + width]
            squares = rows.double().square().sum(dim=1)
            return _unscaled(log, squares)
        vectors = [stacked(norms) if norms else None for norms in steps]
        device = next(v for v in vectors if v is not None).device
        if all(v is not None and v.shape[0] == width and v.device == device for v in vectors):
            squares = torch.stack(vectors).double().square().sum(dim=1)  # type: ignore[arg-type]  # one row per step
        else:  # the set of parameters with a gradient changed between steps
            zero = torch.zeros((), dtype=torch.float64, device=device)
            squares = torch.stack([zero if v is None else v.to(device).double().square().sum() for v in vectors])
        return _unscaled(log, squares)

    # ------------------------------------------------------------------ measured step: one transfer
    def _measure(
        self,
        trainer: pl.Trainer,
        index: int,
        log: _StepLog,
        params: list[nn.Parameter],
        norms: StepNorms,
        inv_scale: Tensor | None,
        optimizer: Optimizer,
    ) -> None:
        device = params[0].device
        per_param_sq = torch.zeros(len(params), dtype=torch.float64, device=device)
        has_grad = torch.zeros(len(params), dtype=torch.float64, device=device)
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if with_grad:
            squares = stacked(norms).double().square()
            if inv_scale is not None:
                squares = squares * inv_scale.double().square()
            per_param_sq[with_grad] = squares
            has_grad[with_grad] = 1.0
        unread = self._unread(log)
        names = [self._names.get(id(p), f"opt{index}.param{i}") for i, p in enumerate(params)]
        # parameters without a gradient on the measured steps so far: did their weights move since? (in the same
        # transfer; only while there are such parameters)
        marked = [name for name in names if name in self._marks] if self._marks else []
        parts = [per_param_sq, has_grad]
        if marked:
            parts.append(moved_since([self._marks[name] for name in marked]).to(device))
        if unread is not None:
            parts.append(unread.to(device))
        host = to_host([reduce_squares(trainer, torch.cat(parts))])
        count = len(params)
        self._ingest_steps(trainer, index, log, host[2 * count + len(marked) :])
        self._measured += 1
        self._clear_moved(marked, host[2 * count : 2 * count + len(marked)])
        numels = [p.numel() for p in params]
        ndims = [p.ndim for p in params]
        # embedding tables and sparse gradients: a batch reaches a few rows, their RMS over the table is not judged
        rows = {name for name, p in zip(names, params) if p.grad is not None and p.grad.is_sparse} | self._embeddings
        self._ingest_params(trainer, names, numels, ndims, host[:count], host[count : 2 * count], rows)
        self._mark(optimizer, names, params)
        self._judge_no_grad(trainer)
        self._log_clip(trainer, index, log)

    def _mark(self, optimizer: Optimizer, names: list[str], params: list[nn.Parameter]) -> None:
        """Fingerprint the weights of the parameters that got no gradient so far (once each, on the device): if they
        move by a later measured step, they got a gradient on a step in between (a head used on odd steps only, while
        the measured steps are even). Not for a parameter whose gradient was an all-zero tensor while weight decay
        applies to it: decay moves weights without a gradient."""
        for name in [n for n in self._marks if self._grad_seen.get(n, True)]:
            del self._marks[name]  # it got a gradient on this measured step
        if "no_grad" in self._reported:
            self._marks.clear()
            return
        new = [i for i, name in enumerate(names) if not self._grad_seen.get(name, True) and name not in self._marks]
        if not new:
            return
        decayed = {id(p) for group in optimizer.param_groups if group.get("weight_decay") for p in group["params"]}
        new = [i for i in new if not (names[i] in self._zero_grads and id(params[i]) in decayed)]
        if not new:
            return
        fingerprints = weight_fingerprints([params[i] for i in new])
        for i, fingerprint in zip(new, fingerprints.unbind()):
            self._marks[names[i]] = (params[i], fingerprint, id(params[i]) in decayed)

    def _clear_moved(self, names: list[str], moved: Sequence[float]) -> None:
        """The marked parameters whose weights moved since they were marked got a gradient at some step."""
        for name, distance in zip(names, moved):
            if distance == 0.0:
                continue
            _, _, decayed = self._marks.pop(name)
            if not (decayed and name in self._zero_grads):
                self._grad_seen[name] = True

    def _flush(self, trainer: pl.Trainer) -> None:
        self._fed_log()
        for index, log in sorted(self._logs.items()):
            self._flush_log(trainer, index, log)

    def _fed_log(self) -> None:
        """The first optimizer's log when the feed may hold steps this hook never saw (it dozed since the start)."""
        if self._feed and 0 not in self._logs:
            self._logs[0] = _StepLog()

    def _drain(self, log: _StepLog) -> None:
        """Take the steps NaNGuard's feed sent since the last judged step (not the ones this hook saw itself)."""
        feed = self._feed
        if not feed:
            return
        seen = {step for step, _, _ in log.unread}
        after = max(log.judged_through, max((step for step, _ in log.restored), default=-1))
        for step, values, offset in feed:
            if step > after and step not in seen:
                norms = values[offset:] if offset else values
                square = sum(map(operator.mul, norms, norms))  # C-level: 50 steps x every tensor on a read
                log.restored.append((step, math.sqrt(square) if square >= 0 else float("nan")))
                after = step
        feed.clear()

    def _flush_log(self, trainer: pl.Trainer, index: int, log: _StepLog) -> None:
        if index == 0 and self._feed:
            self._drain(log)
        unread = self._unread(log)
        if unread is None and not log.restored:
            return
        values = [] if unread is None else to_host([reduce_squares(trainer, unread)])
        self._ingest_steps(trainer, index, log, values)
        self._log_clip(trainer, index, log)

    # ------------------------------------------------------------------ judge
    def _ingest_steps(self, trainer: pl.Trainer, index: int, log: _StepLog, squares: Sequence[float]) -> None:
        """Judge every step since the last read, in order, against the running median before it."""
        entries = list(log.restored)
        log.restored = []
        entries += [(step, math.sqrt(sq) if sq >= 0 else float("nan")) for (step, _, _), sq in zip(log.unread, squares)]
        log.unread = []
        if entries:
            log.judged_through = max(log.judged_through, max(step for step, _ in entries))
        tag = "grad_norm/global" if index == 0 else f"grad_norm/global_opt{index}"
        new_spikes: list[dict[str, float]] = []
        new_nonfinite: list[int] = []
        finite: list[tuple[int, float]] = []
        for step, norm in entries:
            if not math.isfinite(norm):
                log.nonfinite_steps.append(step)
                new_nonfinite.append(step)
                continue
            if len(log.recent) >= self.min_history:
                reference = _sorted_median(log.ordered)
                # ...and an outlier for the run at its most active too: near convergence most batches give ~0
                # gradient and the median falls 50-100x below the norms the run trained through, which one hard
                # batch still reaches (clip_factor x a running median bounds a healthy outlier, see above)
                if (
                    reference > 0
                    and norm >= self.spike_factor * reference
                    and norm >= self.clip_factor * log.peak_median
                ):
                    spike = {
                        "step": step, "norm": norm, "reference": reference, "ratio": norm / reference,
                        "run_peak_median": log.peak_median,
                    }  # fmt: skip
                    log.spikes.append(spike)
                    new_spikes.append(spike)
            log.recent.append(norm)
            bisect.insort(log.ordered, norm)
            while len(log.recent) > self.window:
                del log.ordered[bisect.bisect_left(log.ordered, log.recent.popleft())]
            if len(log.recent) >= self.min_history:
                log.peak_median = max(log.peak_median, _sorted_median(log.ordered))
            log.history.append(norm)
            while len(log.history) > self.history_size:
                log.history.popleft()
            log.finite_steps += 1
            finite.append((step, norm))
        if self.log_every_step:
            for step, norm in finite:
                self.log_scalars(trainer, {tag: norm}, step=step)
        elif finite:  # the latest step's norm, and the largest since the last log: a spike between logs shows
            step, norm = finite[-1]
            self.log_scalars(trainer, {tag: norm, f"{tag}_max": max(n for _, n in finite)}, step=step)
        del log.nonfinite_steps[:-1000]
        if new_nonfinite:
            self._report_nonfinite(trainer, index, log, new_nonfinite)
        if new_spikes:
            self._report_spikes(trainer, index, log, new_spikes)

    def _ingest_params(
        self,
        trainer: pl.Trainer,
        names: list[str],
        numels: list[int],
        ndims: list[int],
        squares: list[float],
        has_grad: list[float],
        rows: set[str],
    ) -> None:
        finite = all(math.isfinite(sq) for sq in squares)
        if finite:  # an overflowed (GradScaler-skipped) step says nothing about which parameters get gradients
            self._finite_measured += 1
        for name, square, got in zip(names, squares, has_grad):
            self._grad_seen[name] = self._grad_seen.get(name, False) or (got > 0 and square > 0)
            if got > 0 and square == 0:
                self._zero_grads.add(name)
        scalars = {f"grad_norm/{key}": math.sqrt(sq) for key, sq in self._group(names, squares).items() if sq >= 0}
        self.log_scalars(trainer, {k: v for k, v in scalars.items() if math.isfinite(v)})
        if not finite:
            return  # a non-finite step says nothing about vanishing layers
        rms = [math.sqrt(sq / max(n, 1)) for sq, n in zip(squares, numels)]
        largest = max(rms, default=0.0)
        if largest <= 0:
            return
        for name, value, got in zip(names, rms, has_grad):
            if got <= 0 or value <= 0:
                continue  # missing or zero gradients are grad_norm.no_grad's business
            ratio = value / largest
            self._last_rms_ratio[name] = ratio
            if name in rows:
                continue  # an embedding table: see the class docstring
            self._vanishing_run[name] = self._vanishing_run.get(name, 0) + 1 if ratio < self.vanishing_ratio else 0
        self._report_vanishing(trainer, ndims_by_name=dict(zip(names, ndims)))

    def _group(self, names: list[str], squares: list[float]) -> dict[str, float]:
        if self.group_by == "parameter":
            return dict(zip(names, squares))
        grouped: dict[str, float] = {}
        for name, sq in zip(names, squares):
            module = name.rsplit(".", 1)[0] if "." in name else name
            grouped[module] = grouped.get(module, 0.0) + sq
        return grouped

    def _clip_value(self, log: _StepLog) -> float | None:
        if len(log.recent) < self.min_history:
            return None
        median = statistics.median(log.recent)
        return self.clip_factor * median if median > 0 else None

    def _clip_stats(self, log: _StepLog) -> dict[str, Any]:
        clip = self._clip_value(log)
        if clip is None:
            return {}
        history = list(log.history)
        recent = list(log.recent)
        return {
            "suggested_clip_value": round_significant(clip),
            "statistic": f"{self.clip_factor:g} x median of the last {len(recent)} finite global norms",
            "running_median": round_significant(statistics.median(recent)),
            "clipped_fraction_all_steps": round_significant(sum(n > clip for n in history) / len(history)),
            "clipped_fraction_recent": round_significant(sum(n > clip for n in recent) / len(recent)),
            "trainer_args": f'Trainer(gradient_clip_val={round_significant(clip)}, gradient_clip_algorithm="norm")',
        }

    def _user_clip(self, trainer: pl.Trainer) -> float | None:
        value = trainer.gradient_clip_val
        algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
        return float(value) if value and algorithm == "norm" else None

    def _log_clip(self, trainer: pl.Trainer, index: int, log: _StepLog) -> None:
        suffix = "" if index == 0 else f"_opt{index}"
        scalars = {f"grad_norm/skipped_steps{suffix}": float(len(log.nonfinite_steps))}
        clip = self._clip_value(log)
        if clip is not None:
            scalars[f"grad_norm/suggested_clip{suffix}"] = clip
        user_clip = self._user_clip(trainer)
        if user_clip is not None and log.history:
            fraction = sum(n > user_clip for n in log.history) / len(log.history)
            scalars[f"grad_norm/clip_fraction{suffix}"] = fraction
            self._report_clip_normalises(trainer, log, user_clip, fraction)
        self.log_scalars(trainer, scalars)

    # ------------------------------------------------------------------ findings
    def _report_spikes(self, trainer: pl.Trainer, index: int, log: _StepLog, spikes: list[dict[str, float]]) -> None:
        worst = max(spikes, key=lambda s: s["ratio"])
        clip = self._clip_stats(log)
        which = "" if index == 0 else f" (optimizer {index})"
        clip_args = clip.get("trainer_args", 'Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")')
        steps = [int(s["step"]) for s in spikes]
        peak = worst.get("run_peak_median", 0.0)
        peak_text = f" and {worst['norm'] / peak:.0f}x the run's largest running median {peak:.3g}" if peak > 0 else ""
        self.report(
            trainer,
            "grad_norm.spike",
            "warning",
            f"Gradient norm spike{which} at step {int(worst['step'])}: {worst['norm']:.3g} is {worst['ratio']:.0f}x "
            f"the running median {worst['reference']:.3g} of the last {self.window} steps (threshold "
            f"{self.spike_factor:g}x; healthy runs stay within ~10x){peak_text}. {len(spikes)} spike(s) at steps "
            f"{steps[:10]}, {len(log.spikes)} in total.",
            f"Look for corrupted or unnormalised records in the batches of steps {steps[:10]} (inputs or targets "
            f"orders of magnitude larger than the rest). Meanwhile clip: "
            f"{clip_args} ({clip.get('statistic', 'not enough steps yet')}), or lower the learning rate.",
            {**{k: v for k, v in worst.items()}, "spike_steps": steps, "total_spikes": len(log.spikes), **clip},
            step=int(worst["step"]),
        )

    def _report_nonfinite(self, trainer: pl.Trainer, index: int, log: _StepLog, steps: list[int]) -> None:
        key = f"non_finite:{index}"
        if key in self._reported:
            return
        self._reported.add(key)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        total = log.finite_steps + len(log.nonfinite_steps)
        if scaler is not None:
            self.report(
                trainer,
                "grad_norm.non_finite",
                "info",
                f"{len(log.nonfinite_steps)} of {total} steps had non-finite gradients (first at step {steps[0]}); "
                "the GradScaler skips these steps while it calibrates its scale (expected: a few at the start and "
                "about one per growth interval). They are kept out of the gradient statistics.",
                "Nothing to do while skipped steps stay rare; if they persist, use bf16-mixed or add NaNGuard.",
                {"steps": steps[:20], "nonfinite_steps": len(log.nonfinite_steps), "total_steps": total},
                step=steps[0],
            )
        else:
            guarded = self._guarded
            self.report(
                trainer,
                "grad_norm.non_finite",
                "warning",
                f"Non-finite gradients (NaN/Inf) at step {steps[0]} ({len(log.nonfinite_steps)} of {total} steps "
                "so far; expected 0 without a GradScaler). "
                + ("NaNGuard skipped these steps" if guarded else "The optimizer applied them")
                + "; they are kept out of the gradient statistics.",
                "Lower the learning rate (NaNGuard's findings give the rate it backed off to) and clip gradients."
                if guarded
                else "Add NaNGuard to skip such steps and back off the learning rate (by 3x), or lower the learning "
                "rate and clip gradients.",
                {"steps": steps[:20], "nonfinite_steps": len(log.nonfinite_steps), "total_steps": total},
                step=steps[0],
            )

    def _report_vanishing(self, trainer: pl.Trainer, ndims_by_name: dict[str, int]) -> None:
        flagged = [
            n
            for n, run in self._vanishing_run.items()
            if run >= self.patience and f"vanishing:{n}" not in self._reported
        ]
        if not flagged:
            return
        for name in flagged:
            self._reported.add(f"vanishing:{name}")
        weights = [n for n in flagged if ndims_by_name.get(n, 2) >= 2]
        others = [n for n in flagged if n not in weights]
        ratios = {n: round_significant(self._last_rms_ratio[n]) for n in flagged}
        if weights:
            self.report(
                trainer,
                "grad_norm.vanishing",
                "warning",
                f"Vanishing gradients in {weights}: gradient RMS {[ratios[n] for n in weights]} of the largest "
                f"parameter's, below {self.vanishing_ratio:g} for {self.patience} measured steps in a row (healthy "
                "digits MLP/CNN/RNN layers stay above 0.05).",
                "These layers barely learn. Use ReLU/GELU instead of saturating sigmoid/tanh, a normalisation layer "
                "(BatchNorm/LayerNorm), residual connections, or a variance-preserving init (kaiming_normal_).",
                {"parameters": weights, "rms_ratio": {n: ratios[n] for n in weights}},
            )
        if others:
            self.report(
                trainer,
                "grad_norm.vanishing",
                "info",
                f"1-D parameters {others} get almost no gradient: RMS {[ratios[n] for n in others]} of the largest "
                f"parameter's (below {self.vanishing_ratio:g}) for {self.patience} measured steps.",
                "A bias directly before BatchNorm gets no gradient (the normalisation removes it): harmless, "
                "build that layer with bias=False. Otherwise check what feeds these parameters.",
                {"parameters": others, "rms_ratio": {n: ratios[n] for n in others}},
            )

    def _judge_no_grad(self, trainer: pl.Trainer) -> None:
        # judged only after `patience` measured steps with finite gradients, also at the end of training: at step 0
        # a zero-initialised final layer gives every earlier layer an exact-zero gradient, and steps a GradScaler
        # skips for overflow have non-finite norms; neither says a parameter never gets a gradient
        if "no_grad" in self._reported or self._finite_measured < self.patience:
            return
        missing = [name for name, seen in self._grad_seen.items() if not seen]
        if not missing:
            return
        self._reported.add("no_grad")
        self.report(
            trainer,
            "grad_norm.no_grad",
            "warning",
            f"{len(missing)} parameter(s) with requires_grad=True never received a non-zero gradient in "
            f"{self._finite_measured} measured steps with finite gradients (expected: every optimised parameter "
            f"gets one): {missing[:20]}.",
            "Look for a .detach(), torch.no_grad() or .data in the forward path of these parameters, or a branch "
            "that is never used; if they are frozen on purpose set requires_grad_(False) and leave them out of the "
            "optimizer.",
            {"parameters": missing, "measured_steps": self._measured, "finite_measured_steps": self._finite_measured},
        )

    def _report_clip_normalises(self, trainer: pl.Trainer, log: _StepLog, user_clip: float, fraction: float) -> None:
        if "clip_normalises" in self._reported or len(log.recent) < self.min_history:
            return
        median = statistics.median(log.recent)
        if user_clip >= median:
            return
        self._reported.add("clip_normalises")
        suggestion = self._clip_value(log)
        self.report(
            trainer,
            "grad_norm.clip_normalises",
            "info",
            f"gradient_clip_val={user_clip:g} is below the median gradient norm {median:.3g}: clipping fires on "
            f"{fraction:.0%} of steps, so it rescales (normalises) nearly every gradient instead of catching outliers.",
            f"That acts like a lower learning rate. To clip outliers only, use "
            f"gradient_clip_val={round_significant(suggestion)} ({self.clip_factor:g} x the running median)."
            if suggestion
            else "To clip outliers only, set gradient_clip_val a few times above the median norm.",
            {"gradient_clip_val": user_clip, "median": median, "clip_fraction": fraction},
        )

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for index, log in sorted(self._logs.items()):
            entry: dict[str, Any] = {
                "steps": log.finite_steps + len(log.nonfinite_steps),
                "nonfinite_steps": len(log.nonfinite_steps),
                "spikes": len(log.spikes),
                **self._clip_stats(log),
            }
            if log.recent:
                entry["median_norm"] = round_significant(statistics.median(log.recent))
            out["global" if index == 0 else f"optimizer_{index}"] = entry
        missing = [name for name, seen in self._grad_seen.items() if not seen]
        if missing:
            out["no_grad"] = missing
        out["measured_steps"] = self._measured
        return out

    def extra_state(self) -> dict[str, Any]:
        logs = {}
        self._fed_log()
        for index, log in self._logs.items():
            if index == 0:
                self._drain(log)
            unread = self._unread(log)
            pending = list(log.restored)
            if unread is not None:  # the device vectors do not travel; their norms do (a sync only on save)
                squares = unread.cpu().tolist()
                steps = [step for step, _, _ in log.unread]
                pending += [(s, math.sqrt(v) if v >= 0 else float("nan")) for s, v in zip(steps, squares)]
            logs[index] = {
                "pending": [[s, repr(v)] for s, v in pending],
                "optimizer_steps": log.optimizer_steps,
                "recent": list(log.recent),
                "history": list(log.history),
                "finite_steps": log.finite_steps,
                "nonfinite_steps": list(log.nonfinite_steps),
                "spikes": list(log.spikes),
                "peak_median": log.peak_median,
            }
        return {
            "logs": logs,
            "measured": self._measured,
            "finite_measured": self._finite_measured,
            "grad_seen": dict(self._grad_seen),
            "zero_grads": sorted(self._zero_grads),
            "vanishing_run": dict(self._vanishing_run),
            "reported": sorted(self._reported),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._logs = {}
        for index, raw in state.get("logs", {}).items():
            log = _StepLog()
            log.restored = [(int(s), float(v)) for s, v in raw.get("pending", [])]
            log.optimizer_steps = int(raw.get("optimizer_steps", 0))
            log.recent = deque(float(v) for v in raw.get("recent", []))
            log.ordered = sorted(log.recent)
            log.history = deque(float(v) for v in raw.get("history", []))
            log.finite_steps = int(raw.get("finite_steps", 0))
            log.nonfinite_steps = [int(s) for s in raw.get("nonfinite_steps", [])]
            log.spikes = [dict(s) for s in raw.get("spikes", [])]
            log.peak_median = float(raw.get("peak_median", 0.0))
            self._logs[int(index)] = log
        self._measured = int(state.get("measured", 0))
        self._finite_measured = int(state.get("finite_measured", self._measured))
        self._grad_seen = {str(k): bool(v) for k, v in state.get("grad_seen", {}).items()}
        self._zero_grads = {str(name) for name in state.get("zero_grads", [])}
        self._vanishing_run = {str(k): int(v) for k, v in state.get("vanishing_run", {}).items()}
        self._reported = set(state.get("reported", []))


_GRAD = operator.attrgetter("grad")


def _sorted_median(ordered: list[float]) -> float:
    """``statistics.median`` of an already sorted list."""
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _unscaled(log: _StepLog, squares: Tensor) -> Tensor:
    """``squares`` times each unread step's squared unscaling factor (fused optimizers that unscale themselves)."""
    device = squares.device
    scales = [scale for _, _, scale in log.unread]
    if any(scale is not None for scale in scales):
        one = torch.ones((), dtype=torch.float64, device=device)
        factors = torch.stack([one if f is None else f.to(device, torch.float64).reshape(()) for f in scales])
        squares = squares * factors.square()
    return squares


# ---------------------------------------------------------------------- helpers shared with update_ratio.py
def _inverse_grad_scale(trainer: pl.Trainer, optimizer: Optimizer) -> Tensor | None:
    """1/scale for optimizers that unscale inside ``step`` (their gradients are still scaled in the hook)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not _optimizer_handles_unscaling(optimizer):
        return None
    scale = getattr(scaler, "_scale", None)
    return None if scale is None else 1.0 / scale


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())
