"""WeightStatsMonitor: the spread of every layer's weights across depth, from init on, and weights that never move."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_debug.base import DiagnosticCallback
from lightning_debug.optimizers import rounded_away, rounded_away_text
from lightning_debug.stats import foreach_norms, fused_norms, to_host
from lightning_debug.validation import check_float


class WeightStatsMonitor(DiagnosticCallback):
    r"""Checklist item "plot variance of weights": is each layer's weight spread what its init should give?

    **At fit start** (step 0, not on resume) every trainable weight with a fan-in is compared with the stds the
    common initialisations give for its fan-in and fan-out. Weights with a fan-in are the weights of ``nn.Linear``,
    ``nn.Bilinear`` and the conv layers, the ``weight_ih``/``weight_hh`` matrices of RNN/LSTM/GRU layers and cells
    and the projection weights of ``nn.MultiheadAttention``; any other parameter with ``ndim >= 2`` (a custom
    layer's ``nn.Parameter``) counts as one unless it is shaped to be broadcast and added to activations (a size-1
    dimension ahead of a larger one: ``(1, 1, d)``, ``(1, T, d)``, ``(T, 1, d)``; trailing size-1 dimensions, as in
    a ``(out, in, 1, 1)`` kernel, do not count) or its name marks it as an embedding or a token (a word part such as
    ``emb...``, ``pos``, ``position...``, ``pe``, ``token``, ``cls``, ``query``, ``prompt``, ``latent``,
    ``register``, ``codebook`` or ``bias``: ``cls_token``, ``pos_embedding``, ``latents``). ``nn.Embedding``
    weights, class/position tokens and embeddings are skipped: ``N(0, 1)`` and small constant inits are standard for
    them. Those stds are: PyTorch's default :math:`1/\sqrt{3\,\mathrm{fan}}`, Kaiming/He
    :math:`\sqrt{2/\mathrm{fan}}` (both with fan-in and fan-out) and Xavier/Glorot
    :math:`\sqrt{2/(\mathrm{fan_{in}} + \mathrm{fan_{out}})}`. A weight whose std is above ``too_large`` times the
    largest of these (about 10x PyTorch's default) or below ``too_small`` times the smallest raises
    ``weight_stats.bad_init``: the init is "not kicking in" (a manual ``randn`` without scaling, a stray multiplier,
    a tiny constant std in a deep net). All-equal non-zero weights raise ``weight_stats.constant_init`` (symmetry is
    never broken); all-zero weight matrices are an info finding (legitimate for a final or residual layer, a bug
    anywhere else).

    **On measured steps** it logs each parameter's std (fused norms and sums, one host transfer) so one chart shows
    the spread across depth over training, and histograms to TensorBoard. A trainable parameter that stays exactly
    unchanged over ``patience`` of its own measurements while others move raises ``weight_stats.frozen``: it is not
    in the optimizer, a ``.detach()`` cuts its gradient, or it is unused in ``forward``. Parameters with
    ``requires_grad=False`` are frozen on purpose and never reported. A parameter's reference is its value at the
    first measurement where it is trainable, and its count of measurements starts there: a parameter unfrozen
    mid-run (gradual unfreezing, ``optimizer.add_param_group``) is judged only ``patience`` measurements after it
    became trainable, and one frozen again drops its reference and gets a fresh one when it is unfrozen.

    Under DDP the parameters are identical on every rank, so every rank judges the same numbers without a
    collective; rank 0 logs. The init verdict, the change tracking and the findings survive checkpoint and resume.

    Logged (measured steps):

    ==================================  ==================================================================
    tag                                 meaning
    ==================================  ==================================================================
    ``weight_stats/<param>/std``        std of the parameter's values (one chart: the spread across depth)
    ``weight_stats/<param>`` (hist.)    histogram of the values, when ``histograms=True`` (TensorBoard)
    ==================================  ==================================================================

    Findings:

    ================================  ========  ===========================================================
    check                             severity  when
    ================================  ========  ===========================================================
    ``weight_stats.bad_init``         warning   a weight's std at init is outside the band above
    ``weight_stats.constant_init``    warning   all values of a weight matrix are equal and non-zero at init
    ``weight_stats.zero_init``        info      a weight matrix is all zeros at init
    ``weight_stats.frozen``           warning   a trainable parameter never changed over ``patience``
                                                measurements while others did
    ``weight_stats.bias_before_norm`` info      the same for a bias feeding BatchNorm/GroupNorm directly
                                                (its gradient is 0 by construction: use ``bias=False``)
    ================================  ========  ===========================================================

    Args:
        every_n_steps: measure every this many optimizer steps; ``None``: every ``2 * Trainer(log_every_n_steps)``
            steps (100 at Lightning's default).
        too_large: a weight's std above this multiple of the largest common init std is a bad init.
        too_small: a weight's std below this multiple of the smallest common init std is a bad init.
        patience: measurements of a parameter (after its reference) without any change before
            ``weight_stats.frozen``.
        histograms: log a histogram of every parameter on measured steps (costs one host copy of the weights).
        check_init: run the init check at fit start (set False for pretrained weights).

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import WeightStatsMonitor

        trainer = Trainer(callbacks=[WeightStatsMonitor(every_n_steps=25)])
        trainer.fit(model, datamodule)   # tensorboard: weight_stats/*/std, HISTOGRAMS weight_stats/*
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        too_large: float = 4.0,
        too_small: float = 0.1,
        patience: int = 5,
        histograms: bool = True,
        check_init: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        check_float("too_large", too_large, low=1.0)
        check_float("too_small", too_small, low=0.0, high=1.0)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {patience!r}")
        for name, flag in (("histograms", histograms), ("check_init", check_init)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}")
        self.too_large = float(too_large)
        self.too_small = float(too_small)
        self.patience = patience
        self.histograms = histograms
        self.check_init = check_init
        self.init_result: dict[str, Any] | None = None
        self.last_std: dict[str, float] = {}
        self._reference: dict[str, tuple[float, float]] = {}  # name -> (norm, sum) when first measured trainable
        self._counts: dict[str, int] = {}  # name -> measurements since its reference was taken
        self._changed: dict[str, bool] = {}
        self._measurements = 0
        self._frozen_reported: set[str] = set()
        self._last_measured_step = -1
        self._before_norm: set[str] = set()  # biases feeding a normalisation layer (their gradient is 0)
        self._norm_probe: BiasBeforeNormProbe | None = None

    # ------------------------------------------------------------------ hooks
    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_end",)

    def busy(self, step: int) -> bool:
        return self._norm_probe is not None or super().busy(step)  # the probe closes at the first batch's end

    def next_change(self, step: int) -> int | None:
        return step + 1 if self._norm_probe is not None else super().next_change(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._norm_probe is not None:
            self._norm_probe.close()
            self._norm_probe = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.on_train_end(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_init and self.init_result is None and trainer.global_step == 0:
            self.init_result = self._check_init(trainer, pl_module)
        self._norm_probe = BiasBeforeNormProbe(pl_module)  # watches the first training forward only
        if not self._reference:  # the reference for "never changed" is the weights at fit start
            self._last_measured_step = int(trainer.global_step)
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._norm_probe is not None:
            self._before_norm |= self._norm_probe.close()
            self._norm_probe = None
        step = int(trainer.global_step)
        if step == self._last_measured_step or not self.is_measured_step(trainer):
            return  # gradient accumulation: global_step stays put over several batches
        self._last_measured_step = step
        self._measure(trainer, pl_module)

    # ------------------------------------------------------------------ init check
    def _check_init(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        embeddings = {id(m.weight) for m in pl_module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        layer_weights = _layer_weights(pl_module)
        weights = [
            (name, p)
            for name, p in pl_module.named_parameters()
            if p.requires_grad
            and p.dim() >= 2
            and id(p) not in embeddings
            and p.numel() > 1
            and (id(p) in layer_weights or _has_fan_in(name, p))
        ]
        if not weights:
            return {}
        norms = foreach_norms([p for _, p in weights])
        sums = [p.detach().float().sum() for _, p in weights]
        firsts = [(p.detach().reshape(-1)[0].float()) for _, p in weights]
        maxdiffs = [(p.detach().float() - p.detach().reshape(-1)[0].float()).abs().amax() for _, p in weights]
        host = to_host([*norms, *sums, *firsts, *maxdiffs])  # one transfer
        count = len(weights)
        result: dict[str, Any] = {}
        bad: list[tuple[str, float, int, dict[str, float], str]] = []
        constant: list[tuple[str, float]] = []
        zero: list[tuple[str, float]] = []
        for k, (name, p) in enumerate(weights):
            norm, total, first, spread = host[k], host[count + k], host[2 * count + k], host[3 * count + k]
            std = _std(norm, total, p.numel())
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
            references = _init_stds(fan_in, fan_out)
            low, high = min(references.values()) * self.too_small, max(references.values()) * self.too_large
            result[name] = {"std": std, "fan_in": fan_in, "fan_out": fan_out, "low": low, "high": high}
            if spread == 0.0:
                (zero if first == 0.0 else constant).append((name, first))
            elif not low <= std <= high:
                bad.append((name, std, fan_in, references, "large" if std > high else "small"))
        self._report_init(trainer, bad, constant, zero)
        return result

    def _report_init(
        self,
        trainer: pl.Trainer,
        bad: list[tuple[str, float, int, dict[str, float], str]],
        constant: list[tuple[str, float]],
        zero: list[tuple[str, float]],
    ) -> None:
        if bad:
            name, _, _, refs, _ = max(bad, key=lambda b: abs(math.log(max(b[1], 1e-30) / b[3]["pytorch"])))
            words = "; ".join(
                f"`{n}` std {s:.3g} ({s / r['pytorch']:.3g}x PyTorch's default {r['pytorch']:.3g} for fan-in {f})"
                for n, s, f, r, _ in bad[:5]
            )
            self.report(
                trainer,
                "weight_stats.bad_init",
                "warning",
                f"{len(bad)} weight(s) start far from any standard init: {words}. Expected between "
                f"{self.too_small:g}x the smallest and {self.too_large:g}x the largest of the default, Kaiming and "
                "Xavier stds for their fan-in/fan-out.",
                f"Initialise {', '.join(f'`{n}`' for n, *_ in bad[:5])}{' and the rest' if len(bad) > 5 else ''} "
                "with a scaled init instead of an unscaled randn / a constant std / a stray multiplier: "
                "nn.init.kaiming_normal_(w, nonlinearity='relu') before ReLU-family activations, "
                "nn.init.xavier_uniform_(w) before tanh/sigmoid (gain=5/3 for tanh) or for a linear output "
                f"(for `{name}`: std {refs['kaiming_in']:.3g} and {refs['xavier']:.3g}); with many layers, add "
                "BatchNorm/LayerNorm so the spread stays consistent across depth.",
                {"weights": [{"name": n, "std": s, "fan_in": f, "side": d, **r} for n, s, f, r, d in bad]},
            )
        if constant:
            self.report(
                trainer,
                "weight_stats.constant_init",
                "warning",
                f"{len(constant)} weight matrix(es) start with all values equal and non-zero: "
                + ", ".join(f"`{n}` = {v:.3g}" for n, v in constant[:5])
                + ". Every unit of such a layer computes the same thing and receives the same gradient: symmetry is "
                "never broken.",
                "Use a random init (nn.init.kaiming_normal_ / xavier_uniform_, or PyTorch's default) instead of a "
                "constant fill.",
                {"weights": [n for n, _ in constant]},
            )
        if zero:
            self.report(
                trainer,
                "weight_stats.zero_init",
                "info",
                f"{len(zero)} weight matrix(es) start at exactly zero: "
                + ", ".join(f"`{n}`" for n, _ in zero[:5])
                + ". Fine for a final layer or a residual branch; a zero hidden layer never breaks symmetry.",
                "If it is a hidden layer, initialise it randomly (nn.init.kaiming_normal_).",
                {"weights": [n for n, _ in zero]},
            )

    # ------------------------------------------------------------------ measured steps
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.numel() > 0]
        if not named:
            return
        tensors = [p for _, p in named]
        with torch.no_grad():  # one fused norm pass; one sum kernel per tensor, accumulated in float32
            norms = fused_norms(tensors)
            sums = [p.sum(dtype=torch.float32) for p in tensors]
        host = to_host([*norms, *sums])  # one transfer per measured step
        count = len(named)
        scalars = {}
        moved_any = False
        unchanged: list[str] = []
        for k, (name, p) in enumerate(named):
            norm, total = host[k], host[count + k]
            std = _std(norm, total, p.numel())
            self.last_std[name] = std
            if math.isfinite(std):
                scalars[f"weight_stats/{name}/std"] = std
            if not p.requires_grad:  # frozen on purpose: a fresh reference once it is trainable again
                self._reference.pop(name, None)
                self._counts.pop(name, None)
                self._changed.pop(name, None)
                continue
            if name not in self._reference:  # first trainable measurement: the reference, nothing to compare yet
                self._reference[name] = (norm, total)
                self._counts[name] = 0
                self._changed[name] = False
                continue
            self._counts[name] = self._counts.get(name, 0) + 1
            moved = (norm, total) != self._reference[name]
            self._changed[name] = self._changed.get(name, False) or moved
            moved_any = moved_any or moved
            if not self._changed[name] and self._counts[name] >= self.patience:
                unchanged.append(name)
        self._measurements += 1
        self.log_scalars(trainer, scalars)
        if self.histograms and self.tensorboard(trainer) is not None:
            for name, p in named:
                self.log_histogram(trainer, f"weight_stats/{name}", p)
        self._judge_frozen(trainer, unchanged, dict(named))

    def _judge_frozen(self, trainer: pl.Trainer, unchanged: list[str], params: dict[str, Tensor]) -> None:
        if not unchanged or not any(self._changed.values()):
            return  # none unchanged for `patience` measurements, or nothing moved at all (skipped steps, lr 0)
        new = [name for name in unchanged if name not in self._frozen_reported]
        if not new:
            return
        self._frozen_reported.update(new)
        before_norm = [name for name in new if name in self._before_norm]
        new = [name for name in new if name not in self._before_norm]
        if before_norm:
            self.report(
                trainer,
                "weight_stats.bias_before_norm",
                "info",
                f"{len(before_norm)} bias(es) feed a normalisation layer, which subtracts them again: their gradient "
                f"is zero and they never change: {', '.join(f'`{n}`' for n in before_norm[:8])}.",
                "Harmless; create those layers with bias=False to save the parameters.",
                {"parameters": before_norm},
            )
        rounded = rounded_away({name: params[name] for name in new if name in params})
        new = [name for name in new if name not in rounded]
        if rounded:  # 16-bit weights with a gradient: the updates round away, nothing cuts the gradient
            message, hint = rounded_away_text(rounded, params)
            counts = {name: self._counts[name] for name in rounded}
            self.report(trainer, "weight_stats.frozen", "warning", message, hint,
                        {"parameters": rounded, "measurements": min(counts.values()), "per_parameter": counts,
                         "rounded_away": True})  # fmt: skip
        if not new:
            return
        counts = {name: self._counts[name] for name in new}
        low, high = min(counts.values()), max(counts.values())
        self.report(
            trainer,
            "weight_stats.frozen",
            "warning",
            f"{len(new)} trainable parameter(s) never changed over {low if low == high else f'{low} to {high}'} "
            f"measurements since they became trainable (expected: any change, like the others): "
            f"{', '.join(f'`{n}`' for n in new[:8])}" + (f" and {len(new) - 8} more" if len(new) > 8 else "") + ".",
            "Check that they are in the optimizer (configure_optimizers uses self.parameters()), that no .detach() "
            "or torch.no_grad() cuts their gradient, and that forward uses them; set requires_grad=False for "
            "parameters you mean to freeze.",
            {"parameters": new, "measurements": low, "per_parameter": counts},
        )

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        return {
            "measurements": self._measurements,
            "frozen": sorted(self._frozen_reported),
            "bad_init": sorted(
                name
                for name, r in (self.init_result or {}).items()
                if r["std"] > 0 and not r["low"] <= r["std"] <= r["high"]
            ),
        }

    def extra_state(self) -> dict[str, Any]:
        return {
            "init_result": self.init_result,
            "reference": {k: list(v) for k, v in self._reference.items()},
            "counts": dict(self._counts),
            "changed": dict(self._changed),
            "measurements": self._measurements,
            "frozen_reported": sorted(self._frozen_reported),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.init_result = state.get("init_result")
        self._reference = {k: (float(v[0]), float(v[1])) for k, v in state.get("reference", {}).items()}
        self._changed = dict(state.get("changed", {}))
        self._measurements = int(state.get("measurements", 0))
        # states without per-parameter counts took every reference at the first measurement
        counts = state.get("counts", dict.fromkeys(self._reference, max(self._measurements - 1, 0)))
        self._counts = {str(k): int(v) for k, v in counts.items() if k in self._reference}
        self._counts.update((k, 0) for k in self._reference if k not in self._counts)
        self._frozen_reported = set(state.get("frozen_reported", []))


class BiasBeforeNormProbe:
    """During one forward: which modules' outputs go straight into a normalisation layer (their bias is moot)."""

    _NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

    def __init__(self, model: nn.Module) -> None:
        self._outputs: list[tuple[str, Any]] = []  # kept alive for one forward so ids stay unique
        self._found: set[str] = set()
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if isinstance(module, self._NORMS):
                self._handles.append(module.register_forward_pre_hook(self._norm_hook))
            elif isinstance(getattr(module, "bias", None), nn.Parameter) and name:
                self._handles.append(module.register_forward_hook(self._output_hook(f"{name}.bias")))

    def _output_hook(self, bias_name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs.append((bias_name, output))

        return hook

    def _norm_hook(self, module: nn.Module, args: Any) -> None:
        if args:
            self._found.update(name for name, output in self._outputs if output is args[0])

    def close(self) -> set[str]:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        return self._found


_LAYER_WEIGHTS = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    nn.Linear: ("weight",),
    nn.Bilinear: ("weight",),
    nn.modules.conv._ConvNd: ("weight",),
}
# word parts of a parameter's name that mark an embedding or a token, added to activations rather than multiplied
_EMBEDDING_WORDS = re.compile(
    r"emb\w*|pos|positions?|positional|pe|tokens?|cls|query|queries|prompts?|latents?|registers?|codebooks?|bias(es)?"
)


def _layer_weights(model: nn.Module) -> set[int]:
    """Ids of the weights of layers known to multiply their input: their fan-in is meaningful."""
    found: set[int] = set()
    for module in model.modules():
        names: tuple[str, ...] = ()
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            names = tuple(n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_"))
        for kind, attributes in _LAYER_WEIGHTS.items():
            if isinstance(module, kind):
                names += attributes
        for attribute in names:
            p = getattr(module, attribute, None)
            if isinstance(p, Tensor):
                found.add(id(p))
    return found


def _has_fan_in(name: str, p: Tensor) -> bool:
    """Whether a parameter of no known layer looks like a matmul/conv weight, not an embedding or a token."""
    shape = tuple(p.shape)
    if any(size == 1 and any(later > 1 for later in shape[k + 1 :]) for k, size in enumerate(shape)):
        return False  # broadcast shape, e.g. (1, 1, d) / (1, T, d): added to activations
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name.rsplit(".", 1)[-1])  # the parameter's own name
    return not any(_EMBEDDING_WORDS.fullmatch(word.lower()) for word in words)


def _init_stds(fan_in: int, fan_out: int) -> dict[str, float]:
    """The stds the common initialisations give a weight with this fan-in and fan-out."""
    return {
        "pytorch": 1 / math.sqrt(3 * fan_in),
        "kaiming_in": math.sqrt(2 / fan_in),
        "pytorch_out": 1 / math.sqrt(3 * fan_out),
        "kaiming_out": math.sqrt(2 / fan_out),
        "xavier": math.sqrt(2 / (fan_in + fan_out)),
    }


def _std(norm: float, total: float, numel: int) -> float:
    """Unbiased std from the L2 norm and the sum."""
    if numel < 2 or not (math.isfinite(norm) and math.isfinite(total)):
        return 0.0 if numel < 2 else math.nan
    mean = total / numel
    return math.sqrt(max(norm * norm - numel * mean * mean, 0.0) / (numel - 1))
