"""LossFunctionCheck: the loss function gets what it expects (logits, log-probabilities) and its logs are stable."""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_debug.base import OneShotCheck
from lightning_debug.distributed import reduce
from lightning_debug.isolation import call_training_step, isolated, on_device, probe_batches
from lightning_debug.stats import to_host

_SOFTMAX = {torch.softmax, F.softmax, Tensor.softmax}
_SIGMOID = {torch.sigmoid, F.sigmoid, Tensor.sigmoid}
_LOG = {torch.log, Tensor.log}
_LOG_SOFTMAX = {torch.log_softmax, F.log_softmax, Tensor.log_softmax}
_SUM_TOLERANCE = 1e-2  # rows of probabilities sum to 1 within this (bf16 autocast rounds softmax outputs)
# log-probabilities have logsumexp 0; log(p + eps) over a large vocabulary drifts above it (32,000 classes with
# eps 1e-6: 0.03), raw scores of C >= 2 classes near init sit at ln C >= 0.69
_LSE_TOLERANCE = 0.1

# Every flag the probe can raise, in the order they travel through the ranks' reduction.
_FLAGS = ("softmax_before_cross_entropy", "nll_on_probabilities", "nll_without_log_probs", "log_of_softmax",
          "log_of_sigmoid", "bce_on_sigmoid", "sigmoid_before_bce_with_logits")  # fmt: skip


class LossFunctionCheck(OneShotCheck):
    r"""Checklist items "confirm your loss" and "NaNs: unstable softmax", checked on your own ``training_step``.

    At ``on_train_start`` it runs ``training_step`` once on the first training batch and watches, through a
    :class:`torch.overrides.TorchFunctionMode`, what the loss functions receive:

    - ``F.cross_entropy`` (``nn.CrossEntropyLoss``) applies ``log_softmax`` itself and expects logits. Given
      probabilities (a softmax before it: every row in [0, 1] summing to 1) the softmax runs twice, the loss cannot
      fall below ``ln(1 + (C-1)/e)`` (1.46 for 10 classes, 0.38 for 2) and the gradients fade as predictions sharpen.
    - ``F.nll_loss`` expects log-probabilities (``log_softmax`` outputs: logsumexp 0 over the classes). Given raw
      scores it minimises ``-x[target]``, which is unbounded below; given probabilities, ``-p[target]`` (not the
      log-likelihood).
    - ``torch.log`` of a ``softmax`` or ``sigmoid`` output: a probability that rounds to 0 gives ``-inf`` and NaN
      gradients, where ``log_softmax`` / ``logsigmoid`` are exact (checklist: "unstable softmax").
    - ``F.binary_cross_entropy_with_logits`` (``nn.BCEWithLogitsLoss``) applies the sigmoid itself and expects
      logits. Given a ``sigmoid`` output the sigmoid runs twice: the loss's probabilities stay in [0.5, 0.731], so it
      cannot fall below ``-ln sigmoid(1)`` = 0.313 on a positive target and ``ln 2`` = 0.693 on a negative one.
    - ``F.binary_cross_entropy`` (``nn.BCELoss``) of a ``sigmoid`` output: an info. Beyond a logit of about 17 a
      float32 sigmoid is exactly 1, BCE clamps its log at -100 and the gradient is lost; under autocast torch refuses
      ``binary_cross_entropy``. ``binary_cross_entropy_with_logits`` computes the same loss stably.

    Probabilities are recognised by value (in [0, 1], rows summing to 1 within 1e-2), whatever computed them, and
    log-probabilities by their logsumexp; softmax and sigmoid outputs by identity. The step runs under
    ``torch.no_grad`` inside :func:`~lightning_debug.isolation.isolated` (RNG streams, loader generators, buffers,
    parameters, train/eval flags and ``self.log`` put back), so training afterwards is bit-identical; it costs one
    forward pass, once. Under manual optimization (``training_step`` steps the optimizer) it does not run: an info
    says so. Under DDP every rank checks its own batch and the flags are combined (any rank), so every rank reports
    the same. On resume from a checkpoint the check is not repeated.

    Findings:

    =========================================  ========  ==================================================
    check                                      severity  when
    =========================================  ========  ==================================================
    ``loss_fn.softmax_before_cross_entropy``   warning   ``cross_entropy`` got probabilities
    ``loss_fn.nll_without_log_probs``          warning   ``nll_loss`` got raw scores or probabilities
    ``loss_fn.unstable_log``                   warning   ``torch.log`` of a softmax or sigmoid output
    ``loss_fn.sigmoid_before_bce_with_``       warning   ``binary_cross_entropy_with_logits`` got a sigmoid
    ``logits``                                           output
    ``loss_fn.bce_on_sigmoid``                 info      ``binary_cross_entropy`` of a sigmoid output
    ``loss_fn.not_checked``                    info      no training batch, manual optimization, or
                                                         ``training_step`` raised
    =========================================  ========  ==================================================

    Example::

        from lightning_debug import LossFunctionCheck

        trainer = Trainer(callbacks=[LossFunctionCheck()])
        trainer.fit(model, datamodule)   # at step 0: a softmax before CrossEntropyLoss, log(softmax(x)), ...
    """

    def __init__(self) -> None:
        super().__init__(every_n_steps=None)
        self.result: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None:  # restored from a checkpoint: checked at the start of the run
            return
        local = self._probe(trainer, pl_module)
        self.result = self._judge(trainer, local)

    # ------------------------------------------------------------------ probe (local, no collectives)
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if not pl_module.automatic_optimization:
            return {"problem": "under manual optimization training_step steps the optimizer"}
        probe = probe_batches(trainer)
        if isinstance(probe, str):
            return {"problem": probe}
        batches, loaders = probe
        recorder = _LossCalls()
        try:
            with isolated(pl_module, train_mode=None, loaders=loaders, restore_parameters=True):
                batch = on_device(trainer, next(iter(batches)))
                with trainer.precision_plugin.forward_context(), recorder:
                    call_training_step(pl_module, batch, 0)
        except StopIteration:
            return {"problem": "the training dataloader is empty"}
        except Exception as err:  # the user's training_step: training will meet it again, not our crash
            return {"problem": f"training_step raised {type(err).__name__}: {err}"}
        return {"flags": recorder.flags, "numbers": recorder.numbers}

    # ------------------------------------------------------------------ judge (collectives: every rank)
    def _judge(self, trainer: pl.Trainer, local: dict[str, Any]) -> dict[str, Any]:
        device = trainer.strategy.root_device
        flags = local.get("flags", {})
        numbers = local.get("numbers", {})
        # the numbers ride along, max-reduced (a rank without one sends -inf): every rank words its findings alike
        sent = [numbers.get("classes"), numbers.get("nll_logsumexp"), _negated(numbers.get("smallest_probability"))]
        values = [float("problem" in local)] + [float(flags.get(name, 0)) for name in _FLAGS]
        values += [-math.inf if value is None else float(value) for value in sent]
        combined = to_host(list(reduce(trainer, torch.tensor(values, dtype=torch.float64, device=device), "max")))
        classes, logsumexp, negated_smallest = (v if math.isfinite(v) else None for v in combined[1 + len(_FLAGS) :])
        numbers = {"classes": None if classes is None else int(classes), "nll_logsumexp": logsumexp,
                   "smallest_probability": _negated(negated_smallest)}  # fmt: skip
        if combined[0] > 0:
            reason = local.get("problem", "another rank could not run it")
            self.report(
                trainer, "loss_fn.not_checked", "info",
                f"The loss-function check did not run: {reason}.",
                "Nothing to do under manual optimization; otherwise make training_step run on the first training "
                "batch outside the training loop (it is called under torch.no_grad with self.log muted).",
            )  # fmt: skip
            return {"status": "not_checked", "reason": reason}
        raised = {name for name, value in zip(_FLAGS, combined[1 : 1 + len(_FLAGS)]) if value > 0}
        result: dict[str, Any] = {"status": "ok", "flags": sorted(raised)}
        if "softmax_before_cross_entropy" in raised:
            self._report_double_softmax(trainer, numbers.get("classes"))
        if raised & {"nll_on_probabilities", "nll_without_log_probs"}:
            self._report_nll(trainer, "nll_on_probabilities" in raised, numbers.get("nll_logsumexp"))
        if raised & {"log_of_softmax", "log_of_sigmoid"}:
            ops = [op for op in ("softmax", "sigmoid") if f"log_of_{op}" in raised]
            self._report_unstable_log(trainer, ops, numbers.get("smallest_probability"))
        if "bce_on_sigmoid" in raised:
            self._report_bce(trainer)
        if "sigmoid_before_bce_with_logits" in raised:
            self._report_double_sigmoid(trainer)
        return result

    def _report_double_sigmoid(self, trainer: pl.Trainer) -> None:
        positive, negative = -math.log(1 / (1 + math.exp(-1))), math.log(2)
        self.report(
            trainer, "loss_fn.sigmoid_before_bce_with_logits", "warning",
            "F.binary_cross_entropy_with_logits (nn.BCEWithLogitsLoss) got the output of a sigmoid, not logits: it "
            "applies the sigmoid itself, so the predictions pass through two sigmoids and the probabilities it scores "
            f"stay within [0.5, 0.731]. The loss cannot fall below {positive:.3f} on a positive target "
            f"(-ln sigmoid(1)) and {negative:.3f} on a negative one (ln 2); expected: towards 0. Its gradients are "
            "at most a quarter of the logits' and fade as the inner sigmoid saturates.",
            "Return logits from forward and drop the sigmoid before the loss (a final nn.Sigmoid or torch.sigmoid); "
            "apply sigmoid only where you need probabilities (metrics, predict_step). Checklist: confirm your loss.",
            {"loss_floor_positive": round(positive, 4), "loss_floor_negative": round(negative, 4)},
            step=0,
        )  # fmt: skip

    def _report_double_softmax(self, trainer: pl.Trainer, classes: int | None) -> None:
        if classes is not None and classes >= 2:
            floor = math.log(1 + (classes - 1) / math.e)
            bound = f"cannot fall below {floor:.3g} for {classes} classes (ln(1 + (C-1)/e); expected: towards 0)"
        else:
            floor, bound = math.nan, "cannot fall to 0"
        self.report(
            trainer, "loss_fn.softmax_before_cross_entropy", "warning",
            "F.cross_entropy (nn.CrossEntropyLoss) got probabilities, not logits: every row of its input lies in "
            "[0, 1] and sums to 1, so a softmax ran before the loss, which applies log_softmax itself. The loss "
            f"{bound}, and its gradients fade as the predictions sharpen.",
            "Return logits from forward and drop the softmax before the loss (a final nn.Softmax or F.softmax); apply "
            "softmax only where you need probabilities (metrics, predict_step). Checklist: confirm your loss.",
            {"classes": classes, "loss_floor": None if math.isnan(floor) else round(floor, 4)},
            step=0,
        )  # fmt: skip

    def _report_nll(self, trainer: pl.Trainer, probabilities: bool, logsumexp: float | None) -> None:
        if probabilities:
            got = (
                "probabilities (rows in [0, 1] summing to 1), not log-probabilities: it minimises -p[target], whose "
                "gradient is not the log-likelihood's and stays flat for examples the model gets badly wrong"
            )
        else:
            measured = f" is {logsumexp:.3g} (median over the batch)" if logsumexp is not None else " is not 0"
            got = (
                f"values that are not log-probabilities: their logsumexp over the classes{measured}, where "
                "log_softmax outputs give 0. It then minimises -x[target], which has no lower bound: training drives "
                "the target's score up instead of its probability"
            )
        self.report(
            trainer, "loss_fn.nll_without_log_probs", "warning",
            f"F.nll_loss (nn.NLLLoss) got {got}.",
            "Apply F.log_softmax(logits, dim=1) before F.nll_loss (or end the model with nn.LogSoftmax), or pass the "
            "logits to F.cross_entropy, which does both. Checklist: confirm your loss.",
            {"probabilities": probabilities, "logsumexp": logsumexp},
            step=0,
        )  # fmt: skip

    def _report_unstable_log(self, trainer: pl.Trainer, ops: list[str], smallest: float | None) -> None:
        seen = f" The smallest probability in this batch is {smallest:.3g}." if smallest is not None else ""
        fixes = {"softmax": "F.log_softmax(x, dim=...) for torch.log(F.softmax(x, dim=...))",
                 "sigmoid": "F.logsigmoid(x) for torch.log(torch.sigmoid(x))"}  # fmt: skip
        self.report(
            trainer, "loss_fn.unstable_log", "warning",
            f"torch.log is applied to the output of {' and '.join(ops)}: a probability that rounds to 0 (a logit about "
            "104 below the largest in float32, about 17 in float16) gives -inf and NaN gradients, which log_softmax / "
            f"logsigmoid avoid (checklist: NaNs from an unstable softmax).{seen}",
            f"Use {'; '.join(fixes[op] for op in ops)}; for a classification loss pass the logits to F.cross_entropy "
            "or F.binary_cross_entropy_with_logits.",
            {"ops": ops, "smallest_probability": smallest},
            step=0,
        )  # fmt: skip

    def _report_bce(self, trainer: pl.Trainer) -> None:
        self.report(
            trainer, "loss_fn.bce_on_sigmoid", "info",
            "F.binary_cross_entropy (nn.BCELoss) gets the output of sigmoid: above a logit of about 17 a float32 "
            "sigmoid rounds to exactly 1, BCE clamps log(1 - p) at -100 and the gradient of such an example is lost; "
            "under autocast (16-mixed, bf16-mixed) torch refuses binary_cross_entropy.",
            "Return logits and use F.binary_cross_entropy_with_logits (nn.BCEWithLogitsLoss): the same loss, "
            "computed stably.",
            step=0,
        )  # fmt: skip


class _LossCalls(TorchFunctionMode):
    """Records, during one ``training_step``, what the loss functions and ``torch.log`` receive."""

    def __init__(self) -> None:
        super().__init__()
        # weak references: a step that produces many softmaxes (attention) keeps only the ones still alive
        self.softmax_outputs: list[weakref.ref[Tensor]] = []
        self.sigmoid_outputs: list[weakref.ref[Tensor]] = []
        self.log_softmax_outputs: list[weakref.ref[Tensor]] = []
        self.flags: dict[str, int] = {}
        self.numbers: dict[str, Any] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        try:
            self._look(func, args, kwargs, output)
        except Exception:  # a look must never break the user's training_step
            pass
        return output

    def _look(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        try:
            hash(func)
        except TypeError:
            return
        first = args[0] if args else kwargs.get("input")
        if func in _SOFTMAX and isinstance(output, Tensor):
            self.softmax_outputs.append(weakref.ref(output))
        elif func in _SIGMOID and isinstance(output, Tensor):
            self.sigmoid_outputs.append(weakref.ref(output))
        elif func in _LOG_SOFTMAX and isinstance(output, Tensor):
            self.log_softmax_outputs.append(weakref.ref(output))
        elif func in _LOG and isinstance(first, Tensor):
            for op, outputs in (("softmax", self.softmax_outputs), ("sigmoid", self.sigmoid_outputs)):
                if _among(first, outputs):
                    self.flags[f"log_of_{op}"] = 1
                    smallest = float(first.detach().float().min())
                    self.numbers["smallest_probability"] = min(self.numbers.get("smallest_probability", 1.0), smallest)
        elif func is F.cross_entropy and isinstance(first, Tensor):
            dim = 1 if first.ndim >= 2 else 0
            if _among(first, self.softmax_outputs) or _probabilities(first, dim):
                self.flags["softmax_before_cross_entropy"] = 1
                self.numbers["classes"] = int(first.shape[dim])
        elif func is F.nll_loss and isinstance(first, Tensor) and not _among(first, self.log_softmax_outputs):
            dim = 1 if first.ndim >= 2 else 0
            if _probabilities(first, dim):
                self.flags["nll_on_probabilities"] = 1
            else:
                logsumexp = float(torch.logsumexp(first.detach().float(), dim=dim).median())
                if abs(logsumexp) > _LSE_TOLERANCE:
                    self.flags["nll_without_log_probs"] = 1
                    self.numbers["nll_logsumexp"] = logsumexp
        elif func is F.binary_cross_entropy and isinstance(first, Tensor):
            if _among(first, self.sigmoid_outputs):
                self.flags["bce_on_sigmoid"] = 1
        elif func is F.binary_cross_entropy_with_logits and isinstance(first, Tensor):
            if _among(first, self.sigmoid_outputs):
                self.flags["sigmoid_before_bce_with_logits"] = 1


def _negated(value: float | None) -> float | None:
    return None if value is None else -value


def _among(tensor: Tensor, refs: list[weakref.ref[Tensor]]) -> bool:
    return any(ref() is tensor for ref in refs)


def _probabilities(values: Tensor, dim: int) -> bool:
    """Whether ``values`` are probabilities along ``dim``: in [0, 1] and summing to 1 (at least two classes)."""
    if not values.is_floating_point() or values.ndim == 0 or values.numel() == 0 or values.shape[dim] < 2:
        return False
    x = values.detach().float()
    if float(x.min()) < 0 or float(x.max()) > 1:
        return False
    return float((x.sum(dim) - 1).abs().max()) <= _SUM_TOLERANCE
