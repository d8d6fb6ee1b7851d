"""UpdateRatioMonitor: how far each optimizer step actually moves every parameter, relative to its size."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_debug.base import DiagnosticCallback, trained_at_start
from lightning_debug.distributed import is_sharded, reduce_squares
from lightning_debug.findings import Severity
from lightning_debug.optimizers import (
    SIGNIFICANT_BITS,
    float16_eps_problems,
    float16_eps_text,
    optimizer_index,
    optimizer_params,
    rounded_away,
    rounded_away_text,
)
from lightning_debug.stats import (
    fused_norms,
    moved_since,
    round_significant,
    shared_grad_norms,
    stacked,
    to_host,
    weight_fingerprints,
)
from lightning_debug.validation import check_float, check_int
from lightning_debug.weight_stats import BiasBeforeNormProbe

_FITTED_DROP = 100.0  # a training loss this many times below its first measurement: the model fits its data
_EARLY = 0.5  # a schedule that has made updates too small before this fraction of the run decays too early
_DECAYED = 3.0  # the LR this many times below its peak (median over the streak): the schedule explains small updates
_ROUNDED_AWAY = 0.25  # low-precision weights: an info when the step leaves this fraction of the elements unchanged


@dataclass
class _Snapshot:
    """One optimizer's parameters just before a measured step, and the step's result once applied."""

    step: int
    names: list[str]
    ndims: list[int]
    params: list[nn.Parameter]
    copies: list[Tensor] | None
    weight_sq: Tensor  # squared norms before the step
    grads_finite: Tensor
    lrs: list[float]  # each parameter's param-group learning rate at this step
    delta_sq: Tensor | None = None  # squared norms of the applied update, once the step ran
    low: list[int] | None = None  # indices of the float16/bfloat16 parameters
    rounding: Tensor | None = None  # their elements with a non-zero gradient, and those of them the step left unchanged
    index: int = 0  # the optimizer's index
    sparse: frozenset[str] = frozenset()  # parameters with sparse gradients (not judged too small)


class UpdateRatioMonitor(DiagnosticCallback):
    r"""Measure ``||Δw|| / ||w||``, the size of the update each optimizer step applied, for every parameter.

    The checklists' rule of thumb: updates should be about 1e-3 of the weights; below 1e-4 the network learns
    too slowly. The ratio is measured on the update *actually applied* (momentum, Adam's moments, weight decay,
    the LR schedule and gradient clipping included): on measured steps the parameters of the optimizer about to
    step are copied in ``on_before_optimizer_step`` and compared with the result in an optimizer step post-hook.
    Each optimizer is measured on its own (several optimizers, manual optimization); under gradient
    accumulation only the real steps are measured. An optimizer that evaluates its closure several times per step
    (LBFGS; Lightning calls ``on_before_optimizer_step`` after each evaluation) is measured once per step: the copy is
    taken at the first evaluation, before the step moves anything, and the ratio is that of the whole step.

    **Memory:** one transient copy of the stepping optimizer's parameters (the size of the model's trainable
    weights, in their dtype) exists from ``on_before_optimizer_step`` to the end of that step, on measured steps
    only; between measured steps nothing is kept but two float64 numbers (a fingerprint, see below) per parameter
    that has not changed on any measured step so far.

    Judgement uses weights with two or more dimensions (matrices, kernels): a bias or a norm scale that starts
    at zero has no meaningful ratio, and a bias before BatchNorm legitimately receives no gradient. Embedding
    tables (``nn.Embedding``, ``nn.EmbeddingBag``) and parameters with sparse gradients are not judged too small:
    a batch updates only the rows of the tokens it holds, so the ratio over the whole table falls with the
    vocabulary's size (Adam at lr 1e-3, 17 of 100,000 rows touched per batch: ~1e-5) while those rows learn at a
    normal rate. All parameters are logged, and every parameter is checked for never changing. A finding needs
    ``patience`` measurements in a row beyond its threshold (hysteresis), so one noisy step never raises it.

    Thresholds, measured on the digits zoo (SGD lr=0.05 momentum 0.9 and Adam lr=1e-3; MLP, BatchNorm CNN,
    RNN): healthy weights' ratios have medians 8e-3 to 2.5e-2 and single-step maxima up to 8e-2, so the
    ``too_large`` default is 0.1, not the checklist's 1e-2 (which all these healthy runs exceed). Adam at
    lr=1e-7 gives 1e-6.

    "Too small" is judged as at the peak learning rate: a schedule that lowers the LR lowers every update with it
    (for SGD, momentum, Adam and weight decay the update is proportional to the LR), so each ratio is scaled by
    the peak LR seen so far over the step's LR, and while the LR rises (a warm-up) the streak waits; a weight is
    too small when the median of its scaled ratios is. Ratios too small only because the schedule lowered the LR
    (at least 3x below its peak, median over the streak; a smaller decay explains little and is not blamed) are
    normal near the end of a run (cosine or linear decay to 0) and raise ``update_ratio.lr_decayed_early`` when
    they start before half of it (from ``Trainer.estimated_stepping_batches``). When the run's length is not fixed
    in advance (``EarlyStopping`` in the callbacks, ``max_epochs=-1`` without ``max_steps``, a dataset of unknown
    length) that is judged when training ends, against the steps it ran. A ``ReduceLROnPlateau`` decay reacts to
    its monitored metric instead of following a plan made in advance: one ``update_ratio.lr_reduced_on_plateau``
    info, no schedule advice. Ratios too small while the training loss has fallen 100x or more since the first
    measurement (the step's loss, read with the ratios) are the model fitting its data, e.g. an overfit-one-batch
    check: one ``update_ratio.fitted`` info, no advice to raise the LR.

    **Fine-tuning:** with InitLossCallback in the run, its ``init_loss.trained`` finding (the loss at fit start is
    far below chance: the weights are trained) makes ``update_ratio.too_small`` an info. Small updates are expected
    when fine-tuning (AdamW at 2e-5 on a trained digits MLP: ~6e-5), and raising the LR to reach the ~1e-3 of
    training from scratch risks erasing what the weights learned (catastrophic forgetting).

    Skipped steps are not "too small": a step the GradScaler skipped (non-finite gradients, the post-hook never
    runs), a step with non-finite gradients, or a step in which no parameter changed at all (NaNGuard skipped
    it) is dropped and counted in ``update_ratio/skipped_steps``. Only ``patience`` such all-unchanged steps in a
    row with finite gradients (learning rate 0, everything frozen) raise ``update_ratio.frozen``.

    Changes are seen on measured steps. A parameter unchanged on every measured step so far (or every parameter, on
    an all-unchanged step) is fingerprinted: the L1 and L2 norms of its weights, on the device, on measured steps only
    and only while such parameters exist. If its weights moved by a later measured step (read in that step's transfer,
    or once when training ends, for the summary), it changed on a step in between: not frozen (e.g. a multi-task head
    used on odd steps while the cadence measures even ones, or steps skipped on the measured steps only).

    Under DDP the parameters agree across ranks; the norms are averaged on measured steps so every rank judges
    the same numbers, and rank 0 logs. Sharded strategies (FSDP, DeepSpeed) sum squared shard norms.

    Logged scalars (measured steps):

    ===================================  ==================================================================
    tag                                  meaning
    ===================================  ==================================================================
    ``update_ratio/<param.dotted.name>`` ``log10(||Δw|| / ||w||)`` of the applied update (-3 is the rule of
                                         thumb; all layers share one readable chart)
    ``update_ratio/skipped_steps``       measured steps dropped as skipped (GradScaler, NaNGuard)
    ``update_ratio/rounded_away``        float16/bfloat16 weights only: the fraction of their elements with a
                                         non-zero gradient that the step left exactly unchanged
    ===================================  ==================================================================

    Findings:

    ========================================  ========  ========================================================
    check                                     severity  when
    ========================================  ========  ========================================================
    ``update_ratio.too_small``                warning   a weight's ratio < ``too_small`` for ``patience``
                                                        measurements, also when scaled to the peak LR (median);
                                                        ``info`` when fine-tuning trained weights
    ``update_ratio.lr_decayed_early``         warning   the same, but only since the schedule lowered the LR
                                                        3x or more, before half of the run
    ``update_ratio.lr_reduced_on_plateau``    info      the same, since a ``ReduceLROnPlateau`` decay
    ``update_ratio.fitted``                   info      the same while the training loss is 100x below its
                                                        first measurement
    ``update_ratio.too_large``                warning   a weight's ratio > ``too_large`` for ``patience``
                                                        measurements
    ``update_ratio.frozen``                   warning   a parameter in an optimizer never changed over
                                                        ``patience`` measurements nor in between (or no parameter
                                                        changed in ``patience`` steps nor in between)
    ``update_ratio.eps_underflow``            warning   at the start: an Adam-family optimizer's ``eps`` is below
                                                        float16's smallest normal (6.1e-05) while it updates
                                                        float16 weights (``precision="16-true"``): NaN updates
    ``update_ratio.rounded_away``             info      float16/bfloat16 weights: the step left at least 25% of
                                                        the elements that had a gradient unchanged (median of
                                                        ``patience`` measurements): updates rounded away
    ========================================  ========  ========================================================

    **Low-precision weights** (``precision="16-true"``/``"bf16-true"``, or a model cast with ``.half()``): the
    optimizer then keeps and updates the weights in 16 bits. Adam's default ``eps=1e-8`` is 0 in float16, and the
    first gradient element whose square underflows makes the update NaN (on the digits MLP: NaN weights at the first
    step with eps 1e-8 and at the second with 1e-7; 95% accuracy with eps 1e-4); that is checked when training
    starts. bfloat16 keeps 8 significant bits, so updates below ~0.2-0.4% of a weight are lost: on the digits MLP
    (5 epochs, bf16 against float32) Adam at lr 1e-3 left 46% of the elements with a gradient unchanged (median) and
    reached 94% like float32, SGD at lr 0.01 58% (95%), while Adam at lr 1e-4 left 88% unchanged and reached 20%
    against 73% in float32. The share is logged and reported as an info (per optimizer: ``update_ratio/rounded_away``,
    ``…_opt1`` for the second); whether it matters shows in the loss. A 16-bit parameter that never changes although
    it has a gradient (a norm scale at 1.0 under Adam at lr 1e-3) is ``update_ratio.frozen`` with rounding as the cause.

    Args:
        every_n_steps: measure every this many optimizer steps; ``None``: every ``2 * Trainer(log_every_n_steps)``
            steps (100 at Lightning's default).
        too_small: ratio below which a weight learns too slowly (default 1e-4, from the checklists).
        too_large: ratio above which updates are too large (default 0.1, see above); must exceed ``too_small``.
        patience: consecutive measurements beyond a threshold before a finding (hysteresis).

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import UpdateRatioMonitor

        trainer = Trainer(callbacks=[UpdateRatioMonitor(every_n_steps=10)])
        trainer.fit(model, datamodule)   # tensorboard: update_ratio/* should sit near -3
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        too_small: float = 1e-4,
        too_large: float = 0.1,
        patience: int = 5,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        check_float("too_small", too_small, low=0.0)
        check_float("too_large", too_large, low=0.0)
        if too_large <= too_small:
            raise ValueError(f"`too_large` must be greater than `too_small` ({too_small!r}), got {too_large!r}")
        check_int("patience", patience, 1)
        self.too_small = float(too_small)
        self.too_large = float(too_large)
        self.patience = patience
        self._names: dict[int, str] = {}
        self._hooks: dict[int, Any] = {}  # optimizer index -> step post-hook handle, while a measurement is pending
        self._pending: dict[int, _Snapshot] = {}
        self._optimizer_steps: dict[int, int] = {}
        self._stepping: dict[int, int] = {}  # optimizer index -> the step seen last (LBFGS evaluates its closure again)
        self._ratios: dict[str, deque[float]] = {}  # last `patience` ratios of each judged weight
        # too_small's streak: (ratio, peak LR / the step's LR) per measurement, restarted while the LR rises
        self._small: dict[str, deque[tuple[float, float]]] = {}
        self._peak_lr: dict[str, float] = {}
        self._last_lr: dict[str, float] = {}
        self._first_loss: float | None = None  # the first measured step's training loss (ranks' mean)
        self._recent_losses: deque[float] = deque(maxlen=patience)
        self._changed: dict[str, bool] = {}
        # parameters that did not change on the measured steps so far: their weights' fingerprint when first seen so
        # (weight_fingerprints); weights that moved since changed on a step in between
        self._marks: dict[str, tuple[nn.Parameter, Tensor]] = {}
        self._valid_measurements: dict[str, int] = {}
        self._unchanged_run = 0
        self._measured = 0
        self.skipped_steps = 0
        self._flagged: set[str] = set()  # "check:name" currently reported
        self.last_ratios: dict[str, float] = {}
        # 16-bit weights, per optimizer: the fractions of their elements with a gradient that the step left unchanged
        self._rounded: dict[int, deque[float]] = {}
        # biases feeding a normalisation layer: their gradient is 0 up to rounding, so they never change (harmless:
        # WeightStatsMonitor's weight_stats.bias_before_norm), found in the run's first forward
        self._before_norm: set[str] = set()
        self._norm_probe: BiasBeforeNormProbe | None = None
        self._embeddings: set[str] = set()  # embedding tables: not judged too small (on_train_start)
        self._optimizer_of: dict[str, int] = {}  # parameter name -> the index of the optimizer stepping it
        self._fine_tuning = False  # InitLossCallback found trained weights at fit start (init_loss.trained)
        # a schedule's decay found while the run's length is not known: judged when training ends
        self._pending_decay: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_before_optimizer_step", "on_train_batch_end")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        tables = {id(m.weight) for m in pl_module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        self._embeddings = {name for key, name in self._names.items() if key in tables}
        self._remove_hooks()
        self._close_norm_probe()
        self._stepping.clear()
        self._marks.clear()  # (the parameters they hold may be others now)
        self._norm_probe = BiasBeforeNormProbe(pl_module)  # watches the first training forward only
        problems = float16_eps_problems(trainer.optimizers)
        if problems and "eps_underflow" not in self._flagged:
            self._flagged.add("eps_underflow")
            count = sum(p["float16_params"] for p in problems)
            self.report(
                trainer,
                "update_ratio.eps_underflow",
                "warning",
                f"{float16_eps_text(problems)} divides the updates of {count} float16 parameter(s) (precision="
                "'16-true' or a model cast with .half()): where a gradient element is below ~2.4e-4 its square "
                "underflows to 0 in float16, the denominator sqrt(v) + eps is eps alone and the update is NaN or "
                "overflows (expected: eps at least float16's smallest normal number, 6.1e-05).",
                "Train with precision='16-mixed' (float32 weights and optimizer state, with loss scaling) or "
                "'bf16-mixed'; to keep float16 weights, set eps=1e-4 in the optimizer (torch.optim.Adam(params, "
                "lr=..., eps=1e-4)). Lowering the learning rate does not help (NaNGuard's backoffs cannot fix it).",
                {"problems": problems},
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._close_norm_probe()
        index = optimizer_index(trainer, optimizer)
        step = self.global_step(trainer)
        if self._stepping.get(index) == step:
            return  # the closure evaluated again within the same optimizer step (LBFGS): measured from its start
        self._stepping[index] = step
        steps = self._optimizer_steps.get(index, 0)
        self._optimizer_steps[index] = steps + 1
        if not self.is_measured_optimizer_step(trainer, steps):
            return
        if index in self._pending:  # the same optimizer stepped twice in one batch: finish the first
            self._finish(trainer, index, self._pending.pop(index))
        params = optimizer_params(optimizer)
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        low = [i for i, p in enumerate(params) if p.dtype in SIGNIFICANT_BITS]
        grad_sq = stacked(shared_grad_norms(grads)).double().square().sum() if grads else None
        with torch.no_grad():  # fused over the tensors: one copy call and one norm pass, no per-tensor Python
            copies = list(torch._foreach_mul(list[Tensor](params), 1.0))  # x * 1.0: x bit for bit
            weight_sq = torch.stack(fused_norms(params)).double().square()
        if index not in self._hooks:  # on measured steps only: no hook call on the optimizer steps in between
            torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # (a LightningOptimizer wraps it)
            self._hooks[index] = torch_optimizer.register_step_post_hook(self._post_hook(trainer, index))
        self._pending[index] = _Snapshot(
            step=step,
            names=[self._names.get(id(p), f"opt{index}.param{i}") for i, p in enumerate(params)],
            ndims=[p.ndim for p in params],
            params=params,
            copies=copies,
            weight_sq=weight_sq,
            grads_finite=torch.isfinite(grad_sq) if grad_sq is not None else torch.ones((), dtype=torch.bool),
            lrs=_param_lrs(optimizer, params),
            low=low or None,
            index=index,
            sparse=frozenset(self._names.get(id(p), "") for p in params if p.grad is not None and p.grad.is_sparse),
        )

    def _post_hook(self, trainer: pl.Trainer, index: int) -> Any:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            snapshot = self._pending.get(index)
            if snapshot is None or snapshot.copies is None:
                return
            # before - after, in place in the copy: no second copy of the parameters
            with torch.no_grad():
                torch._foreach_sub_(snapshot.copies, list[Tensor](snapshot.params))
                snapshot.delta_sq = torch.stack(fused_norms(snapshot.copies)).double().square()
                if snapshot.low:
                    snapshot.rounding = _rounding_counts(snapshot.params, snapshot.copies, snapshot.low)
            snapshot.copies = None

        return hook

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        outputs = args[0] if args else kwargs.get("outputs")
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        for index in sorted(self._pending):
            self._finish(trainer, index, self._pending.pop(index), loss if isinstance(loss, Tensor) else None)
        self._remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._judge_pending_decay(trainer)
        if self._marks:  # weights that moved since the last measured step changed (for the summary): one transfer
            moved = to_host([reduce_squares(trainer, moved_since(list(self._marks.values())))])
            self._clear_moved(list(self._marks), moved)
        self._marks.clear()
        self._pending.clear()
        self._remove_hooks()
        self._close_norm_probe()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._pending.clear()
        self._remove_hooks()
        self._close_norm_probe()

    def _close_norm_probe(self) -> None:
        if self._norm_probe is not None:
            self._before_norm |= self._norm_probe.close()
            self._norm_probe = None

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ measured step: one transfer
    def _finish(self, trainer: pl.Trainer, index: int, snapshot: _Snapshot, loss: Tensor | None = None) -> None:
        count = len(snapshot.params)
        device = snapshot.weight_sq.device
        stepped = snapshot.delta_sq is not None
        delta_sq = (
            snapshot.delta_sq
            if snapshot.delta_sq is not None
            else torch.zeros(count, dtype=torch.float64, device=device)
        )
        flags = torch.stack(
            [snapshot.grads_finite.to(device=device, dtype=torch.float64), delta_sq.new_tensor(float(stepped))]
        )
        if loss is not None and loss.numel() == 1:
            # the step's loss rides along (averaged over ranks: summed over shards, so divided by their number)
            loss_term = loss.detach().reshape(1).to(device=device, dtype=torch.float64)
            if is_sharded(trainer):
                loss_term = loss_term / trainer.world_size
        else:
            loss_term = delta_sq.new_full((1,), math.nan)
        rounding = snapshot.rounding.to(device) if snapshot.rounding is not None else delta_sq.new_full((2,), math.nan)
        parts = [snapshot.weight_sq, delta_sq, flags, loss_term, rounding]
        # parameters unchanged on the measured steps so far: did their weights move since? (only while there are any)
        marked = [name for name in snapshot.names if name in self._marks] if self._marks else []
        if marked:
            parts.append(moved_since([self._marks[name] for name in marked]).to(device))
        packed = reduce_squares(trainer, torch.cat(parts))
        host = to_host(list(packed.unbind()))
        weight_sq, delta_host = host[:count], host[count : 2 * count]
        grads_finite, stepped_all, loss_value, with_grad, unchanged = host[2 * count : 2 * count + 5]
        if self._clear_moved(marked, host[2 * count + 5 :]):
            self._unchanged_run = 0  # weights changed on a step between the measured ones: not frozen for good
        self._measured += 1
        if math.isfinite(loss_value):
            if self._first_loss is None:
                self._first_loss = loss_value
            self._recent_losses.append(loss_value)
        if stepped_all < 1.0 or grads_finite < 1.0 or not all(math.isfinite(d) for d in delta_host):
            self._skip(trainer)  # the GradScaler skipped it, or gradients were non-finite: says nothing about the LR
            return
        if all(d == 0.0 for d in delta_host):
            self._skip(trainer)  # nothing moved: a skipped step (NaNGuard), unless it persists
            self._unchanged_run += 1
            self._mark(snapshot, every=True)  # whether anything changes on the steps in between: asked at the next
            if self._unchanged_run >= self.patience:
                self._report_all_frozen(trainer, snapshot)
            return
        self._unchanged_run = 0
        self._ingest(trainer, snapshot, weight_sq, delta_host)
        if snapshot.low and with_grad > 0:  # (NaN without low-precision weights)
            self._judge_rounding(trainer, index, snapshot, unchanged / with_grad)

    def _clear_moved(self, names: list[str], moved: list[float]) -> bool:
        """The marked parameters whose weights moved since they were marked changed on a step in between (True if
        any did)."""
        any_moved = False
        for name, distance in zip(names, moved):
            if distance != 0.0:
                del self._marks[name]
                self._changed[name] = any_moved = True
        return any_moved

    def _mark(self, snapshot: _Snapshot, every: bool = False) -> None:
        """Fingerprint the weights of the parameters that did not change on any measured step so far (``every``: of
        all the step's parameters, when none changed), once each, on the device: if they move by a later measured
        step, they changed on a step in between (a head used on odd steps only, while the measured steps are even)."""
        new = [
            i
            for i, name in enumerate(snapshot.names)
            if (every or not self._changed.get(name, True))
            and name not in self._marks
            and name not in self._before_norm
            and f"frozen:{name}" not in self._flagged
        ]
        if new:
            fingerprints = weight_fingerprints([snapshot.params[i] for i in new])
            for i, fingerprint in zip(new, fingerprints.unbind()):
                self._marks[snapshot.names[i]] = (snapshot.params[i], fingerprint)

    def _skip(self, trainer: pl.Trainer) -> None:
        self.skipped_steps += 1
        self.log_scalars(trainer, {"update_ratio/skipped_steps": float(self.skipped_steps)})

    # ------------------------------------------------------------------ judge
    def _ingest(self, trainer: pl.Trainer, snapshot: _Snapshot, weight_sq: list[float], delta_sq: list[float]) -> None:
        scalars: dict[str, float] = {}
        for name, ndim, w_sq, d_sq, lr in zip(snapshot.names, snapshot.ndims, weight_sq, delta_sq, snapshot.lrs):
            self._valid_measurements[name] = self._valid_measurements.get(name, 0) + 1
            self._changed[name] = self._changed.get(name, False) or d_sq > 0
            if w_sq <= 0:
                continue  # a zero tensor (e.g. a bias initialised to 0) has no ratio
            ratio = math.sqrt(d_sq / w_sq)
            self.last_ratios[name] = ratio
            if ratio > 0:
                scalars[f"update_ratio/{name}"] = math.log10(ratio)
            if ndim >= 2 and ratio > 0:  # an exact 0 is update_ratio.frozen's business
                self._ratios.setdefault(name, deque(maxlen=self.patience)).append(ratio)
                self._optimizer_of[name] = snapshot.index
                if name in self._embeddings or name in snapshot.sparse:
                    continue  # a batch updates the rows of its tokens: the table's ratio says nothing about the LR
                scale = self._lr_scale(name, lr)
                if scale is None:
                    self._small.pop(name, None)  # a warm-up: small updates are the schedule's start
                else:
                    self._small.setdefault(name, deque(maxlen=self.patience)).append((ratio, scale))
        scalars["update_ratio/skipped_steps"] = float(self.skipped_steps)
        self.log_scalars(trainer, scalars, step=snapshot.step)
        self._judge(trainer, snapshot)
        for name in [n for n in self._marks if self._changed.get(n, True) or f"frozen:{n}" in self._flagged]:
            del self._marks[name]  # changed on this measured step, or reported
        self._mark(snapshot)

    def _lr_scale(self, name: str, lr: float) -> float | None:
        """The peak learning rate so far over this step's (too_small judges updates as they were at the peak:
        a decaying schedule shrinks them on purpose); None while the LR rises (a warm-up, not judged)."""
        if not (math.isfinite(lr) and lr > 0):
            return 1.0
        last = self._last_lr.get(name)
        self._last_lr[name] = lr
        peak = self._peak_lr[name] = max(self._peak_lr.get(name, lr), lr)
        if last is not None and lr > last * (1 + 1e-6):
            return None
        return peak / lr

    def _sustained(self, check: str, histories: Mapping[str, deque[Any]], beyond: Any) -> list[str]:
        names = []
        for name, history in histories.items():
            if len(history) == self.patience and all(beyond(r) for r in history):
                names.append(name)
            elif history and not beyond(history[-1]):
                self._flagged.discard(f"{check}:{name}")  # recovered: may be reported again
        return [n for n in names if f"{check}:{n}" not in self._flagged]

    def _small_median(self, name: str, at_peak: bool = False) -> float:
        """The median ratio of ``name``'s too-small streak, as measured or scaled to the peak LR."""
        return statistics.median(ratio * scale if at_peak else ratio for ratio, scale in self._small[name])

    def _decay(self, name: str) -> float:
        """How many times below its peak the LR was over ``name``'s too-small streak (median)."""
        return statistics.median(scale for _, scale in self._small[name])

    def _trained_at_start(self, trainer: pl.Trainer) -> bool:
        """Whether the weights were trained when the fit started (kept: it travels in the checkpoint)."""
        self._fine_tuning = self._fine_tuning or trained_at_start(trainer)
        return self._fine_tuning

    def _fitted(self) -> bool:
        """Whether the training loss fell ``_FITTED_DROP``-fold or more since the first measurement (median of the
        last ``patience`` measured steps): the model fits its training data, and small updates follow from that."""
        first, recent = self._first_loss, self._recent_losses
        if first is None or first <= 0 or len(recent) < self.patience:
            return False
        median = statistics.median(recent)
        return 0 <= median <= first / _FITTED_DROP

    def _judge(self, trainer: pl.Trainer, snapshot: _Snapshot) -> None:
        small = self._sustained("too_small", self._small, lambda m: m[0] < self.too_small)
        if small and self._fitted():
            self._report_fitted(trainer, snapshot, small)
        elif small:
            # too small even scaled to the peak LR: the LR; too small only since the schedule lowered it 3x or more:
            # the schedule (a smaller decay explains little: those weights are left alone)
            at_peak = [n for n in small if self._small_median(n, at_peak=True) < self.too_small]
            if at_peak:
                self._report_ratio(trainer, snapshot, "too_small", at_peak)
            decayed = [n for n in small if n not in at_peak and self._decay(n) >= _DECAYED]
            if decayed:
                self._report_decayed(trainer, snapshot, decayed)
        large = self._sustained("too_large", self._ratios, lambda r: r > self.too_large)
        if large:
            self._report_ratio(trainer, snapshot, "too_large", large)
        frozen = [
            name
            for name in snapshot.names
            if self._valid_measurements.get(name, 0) >= self.patience
            and not self._changed.get(name, False)
            and name not in self._before_norm
            and f"frozen:{name}" not in self._flagged
        ]
        for name in frozen:
            self._flagged.add(f"frozen:{name}")
        by_name = dict(zip(snapshot.names, snapshot.params))
        rounded = rounded_away({name: by_name[name] for name in frozen})
        frozen = [name for name in frozen if name not in rounded]
        if rounded:  # 16-bit weights with a gradient: the updates round away, nothing cuts the gradient
            message, hint = rounded_away_text(rounded, by_name)
            self.report(trainer, "update_ratio.frozen", "warning", message, hint,
                        {"parameters": rounded, "measurements": self.patience, "rounded_away": True},
                        step=snapshot.step + 1)  # fmt: skip
        if frozen:
            self.report(
                trainer,
                "update_ratio.frozen",
                "warning",
                f"{len(frozen)} parameter(s) never changed in {self.patience}+ measured optimizer steps while others "
                f"did (update ratio exactly 0; expected ~1e-3): {frozen[:20]}.",
                "They get no gradient (a .detach() or torch.no_grad() in their forward path, an unused branch) or "
                "their param group has lr=0; if frozen on purpose, set requires_grad_(False) and leave them out "
                "of the optimizer.",
                {"parameters": frozen, "measurements": self.patience},
                step=snapshot.step + 1,
            )

    def _report_ratio(self, trainer: pl.Trainer, snapshot: _Snapshot, check: str, names: list[str]) -> None:
        for name in names:
            self._flagged.add(f"{check}:{name}")
        lr_of = dict(zip(snapshot.names, snapshot.lrs))
        lowered = False
        if check == "too_small":  # as at the peak LR (the same numbers without a schedule that lowered it)
            medians = {name: self._small_median(name, at_peak=True) for name in names}
            lowered = any(self._peak_lr.get(n, lr_of.get(n, math.nan)) > lr_of.get(n, math.nan) for n in names)
            lr_of = {n: self._peak_lr.get(n, lr) for n, lr in lr_of.items()}
        else:
            medians = {name: statistics.median(self._ratios[name]) for name in names}
        overall = statistics.median(medians.values())
        shown = {name: round_significant(value, 2) for name, value in list(medians.items())[:10]}
        target = 1e-3 if check == "too_small" else 1e-2
        # advice per param group: each group's learning rate scaled by what brings its own weights to the target
        groups: dict[float, list[str]] = {}
        for name in names:
            groups.setdefault(lr_of.get(name, math.nan), []).append(name)
        advice = []
        suggested: dict[str, float | None] = {}
        for lr, members in groups.items():
            factor = target / statistics.median(medians[n] for n in members)
            for n in members:
                suggested[n] = round_significant(lr * factor)
            which = f" ({members[:5]}{' ...' if len(members) > 5 else ''})" if len(groups) > 1 else ""
            amount = f"{factor:.3g}x" if check == "too_small" else f"{1 / factor:.3g}x"
            advice.append(f"{amount}: lr {lr:.3g} -> {lr * factor:.3g}{which}")
        per_group = "; ".join(advice)
        single_lr = next(iter(groups)) if len(groups) == 1 else None
        severity: Severity = "warning"
        if check == "too_small" and self._trained_at_start(trainer):
            severity = "info"
            message = (
                f"Updates are small: ||Δw||/||w|| stayed below {self.too_small:g} for {self.patience} measurements in "
                f"a row in {len(names)} weight(s), median {overall:.2g} (10^{math.log10(overall):.1f}"
                f"{', scaled to the peak learning rate' if lowered else ''}), where training from scratch moves "
                "~1e-3. The weights were trained when the fit started (InitLossCallback: init_loss.trained): small "
                f"updates are expected when fine-tuning, they keep what the weights learned. {shown}"
            )
            hint = (
                "Nothing to change while the training and validation loss improve. If they stall, raise the "
                f"{'peak ' if lowered else ''}learning rate in small steps (2-3x at a time): the ~1e-3 of training "
                f"from scratch would take about {per_group}, which risks erasing what the trained weights know "
                "(catastrophic forgetting)."
            )
        elif check == "too_small":
            message = (
                f"Updates are too small: ||Δw||/||w|| stayed below {self.too_small:g} for {self.patience} measurements "
                f"in a row in {len(names)} weight(s), median {overall:.2g} (10^{math.log10(overall):.1f}); expected "
                f"~1e-3 (checklist: below 1e-4 the network learns too slowly). {shown}"
            )
            if lowered:
                message += (
                    " Scaled to the peak learning rate: the schedule has lowered it since, and at the peak the "
                    "updates were too small as well."
                )
            hint = (
                f"Raise the {'peak ' if lowered else ''}learning rate "
                f"{'of each param group ' if len(groups) > 1 else ''}about {per_group} "
                f"(brings the ratio to ~{target:g}). If the LR is right, these layers are stuck (saturated "
                "activations, vanishing gradients): check GradNormMonitor's findings."
            )
        else:
            message = (
                f"Updates are too large: ||Δw||/||w|| stayed above {self.too_large:g} for {self.patience} measurements "
                f"in a row in {len(names)} weight(s), median {overall:.2g} (10^{math.log10(overall):.1f}); expected "
                f"~1e-3 to 1e-2: every step rewrites a large part of the weights. {shown}"
            )
            hint = (
                f"Lower the learning rate {'of each param group ' if len(groups) > 1 else ''}about {per_group} "
                f"(brings the ratio to ~{target:g}), or add warm-up / gradient clipping."
            )
        self.report(
            trainer,
            f"update_ratio.{check}",
            severity,
            message,
            hint,
            {
                "parameters": names,
                "median_ratio": {n: round_significant(v) for n, v in medians.items()},
                # one param group: its lr and the suggestion; several: None, see the per-parameter entries
                "lr": single_lr,
                "suggested_lr": suggested[names[0]] if single_lr is not None else None,
                "lr_by_parameter": {n: lr_of.get(n, math.nan) for n in names},
                "suggested_lr_by_parameter": suggested,
                "fine_tuning": severity == "info",
            },
            step=snapshot.step + 1,
        )

    def _report_fitted(self, trainer: pl.Trainer, snapshot: _Snapshot, names: list[str]) -> None:
        if "fitted" in self._flagged:
            return
        self._flagged.add("fitted")
        first, recent = self._first_loss, statistics.median(self._recent_losses)
        assert first is not None
        median = statistics.median(self._small_median(n) for n in names)
        drop = first / recent if recent > 0 else math.inf
        self.report(
            trainer,
            "update_ratio.fitted",
            "info",
            f"Updates are small (||Δw||/||w|| median {median:.2g} in {len(names)} weight(s), below {self.too_small:g} "
            f"for {self.patience} measurements) because the training loss fell {_times(drop)}, from {first:.4g} at the "
            f"first measurement to {recent:.3g} (median of the last {self.patience}): the model fits its training "
            "batches and little gradient is left to follow. Not a learning-rate problem.",
            "Nothing to change if you are overfitting a batch on purpose or training to convergence; otherwise compare "
            "with the validation loss (LossCurveMonitor's overfitting check) and stop early or regularise.",
            {"parameters": names, "median_ratio": round_significant(median), "first_loss": first,
             "recent_loss": recent, "loss_drop": round_significant(drop)},
            step=snapshot.step + 1,
        )  # fmt: skip

    def _report_decayed(self, trainer: pl.Trainer, snapshot: _Snapshot, names: list[str]) -> None:
        """Updates too small only since the LR fell 3x or more below its peak. A ReduceLROnPlateau decay reacted to
        its metric: an info. A schedule: a warning while most of the run lies ahead (it decays too early), nothing
        near its end (cosine or linear decay to 0 does this on purpose); when the run's length is not known yet,
        judged at its end."""
        index = self._optimizer_of.get(names[0], snapshot.index)
        if _reduces_on_plateau(trainer, index):
            self._report_plateau(trainer, snapshot, names)
            return
        progress = _progress(trainer, snapshot.step)
        if progress is not None and progress >= _EARLY:
            return
        for name in names:
            self._flagged.add(f"too_small:{name}")
        numbers = self._decay_numbers(snapshot, names)
        if progress is None:  # the run's length is open (EarlyStopping, max_epochs=-1): judged when it ends
            if self._pending_decay is None:
                self._pending_decay = numbers
            return
        self._warn_decayed(trainer, numbers, progress, f"{100 * progress:.0f}% into training")

    def _decay_numbers(self, snapshot: _Snapshot, names: list[str]) -> dict[str, Any]:
        lr_of = dict(zip(snapshot.names, snapshot.lrs))
        lr = statistics.median(lr_of[n] for n in names)
        return {
            "step": snapshot.step,
            "parameters": names,
            "lr": lr,
            "peak_lr": statistics.median(self._peak_lr.get(n, lr_of[n]) for n in names),
            "median_ratio": round_significant(statistics.median(self._small_median(n) for n in names)),
            "median_ratio_at_peak": round_significant(
                statistics.median(self._small_median(n, at_peak=True) for n in names)
            ),
            "shown": {n: round_significant(self._small_median(n), 2) for n in names[:10]},
        }

    def _judge_pending_decay(self, trainer: pl.Trainer) -> None:
        """The run ended: a decay found while its length was open is judged against the steps it ran."""
        numbers, self._pending_decay = self._pending_decay, None
        total = int(trainer.global_step)
        if numbers is None or total <= 0:
            return
        progress = min(numbers["step"] / total, 1.0)
        if progress < _EARLY:
            where = f"{100 * progress:.0f}% into training (the run stopped at step {total}; its length was open)"
            self._warn_decayed(trainer, numbers, progress, where)

    def _warn_decayed(self, trainer: pl.Trainer, numbers: dict[str, Any], progress: float, where: str) -> None:
        lr, peak, names = numbers["lr"], numbers["peak_lr"], numbers["parameters"]
        median, at_peak = numbers["median_ratio"], numbers["median_ratio_at_peak"]
        self.report(
            trainer,
            "update_ratio.lr_decayed_early",
            "warning",
            f"The learning-rate schedule lowered the LR {_times(peak / lr)} (from {peak:.3g} to {lr:.3g}) by step "
            f"{numbers['step']}, {where}: updates fell to ||Δw||/||w|| {median:.2g} in {len(names)} weight(s), below "
            f"{self.too_small:g} for {self.patience} measurements (~{at_peak:.2g} at the peak LR; expected ~1e-3): "
            f"the rest of the run learns little. {numbers['shown']}",
            "Decay later or less: end the schedule at the run's last step (e.g. CosineAnnealingLR's T_max = "
            "max_steps), a decay factor closer to 1, or a floor (eta_min) around the peak LR / 10. Check the "
            "scheduler's interval too: an epoch-sized schedule (StepLR(step_size=30)) stepped every batch "
            "(interval='step') decays an epoch's worth per step (checklist: do not trust learning rate decay "
            "defaults).",
            {"parameters": names, "lr": lr, "peak_lr": peak, "progress": round(progress, 3),
             "median_ratio": median, "median_ratio_at_peak": at_peak},
            step=numbers["step"] + 1,
        )  # fmt: skip

    def _report_plateau(self, trainer: pl.Trainer, snapshot: _Snapshot, names: list[str]) -> None:
        for name in names:
            self._flagged.add(f"too_small:{name}")
        if "lr_reduced_on_plateau" in self._flagged:
            return
        self._flagged.add("lr_reduced_on_plateau")
        numbers = self._decay_numbers(snapshot, names)
        lr, peak = numbers["lr"], numbers["peak_lr"]
        median, at_peak = numbers["median_ratio"], numbers["median_ratio_at_peak"]
        self.report(
            trainer,
            "update_ratio.lr_reduced_on_plateau",
            "info",
            f"ReduceLROnPlateau lowered the LR {_times(peak / lr)} (from {peak:.3g} to {lr:.3g}) by step "
            f"{snapshot.step} (epoch {trainer.current_epoch}) after its monitored metric stopped improving: updates "
            f"fell to ||Δw||/||w|| {median:.2g} in {len(names)} weight(s), below {self.too_small:g} for "
            f"{self.patience} measurements (~{at_peak:.2g} at the peak LR, where ~1e-3 is expected). A reaction to "
            f"the plateau, not a schedule fixed in advance. {numbers['shown']}",
            "Nothing to change if the monitored metric improves again at the lower LR. If it does not, the run has "
            "converged: stop it (EarlyStopping on the same metric) rather than reducing further; if reductions "
            "come while the training loss still falls, raise the scheduler's patience or threshold.",
            {"parameters": names, "lr": lr, "peak_lr": peak, "median_ratio": median,
             "median_ratio_at_peak": at_peak, "epoch": trainer.current_epoch},
            step=snapshot.step + 1,
        )  # fmt: skip

    def _report_all_frozen(self, trainer: pl.Trainer, snapshot: _Snapshot) -> None:
        if "frozen:*" in self._flagged:
            return
        self._flagged.add("frozen:*")
        distinct = sorted(set(snapshot.lrs), key=snapshot.lrs.index)
        lrs = distinct if len(distinct) > 1 else distinct[:1]
        lrs_text = ", ".join(f"{v:g}" for v in lrs)
        self.report(
            trainer,
            "update_ratio.frozen",
            "warning",
            f"No parameter changed in {self._unchanged_run} measured optimizer steps in a row although gradients "
            f"were finite (update ratio exactly 0 everywhere; expected ~1e-3). Learning rate now: {lrs_text}.",
            "Check the learning rate (lr=0, a scheduler that decays to 0) and whether something skips every step "
            "(NaNGuard, a GradScaler whose scale collapsed).",
            {"unchanged_steps": self._unchanged_run, "lr": lrs[0] if len(lrs) == 1 else None, "lrs": lrs},
            step=snapshot.step + 1,
        )

    def _judge_rounding(self, trainer: pl.Trainer, index: int, snapshot: _Snapshot, fraction: float) -> None:
        """Low-precision weights of optimizer ``index``: how many of the elements that had a gradient the step left
        exactly as they were (an update below half a unit in the last place of the weight rounds away; with float32
        weights ~0). Each optimizer has its own history: their learning rates and weights differ."""
        assert snapshot.low is not None
        history = self._rounded.setdefault(index, deque(maxlen=self.patience))
        history.append(fraction)
        suffix = f"_opt{index}" if index else ""
        self.log_scalars(trainer, {f"update_ratio/rounded_away{suffix}": fraction}, step=snapshot.step)
        flag = f"rounded_away{suffix}"
        if len(history) < self.patience or flag in self._flagged:
            return
        median = statistics.median(history)
        if median < _ROUNDED_AWAY:
            return
        self._flagged.add(flag)
        low = [snapshot.params[i] for i in snapshot.low]
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in low})
        bits = min(SIGNIFICANT_BITS[p.dtype] for p in low)
        low_names = [snapshot.names[i] for i in snapshot.low]
        whose = f"optimizer {index}'s " if len(trainer.optimizers) > 1 else ""
        self.report(
            trainer,
            "update_ratio.rounded_away",
            "info",
            f"The optimizer step left {100 * median:.0f}% of the elements of {whose}{' and '.join(dtypes)} weights "
            f"that had a non-zero gradient exactly unchanged (median of {self.patience} measured steps; ~0% with "
            f"float32 weights): {' and '.join(dtypes)} keeps {bits} significant bits, so an update smaller than "
            f"2^-{bits + 1} to 2^-{bits} ({100 * 2.0 ** -(bits + 1):.2g}-{100 * 2.0**-bits:.2g}%) of a weight rounds "
            f"away. {len(low_names)} parameter(s), e.g. {low_names[:5]}.",
            "Nothing to change while the loss falls as a float32 run's would. If training stalls or lags, keep "
            "float32 master weights (precision='bf16-mixed' or '16-mixed' instead of '-true'), use an optimizer "
            "that rounds stochastically or keeps Kahan-compensated bf16 weights, or raise the learning rate.",
            {"median_fraction": round_significant(median), "fractions": [round_significant(f) for f in history],
             "dtypes": dtypes, "parameters": low_names, "optimizer_index": index},
            step=snapshot.step + 1,
        )  # fmt: skip

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        judged = {n: statistics.median(h) for n, h in self._ratios.items() if h}
        out: dict[str, Any] = {"measured_steps": self._measured, "skipped_steps": self.skipped_steps}
        if judged:
            out["median_ratio"] = {n: round_significant(v, 3) for n, v in judged.items()}
        frozen = [n for n, changed in self._changed.items() if not changed]
        if frozen:
            out["never_changed"] = frozen
        return out

    def extra_state(self) -> dict[str, Any]:
        return {
            "optimizer_steps": dict(self._optimizer_steps),
            "ratios": {n: list(h) for n, h in self._ratios.items()},
            "changed": dict(self._changed),
            "valid_measurements": dict(self._valid_measurements),
            "unchanged_run": self._unchanged_run,
            "measured": self._measured,
            "skipped_steps": self.skipped_steps,
            "flagged": sorted(self._flagged),
            "small": {n: [list(m) for m in h] for n, h in self._small.items()},
            "peak_lr": dict(self._peak_lr),
            "last_lr": dict(self._last_lr),
            "first_loss": self._first_loss,
            "recent_losses": list(self._recent_losses),
            "rounded": {str(index): list(history) for index, history in self._rounded.items()},
            "fine_tuning": self._fine_tuning,
            "pending_decay": self._pending_decay,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer_steps = {int(k): int(v) for k, v in state.get("optimizer_steps", {}).items()}
        self._ratios = {
            str(n): deque((float(r) for r in h), maxlen=self.patience) for n, h in state.get("ratios", {}).items()
        }
        self._changed = {str(k): bool(v) for k, v in state.get("changed", {}).items()}
        self._valid_measurements = {str(k): int(v) for k, v in state.get("valid_measurements", {}).items()}
        self._unchanged_run = int(state.get("unchanged_run", 0))
        self._measured = int(state.get("measured", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._flagged = set(state.get("flagged", []))
        self._small = {
            str(n): deque(((float(r), float(scale)) for r, scale in h), maxlen=self.patience)
            for n, h in state.get("small", {}).items()
        }
        self._peak_lr = {str(k): float(v) for k, v in state.get("peak_lr", {}).items()}
        self._last_lr = {str(k): float(v) for k, v in state.get("last_lr", {}).items()}
        first = state.get("first_loss")
        self._first_loss = None if first is None else float(first)
        self._recent_losses = deque((float(v) for v in state.get("recent_losses", [])), maxlen=self.patience)
        self._rounded = {
            int(index): deque((float(v) for v in history), maxlen=self.patience)
            for index, history in state.get("rounded", {}).items()
        }
        self._fine_tuning = bool(state.get("fine_tuning", False))
        pending = state.get("pending_decay")
        self._pending_decay = dict(pending) if pending else None


def _times(factor: float) -> str:
    return f"{factor:,.0f}x" if factor >= 10 else f"{factor:.2g}x"


def _progress(trainer: pl.Trainer, step: int) -> float | None:
    """How far into training ``step`` is (0 to 1), or None when the run's length is not known in advance (with
    EarlyStopping ``max_epochs`` only bounds it)."""
    if any(isinstance(callback, EarlyStopping) for callback in trainer.callbacks):  # type: ignore[attr-defined]
        return None
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # a run whose length Lightning cannot tell (e.g. an iterable dataset without max_steps)
        return None
    if not math.isfinite(total) or total <= 0:
        return None
    return min(step / total, 1.0)


def _reduces_on_plateau(trainer: pl.Trainer, index: int) -> bool:
    """Whether optimizer ``index``'s LR is lowered by a ReduceLROnPlateau scheduler (Lightning's reduce_on_plateau)."""
    optimizers = trainer.optimizers
    if not 0 <= index < len(optimizers):
        return False
    optimizer = optimizers[index]
    return any(
        config.reduce_on_plateau and getattr(config.scheduler, "optimizer", None) is optimizer
        for config in trainer.lr_scheduler_configs
    )


def _rounding_counts(params: list[nn.Parameter], deltas: list[Tensor], low: list[int]) -> Tensor | None:
    """``[elements with a non-zero gradient, those of them unchanged by the step]`` over the parameters ``low``
    (``deltas`` hold before - after, exactly 0 where the step changed nothing); None when none of them has a
    dense gradient."""
    with_grad, unchanged = [], []
    for i in low:
        grad = params[i].grad
        if grad is None or grad.is_sparse or grad.shape != deltas[i].shape:
            continue
        nonzero = grad != 0
        with_grad.append(nonzero.sum())
        unchanged.append((nonzero & (deltas[i] == 0)).sum())
    if not with_grad:
        return None
    return torch.stack([torch.stack(with_grad).sum(), torch.stack(unchanged).sum()]).double()


def _param_lrs(optimizer: Optimizer, params: list[nn.Parameter]) -> list[float]:
    """Each parameter's learning rate: that of the first param group holding it (NaN if none)."""
    lr_by_id: dict[int, float] = {}
    for group in optimizer.param_groups:
        lr = group.get("lr", float("nan"))
        value = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        for param in group["params"]:
            lr_by_id.setdefault(id(param), value)
    return [lr_by_id.get(id(p), float("nan")) for p in params]
