"""DataInspector: look at exactly what goes into the network, on the first training batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_debug.base import OneShotCheck
from lightning_debug.batches import ForwardSignature, default_input, target_index
from lightning_debug.distributed import reduce
from lightning_debug.validation import check_float, check_int

BatchFn = Callable[[Any], Tensor | None]

_TARGET_KEYS = ("y", "label", "labels", "target", "targets")
_UNKNOWN_CLASSES = 1024  # label-count bins when num_classes is not given; larger labels are counted apart


class DataInspector(OneShotCheck):
    r"""Checklist item "visualize just before the net": statistics and pictures of the batches the model gets.

    On the first ``num_batches`` training batches it reads the batch Lightning hands to ``training_step``
    (in ``on_train_batch_start``: it draws nothing itself, so no RNG or loader is touched) and accumulates on
    the device, without any host sync:

    - per-feature statistics of the inputs (per channel for ``(N, C, H, W)`` / ``(N, C, D, H, W)``, per last
      dimension for ``(N, F)`` / ``(N, T, F)``): count, mean, std, min, max, non-finite values;
    - the label distribution (integer targets), counted in ``num_classes`` bins (1024 when not given);
    - an exact fingerprint of every example (a hash of its values' bits) for duplicates, and whether
      duplicated inputs carry different labels.

    After the last inspected batch (or at the end of the first epoch, whichever comes first) the statistics
    are reduced across ranks, moved to the host in one transfer, judged, and logged; image-shaped inputs with
    1 or 3 channels are also logged as a grid of the exact tensors fed to the model (rank 0's first batch,
    min-max scaled over the grid so the relative scale stays visible), with their labels as text.

    Thresholds: ``data.wrong_scale`` when the inputs look like raw units: all values ``>= 0`` with a maximum
    above ``max_abs`` (0-255 or 0-16 pixels), or a typical (median) feature std above ``max_abs``.
    ``data.not_centred`` when the typical (median over non-constant features) ``|mean| / std`` exceeds
    ``center_tol``: standardised digits measure 0.03, raw 0-16 digits
    1.07 (CIFAR-like 0-1 pixels, mean 0.47 / std 0.25, would give about 2).
    ``data.class_imbalance`` when the largest class count is ``imbalance_ratio`` times the smallest, judged
    only when the batches hold at least 10 labels per class on average.

    Under DDP each rank inspects its own batches; counts and sums are summed across ranks (duplicates are
    found within a rank). The state survives checkpoint and resume; a resumed run does not inspect again.

    Logged (at the step the inspection ends):

    ===============================  =====================================================================
    tag                              meaning
    ===============================  =====================================================================
    ``data/input_mean``              mean of all input values
    ``data/input_std``               std of all input values
    ``data/input_min``               smallest input value
    ``data/input_max``               largest input value
    ``data/not_centred_fraction``    fraction of non-constant features with ``|mean| > center_tol * std``
    ``data/constant_features``       features (or channels) that never change over the inspected batches
    ``data/duplicate_fraction``      fraction of inspected examples that repeat an earlier one
    ``data/imbalance_ratio``         largest / smallest class count (integer targets only)
    ``data/inputs`` (image)          grid of the first examples exactly as fed to the model
    ``data/input_labels`` (text)     the labels of the grid, row by row, and the value range shown
    ``data/labels`` (text)           the class counts
    ===============================  =====================================================================

    Findings:

    ============================  ========  ==============================================================
    check                         severity  when
    ============================  ========  ==============================================================
    ``data.non_finite``           error     NaN or Inf among the inputs
    ``data.wrong_scale``          warning   raw units (see above); the hint gives the measured mean / std
    ``data.not_centred``          warning   the typical feature's mean is off zero by more than its std
    ``data.class_imbalance``      warning   largest / smallest class count >= ``imbalance_ratio`` (info for
                                            labels per token or pixel: skewed by nature)
    ``data.conflicting_labels``   warning   identical inputs carry different labels
    ``data.duplicates``           warning   more than ``max_duplicate_fraction`` of examples repeat (info
                                            below). When the training sampler draws with replacement
                                            (``WeightedRandomSampler``, ``RandomSampler(replacement=True)``)
                                            the count is compared with the repeats its draws explain
                                            (``data["expected"]``): info, a warning only beyond twice that
                                            plus 10
    ``data.constant_features``    info      some features never change (dead pixels are common)
    ``data.not_inspected``        info      the batch holds no input tensor (pass ``input_fn``), its shape
                                            changes between batches, or its last dimension differs between
                                            ranks (every rank then skips the inspection)
    ============================  ========  ==============================================================

    Args:
        num_batches: how many training batches (per rank) to inspect.
        num_classes: the number of classes of integer targets (default: up to the largest label seen).
        imbalance_ratio: largest / smallest class count that raises ``data.class_imbalance``.
        max_abs: the value above which inputs count as raw units (see above).
        center_tol: the ``|mean| / std`` above which a feature counts as not centred.
        max_duplicate_fraction: fraction of repeated examples above which duplicates are a warning.
        grid_size: how many examples the image grid shows (0 disables it).
        input_fn: maps a batch to the input tensor (default: the batch if a tensor, its first element if a
            tuple/list, or ``x``/``input``/``inputs``/``image(s)``/``input_ids`` of a dict).
        target_fn: maps a batch to integer class labels or None (default: the second element of a tuple/list,
            ``(inputs, target, ...)``, or its last when ``forward`` takes all the others as inputs, or
            ``y``/``label(s)``/``target(s)`` of a dict, when it holds integers).

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import DataInspector

        trainer = Trainer(callbacks=[DataInspector(num_batches=8, num_classes=10)])
        trainer.fit(model, datamodule)   # tensorboard: IMAGES data/inputs, TEXT data/labels
    """

    def __init__(
        self,
        num_batches: int = 8,
        *,
        num_classes: int | None = None,
        imbalance_ratio: float = 10.0,
        max_abs: float = 10.0,
        center_tol: float = 1.0,
        max_duplicate_fraction: float = 0.01,
        grid_size: int = 16,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
    ) -> None:
        super().__init__(every_n_steps=None)
        check_int("num_batches", num_batches, 1)
        if num_classes is not None:
            check_int("num_classes", num_classes, 2)
        check_float("imbalance_ratio", imbalance_ratio, low=1.0)
        check_float("max_abs", max_abs, low=0.0)
        check_float("center_tol", center_tol, low=0.0)
        check_float("max_duplicate_fraction", max_duplicate_fraction, low=0.0, high=1.0)
        check_int("grid_size", grid_size, 0)
        for name, fn in (("input_fn", input_fn), ("target_fn", target_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be a callable batch -> Tensor or None, got {fn!r}")
        self.num_batches = num_batches
        self.num_classes = num_classes
        self.imbalance_ratio = float(imbalance_ratio)
        self.max_abs = float(max_abs)
        self.center_tol = float(center_tol)
        self.max_duplicate_fraction = float(max_duplicate_fraction)
        self.grid_size = grid_size
        self.input_fn = input_fn
        self.target_fn = target_fn
        self._signature: ForwardSignature | None = None  # the model's forward: where the batch's target sits
        self.result: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._batches = 0
        self._sums: Tensor | None = None  # (4, F): finite count, sum, sum of squares, non-finite count
        self._mins: Tensor | None = None
        self._maxs: Tensor | None = None
        self._labels: Tensor | None = None  # class counts, then [negative, overflow]
        self._per_position = False  # labels per token or pixel (targets with a dimension beyond the batch)
        self._fingerprints: list[Tensor] = []
        self._example_labels: list[Tensor] = []
        self._grid: Tensor | None = None
        self._grid_labels: Tensor | None = None
        self._layout = ""
        self._integer_inputs = False
        self._problem: str | None = None
        self._projection: Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_start",)

    def busy(self, step: int) -> bool:
        return self.result is None and self._batches < self.num_batches  # the first batches only

    def next_change(self, step: int) -> int | None:
        return step + 1 if self.busy(step) else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.result is not None or self._batches >= self.num_batches:
            return
        if self._signature is None:
            self._signature = ForwardSignature(pl_module.forward)
        self._accumulate(batch)
        self._batches += 1
        if self._batches >= self.num_batches:
            self._finish(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # an epoch shorter than num_batches: judge now, before the same examples come round again
        if self.result is None and self._batches > 0:
            self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is None and self._batches > 0:
            self._finish(trainer)

    # ------------------------------------------------------------------ accumulate (device only)
    def _accumulate(self, batch: Any) -> None:
        inputs = self.input_fn(batch) if self.input_fn is not None else default_input(batch)
        if not isinstance(inputs, Tensor) or inputs.dim() == 0:
            self._problem = self._problem or f"no input tensor found in the batch ({type(batch).__name__})"
            return
        x = inputs.detach()
        targets = (
            self.target_fn(batch) if self.target_fn is not None else _default_target(batch, len(x), self._signature)
        )
        if isinstance(targets, Tensor) and (targets.is_floating_point() or targets.is_complex()):
            targets = None
        if self._sums is None:
            self._integer_inputs = not (x.is_floating_point() or x.is_complex())
            self._layout = "channel" if x.dim() >= 4 else "feature"
        features = _features(x).double()  # (rows, F)
        if self._sums is not None and features.shape[1] != self._sums.shape[1]:
            self._problem = self._problem or "the input shape changes between batches"
            return
        self._accumulate_moments(features)
        self._accumulate_examples(x, targets)
        self._accumulate_labels(targets)
        if self._grid is None and self.grid_size > 0 and _is_image(x):
            self._grid = x[: self.grid_size].float().clone()
            if isinstance(targets, Tensor) and targets.dim() == 1:
                self._grid_labels = targets[: self.grid_size].clone()

    def _accumulate_moments(self, features: Tensor) -> None:
        finite = torch.isfinite(features)
        values = torch.where(finite, features, torch.zeros_like(features))
        sums = torch.stack([finite.sum(0).double(), values.sum(0), (values * values).sum(0), (~finite).sum(0).double()])
        mins = torch.where(finite, features, torch.full_like(features, math.inf)).amin(0)
        maxs = torch.where(finite, features, torch.full_like(features, -math.inf)).amax(0)
        if self._sums is None or self._mins is None or self._maxs is None:
            self._sums, self._mins, self._maxs = sums, mins, maxs
        else:
            self._sums += sums
            self._mins = torch.minimum(self._mins, mins)
            self._maxs = torch.maximum(self._maxs, maxs)

    def _accumulate_examples(self, x: Tensor, targets: Tensor | None) -> None:
        # exact: a wrapping integer hash of the values' bits (float sums depend on the kernel's order)
        flat = x.reshape(len(x), -1)
        bits = flat.float().view(torch.int32).long() if flat.is_floating_point() else flat.long()
        if self._projection is None or self._projection.shape[0] != bits.shape[1]:
            generator = torch.Generator().manual_seed(0)  # private: the global RNG streams are not touched
            coefficients = torch.randint(1, 2**31 - 1, (bits.shape[1],), generator=generator, dtype=torch.int64)
            self._projection = coefficients.to(bits.device)
        self._fingerprints.append((bits * self._projection).sum(1))
        if isinstance(targets, Tensor) and targets.dim() >= 1 and targets.shape[0] == len(x):
            self._example_labels.append(targets.reshape(len(x), -1)[:, 0].long())

    def _accumulate_labels(self, targets: Tensor | None) -> None:
        if not isinstance(targets, Tensor):
            return
        bins = self.num_classes or _UNKNOWN_CLASSES
        self._per_position = self._per_position or targets.dim() >= 2
        labels = targets.reshape(-1).long()
        counts = torch.zeros(bins + 2, dtype=torch.float64, device=labels.device)
        inside = (labels >= 0) & (labels < bins)
        counts.index_add_(0, labels.clamp(0, bins - 1), inside.double())
        counts[bins] += (labels < 0).sum()
        counts[bins + 1] += (labels >= bins).sum()
        self._labels = counts if self._labels is None else self._labels + counts

    # ------------------------------------------------------------------ finish: reduce, one transfer, judge
    def _finish(self, trainer: pl.Trainer) -> None:
        device = trainer.strategy.root_device
        width = 0 if self._sums is None else int(self._sums.shape[1])
        # every rank must take part in the collectives with the same shapes: the decision to stop here is taken
        # from reduced values only (the largest and smallest width of all ranks), so every rank takes it
        shape = reduce(
            trainer,
            torch.tensor([float(width), -float(width), float(self._problem is not None)], device=device),
            "max",
        )
        width_max, negative_min, problem_any = (int(v) for v in shape.cpu().tolist())
        width_min = -negative_min
        if problem_any or width_max == 0 or width_min != width_max:
            self.result = {"status": "not_inspected", "batches": self._batches}
            hint = "Pass input_fn (batch -> input tensor) and target_fn (batch -> integer labels)."
            data: dict[str, Any] = {"width_min": width_min, "width_max": width_max}
            if self._problem or problem_any or width_max == 0:
                reason = self._problem or "another rank could not read its batches"
            else:
                reason = (
                    f"the inputs' last dimension differs between ranks ({width_min} on one, {width_max} on another; "
                    "expected the same on every rank), e.g. sequences padded to each batch's longest"
                )
                hint = (
                    "Pad to a fixed length in the collate function (or pass input_fn returning a fixed-width "
                    "tensor) to have the inputs inspected."
                )
            self.report(trainer, "data.not_inspected", "info", f"The inputs were not inspected: {reason}.", hint, data)
            self._release()
            return
        assert self._sums is not None and self._mins is not None and self._maxs is not None
        dup, conflicts, examples = self._duplicates(device)
        bins = (self.num_classes or _UNKNOWN_CLASSES) + 2
        labels = self._labels if self._labels is not None else torch.full((bins,), -1.0, dtype=torch.float64)
        summed = reduce(
            trainer,
            torch.cat([self._sums.reshape(-1), labels.to(device).double(), torch.stack([dup, conflicts, examples])]),
            "sum",
        )
        extremes = reduce(trainer, torch.cat([-self._mins, self._maxs]), "max")
        grid = self._grid.reshape(-1).double() if self._grid is not None else torch.zeros(0, device=device)
        grid_labels = self._grid_labels.double() if self._grid_labels is not None else torch.zeros(0, device=device)
        host = torch.cat([summed, extremes.to(device), grid.to(device), grid_labels.to(device)]).cpu().numpy()
        stats = self._unpack(host, width, bins, trainer.world_size)
        self.result = self._judge(trainer, stats)
        self._log(trainer, stats)
        self._release()

    def _duplicates(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        fingerprints = torch.cat(self._fingerprints).to(device)
        order = torch.argsort(fingerprints)
        ordered = fingerprints[order]
        same = ordered[1:] == ordered[:-1]
        dup = same.sum().double()
        conflicts = torch.zeros((), dtype=torch.float64, device=device)
        if len(self._example_labels) == len(self._fingerprints) and self._example_labels:
            labels = torch.cat(self._example_labels).to(device)[order]
            conflicts = (same & (labels[1:] != labels[:-1])).sum().double()
        return dup, conflicts, torch.tensor(float(len(fingerprints)), dtype=torch.float64, device=device)

    def _unpack(self, host: np.ndarray, width: int, bins: int, world_size: int) -> dict[str, Any]:
        sums = host[: 4 * width].reshape(4, width)
        offset = 4 * width
        labels = host[offset : offset + bins]
        offset += bins
        dup, conflicts, examples = host[offset : offset + 3]
        offset += 3
        mins, maxs = -host[offset : offset + width], host[offset + width : offset + 2 * width]
        offset += 2 * width
        grid_numel = 0 if self._grid is None else self._grid.numel()
        grid = host[offset : offset + grid_numel].reshape(self._grid.shape) if self._grid is not None else None
        grid_labels = host[offset + grid_numel :].astype(np.int64) if self._grid_labels is not None else None
        count, total, squares, non_finite = sums
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
            var = np.maximum(squares / np.maximum(count, 1) - mean * mean, 0.0)
        n_all = float(count.sum())
        pooled_mean = float(total.sum() / n_all) if n_all else 0.0
        pooled_var = max(float(squares.sum() / n_all) - pooled_mean**2, 0.0) if n_all else 0.0
        has_labels = labels[0] >= 0 if len(labels) else False
        return {
            "mean": mean,
            "std": np.sqrt(var),
            "min": mins,
            "max": maxs,
            "values": n_all,
            "non_finite": float(non_finite.sum()),
            "pooled_mean": pooled_mean,
            "pooled_std": math.sqrt(pooled_var),
            # each rank adds -1 per bin when it saw no labels
            "labels": labels if has_labels else None,
            "duplicates": float(dup),
            "conflicts": float(conflicts),
            "examples": float(examples),
            "grid": grid,
            "grid_labels": grid_labels,
        }

    # ------------------------------------------------------------------ judge
    def _judge(self, trainer: pl.Trainer, stats: dict[str, Any]) -> dict[str, Any]:
        mean, std, mins, maxs = stats["mean"], stats["std"], stats["min"], stats["max"]
        finite_min = float(np.min(mins)) if np.isfinite(mins).any() else math.nan
        finite_max = float(np.max(maxs)) if np.isfinite(maxs).any() else math.nan
        constant = mins == maxs  # exact: std from sums of squares is not (cancellation)
        varying = ~constant
        ratio = np.abs(mean[varying]) / std[varying]
        median_ratio = float(np.median(ratio)) if ratio.size else 0.0
        median_std = float(np.median(std[varying])) if ratio.size else 0.0
        result: dict[str, Any] = {
            "status": "ok",
            "batches": self._batches,
            "layout": self._layout,
            "input_mean": stats["pooled_mean"],
            "input_std": stats["pooled_std"],
            "input_min": finite_min,
            "input_max": finite_max,
            "median_mean_over_std": median_ratio,
            "not_centred_fraction": float((ratio > self.center_tol).mean()) if ratio.size else 0.0,
            "constant_features": int(constant.sum()),
            "features": len(mean),
            "examples": int(stats["examples"]),
            "duplicates": int(stats["duplicates"]),
            "duplicate_fraction": stats["duplicates"] / max(stats["examples"], 1.0),
        }
        if stats["non_finite"] > 0:
            self.report(
                trainer,
                "data.non_finite",
                "error",
                f"{int(stats['non_finite'])} of {int(stats['values'] + stats['non_finite'])} input values in the "
                f"first {self._batches} batches are NaN or Inf.",
                "Find where they come from (missing values, log(0), division by a zero std in normalisation) and "
                "fix or drop them before the model: torch.nan_to_num is a stopgap, not a fix.",
                {"non_finite": int(stats["non_finite"])},
            )
        if not self._integer_inputs:
            self._judge_scale(trainer, stats, result, median_std)
        self._judge_labels(trainer, stats, result)
        self._judge_duplicates(trainer, stats, result)
        if result["constant_features"] and not self._integer_inputs:
            idx = np.flatnonzero(constant)
            self.report(
                trainer,
                "data.constant_features",
                "info",
                f"{len(idx)} of {len(mean)} input features never change over the first {self._batches} batches "
                f"(e.g. feature(s) {', '.join(map(str, idx[:8].tolist()))} stay at "
                f"{', '.join(f'{v:.3g}' for v in mean[idx[:8]])}).",
                "Fine for always-blank pixels; otherwise check the feature pipeline. Standardise with a guard for "
                "std = 0: (x - mean) / (std + 1e-6).",
                {"constant_features": idx[:64].tolist()},
            )
        if result["status"] == "ok" and any(f.severity != "info" for f in self.findings):
            result["status"] = "problems"
        return result

    def _judge_scale(
        self, trainer: pl.Trainer, stats: dict[str, Any], result: dict[str, Any], median_std: float
    ) -> None:
        low, high = result["input_min"], result["input_max"]
        raw_pixels = math.isfinite(low) and low >= 0 and high > self.max_abs
        raw_units = median_std > self.max_abs
        mean, std = stats["mean"], stats["std"]
        hint_stats = self._standardise_words(stats)
        centre_words = (
            f"; the typical feature's mean is {result['median_mean_over_std']:.2g} std away from 0"
            if result["median_mean_over_std"] > self.center_tol
            else ""
        )
        data = {
            "min": low,
            "max": high,
            "mean": result["input_mean"],
            "std": result["input_std"],
            "median_feature_std": median_std,
            "median_mean_over_std": result["median_mean_over_std"],
        }
        if len(mean) <= 16:
            data.update(feature_mean=mean.tolist(), feature_std=std.tolist())
        if raw_pixels or raw_units:
            result["status"] = "wrong_scale"
            what = (
                f"all >= 0 with a maximum of {high:.4g} (raw units such as 0-255 or 0-16 pixels)"
                if raw_pixels
                else f"the typical feature has std {median_std:.3g}"
            )
            self.report(
                trainer,
                "data.wrong_scale",
                "warning",
                f"The inputs span [{low:.4g}, {high:.4g}], mean {result['input_mean']:.4g}, std "
                f"{result['input_std']:.4g}: {what}{centre_words}. Expected standardised inputs "
                f"(mean ~0, std ~1) or at least a [-1, 1] range.",
                f"Standardise before the model: {hint_stats}.",
                data,
            )
            return
        if result["median_mean_over_std"] > self.center_tol:
            self.report(
                trainer,
                "data.not_centred",
                "warning",
                f"The inputs are not centred: the typical (median) feature's |mean| is "
                f"{result['median_mean_over_std']:.2g}x its std ({result['not_centred_fraction']:.0%} of features "
                f"beyond {self.center_tol:g}x); pooled mean {result['input_mean']:.4g}, std {result['input_std']:.4g}.",
                f"Subtract the mean (and divide by the std): {hint_stats}.",
                data,
            )

    def _standardise_words(self, stats: dict[str, Any]) -> str:
        mean, std = stats["mean"], stats["std"]
        if self._layout.startswith("channel") and len(mean) <= 4:
            m = ", ".join(f"{v:.4g}" for v in mean)
            s = ", ".join(f"{v:.4g}" for v in std)
            return f"torchvision.transforms.Normalize(mean=[{m}], std=[{s}]) (measured per channel)"
        return (
            f"x = (x - mean) / (std + 1e-6) with the training set's per-feature mean and std "
            f"(measured here, pooled: mean {stats['pooled_mean']:.4g}, std {stats['pooled_std']:.4g})"
        )

    def _judge_labels(self, trainer: pl.Trainer, stats: dict[str, Any], result: dict[str, Any]) -> None:
        labels = stats["labels"]
        if labels is None:
            return
        bins = len(labels) - 2
        counts = labels[:bins]
        seen = np.flatnonzero(counts > 0)
        if seen.size == 0:
            return
        classes = self.num_classes or int(seen.max()) + 1
        counts = counts[:classes]
        total = float(counts.sum())
        result["class_counts"] = counts.astype(int).tolist() if classes <= 100 else None
        smallest, largest = float(counts.min()), float(counts.max())
        ratio = largest / smallest if smallest > 0 else math.inf
        result["imbalance_ratio"] = ratio
        if classes < 2 or total / classes < 10 or ratio < self.imbalance_ratio:
            return  # too few labels per class to tell imbalance from chance, or balanced enough
        rare, common = int(np.argmin(counts)), int(np.argmax(counts))
        priors = counts / total
        weights = total / (classes * np.maximum(counts, 1.0))
        log_priors = np.log(np.maximum(priors, 1e-6))
        numbers = (
            f" (class weights {np.round(weights, 3).tolist()}; centred log priors "
            f"{np.round(log_priors - log_priors.mean(), 3).tolist()})"
            if classes <= 20
            else ""
        )
        if smallest > 0:
            ratio_words = f"{ratio:.3g}:1"
        else:
            ratio_words = "infinite: it never appears"
        data = {"class_counts": result["class_counts"], "ratio": ratio, "rare": rare, "common": common}
        if self._per_position:  # a label per token or pixel: skewed by nature, not a sampling problem
            # among the classes that appear: a vocabulary's unused ids (a padding index) are no rare class
            present = counts[seen[seen < classes]]
            rarest = int(seen[seen < classes][int(np.argmin(present))])
            absent = classes - present.size
            if largest / float(present.min()) < self.imbalance_ratio:
                return  # the classes present are balanced enough; ids that never occur are no imbalance
            missing = (
                f"; {absent} of the {classes} classes do not appear in the sample (unused ids such as a padding "
                "index, rare tokens)"
                if absent
                else ""
            )
            self.report(
                trainer,
                "data.class_imbalance",
                "info",
                f"The per-position labels (a label per token or pixel) are imbalanced: class {common} has "
                f"{int(largest)} of {int(total)} and the rarest class present, class {rarest}, "
                f"{int(present.min())} (ratio {largest / float(present.min()):.3g}:1){missing}. Usual for such "
                "labels: token frequencies follow Zipf's law, backgrounds dominate segmentation masks.",
                "Nothing to fix for language modelling. For segmentation, a class-weighted or Dice loss and "
                "per-class IoU keep the rare classes from being ignored.",
                {
                    **data,
                    "per_position": True,
                    "rare": rarest,
                    "ratio": largest / float(present.min()),
                    "absent": absent,
                },
            )
            return
        self.report(
            trainer,
            "data.class_imbalance",
            "warning",
            f"The labels are imbalanced: class {common} has {int(largest)} of {int(total)} examples, class {rare} "
            f"{int(smallest)}; ratio {ratio_words} (threshold {self.imbalance_ratio:g}).",
            "Weight the loss by inverse class frequency (CrossEntropyLoss(weight=N / (K * n_c))"
            + (
                f"; with one logit, BCEWithLogitsLoss(pos_weight=torch.tensor({counts[0] / counts[1]:.3g})), "
                f"n_0 / n_1, and the final bias at logit(p) = {math.log(counts[1] / counts[0]):.3g}"
                if classes == 2 and counts[0] > 0 and counts[1] > 0
                else ""
            )
            + ") or resample (WeightedRandomSampler), initialise the final bias at the log class priors so training "
            f"does not spend its first steps learning them, and track per-class metrics, not just accuracy{numbers}.",
            data,
        )

    def _judge_duplicates(self, trainer: pl.Trainer, stats: dict[str, Any], result: dict[str, Any]) -> None:
        dup, examples, conflicts = int(stats["duplicates"]), int(stats["examples"]), int(stats["conflicts"])
        if conflicts:
            self.report(
                trainer,
                "data.conflicting_labels",
                "warning",
                f"{conflicts} inputs among the first {examples} examples are identical to another one but carry a "
                "different label: corrupted input/label pairs or an ambiguous task.",
                "Check that inputs and labels stay aligned through the pipeline (shuffling, filtering, joins); "
                "deduplicate and relabel.",
                {"conflicts": conflicts, "examples": examples},
            )
        if not dup:
            return
        fraction = dup / max(examples, 1)
        data: dict[str, Any] = {"duplicates": dup, "examples": examples, "fraction": fraction}
        sampler = _replacement_sampler(trainer.train_dataloader)
        if sampler is not None:
            # repeats are what a sampler drawing with replacement does: compare with the number it explains
            expected = _expected_repeats(sampler, examples / max(trainer.world_size, 1))
            name = type(sampler).__name__
            data.update(sampler=name)
            if expected is not None:
                expected *= max(trainer.world_size, 1)  # duplicates are found within each rank's own draws
                data.update(expected=expected)
            beyond = expected is not None and fraction > self.max_duplicate_fraction and dup > 2 * expected + 10
            expected_words = f"about {expected:.1f} expected" if expected is not None else "repeats are expected"
            self.report(
                trainer,
                "data.duplicates",
                "warning" if beyond else "info",
                f"{dup} of the first {examples} examples ({fraction:.1%}) repeat an earlier one exactly; the "
                f"training sampler ({name}) draws with replacement, {expected_words} from its draws alone.",
                "Deduplicate the dataset: the sampler explains only part of these repeats."
                if beyond
                else "Nothing to fix: sampling with replacement repeats examples by design.",
                data,
            )
            return
        self.report(
            trainer,
            "data.duplicates",
            "warning" if fraction > self.max_duplicate_fraction else "info",
            f"{dup} of the first {examples} examples ({fraction:.1%}) repeat an earlier one exactly.",
            "Deduplicate the dataset (and check the train/validation split for leaks); make sure the "
            "sampler does not repeat indices.",
            data,
        )

    # ------------------------------------------------------------------ log
    def _log(self, trainer: pl.Trainer, stats: dict[str, Any]) -> None:
        result = self.result or {}
        scalars = {
            f"data/{key}": float(result[key])
            for key in (
                "input_mean",
                "input_std",
                "input_min",
                "input_max",
                "not_centred_fraction",
                "constant_features",
                "duplicate_fraction",
                "imbalance_ratio",
            )
            if isinstance(result.get(key), (int, float)) and math.isfinite(result[key])
        }
        self.log_scalars(trainer, scalars)
        if result.get("class_counts"):
            rows = "\n".join(f"| {k} | {int(c)} |" for k, c in enumerate(result["class_counts"]))
            self.log_text(trainer, "data/labels", "| class | count |\n| --- | --- |\n" + rows)
        if stats["grid"] is not None:
            image, low, high = _grid_image(stats["grid"])
            self.log_image(trainer, "data/inputs", image)
            text = f"value range shown: black = {low:.4g}, white = {high:.4g}"
            if stats["grid_labels"] is not None:
                per_row = math.ceil(math.sqrt(len(stats["grid"])))
                labels = stats["grid_labels"].tolist()
                lines = [" ".join(map(str, labels[i : i + per_row])) for i in range(0, len(labels), per_row)]
                text += "  \nlabels, row by row:  \n" + "  \n".join(lines)
            self.log_text(trainer, "data/input_labels", text)

    def _release(self) -> None:
        self._fingerprints.clear()
        self._example_labels.clear()
        self._grid = self._grid_labels = self._projection = None
        self._sums = self._mins = self._maxs = self._labels = None

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in (self.result or {}).items() if k != "class_counts"}


def _features(x: Tensor) -> Tensor:
    """Rows of features: channels for (N, C, ...) images, the last dim for (N, F) / (N, T, F), one for (N,)."""
    if x.dim() >= 4:
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if x.dim() == 1:
        return x.reshape(-1, 1)
    return x.reshape(-1, x.shape[-1])


def _replacement_sampler(loaders: Any) -> Any | None:
    """The sampler of a training loader that draws with replacement (e.g. ``WeightedRandomSampler``), or None.

    Looks through ``batch_sampler.sampler`` and the wrapper Lightning puts around a custom sampler under DDP.
    """
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            found = _replacement_sampler(loader)
            if found is not None:
                return found
        return None
    samplers = [getattr(loaders, "sampler", None), getattr(getattr(loaders, "batch_sampler", None), "sampler", None)]
    for sampler in samplers:
        wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper
        for candidate in (sampler, wrapped):
            if getattr(candidate, "replacement", False) is True:
                return candidate
    return None


def _expected_repeats(sampler: Any, draws: float) -> float | None:
    """How many of ``draws`` independent draws repeat an earlier one: draws - sum_i 1 - (1 - p_i) ** draws."""
    weights = getattr(sampler, "weights", None)
    try:
        if isinstance(weights, Tensor):
            p = weights.detach().double().cpu().numpy()
        else:
            p = np.ones(len(sampler.data_source), dtype=np.float64)
    except (AttributeError, TypeError):
        return None
    total = float(p.sum())
    if p.size == 0 or not math.isfinite(total) or total <= 0 or (p < 0).any():
        return None
    p = p / total
    with np.errstate(divide="ignore"):
        distinct = float(np.sum(-np.expm1(draws * np.log1p(-p))))
    return max(draws - distinct, 0.0)


def _is_image(x: Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] in (1, 3) and x.shape[2] > 1 and x.shape[3] > 1


def _grid_image(images: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(N, C, H, W) -> an (H', W', 3) uint8 grid, min-max scaled over all shown values, upscaled to >= 32 px."""
    n, channels, height, width = images.shape
    finite = images[np.isfinite(images)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.nan_to_num((images - low) / (high - low if high > low else 1.0), nan=0.0, posinf=1.0, neginf=0.0)
    scaled = (np.clip(scaled, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if channels == 1:
        scaled = np.repeat(scaled, 3, axis=3)
    zoom = max(1, math.ceil(32 / max(height, width)))
    scaled = scaled.repeat(zoom, axis=1).repeat(zoom, axis=2)
    per_row = math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    cell_h, cell_w = height * zoom + 2, width * zoom + 2
    grid = np.full((rows * cell_h, per_row * cell_w, 3), 64, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, per_row)
        grid[r * cell_h + 1 : r * cell_h + 1 + height * zoom, c * cell_w + 1 : c * cell_w + 1 + width * zoom] = scaled[
            k
        ]
    return grid, low, high


def _default_target(batch: Any, size: int, signature: ForwardSignature | None) -> Tensor | None:
    target = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        target = batch[target_index(len(batch), signature)]
        if not isinstance(target, Tensor):
            return None
    elif isinstance(batch, Mapping):
        target = next((batch[k] for k in _TARGET_KEYS if isinstance(batch.get(k), Tensor)), None)
    if target is None or target.dim() == 0 or target.shape[0] != size:
        return None
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return None
    return target
