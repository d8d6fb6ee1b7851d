"""LossCurveMonitor: read the shape of the loss curves the way a practitioner does, and say what it means."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import Tensor

from lightning_debug.base import DiagnosticCallback, trained_at_start
from lightning_debug.distributed import all_ranks, reduce
from lightning_debug.optimizers import max_lr
from lightning_debug.stats import to_host
from lightning_debug.validation import check_float, check_int


class LossCurveMonitor(DiagnosticCallback):
    r"""Checklist items "verify decreasing training loss", "hockey stick", "overfitting" and "regularisation loss".

    It reads the loss ``training_step`` returns (``on_train_batch_end``'s ``outputs``: a tensor or a dict with a
    ``"loss"`` key): per step it only keeps a float64 copy of it on the device (one kernel, no host sync); on
    measured steps the kept losses are summed (non-finite ones left out) and the window's mean goes to the host
    in one transfer (reduced across ranks under DDP). With NaNGuard in the run (one process, one optimizer, automatic
    optimization, no gradient accumulation, not 64-bit precision) it takes the losses NaNGuard brings to the host on
    every step instead (``NaNGuard.loss_feed``: the same float32 values; under a GradScaler whose scale is not a power
    of two, within its rounding), and its hook runs only around measured steps. The validation metric
    ``val_metric`` is read from ``trainer.callback_metrics`` at the end of each validation, next to the mean
    training loss since the previous validation. Judged:

    - **not decreasing**: after ``window`` measurements, the mean of the latest ``window // 2`` is not below the
      mean of the first ``window // 2`` of the run by at least ``min_decrease`` (relative). Judged against the
      start of the run, so a loss that converged and flattened is not flagged. When InitLossCallback found the
      weights trained at the start (fine-tuning), a flat loss is an info: it may start near its floor.
    - **hockey stick**: the losses of the first ``5 * hockey_steps`` steps are kept on the device and moved once.
      At least half the starting loss gone after ``hockey_steps`` steps, falling at least 10x faster per step
      than over the next ``4 * hockey_steps``, and not simply solved (still above 1% of the start): the first
      steps only learned the output bias (init the final bias at the log class priors / the target mean).
      Measured on digits: healthy MLP/CNN/RNN runs lose 5-25% in 10 steps (speedup 0.3-1.6); 1:20 imbalanced
      labels with a default init lose 61% (speedup ~30). With an InitLossCallback in the run, a fast start that
      ends below half the best constant predictor's loss learned features, not the bias, and is no hockey stick
      (He-initialised MLPs on digits: 2.4 to 0.64 in 10 steps against a constant predictor's 2.27, speedup 12-14).
      Its reference also rules out the bias when there is none to learn (the best constant within InitLossCallback's
      ``rtol`` of the uniform prediction: balanced classes) and when the start was a too-large init being undone
      (``init_loss.too_high`` names that). A loss that first rose to over twice its first value, or a start with
      steps NaNGuard skipped, is a divergence caught, not a start: not judged.
    - **overfitting**: the validation loss averaged over the last ``patience`` epochs (the validations of an
      epoch averaged into one) above its lowest such average by more than ``min_decrease`` (relative) and by more
      than 3 standard errors of its epoch-to-epoch noise, while the training loss kept falling (its average over
      the same windows lower, and the latest point below the best validation's: the gap grew; and the validation
      loss above the training loss over the latest window: a gap at all) and
      the learning rate was not above its value at the best validation: a rising LR (a warm-up, a one-cycle or
      cyclic schedule) raises the validation loss by itself (measured on digits, SGD under OneCycleLR to max_lr
      0.2: 0.29 -> 1.10 while the LR rose 4x, back to 95% accuracy by the end). Validating every 10 steps on one
      batch, a healthy run's validation loss wobbled ~10% between validations while it fell 0.37 -> 0.054. It takes
      ``2 * patience`` epochs with a validation to judge; a run of one long epoch (each example seen once, e.g.
      ``max_steps`` within the first epoch) is not judged for overfitting. With an InitLossCallback in the run,
      a validation loss that never went below the best constant predictor's is no overfitting (there is no best
      step to stop at): ``loss_curve.no_generalisation`` when the training loss fell below it (memorised: labels
      misaligned with the inputs, validation preprocessed otherwise), else nothing.
    - **regularisation dominating**: when both ``reg_metric`` and ``data_metric`` are logged (``self.log``), their
      ratio above ``reg_ratio`` for ``patience`` measurements in a row.
    - **overfit one batch** (the checklist's test, run with ``Trainer(overfit_batches=1)``): when such a run ends,
      the training loss at its end (the mean of its last 10 steps, or the logged ``data_metric``: the task loss
      without a regularisation term) against its start (the mean of its first two steps), averaged over the ranks.
      Fitted (info) when it fell to 1% of the start; failed (warning) when it did not get 10% below the best
      constant prediction's loss on the memorised batches themselves (their label frequencies, positive rate or
      target variance: what a model that ignores its inputs reaches; needs an InitLossCallback in the run for the
      task), or, without one, stayed above half its start; in between an info (a loss with a floor above 0: label
      smoothing, a regularisation term). Batches whose targets are all alike (a constant prediction scores below
      1% of the start) prove nothing: an info. Runs under 100 steps get an info that they are too short to tell.
      Overfitting is not judged in such a run (it is the point). Measured on digits, one batch of 32, 300 steps:
      Adam 1e-3 went from 2.28 to 0.0015, SGD 0.05 to 0.00035; zeroed inputs ended at 2.13, exactly the batch's
      own constant prediction; label smoothing 0.1 ended at ~0.5.

    Under gradient accumulation Lightning hands ``on_train_batch_end`` the loss divided by
    ``accumulate_grad_batches``; the monitor multiplies it back (one kernel per step in such runs).

    Everything is conservative (relative thresholds, several measurements); a run too short to judge raises
    nothing. Training is not touched. The curves and verdicts survive checkpoint and resume. A ``training_step``
    that returns no loss (manual optimization returning None) gets one info finding and no loss checks.

    Logged scalars:

    =============================  ======================================================================
    tag                            meaning
    =============================  ======================================================================
    ``loss_curve/train``           mean training loss over the steps since the previous measurement
    ``loss_curve/train_epoch``     mean training loss since the previous validation (at validation end)
    ``loss_curve/val``             ``val_metric`` at validation end
    ``loss_curve/gap``             ``val - train_epoch``
    ``loss_curve/reg_ratio``       ``reg_metric / data_metric`` (measured steps, when both are logged)
    =============================  ======================================================================

    Findings:

    ==================================  ========  ========================================================
    check                               severity  when
    ==================================  ========  ========================================================
    ``loss_curve.not_decreasing``       warning   the training loss did not fall by ``min_decrease``
    ``loss_curve.hockey_stick``         warning   a sharp drop in the first steps, then flat (see above)
    ``loss_curve.overfitting``          warning   validation rose for ``patience`` validations, training
                                                  fell
    ``loss_curve.no_generalisation``    warning   the same, but validation never beat the best constant
                                                  predictor while training fell below it
    ``loss_curve.reg_dominates``        warning   ``reg_metric / data_metric > reg_ratio``
    ``loss_curve.no_loss``              info      ``training_step`` returns no loss tensor
    ``loss_curve.overfit_batches_*``    see       ``Trainer(overfit_batches=...)``: ``_passed`` (info),
                                        above     ``_failed`` (warning), ``_partial``, ``_uninformative``
                                                  and ``_too_short`` (info)
    ==================================  ========  ========================================================

    Args:
        every_n_steps: measure every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps)``
            (the per-step losses are on the host already: judging them is cheap, see
            :attr:`~lightning_debug.base.DiagnosticCallback.log_intervals_per_measurement`).
        window: measurements compared for ``not_decreasing`` (first half of the run vs the latest half).
        min_decrease: relative decrease the loss must show (and validation rise that counts as overfitting).
        hockey_steps: the horizon of the hockey-stick check, in optimizer steps (0 disables it).
        val_metric: the key of the validation loss in ``trainer.callback_metrics``.
        patience: validations (overfitting) or measurements (regularisation) in a row before a finding.
        reg_metric: the logged regularisation term.
        data_metric: the logged data (task) loss.
        reg_ratio: ``reg_metric / data_metric`` above which the regularisation dominates.

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import LossCurveMonitor

        trainer = Trainer(callbacks=[LossCurveMonitor(val_metric="val_loss")])
        trainer.fit(model, datamodule)
    """

    log_intervals_per_measurement = 1  # judges the per-step losses already on the host: every logging interval

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        window: int = 10,
        min_decrease: float = 0.05,
        hockey_steps: int = 10,
        val_metric: str = "val_loss",
        patience: int = 3,
        reg_metric: str = "reg_loss",
        data_metric: str = "data_loss",
        reg_ratio: float = 10.0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        check_int("window", window, 2)
        check_float("min_decrease", min_decrease, low=0.0, high=1.0)
        check_int("hockey_steps", hockey_steps, 0)
        check_int("patience", patience, 1)
        for name, value in (("val_metric", val_metric), ("reg_metric", reg_metric), ("data_metric", data_metric)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty metric name, got {value!r}")
        check_float("reg_ratio", reg_ratio, low=0.0)
        self.window = window
        self.min_decrease = float(min_decrease)
        self.hockey_steps = hockey_steps
        self.val_metric = val_metric
        self.patience = patience
        self.reg_metric = reg_metric
        self.data_metric = data_metric
        self.reg_ratio = float(reg_ratio)
        # host-side history (bounded)
        self.start_losses: list[float] = []  # the first window // 2 measurements
        self.recent_losses: deque[tuple[int, float]] = deque(maxlen=max(window // 2, 1))
        self.measurements = 0
        self.validations: list[dict[str, float]] = []
        self.best_val: dict[str, float] | None = None
        self.hockey: dict[str, Any] | None = None
        self._reg_run = 0
        self._reported: set[str] = set()
        # device-side accumulators (never synced between measured steps). Per step only a copy of the loss is kept
        # (one kernel); the losses are folded into [sum of finite losses, count of finite losses] on measured steps,
        # at validation and every _FOLD_EVERY losses (bounded memory), a few ops for all of them at once.
        self._losses: list[Tensor] = []  # detached losses since the last fold
        self._window_sum: Tensor | None = None  # folded losses since the last measured step
        self._epoch_sum: Tensor | None = None  # folded losses since the last validation
        # NaNGuard's fed losses are host floats already: [finite sum, finite count] kept on the host
        self._host_window = [0.0, 0.0]
        self._host_epoch = [0.0, 0.0]
        self._early: list[Tensor] = []
        self._early_host: list[float] = []  # the same, from NaNGuard's loss feed
        # the run's first two and latest per-step losses (host floats or device tensors), for the overfit verdict
        self._head: list[Tensor | float] = []
        self._tail: deque[Tensor | float] = deque(maxlen=_TAIL)
        self._last_step = -1
        self._no_loss = False
        self._seen_loss = False  # some batch returned a loss
        self._batches_without_loss = 0  # batches whose training_step returned None
        self._loss_feed: list[tuple[int, float]] | None = None  # NaNGuard's per-step losses (on_train_start)

    # ------------------------------------------------------------------ NaNGuard's losses
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a new fit: the losses kept since the previous fit's last measurement are not this fit's
        self._losses, self._window_sum, self._epoch_sum = [], None, None
        self._host_window, self._host_epoch = [0.0, 0.0], [0.0, 0.0]
        self._loss_feed = None
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        guard = next((cb for cb in callbacks if callable(getattr(cb, "loss_feed", None))), None)
        if (
            guard is not None
            and trainer.world_size == 1
            and len(trainer.optimizers) == 1
            and pl_module.automatic_optimization
            and trainer.accumulate_grad_batches == 1
            and not any(isinstance(cb, GradientAccumulationScheduler) for cb in callbacks)
            and not str(trainer.precision).startswith("64")  # NaNGuard keeps the loss in float32
        ):  # NaNGuard brings every step's loss to the host: between measured steps this hook can doze
            self._loss_feed = guard.loss_feed()

    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_end",) if self._loss_feed is not None else ()

    def busy(self, step: int) -> bool:
        return super().busy(step) or self._hockey_due(step + 1)

    def next_change(self, step: int) -> int | None:
        change = super().next_change(step)
        if self.hockey is None and self.hockey_steps:
            due = max(step + 1, 5 * self.hockey_steps - 1)  # awake from the batch that ends at step 5 * hockey_steps
            change = due if change is None else min(change, due)
        return change

    def _hockey_due(self, step: int) -> bool:
        return self.hockey is None and bool(self.hockey_steps) and step >= 5 * self.hockey_steps

    def _drain(self) -> None:
        """Take the losses NaNGuard's feed sent since the last drain: host floats, summed on the host."""
        feed = self._loss_feed
        if not feed:
            return
        values = [loss for _, loss in feed]
        feed.clear()
        if self.hockey is None and self.hockey_steps and len(self._early_host) < 5 * self.hockey_steps:
            self._early_host.extend(values[: 5 * self.hockey_steps - len(self._early_host)])
        self._head.extend(values[: 2 - len(self._head)])
        self._tail.extend(values)
        finite = [value for value in values if math.isfinite(value)]
        total = math.fsum(finite)
        for pair in (self._host_window, self._host_epoch):
            pair[0] += total
            pair[1] += len(finite)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        has_loss = isinstance(loss, Tensor) and loss.numel() == 1
        if self._loss_feed is not None:
            self._drain()  # the losses come from NaNGuard (outputs only say whether there is one)
        elif isinstance(loss, Tensor) and has_loss:
            # Automatic optimization hands over a detached clone of the loss, fresh every step: keeping a reference
            # costs no kernel. Under manual optimization the returned tensor is the user's (it may be reused, e.g.
            # by CUDA graphs): then a copy, the only per-step kernel.
            value = loss if pl_module.automatic_optimization else loss.detach().to(dtype=torch.float64, copy=True)
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                value = value * trainer.accumulate_grad_batches  # Lightning hands over loss / accumulate_grad_batches
            self._losses.append(value)
            if len(self._head) < 2:
                self._head.append(value)
            self._tail.append(value)
            if len(self._losses) >= _FOLD_EVERY:
                self._fold()
            if self.hockey is None and self.hockey_steps and len(self._early) < 5 * self.hockey_steps:
                self._early.append(value)
        if has_loss:
            self._seen_loss = True
        elif not self._no_loss:
            if outputs is None or (isinstance(outputs, Mapping) and not outputs):
                self._batches_without_loss += 1  # training_step returned None: a skipped batch (judged below)
            else:
                self._report_no_loss(trainer, f"training_step returned {_describe(outputs)}, not a loss tensor")
        step = self.global_step(trainer)
        if step == self._last_step:
            return  # gradient accumulation: no optimizer step since the last batch
        self._last_step = step
        if self._hockey_due(step):
            self._judge_hockey(trainer)
        if step % (self._interval or self.measure_interval(trainer)) == 0:
            if not self._seen_loss and self._batches_without_loss and not self._no_loss:
                self._report_no_loss(
                    trainer, f"training_step returned None on all {self._batches_without_loss} batches so far"
                )
            self._measure(trainer)

    def _report_no_loss(self, trainer: pl.Trainer, what: str) -> None:
        self._no_loss = True
        self.report(
            trainer,
            "loss_curve.no_loss",
            "info",
            f"{what}: the training-loss checks are off.",
            "Return the loss (or a dict with a 'loss' key) from training_step, also under manual optimization.",
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get(self.val_metric)
        # the reduction below is a collective: a metric logged on some ranks only (rank_zero_only, or under an
        # `if self.global_rank == 0`) must not leave the other ranks waiting in it
        if not all_ranks(trainer, isinstance(val, Tensor)):
            return
        assert isinstance(val, Tensor)
        device = trainer.strategy.root_device
        self._drain()
        self._fold()
        epoch = _with_host(self._epoch_sum, self._host_epoch, device)
        self._epoch_sum, self._host_epoch = None, [0.0, 0.0]
        packed = torch.cat([val.detach().reshape(1).double().to(device), epoch.to(device)])
        val_mean, train_sum, train_count = to_host(list(reduce(trainer, packed, "sum").unbind()))
        val_value = val_mean / trainer.world_size
        train = train_sum / train_count if train_count > 0 else math.nan
        point = {
            "step": int(trainer.global_step), "val": val_value, "train": train, "lr": max_lr(trainer),
            "epoch": int(trainer.current_epoch),
        }  # fmt: skip
        self.validations.append(point)
        scalars = {"loss_curve/val": val_value}
        if math.isfinite(train):
            scalars.update({"loss_curve/train_epoch": train, "loss_curve/gap": val_value - train})
        self.log_scalars(trainer, {k: v for k, v in scalars.items() if math.isfinite(v)})
        self._judge_overfitting(trainer, point)

    def _fold(self) -> None:
        """Add the kept losses' [finite sum, finite count] to the window and epoch accumulators (on the device)."""
        if not self._losses:
            return
        values = torch.cat([v.reshape(-1) for v in self._losses]).double()
        self._losses = []
        finite = torch.isfinite(values)
        pair = torch.stack([torch.where(finite, values, torch.zeros_like(values)).sum(), finite.sum().double()])
        self._window_sum = pair if self._window_sum is None else self._window_sum + pair
        self._epoch_sum = pair if self._epoch_sum is None else self._epoch_sum + pair

    # ------------------------------------------------------------------ measured step: one transfer
    def _measure(self, trainer: pl.Trainer) -> None:
        device = trainer.strategy.root_device
        self._fold()
        window = _with_host(self._window_sum, self._host_window, device)
        self._window_sum, self._host_window = None, [0.0, 0.0]
        metrics = trainer.callback_metrics
        reg = _metric(metrics, self.reg_metric)
        data = _metric(metrics, self.data_metric)
        values = [window.to(device)]
        if reg is not None and data is not None:  # [reg, data, 1]: the same length on every rank (one reduction)
            pair = [reg.detach().double().reshape(()), data.detach().double().reshape(())]
            values.append(
                torch.stack([*(t.to(device) for t in pair), torch.ones((), dtype=torch.float64, device=device)])
            )
        else:
            values.append(torch.zeros(3, dtype=torch.float64, device=device))
        host = to_host(list(reduce(trainer, torch.cat(values), "sum").unbind()))
        loss_sum, count = host[0], host[1]
        has_reg = host[4] == max(1, trainer.world_size)  # logged on every rank
        scalars: dict[str, float] = {}
        if count > 0:
            loss = loss_sum / count
            scalars["loss_curve/train"] = loss
            self._add_measurement(trainer, int(trainer.global_step), loss)
        if has_reg:
            reg_value, data_value = host[2], host[3]
            ratio = reg_value / data_value if data_value > 0 else math.inf
            if math.isfinite(ratio):
                scalars["loss_curve/reg_ratio"] = ratio
            self._judge_regularisation(trainer, reg_value / trainer.world_size, data_value / trainer.world_size, ratio)
        self.log_scalars(trainer, scalars)

    def _add_measurement(self, trainer: pl.Trainer, step: int, loss: float) -> None:
        self.measurements += 1
        half = max(self.window // 2, 1)
        if len(self.start_losses) < half:
            self.start_losses.append(loss)
        self.recent_losses.append((step, loss))
        if self.measurements >= self.window:
            self._judge_decrease(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _overfit_batches(trainer) and "overfit_batches" not in self._reported and not self._no_loss:
            self._drain()
            self._judge_overfit_batches(trainer)

    # ------------------------------------------------------------------ judge
    def _judge_overfit_batches(self, trainer: pl.Trainer) -> None:
        """``Trainer(overfit_batches=...)``: the checklist's "overfit one batch", judged when the run ends.

        The start is the mean of the run's first two losses, the end the mean of its last ``_TAIL`` (or the logged
        ``data_metric``: the task loss without a regularisation term), both averaged over the ranks; the reference
        is the best constant prediction on the memorised batches themselves (InitLossCallback's task, when it is
        in the run). A collective under DDP: every rank calls it.
        """
        batches = _overfit_batches(trainer)
        what = f"{batches} batch(es)" if isinstance(batches, int) else f"{batches:.0%} of the batches"
        first, final, data_final = self._ends(trainer)
        init = _init_loss_callback(trainer)
        count = trainer.num_training_batches
        constant = None
        if init is not None and math.isfinite(count):
            constant = init.best_constant_on(trainer, int(count))
        if not (math.isfinite(first) and math.isfinite(final)) or first <= 0:
            return  # non-finite losses are NaNGuard's business; a loss that starts at 0 has nothing to show
        self._reported.add("overfit_batches")
        task_loss = start_words = ""
        if math.isfinite(data_final):
            final, task_loss = data_final, f" (`{self.data_metric}`, the task loss without the regularisation term)"
            start_words = " (the total loss at the start)"
        steps = int(trainer.global_step)
        data = {"steps": steps, "first": first, "final": final, "best_constant": constant}
        constant_words = (
            "the target mean" if init is not None and init.task == "regression" else "the label frequencies"
        )
        if steps < _OVERFIT_MIN_STEPS:
            self.report(
                trainer, "loss_curve.overfit_batches_too_short", "info",
                f"Trainer(overfit_batches={batches}) ran {steps} optimizer steps: too few to tell whether the model "
                f"can fit {what} (loss {first:.4g} at the start, {final:.4g} at the end{task_loss}).",
                f"Run at least {_OVERFIT_MIN_STEPS} steps (e.g. max_steps=500): a working model drives one batch's "
                "loss close to its minimum within a few hundred.",
                data,
            )  # fmt: skip
        elif constant is not None and constant < _OVERFIT_FIT * first:
            self.report(
                trainer, "loss_curve.overfit_batches_uninformative", "info",
                f"Trainer(overfit_batches={batches}): a constant prediction ({constant_words}, no input) already "
                f"scores {constant:.3g} on {what} (their targets are all alike), so fitting them proves nothing "
                f"(loss {first:.4g} -> {final:.4g}{task_loss}).",
                "Overfit batches whose targets differ: shuffle the data once before taking the batch, or use a "
                "larger batch.",
                data,
            )  # fmt: skip
        elif final <= _OVERFIT_FIT * first:
            self.report(
                trainer, "loss_curve.overfit_batches_passed", "info",
                f"Trainer(overfit_batches={batches}): the training loss{task_loss} fell "
                f"{first / max(final, 1e-300):,.0f}x, from {first:.4g}{start_words} to {final:.4g} in {steps} steps: "
                f"the model, its loss and its labels can fit {what} (checklist: overfit one batch).",
                "Nothing to fix here: go on to the full data (remove overfit_batches).",
                data,
            )  # fmt: skip
        elif (constant is not None and final >= _OVERFIT_CONSTANT * constant) or (
            constant is None and final >= _OVERFIT_STUCK * first
        ):
            baseline = (
                f"; a constant prediction ({constant_words}, no input) scores {constant:.4g} on {what}, and the "
                "loss did not get 10% below it: the model learned next to nothing from the inputs"
                if constant is not None
                else f", {final / first:.0%} of where it started"
            )
            self.report(
                trainer, "loss_curve.overfit_batches_failed", "warning",
                f"Trainer(overfit_batches={batches}): after {steps} steps the training loss{task_loss} is "
                f"{final:.4g} (it started at {first:.4g}{start_words}){baseline}. A model that can learn drives one "
                "batch's loss close to its minimum (0 for cross-entropy on hard labels or for MSE).",
                "Look for the bug before anything else (checklist: overfit one batch): inputs and labels that do not "
                "belong together (shuffled apart, a transposed batch), inputs that never reach the model (zeroed, "
                "detached), a loss fed probabilities instead of logits or the wrong targets, parameters missing from "
                "the optimizer; then the learning rate (UpdateRatioMonitor's ratios) and the model's capacity.",
                data,
            )  # fmt: skip
        else:
            self.report(
                trainer, "loss_curve.overfit_batches_partial", "info",
                f"Trainer(overfit_batches={batches}): the training loss{task_loss} fell {first / final:.1f}x, from "
                f"{first:.4g}{start_words} to {final:.4g} in {steps} steps, but not to 1% of its start"
                + (f" (a constant prediction scores {constant:.4g})" if constant is not None else "")
                + ".",
                "If the loss has a floor above 0 (label smoothing, a regularisation term in the loss, noisy labels), "
                "this is it; otherwise train longer, raise the learning rate or the capacity until it fits the "
                "batch.",
                data,
            )  # fmt: skip

    def _ends(self, trainer: pl.Trainer) -> tuple[float, float, float]:
        """(mean of the first two finite losses, mean of the last ones, the logged ``data_metric`` or NaN), each
        averaged over the ranks (one transfer)."""
        values = _host_floats([*self._head, *self._tail])
        head, tail = values[: len(self._head)], values[len(self._head) :]
        nan = math.nan
        finite_head, finite_tail = [v for v in head if math.isfinite(v)], [v for v in tail if math.isfinite(v)]
        data = _metric(trainer.callback_metrics, self.data_metric)
        local = [
            sum(finite_head) / len(finite_head) if finite_head else nan,
            sum(finite_tail) / len(finite_tail) if finite_tail else nan,
            float(data) if data is not None else nan,
        ]
        device = trainer.strategy.root_device
        first, final, data_final = to_host(
            list(reduce(trainer, torch.tensor(local, dtype=torch.float64, device=device), "mean").unbind())
        )
        return first, final, data_final

    def _judge_decrease(self, trainer: pl.Trainer) -> None:
        if "not_decreasing" in self._reported:
            return
        start = sum(self.start_losses) / len(self.start_losses)
        recent = sum(v for _, v in self.recent_losses) / len(self.recent_losses)
        if not (math.isfinite(start) and math.isfinite(recent)):
            return  # non-finite losses are NaNGuard's business
        if recent < start - self.min_decrease * abs(start):
            return
        self._reported.add("not_decreasing")
        first_step, last_step = self.recent_losses[0][0], self.recent_losses[-1][0]
        data = {"start": start, "recent": recent, "first_step": first_step, "last_step": last_step}
        if trained_at_start(trainer):  # fine-tuning: trained weights start near their floor on familiar data
            self.report(
                trainer,
                "loss_curve.not_decreasing",
                "info",
                f"The training loss stayed flat: {recent:.4g} on average over steps {first_step}-{last_step}, "
                f"{start:.4g} over the first {len(self.start_losses)} measurements. The weights were trained when "
                "the fit started (init_loss.trained), so the loss may start near its floor: fine-tuning often "
                "moves the validation metric more than the training loss.",
                "Judge the run on the validation metric. If that does not improve either, raise the learning rate "
                "(AdamW 1e-5 to 1e-4 is the usual fine-tuning range) or unfreeze more layers.",
                data,
            )
            return
        self.report(
            trainer,
            "loss_curve.not_decreasing",
            "warning",
            f"The training loss is not decreasing: {recent:.4g} on average over steps {first_step}-{last_step}, "
            f"{start:.4g} over the first {len(self.start_losses)} measurements (expected at least "
            f"{self.min_decrease:.0%} lower).",
            "Overfit a single batch first; if that fails too, look for a bug (optimizer without the model's "
            "parameters, missing zero_grad, detached loss, labels misaligned with inputs). Otherwise raise the "
            "learning rate 10x (Adam at 3e-4 is a safe start) and check the LR schedule is not decaying it to 0.",
            data,
        )

    def _judge_hockey(self, trainer: pl.Trainer) -> None:
        k = self.hockey_steps
        losses = to_host(self._early) if self._early else list(self._early_host)  # once per run
        self._early, self._early_host = [], []
        # every rank judges the same numbers: average the ranks' curves
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            size = reduce(trainer, torch.tensor([float(len(losses))], device=device), "min").item()
            losses = losses[: int(size)]
            losses = (reduce(trainer, torch.tensor(losses, dtype=torch.float64, device=device), "mean")).tolist()
        if len(losses) < 5 * k or not all(math.isfinite(v) for v in losses):
            self.hockey = {"status": "not_measured"}
            return
        guard_steps = _guard_bad_steps(trainer, 5 * k)
        if guard_steps or (losses[0] > 0 and max(losses[: k + 1]) > 2 * losses[0]):
            # a loss that rose first (or steps NaNGuard skipped or rolled back) fell back from a divergence: no
            # start to compare with
            self.hockey = {"status": "unstable_start", "max_early": max(losses[: k + 1]), "guard_steps": guard_steps}
            return
        start = sum(losses[:2]) / 2
        knee = sum(losses[k - 1 : k + 1]) / 2
        late = sum(losses[5 * k - 2 : 5 * k]) / 2
        early_drop = (start - knee) / start if start > 0 else 0.0
        # how much faster the loss fell per step in the first k steps than in the next 4k
        speedup = 4 * (start - knee) / (knee - late) if knee > late else math.inf
        self.hockey = {"start": start, "knee": knee, "late": late, "early_drop": early_drop, "speedup": speedup}
        solved = late < 0.01 * start  # the loss went to ~0: the data was simply learned fast
        # learning the output bias takes the loss to the best constant prediction, no lower: far below it the fast
        # first steps learned features (InitLossCallback's reference, when it is in the run)
        constant = _best_constant(trainer)
        if constant is not None:
            self.hockey["best_constant"] = constant
        beyond_bias = constant is not None and knee < 0.5 * constant
        # and a bias can only take the loss from the uniform prediction's to the best constant's: with
        # InitLossCallback in the run, a start well above the uniform prediction's is a too-large init being undone
        # (init_loss.too_high says so), and with (nearly) balanced targets there is no bias to learn
        init_result = _init_loss_result(trainer)
        if init_result is not None and early_drop >= 0.5 and speedup >= 10 and not solved and not beyond_bias:
            expected, rtol = init_result.get("expected"), init_result["rtol"]
            if init_result.get("status") == "too_high":
                self.hockey["status"] = "init_too_high"
                return
            if isinstance(expected, (int, float)) and constant is not None and constant > expected * (1 - rtol):
                self.hockey["status"] = "no_bias_to_learn"
                return
        if early_drop >= 0.5 and speedup >= 10 and not solved and not beyond_bias:
            self.hockey["status"] = "hockey_stick"
            self.report(
                trainer,
                "loss_curve.hockey_stick",
                "warning",
                f"Hockey-stick loss curve: {start:.4g} at the start, {knee:.4g} after {k} steps ({early_drop:.0%} "
                f"gone), then {late:.4g} after {5 * k} steps: the first steps fell {_speed_words(speedup)} faster "
                "than the next ones. They were spent learning the output bias, not features.",
                "Initialise the final layer's bias so the model starts at the best constant prediction: the log "
                "class priors for classification (logit(p) for binary), the target mean for regression; "
                "InitLossCallback measures the expected loss and prints the bias.",
                self.hockey,
            )
        else:
            self.hockey["status"] = "ok"

    def _judge_overfitting(self, trainer: pl.Trainer, point: dict[str, float]) -> None:
        if not math.isfinite(point["val"]) or _overfit_batches(trainer):
            return  # (overfitting the training batches is the point of Trainer(overfit_batches=...))
        if self.best_val is None or point["val"] < self.best_val["val"]:
            self.best_val = dict(point)
            return
        if "overfitting" in self._reported:
            return
        # Memorising takes passes over the data: the validations of an epoch are averaged into one (validating
        # every few steps only adds noise), and windows of `patience` epochs are compared, so one lucky (low)
        # validation is not the reference: the latest window against the lowest earlier one that does not overlap
        # it, the rise beyond the epochs' own noise.
        k = self.patience
        epochs = _by_epoch([p for p in self.validations if math.isfinite(p["val"])])
        if len(epochs) < 2 * k:
            return
        means = [statistics.fmean(e["val"] for e in epochs[i : i + k]) for i in range(len(epochs) - 2 * k + 1)]
        first = min(range(len(means)), key=means.__getitem__)  # the lowest window that ends before the latest
        best_window, since = epochs[first : first + k], epochs[first:]
        low, now = means[first], statistics.fmean(e["val"] for e in epochs[-k:])
        steps = [abs(b["val"] - a["val"]) for a, b in zip(since[:-1], since[1:])]
        noise = 1.4826 * statistics.median(steps) / math.sqrt(2)  # one epoch's spread (robust, from its steps)
        if now - low <= max(self.min_decrease * low, 3 * noise / math.sqrt(k)):
            return
        best = min((p for e in best_window for p in e["points"]), key=lambda p: p["val"])
        if not (math.isfinite(point["train"]) and point["train"] < best["train"]):
            return  # both rose: not overfitting (divergence, a bad LR step)
        trains_then = [e["train"] for e in best_window if math.isfinite(e["train"])]
        trains_now = [e["train"] for e in epochs[-k:] if math.isfinite(e["train"])]
        if trains_then and trains_now and statistics.fmean(trains_now) >= statistics.fmean(trains_then):
            return  # over the same windows the training loss rose too: the gap did not grow (a noisy bump)
        if trains_now and now <= statistics.fmean(trains_now):
            return  # validation still at or below training (dropout, augmentation): no generalisation gap yet
        if point.get("lr", math.nan) > best.get("lr", math.nan) * (1 + 1e-6):
            return  # the LR rose since the best validation (a warm-up, a one-cycle or cyclic schedule): its doing
        constant = _best_constant(trainer)
        lowest = self.best_val["val"] if self.best_val is not None else best["val"]
        if constant is not None and lowest >= constant:
            # validation never beat predicting a constant: nothing generalised, so there is no best step to stop at
            self._reported.add("overfitting")
            if point["train"] < constant:
                self._report_no_generalisation(trainer, point, lowest, constant)
            return
        self._reported.add("overfitting")
        self.report(
            trainer,
            "loss_curve.overfitting",
            "warning",
            f"Overfitting: {self.val_metric} was lowest at step {best['step']} ({best['val']:.4g}; {low:.4g} over the "
            f"best {k} epochs in a row) and averaged {now:.4g} over the last {k} (now {point['val']:.4g}), "
            f"{now / low - 1:.0%} higher and beyond its epoch-to-epoch noise ({noise:.2g}), while the "
            "training loss fell from "
            f"{best['train']:.4g} to {point['train']:.4g}: the train/validation gap grew from "
            f"{best['val'] - best['train']:.3g} to {point['val'] - point['train']:.3g}.",
            f"Stop at step {best['step']}: EarlyStopping(monitor='{self.val_metric}', patience={self.patience}) and "
            f"ModelCheckpoint(monitor='{self.val_metric}'). Then regularise: weight decay (e.g. "
            "AdamW(weight_decay=1e-2) or SGD weight_decay=5e-4), dropout 0.1-0.5, data augmentation, more data or "
            "a smaller model.",
            {"best": best, "now": point, "best_step": best["step"]},
        )

    def _report_no_generalisation(
        self, trainer: pl.Trainer, point: dict[str, float], lowest: float, constant: float
    ) -> None:
        self.report(
            trainer,
            "loss_curve.no_generalisation",
            "warning",
            f"Nothing the model learned carries over to validation: {self.val_metric} was never below the best "
            f"constant predictor's loss {constant:.4g} (InitLossCallback, from the training targets; its lowest "
            f"{lowest:.4g}, now {point['val']:.4g}), while the training loss fell to {point['train']:.4g}. The "
            "model memorises the training examples; this is not ordinary overfitting, and there is no good step "
            "to stop at.",
            "Check that the labels line up with the inputs (a shuffle or a sort applied to one of them only, an "
            "off-by-one join), that the validation data get the same preprocessing as the training data, and that "
            "the task has signal: a small model should beat the constant predictor on validation within an epoch.",
            {"now": point, "lowest_val": lowest, "best_constant": constant},
        )

    def _judge_regularisation(self, trainer: pl.Trainer, reg: float, data: float, ratio: float) -> None:
        self._reg_run = self._reg_run + 1 if ratio > self.reg_ratio else 0
        if self._reg_run < self.patience or "reg_dominates" in self._reported:
            return
        self._reported.add("reg_dominates")
        shown = f"{ratio:.3g}x" if math.isfinite(ratio) else "infinitely"
        self.report(
            trainer,
            "loss_curve.reg_dominates",
            "warning",
            f"The regularisation term dominates: {self.reg_metric} = {reg:.4g} is {shown} {self.data_metric} = "
            f"{data:.4g} for {self._reg_run} measurements (threshold {self.reg_ratio:g}x): the optimizer is busier "
            "shrinking weights than fitting the data.",
            f"Reduce the regularisation coefficient about {max(ratio, 1.0) if math.isfinite(ratio) else 100:.3g}x (so "
            "the two terms are comparable), or start from smaller initial weights.",
            {"reg": reg, "data": data, "ratio": ratio},
        )

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        return {
            "measurements": self.measurements,
            "last_train": self.recent_losses[-1][1] if self.recent_losses else None,
            "best_val": self.best_val,
            "hockey": self.hockey,
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            "start_losses": list(self.start_losses),
            "recent_losses": [list(p) for p in self.recent_losses],
            "measurements": self.measurements,
            "validations": list(self.validations),
            "best_val": self.best_val,
            "hockey": self.hockey,
            "reg_run": self._reg_run,
            "reported": sorted(self._reported),
            "head": self._head_values(),  # the run's first losses: the overfit verdict's start after a resume
        }

    def _head_values(self) -> list[float]:
        self._head = list(_host_floats(self._head))  # (a transfer only when checkpointing)
        return [float(v) for v in self._head]

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.start_losses = [float(v) for v in state.get("start_losses", [])]
        self.recent_losses = deque(
            ((int(s), float(v)) for s, v in state.get("recent_losses", [])), maxlen=max(self.window // 2, 1)
        )
        self.measurements = int(state.get("measurements", 0))
        self.validations = list(state.get("validations", []))
        self.best_val = state.get("best_val")
        self.hockey = state.get("hockey") or ({"status": "resumed"} if self.measurements else None)
        self._reg_run = int(state.get("reg_run", 0))
        self._reported = set(state.get("reported", []))
        self._head = [float(v) for v in state.get("head", [])]


def _by_epoch(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive validations of one epoch averaged into one (val and train means; step and lr of the last).
    Points without an epoch (from an older checkpoint) stay one each."""
    groups: list[list[dict[str, Any]]] = []
    for point in points:
        epoch = point.get("epoch")
        if groups and epoch is not None and groups[-1][-1].get("epoch") == epoch:
            groups[-1].append(point)
        else:
            groups.append([point])
    merged = []
    for group in groups:
        trains = [p["train"] for p in group if math.isfinite(p["train"])]
        merged.append({
            "val": statistics.fmean(p["val"] for p in group),
            "train": statistics.fmean(trains) if trains else math.nan,
            "step": group[-1]["step"], "lr": group[-1].get("lr", math.nan), "points": group,
        })  # fmt: skip
    return merged


def _overfit_batches(trainer: pl.Trainer) -> int | float:
    """``Trainer(overfit_batches=...)``: 0 for a normal run (the attribute is set by Lightning's data connector)."""
    return getattr(trainer, "overfit_batches", 0) or 0


def _init_loss_callback(trainer: pl.Trainer) -> Any | None:
    """The run's InitLossCallback, if any."""
    from lightning_debug.init_loss import InitLossCallback

    callbacks = getattr(trainer, "callbacks", [])
    return next((callback for callback in callbacks if isinstance(callback, InitLossCallback)), None)


def _host_floats(values: list[Tensor | float]) -> list[float]:
    """``values`` (0-d tensors and floats) as floats: one transfer for the tensors among them."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    host = iter(to_host([t.reshape(()) for t in tensors]) if tensors else [])
    return [next(host) if isinstance(v, Tensor) else float(v) for v in values]


def _init_loss_result(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The run's InitLossCallback's result and tolerance (None without a measured one)."""
    callback = _init_loss_callback(trainer)
    if callback is None or not callback.result or callback.result.get("status") in (None, "not_measured"):
        return None
    return {**callback.result, "rtol": callback.rtol}


def _guard_bad_steps(trainer: pl.Trainer, before: int) -> list[int]:
    """The steps before ``before`` that a NaNGuard of the run skipped (and maybe rolled back from)."""
    from lightning_debug.nan_guard import NaNGuard

    guard = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, NaNGuard)), None)
    return [] if guard is None else [int(b["step"]) for b in guard.bad_steps if int(b["step"]) < before]


def _best_constant(trainer: pl.Trainer) -> float | None:
    """The best constant predictor's loss measured by an InitLossCallback of the run (None without one)."""
    value = (_init_loss_result(trainer) or {}).get("best_constant")
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _with_host(folded: Tensor | None, host: list[float], device: torch.device) -> Tensor:
    """[finite sum, finite count] of the device-folded losses plus the host-kept ones, as one float64 tensor."""
    pair = torch.tensor(host, dtype=torch.float64)
    return pair.to(device) if folded is None else folded.to(device) + pair.to(device)


_FOLD_EVERY = 1024  # losses kept between folds: bounds memory when measured steps are far apart
# Trainer(overfit_batches=...): steps before a verdict; fitted at 1% of the first loss; failed at 90% of the best
# constant predictor's loss on the memorised batches (InitLossCallback's task), or without one at half the first
# loss; the end of the run is the mean of its last _TAIL losses
_TAIL = 10
_OVERFIT_MIN_STEPS = 100
_OVERFIT_FIT = 0.01
_OVERFIT_CONSTANT = 0.9
_OVERFIT_STUCK = 0.5


def _speed_words(speedup: float) -> str:
    return f"{speedup:.3g}x" if math.isfinite(speedup) else "infinitely"


def _metric(metrics: Mapping[str, Any], name: str) -> Tensor | None:
    for key in (name, f"{name}_step"):
        value = metrics.get(key)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value
    return None


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Tensor):
        return f"a tensor of shape {tuple(outputs.shape)}"
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if loss is None:
            return f"a dict without a 'loss' key (keys: {', '.join(map(str, list(outputs)[:5]))})"
        return f"a dict whose 'loss' is {_describe(loss) if isinstance(loss, Tensor) else type(loss).__name__}"
    return type(outputs).__name__
