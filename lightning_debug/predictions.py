"""PredictionDynamicsLogger: watch the predictions on a fixed batch move during training."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_debug.base import DiagnosticCallback, trained_at_start
from lightning_debug.batches import ForwardSignature, target_index
from lightning_debug.isolation import OneShotLoader, isolated, one_shot, probe_loader

Task = Literal["auto", "classification", "regression", "summary"]
Source = Literal["auto", "val", "train"]
TASKS: tuple[str, ...] = ("auto", "classification", "regression", "summary")
SOURCES: tuple[str, ...] = ("auto", "val", "train")
FIXED_BATCH_FILE = "fixed_batch.pt"
# Strategies whose forward needs every rank (parameters sharded): a rank-0-only forward would hang.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
# When the run's length is unknown (infinite epochs), "late" starts after this many logs.
_LATE_LOGS_WHEN_UNBOUNDED = 20
_EPS = 1e-12
# Net change over the patience window / path length below which jitter counts as oscillation.
_OSCILLATING_PROGRESS = 0.5
# Stuck predictions are an info when the first log's loss was at most this fraction of the best constant predictor's
# (the class entropy of the labels; the targets' variance): an untrained model does not beat a constant.
_FIT_AT_START = 0.5
# Collapse and stuck are never judged before this many optimizer steps (AMP's GradScaler skips the first ones).
_MIN_WARMUP_STEPS = 50
# The images show at most this many rows (examples) and class columns: readable, and cheap to encode.
IMAGE_MAX_ROWS = 64
IMAGE_MAX_CLASSES = 64


class PredictionDynamicsLogger(DiagnosticCallback):
    r"""Checklist item "visualize prediction dynamics": the predictions on one fixed batch, logged as training goes.

    Once, when training starts, it picks a fixed batch: ``num_examples`` examples evenly spaced across the
    validation set (the training set when there is no validation loader, or ``source="train"``; the first batch
    of an iterable dataset), or the ``fixed_batch`` you pass. Evenly spaced and independent of shuffling, so a
    dataset sorted by class (ImageFolder) still gives several classes. The same examples are used for the whole
    run; they are saved to ``<log_dir>/lightning-debug/fixed_batch.pt`` and travel in the checkpoint, so a resumed
    run keeps them. Only a batch of tuples, lists and dicts of tensors travels in the checkpoint (what
    ``torch.load(..., weights_only=True)`` reads); one holding other classes (NamedTuples, Mapping classes, a
    dataclass) is picked again on resume: the same examples when the dataset is the same.

    Every ``every_n_steps`` optimizer steps (and once before the first step) it runs the model on that
    batch: in eval mode, without gradients, under the trainer's precision context, on the underlying
    LightningModule (not the DDP wrapper). Training is left bit-identical: the global RNG, the loaders'
    generators, BatchNorm running statistics, train/eval flags and ``self.log`` are restored. Under DDP
    only rank 0 evaluates, with no collective the other ranks would wait on; **its findings and logs live
    on rank 0** (the other ranks' ``.findings`` stay empty). Sharded strategies (FSDP, DeepSpeed) need
    every rank for a forward pass, so there the logger is a no-op with a ``predictions.not_measured`` info.

    The task decides what is shown (``task="auto"`` picks it from the first output and target):

    ==================  ======================================================  ================================
    task                recognised when                                         treated as
    ==================  ======================================================  ================================
    ``classification``  output ``(N, C)``, C >= 2, integer targets ``(N,)``;    logits (softmax); a single logit
                        or output ``(N,)``/``(N, 1)`` with 0/1 targets          is binary (sigmoid)
                        (integers, or floats all exactly 0 or 1, as
                        ``BCEWithLogitsLoss`` takes them);
                        or per position (sequences, dense prediction):          each position is an example
                        integer targets ``(N, T, ...)`` with output ``(N * T,   (labels < 0, e.g. -100 padding,
                        C)``, ``(N, C, T, ...)`` or ``(N, T, ..., C)``          and ``ignore_index`` are left
                                                                                out; at most 512 positions)
    ``regression``      floating targets with as many elements as the output    predictions vs targets
                        (soft labels between 0 and 1 included: they cannot be
                        told from a regression onto [0, 1])
    ``summary``         anything else (or no target)                            summary statistics of the output
    ==================  ======================================================  ================================

    If your model returns probabilities, pass ``output_transform=lambda p: p.log()`` (softmax of log p is p).

    Definitions, between two consecutive logs :math:`t-1, t`, averaged over the N examples:

    - **jitter**: classification: the total-variation distance :math:`\tfrac12\sum_c |p_t(c) - p_{t-1}(c)|`
      between the class-probability vectors (0: no change, 1: all mass moved); regression: :math:`|\hat y_t -
      \hat y_{t-1}| / \sigma_y` with :math:`\sigma_y` the std of the fixed batch's targets; summary:
      :math:`\mathrm{mean}|\hat y_t - \hat y_{t-1}| / \mathrm{mean}|\hat y_{t-1}|`.
    - **movement**: the same distance between the current log and the first one (how far the predictions
      have travelled from where they started).
    - **flips**: the number of examples whose predicted class (argmax) changed since the previous log.

    TensorBoard tags (step = global step):

    ==========================================  =================================================================
    tag                                         meaning
    ==========================================  =================================================================
    ``predictions/loss``                        cross-entropy (classification) or MSE (regression) on the batch
    ``predictions/accuracy``                    fraction of the batch classified correctly
    ``predictions/jitter``                      normalised change since the previous log (definition above)
    ``predictions/movement``                    normalised change since the first log
    ``predictions/flips``                       examples whose predicted class changed since the previous log
    ``predictions/output_{mean,std,min,max}``   summary statistics of the output (summary task)
    ``predictions/probabilities`` (image)       rows: examples; columns: classes; colour: probability (viridis);
                                                framed: the true class; left strip green/red: right/wrong.
                                                At most 64 rows (the first examples) and 64 classes (beyond 64:
                                                the shown rows' true classes, then the most probable, in class
                                                order)
    ``predictions/trajectory`` (image)          rows: examples (at most 64); columns: logs, oldest left;
                                                classification: the
                                                true-class probability (the top probability without targets);
                                                regression: (prediction - target) / sigma_y, blue < 0 < red
    ``predictions/vs_target`` (image)           regression: prediction (y axis) against target (x axis); the
                                                diagonal is a perfect fit
    ``predictions/outputs`` (histogram)         the raw output values (summary task)
    ==========================================  =================================================================

    The scalars are logged at every evaluation; the images and the summary histogram (PNG encoding and binning
    are the costly part) at the first one, every ``images_every_n_logs``-th one and the last one of the run, since
    TensorBoard shows only a sample of an image tag's steps anyway and the trajectory image holds the whole
    history.

    Findings (judged on rank 0, each reported once per episode):

    - ``predictions.collapsed`` (warning): after the warm-up, on ``patience`` consecutive logs at least
      ``collapse_fraction`` of the batch is predicted as one class *and* at least ``collapse_fraction`` of the
      examples labelled otherwise are predicted as that class: the model predicts the same class for
      everything, whatever the labels (needs targets and at least 2 examples of other classes).
    - ``predictions.jitter`` (warning): late in training (after ``late_fraction`` of the run's optimizer steps,
      or after 20 logs when the run's length is unknown) the jitter stays above ``jitter_threshold`` on
      ``patience`` consecutive logs *and* the moves cancel out: the net change over those logs is less than
      half the path travelled (a model still learning fast moves a lot, but in one direction). The learning
      rate is too high or training is unstable.
    - ``predictions.stuck`` (warning): after the warm-up, the movement since the first log stays below
      ``stuck_threshold`` on ``patience`` consecutive logs: the predictions have not left their initial values
      (learning rate far too low, or the parameters are not being updated). An **info** instead when the weights
      were trained at the start: InitLossCallback in the run reported ``init_loss.trained``, or the first log
      already fit the targets, its loss at most half the best constant predictor's on the fixed batch (the
      entropy of its labels; the variance of its targets), which untrained weights do not reach. Predictions that
      are already right need not move (fine-tuning, loaded weights).
    - ``predictions.single_class_batch`` (info): the fixed batch's labels leave fewer than 2 examples outside
      the commonest class (a one-class validation set): collapse onto that class cannot be judged, and the
      accuracy measures that class only; pass a ``fixed_batch`` of several classes.
    - ``predictions.not_measured`` (info): no fixed batch could be found or used; the logger is a no-op.
    - ``predictions.fallback`` (info): the output does not fit the requested ``task``; summary statistics
      are logged instead.

    The warm-up (``warmup_steps``) defaults to 10% of the run's optimizer steps and at least 50 (10 logs, at
    least 50 steps, when the run's length is unknown): early predictions are often one class, and a 16-mixed
    GradScaler skips its first steps while it calibrates. The initial model is never judged.

    Args:
        num_examples: how many examples the fixed batch holds (evenly spaced across the chosen dataset, at most
            one batch of its loader, so an evaluation costs at most one forward pass of a batch); default 16.
        every_n_steps: evaluate every this many optimizer steps; ``None``: every ``2 * Trainer(log_every_n_steps)``
            steps (100 at Lightning's default).
        task: ``"auto"``, ``"classification"``, ``"regression"`` or ``"summary"`` (see the table above).
        source: where the fixed batch comes from: ``"auto"`` (validation, else training), ``"val"`` or ``"train"``.
        fixed_batch: a batch to use instead, in the structure ``batch_fn`` expects (default ``(inputs, targets)``
            or an inputs tensor); used in full, ``num_examples`` and ``source`` are then ignored.
        batch_fn: splits a batch into ``(inputs, targets or None)``. The model is called as ``module(*inputs)``
            when the inputs are a tuple/list and ``forward`` takes that many positional parameters (2 or more),
            ``module(**inputs)`` when they are a dict whose keys are ``forward``'s parameter names (its required ones
            included), else ``module(inputs)``. Default: ``(batch[0], batch[1])`` for a tuple/list of 2 or more
            (``(inputs, target, ...)``: sample weights, an index or lengths after the target; ``(batch[:-1],
            batch[-1])`` when ``forward`` requires 2 or more positional arguments and takes ``len(batch) - 1``),
            ``(batch, None)`` for a tensor.
        output_transform: maps the model's output to one tensor (e.g. ``lambda out: out["logits"]``); required
            when the output is not a tensor.
        log_images: log the images and the summary histogram (TensorBoard only); the scalars and findings do not
            depend on it.
        images_every_n_logs: log the images (summary task: the histogram) at every this many evaluations, and at
            the first and the last; default 5.
        max_history: how many logs the trajectory image and ``history`` keep (the most recent ones); default 200.
        collapse_fraction: share of the batch predicted as one class that counts as collapse, in (0.5, 1]; 0.9.
        jitter_threshold: jitter (0..1 for classification) above which late training counts as unstable; 0.2.
        stuck_threshold: movement since the first log below which the predictions count as stuck; 0.01.
        patience: consecutive logs a condition must hold before it is reported; default 3.
        warmup_steps: optimizer steps before collapse and stuck are judged; ``None``: 10% of the run, at least 50.
        late_fraction: fraction of the run's optimizer steps after which jitter is judged, in [0, 1); 0.5.
        ignore_index: sequence/dense outputs: a label to leave out besides the negative ones (e.g. 255, the
            "void" label of segmentation datasets); None: only negative labels are left out.

    Raises:
        ValueError: for an argument out of range; the message names it and the accepted values.

    Example::

        from lightning_debug.predictions import PredictionDynamicsLogger

        trainer = Trainer(callbacks=[PredictionDynamicsLogger(num_examples=16, every_n_steps=20)])
        trainer.fit(model, datamodule)  # then: tensorboard --logdir lightning_logs, tags predictions/*
    """

    def __init__(
        self,
        num_examples: int = 16,
        every_n_steps: int | None = None,
        *,
        task: Task = "auto",
        source: Source = "auto",
        fixed_batch: Any = None,
        batch_fn: Callable[[Any], tuple[Any, Tensor | None]] | None = None,
        output_transform: Callable[[Any], Tensor] | None = None,
        log_images: bool = True,
        images_every_n_logs: int = 5,
        max_history: int = 200,
        collapse_fraction: float = 0.9,
        jitter_threshold: float = 0.2,
        stuck_threshold: float = 0.01,
        patience: int = 3,
        warmup_steps: int | None = None,
        late_fraction: float = 0.5,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        _validate(
            num_examples, task, source, batch_fn, output_transform, max_history, collapse_fraction,
            jitter_threshold, stuck_threshold, patience, warmup_steps, late_fraction, images_every_n_logs,
            ignore_index,
        )  # fmt: skip
        self.num_examples = num_examples
        self.task = task
        self.source = source
        self.batch_fn = batch_fn
        self.output_transform = output_transform
        self.log_images = log_images
        self.images_every_n_logs = images_every_n_logs
        self.max_history = max_history
        self.collapse_fraction = collapse_fraction
        self.jitter_threshold = jitter_threshold
        self.stuck_threshold = stuck_threshold
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.late_fraction = late_fraction
        self.ignore_index = ignore_index

        self.fixed_batch: Any = fixed_batch
        self.fixed_batch_source: str | None = "argument" if fixed_batch is not None else None
        self.resolved_task: str | None = None
        self.steps: list[int] = []
        self.history: dict[str, list[float]] = {}
        self.trajectory: list[list[float]] = []
        self._first: Tensor | None = None
        self._previous: Tensor | None = None
        self._recent: list[Tensor] = []  # the last patience + 1 logs' predictions, for the net progress
        self._target_scale: float = 1.0
        self._streaks: dict[str, int] = {}
        self._disabled = False
        self._device_batch: Any = None
        self._warmup_step = 0
        self._start_fit: dict[str, float] | None = None  # the first log's loss and the best constant predictor's
        self._fine_tuning = False  # InitLossCallback found trained weights at fit start (init_loss.trained)
        self._late_step: int | None = None
        self._evaluations = 0  # evaluations so far, including before a resume (images cadence)
        self._unlogged_images: Callable[[], None] | None = None  # the last evaluation's images, if not logged
        self._layout: str | None = None  # sequence/dense outputs: how classes sit in the output (_dense_layout)
        self._positions: Tensor | None = None  # ... and which flattened positions are measured (host)
        self._device_positions: Tensor | None = None  # the same on the output's device

    # ------------------------------------------------------------------ hooks
    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_end",)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Computed on every rank (outside any rank-0 branch): the property may touch the data connector.
        total = float(trainer.estimated_stepping_batches)
        interval = self.measure_interval(trainer)
        known = math.isfinite(total) and total > 0
        self._late_step = max(1, math.ceil(self.late_fraction * total)) if known else None
        if self.warmup_steps is not None:
            self._warmup_step = max(1, self.warmup_steps)
        else:
            self._warmup_step = max(_MIN_WARMUP_STEPS, math.ceil(0.1 * total) if known else 10 * interval)
        if type(trainer.strategy).__name__ in _SHARDED_STRATEGIES:
            self._disable(
                trainer,
                f"{type(trainer.strategy).__name__} shards the parameters: a forward pass on rank 0 alone would hang.",
                "Use DDP for runs you want prediction dynamics of, or evaluate a fixed batch in validation_step.",
            )
            return
        if not trainer.is_global_zero or self._disabled:
            return
        if self.fixed_batch is None:
            self.fixed_batch, self.fixed_batch_source = self._choose_fixed_batch(trainer, pl_module)
            if self.fixed_batch is None:
                self._disable(
                    trainer, "There is no validation or training DataLoader to take a fixed batch from (a loader whose "
                    "dataset is its own one-shot iterator is not read: its examples would be lost to training).",
                    "Pass fixed_batch=(inputs, targets) to PredictionDynamicsLogger.",
                )  # fmt: skip
                return
        self._save_fixed_batch()
        if self.log_images and self.tensorboard(trainer) is not None:
            with contextlib.suppress(ImportError):  # the image encoder's first import (~10 ms): at start, not mid-run
                import PIL.Image  # noqa: F401
        if not self.steps:
            self._evaluate(trainer, pl_module)  # the initial model: where the trajectories start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self._disabled or self.fixed_batch is None:
            return
        if not self.is_measured_step(trainer):
            return
        if self.steps and self.steps[-1] == trainer.global_step:
            return  # gradient accumulation: several batches end at the same optimizer step
        self._evaluate(trainer, trainer.lightning_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_images()

    def flush_before_report(self, trainer: pl.Trainer) -> None:
        self._flush_images()  # also when training raised: the last predictions are the interesting ones

    def _flush_images(self) -> None:
        pending, self._unlogged_images = self._unlogged_images, None
        if pending is not None:
            pending()

    def _images(self, trainer: pl.Trainer, step: int, images: dict[str, Callable[[], np.ndarray]]) -> None:
        """Log ``images`` (tag -> renderer) at the images cadence (see :meth:`_visuals`)."""

        def log() -> None:
            for tag, render in images.items():
                self.log_image(trainer, tag, render(), step=step)

        self._visuals(trainer, step, log)

    def _visuals(self, trainer: pl.Trainer, step: int, log: Callable[[], None]) -> None:
        """Run ``log`` (images, a histogram) now when this evaluation is due for them, else keep it pending.

        Pending visuals are always the latest evaluation's: the next evaluation replaces them, and the state they
        are rendered from (``self.trajectory``, the evaluation's own tensors) does not change until then.
        """
        if not self.log_images or self.tensorboard(trainer) is None:
            return
        due = (self._evaluations - 1) % self.images_every_n_logs == 0
        self._unlogged_images = None if due else log
        if due:
            log()

    # ------------------------------------------------------------------ fixed batch
    def _choose_fixed_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, str | None]:
        candidates: list[tuple[str, Any]] = []
        if self.source in ("auto", "val"):
            candidates.append(("val", _first_loader(trainer.val_dataloaders)))
        if self.source in ("auto", "train"):
            candidates.append(("train", _first_loader(trainer.train_dataloader)))
        for name, loader in candidates:
            if loader is None or one_shot(loader):  # a one-shot stream: the examples read would be lost to training
                continue
            # Building samples or an iterator may draw from the global RNG and the loader's generators.
            try:
                with isolated(pl_module, train_mode=pl_module.training, loaders=[loader]):
                    batch = _first_examples(loader, self.num_examples)
            except OneShotLoader:  # a stream that cannot be copied: reading it would take examples from training
                continue
            if batch is not None:
                return _to_cpu(batch), name
        return None, None

    def _save_fixed_batch(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"batch": self.fixed_batch, "source": self.fixed_batch_source}, self.output_dir / FIXED_BATCH_FILE)

    def _split(self, batch: Any, signature: _Signature) -> tuple[Any, Tensor | None] | None:
        if self.batch_fn is not None:
            return self.batch_fn(batch)
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            target = batch[target_index(len(batch), signature)]
            # forward(x1, x2) cannot take batch[0] alone: a batch (x1, x2, y) gives it (x1, x2)
            several = signature.required >= 2 and signature.takes(len(batch) - 1)
            inputs = tuple(batch[:-1]) if several else batch[0]
            return inputs, target if isinstance(target, Tensor) else None
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            return batch[0], None
        return None

    # ------------------------------------------------------------------ measure
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._device_batch is None:
            self._device_batch = move_data_to_device(self.fixed_batch, pl_module.device)
        signature = _Signature(pl_module.forward)
        try:
            split, cpu_split = self._split(self._device_batch, signature), self._split(self.fixed_batch, signature)
        except Exception as err:  # a batch_fn that does not fit the batch: never crash the user's training
            self._disable(
                trainer, f"batch_fn raised {type(err).__name__} on the fixed batch "
                f"({_describe(self.fixed_batch)}): {err}",
                "Pass batch_fn=lambda batch: (inputs, targets) that fits the batch the loader yields.",
            )  # fmt: skip
            return
        if split is None or cpu_split is None:
            self._disable(
                trainer, f"The fixed batch is a {type(self.fixed_batch).__name__}, not (inputs, targets).",
                "Pass batch_fn=lambda batch: (inputs, targets) to PredictionDynamicsLogger.",
            )  # fmt: skip
            return
        inputs, target = split[0], cpu_split[1]  # the targets are read from the host copy: no transfer
        inputs = trainer.precision_plugin.convert_input(inputs)
        try:
            with isolated(pl_module, train_mode=False), trainer.precision_plugin.forward_context():
                output = signature.call(pl_module, inputs)
                if self.output_transform is not None:
                    output = self.output_transform(output)
        except Exception as err:  # rank 0 alone evaluates here: never let the probe crash the user's training
            self._disable(
                trainer, f"Calling the model on the fixed batch ({signature.describe(inputs)}) raised "
                f"{type(err).__name__}: {err}",
                "Pass batch_fn=lambda batch: (inputs, targets) whose inputs fit forward: a tuple/list is passed as "
                "positional arguments when forward takes that many (batch_fn=lambda b: ((b[0], b[1]), b[2]) for "
                "forward(x1, x2)), a dict whose keys are forward's parameter names as keyword arguments, anything "
                "else as forward's one argument; and output_transform when the output is not the prediction tensor.",
            )  # fmt: skip
            return
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.ndim == 0:
            self._disable(
                trainer, f"The model's output is a {_describe(output)}, not a floating tensor with a batch dimension.",
                "Pass output_transform=... that returns the prediction tensor (e.g. lambda out: out['logits']).",
            )  # fmt: skip
            return
        target = None if target is None else target.detach()
        if self.task in ("auto", "classification") and self.resolved_task in (None, "classification"):
            output, target = self._per_position(trainer, output, target)  # on the device: transfer the positions only
        output = output.detach().float().cpu()  # the one host transfer
        if self.resolved_task is None:
            self.resolved_task = self._resolve_task(trainer, output, target)
            if self.resolved_task == "regression" and target is not None:
                self._target_scale = _scale(target.float())
        step = int(trainer.global_step)
        self._evaluations += 1
        if self.resolved_task == "classification":
            self._measure_classification(trainer, step, output, target)
        elif self.resolved_task == "regression":
            self._measure_regression(trainer, step, output, target)
        else:
            self._measure_summary(trainer, step, output)

    def _per_position(self, trainer: pl.Trainer, output: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Sequence and dense outputs as ``(positions, C)`` logits with ``(positions,)`` labels; others unchanged.

        Integer targets with more than one dimension, ``(N, T, ...)`` (``(N, 1)`` too), and logits that hold a
        class score for each of their positions: ``(N * T, C)`` (flattened, as a language model's loss reads them),
        ``(N, C, T, ...)`` (``F.cross_entropy``'s layout) or ``(N, T, ..., C)``; when the last two cannot be told
        apart (T == C) an info finding asks for a flattened output. Positions whose label is negative (-100
        padding) or ``ignore_index`` are left out, and at most ``MAX_POSITIONS`` evenly spaced positions are kept
        (fewer with many classes: each kept position is a row of C probabilities); the choice depends on the fixed
        batch's targets only, so it is the same at every evaluation and after a resume. The positions are picked
        on the output's device, before the transfer.
        """
        if self._layout is None:
            self._layout, self._positions = _dense_layout(output, target, self.ignore_index)
            if self._layout == "ambiguous" and target is not None:
                self.report(
                    trainer, "predictions.fallback", "info",
                    f"The output {tuple(output.shape)} could hold its classes in dimension 1 or in the last one for "
                    f"the targets {tuple(target.shape)}; logging summary statistics of the output instead.",
                    "Pass output_transform=lambda out: out.reshape(-1, out.shape[-1]) (classes last) or "
                    "lambda out: out.movedim(1, -1).reshape(-1, out.shape[1]) (classes in dimension 1).",
                    {"output_shape": list(output.shape), "target_shape": list(target.shape)},
                )  # fmt: skip
        if self._positions is None or target is None:
            return output, target
        if self._layout == "flat":
            rows = output
        elif self._layout == "channels_first":
            rows = output.movedim(1, -1).reshape(-1, output.shape[1])
        else:
            rows = output.reshape(-1, output.shape[-1])
        if self._device_positions is None or self._device_positions.device != rows.device:
            self._device_positions = self._positions.to(rows.device)
        return rows[self._device_positions], target.reshape(-1)[self._positions]

    def _resolve_task(self, trainer: pl.Trainer, output: Tensor, target: Tensor | None) -> str:
        looks_like = _infer_task(output, target)
        if self.task == "auto":
            return looks_like
        fits = {
            "classification": _is_class_output(output, target),
            "regression": target is not None and target.is_floating_point() and target.numel() == output.numel(),
            "summary": True,
        }[self.task]
        if fits:
            return self.task
        self.report(
            trainer, "predictions.fallback", "info",
            f"task={self.task!r}, but the output has shape {tuple(output.shape)} and the target "
            f"{'is missing' if target is None else f'has shape {tuple(target.shape)} ({target.dtype})'}; "
            "logging summary statistics of the output instead.",
            "Pass output_transform/batch_fn so the output is (N, C) logits with (N,) class targets "
            "(classification) or matches a floating target (regression), or task='auto'.",
            {"output_shape": list(output.shape), "target_shape": None if target is None else list(target.shape)},
        )  # fmt: skip
        return "summary"

    def _measure_classification(self, trainer: pl.Trainer, step: int, logits: Tensor, target: Tensor | None) -> None:
        log_probs = _log_probabilities(logits)
        probs = log_probs.exp()
        labels = _class_labels(target, probs.shape)
        predicted = probs.argmax(dim=1)
        metrics: dict[str, float] = {}
        if labels is not None:
            metrics["loss"] = float(-log_probs.gather(1, labels[:, None]).mean())
            metrics["accuracy"] = float((predicted == labels).float().mean())
            trajectory_values = probs.gather(1, labels[:, None])[:, 0]
        else:
            trajectory_values = probs.max(dim=1).values
        metrics.update(self._changes(probs))
        if self._previous is not None:
            metrics["flips"] = float((predicted != self._previous.argmax(dim=1)).sum())
        if self._first is None and labels is not None:  # the run's first log (restored on resume)
            self._check_labels(trainer, labels)
            counts = torch.bincount(labels).double()
            shares = counts[counts > 0] / labels.numel()
            self._start_fit = {"loss": metrics["loss"], "best_constant": float(-(shares * shares.log()).sum())}
        self._record(step, probs, metrics, trajectory_values)
        self.log_scalars(trainer, {f"predictions/{name}": value for name, value in metrics.items()}, step=step)
        self._images(
            trainer, step,
            {
                "predictions/probabilities": lambda: render_probabilities(probs, labels),
                "predictions/trajectory": lambda: render_trajectory(self.trajectory, 0.0, 1.0),
            },
        )  # fmt: skip
        self._judge(trainer, step, metrics, _collapse_stats(predicted, labels, probs.shape[1], self.collapse_fraction))

    def _check_labels(self, trainer: pl.Trainer, labels: Tensor) -> None:
        """An info when the fixed batch's labels leave fewer than 2 examples outside the commonest class."""
        counts = Counter(labels.tolist())
        common, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
        if labels.numel() - count >= 2:
            return
        which = "all" if count == labels.numel() else f"{count} of"
        self.report(
            trainer, "predictions.single_class_batch", "info",
            f"The fixed batch's labels are {which} {labels.numel()} class {common} ({len(counts)} class"
            f"{'es' if len(counts) > 1 else ''} present): a collapse onto class {common} cannot be told from right "
            "predictions (it needs at least 2 examples of other classes), so it is not reported, and "
            f"predictions/accuracy measures class {common} only.",
            "Pass fixed_batch=(inputs, targets) holding several classes to PredictionDynamicsLogger, e.g. "
            "fixed_batch=default_collate([dataset[i] for i in torch.randperm(len(dataset))[:16].tolist()]) "
            "(torch.utils.data.default_collate); check the validation set holds more than one class.",
            {"labels": labels.numel(), "classes": len(counts), "class": common, "count": count},
        )  # fmt: skip

    def _measure_regression(self, trainer: pl.Trainer, step: int, output: Tensor, target: Tensor | None) -> None:
        assert target is not None
        predictions = output.reshape(output.shape[0], -1)
        targets = target.float().reshape(predictions.shape)
        scale = self._target_scale
        metrics = {"loss": float(F.mse_loss(predictions, targets)), **self._changes(predictions)}
        if self._first is None:  # the best constant predicts each output's mean: its MSE is the variance
            best = float(targets.var(dim=0, unbiased=False).mean()) if targets.shape[0] > 1 else 0.0
            self._start_fit = {"loss": metrics["loss"], "best_constant": best}
        error = (predictions - targets) / scale
        if error.shape[1] == 1:
            trajectory_values, low = error[:, 0], -2.0  # signed: over- and undershoot show in colour
        else:
            trajectory_values, low = error.pow(2).mean(dim=1).sqrt(), 0.0
        self._record(step, predictions, metrics, trajectory_values)
        self.log_scalars(trainer, {f"predictions/{name}": value for name, value in metrics.items()}, step=step)
        self._images(
            trainer, step,
            {
                "predictions/vs_target": lambda: render_scatter(targets, predictions),
                "predictions/trajectory": lambda: render_trajectory(self.trajectory, low, 2.0),
            },
        )  # fmt: skip
        self._judge(trainer, step, metrics, None)

    def _measure_summary(self, trainer: pl.Trainer, step: int, output: Tensor) -> None:
        flat = output.reshape(-1)
        finite = flat[torch.isfinite(flat)]
        metrics: dict[str, float] = {}
        if finite.numel():
            metrics.update(
                output_mean=float(finite.mean()),
                output_std=float(finite.std()) if finite.numel() > 1 else 0.0,
                output_min=float(finite.min()),
                output_max=float(finite.max()),
            )
        metrics.update(self._changes(flat))
        self._record(step, flat, metrics, None)
        self.log_scalars(trainer, {f"predictions/{name}": value for name, value in metrics.items()}, step=step)
        if finite.numel():  # a histogram of many values is as costly as an image: the same cadence
            self._visuals(trainer, step, lambda: self.log_histogram(trainer, "predictions/outputs", finite, step=step))
        self._judge(trainer, step, metrics, None)

    def _distance(self, new: Tensor, old: Tensor) -> float:
        """The normalised distance between two logs' predictions (the definition of jitter and movement)."""
        if new.shape != old.shape:
            return math.nan
        if self.resolved_task == "classification":
            return float(0.5 * (new - old).abs().sum(dim=1).mean())  # total variation, 0..1
        if self.resolved_task == "regression":
            return float((new - old).abs().mean() / self._target_scale)
        return float((new - old).abs().mean() / max(float(old.abs().mean()), _EPS))

    def _changes(self, predictions: Tensor) -> dict[str, float]:
        changes: dict[str, float] = {}
        if self._previous is not None:
            changes["jitter"] = self._distance(predictions, self._previous)
        if self._first is not None:
            changes["movement"] = self._distance(predictions, self._first)
        return changes

    def _record(self, step: int, predictions: Tensor, metrics: Mapping[str, float], trajectory: Tensor | None) -> None:
        if self._first is None:
            self._first = predictions.clone()
        self._previous = predictions.clone()
        self._recent = [*self._recent, self._previous][-(self.patience + 1) :]
        self.steps.append(step)
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        if trajectory is not None:
            self.trajectory.append([float(v) for v in trajectory])
        del self.steps[: -self.max_history]
        del self.trajectory[: -self.max_history]
        for values in self.history.values():
            del values[: -self.max_history]

    # ------------------------------------------------------------------ judge
    def _judge(
        self, trainer: pl.Trainer, step: int, metrics: Mapping[str, float], collapse: dict[str, Any] | None
    ) -> None:
        warmed_up = step >= self._warmup_step and step > 0
        late = step >= self._late_step if self._late_step is not None else len(self.steps) >= _LATE_LOGS_WHEN_UNBOUNDED
        jitter, movement = metrics.get("jitter", math.nan), metrics.get("movement", math.nan)
        progress = self._net_progress()
        conditions = {
            "collapsed": warmed_up and collapse is not None and collapse["collapsed"],
            # large changes that cancel out: oscillation, not a model still learning fast
            "jitter": late and step > 0 and jitter > self.jitter_threshold and progress < _OSCILLATING_PROGRESS,
            "stuck": warmed_up and movement < self.stuck_threshold,
        }
        for name, holds in conditions.items():
            self._streaks[name] = self._streaks.get(name, 0) + 1 if holds else 0
            if self._streaks[name] != self.patience:
                continue  # report once per episode, when the condition has held for `patience` logs
            recent = self.history.get(name if name != "stuck" else "movement", [])[-self.patience :]
            if name == "collapsed":
                assert collapse is not None
                self._report_collapse(trainer, metrics, collapse)
            elif name == "jitter":
                self._report_jitter(trainer, recent, metrics, progress)
            else:
                self._report_stuck(trainer, recent, metrics)

    def _net_progress(self) -> float:
        """Distance travelled over the last ``patience`` logs / the path length: 1 moving straight, ~0 oscillating."""
        jitters = self.history.get("jitter", [])[-self.patience :]
        if len(self._recent) < self.patience + 1 or len(jitters) < self.patience:
            return math.nan
        path = sum(jitters)
        return self._distance(self._recent[-1], self._recent[0]) / path if path > 0 else math.nan

    def _report_collapse(self, trainer: pl.Trainer, metrics: Mapping[str, float], collapse: dict[str, Any]) -> None:
        cls, share, label_share = collapse["class"], collapse["predicted_share"], collapse["label_share"]
        accuracy = metrics.get("accuracy", math.nan)
        self.report(
            trainer, "predictions.collapsed", "warning",
            f"The predictions collapsed to class {cls}: {share:.0%} of the fixed batch is predicted as {cls} for "
            f"{self.patience} consecutive logs, while only {label_share:.0%} of its labels are {cls} "
            f"({collapse['absorbed']:.0%} of the other examples are predicted {cls}); accuracy {accuracy:.2f}.",
            "The model predicts the dominant class whatever the input. Check the class balance of the training "
            f"data and weight the loss by inverse class frequency (CrossEntropyLoss(weight=...)) or resample; check "
            f"that the inputs reach the model (an input-independent baseline predicts exactly this); if it "
            f"collapsed after a loss spike, lower the learning rate{self._lr_words(trainer, 1 / 3)}.",
            {**collapse, "accuracy": accuracy, "consecutive_logs": self.patience},
        )  # fmt: skip

    def _report_jitter(
        self, trainer: pl.Trainer, recent: list[float], metrics: Mapping[str, float], progress: float
    ) -> None:
        unit = "of the probability mass" if self.resolved_task == "classification" else "(normalised)"
        flips = metrics.get("flips")
        flip_words = f", {int(flips)} of {self._batch_size()} examples changed class at the last log" if flips else ""
        self.report(
            trainer, "predictions.jitter", "warning",
            f"Late in training the predictions on the fixed batch still jump: jitter {_fmt(recent)} {unit} "
            f"between consecutive logs on {self.patience} logs in a row (threshold {self.jitter_threshold:g})"
            f"{flip_words}, and the moves cancel out: the net change over those logs is {progress:.0%} of the path. "
            "Converging predictions settle.",
            f"The learning rate is too high for this stage: lower it by 3x{self._lr_words(trainer, 1 / 3)}, or "
            "decay it (cosine / step decay), or clip gradients; check for an unstable loss (log of 0, tiny "
            "denominators).",
            {
                "jitter": recent,
                "threshold": self.jitter_threshold,
                "net_progress": progress,
                "flips": flips,
                "lr": _lr(trainer),
            },
        )  # fmt: skip

    def _trained_at_start(self, trainer: pl.Trainer) -> bool:
        """Whether the weights were trained when the fit started (kept: it travels in the checkpoint)."""
        self._fine_tuning = self._fine_tuning or trained_at_start(trainer)
        return self._fine_tuning

    def _fit_at_start(self) -> bool:
        """Whether the first log already fit the targets: its loss at most ``_FIT_AT_START`` x the best constant's."""
        fit = self._start_fit
        return fit is not None and fit["best_constant"] > _EPS and fit["loss"] <= _FIT_AT_START * fit["best_constant"]

    def _report_stuck(self, trainer: pl.Trainer, recent: list[float], metrics: Mapping[str, float]) -> None:
        data = {"movement": recent, "threshold": self.stuck_threshold, "lr": _lr(trainer), "loss": metrics.get("loss")}
        trained, fit = self._trained_at_start(trainer), self._fit_at_start()
        if trained or fit:
            start = self._start_fit or {}
            reasons = ["the weights were trained when the fit started (InitLossCallback: init_loss.trained)"] * trained
            if fit:
                reasons.append(
                    f"the first log already fit the targets: loss {start['loss']:.3g}, against "
                    f"{start['best_constant']:.3g} for the best constant predictor (at most {_FIT_AT_START:g}x it)"
                )
            why = "; and ".join(reasons)
            self.report(
                trainer, "predictions.stuck", "info",
                f"The predictions on the fixed batch hardly move: movement since the first log {_fmt(recent)} on "
                f"{self.patience} logs in a row (threshold {self.stuck_threshold:g}) after {self.steps[-1]} steps, "
                f"but {why}; predictions that are already right need not move (fine-tuning, loaded weights).",
                "Nothing to change while the training and validation loss improve. If they stall, raise the learning "
                f"rate in small steps, 2-3x at a time{self._lr_words(trainer, 2.0)}: a large jump risks erasing what "
                "the trained weights know (catastrophic forgetting).",
                {**data, "start_loss": start.get("loss"), "best_constant": start.get("best_constant")},
            )  # fmt: skip
            return
        self.report(
            trainer, "predictions.stuck", "warning",
            f"The predictions on the fixed batch have not moved: movement since the first log {_fmt(recent)} on "
            f"{self.patience} logs in a row (threshold {self.stuck_threshold:g}) after {self.steps[-1]} steps; "
            "a model that learns moves its predictions.",
            f"Raise the learning rate 10x{self._lr_words(trainer, 10.0)}; check that the optimizer holds the "
            "model's parameters, that they require grad, and that the loss depends on the output.",
            data,
        )  # fmt: skip

    @staticmethod
    def _lr_words(trainer: pl.Trainer, factor: float) -> str:
        lr = _lr(trainer)
        return f" (from {lr:.3g} to {lr * factor:.3g})" if lr is not None else ""

    def _batch_size(self) -> int:
        return int(self._previous.shape[0]) if self._previous is not None else 0

    def _disable(self, trainer: pl.Trainer, why: str, hint: str) -> None:
        self._disabled = True
        self.report(trainer, "predictions.not_measured", "info", f"Prediction dynamics are not logged: {why}", hint)

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        last = {name: values[-1] for name, values in self.history.items() if values}
        return {
            "task": self.resolved_task,
            "fixed_batch": self.fixed_batch_source,
            "examples": self._batch_size(),
            "logs": len(self.steps),
            **{f"last_{name}": value for name, value in last.items()},
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            # only tuples, lists and dicts of tensors load under weights_only=True: others are picked again on resume
            "fixed_batch": self.fixed_batch if _is_plain(self.fixed_batch) else None,
            "fixed_batch_source": self.fixed_batch_source,
            "resolved_task": self.resolved_task,
            "steps": list(self.steps),
            "history": {name: list(values) for name, values in self.history.items()},
            "trajectory": [list(row) for row in self.trajectory],
            "first": self._first,
            "previous": self._previous,
            "recent": list(self._recent),
            "target_scale": self._target_scale,
            "streaks": dict(self._streaks),
            "evaluations": self._evaluations,
            "start_fit": None if self._start_fit is None else dict(self._start_fit),
            "fine_tuning": self._fine_tuning,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("fixed_batch") is not None:
            self.fixed_batch = state["fixed_batch"]
            self.fixed_batch_source = state.get("fixed_batch_source")
            self._device_batch = None
        self.resolved_task = state.get("resolved_task")
        self.steps = [int(s) for s in state.get("steps", [])]
        self.history = {name: [float(v) for v in values] for name, values in state.get("history", {}).items()}
        self.trajectory = [[float(v) for v in row] for row in state.get("trajectory", [])]
        self._first = state.get("first")
        self._previous = state.get("previous")
        self._recent = list(state.get("recent", []))
        self._target_scale = float(state.get("target_scale", 1.0))
        self._streaks = {name: int(count) for name, count in state.get("streaks", {}).items()}
        self._evaluations = int(state.get("evaluations", len(self.steps)))
        start_fit = state.get("start_fit")
        self._start_fit = None if start_fit is None else {name: float(v) for name, v in start_fit.items()}
        self._fine_tuning = bool(state.get("fine_tuning", False))


# ---------------------------------------------------------------------- measurement helpers
class _Signature(ForwardSignature):
    """How the model's ``forward`` takes the inputs: ``module(*inputs)``, ``module(**inputs)`` or ``module(inputs)``."""

    def style(self, inputs: Any) -> str:
        if isinstance(inputs, (tuple, list)) and self.takes(len(inputs)):
            return "positional"
        if isinstance(inputs, Mapping) and inputs and all(isinstance(key, str) for key in inputs):
            if set(inputs) <= self.names and self.required_names <= set(inputs):
                return "keyword"
        return "single"

    def call(self, module: Callable[..., Any], inputs: Any) -> Any:
        style = self.style(inputs)
        if style == "positional":
            return module(*inputs)
        if style == "keyword":
            return module(**inputs)
        return module(inputs)

    def describe(self, inputs: Any) -> str:
        style = self.style(inputs)
        if style == "positional":
            return f"called as module(*inputs) with {len(inputs)} inputs"
        if style == "keyword":
            return f"called as module(**inputs) with {sorted(inputs)}"
        return f"called as module(inputs) with a {_describe(inputs)}"


def _first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader among what the trainer holds (a loader, or a list/dict of them)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        for loader in loaders:
            if isinstance(loader, DataLoader):
                return loader
    return None


def _first_examples(loader: DataLoader, count: int) -> Any:
    """``count`` examples evenly spaced across the loader's dataset, at most one batch of it, collated.

    Map-style datasets: indices ``i * len(dataset) // size`` for ``i < size`` (the first example, then one every
    ``len / size``), independent of shuffling; evenly spaced, so a dataset sorted by class (ImageFolder) gives a
    batch of several classes. Iterable datasets (and loaders that batch themselves): the first batch.
    At most one batch: the evaluation then costs at most one forward pass of a batch every ``every_n_steps`` steps.
    """
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and loader.batch_size is not None and hasattr(dataset, "__len__"):
        length = len(dataset)  # type: ignore[arg-type]
        size = min(count, length, loader.batch_size)
        if size == 0:
            return None
        return loader.collate_fn([dataset[i * length // size] for i in range(size)])
    # Iterable datasets (or loaders that batch themselves): the first batch.
    for batch in probe_loader(loader):
        return _slice(batch, count) if _batch_length(batch) else None
    return None


_PRIMITIVES = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _is_plain(batch: Any) -> bool:
    """Whether ``batch`` is tuples, lists and dicts of tensors and primitives only: what ``torch.load(...,
    weights_only=True)`` reads back (not NamedTuples, Mapping classes, dataclasses or tensor subclasses)."""
    if batch is None or isinstance(batch, _PRIMITIVES):
        return True
    if isinstance(batch, Tensor):
        return type(batch) in (Tensor, torch.nn.Parameter)
    if type(batch) is dict:
        return all(isinstance(key, (str, int)) and _is_plain(value) for key, value in batch.items())
    if type(batch) in (tuple, list):
        return all(_is_plain(value) for value in batch)
    return False


def _batch_length(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        return max((_batch_length(v) for v in batch.values()), default=0)
    if isinstance(batch, (tuple, list)):
        return max((_batch_length(v) for v in batch), default=0)
    return 0


def _concat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor) and first.ndim:
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: _concat([b[key] for b in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    return first


def _slice(batch: Any, count: int) -> Any:
    if isinstance(batch, Tensor) and batch.ndim:
        return batch[:count]
    if isinstance(batch, Mapping):
        return {key: _slice(value, count) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(value, count) for value in batch)
    return batch


def _to_cpu(batch: Any) -> Any:
    return move_data_to_device(batch, torch.device("cpu"))


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"tensor of shape {tuple(output.shape)} and dtype {output.dtype}"
    if isinstance(output, Mapping):
        return f"dict with keys {sorted(map(str, output))}"
    return type(output).__name__


MAX_POSITIONS = 512  # sequence/dense outputs: positions measured per evaluation (evenly spaced)
_POSITION_VALUES = 2**21  # ... and at most this many class scores kept per evaluation (but at least 64 positions)


def _dense_layout(output: Tensor, target: Tensor | None, ignore_index: int | None = None) -> tuple[str, Tensor | None]:
    """Where the class scores of a per-position output sit, and which flattened positions to measure.

    ``("none", None)`` unless the target is an integer tensor of 2 or more dimensions whose every position gets a
    class score from ``output`` (see :meth:`PredictionDynamicsLogger._per_position`) and whose labels, apart from
    the negative ones and ``ignore_index``, are below the number of classes; ``("ambiguous", None)`` when the
    classes could sit in dimension 1 or in the last one.
    """
    if target is None or target.ndim < 2 or target.is_floating_point() or target.is_complex() or output.ndim < 2:
        return "none", None
    size = target.shape
    first = output.ndim == target.ndim + 1 and output.shape[0] == size[0] and output.shape[2:] == size[1:]
    last = output.ndim == target.ndim + 1 and output.shape[:-1] == size
    if output.ndim == 2 and output.shape[0] == target.numel():
        layout, classes = "flat", output.shape[1]
    elif first and last:  # (N, T, T) logits for (N, T) targets: T classes in dimension 1 or in the last
        return "ambiguous", None
    elif first:
        layout, classes = "channels_first", output.shape[1]
    elif last:
        layout, classes = "channels_last", output.shape[-1]
    else:
        return "none", None
    labels = target.reshape(-1).long()
    measured = labels >= 0
    if ignore_index is not None:
        measured &= labels != ignore_index
    if classes < 2 or bool((labels[measured] >= classes).any()):
        return "none", None
    kept = torch.nonzero(measured).reshape(-1)
    if kept.numel() == 0:
        return "none", None
    limit = max(64, min(MAX_POSITIONS, _POSITION_VALUES // classes))
    if kept.numel() > limit:
        kept = kept[torch.linspace(0, kept.numel() - 1, limit).round().long()]
    return layout, kept


def _is_class_output(output: Tensor, target: Tensor | None) -> bool:
    if output.ndim == 2 and output.shape[1] >= 2:
        return True
    binary_shape = output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)
    return binary_shape and (target is None or bool(((target == 0) | (target == 1)).all()))


def _infer_task(output: Tensor, target: Tensor | None) -> str:
    if target is None or target.shape[:1] != output.shape[:1]:
        return "summary"
    integer = not target.is_floating_point() and not target.is_complex()
    if integer and target.ndim == 1 and _is_class_output(output, target):
        return "classification"
    # a single logit with float targets that are all exactly 0 or 1: binary classification (BCEWithLogitsLoss);
    # soft labels (values between 0 and 1) cannot be told from a regression onto [0, 1] and stay regression
    single_logit = output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)
    if single_logit and target.is_floating_point() and target.numel() == output.shape[0]:
        if _is_class_output(output, target):
            return "classification"
    if target.is_floating_point() and target.numel() == output.numel():
        return "regression"
    return "summary"


def _log_probabilities(logits: Tensor) -> Tensor:
    if logits.ndim == 2 and logits.shape[1] >= 2:
        return F.log_softmax(logits, dim=1)
    z = logits.reshape(-1)
    return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)  # binary: classes (0, 1)


def _class_labels(target: Tensor | None, shape: torch.Size) -> Tensor | None:
    """Integer class labels ``(N,)`` from class indices, 0/1 floats or one-hot/soft rows; None if they do not fit."""
    if target is None:
        return None
    if target.is_floating_point() and target.shape == shape:
        return target.argmax(dim=1)
    labels = target.reshape(-1)
    if labels.shape[0] != shape[0]:
        return None
    labels = labels.long()
    if bool(((labels < 0) | (labels >= shape[1])).any()):
        return None
    return labels


def _collapse_stats(
    predicted: Tensor, labels: Tensor | None, num_classes: int, fraction: float
) -> dict[str, Any] | None:
    """The most predicted class, its share of predictions and of labels, and the share of the others it absorbs.

    Counted in Python: at most a few hundred host values, where each small tensor op would cost more than the count.
    """
    if labels is None:
        return None
    guesses, truths = predicted.tolist(), labels.tolist()
    counts = Counter(guesses)
    top = max(counts.values())
    dominant = min(c for c, n in counts.items() if n == top)  # the lowest of tied classes, as argmax picks
    others = [guess for guess, truth in zip(guesses, truths) if truth != dominant]
    if len(others) < 2:
        return None  # (almost) every label is that class: predicting it is right, not a collapse
    predicted_share = top / len(guesses)
    absorbed = others.count(dominant) / len(others)
    return {
        "class": dominant,
        "predicted_share": round(predicted_share, 4),
        "label_share": round((len(truths) - len(others)) / len(truths), 4),
        "absorbed": round(absorbed, 4),
        "collapsed": predicted_share >= fraction and absorbed >= fraction,
    }


def _scale(target: Tensor) -> float:
    finite = target[torch.isfinite(target)]
    if finite.numel() > 1 and float(finite.std()) > _EPS:
        return float(finite.std())
    if finite.numel() and float(finite.abs().mean()) > _EPS:
        return float(finite.abs().mean())
    return 1.0


def _lr(trainer: pl.Trainer) -> float | None:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError, TypeError):
        return None


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


# ---------------------------------------------------------------------- rendering (numpy only)
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]],
    dtype=np.float64,
)  # fmt: skip
_DIVERGING = np.array(
    [[59, 76, 192], [141, 176, 254], [221, 221, 221], [244, 154, 123], [180, 4, 38]], dtype=np.float64
)
_GREEN, _RED, _GREY, _WHITE, _BLACK = (46, 160, 67), (214, 39, 40), (90, 90, 90), (255, 255, 255), (0, 0, 0)


def colormap(values: np.ndarray, low: float, high: float, colors: np.ndarray = _VIRIDIS) -> np.ndarray:
    """Map values to RGB uint8 by linear interpolation between ``colors``; NaN becomes grey."""
    values = np.asarray(values, dtype=np.float64)
    position = np.clip((values - low) / max(high - low, _EPS), 0.0, 1.0) * (len(colors) - 1)
    position = np.nan_to_num(position, nan=0.0)
    lower = np.floor(position).astype(int).clip(0, len(colors) - 2)
    fraction = (position - lower)[..., None]
    rgb = colors[lower] * (1 - fraction) + colors[lower + 1] * fraction
    rgb[~np.isfinite(values)] = _GREY
    return rgb.round().astype(np.uint8)


def upscale(image: np.ndarray, cell_height: int, cell_width: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an ``(H, W, 3)`` image: each pixel becomes a cell."""
    return np.repeat(np.repeat(image, cell_height, axis=0), cell_width, axis=1)


def _cell(count: int, target_pixels: int, smallest: int, largest: int) -> int:
    return int(min(largest, max(smallest, target_pixels // max(count, 1))))


def render_probabilities(
    probs: Tensor, labels: Tensor | None, max_rows: int = IMAGE_MAX_ROWS, max_classes: int = IMAGE_MAX_CLASSES
) -> np.ndarray:
    """Rows: examples; columns: classes; a left strip green (right) / red (wrong); the true class framed.

    At most ``max_rows`` rows (the first) and ``max_classes`` columns: with more classes, the shown rows' true
    classes and then the most probable ones (by their summed probability), kept in class order.
    """
    p = probs.numpy()[:max_rows]
    label_array = labels.numpy()[:max_rows] if labels is not None else None
    correct = p.argmax(axis=1) == label_array if label_array is not None else None
    if p.shape[1] > max_classes:
        ranked = list(dict.fromkeys([*(label_array.tolist() if label_array is not None else []),
                                     *np.argsort(-p.sum(axis=0), kind="stable").tolist()]))  # fmt: skip
        shown = np.sort(np.asarray(ranked[:max_classes], dtype=np.int64))
        if label_array is not None:
            column = {int(c): i for i, c in enumerate(shown)}
            label_array = np.asarray([column.get(int(label), -1) for label in label_array], dtype=np.int64)
        p = p[:, shown]
    rows, classes = p.shape
    ch, cw = _cell(rows, 320, 4, 16), _cell(classes, 320, 2, 24)
    heat = upscale(colormap(p, 0.0, 1.0), ch, cw)
    strip = np.zeros((rows, 1, 3), dtype=np.uint8)
    strip[:] = _GREY
    if label_array is not None and correct is not None:
        strip[correct], strip[~correct] = _GREEN, _RED
        if ch >= 4 and cw >= 4:
            for row, label in enumerate(label_array):
                if label < 0:
                    continue  # a true class beyond the shown columns (more rows' labels than columns)
                top, left = row * ch, int(label) * cw
                frame = _WHITE if p[row, int(label)] < 0.5 else _BLACK  # contrast with the cell's colour
                heat[top, left : left + cw] = heat[top + ch - 1, left : left + cw] = frame
                heat[top : top + ch, left] = heat[top : top + ch, left + cw - 1] = frame
    gap = np.zeros((rows * ch, 2, 3), dtype=np.uint8)
    return np.concatenate([upscale(strip, ch, max(cw, 6)), gap, heat], axis=1)


def render_trajectory(trajectory: Sequence[Sequence[float]], low: float, high: float) -> np.ndarray:
    """Rows: examples (the first ``IMAGE_MAX_ROWS``); columns: logs (oldest left); diverging colours if ``low < 0``."""
    values = np.asarray(trajectory, dtype=np.float64).T[:IMAGE_MAX_ROWS]  # (examples, logs)
    if values.size == 0:
        values = np.zeros((1, 1))
    colors = _DIVERGING if low < 0 else _VIRIDIS
    ch, cw = _cell(values.shape[0], 320, 4, 16), _cell(values.shape[1], 480, 1, 12)
    return upscale(colormap(values, low, high, colors), ch, cw)


def render_scatter(targets: Tensor, predictions: Tensor, size: int = 192) -> np.ndarray:
    """Prediction (y, up) against target (x) on a dark square; the grey diagonal is a perfect fit."""
    x, y = targets.reshape(-1).numpy(), predictions.reshape(-1).numpy()
    keep = np.isfinite(x) & np.isfinite(y)
    image = np.full((size, size, 3), 30, dtype=np.uint8)
    margin = 6
    span = size - 2 * margin - 1
    both = np.concatenate([x[keep], y[keep]]) if keep.any() else np.zeros(1)
    low, high = float(both.min()), float(both.max())
    pad = max(high - low, _EPS) * 0.05
    low, high = low - pad, high + pad

    def pixel(v: np.ndarray) -> np.ndarray:
        return (margin + (v - low) / (high - low) * span).round().astype(int)

    diagonal = np.arange(margin, size - margin)
    image[size - 1 - diagonal, diagonal] = (120, 120, 120)
    px, py = pixel(x[keep]), size - 1 - pixel(y[keep])
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            image[np.clip(py + dy, 0, size - 1), np.clip(px + dx, 0, size - 1)] = (253, 231, 37)
    return image


# ---------------------------------------------------------------------- validation
def _validate(
    num_examples: int,
    task: str,
    source: str,
    batch_fn: Any,
    output_transform: Any,
    max_history: int,
    collapse_fraction: float,
    jitter_threshold: float,
    stuck_threshold: float,
    patience: int,
    warmup_steps: int | None,
    late_fraction: float,
    images_every_n_logs: int,
    ignore_index: int | None,
) -> None:
    positive = (
        ("num_examples", num_examples),
        ("max_history", max_history),
        ("patience", patience),
        ("images_every_n_logs", images_every_n_logs),
    )
    for name, value in positive:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
    for name, fn in (("batch_fn", batch_fn), ("output_transform", output_transform)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be a callable or None, got {fn!r}")
    if not isinstance(collapse_fraction, (int, float)) or not 0.5 < collapse_fraction <= 1:
        raise ValueError(f"`collapse_fraction` must be in (0.5, 1], got {collapse_fraction!r}")
    thresholds: tuple[tuple[str, Any], ...] = (
        ("jitter_threshold", jitter_threshold),
        ("stuck_threshold", stuck_threshold),
    )
    for name, threshold in thresholds:
        if not isinstance(threshold, (int, float)) or not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"`{name}` must be a finite number > 0, got {threshold!r}")
    if warmup_steps is not None and (
        isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
    ):
        raise ValueError(f"`warmup_steps` must be a non-negative integer or None, got {warmup_steps!r}")
    if not isinstance(late_fraction, (int, float)) or not 0 <= late_fraction < 1:
        raise ValueError(f"`late_fraction` must be in [0, 1), got {late_fraction!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"`ignore_index` must be an integer label or None, got {ignore_index!r}")
