"""NaNGuard: skip bad steps, roll back bad weights, back off the learning rate, halt cleanly — on every rank alike."""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import statistics
import types
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch import Tensor

from lightning_debug.base import DiagnosticCallback
from lightning_debug.distributed import reduce
from lightning_debug.optimizers import OptimizerParams, float16_eps_problems, float16_eps_text, max_lr
from lightning_debug.stats import StepNorms, foreach_norms, fused_norms, is_uniform, shared_grad_norms, to_host

OnHalt = Literal["stop", "raise"]
ON_HALT: tuple[str, ...] = ("stop", "raise")

# scheduler attributes and param-group keys a scheduler computes the learning rate from
_SCHEDULER_LR_ATTRIBUTES = ("base_lrs", "max_lrs", "min_lrs", "eta_min")
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")  # swa_lr: SWALR anneals towards it


class NaNGuardHalt(RuntimeError):
    """Raised by ``NaNGuard(on_halt="raise")`` when backing off the learning rate no longer helps."""


class NaNGuardError(RuntimeError):
    """Raised when a checkpoint would hold non-finite weights and no good snapshot can replace them."""


class _SkipStep(Exception):
    """Unwinds ``optimizer.step`` right after its closure, before the optimizer touches any state."""

    def __init__(self, result: Any) -> None:
        super().__init__("step skipped by NaNGuard")
        self.result = result


class NaNGuard(DiagnosticCallback):
    r"""Checklist item "NaNs: the learning rate is too high — reduce it by 3x until they stop".

    NaNGuard checks every optimizer step and rescues a diverging run when it can, or stops it cleanly:

    1. **Detect.** In ``on_before_optimizer_step`` (after backward, DDP's all-reduce and AMP unscaling,
       before clipping and the update) it checks, fused into one device flag: the loss of the step
       (summed over accumulated micro-batches and all ranks), the gradients (one ``torch._foreach_norm``
       over all of them; a gradient whose L2 norm overflows float32 counts as non-finite). With
       ``check_params`` the parameters and floating-point buffers (e.g. BatchNorm statistics) that the
       previous update produced are checked too, not on every step but where it tells something: on every
       step whose loss or gradients are non-finite (a non-finite weight the forward reads makes the loss
       non-finite on the very step a per-step check would have caught it, and is then named and rolled back
       at once), every ``every_n_steps`` steps (weights no loss reads: unused rows, eval-only buffers), before
       every snapshot (a snapshot is always finite) and in every checkpoint. Buffers that already hold NaN/Inf
       when training starts (an attention mask of -inf) hold them by design: they are left out of these checks
       (``nan_guard.nonfinite_buffers_by_design``, info). Optionally (``spike_factor``) a
       loss above ``spike_factor`` times the median of the last ``spike_window`` good losses counts as bad too.
    2. **Skip.** A bad step is skipped: ``optimizer.step`` is unwound right after its closure, before the
       optimizer reads anything, so parameters and optimizer state (moments, step counters) are untouched.
       With a GradScaler the scaler's own skip is reused.
    3. **Roll back.** When the parameters are non-finite, or ``rollback_after`` bad steps come in a row (the
       weights themselves diverged, even if still finite), the model's ``state_dict`` and the optimizer
       state are restored from the last good snapshot. Snapshots live in host memory: one copy of the
       parameters and buffers plus one copy of the optimizer state (e.g. 3x the parameter bytes for Adam,
       2x for SGD with momentum), taken when training starts and then after every ``snapshot_every_n_steps``
       consecutive good steps. The step counter and the LR schedule go on; the skipped batches are lost.
    4. **Back off.** The learning rate of every param group of every optimizer is multiplied by
       ``backoff_factor``, together with what the schedulers compute it from (``base_lrs``, ``max_lrs``,
       ``min_lrs``, ``eta_min`` and the groups' ``initial_lr``/``max_lr``/``min_lr``/``swa_lr``), so the reduction
       survives LambdaLR, OneCycleLR, cosine, step, cyclic and plateau schedulers (also inside SequentialLR /
       ChainedScheduler) and SWALR once it runs (Lightning's ``StochasticWeightAveraging`` sets its ``swa_lrs``
       when averaging starts: a backoff before then does not carry into them). No second backoff within
       ``cooldown_steps`` optimizer steps of the previous one; bad steps in the cooldown are still skipped (and
       rolled back).
    5. **Halt.** When another backoff is needed after ``max_backoffs``, or it would bring the largest LR
       below ``min_lr``, or non-finite weights cannot be rolled back, training stops through
       ``trainer.should_stop`` (or :class:`NaNGuardHalt` is raised with ``on_halt="raise"``), with an error
       finding that gives the LR history, the LR at which NaNs began and the LR range to try. With float16
       weights and an optimizer whose ``eps`` is 0 in float16 (Adam's default 1e-8 under ``precision="16-true"``:
       ``update_ratio.eps_underflow``) the first bad step halts at once, without backoffs: the update is 0/0, and
       no learning rate fixes that; the finding gives the eps to use instead.

    **fp16 rule.** A GradScaler skips steps whose scaled gradients overflow: a run of them while it calibrates
    (every step until the first good one) and about one per ``growth_interval`` after. That is normal, so no
    finding and no backoff. NaNGuard acts only when (a) the loss itself is non-finite, (b) the scale
    collapses: after a skipped step the scale is below ``min_loss_scale`` (default 1.0: the gradients
    overflow even unscaled), or (c) skipped steps persist: ``max_scaler_skips`` consecutive skips after the
    scaler's first good step. A scaler collapse is then handled like a bad step (backoff, rollback, which
    also restores the snapshot's loss scale).

    **DDP.** The loss and parameter checks are summed across ranks in one all-reduce per step, so every rank
    takes the same decision (skip, rollback, backoff, halt) in the same order; a NaN in one rank's batch
    reaches the gradients of all ranks through DDP's all-reduce and is skipped everywhere.

    **Cost.** Per optimizer step one fused pass over the gradients (shared with GradNormMonitor; none with a
    GradScaler, whose ``found_inf`` is reused) and one device→host transfer (the flags; a step that turns out bad
    makes a second), plus one all-reduce under DDP. The pass over the parameters runs on measured and bad steps
    only (see 1.). Snapshots copy to host without a sync (pinned memory on CUDA).

    **Checkpoints.** ``on_save_checkpoint`` checks the weights being saved; non-finite weights are replaced by
    the last good snapshot (``nan_guard.checkpoint_replaced``), or saving raises :class:`NaNGuardError` when
    there is none. The LR scale, backoffs, history and counters travel in the checkpoint; the scaled LRs
    themselves are in the optimizer and scheduler states, so a resumed run keeps the reduced LR.

    **Forensics.** Every bad step is a finding with the step, LR, loss, gradient norm and the parameters
    whose gradient (or value) went non-finite: ``first_nonfinite`` in registration order and
    ``nearest_output`` (the last in registration order, usually the first to go bad in backward). With
    ``save_batch`` each rank whose loss was non-finite (every rank, for a gradient-only NaN) writes the batch
    to ``<log_dir>/lightning-debug/nan_guard_batch_step<N>_rank<R>.pt`` for replay.

    Logged scalars (every ``every_n_steps`` optimizer steps and at every action):

    ==========================  ===========================================================
    tag                         meaning
    ==========================  ===========================================================
    ``nan_guard/lr_scale``      product of all backoffs applied so far (1.0 = untouched)
    ``nan_guard/skipped_steps`` optimizer steps NaNGuard skipped (not the scaler's own skips)
    ``nan_guard/backoffs``      learning-rate backoffs so far
    ``nan_guard/rollbacks``     rollbacks to a snapshot so far
    ``nan_guard/loss_scale``    the GradScaler's scale before the step (fp16 only)
    ==========================  ===========================================================

    Findings:

    ===================================  ========  ================================================
    check                                severity  when
    ===================================  ========  ================================================
    ``nan_guard.nonfinite_loss``         warning   the loss is NaN/Inf on some rank; step skipped
    ``nan_guard.nonfinite_grad``         warning   a gradient is NaN/Inf; step skipped
    ``nan_guard.nonfinite_param``        warning   a parameter/buffer is NaN/Inf; rolled back
    ``nan_guard.loss_spike``             warning   loss > spike_factor x recent median; step skipped
    ``nan_guard.scaler_collapse``        warning   fp16 scale collapsed or skips persist
    ``nan_guard.backoff``                warning   learning rate reduced (old LR -> new LR)
    ``nan_guard.rollback``               warning   weights and optimizer state restored
    ``nan_guard.checkpoint_replaced``    warning   a checkpoint got the snapshot's weights
    ``nan_guard.checkpoint_nonfinite``   error     non-finite weights and no snapshot: save refused
    ``nan_guard.halt``                   error     training stopped; LR history and LR to try
    ``nan_guard.not_supported``          info      no optimizer could be guarded (documented no-op)
    ``nan_guard.nonfinite_buffers_by_``  info      buffers non-finite before any update (masks):
    ``design``                                     not checked
    ===================================  ========  ================================================

    Works with automatic and manual optimization and several optimizers (each optimizer step is checked;
    a backoff scales every optimizer; under manual optimization a step is judged on its optimizer's gradients and
    the losses backpropagated since the previous optimizer step). Not supported: strategies that step the
    optimizer themselves (DeepSpeed). With LBFGS every closure evaluation is checked; a bad one skips the whole
    step (LBFGS's iterations and line search of that step are undone: the gate keeps the step's starting
    parameters and state for optimizers that evaluate the closure more than once).

    Args:
        backoff_factor: multiply the learning rate by this on a backoff, in (0, 1); default 1/3 (the checklist).
        max_backoffs: backoffs allowed before halting (non-negative integer); 6 backoffs of 1/3 are 729x.
        min_lr: halt instead of backing off below this learning rate (>= 0; 0 disables the floor).
        cooldown_steps: optimizer steps after a backoff during which no further backoff happens (>= 0).
        rollback_after: roll back after bad steps on this many training batches in a row (>= 1; non-finite weights
            roll back at once). Several optimizers stepping on one bad batch count as one.
        snapshot_every_n_steps: take a snapshot after this many consecutive good steps (>= 1); ``None``
            disables snapshots and rollbacks (and saves their host memory): a checkpoint saved after the weights
            went non-finite then raises :class:`NaNGuardError`, as there is nothing finite to save instead.
        check_params: also check parameters and floating-point buffers for NaN/Inf: on bad steps, every
            ``every_n_steps`` steps, before snapshots (see "Detect").
        spike_factor: treat a loss above this multiple (> 1) of the recent median as bad; ``None`` (default) off.
        spike_window: how many recent good losses form the median (>= 5).
        min_loss_scale: fp16: a GradScaler scale below this (> 0) after a skipped step is a collapse.
        max_scaler_skips: fp16: this many consecutive scaler skips after its first good step (>= 1) is a collapse.
        on_halt: ``"stop"`` sets ``trainer.should_stop``; ``"raise"`` raises :class:`NaNGuardHalt`.
        save_batch: save the batch of a bad step to the log dir for replay.
        every_n_steps: log the scalars and check the parameters every this many optimizer steps; ``None``: every
            ``2 * Trainer(log_every_n_steps)`` steps (100 at Lightning's default). The loss and the gradients are
            checked on every step regardless.

    Raises:
        ValueError: when an argument is out of range (the message names it and the accepted values).
        NaNGuardHalt: with ``on_halt="raise"``, when training cannot be rescued.
        NaNGuardError: when a checkpoint would be saved with non-finite weights and there is no snapshot.

    Example::

        from lightning_debug.nan_guard import NaNGuard

        trainer = Trainer(callbacks=[NaNGuard()])   # or NaNGuard(spike_factor=10.0, save_batch=True)
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].summary())       # backoffs, lr_scale, skipped steps, LR history
    """

    def __init__(
        self,
        *,
        backoff_factor: float = 1 / 3,
        max_backoffs: int = 6,
        min_lr: float = 0.0,
        cooldown_steps: int = 5,
        rollback_after: int = 2,
        snapshot_every_n_steps: int | None = 100,
        check_params: bool = True,
        spike_factor: float | None = None,
        spike_window: int = 50,
        min_loss_scale: float = 1.0,
        max_scaler_skips: int = 5,
        on_halt: OnHalt = "stop",
        save_batch: bool = False,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        _validate(
            backoff_factor,
            max_backoffs,
            min_lr,
            cooldown_steps,
            rollback_after,
            snapshot_every_n_steps,
            spike_factor,
            spike_window,
            min_loss_scale,
            max_scaler_skips,
            on_halt,
        )
        self.backoff_factor = float(backoff_factor)
        self.max_backoffs = max_backoffs
        self.min_lr = float(min_lr)
        self.cooldown_steps = cooldown_steps
        self.rollback_after = rollback_after
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.check_params = check_params
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self.min_loss_scale = float(min_loss_scale)
        self.max_scaler_skips = max_scaler_skips
        self.on_halt = on_halt
        self.save_batch = save_batch
        # state that travels in the checkpoint
        self.lr_scale = 1.0
        self.backoffs = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        self.scaler_collapses = 0
        self.lr_history: list[dict[str, Any]] = []
        self.bad_steps: list[dict[str, Any]] = []
        self.first_bad: dict[str, Any] | None = None
        self._last_backoff_step: int | None = None
        self._consecutive_bad = 0
        self._last_bad_batch: int | None = None  # the training batch of the last bad step (one count per batch)
        self._scaler_consecutive_skips = 0
        self._scaler_had_good_step = False
        self._recent_losses: deque[float] = deque(maxlen=spike_window)
        # per-run state
        self._snapshot: _Snapshot | None = None
        self._clean_steps = 0
        self._stepped_good = False
        self._skip_pending: dict[int, bool | str] = {}  # True: skip; _ROLLED_BACK: skip, the state was restored
        self._gates: dict[int, tuple[torch.optim.Optimizer, Any]] = {}
        self._scaled_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # carry lr_scale
        self._restored = False  # this fit resumed a checkpoint (its optimizers carry lr_scale already)
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._batch: Any = None
        self._checked: list[tuple[str, Tensor]] = []
        self._param_names: dict[int, str] = {}
        self._param_order: dict[int, int] = {}  # id -> registration index
        self._nonfinite_buffers: set[str] = set()  # buffers non-finite at fit start: by design (masks), not checked
        self._last_loss_scale: float | None = None
        self._params_due = False  # check the parameters at the next optimizer step (a snapshot found them bad)
        self._has_scaler = False  # the run has an enabled GradScaler (read once per run: the plugin is fixed)
        self._single_process = True
        self._automatic = True
        self._optimizer_params = OptimizerParams(trainable_only=False)  # the fast path's; frozen ones may be unfrozen
        self._uniform: dict[int, bool] = {}  # per optimizer: its gradients share a device, dtype and layout (same)
        self._norms_read_after = True  # a monitor after this guard reads the step's gradient norms (on_train_start)
        self._norm_feeds: list[list[tuple[int, list[float], int]]] = []  # grad_norm_feed()'s subscribers
        self._loss_feeds: list[list[tuple[int, float]]] = []  # loss_feed()'s subscribers

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._loss_count, self._clean_steps, self._stepped_good = None, 0, 0, False
        self.halted_reason = None  # another fit on the same Trainer is guarded again (its LR keeps the backoffs)
        self._has_scaler = _grad_scaler(trainer) is not None
        self._single_process = trainer.world_size <= 1
        self._automatic = pl_module.automatic_optimization
        self._optimizer_params.clear()
        self._uniform.clear()
        from lightning_debug.grad_norm import GradNormMonitor
        from lightning_debug.update_ratio import UpdateRatioMonitor

        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        after = callbacks[callbacks.index(self) + 1 :] if self in callbacks else callbacks
        self._norms_read_after = any(isinstance(cb, (GradNormMonitor, UpdateRatioMonitor)) for cb in after)
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        self._param_order = {key: index for index, key in enumerate(self._param_names)}
        self._find_nonfinite_buffers(trainer, pl_module)
        self._refresh_checked(pl_module)
        self._carry_backoffs(trainer)
        for optimizer in trainer.optimizers:
            if optimizer.param_groups:  # (not Lightning's stand-in when configure_optimizers returns None)
                self._install_gate(optimizer)
        if not self._gates:
            self.report(
                trainer,
                "nan_guard.not_supported",
                "info",
                "NaNGuard found no optimizer to guard: bad steps are not skipped.",
                "Configure an optimizer in configure_optimizers, or remove NaNGuard from this run.",
            )
        if self.snapshot_every_n_steps is not None:
            self._snapshot = _Snapshot()
            self._take_snapshot(trainer, pl_module)

    def _carry_backoffs(self, trainer: pl.Trainer) -> None:
        """Another ``fit`` on the same Trainer builds new optimizers (and schedulers) at the configured LR: apply the
        backoffs of the earlier fits to them, so the run goes on at the LR it had reached. A resumed checkpoint's
        optimizer state already holds that LR."""
        fresh = [opt for opt in trainer.optimizers if opt not in self._scaled_optimizers]
        if self.lr_scale != 1.0 and fresh and not self._restored:
            old_lr = max_lr(trainer)
            for optimizer in fresh:
                _scale_optimizer_lrs(optimizer, self.lr_scale)
            for config in trainer.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) in fresh:
                    _scale_scheduler_lrs(config.scheduler, self.lr_scale)
            self.report(
                trainer,
                "nan_guard.backoff_carried",
                "info",
                f"This fit built new optimizers at lr {old_lr:.4g}; NaNGuard applied the {self.backoffs} backoff(s) of "
                f"the earlier fit(s) to them (x{self.lr_scale:.3g}): lr {max_lr(trainer):.4g}.",
                "Nothing to do; to start again at the configured LR, use a new NaNGuard (or a new Trainer).",
                {"lr_scale": self.lr_scale, "backoffs": self.backoffs},
            )
        self._restored = False
        self._scaled_optimizers = weakref.WeakSet(trainer.optimizers)

    def doze_hooks(self) -> tuple[str, ...]:
        # Dozing runs with one optimizer and automatic optimization, where the gate consumes every skip decision
        # within its optimizer step; the gate is (re)installed on the busy steps. The batch is kept every step when
        # it is to be saved. on_train_batch_end is busy on measured steps (the state scalars) and when a snapshot
        # may be due (the good steps are counted where they are judged).
        return () if self.save_batch else ("on_train_batch_start", "on_train_batch_end")

    def busy(self, step: int) -> bool:
        every = self.snapshot_every_n_steps
        return super().busy(step) or (every is not None and self._clean_steps + 1 >= every)

    def next_change(self, step: int) -> int | None:
        change = super().next_change(step)
        every = self.snapshot_every_n_steps
        if every is None:
            return change
        # at most one more good step per step: a snapshot is due no sooner than this
        due = step + max(1, every - 1 - self._clean_steps)
        return due if change is None else min(change, due)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._skip_pending.clear()
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._gates:
                self._install_gate(optimizer)
        self._batch = batch if self.save_batch else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_gates()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._remove_gates()
        self._norm_feeds, self._loss_feeds = [], []  # (Lightning calls no teardown after this)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_gates()
        self._norm_feeds = []
        self._loss_feeds = []
        self._snapshot = None
        self._batch = None
        self._checked = []

    def grad_norm_feed(self) -> list[tuple[int, list[float], int]]:
        """Subscribe to the gradient norms this guard brings to the host on every optimizer step (for the run).

        The returned list receives ``(global_step, values, offset)`` per checked step: ``values[offset:]`` are the
        float32 L2 norms of the stepping optimizer's gradients (GradNormMonitor takes its per-step global norm from
        them instead of reading the gradients again). Steps checked without gradient norms (a GradScaler's
        overflow check stands in for them) are not sent. The subscriber empties the list; it is dropped at teardown.
        """
        feed: list[tuple[int, list[float], int]] = []
        self._norm_feeds.append(feed)
        return feed

    def loss_feed(self) -> list[tuple[int, float]]:
        """Subscribe to the training loss this guard brings to the host on every optimizer step (for the run).

        The returned list receives ``(global_step, loss)`` per checked step that had a loss: the mean of the step's
        losses as ``training_step`` returned them, in float32 (unscaled under a GradScaler; NaN or inf when
        non-finite).
        LossCurveMonitor takes its per-step losses from it. The subscriber empties the list; it is dropped at
        teardown.
        """
        feed: list[tuple[int, float]] = []
        self._loss_feeds.append(feed)
        return feed

    def _send_loss(self, trainer: pl.Trainer, loss: float) -> None:
        entry = (self.global_step(trainer), loss)
        for feed in self._loss_feeds:
            feed.append(entry)

    def _send_norms(self, trainer: pl.Trainer, values: list[float], offset: int) -> None:
        """Hand the step's host gradient norms (``values[offset:]``) to the :meth:`grad_norm_feed` subscribers."""
        if self._norm_feeds:
            entry = (self.global_step(trainer), values, offset)
            for feed in self._norm_feeds:
                feed.append(entry)

    def _is_uniform(self, optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> bool:
        """Whether ``grads`` share one device, dtype and dense layout: checked once per measurement interval (a check
        per gradient, ~1 us each), not per step; ``_uniform`` is cleared with the parameter lists."""
        uniform = self._uniform.get(id(optimizer))
        if uniform is None:
            uniform = self._uniform[id(optimizer)] = is_uniform(grads)
        return uniform

    # ------------------------------------------------------------------ measure
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float()
        if value.ndim:
            value = value.sum()
        scale = _scaler_scale(trainer) if self._has_scaler else None
        if scale is not None:
            value = value / scale.to(value.device)  # the precision plugin hands us the scaled loss
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        with_params = self.check_params and bool(self._checked) and (self._params_due or self.is_measured_step(trainer))
        self._params_due = False
        if not with_params and self._good_step_fast(trainer, optimizer):
            return
        measured = self._measure(trainer, pl_module, optimizer, with_params)
        if self.check_params and self._checked and not with_params and (measured["loss_bad"] or measured["grad_bad"]):
            # a bad step: were the weights themselves non-finite already? (a collective when the ranks agree it is bad)
            count, first = self._check_params(trainer)
            measured["param_bad"], measured["param_first"] = count > 0, first
        self._judge(trainer, pl_module, optimizer, measured)

    def _good_step_fast(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """The usual step, handled with the least work: True when it was a good step and is done.

        One process, no GradScaler, no parameter check due, no spike detection: one stack of the loss and the
        gradient norms (shared with GradNormMonitor), the step's one transfer (on the CPU, with no reader of the
        norms after this callback: the values read one by one), and when every value is finite the good-step
        bookkeeping. Anything else (a non-finite value included) returns False for the general path,
        which then makes its own transfer: a bad step costs one more.
        """
        loss = self._loss_sum
        if loss is None or self._has_scaler or not self._single_process or self.spike_factor is not None:
            return False
        grads = [g for g in map(_grad_of, self._optimizer_params.get(optimizer)) if g is not None]
        if not grads:
            return False
        uniform = self._is_uniform(optimizer, grads)
        read_after = self._norms_read_after
        norms = shared_grad_norms(grads, uniform, share=read_after)
        if uniform and not read_after and loss.is_cpu and norms[0].is_cpu:  # (is_cpu: no device object, ~10x faster)
            # Host tensors: no transfer to batch, and reading each 0-d tensor costs half a stack and a tolist
            # (7 values ~20 vs ~40 us, 68 values ~47 vs ~87 us, with the caches cold after the backward).
            values = [loss.item(), *map(Tensor.item, norms)]
        else:
            try:
                vector = torch.stack([loss if loss.ndim == 0 else loss.reshape(()), *norms])
            except RuntimeError:  # several devices or dtypes: the general path
                return False
            values = vector.cpu().tolist()  # the step's single device->host transfer
            if norms.stacked is None and norms.source is None:
                norms.source = (vector, 1)  # GradNormMonitor reads the steps' norms from it: no stack
        if not all(map(math.isfinite, values)):
            return False  # the general path checks (and sends) the step
        self._send_norms(trainer, values, 1)
        normalised = trainer.accumulate_grad_batches if self._automatic else 1
        loss_value = values[0] * normalised / self._loss_count
        if self._loss_feeds:
            self._send_loss(trainer, loss_value)
        self._loss_sum, self._loss_count = None, 0
        if self._consecutive_bad:
            self._end_bad_run(trainer)
        self._stepped_good = True
        self._clean_steps += 1
        self._recent_losses.append(loss_value)
        return True

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        with_params: bool,
    ) -> dict[str, Any]:
        grad_params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # pl_module.device is a slow property; the module's tensors say where it lives
        device = grad_params[0].device if grad_params else pl_module.device
        loss_sum = self._loss_sum
        loss_count = self._loss_count
        self._loss_sum, self._loss_count = None, 0

        found_inf = _scaler_found_inf(trainer, optimizer) if self._has_scaler else None
        scale = _scaler_scale(trainer) if self._has_scaler else None
        # Everything is stacked into one float32 vector on the device (every value is a float32 or an exact
        # small integer) and read in the step's single transfer: [loss sum?, scaler skip?, loss scale?,
        # per-gradient norms..., per-parameter/buffer norms (with_params)...]. The counts, first/last indices and
        # the global norm are worked out on the host: per step that is one stack and one transfer (the gradients'
        # norms are GradNormMonitor's, when it ran this step).
        head: list[Tensor] = []
        if loss_sum is not None:
            head.append(loss_sum if loss_sum.ndim == 0 else loss_sum.reshape(()))
        if found_inf is not None:
            head.append(found_inf.clamp(max=1).reshape(()))
        if scale is not None:
            head.append(scale.reshape(()))
        grads: list[Tensor] = [p.grad for p in grad_params]  # type: ignore[misc]
        grad_norms = (
            shared_grad_norms(grads, self._is_uniform(optimizer, grads), share=self._norms_read_after)
            if found_inf is None
            else StepNorms()
        )
        param_norms = fused_norms([t for _, t in self._checked]) if with_params else []
        if head or param_norms:  # the loss and flags may live elsewhere or in another dtype: rare, cheap
            head = [t if t.device == device else t.to(device) for t in (*head, *param_norms)]
            head = [t if t.dtype == torch.float32 else t.float() for t in head]
        grad_count = len(grad_norms)
        world_size = trainer.world_size
        world = max(1, world_size)
        shared: Tensor | None = None
        # one stack of everything (the gradient norms are the tensors shared with GradNormMonitor: float32)
        vector = _stack_on(device, [*head, *grad_norms]) if head or grad_norms else None
        if grad_norms and grad_norms.stacked is None and grad_norms.source is None and vector is not None:
            grad_norms.source = (vector, len(head))  # GradNormMonitor reads the steps' norms from it: no stack
        # layout: [loss sum?, scaler skip?, loss scale?, per-parameter norms (with_params)..., per-gradient norms...]
        param_offset = len(head) - len(param_norms)
        grad_offset = len(head)
        if world_size > 1:  # one all-reduce for the cross-rank decision
            f64 = torch.float64
            zero = torch.zeros((), dtype=f64, device=device)
            values64 = vector.double() if vector is not None else zero.reshape(1)

            def bad_count(first: int, count: int) -> Tensor:
                if not count:
                    return zero
                return (~torch.isfinite(values64[first : first + count])).to(f64).sum()

            local_loss = values64[0] if loss_sum is not None else zero
            shared = torch.stack(
                [
                    local_loss,
                    (~torch.isfinite(local_loss)).to(f64),
                    bad_count(grad_offset, grad_count),
                    bad_count(param_offset, len(param_norms)),
                    values64[1 if loss_sum is not None else 0] if found_inf is not None else zero,
                ]
            )
            shared = reduce(trainer, shared, "sum")
            values = torch.cat([shared, values64.reshape(-1)]).cpu().tolist()  # the step's single transfer
        else:
            values = vector.cpu().tolist() if vector is not None else []  # the step's single device->host transfer
        position = 0

        def take(count: int) -> list[float]:
            nonlocal position
            position += count
            return values[position - count : position]

        reduced = take(5) if shared is not None else None
        local_loss_value = take(1)[0] if loss_sum is not None else 0.0
        local_skip = take(1)[0] if found_inf is not None else 0.0
        loss_scale = take(1)[0] if scale is not None else math.nan
        params_host = take(len(param_norms)) if param_norms else None
        grads_host = take(grad_count) if grad_count else None
        if grads_host is not None:
            self._send_norms(trainer, grads_host, 0)
        grad_bad_indices = [i for i, v in enumerate(grads_host) if not math.isfinite(v)] if grads_host else []
        param_bad_indices = [i for i, v in enumerate(params_host) if not math.isfinite(v)] if params_host else []
        local_loss_bad = not math.isfinite(local_loss_value)
        if reduced is not None:
            loss_total, loss_bad, grad_bad, param_bad, skip = reduced
        else:
            loss_total, loss_bad = local_loss_value, float(local_loss_bad)
            grad_bad, param_bad, skip = float(len(grad_bad_indices)), float(len(param_bad_indices)), local_skip
        if grads_host is not None:
            if grad_bad_indices:  # in registration order: the optimizer's groups may list them otherwise
                order = self._param_order
                rank_of = [order.get(id(grad_params[i]), len(order) + i) for i in grad_bad_indices]
                grad_first = float(grad_bad_indices[rank_of.index(min(rank_of))])
                grad_last = float(grad_bad_indices[rank_of.index(max(rank_of))])
            else:
                grad_first, grad_last = math.inf, -1.0
        else:
            grad_first = grad_last = math.nan
        if params_host is not None:
            param_first = float(param_bad_indices[0]) if param_bad_indices else math.inf
        else:
            param_first = math.nan
        # automatic optimization hands us the loss already divided by accumulate_grad_batches
        normalised = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        loss = loss_total * normalised / (loss_count * world) if loss_count else math.nan
        if self._loss_feeds and loss_count:
            self._send_loss(trainer, loss)
        return {
            "loss": loss,
            "has_loss": loss_count > 0,
            "loss_bad": loss_bad > 0,
            "grad_bad": grad_bad > 0,
            "param_bad": param_bad > 0,
            "scaler_skip": found_inf is not None and skip > 0,
            "scaler": found_inf is not None,
            "grad_norms": grads_host,  # the global norm is worked out for a finding only (_forensics)
            "grad_params": grad_params,  # named only for a finding (_forensics)
            "grad_first": grad_first,
            "grad_last": grad_last,
            "param_first": param_first,
            "loss_scale": loss_scale,
            "local_loss_bad": local_loss_bad,
        }

    # ------------------------------------------------------------------ judge and act
    def _judge(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, m: dict[str, Any]
    ) -> None:
        self._stepped_good = False
        if m["scaler"] and math.isfinite(m["loss_scale"]):
            self._last_loss_scale = m["loss_scale"]
        if m["param_bad"]:
            self._bad_step(trainer, pl_module, optimizer, "nonfinite_param", m)
            return
        if m["loss_bad"] and m["has_loss"]:
            self._bad_step(trainer, pl_module, optimizer, "nonfinite_loss", m)
            return
        if m["grad_bad"]:
            self._bad_step(trainer, pl_module, optimizer, "nonfinite_grad", m)
            return
        if m["scaler"]:
            if m["scaler_skip"]:
                self._scaler_consecutive_skips += 1
                scale_after = m["loss_scale"] * _scaler_backoff(trainer)
                persistent = self._scaler_had_good_step and self._scaler_consecutive_skips >= self.max_scaler_skips
                if scale_after < self.min_loss_scale or persistent:
                    m["scale_after"] = scale_after
                    m["persistent"] = persistent
                    self._scaler_consecutive_skips = 0
                    self._bad_step(trainer, pl_module, optimizer, "scaler_collapse", m)
                return  # the scaler skips this step itself: normal while it calibrates
            self._scaler_consecutive_skips = 0
            self._scaler_had_good_step = True
        if self._is_spike(m):
            self._bad_step(trainer, pl_module, optimizer, "loss_spike", m)
            return
        if self._consecutive_bad:
            self._end_bad_run(trainer)
        self._stepped_good = True
        self._clean_steps += 1
        if m["has_loss"] and math.isfinite(m["loss"]):
            self._recent_losses.append(m["loss"])

    def _end_bad_run(self, trainer: pl.Trainer) -> None:
        """A good step ends the run of bad training batches, unless it is on the batch of the last bad step (another
        optimizer's step on it, or another closure evaluation): that batch was bad."""
        batch = getattr(trainer.fit_loop.epoch_loop, "total_batch_idx", None)
        if batch is None or batch != self._last_bad_batch:
            self._consecutive_bad = 0

    def _is_spike(self, m: dict[str, Any]) -> bool:
        if self.spike_factor is None or not m["has_loss"] or len(self._recent_losses) < max(5, self.spike_window // 5):
            return False
        reference = statistics.median(self._recent_losses)
        m["loss_reference"] = reference
        return reference > 0 and m["loss"] > self.spike_factor * reference

    def _bad_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        kind: str,
        m: dict[str, Any],
    ) -> None:
        step = int(trainer.global_step)
        lr = max_lr(trainer)
        batch = getattr(trainer.fit_loop.epoch_loop, "total_batch_idx", None)
        if batch is None or batch != self._last_bad_batch:  # several optimizers' bad steps on one batch count once
            self._consecutive_bad += 1
        self._last_bad_batch = batch
        self._clean_steps = 0
        self.skipped_steps += 1
        if not m["scaler_skip"]:  # the GradScaler skips its own overflow steps: don't act twice
            self._skip_pending[id(optimizer)] = True
        if kind == "scaler_collapse":
            self.scaler_collapses += 1
        if not m["grad_norms"] and m["grad_params"]:  # a scaler's step: the norms were not needed to decide
            m["grad_norms"] = _unscaled_norms(optimizer, m)
        data = self._forensics(trainer, kind, m, step, lr)
        self.bad_steps.append({"step": step, "kind": kind, "lr": lr})
        if self.first_bad is None:
            self.first_bad = dict(data)
        self.report(trainer, f"nan_guard.{kind}", "warning", self._bad_message(kind, data), self._bad_hint(kind), data)

        if m["param_bad"] or self._consecutive_bad >= self.rollback_after:
            rolled_back = self._rollback(trainer, pl_module, kind)
            if rolled_back and id(optimizer) in self._skip_pending:
                self._skip_pending[id(optimizer)] = _ROLLED_BACK  # the gate must not undo the restored state
            if not rolled_back and m["param_bad"]:
                self._halt(trainer, "the weights are non-finite and there is no snapshot to roll back to")
                return
        self._maybe_backoff(trainer, kind, step)
        self._log_state(trainer)

    def _forensics(self, trainer: pl.Trainer, kind: str, m: dict[str, Any], step: int, lr: float) -> dict[str, Any]:
        grad_norms = m["grad_norms"]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.tensor(grad_norms, dtype=torch.float64))) if grad_norms else math.nan
        )
        data: dict[str, Any] = {"step": step, "lr": lr, "loss": m["loss"], "grad_norm": grad_norm}
        names = [self._param_names.get(id(p), "?") for p in m["grad_params"]]
        if m["grad_bad"] and names:
            data["first_nonfinite"] = _name_at(names, m["grad_first"])
            data["nearest_output"] = _name_at(names, m["grad_last"])
        if m["param_bad"]:
            data["nonfinite_param"] = _name_at([name for name, _ in self._checked], m["param_first"])
        if m["scaler"]:
            data["loss_scale"] = m["loss_scale"]
            if "scale_after" in m:
                data["scale_after"] = m["scale_after"]
                data["persistent_skips"] = m["persistent"]
        if "loss_reference" in m:
            data["loss_reference"] = m["loss_reference"]
        if self.save_batch and self._batch is not None and self.output_dir is not None:
            if m["local_loss_bad"] or not m["loss_bad"]:
                path = self.output_dir / f"nan_guard_batch_step{step}_rank{trainer.global_rank}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(_to_cpu(self._batch), path)
                data["batch_file"] = str(path)
        return data

    @staticmethod
    def _bad_message(kind: str, data: dict[str, Any]) -> str:
        where = f"step {data['step']} (lr {data['lr']:.4g}, loss {data['loss']:.4g}, grad norm {data['grad_norm']:.4g})"
        if kind == "nonfinite_loss":
            return f"The loss is non-finite at {where}; the step was skipped."
        if kind == "nonfinite_grad":
            return (
                f"Gradients are non-finite at {where}, first in `{data.get('nearest_output')}` in backward order "
                f"(`{data.get('first_nonfinite')}` first in registration order); the step was skipped."
            )
        if kind == "nonfinite_param":
            return f"Parameter/buffer `{data.get('nonfinite_param')}` is non-finite before {where}."
        if kind == "loss_spike":
            reference = data.get("loss_reference", math.nan)
            return (
                f"The loss spiked at {where}: above the spike factor x its recent median {reference:.4g}; step skipped."
            )
        persistent = "skipped steps persist" if data.get("persistent_skips") else "its scale collapsed"
        return (
            f"The fp16 GradScaler skipped step {data['step']} and {persistent}: "
            f"scale {data.get('loss_scale', math.nan):.4g} "
            f"-> {data.get('scale_after', math.nan):.4g} (lr {data['lr']:.4g})."
        )

    @staticmethod
    def _bad_hint(kind: str) -> str:
        if kind in ("nonfinite_loss", "nonfinite_grad", "loss_spike", "scaler_collapse"):
            return (
                "NaNs in the first ~100 steps mean the learning rate is too high: reduce it 3x until they stop "
                "(NaNGuard backs it off for you); later NaNs: clip gradients (RNNs), check custom layers for "
                "division by zero or log(0), and use a stable softmax/cross_entropy."
            )
        return "The previous update overflowed: lower the learning rate, or clip gradients (gradient_clip_val=1.0)."

    def _maybe_backoff(self, trainer: pl.Trainer, reason: str, step: int) -> None:
        if self.halted_reason is not None:
            return
        eps_problems = float16_eps_problems(trainer.optimizers)
        if eps_problems:  # 0/0 in the optimizer's float16 update: a smaller learning rate scales a NaN
            self._halt(
                trainer,
                f"{float16_eps_text(eps_problems)} makes the float16 updates NaN, which no learning-rate backoff can "
                "fix",
            )
            return
        if self._last_backoff_step is not None and step - self._last_backoff_step < self.cooldown_steps:
            return
        old_lr = max_lr(trainer)
        new_lr = old_lr * self.backoff_factor
        if self.backoffs >= self.max_backoffs:
            self._halt(
                trainer,
                f"bad steps persist after {self.backoffs} learning-rate backoffs (max_backoffs={self.max_backoffs})",
            )
            return
        if new_lr < self.min_lr:
            self._halt(
                trainer, f"another backoff would bring the learning rate to {new_lr:.3g}, below min_lr={self.min_lr:g}"
            )
            return
        for optimizer in trainer.optimizers:
            _scale_optimizer_lrs(optimizer, self.backoff_factor)
        for config in trainer.lr_scheduler_configs:
            _scale_scheduler_lrs(config.scheduler, self.backoff_factor)
        self.lr_scale *= self.backoff_factor
        self.backoffs += 1
        self._last_backoff_step = step
        entry = {"step": step, "old_lr": old_lr, "new_lr": new_lr, "reason": reason, "lr_scale": self.lr_scale}
        self.lr_history.append(entry)
        self.report(
            trainer,
            "nan_guard.backoff",
            "warning",
            f"Learning rate backed off {old_lr:.4g} -> {new_lr:.4g} (x{self.backoff_factor:.3g}, backoff "
            f"{self.backoffs}/{self.max_backoffs}) after a {reason.replace('_', ' ')} at step {step}.",
            f"Start the next run at lr <= {new_lr:.3g}; the best learning rates sit 1-10x below where NaNs begin.",
            entry,
        )

    def _halt(self, trainer: pl.Trainer, reason: str) -> None:
        if self.halted_reason is not None:
            return
        self.halted_reason = f"NaNGuard: {reason}"
        trainer.should_stop = True
        bad_lrs = [b["lr"] for b in self.bad_steps if math.isfinite(b["lr"])]
        first_bad_lr = bad_lrs[0] if bad_lrs else math.nan
        lowest_bad_lr = min(bad_lrs) if bad_lrs else math.nan
        data = {
            "reason": reason,
            "lr_history": self.lr_history,
            "first_bad_lr": first_bad_lr,
            "lowest_bad_lr": lowest_bad_lr,
            "try_lr_max": lowest_bad_lr / 3,
            "try_lr_min": lowest_bad_lr / 10,
            "backoffs": self.backoffs,
            "lr_scale": self.lr_scale,
            "skipped_steps": self.skipped_steps,
            "first_bad": self.first_bad,
        }
        history = ", ".join(f"{h['old_lr']:.3g}->{h['new_lr']:.3g} @{h['step']}" for h in self.lr_history) or "none"
        hint = (
            f"Restart with lr between {lowest_bad_lr / 10:.3g} and {lowest_bad_lr / 3:.3g} (3-10x below the lowest LR "
            f"that still gave NaNs, {lowest_bad_lr:.3g})."
        )
        eps_problems = float16_eps_problems(trainer.optimizers)
        if eps_problems:  # the LR is not the cause: a learning-rate range would send the user the wrong way
            data["float16_eps"] = eps_problems
            hint = (
                f"The learning rate is not the cause: {float16_eps_text(eps_problems)} makes float16 updates NaN "
                "(update_ratio.eps_underflow). Train with precision='16-mixed' or 'bf16-mixed', or set eps=1e-4."
            )
        elif self.lr_scale <= 0.01:
            hint += (
                f" NaNs persisted over a {1 / self.lr_scale:.0f}x LR reduction, so the LR is likely not the cause: "
                "check "
                "the inputs for NaN/Inf, custom layers for division by zero or log(0), use a stable softmax, and clip "
                "gradients (RNNs)."
            )
        self.report(
            trainer,
            "nan_guard.halt",
            "error",
            f"Training halted at step {trainer.global_step}: {reason}. NaNs began at lr {first_bad_lr:.4g}; "
            f"LR history: {history}.",
            hint,
            data,
        )
        self._log_state(trainer)
        if self.on_halt == "raise":
            raise NaNGuardHalt(self.halted_reason)

    # ------------------------------------------------------------------ rollback
    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._snapshot is None:
            return
        if self.check_params and self._checked and self._check_params(trainer)[0] > 0:
            self._params_due = True  # never snapshot non-finite weights; the next step names them and rolls back
            return
        self._snapshot.capture(int(trainer.global_step), pl_module, trainer.optimizers, _grad_scaler(trainer))
        self._clean_steps = 0

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> bool:
        snapshot = self._snapshot
        if snapshot is None or snapshot.step is None:
            return False
        snapshot.restore(pl_module, trainer.optimizers, _grad_scaler(trainer))
        self._find_nonfinite_buffers(trainer, pl_module, fresh=False)
        self._refresh_checked(pl_module)
        self.rollbacks += 1
        self._consecutive_bad = 0
        self._recent_losses.clear()
        self.report(
            trainer,
            "nan_guard.rollback",
            "warning",
            f"Weights and optimizer state rolled back from step {trainer.global_step} to the snapshot of step "
            f"{snapshot.step} after a {reason.replace('_', ' ')} (rollback {self.rollbacks}).",
            "Lower the learning rate (or add warm-up / gradient clipping) so the run stops diverging.",
            {"from_step": int(trainer.global_step), "to_step": snapshot.step, "reason": reason},
        )
        return True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None
        if self._stepped_good:
            self._stepped_good = False
            if self.snapshot_every_n_steps is not None and self._clean_steps >= self.snapshot_every_n_steps:
                self._take_snapshot(trainer, pl_module)
        if self.is_measured_step(trainer):
            self._log_state(trainer)
            self._optimizer_params.clear()
            self._uniform.clear()

    def _log_state(self, trainer: pl.Trainer) -> None:
        scalars = {
            "nan_guard/lr_scale": self.lr_scale,
            "nan_guard/skipped_steps": float(self.skipped_steps),
            "nan_guard/backoffs": float(self.backoffs),
            "nan_guard/rollbacks": float(self.rollbacks),
        }
        if self._last_loss_scale is not None:
            scalars["nan_guard/loss_scale"] = self._last_loss_scale
        self.log_scalars(trainer, scalars)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict") or {}
        skip = self._nonfinite_buffers
        named = [
            (k, v)
            for k, v in state.items()
            if isinstance(v, Tensor) and v.is_floating_point() and v.numel() and k not in skip
        ]
        if not named:
            return
        bad_count, first, _, _ = _nonfinite_summary([v for _, v in named], named[0][1].device)
        count, first_index = to_host([bad_count, first])
        if trainer.world_size > 1:
            # Rank 0's state is the one written; the others' buffers may differ (BatchNorm statistics are synced at
            # the next forward): every rank takes rank 0's decision, so none raises while another waits to save.
            count, first_index = trainer.strategy.broadcast((count, first_index), src=0)
        if count == 0:
            return
        name = _name_at([k for k, _ in named], first_index)
        snapshot = self._snapshot
        if snapshot is None or snapshot.step is None:
            self.report(
                trainer,
                "nan_guard.checkpoint_nonfinite",
                "error",
                f"Refused to save a checkpoint at step {trainer.global_step}: {int(count)} weight tensors are "
                f"non-finite (first `{name}`) and there is no good snapshot.",
                "Keep NaNGuard's snapshots on (snapshot_every_n_steps) and check_params=True; lower the learning rate.",
                {"nonfinite_tensors": int(count), "first": name},
            )
            raise NaNGuardError(
                f"NaNGuard: refusing to save non-finite weights (`{name}`) at step {trainer.global_step}"
            )
        snapshot.wait()
        checkpoint["state_dict"] = {
            k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in snapshot.model.items()
        }
        if "optimizer_states" in checkpoint and len(checkpoint["optimizer_states"]) == len(snapshot.optimizers):
            for opt_state, saved in zip(checkpoint["optimizer_states"], snapshot.optimizers):
                opt_state["state"] = copy.deepcopy(saved)
        self.report(
            trainer,
            "nan_guard.checkpoint_replaced",
            "warning",
            f"The checkpoint at step {trainer.global_step} got the weights of the good snapshot of step "
            f"{snapshot.step}: "
            f"{int(count)} weight tensors were non-finite (first `{name}`).",
            "Lower the learning rate; resume from this checkpoint, not from an older NaN one.",
            {"nonfinite_tensors": int(count), "first": name, "snapshot_step": snapshot.step},
        )

    # ------------------------------------------------------------------ report / resume
    def _record(self) -> dict[str, Any]:
        """What NaNGuard did: in the report and in the checkpoint alike."""
        return {
            "lr_scale": self.lr_scale,
            "backoffs": self.backoffs,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "scaler_collapses": self.scaler_collapses,
            "lr_history": list(self.lr_history),
            "first_bad": self.first_bad,
            "halted_reason": self.halted_reason,  # for the record: a resumed run starts un-halted
        }

    def summary(self) -> dict[str, Any]:
        return {**self._record(), "snapshot_bytes": self._snapshot.nbytes() if self._snapshot is not None else 0}

    def extra_state(self) -> dict[str, Any]:
        return {
            **self._record(),
            "bad_steps": list(self.bad_steps),
            "last_backoff_step": self._last_backoff_step,
            "consecutive_bad": self._consecutive_bad,
            "scaler_consecutive_skips": self._scaler_consecutive_skips,
            "scaler_had_good_step": self._scaler_had_good_step,
            "recent_losses": list(self._recent_losses),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._restored = True  # the optimizers' state (and LR) comes from the same checkpoint
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.backoffs = int(state.get("backoffs", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.scaler_collapses = int(state.get("scaler_collapses", 0))
        self.lr_history = list(state.get("lr_history", []))
        self.bad_steps = list(state.get("bad_steps", []))
        self.first_bad = state.get("first_bad")
        self._last_backoff_step = state.get("last_backoff_step")
        self._consecutive_bad = int(state.get("consecutive_bad", 0))
        self._scaler_consecutive_skips = int(state.get("scaler_consecutive_skips", 0))
        self._scaler_had_good_step = bool(state.get("scaler_had_good_step", False))
        self._recent_losses = deque(state.get("recent_losses", []), maxlen=self.spike_window)

    # ------------------------------------------------------------------ helpers
    def _check_params(self, trainer: pl.Trainer) -> tuple[float, float]:
        """(non-finite parameters/buffers summed over ranks, index of this rank's first); a collective under DDP."""
        tensors = [t for _, t in self._checked]
        count, first, _, _ = _nonfinite_summary(tensors, tensors[0].device)
        total, first_index = to_host([reduce(trainer, count, "sum"), first])
        return total, first_index

    def _refresh_checked(self, pl_module: pl.LightningModule) -> None:
        skip = self._nonfinite_buffers
        buffers = [(name, t) for name, t in pl_module.named_buffers() if name not in skip]
        named = [*pl_module.named_parameters(), *buffers]
        self._checked = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]

    def _find_nonfinite_buffers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fresh: bool = True) -> None:
        """Buffers that hold NaN/Inf when training starts hold them by design (an attention mask of -inf above
        the diagonal, a -inf padding bias): no update wrote them, so they are left out of the parameter and
        checkpoint checks (one read of the floating-point buffers per fit; an info finding names them). After a
        rollback (``fresh=False``) only buffers registered since the start (a mask built in the first forward) are
        read, and a non-finite one is added to them."""
        named = [(name, t) for name, t in pl_module.named_buffers() if t.is_floating_point() and t.numel()]
        if fresh:
            self._nonfinite_buffers = set()
            skip = set()
        else:  # only buffers registered since (the ones checked so far were finite in the snapshot, or diverged)
            skip = self._nonfinite_buffers | {name for name, _ in self._checked}
        named = [(name, t) for name, t in named if name not in skip]
        if not named:
            return
        device = named[0][1].device
        flags = torch.stack([(~torch.isfinite(t)).any().to(device) for _, t in named]).cpu().tolist()
        found = [name for (name, _), bad in zip(named, flags) if bad]
        if not found:
            return
        self._nonfinite_buffers.update(found)
        if not fresh:
            return
        self.report(
            trainer,
            "nan_guard.nonfinite_buffers_by_design",
            "info",
            f"{len(found)} buffer(s) hold NaN/Inf before any update ({', '.join(f'`{n}`' for n in found[:5])}"
            f"{', ...' if len(found) > 5 else ''}): taken as values by design (e.g. an attention mask of -inf), so "
            "NaNGuard does not check them.",
            "Nothing to do for a mask. If such a buffer should be finite, fix how it is built (NaNGuard cannot roll "
            "back a buffer that was never finite).",
            {"buffers": found},
        )

    def _install_gate(self, optimizer: torch.optim.Optimizer) -> None:
        """Put a gate in front of ``optimizer.step`` (an instance attribute, removed when training ends)."""
        key = id(optimizer)
        previous = optimizer.__dict__.get("step", _MISSING)
        inner = optimizer.step
        gate = _make_gate(self._skip_pending, key, inner)
        if hasattr(inner, "_wrapped_by_lr_sched"):
            gate._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # keeps LR schedulers from re-wrapping
        optimizer.step = types.MethodType(gate, optimizer)  # type: ignore[method-assign]
        self._gates[key] = (optimizer, previous)

    def _remove_gates(self) -> None:
        for optimizer, previous in self._gates.values():
            if previous is _MISSING:
                optimizer.__dict__.pop("step", None)
            else:
                optimizer.step = previous  # type: ignore[method-assign]
        self._gates.clear()
        self._skip_pending.clear()


_MISSING = object()
_ROLLED_BACK = "rolled back"  # a skip decision after which the gate keeps the state NaNGuard restored


def _make_gate(skip_pending: dict[int, bool | str], key: int, inner: Callable[..., Any]) -> Callable[..., Any]:
    # Optimizers that evaluate the closure more than once per step (LBFGS's iterations and line search) have moved
    # the parameters and their own state by the second evaluation: for them the gate keeps the step's starting point
    # (taken at the first evaluation, before the optimizer reads anything) and puts it back when it skips later on.
    repeats = [False]

    def gated_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        closure = args[0] if args else kwargs.get("closure")
        if closure is None:  # AMP: the precision plugin ran the closure and NaNGuard already decided
            if skip_pending.pop(key, False):
                return None
            return inner(*args, **kwargs)
        calls = [0]
        start: list[Any] = []

        def guarded_closure(*c_args: Any, **c_kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1 and (repeats[0] or isinstance(optimizer, torch.optim.LBFGS)):
                start.append(_step_start(optimizer))
            elif calls[0] == 2:
                repeats[0] = True
            result = closure(*c_args, **c_kwargs)
            decision = skip_pending.pop(key, False)
            if decision:
                if calls[0] > 1 and start and decision is not _ROLLED_BACK:
                    _restore_step_start(optimizer, start[0])
                raise _SkipStep(result)  # every hook has run; the optimizer has not read anything yet
            return result

        if args:
            args = (guarded_closure, *args[1:])
        else:
            kwargs["closure"] = guarded_closure
        try:
            return inner(*args, **kwargs)
        except _SkipStep as skip:
            return skip.result

    return gated_step


def _step_start(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], dict[Any, Any]]:
    """The parameters and the optimizer's per-parameter state as a step finds them (copies; the param groups'
    hyperparameters are left alone: a backoff during the step must stay)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        values = [p.detach().clone() for p in params]
    return values, {param: copy.deepcopy(state) for param, state in optimizer.state.items()}


def _restore_step_start(optimizer: torch.optim.Optimizer, start: tuple[list[Tensor], dict[Any, Any]]) -> None:
    values, state = start
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value)
    optimizer.state.clear()
    optimizer.state.update(state)


class _Snapshot:
    """One host copy of the model's ``state_dict``, the optimizers' state and the loss scale; buffers are reused."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.model: dict[str, Any] = {}
        self.optimizers: list[dict[Any, Any]] = []
        self.scaler: dict[str, Tensor] = {}
        self._event: Any = None

    def capture(
        self, step: int, pl_module: pl.LightningModule, optimizers: Sequence[torch.optim.Optimizer], scaler: Any
    ) -> None:
        cuda = False
        model: dict[str, Any] = {}
        for name, value in pl_module.state_dict().items():
            if isinstance(value, Tensor):
                model[name] = _host_copy(value, self.model.get(name))
                cuda = cuda or value.is_cuda
            else:  # a module's get_extra_state(): any picklable object
                model[name] = copy.deepcopy(value)
        self.model = model
        states: list[dict[Any, Any]] = []
        for index, optimizer in enumerate(optimizers):
            old = self.optimizers[index] if index < len(self.optimizers) else {}
            state: dict[Any, Any] = {}
            # (Lightning's stand-in when configure_optimizers returns None has an empty state_dict)
            for param_id, param_state in optimizer.state_dict().get("state", {}).items():
                old_param = old.get(param_id, {})
                state[param_id] = {
                    k: _host_copy(v, old_param.get(k)) if isinstance(v, Tensor) else copy.deepcopy(v)
                    for k, v in param_state.items()
                }
                cuda = cuda or any(isinstance(v, Tensor) and v.is_cuda for v in param_state.values())
            states.append(state)
        self.optimizers = states
        self.scaler = {}
        for attr in ("_scale", "_growth_tracker"):
            value = getattr(scaler, attr, None) if scaler is not None else None
            if isinstance(value, Tensor):
                self.scaler[attr] = _host_copy(value, None)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self.step = step

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def restore(self, pl_module: pl.LightningModule, optimizers: Sequence[torch.optim.Optimizer], scaler: Any) -> None:
        self.wait()
        with torch.no_grad():
            for name, tensor in pl_module.state_dict().items():
                if isinstance(tensor, Tensor) and isinstance(self.model.get(name), Tensor):
                    tensor.copy_(self.model[name])
        for optimizer, saved in zip(optimizers, self.optimizers):
            current = optimizer.state_dict()  # keeps the current param groups: the backed-off LRs stay
            if "state" not in current:
                continue  # no real optimizer (configure_optimizers returned None)
            current["state"] = copy.deepcopy(saved)
            optimizer.load_state_dict(current)
        for attr, saved_value in self.scaler.items():
            value = getattr(scaler, attr, None)
            if isinstance(value, Tensor):
                value.copy_(saved_value)

    def nbytes(self) -> int:
        tensors = [v for v in self.model.values() if isinstance(v, Tensor)] + [
            v
            for state in self.optimizers
            for param_state in state.values()
            for v in param_state.values()
            if isinstance(v, Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


def _host_copy(tensor: Tensor, buffer: Tensor | None) -> Tensor:
    source = tensor.detach()
    if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
        buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
    buffer.copy_(source, non_blocking=source.is_cuda)
    return buffer


def _nonfinite_summary(tensors: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(count of non-finite tensors, index of the first, index of the last, global L2 norm) on ``device``."""
    norms = torch.stack([n.to(device, torch.float64) for n in foreach_norms(tensors)])
    bad = ~torch.isfinite(norms)
    index = torch.arange(len(norms), device=device, dtype=torch.float64)
    count = bad.to(torch.float64).sum()
    first = torch.where(bad, index, torch.full_like(index, math.inf)).min()
    last = torch.where(bad, index, torch.full_like(index, -1.0)).max()
    return count, first, last, torch.linalg.vector_norm(norms)


_grad_of = operator.attrgetter("grad")


def _stack_on(device: torch.device, values: list[Tensor]) -> Tensor:
    """Stack 0-d tensors; the ones on another device (a model spread over several) are moved first."""
    try:
        return torch.stack(values)
    except RuntimeError:
        return torch.stack([v.to(device) for v in values])


def _name_at(names: Sequence[str], index: float) -> str | None:
    if not math.isfinite(index) or index < 0 or int(index) >= len(names):
        return None
    return names[int(index)]


def _grad_scaler(trainer: pl.Trainer) -> Any:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    return scaler


def _scaler_scale(trainer: pl.Trainer) -> Tensor | None:
    scale = getattr(_grad_scaler(trainer), "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def _scaler_backoff(trainer: pl.Trainer) -> float:
    return float(getattr(_grad_scaler(trainer), "_backoff_factor", 0.5))


def _unscaled_norms(optimizer: torch.optim.Optimizer, m: dict[str, Any]) -> list[float]:
    """The gradients' norms for a finding, on a bad step of a GradScaler run (where the decision did not need them);
    divided by the loss scale for an optimizer that unscales inside its own ``step``."""
    norms = to_host(foreach_norms([p.grad for p in m["grad_params"]]))
    scale = m.get("loss_scale", math.nan)
    if _optimizer_handles_unscaling(optimizer) and math.isfinite(scale) and scale > 0:
        norms = [n / scale for n in norms]
    return norms


def _scaler_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The GradScaler's ``found_inf`` for this optimizer once it unscaled the gradients, else None.

    Optimizers that unscale inside their own ``step`` (``fused=True``) are not unscaled before this hook: their
    gradients are still scaled, and an overflow is the scaler's to skip. The scaler's own check (a multiplication by
    1.0 in place, which leaves every value as it is) gives their ``found_inf`` now; ``scaler.step`` repeats it.
    """
    scaler = _grad_scaler(trainer)
    if scaler is None:
        return None
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    if (not state or not state.get("found_inf_per_device")) and _optimizer_handles_unscaling(optimizer):
        with contextlib.suppress(Exception):  # a private API: without it, the gradients are judged as they are
            scaler._check_inf_per_device(optimizer)
            state = scaler._per_optimizer_states.get(id(optimizer))
    if not state or not state.get("found_inf_per_device"):
        return None
    found = list(state["found_inf_per_device"].values())
    total = found[0].double()
    for value in found[1:]:
        total = total + value.to(total.device, torch.float64)
    return total


def _scale_value(value: Any, factor: float) -> Any:
    if isinstance(value, Tensor):
        return value.mul_(factor)  # in place: capturable optimizers and compiled steps hold this tensor
    if isinstance(value, (list, tuple)):
        return type(value)(_scale_value(v, factor) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def _scale_optimizer_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        for key in _GROUP_LR_KEYS:
            if key in group:
                group[key] = _scale_value(group[key], factor)


def _scale_scheduler_lrs(scheduler: Any, factor: float) -> None:
    """Scale what a scheduler computes the LR from, so the backoff survives its next step; recurses into chains."""
    for attr in _SCHEDULER_LR_ATTRIBUTES:
        if hasattr(scheduler, attr):
            setattr(scheduler, attr, _scale_value(getattr(scheduler, attr), factor))
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list):
        scheduler._last_lr = _scale_value(last, factor)
    for child in getattr(scheduler, "_schedulers", []) or []:
        _scale_scheduler_lrs(child, factor)


def _to_cpu(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().cpu()
    if isinstance(batch, dict):
        return {k: _to_cpu(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return (
            type(batch)(_to_cpu(v) for v in batch)
            if not hasattr(batch, "_fields")
            else type(batch)(*(_to_cpu(v) for v in batch))
        )
    return batch


def _validate(
    backoff_factor: float,
    max_backoffs: int,
    min_lr: float,
    cooldown_steps: int,
    rollback_after: int,
    snapshot_every_n_steps: int | None,
    spike_factor: float | None,
    spike_window: int,
    min_loss_scale: float,
    max_scaler_skips: int,
    on_halt: str,
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not is_number(backoff_factor) or not 0 < backoff_factor < 1:
        raise ValueError(f"`backoff_factor` must be a number in (0, 1), e.g. 1/3, got {backoff_factor!r}")
    if not is_int(max_backoffs) or max_backoffs < 0:
        raise ValueError(f"`max_backoffs` must be a non-negative integer, got {max_backoffs!r}")
    if not is_number(min_lr) or min_lr < 0:
        raise ValueError(f"`min_lr` must be a finite number >= 0, got {min_lr!r}")
    if not is_int(cooldown_steps) or cooldown_steps < 0:
        raise ValueError(f"`cooldown_steps` must be a non-negative integer, got {cooldown_steps!r}")
    if not is_int(rollback_after) or rollback_after < 1:
        raise ValueError(f"`rollback_after` must be a positive integer, got {rollback_after!r}")
    if snapshot_every_n_steps is not None and (not is_int(snapshot_every_n_steps) or snapshot_every_n_steps < 1):
        raise ValueError(f"`snapshot_every_n_steps` must be a positive integer or None, got {snapshot_every_n_steps!r}")
    if spike_factor is not None and (not is_number(spike_factor) or spike_factor <= 1):
        raise ValueError(f"`spike_factor` must be a number > 1 or None, got {spike_factor!r}")
    if not is_int(spike_window) or spike_window < 5:
        raise ValueError(f"`spike_window` must be an integer >= 5, got {spike_window!r}")
    if not is_number(min_loss_scale) or min_loss_scale <= 0:
        raise ValueError(f"`min_loss_scale` must be a number > 0, got {min_loss_scale!r}")
    if not is_int(max_scaler_skips) or max_scaler_skips < 1:
        raise ValueError(f"`max_scaler_skips` must be a positive integer, got {max_scaler_skips!r}")
    if on_halt not in ON_HALT:
        raise ValueError(f"`on_halt` must be one of {ON_HALT}, got {on_halt!r}")
