"""BatchNormCheck: BatchNorm layers behind dropout (variance shift) and batch statistics from too few examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader

from lightning_debug.base import OneShotCheck
from lightning_debug.batches import check_probe_fns, default_input
from lightning_debug.distributed import reduce
from lightning_debug.isolation import isolated, on_device, probe_batches
from lightning_debug.stats import to_host

InputFn = Callable[[Any], Tensor]
ForwardFn = Callable[[pl.LightningModule, Any], Any]

_NORM = nn.modules.batchnorm._BatchNorm
_DROPOUT = nn.modules.dropout._DropoutNd


class BatchNormCheck(OneShotCheck):
    r"""Checklist items on batch normalisation: dropout before BatchNorm, and batch statistics from too few examples.

    **Variance shift** (checklist: "if you're using both dropout and batch norm together, be cautious of the order";
    Li et al. 2019, *Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift*).
    Dropout scales the units it keeps by ``1/(1-p)``, which makes the variance a BatchNorm behind it sees in
    training larger than the variance it sees at evaluation, when dropout is off. BatchNorm's running variance
    is learnt in training, so at evaluation it divides by too large a number and its outputs shrink: for zero-mean
    inputs straight behind ``Dropout(p)`` the variance ratio is ``1 - p`` (std ``sqrt(1 - p)``: 0.71 for
    ``p=0.5``). The check measures it instead of reading the architecture: at ``on_train_start`` it runs one
    training batch through the model in train mode as it trains, then twice more with every dropout module off,
    and compares the per-channel variance each BatchNorm receives: the ratio is ``1 / mean over channels of
    (variance with dropout / without)``. A BatchNorm is judged when it keeps running statistics
    (``track_running_stats``) and is in train mode, a dropout module in train mode ran before it, and the two
    dropout-off passes gave it the same input: one that other randomness reaches (``F.dropout(x, p,
    self.training)``, which follows its module's mode, noise layers) is not judged. The finding is an info: what
    the shift costs depends on the model (on the bundled digits, the zoo MLP with dropout 0.5 between two
    BatchNorms measures 0.62x, and re-estimating its statistics with dropout off after training changed its
    validation loss by 3% and its accuracy not at all), while deep networks with many BatchNorms behind dropout
    compound it (Li et al.).

    **Small batches**: BatchNorm normalises each example with the mean and variance of the examples on its device.
    With few of them those statistics are noisy and accuracy suffers (Wu & He 2018, *Group Normalization*:
    ResNet-50 ImageNet top-1 error 23.6% at 32 images per device, 24.8% at 8, 27.3% at 4, 34.7% at 2); gradient
    accumulation does not help, and under DDP each device normalises its own batch unless the layers are
    ``SyncBatchNorm``. Measured on the same batch: the examples each BatchNorm in train mode normalises over. The
    epoch's last batch is worked out from the training DataLoader (examples per device modulo the batch size,
    unless ``drop_last``): a last batch of 1 example makes ``BatchNorm1d`` raise at the end of the first epoch,
    which the warning at step 0 announces.

    The forwards run at ``on_train_start``; the findings are judged at the first training batch (before the first
    optimizer step): Lightning calls the LightningModule's own ``on_train_start`` after the callbacks', and a
    BatchNorm that is in eval mode by the first batch (frozen there with ``module.eval()``, e.g. a fine-tuned
    backbone) is judged neither for the shift nor for the batch size. The hook runs on that batch only.

    The forwards run under ``torch.no_grad`` inside :func:`~lightning_debug.isolation.isolated` (RNG streams,
    the loader's generators, BatchNorm buffers and train/eval flags restored), so training afterwards is
    bit-identical. A model without BatchNorm costs nothing; one without dropout modules one forward pass, one with
    them three. Under DDP every rank measures its own batch; the variance ratios are averaged and the batch sizes
    reduced (min) across ranks before they are judged. On resume from a checkpoint the check is not repeated.

    Logged scalars (step 0):

    ==================================  ===================================================================
    tag                                 meaning
    ==================================  ===================================================================
    ``batchnorm/eval_std_ratio``        the largest shift: std a BatchNorm's outputs have at evaluation
                                        relative to training, the square root of the variance ratio
    ``batchnorm/examples_per_device``   the fewest examples a BatchNorm normalises over (train mode; across
                                        the devices for ``SyncBatchNorm``)
    ==================================  ===================================================================

    Findings:

    ==============================  ========  ============================================================
    check                           severity  when
    ==============================  ========  ============================================================
    ``batchnorm.variance_shift``    info      a BatchNorm's outputs at evaluation would have a std more
                                              than ``max_shift`` off the one training gives them (dropout
                                              before it)
    ``batchnorm.small_batch``       warning   a BatchNorm in train mode normalises over fewer than
                                              ``min_batch`` examples per device
    ``batchnorm.small_last_batch``  warning   the epoch's last batch holds fewer than ``min_batch`` examples
    ``batchnorm.not_checked``       info      no training batch, no input tensor, lazy modules not
                                              initialised, or the forward raised
    ==============================  ========  ============================================================

    Args:
        min_batch: the fewest examples per device (or across devices for ``SyncBatchNorm``) a BatchNorm should
            normalise over; 8 is where the error curve of Wu & He starts to rise.
        max_shift: report BatchNorms whose evaluation std is off by more than this fraction (0.1: outputs below
            0.9x or above 1.1x the std training gives them; dropout ``p > 0.19`` straight into BatchNorm).
        input_fn: maps a batch to the model's input (default: the batch itself if it is a tensor, its first
            element if a tuple/list, or ``x``/``input``/``inputs``/``image(s)``/``input_ids`` of a dict).
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model on a batch (default:
            ``pl_module(input_fn(batch))``).

    Raises:
        ValueError: if an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import BatchNormCheck

        trainer = Trainer(callbacks=[BatchNormCheck()])
        trainer.fit(model, datamodule)   # at step 0: BatchNorms behind dropout, and too-small batches
    """

    _pending: tuple[list[tuple[str, nn.Module]], dict[str, Any]] | None = None  # measured, judged at the first batch

    def __init__(
        self,
        *,
        min_batch: int = 8,
        max_shift: float = 0.1,
        input_fn: InputFn | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(every_n_steps=None)
        if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 2:
            raise ValueError(f"`min_batch` must be an integer >= 2, got {min_batch!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, (int, float)) or not 0 < max_shift < 1:
            raise ValueError(f"`max_shift` must be a number in (0, 1), got {max_shift!r}")
        check_probe_fns(input_fn, forward_fn)
        self.min_batch = min_batch
        self.max_shift = float(max_shift)
        self.input_fn = input_fn
        self.forward_fn = forward_fn
        self.result: dict[str, Any] | None = None
        self._pending = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None:  # restored from a checkpoint: checked at the start of the run
            return
        norms: list[tuple[str, nn.Module]] = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, _NORM)]
        if not norms:
            self.result = {"status": "no_batchnorm"}
            return
        # Judged at the first batch: Lightning calls the LightningModule's own on_train_start after the callbacks',
        # and a BatchNorm frozen there (module.eval()) does not normalise over the batch.
        self._pending = (norms, self._measure(trainer, pl_module, norms))

    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_start",)

    def busy(self, step: int) -> bool:
        return self._pending is not None  # the first batch only

    def next_change(self, step: int) -> int | None:
        return step + 1 if self.busy(step) else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._finish(trainer)
        if "on_train_batch_start" not in vars(self) and type(self).on_train_batch_start is _ON_TRAIN_BATCH_START:
            # not needed again this run (where no callback puts it to sleep: several optimizers, manual optimization)
            self.on_train_batch_start = None  # type: ignore[assignment,method-assign]
            self._skipped_hooks.append("on_train_batch_start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # training ran no batch
            self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        assert self._pending is not None
        norms, local = self._pending
        self._pending = None
        self.result = self._judge(trainer, norms, local)
        scalars = {
            "batchnorm/eval_std_ratio": self.result.get("worst_std_ratio"),
            "batchnorm/examples_per_device": self.result.get("examples"),
        }
        self.log_scalars(trainer, {k: float(v) for k, v in scalars.items() if v is not None}, step=0)

    # ------------------------------------------------------------------ measure (local, no collectives)
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, norms: list[tuple[str, nn.Module]]) -> dict:
        lazy = [name for name, t in [*pl_module.named_parameters(), *pl_module.named_buffers()] if is_lazy(t)]
        if lazy:
            return {
                "problem": f"the model has lazy modules not initialised yet (`{lazy[0]}`)",
                "hint": "Initialise lazy modules before fit, e.g. with one forward pass on a batch in setup().",
            }
        probe = probe_batches(trainer)
        if isinstance(probe, str):
            return {"problem": probe}
        batches, loaders = probe
        modes = [(module, module.training) for module in pl_module.modules()]  # the run's own train/eval flags
        dropouts = [m for m in pl_module.modules() if isinstance(m, _DROPOUT) and _rate(m) > 0 and m.training]
        recorder = _NormInputs(pl_module, norms)
        try:
            with isolated(pl_module, train_mode=True, loaders=loaders):
                for module, training in modes:
                    module.training = training
                batch = on_device(trainer, next(iter(batches)))
                with trainer.precision_plugin.forward_context():
                    self._forward(pl_module, batch)  # as it trains
                    if dropouts and recorder.passes[0]:
                        for module in dropouts:
                            module.training = False
                        for _ in range(2):  # dropout off, twice: what still differs is other randomness
                            recorder.passes.append({})
                            self._forward(pl_module, batch)
                return recorder.summary(trainer.strategy.root_device)
        except StopIteration:
            return {"problem": "the training dataloader is empty"}
        except _NoInput as err:
            return {"problem": str(err)}
        except Exception as err:  # the user's forward: training will meet it again, not our crash
            return {"problem": f"the forward pass raised {type(err).__name__}: {err}"}
        finally:
            recorder.close()

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        inputs = self.input_fn(batch) if self.input_fn is not None else default_input(batch)
        if not isinstance(inputs, Tensor):
            raise _NoInput(f"no input tensor found in the batch ({type(batch).__name__})")
        return pl_module(inputs)

    # ------------------------------------------------------------------ judge (collectives: every rank)
    def _judge(self, trainer: pl.Trainer, norms: list[tuple[str, nn.Module]], local: dict[str, Any]) -> dict:
        device = trainer.strategy.root_device
        count = len(norms)
        ratio_t = local.get("ratios")
        if ratio_t is None:  # NaN: not measured (stays NaN through the mean)
            ratio_t = torch.full((count,), math.nan, dtype=torch.float64, device=device)
        # BatchNorms in eval mode now (frozen after the measurement) neither normalise over the batch nor learn running
        # statistics in training: not judged (a frozen one on any rank: NaN through the mean, +inf for the min)
        frozen = {name for name, module in norms if not module.training}
        if frozen:
            mask = torch.tensor([name in frozen for name, _ in norms], device=ratio_t.device)
            ratio_t = torch.where(mask, math.nan, ratio_t)
        examples = {name: n for name, n in (local.get("examples") or {}).items() if name not in frozen}
        # a BatchNorm not measured in train mode counts as +inf examples for the min; last: the epoch's last batch
        last = _last_batch(trainer)
        counts = [float(examples.get(name, math.inf)) for name, _ in norms] + [math.inf if last is None else last]
        examples_t = torch.tensor(counts, dtype=torch.float64)
        problem = torch.tensor([float("problem" in local)], dtype=torch.float64, device=device)
        problem_any = reduce(trainer, problem, "max")
        ratio_mean = reduce(trainer, ratio_t, "mean")
        examples_min = reduce(trainer, examples_t.to(device), "min")
        host = to_host([*problem_any.unbind(), *ratio_mean.unbind(), *examples_min.unbind()])
        if host[0] > 0:
            reason = local.get("problem", "another rank could not run it")
            self.report(
                trainer, "batchnorm.not_checked", "info",
                f"The BatchNorm check did not run: {reason}.",
                local.get("hint")
                or "Pass input_fn (batch -> input tensor), or forward_fn (pl_module, batch -> output), e.g. "
                "forward_fn=lambda module, batch: module(batch) for a forward that takes the whole batch.",
            )  # fmt: skip
            return {"status": "not_checked", "reason": reason}
        names = [name for name, _ in norms]
        ratios = host[1 : 1 + count]
        examples_host = host[1 + count : 1 + 2 * count]
        last_examples = host[1 + 2 * count]
        sync = [isinstance(module, nn.SyncBatchNorm) for _, module in norms]
        result: dict[str, Any] = {"status": "ok", "batchnorms": count}
        self._judge_shift(trainer, names, ratios, local.get("sources", {}), result)
        self._judge_batch(trainer, names, examples_host, sync, result)
        if any(math.isfinite(n) for n in examples_host) and math.isfinite(last_examples):
            self._judge_last_batch(trainer, int(last_examples), result)
        return result

    def _judge_shift(
        self, trainer: pl.Trainer, names: list[str], ratios: list[float], sources: dict[str, str], result: dict
    ) -> None:
        measured = [(name, math.sqrt(r)) for name, r in zip(names, ratios) if math.isfinite(r) and r > 0]
        if not measured:
            return
        worst_name, worst = max(measured, key=lambda item: abs(math.log(item[1])))
        result["worst_std_ratio"] = worst
        shifted = sorted(
            ((name, std) for name, std in measured if abs(std - 1) > self.max_shift),
            key=lambda item: -abs(math.log(item[1])),
        )
        result["shifted"] = {name: std for name, std in shifted}
        if not shifted:
            return
        listed = ", ".join(
            f"`{name}` {std:.2f}x" + (f" (after `{sources[name]}`)" if name in sources else "")
            for name, std in shifted[:5]
        )
        more = f" and {len(shifted) - 5} more" if len(shifted) > 5 else ""
        self.report(
            trainer, "batchnorm.variance_shift", "info",
            f"{len(shifted)} of {len(names)} BatchNorm layer(s) get a different input variance with dropout off: at "
            f"evaluation their outputs would have {listed}{more} the std training normalises them to (expected "
            f"1.00x; `{worst_name}` is off most). Dropout before BatchNorm shifts the variance between training "
            "and evaluation, and the running statistics carry the training one into evaluation.",
            "Move dropout after the last BatchNorm (e.g. only before the classifier), lower its p, or re-estimate the "
            "BatchNorm statistics after training with dropout off (a pass over training batches with the BatchNorms "
            "in train mode and dropout in eval mode); checklist: be cautious of the order of dropout and batch norm.",
            {"eval_std_ratio": result["shifted"], "after": {n: sources[n] for n, _ in shifted if n in sources}},
        )  # fmt: skip

    def _judge_batch(
        self, trainer: pl.Trainer, names: list[str], examples: list[float], sync: list[bool], result: dict
    ) -> None:
        world = max(int(trainer.world_size), 1)
        effective = [
            (name, int(n * world if is_sync else n))
            for name, n, is_sync in zip(names, examples, sync)
            if math.isfinite(n)
        ]
        if not effective:
            return
        fewest = min(n for _, n in effective)
        result["examples"] = fewest
        small = [name for name, n in effective if n < self.min_batch]
        if not small:
            return
        ddp = world > 1 and not any(sync)
        hint = (
            f"Use at least {self.min_batch} examples per device (16-32 is safer; gradient accumulation does not help "
            "BatchNorm)"
            + (f"; Trainer(sync_batchnorm=True) normalises over all {world} devices' examples" if ddp else "")
            + "; or replace BatchNorm with GroupNorm or LayerNorm, which do not depend on the batch."
        )
        self.report(
            trainer, "batchnorm.small_batch", "warning",
            f"{len(small)} BatchNorm layer(s) normalise over {fewest} example(s)"
            + (" per device" if not any(sync) else "")
            + f" ({', '.join(f'`{n}`' for n in small[:5])}{' and more' if len(small) > 5 else ''}); expected at "
            f"least {self.min_batch}. Batch statistics from so few examples are noisy: Wu & He (2018) measured "
            "ResNet-50's ImageNet error at 23.6% with 32 images per device, 24.8% with 8, 27.3% with 4, 34.7% with 2.",
            hint,
            {"examples": fewest, "min_batch": self.min_batch, "layers": small, "world_size": world},
        )  # fmt: skip

    def _judge_last_batch(self, trainer: pl.Trainer, last: int, result: dict) -> None:
        result["last_batch_examples"] = last
        if last >= self.min_batch or result.get("examples", self.min_batch) < self.min_batch:
            return  # a full epoch of small batches is small_batch's finding already
        crash = (
            " On a (1, C) input BatchNorm raises 'Expected more than 1 value per channel when training' there."
            if last == 1
            else ""
        )
        self.report(
            trainer, "batchnorm.small_last_batch", "warning",
            f"Each epoch ends with a batch of {last} example(s) per device (the rest after the full batches), and "
            f"the BatchNorm layers normalise that batch over {last}; expected at least {self.min_batch}.{crash}",
            "Pass drop_last=True to the training DataLoader, or pick a batch size that divides the number of "
            "training examples per device.",
            {"last_batch_examples": last, "min_batch": self.min_batch},
        )  # fmt: skip


class _NoInput(Exception):
    pass


class _NormInputs:
    """Forward pre-hooks on the BatchNorms: per-channel variance of their input in each pass, and the batch size.

    Pass 0 runs as the model trains, passes 1 and 2 with the dropout modules off. A BatchNorm is judged when it
    keeps running statistics, is in train mode, a dropout module ran before it, and passes 1 and 2 gave it the
    same input (else other randomness reaches it: functional dropout, noise layers).
    """

    def __init__(self, model: nn.Module, norms: list[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in norms]
        self.passes: list[dict[str, Tensor]] = [{}]
        self.examples: dict[str, int] = {}  # BatchNorm in train mode -> examples it normalises over (pass 0)
        self.sources: dict[str, str] = {}  # BatchNorm -> the dropout module that ran last before it (pass 0)
        self.judged: set[str] = set()  # BatchNorms in train mode with running statistics (pass 0)
        self._last_dropout: str | None = None
        self._handles = [
            module.register_forward_pre_hook(self._norm_hook(name), with_kwargs=True) for name, module in norms
        ]
        for name, module in model.named_modules():
            if isinstance(module, _DROPOUT) and _rate(module) > 0:
                self._handles.append(module.register_forward_hook(self._dropout_hook(name)))

    def _dropout_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if len(self.passes) == 1 and module.training:
                self._last_dropout = name

        return hook

    def _norm_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            current = self.passes[-1]
            x = args[0] if args else kwargs.get("input")
            if name in current or not isinstance(x, Tensor) or x.dim() < 2:
                return  # (a BatchNorm called twice in one forward: its first call)
            x = x.detach()
            current[name] = x.transpose(0, 1).reshape(x.shape[1], -1).float().var(dim=1)
            if len(self.passes) == 1 and module.training:
                self.examples[name] = int(x.shape[0])
                if getattr(module, "track_running_stats", False) and self._last_dropout is not None:
                    self.judged.add(name)
                    self.sources[name] = self._last_dropout

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def summary(self, device: torch.device) -> dict[str, Any]:
        """Batch sizes (host), and each judged BatchNorm's variance ratio, dropout off / on, as one float64 tensor
        on ``device`` (NaN: not judged), for the reduction and the one transfer.

        The ratio is ``1 / mean over channels of (variance on / variance off)``: the mean of the per-channel
        inflation is unbiased where a median over channels is not (with few examples most channels of one batch
        see few dropped units and the median leans towards no shift).
        """
        result: dict[str, Any] = {"examples": dict(self.examples), "sources": dict(self.sources)}
        if len(self.passes) < 3:
            return result
        on, off, again = self.passes
        ratios: list[Tensor] = []
        for name in self.names:
            var_on, var_off, var_again = on.get(name), off.get(name), again.get(name)
            if (
                name not in self.judged
                or var_on is None
                or var_off is None
                or var_again is None
                or not var_on.shape == var_off.shape == var_again.shape
            ):
                ratios.append(torch.tensor(math.nan, dtype=torch.float64, device=device))
                continue
            # channels without variance at evaluation (dead or constant) have no ratio
            live = var_off > 1e-12 * var_off.max().clamp_min(1e-30)
            inflation = torch.where(live, var_on / var_off.clamp_min(1e-30), math.nan).nanmean()
            random_elsewhere = ((var_again - var_off).abs() > 1e-4 * var_off.abs()).any()
            ratio = torch.where(random_elsewhere, math.nan, 1.0 / inflation)
            ratios.append(ratio.to(device=device, dtype=torch.float64))
        result["ratios"] = torch.stack(ratios)
        return result


_ON_TRAIN_BATCH_START = BatchNormCheck.on_train_batch_start


def _rate(module: nn.Module) -> float:
    return float(getattr(module, "p", 0.0))


def _last_batch(trainer: pl.Trainer) -> int | None:
    """Examples in the epoch's last batch on this device when it is not a full one and training reaches it (a plain
    DataLoader that keeps its last batch; not cut off by ``overfit_batches``, ``limit_train_batches`` or a
    ``max_steps`` within the first epoch), else None."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or loader.drop_last:
        return None
    try:
        examples = len(loader.sampler)  # type: ignore[arg-type]  # (per device under a DistributedSampler)
    except Exception:  # a sampler without a length (an iterable dataset's, a custom one)
        return None
    remainder = examples % loader.batch_size
    batches = math.ceil(examples / loader.batch_size)
    if not remainder or trainer.num_training_batches != batches:
        return None  # no partial batch, or the epoch stops before it
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and max_steps * trainer.accumulate_grad_batches < batches:
        return None
    return remainder
