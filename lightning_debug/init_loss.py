"""InitLossCallback: is the loss of the untouched model what initialisation should give?"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_debug.base import OneShotCheck
from lightning_debug.batches import ForwardSignature, default_input, target_index
from lightning_debug.distributed import all_ranks, any_rank, reduce
from lightning_debug.isolation import OneShotLoader, call_training_step, isolated, on_device, training_batches

Task = Literal["multiclass", "binary", "regression"]
TASKS: tuple[str, ...] = ("multiclass", "binary", "regression")


class InitLossError(RuntimeError):
    """Raised by ``InitLossCallback(strict=True)`` when the loss at init fails the check."""


class InitLossCallback(OneShotCheck):
    r"""Checklist item "verify loss @ init": measure the loss of the initial model before any update.

    At ``on_train_start`` it runs your own ``training_step`` (so any loss function works) on the first
    ``num_batches`` training batches, in the modes training runs in (train mode; a submodule you keep in eval mode,
    e.g. a frozen teacher, stays in eval mode) and without gradients, and compares the mean loss with what
    initialisation should give:

    ===============  =============================================  ===============================
    task             expected at init (uniform predictor)           best constant predictor
    ===============  =============================================  ===============================
    ``multiclass``   :math:`\ln C` (2.303 for 10 classes)           entropy of the class prior
    ``binary``       :math:`\ln 2` = 0.693                          :math:`H(p)` of the positive rate
    ``regression``   :math:`\mathrm{Var}(y) + \bar y^2` (predict 0)  :math:`\mathrm{Var}(y)`
    ===============  =============================================  ===============================

    A loss above ``expected * (1 + rtol)`` means the final layer's outputs are too large at init; the
    hint names the final layer, the factor to scale its weights by (from the measured output std) and
    the bias to start from (log class priors, ``logit(p)``, or the target mean). When the final layer's weights
    are at a standard init's scale (std at most 1.5/sqrt(fan_in)) and the inputs are far from standardised (root
    mean square above 4), its large outputs come from the inputs, and the hint says to normalise them instead. A
    loss below ``best_constant * (1 - rtol)`` cannot come from untrained weights: when the final layer's predictions
    (class logits lined up with the targets) beat always predicting the majority class by more than 5 standard
    errors, the weights are trained (fine-tuning, loaded weights) and ``init_loss.trained`` (info) says the check
    does not apply; when they are at chance the loss is computed wrong (``init_loss.too_low``). Class priors and
    target statistics come from the arguments, else from the measured batches when a batch is
    ``(inputs, target)``, ``(inputs, target, ...)`` (sample weights, indices after the target) or ``(x1, ..., xn,
    target)`` for a ``forward`` that takes ``n`` inputs, or ``target_fn`` extracts the target. Measured class
    frequencies are used only when they differ from equal ones beyond chance (a G-test at the 0.1% level: a few
    examples of a balanced dataset look imbalanced); otherwise the classes count as balanced (best constant
    ``ln C``, bias zero). The suggested log priors are smoothed by half a count per class, so a class the probe
    batches missed gets a finite bias. A loss at init about as many times too high as there are targets per batch
    is named as a loss summed over the batch (``reduction='sum'``) instead of averaged.

    Training afterwards is bit-identical to training without the callback: the global RNG, the
    loaders' generators, BatchNorm statistics, parameters (an EMA teacher updated in ``training_step``),
    train/eval flags and ``self.log`` results are restored, and loaders with worker processes are read in
    the main process so their cached iterators stay untouched. Plain Python attributes your
    ``training_step`` changes (a step counter) cannot be restored: keep such state in buffers.
    Memory: one transient copy of the parameters at fit start, before any optimizer state exists.
    Under DDP every rank measures its own batches and the loss is averaged across ranks. On resume
    from a checkpoint the check is not repeated. Under manual optimization (``training_step`` steps
    the optimizer itself) the check is skipped with an info finding.

    Logged scalars (step 0):

    ===========================  =====================================================
    tag                          meaning
    ===========================  =====================================================
    ``init_loss/measured``       mean loss over the measured batches (all ranks)
    ``init_loss/expected``       the uniform-predictor loss, or ``expected_loss``
    ``init_loss/best_constant``  the best constant predictor's loss, when known
    ``init_loss/output_std``     std of the final layer's outputs (logits)
    ===========================  =====================================================

    Findings: ``init_loss.too_high`` (warning), ``init_loss.too_low`` (warning),
    ``init_loss.non_finite`` (error), ``init_loss.prior_not_used`` (info), ``init_loss.trained`` (info),
    ``init_loss.not_measured`` (info).

    Args:
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``; may be None when ``expected_loss`` is given.
        num_classes: number of classes (``task="multiclass"``, at least 2).
        class_priors: class frequencies summing to 1 (``task="multiclass"``; default: measured).
        positive_rate: fraction of positives in (0, 1) (``task="binary"``; default: measured).
        target_mean: mean of the targets (``task="regression"``; default: measured).
        target_var: variance of the targets, > 0 (``task="regression"``; default: measured).
        expected_loss: the loss init should give, for any other loss function; overrides the task formula.
        num_batches: how many training batches to average over.
        rtol: relative tolerance around the expected losses.
        strict: raise :class:`InitLossError` before training when the check fails.
        target_fn: maps a batch to its target tensor, for batches that are not ``(inputs, target)``.

    Raises:
        ValueError: when the arguments are missing or inconsistent (the message names the argument).

    Example::

        trainer = Trainer(callbacks=[InitLossCallback(task="multiclass", num_classes=10)])
    """

    def __init__(
        self,
        task: Task | None = None,
        num_classes: int | None = None,
        *,
        class_priors: Sequence[float] | None = None,
        positive_rate: float | None = None,
        target_mean: float | None = None,
        target_var: float | None = None,
        expected_loss: float | None = None,
        num_batches: int = 4,
        rtol: float = 0.25,
        strict: bool = False,
        target_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__(every_n_steps=None)
        _validate(
            task, num_classes, class_priors, positive_rate, target_mean, target_var, expected_loss, num_batches, rtol
        )
        self.task = task
        self.num_classes = num_classes
        self.class_priors = None if class_priors is None else [float(p) for p in class_priors]
        self.positive_rate = positive_rate
        self.target_mean = target_mean
        self.target_var = target_var
        self.expected_loss = expected_loss
        self.num_batches = num_batches
        self.rtol = rtol
        self.strict = strict
        self.target_fn = target_fn
        self._signature: ForwardSignature | None = None  # the model's forward: where the batch's target sits
        self.result: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hook
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None or trainer.global_step > 0:
            return  # measured before, or resumed: the model is no longer at init
        if not pl_module.automatic_optimization:
            self.report(
                trainer,
                "init_loss.not_measured",
                "info",
                "The loss at init was not measured: under manual optimization training_step steps the optimizer.",
                "Compute the loss of one batch before training yourself and compare it with ln(num_classes).",
            )
            self.result = {"status": "not_measured"}
            return
        measurement = self._measure(trainer, pl_module)
        if measurement is None:
            return
        self.result = self._judge(trainer, measurement)
        self._log(trainer, self.result)
        if self.strict and self.result["status"] not in ("ok", "prior_not_used", "trained"):
            raise InitLossError(f"InitLossCallback(strict=True): {self.findings[-1].format()}")

    # ------------------------------------------------------------------ measure
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        try:
            probe = training_batches(trainer)
        except OneShotLoader as err:
            self.report(
                trainer,
                "init_loss.not_measured",
                "info",
                f"The loss at init was not measured: {err}.",
                "Pass fit a DataLoader (or any object whose __iter__ starts a new pass), or check the loss of one "
                "batch before training yourself.",
            )
            self.result = {"status": "not_measured"}
            return None
        if probe is None:
            return None
        batches_in, loaders = probe
        loss_total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        out_moments = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # sum, sum of squares, count
        target_stats = torch.zeros(self._target_stats_size(), dtype=torch.float64, device=pl_module.device)
        hits = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # correct predictions, examples counted
        in_moments = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # first batch's inputs: sum x^2, n
        batches = 0
        has_targets = True
        final_layer = _FinalLayerProbe(pl_module)
        self._signature = ForwardSignature(pl_module.forward)
        problem: str | None = None
        with isolated(pl_module, train_mode=None, loaders=loaders, restore_parameters=True), final_layer:
            for batch_idx, batch in enumerate(batches_in):
                if batch_idx >= self.num_batches:
                    break
                batch = on_device(trainer, batch)
                try:
                    with trainer.precision_plugin.forward_context():
                        output = call_training_step(pl_module, batch, batch_idx)
                except Exception as err:  # the user's step: their training will meet it again, not our crash
                    problem = f"training_step raised {type(err).__name__}: {err}"
                    break
                loss = output["loss"] if isinstance(output, dict) else output
                if not isinstance(loss, Tensor):
                    problem = f"training_step returned {type(output).__name__}, not a loss tensor"
                    break
                if loss.numel() != 1:
                    problem = f"training_step returned a loss of shape {tuple(loss.shape)}, not a single value"
                    break
                loss_total += loss.detach().double().reshape(())
                batches += 1
                inputs = default_input(batch)
                if batch_idx == 0 and isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.numel():
                    x = inputs.detach().double()
                    in_moments = torch.stack([(x * x).sum(), x.new_tensor(x.numel())]).to(loss_total.device)
                if final_layer.output is not None:
                    out = final_layer.output.double()
                    out_moments += torch.stack([out.sum(), (out * out).sum(), out.new_tensor(out.numel())])
                target = self._target(batch)
                if target is None:
                    has_targets = False
                else:
                    target = target.to(pl_module.device)
                    target_stats += self._target_stats(target)
                    if final_layer.output is not None:
                        hits += _hits(self.task, final_layer.output, target, self.num_classes)
        if any_rank(trainer, problem is not None):
            self.report(
                trainer,
                "init_loss.not_measured",
                "info",
                f"The loss at init was not measured: {problem or 'another rank could not measure it'}.",
                "Return the loss tensor (or a dict with a 'loss' key) from training_step, or pass expected_loss "
                "and check the loss of one batch before training yourself.",
            )
            self.result = {"status": "not_measured"}
            return None
        has_targets = all_ranks(trainer, has_targets and batches > 0)
        totals = reduce(
            trainer,
            torch.cat(
                [torch.stack([loss_total, loss_total.new_tensor(batches)]), out_moments, hits, in_moments, target_stats]
            ),
        )
        values = totals.cpu().tolist()  # the one host transfer
        loss_sum, batch_count, out_sum, out_sq, out_n, correct, counted, in_sq, in_n = values[:9]
        stats = values[9:]
        if batch_count == 0:
            return None
        out_mean = out_std = None
        if out_n > 1:
            out_mean = out_sum / out_n
            out_std = math.sqrt(max(out_sq / out_n - out_mean * out_mean, 0.0))
        return {
            "measured": loss_sum / batch_count,
            "batches": int(batch_count),
            "output_std": out_std,
            "output_mean": out_mean,
            "final_layer": final_layer.name,
            **_weight_scale(pl_module, final_layer.name),
            # the root mean square of the first batch's float inputs (None for token ids): ~1 when standardised
            "input_rms": math.sqrt(in_sq / in_n) if in_n > 0 else None,
            "target_stats": stats if has_targets else None,
            # the final layer's predictions against the targets (None when its outputs do not line up with them)
            "accuracy": correct / counted if has_targets and counted > 0 else None,
            "examples": int(counted),
        }

    def _target(self, batch: Any) -> Tensor | None:
        if self.target_fn is not None:
            return self.target_fn(batch)
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            target = batch[target_index(len(batch), self._signature)]
            if not isinstance(target, Tensor):
                return None
            if self.task == "multiclass" and not target.is_floating_point():
                return target
            if self.task == "binary" and bool(((target == 0) | (target == 1)).all()):
                return target
            if self.task == "regression" and target.is_floating_point():
                return target
        return None

    def _target_stats_size(self) -> int:
        if self.task == "multiclass":
            return int(self.num_classes or 0)
        return {"binary": 2, "regression": 3}.get(str(self.task), 0)

    def _target_stats(self, target: Tensor) -> Tensor:
        if self.task == "multiclass":
            labels = target.flatten().long()
            labels = labels[
                (labels >= 0) & (labels < int(self.num_classes or 0))
            ]  # ignore_index (-100, 255) is no class
            counts = torch.bincount(labels, minlength=self.num_classes or 0)
            return counts.double()
        values = target.flatten().double()
        if self.task == "binary":
            return torch.stack([values.sum(), values.new_tensor(values.numel())])
        if self.task == "regression":
            return torch.stack([values.sum(), (values * values).sum(), values.new_tensor(values.numel())])
        return values.new_zeros(0)

    def best_constant_on(self, trainer: pl.Trainer, count: int) -> float | None:
        """The best constant prediction's loss on the first ``count`` training batches, from their own targets
        (label frequencies, positive rate or target variance; not the ``class_priors`` etc. passed in), summed over
        the ranks; None when the task's targets are not found. A collective under DDP: call it on every rank.
        Targets with several columns (multi-output regression, multi-label) are pooled: the reference is then
        higher than a per-column constant reaches, which errs towards no warning.

        LossCurveMonitor's "overfit one batch" verdict compares the loss on the memorised batches with it.
        """
        pl_module = trainer.lightning_module
        self._signature = ForwardSignature(pl_module.forward)
        device = trainer.strategy.root_device
        stats = torch.zeros(self._target_stats_size(), dtype=torch.float64, device=device)
        try:
            probe = training_batches(trainer)
            found = probe is not None and stats.numel() > 0
            if found and probe is not None:
                batches, loaders = probe
                with isolated(pl_module, train_mode=pl_module.training, loaders=loaders):
                    for index, batch in enumerate(batches):
                        if index >= count:
                            break
                        target = self._target(trainer.strategy.batch_to_device(batch))
                        if target is None:
                            found = False
                            break
                        stats += self._target_stats(target.to(device))
        except Exception:  # an unusual loader or target_fn: no reference, never the user's training
            found = False
        found = all_ranks(trainer, found)
        totals = reduce(trainer, stats).cpu().tolist()
        return _constant_loss(self.task, totals) if found else None

    # ------------------------------------------------------------------ judge
    def _references(self, target_stats: list[float] | None) -> dict[str, Any]:
        """Expected (uniform-predictor) and best-constant losses, and the final-layer bias to start from."""
        refs: dict[str, Any] = {"expected": self.expected_loss, "best_constant": None, "bias": None}
        if self.task == "multiclass":
            num_classes = int(self.num_classes or 2)
            priors, bias_priors = self.class_priors, self.class_priors
            refs["expected"] = self.expected_loss if self.expected_loss is not None else math.log(num_classes)
            if priors is None and target_stats is not None and sum(target_stats) > 0:
                total = sum(target_stats)
                refs["majority_rate"] = max(target_stats) / total  # always the sample's commonest class
                if _departs_from_uniform(target_stats):
                    priors = [c / total for c in target_stats]
                    # smoothed (add one half): a class the probe batches missed gets a finite log prior
                    bias_priors = [(c + 0.5) / (total + 0.5 * len(target_stats)) for c in target_stats]
                else:  # the sample cannot tell the classes' frequencies from equal ones: no bias to learn
                    refs["best_constant"], refs["priors_uniform"] = math.log(num_classes), True
            if priors is not None and bias_priors is not None:
                refs["best_constant"] = _entropy(priors)
                floor = 1e-6
                log_p = [math.log(max(p, floor)) for p in bias_priors]
                refs["bias"] = [round(v - sum(log_p) / len(log_p), 3) for v in log_p]
                refs["priors"] = [round(p, 4) for p in priors]
                refs["majority_rate"] = max(priors)  # the accuracy of always predicting the commonest class
        elif self.task == "binary":
            rate = self.positive_rate
            refs["expected"] = self.expected_loss if self.expected_loss is not None else math.log(2)
            if rate is None and target_stats is not None and target_stats[1] > 0:
                positives, count = target_stats
                refs["majority_rate"] = max(positives, count - positives) / count
                if _departs_from_uniform([positives, count - positives]):
                    rate = positives / count
                else:
                    refs["best_constant"], refs["priors_uniform"] = math.log(2), True
            if rate is not None and 0 < rate < 1:
                refs["best_constant"] = _entropy([rate, 1 - rate])
                refs["bias"] = round(math.log(rate / (1 - rate)), 4)
                refs["positive_rate"] = round(rate, 4)
                refs["majority_rate"] = max(rate, 1 - rate)
        elif self.task == "regression":
            mean, var = self.target_mean, self.target_var
            if target_stats is not None and target_stats[2] > 1:
                total, squares, count = target_stats
                mean = total / count if mean is None else mean
                var = max(squares / count - (total / count) ** 2, 0.0) if var is None else var
            if mean is not None and var is not None:
                refs["expected"] = self.expected_loss if self.expected_loss is not None else var + mean * mean
                refs["best_constant"] = var
                refs["bias"] = round(mean, 4)
                refs["target_std"] = math.sqrt(var)
        return refs

    def _judge(self, trainer: pl.Trainer, measurement: dict[str, Any]) -> dict[str, Any]:
        refs = self._references(measurement["target_stats"])
        measured, expected, best = measurement["measured"], refs["expected"], refs["best_constant"]
        result = {**measurement, **refs, "status": "ok"}
        result.pop("target_stats")
        data = {k: v for k, v in result.items() if k != "status"}
        if not math.isfinite(measured):
            result["status"] = "non_finite"
            self.report(
                trainer,
                "init_loss.non_finite",
                "error",
                f"The loss at init is {measured} over {measurement['batches']} batches: the model or the loss "
                f"produces NaN/Inf before any update.",
                "Check the inputs for NaN/Inf, log(0) or division by zero in the loss, and the init of custom layers; "
                "use a numerically stable loss (cross_entropy on logits, BCEWithLogitsLoss).",
                data,
            )
            return result
        if expected is None:
            self.report(
                trainer,
                "init_loss.not_measured",
                "info",
                f"The loss at init is {measured:.4g}, but there is no reference to compare it with: the target "
                "statistics are unknown.",
                "Pass target_mean and target_var (regression), target_fn, or expected_loss.",
                data,
            )
            result["status"] = "no_reference"
            return result
        if measured > expected * (1 + self.rtol):
            result["status"] = "too_high"
            ratio = measured / expected
            per_batch = _targets_per_batch(self.task, measurement)
            summed = per_batch is not None and per_batch >= 4 and 0.8 <= ratio / per_batch <= 1.25
            if summed:  # the loss of one example times the batch: a sum where a mean was meant
                data["targets_per_batch"] = per_batch
                cause = (
                    f", about the {per_batch:.4g} targets per batch: the loss is summed over the batch, not averaged"
                )
                hint = (
                    "Average the loss over the batch: reduction='mean' (the default of torch's losses) instead of "
                    "'sum', or divide the sum by the batch size. A summed loss scales the gradients, and so the "
                    "effective learning rate, with the batch size."
                )
            else:
                cause, hint = self._cause_words(result), self._too_high_hint(result)
            self.report(
                trainer,
                "init_loss.too_high",
                "warning",
                f"The loss at init is {measured:.4g}, expected about {expected:.4g} "
                f"({self._expected_words()}); it is {ratio:.3g}x too high{cause}.",
                hint,
                data,
            )
            return result
        low_reference = best if best is not None else expected
        if measured < low_reference * (1 - self.rtol):
            which = "the best constant predictor" if best is not None else "the expected loss at init"
            below = f"The loss at step 0 is {measured:.4g}, below {which} ({low_reference:.4g})"
            below += f" by more than {self.rtol:.0%}"
            accuracy, majority = measurement.get("accuracy"), refs.get("majority_rate")
            verdict = (
                None if accuracy is None or majority is None else _chance(accuracy, majority, measurement["examples"])
            )
            if verdict == "above":
                result["status"] = "trained"
                self.report(
                    trainer,
                    "init_loss.trained",
                    "info",
                    f"{below}, and the model already predicts the targets: accuracy {accuracy:.1%} on "
                    f"{measurement['examples']} examples, against {majority:.1%} for always the majority class. "
                    "The weights are trained (fine-tuning, loaded weights), so the loss-at-init check does not apply.",
                    f"Nothing to fix. (A model trained from scratch starts near {expected:.4g}; InitLossCallback is "
                    "for those runs.)",
                    data,
                )
                return result
            result["status"] = "too_low"
            if verdict == "at":
                why = (
                    f": the predictions are at chance (accuracy {accuracy:.1%}, majority class {majority:.1%}), so "
                    "the loss itself is computed wrong."
                )
                hint = (
                    "Check the loss reduction (the mean divided by the batch size a second time, averaged over the "
                    "wrong dimension) and that the loss compares the model's outputs with the targets."
                )
            else:
                why = ": an untrained model cannot know that much about the targets."
                hint = (
                    "If the weights are pretrained or loaded (fine-tuning), this is expected. Otherwise check the "
                    "loss reduction (the mean divided by the batch size a second time, averaged over the wrong "
                    "dimension) and that the loss compares the model's outputs with the targets."
                )
            self.report(trainer, "init_loss.too_low", "warning", below + why, hint, data)
            return result
        if best is not None and best < expected * (1 - self.rtol) and measured > best * (1 + self.rtol):
            result["status"] = "prior_not_used"
            self.report(
                trainer,
                "init_loss.prior_not_used",
                "info",
                f"The targets are imbalanced: a constant predictor reaches {best:.4g}, the model starts at "
                f"{measured:.4g}. Its first steps will only learn the bias (a 'hockey stick' loss curve).",
                f"Initialise the final layer's bias to {self._bias_words(result)} so training starts at {best:.4g}.",
                data,
            )
        return result

    def _expected_words(self) -> str:
        if self.expected_loss is not None:
            return "the expected_loss you passed"
        if self.task == "multiclass":
            return f"ln {self.num_classes} for a uniform prediction over {self.num_classes} classes"
        if self.task == "binary":
            return "ln 2 for predicting p=0.5"
        return "Var(y) + mean(y)^2 for predicting 0"

    def _cause_words(self, result: dict[str, Any]) -> str:
        if self._scale_factor(result) is None:
            return ""
        if _standard_weights(result):
            return (
                f": the final layer `{result['final_layer']}`'s outputs are large (std {result['output_std']:.3g}, "
                f"expected about {self._output_std_target(result):.2g} or less) although its weights are at the "
                f"standard scale (std {result['final_weight_std']:.3g}; 1/sqrt(fan_in) = "
                f"{result['final_fan_in'] ** -0.5:.3g}): the inputs are not normalised (root mean square "
                f"{result['input_rms']:.3g}, ~1 when standardised)"
            )
        return (
            f": the final layer `{result['final_layer']}` starts out too large (its outputs have std "
            f"{result['output_std']:.3g}, expected about {self._output_std_target(result):.2g} or less)"
        )

    def _output_std_target(self, result: dict[str, Any]) -> float:
        """The final-layer output std that keeps the init loss near the uniform predictor's."""
        return 0.5 * float(result.get("target_std") or 1.0) if self.task == "regression" else 0.5

    def _scale_factor(self, result: dict[str, Any]) -> float | None:
        """How much to shrink the final layer's weights, when its outputs are measurably too large."""
        std = result.get("output_std")
        if not std or not result.get("final_layer"):
            return None
        factor = self._output_std_target(result) / std
        return factor if factor < 0.5 else None

    def _too_high_hint(self, result: dict[str, Any]) -> str:
        layer = f"`{result['final_layer']}`" if result.get("final_layer") else "the final layer"
        fixes = []
        factor = self._scale_factor(result)
        if factor is not None and _standard_weights(result):
            return (
                "Normalise the inputs (zero mean, unit std per feature; DataInspector reports their scale) and look "
                "for a layer whose activations grow (DeadActivationMonitor, WeightStatsMonitor). Multiplying "
                f"{layer}'s weights by {factor:.3g} would bring the loss at init down but hide the cause."
            )
        if factor is not None:
            target = self._output_std_target(result)
            code = f"{layer.strip('`')}.weight.data.mul_({factor:.3g})"
            fixes.append(
                f"multiply {layer}'s initial weights by {factor:.3g} (`{code}`) so its outputs have std ~{target:.2g}"
            )
        out_mean, target_std = result.get("output_mean"), result.get("target_std")
        if (
            self.task == "regression"
            and out_mean is not None
            and target_std
            and abs(out_mean - result["bias"]) > target_std
        ):
            fixes.append(f"set its bias to {self._bias_words(result)} (its outputs average {out_mean:.3g} now)")
        elif factor is not None and self._bias_words(result):
            fixes.append(f"set its bias to {self._bias_words(result)}")
        if not fixes:
            std = result.get("output_std")
            return (
                "The final layer's outputs are not large"
                + (f" (std {std:.3g})" if std else "")
                + ", so the excess comes from elsewhere: check that the loss matches the task (logits, not "
                "probabilities, into cross_entropy; class indices as targets) and the expected_loss you passed."
            )
        text = "; ".join(fixes)
        return text[0].upper() + text[1:] + "."

    def _bias_words(self, result: dict[str, Any]) -> str:
        bias = result.get("bias")
        if bias is None:
            return "zero" if self.task in ("multiclass", "binary") else ""
        if self.task == "multiclass":
            return f"the log class priors (log p, centred: {bias})" if len(bias) <= 20 else "the log class priors"
        if self.task == "binary":
            return f"logit(p) = {bias} (p = {result.get('positive_rate')})"
        return f"the target mean {bias}"

    def _log(self, trainer: pl.Trainer, result: dict[str, Any]) -> None:
        scalars = {
            f"init_loss/{key}": float(result[key])
            for key in ("measured", "expected", "best_constant", "output_std")
            if isinstance(result.get(key), (int, float)) and math.isfinite(result[key])
        }
        self.log_scalars(trainer, scalars, step=0)


def _constant_loss(task: str | None, stats: list[float]) -> float | None:
    """The best constant predictor's loss from ``_target_stats`` sums: the label entropy (cross-entropy), the
    binary entropy of the positive rate, or the target variance (MSE)."""
    if task == "multiclass" and sum(stats) > 0:
        return _entropy([count / sum(stats) for count in stats])
    if task == "binary" and len(stats) == 2 and stats[1] > 0:
        rate = stats[0] / stats[1]
        return _entropy([rate, 1 - rate])
    if task == "regression" and len(stats) == 3 and stats[2] > 1:
        total, squares, count = stats
        return max(squares / count - (total / count) ** 2, 0.0)
    return None


def _weight_scale(model: nn.Module, name: str | None) -> dict[str, Any]:
    """The final layer's weight std and fan-in (one read, at fit start), when it has a matrix-shaped weight."""
    try:
        weight = getattr(model.get_submodule(name), "weight", None) if name else None
    except AttributeError:
        return {}
    if not isinstance(weight, Tensor) or weight.ndim < 2 or weight.numel() < 2:
        return {}
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return {"final_weight_std": float(weight.detach().float().std()), "final_fan_in": int(fan_in)}


def _standard_weights(result: dict[str, Any]) -> bool:
    """Whether large final-layer outputs come from unnormalised inputs, not the final layer: its weights are at a
    standard init's scale (at most 1.5/sqrt(fan_in): PyTorch's default is 0.58/sqrt(fan_in), LeCun's
    1/sqrt(fan_in)) and the float inputs are far from standardised (root mean square above 4; ~1 when standardised,
    7 for raw 0-16 digit pixels). Standardised inputs with large features are a trained backbone under a new head:
    scaling the head is the fix then."""
    std, fan_in, rms = result.get("final_weight_std"), result.get("final_fan_in"), result.get("input_rms")
    return bool(std is not None and fan_in and std <= 1.5 / math.sqrt(fan_in) and rms is not None and rms > 4)


def _targets_per_batch(task: str | None, measurement: dict[str, Any]) -> float | None:
    """How many targets (examples, tokens, pixels: the loss's terms) one probe batch held on average."""
    stats, batches = measurement.get("target_stats"), measurement.get("batches")
    if not stats or not batches:
        return None
    count = {"multiclass": sum(stats), "binary": stats[-1], "regression": stats[-1]}.get(str(task))
    return count / batches if count else None


def _departs_from_uniform(counts: Sequence[float], z: float = 3.09) -> bool:
    """Whether label counts differ from equal class frequencies beyond chance: a G-test at the 0.1% level.

    G = 2 n KL(counts / n || uniform) is chi-squared with K - 1 degrees of freedom under equal frequencies (its
    quantile by Wilson and Hilferty's approximation, z = 3.09 for 0.1%). A few examples of a balanced dataset look
    imbalanced: 8 digits drawn from ten equal classes have a label entropy around 1.2, not ln 10 = 2.30.
    """
    n, k = float(sum(counts)), len(counts)
    if n <= 0 or k < 2:
        return False
    g = 2.0 * sum(c * math.log(c * k / n) for c in counts if c > 0)
    df = k - 1
    quantile = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return g > quantile


def _entropy(probabilities: Sequence[float]) -> float:
    """The cross-entropy of always predicting ``probabilities`` against labels drawn from them."""
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def _hits(task: str | None, output: Tensor, target: Tensor, num_classes: int | None) -> Tensor:
    """[correct, counted] of the final layer's outputs taken as class logits (binary: one logit, positive > 0);
    zeros when they do not line up with the targets (another head, a sequence model's last layer)."""
    zero = torch.zeros(2, dtype=torch.float64, device=target.device)
    output = output.to(target.device)
    if task == "multiclass" and output.ndim >= 1 and output.shape[-1] == num_classes:
        if output.shape[:-1] != target.shape:
            return zero
        valid = (target >= 0) & (target < int(num_classes))  # ignore_index (-100, 255) is no class
        correct = ((output.argmax(-1) == target) & valid).sum()
        return torch.stack([correct, valid.sum()]).double()
    if task == "binary" and output.numel() == target.numel() and output.shape[0] == target.shape[0]:
        correct = ((output.reshape(-1) > 0) == (target.reshape(-1) > 0.5)).sum()
        return torch.stack([correct, correct.new_tensor(target.numel())]).double()
    return zero


def _chance(accuracy: float, majority: float, examples: int) -> str | None:
    """The verdict on ``accuracy``: "above" when it is more than 5 binomial standard errors above the
    majority-class rate (an untrained model's predictions cannot beat always predicting the most frequent class:
    expected accuracy sum_c P(predict c) P(y = c) <= max_c P(y = c), so such a margin means trained weights); "at"
    when it is not, although trained weights would have shown (the margin fits below 100%); None when the batches
    cannot tell (a majority class so large that no accuracy clears the margin)."""
    margin = 5 * math.sqrt(max(majority * (1 - majority), 0.01) / max(examples, 1))
    if accuracy > majority + margin:
        return "above"
    return "at" if majority + margin < 1.0 else None


class _FinalLayerProbe:
    """Remembers the output of the last module with a weight that ran in each forward (the logits)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.name: str | None = None
        self.output: Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _FinalLayerProbe:
        for name, module in self.model.named_modules():
            if isinstance(getattr(module, "weight", None), nn.Parameter) and name:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.is_floating_point():
                self.name, self.output = name, output.detach()
            else:
                self.name, self.output = None, None

        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _validate(
    task: str | None,
    num_classes: int | None,
    class_priors: Sequence[float] | None,
    positive_rate: float | None,
    target_mean: float | None,
    target_var: float | None,
    expected_loss: float | None,
    num_batches: int,
    rtol: float,
) -> None:
    if task is None and expected_loss is None:
        raise ValueError(f"`task` must be one of {TASKS}, or pass `expected_loss`")
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    if task == "multiclass":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2 for task='multiclass', got {num_classes!r}")
    elif num_classes is not None:
        raise ValueError(f"`num_classes` is only accepted with task='multiclass', got task={task!r}")
    if class_priors is not None:
        if task != "multiclass":
            raise ValueError("`class_priors` is only accepted with task='multiclass'")
        priors = [float(p) for p in class_priors]
        if len(priors) != num_classes or any(p < 0 for p in priors) or abs(sum(priors) - 1) > 1e-3:
            raise ValueError(
                f"`class_priors` must be {num_classes} non-negative numbers summing to 1, got {class_priors!r}"
            )
    if positive_rate is not None and (task != "binary" or not 0 < positive_rate < 1):
        raise ValueError(
            f"`positive_rate` must be in (0, 1) and is only accepted with task='binary', got {positive_rate!r}"
        )
    if (target_mean is not None or target_var is not None) and task != "regression":
        raise ValueError("`target_mean` and `target_var` are only accepted with task='regression'")
    if target_var is not None and not target_var > 0:
        raise ValueError(f"`target_var` must be > 0, got {target_var!r}")
    if expected_loss is not None and not (math.isfinite(expected_loss) and expected_loss > 0):
        raise ValueError(f"`expected_loss` must be a finite number > 0, got {expected_loss!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"`num_batches` must be a positive integer, got {num_batches!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"`rtol` must be in (0, 1), got {rtol!r}")
