"""Step-time and memory overhead of the lightning_debug callbacks, against no callbacks and against the peers.

Not a test: a harness that prints Markdown tables (and optionally writes them and a JSON file).

What it does
------------
- **Models** (synthetic in-memory data, no download): an MLP, a CNN with BatchNorm, and Lightning's demo
  ``Transformer`` (``lightning.pytorch.demos.Transformer``; vocab 1000, sequence 32) wrapped in a LightningModule.
- **Configurations**, run on every model: no callbacks (the baseline), each lightning_debug callback alone at its
  defaults, ``lightning_debug.suite(num_classes=...)`` (everything at defaults), and the peers at the same cadence:
  Lightning's ``grad_norm()`` logged with ``self.log_dict`` in ``on_before_optimizer_step`` (every step, as
  documented), ``Trainer(detect_anomaly=True)`` (the peer of NaNGuard), ``wandb.watch(model, log="all",
  log_freq=100)`` in offline mode (when wandb is installed), and Cockpit's ``"economy"`` configuration tracked every
  100 steps (the monitors' per-layer cadence, ``measure_every``; MLP only: BackPACK cannot extend BatchNorm in train
  mode or ``nn.Transformer``; when importable).
- **Paired blocks** (``--blocks N``): one run per (model, configuration) whose callbacks are switched on and off
  every measurement interval (``measure_every(--every)`` steps), ``N`` on/off pairs (see ``_Toggle``): robust to a
  machine whose speed drifts between runs. The peers ``grad_norm()`` + ``log_dict`` and ``detect_anomaly`` are
  switched the same way, as callbacks (``SWITCHABLE_PEERS``).
- **A/B interleaved**: ``--rounds`` rounds; every round runs every (model, configuration) once, in a shuffled
  order, in this one process. Ratios are taken within a round against that round's baseline of the same model;
  the tables show the median over rounds and the min-max spread.
- **Timing**: a timer callback takes ``perf_counter()`` at ``on_train_batch_start`` (first in the callback list)
  and at ``on_train_batch_end`` (last in the list). A step's time is from its ``on_train_batch_start`` to the next
  one: it includes every callback hook and Lightning's own logging (which runs after ``on_train_batch_end``, so
  ``grad_norm()``'s logger writes are counted). On CUDA the timer synchronizes, and nothing else added here does.
  The first ``--warmup`` steps of every run are not timed.
- **Measured vs unmeasured steps**: with ``Trainer(log_every_n_steps=50)`` the monitors measure at the optimizer
  step ``s`` with ``s % 50 == 0`` (read in ``on_before_optimizer_step``) and Lightning writes its logs after the
  step with ``(s + 1) % 50 == 0``; both kinds are "measured" steps here, all others "unmeasured".
- **Size sweep**: an MLP of about 1M, 5M, 20M and 50M parameters, each configuration in a fresh subprocess, for
  step time and peak memory (peak RSS from ``resource.getrusage``; on CUDA ``torch.cuda.max_memory_allocated``).
- A TensorBoardLogger writes into a temporary directory, so logging costs are real.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/run.py                 # the full run (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick                           # a 1-2 minute smoke run
    .venv/bin/python benchmarks/run.py --blocks 20 --configs suite       # paired on/off blocks (the headline)
    .venv/bin/python benchmarks/run.py --models mlp --configs none,suite,GradNormMonitor --rounds 3

``--markdown PATH`` writes the tables, ``--json PATH`` the raw numbers (per-round, per-step means).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parent.parent
try:  # the installed (or PYTHONPATH) lightning_debug; else the checkout this script lives in
    import lightning_debug
except ImportError:
    sys.path.insert(0, str(REPO))

import lightning_debug  # noqa: E402
from lightning_debug import NaNGuard, UpdateRatioMonitor  # noqa: E402
from lightning_debug.base import DiagnosticCallback  # noqa: E402

LOG_EVERY = 50  # Trainer(log_every_n_steps) and therefore the monitors' default cadence
# every callback of the suite at its defaults, in the suite's order (follows lightning_debug.suite as it grows)
CALLBACKS = tuple(type(cb).__name__ for cb in lightning_debug.suite(num_classes=10))
PEERS = ("grad_norm() log_dict", "detect_anomaly", "wandb.watch(all)", "cockpit economy")
# Not a product configuration: the least per-step work the suite's contracts allow (see _ContractFloor)
FLOOR = "contract-floor"
ALL_CONFIGS = ("none", *CALLBACKS, "suite", *PEERS, FLOOR)
MODELS = ("mlp", "cnn", "transformer")


# ---------------------------------------------------------------------------------------------- data and models
class BatchPool(Dataset):
    """``length`` ready-made batches cycling through a small pool (a DataLoader with ``batch_size=None``)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index % len(self.batches)]


class BenchModule(pl.LightningModule):
    """A classifier around ``net`` (Adam)."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TransformerModule(BenchModule):
    """Lightning's demo Transformer (encoder-decoder, log-probabilities out) on synthetic token pairs."""

    def __init__(self, vocab: int, lr: float = 1e-3) -> None:
        from lightning.pytorch.demos import Transformer

        super().__init__(Transformer(vocab_size=vocab, ninp=128, nhead=4, nhid=256, nlayers=2), lr=lr)

    def forward(self, inputs: Tensor, target: Tensor | None = None) -> Tensor:
        # the demo feeds the target sequence to the decoder; without one (fixed-batch evaluation) the inputs
        return self.net(inputs, inputs if target is None else target)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))


def mlp(inputs: int, width: int, depth: int, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = [inputs] + [width] * depth
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], classes))


def cnn(classes: int = 10) -> nn.Sequential:
    def block(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def sweep_width(params: float, inputs: int = 1024, depth: int = 4, classes: int = 10) -> int:
    """The hidden width of a ``depth``-hidden-layer MLP with about ``params`` parameters."""
    # params ~ (depth - 1) w^2 + (inputs + classes + depth) w
    a, b = depth - 1, inputs + classes + depth
    return max(8, round((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)))


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], BenchModule]
    batches: Callable[[torch.Generator], list[tuple[Tensor, Tensor]]]
    num_classes: int
    description: str = ""


def model_spec(name: str, batch_size: int | None = None) -> ModelSpec:
    if name == "mlp":
        bs = batch_size or 128
        return ModelSpec(
            "mlp",
            lambda: BenchModule(mlp(784, 512, 2)),
            lambda g: [(torch.randn(bs, 784, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(4)],
            10,
            f"MLP 784-512-512-10, ReLU, batch {bs}, Adam",
        )
    if name == "cnn":
        bs = batch_size or 32
        return ModelSpec(
            "cnn",
            lambda: BenchModule(cnn()),
            lambda g: [
                (torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(4)
            ],
            10,
            f"CNN 3x(conv3x3-BatchNorm-ReLU) 32-64-128 + linear, 32x32x3 inputs, batch {bs}, Adam",
        )
    if name == "transformer":
        bs, vocab, seq = batch_size or 8, 1000, 32
        return ModelSpec(
            "transformer",
            lambda: TransformerModule(vocab),
            lambda g: [
                (torch.randint(0, vocab, (bs, seq), generator=g), torch.randint(0, vocab, (bs, seq), generator=g))
                for _ in range(4)
            ],
            vocab,
            f"lightning.pytorch.demos.Transformer(vocab_size={vocab}, ninp=128, nhead=4, nhid=256, nlayers=2), "
            f"seq {seq}, batch {bs}, Adam",
        )
    if name.startswith("mlp-"):  # size sweep: mlp-<params>, e.g. mlp-5000000
        params = float(name.split("-", 1)[1])
        width, bs = sweep_width(params), batch_size or 32
        return ModelSpec(
            name,
            lambda: BenchModule(mlp(1024, width, 4)),
            lambda g: [
                (torch.randn(bs, 1024, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(4)
            ],
            10,
            f"MLP 1024-{width}x4-10, batch {bs}, Adam",
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODELS} or mlp-<params>")


# ---------------------------------------------------------------------------------------------- timing
class StepClock:
    """Per-step timestamps shared by the two timer callbacks."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.starts: list[float] = []
        self.cpu: list[float] = []  # process CPU time at each step start
        self.ends: list[float] = []
        self.steps: list[int] = []

    def hook_now(self) -> float:
        """For the hook profile: this thread's CPU time when torch computes on it alone (robust to other load)."""
        if not self.cuda and torch.get_num_threads() == 1:
            return time.thread_time()
        return self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # the only synchronisation the harness adds
        return time.perf_counter()


class _TimerStart(Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.clock.starts.append(self.clock.now())
        self.clock.cpu.append(time.process_time())
        self.clock.steps.append(int(trainer.global_step))


HOOKS = (
    "on_train_start", "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end", "on_train_epoch_end", "on_train_end",
)  # fmt: skip


def instrument(callbacks: list[Callback], clock: StepClock, sink: dict[tuple[str, int], float]) -> Callable[[], None]:
    """Wrap every hook a callback's class overrides to add its time to ``sink[(class name, step)]`` (step -1: before
    step 0); returns the function that unwraps them.

    The wrappers go on the classes, not the instances: lightning_debug puts a monitor's hooks to sleep between its
    busy steps through instance attributes, and that must work as in any other run. Time spent in an optimizer step
    post-hook (UpdateRatioMonitor) or NaNGuard's step gate is not seen here.
    """
    undo: list[tuple[type, str, Any]] = []
    for cls in {type(cb) for cb in callbacks}:
        name = cls.__name__
        for hook in HOOKS:
            original = getattr(cls, hook)
            if original is getattr(Callback, hook):
                continue

            def wrapper(
                self: Callback,
                *args: Any,
                _original: Callable[..., Any] = original,
                _name: str = name,
                _hook: str = hook,
                **kwargs: Any,
            ) -> Any:
                start = clock.hook_now()
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    elapsed = clock.hook_now() - start
                    step = clock.steps[-1] if clock.steps else -1
                    sink[(_name, step)] = sink.get((_name, step), 0.0) + elapsed
                    sink[(f"{_name}.{_hook}", step)] = sink.get((f"{_name}.{_hook}", step), 0.0) + elapsed

            undo.append((cls, hook, cls.__dict__.get(hook, _MISSING)))
            setattr(cls, hook, wrapper)

    def unwrap() -> None:
        for cls, hook, previous in reversed(undo):
            if previous is _MISSING:
                delattr(cls, hook)
            else:
                setattr(cls, hook, previous)

    return unwrap


_MISSING = object()


class _TimerEnd(Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.summaries: dict[str, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.clock.ends.append(self.clock.now())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before teardown, which lets go of NaNGuard's snapshot
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, NaNGuard):
                self.summaries["NaNGuard"] = cb.summary()


class _SyncCounter(Callback):
    """CUDA only: count synchronising calls per step with ``torch.cuda.set_sync_debug_mode("warn")``."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.counts: dict[int, int] = {}
        self._catch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop()
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        step = self.clock.steps[-1]
        self._stop()
        self.counts[step] = self._last

    def _stop(self) -> None:
        self._last = 0
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._last = sum("synchroniz" in str(w.message) for w in self._records)
            self._catch.__exit__(None, None, None)
            self._catch = None


class _WandbWatch(Callback):
    """The peer: ``wandb.watch(model, log="all", log_freq=100)`` in an offline run (the monitors' cadence)."""

    def __init__(self, directory: str, log_freq: int) -> None:
        self.directory = directory
        self.log_freq = log_freq
        self.run: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        self.run = wandb.init(mode="offline", dir=self.directory, project="lightning_debug_bench", reinit=True)
        wandb.watch(pl_module, log="all", log_freq=self.log_freq)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        if self.run is not None:
            wandb.unwatch(pl_module)
            self.run.finish()
            self.run = None


class CockpitModule(BenchModule):
    """Cockpit (BackPACK) around the MLP: ``configuration("economy")`` tracked every ``every`` steps."""

    def __init__(self, net: nn.Module, every: int) -> None:
        from backpack import extend

        super().__init__(extend(net))
        self.every = every
        self.cockpit: Any = None
        self._losses: Tensor | None = None
        self._loss_fn = extend(nn.CrossEntropyLoss())

    def on_train_start(self) -> None:
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration
        from cockpit.utils.schedules import linear

        self.cockpit = Cockpit(
            self.parameters(), quantities=configuration("economy", track_schedule=linear(self.every))
        )

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        out = self(x)
        self._losses = F.cross_entropy(out, y, reduction="none")
        return self._loss_fn(out, y)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        step = int(self.trainer.global_step)
        info = {
            "batch_size": int(self._losses.shape[0]) if self._losses is not None else 1,
            "individual_losses": self._losses,
            "loss": loss,
            "optimizer": self.trainer.optimizers[0],
        }
        with self.cockpit(step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(step))
        self._losses = None


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def config_available(config: str, model: str) -> str | None:
    """None when the configuration runs on this model and machine, else why not."""
    if config == "wandb.watch(all)" and not _importable("wandb"):
        return "wandb is not installed"
    if config == "cockpit economy":
        if not (model == "mlp" or model.startswith("mlp-")):
            return "BackPACK cannot extend BatchNorm in train mode / nn.Transformer"
        if not _importable("cockpit"):
            return "cockpit-for-pytorch is not importable"
    return None


def make_callbacks(config: str, num_classes: int) -> list[Callback]:
    """``suite`` is ``lightning_debug.suite(num_classes=...)``; a class name is that callback of the suite alone."""
    if config == "suite":
        return lightning_debug.suite(num_classes=num_classes)
    if config.startswith("suite-"):  # the suite without one callback: that callback's marginal cost
        left_out = config.removeprefix("suite-")
        return [cb for cb in lightning_debug.suite(num_classes=num_classes) if type(cb).__name__ != left_out]
    if config in CALLBACKS:
        return [cb for cb in lightning_debug.suite(num_classes=num_classes) if type(cb).__name__ == config]
    if config == FLOOR:
        return [_ContractFloor()]
    if config == "grad_norm() log_dict":
        return [_PeerGradNorm()]
    return []


SWITCHABLE_PEERS = ("grad_norm() log_dict", "detect_anomaly")  # the peers --blocks can switch on and off


def switchable_callbacks(config: str, num_classes: int) -> list[Callback]:
    """``make_callbacks``, with ``detect_anomaly`` (a Trainer flag in the interleaved runs) as a callback."""
    if config == "detect_anomaly":
        return [_PeerAnomaly()]
    return make_callbacks(config, num_classes)


class _PeerGradNorm(Callback):
    """Lightning's documented recipe, ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``
    (every step), as a callback: the same logging from the same hook, and the paired blocks can put it in and take it
    out."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class _PeerAnomaly(Callback):
    """``Trainer(detect_anomaly=True)`` for the batches this callback is in the trainer: autograd's anomaly mode on
    from the batch's start (before the forward, whose traces it records) to its end."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        torch.autograd.set_detect_anomaly(True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        torch.autograd.set_detect_anomaly(False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.autograd.set_detect_anomaly(False)


class _ContractFloor(Callback):
    """The per-step work GradNormMonitor's and NaNGuard's contracts require, and nothing else: a lower bound.

    Every optimizer step, before the optimizer applies it: every gradient read once (one fused norm), the global
    norm brought to the host (NaNGuard decides on it before the step; GradNormMonitor judges every step's norm for
    spikes), and a finiteness check. No measured steps, no logging, no judging: what any implementation of those
    contracts pays per step on this model, which the suite's cost can be compared with.
    """

    def __init__(self) -> None:
        self.bad_steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item() if grads else 0.0
        if not math.isfinite(total):
            self.bad_steps += 1


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    model: str
    config: str
    step_ms: list[float]  # per timed step, start to next start
    cpu_ms: list[float]  # process CPU time of the same steps (all threads of this process)
    measured: list[bool]
    startup_s: float  # Trainer.fit() call to the first on_train_batch_start
    params: int
    param_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    every: int = LOG_EVERY

    def mean(self, which: str = "all", cpu: bool = False) -> float:
        """Mean step time; ``"all"`` weighs measured steps as in a long run: as many as one measurement interval
        holds (``is_logging_step``: 3 of every 100 steps at ``every=50``)."""
        times = self.cpu_ms if cpu else self.step_ms
        if which == "all":
            unmeasured, measured = self.mean("unmeasured", cpu), self.mean("measured", cpu)
            period = measure_every(self.every)
            busy = sum(is_logging_step(s, self.every) for s in range(period))
            if math.isfinite(unmeasured) and math.isfinite(measured) and period > busy:
                return ((period - busy) * unmeasured + busy * measured) / period
            return statistics.fmean(times) if times else math.nan
        values = [t for t, m in zip(times, self.measured) if (which == "measured") == m]
        return statistics.fmean(values) if values else math.nan


def measure_every(every: int) -> int:
    """The monitors' default measurement interval under ``Trainer(log_every_n_steps=every)``."""
    return every * DiagnosticCallback.log_intervals_per_measurement


def is_logging_step(step: int, every: int) -> bool:
    """A step where the monitors measure or Lightning writes its logs (LossCurveMonitor judges on the latter)."""
    return step % measure_every(every) == 0 or (step + 1) % every == 0


def run_one(
    spec: ModelSpec,
    config: str,
    steps: int,
    warmup: int,
    every: int,
    workdir: str,
    seed: int = 0,
    hook_times: dict[tuple[str, int], float] | None = None,
    sync_debug: bool = False,
) -> RunResult:
    """Train ``warmup + steps + 1`` optimizer steps with ``config`` and time the last ``steps``."""
    pl.seed_everything(seed, verbose=False)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    cuda = accelerator == "gpu"
    total = warmup + steps + 1
    module = CockpitModule(spec.build().net, measure_every(every)) if config == "cockpit economy" else spec.build()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(BatchPool(spec.batches(generator), total), batch_size=None)
    clock = StepClock(cuda)
    end = _TimerEnd(clock)
    callbacks = make_callbacks(config, spec.num_classes)
    wandb_dir = None
    if config == "wandb.watch(all)":
        wandb_dir = tempfile.mkdtemp(dir=workdir)
        callbacks = [_WandbWatch(wandb_dir, measure_every(every))]
    unwrap = instrument(callbacks, clock, hook_times) if hook_times is not None else None
    syncs = _SyncCounter(clock) if sync_debug and cuda else None
    logger = TensorBoardLogger(workdir, name=f"{spec.name}-{config}".replace(" ", "_").replace("()", ""))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=total,
        max_epochs=1,
        callbacks=[_TimerStart(clock), *([syncs] if syncs else []), *callbacks, end],
        logger=logger,
        log_every_n_steps=every,
        detect_anomaly=config == "detect_anomaly",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # the end-of-run report
            trainer.fit(module, train_dataloaders=loader)
    finally:
        if unwrap is not None:
            unwrap()
    if len(clock.starts) < total:
        raise RuntimeError(f"{spec.name}/{config}: only {len(clock.starts)} of {total} steps ran")
    step_ms = [1e3 * (b - a) for a, b in zip(clock.starts[warmup:-1], clock.starts[warmup + 1 :])]
    cpu_ms = [1e3 * (b - a) for a, b in zip(clock.cpu[warmup:-1], clock.cpu[warmup + 1 :])]
    step_ids = clock.steps[warmup:-1]
    params = sum(p.numel() for p in module.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    extra: dict[str, Any] = {}
    if "NaNGuard" in end.summaries:
        extra["nan_guard_snapshot_bytes"] = end.summaries["NaNGuard"].get("snapshot_bytes", 0)
    for cb in callbacks:
        if isinstance(cb, UpdateRatioMonitor):
            extra["update_ratio_copy_bytes"] = param_bytes  # transient, on measured steps only
    if cuda:
        extra["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    if syncs is not None:
        extra["syncs_per_step"] = dict(syncs.counts)
    result = RunResult(
        spec.name,
        config,
        step_ms,
        cpu_ms,
        [is_logging_step(s, every) for s in step_ids],
        clock.starts[0] - begin,
        params,
        param_bytes,
        extra,
        every,
    )
    del trainer, module, loader, callbacks
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- paired blocks
class _Toggle(Callback):
    """Puts the measured callbacks in and out of ``trainer.callbacks`` every ``every`` optimizer steps.

    ``every`` is the monitors' measurement interval (``measure_every``: two of Lightning's logging intervals at the
    defaults). Block ``b`` holds the optimizer steps ``[b * every, (b + 1) * every)``: one whole measurement
    interval, whose first step is the monitors' measured step and whose last is one Lightning logs on (it logs
    mid-block too). Blocks come in pairs, one
    with the callbacks and one without, in ABBA order (on-off, off-on, ...) so a drift cancels; the first
    ``warmup_pairs`` pairs are not timed. Switched at the end of a block's last step (this callback is last).
    """

    def __init__(self, clock: StepClock, measured: list[Callback], every: int) -> None:
        self.clock = clock
        self.measured = measured
        self.every = every
        self.on_blocks: list[bool] = []

    @staticmethod
    def is_on(block: int) -> bool:
        pair, position = divmod(block, 2)
        return position == 0 if pair % 2 == 0 else position == 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.clock.ends.append(self.clock.now())
        step = int(trainer.global_step)
        if step % self.every:
            return
        block = step // self.every
        on = self.is_on(block)
        others = [cb for cb in trainer.callbacks if not any(cb is m for m in self.measured)]
        if not on:
            for cb in self.measured:
                if isinstance(cb, NaNGuard):
                    cb._remove_gates()  # the optimizer-step gate goes too (re-installed by its next batch start)
        trainer.callbacks = [*others[:-1], *(self.measured if on else []), others[-1]]


def run_blocks(spec: ModelSpec, config: str, pairs: int, warmup_pairs: int, every: int, workdir: str) -> dict[str, Any]:
    """One Trainer (``log_every_n_steps=every``) whose ``config`` callbacks are switched on and off every measurement
    interval of the monitors (``measure_every(every)`` steps, see ``_Toggle``)."""
    pl.seed_everything(0, verbose=False)
    logging_every, every = every, measure_every(every)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    blocks = 2 * (pairs + warmup_pairs)
    total = blocks * every + 1
    module = spec.build()
    loader = DataLoader(BatchPool(spec.batches(torch.Generator().manual_seed(0)), total), batch_size=None)
    clock = StepClock(accelerator == "gpu")
    measured = switchable_callbacks(config, spec.num_classes)
    toggle = _Toggle(clock, measured, every)
    logger = TensorBoardLogger(workdir, name=f"{spec.name}-{config}-blocks")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=total, max_epochs=1,
        callbacks=[_TimerStart(clock), *measured, toggle], logger=logger, log_every_n_steps=logging_every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        trainer.fit(module, train_dataloaders=loader)
    step_ms = [1e3 * (b - a) for a, b in zip(clock.starts[:-1], clock.starts[1:])]
    means = [statistics.fmean(step_ms[b * every : (b + 1) * every]) for b in range(blocks)]
    # inside a block: its first and last steps are the measured ones, the others unmeasured (medians: robust)
    unmeasured = [statistics.median(step_ms[b * every + 1 : (b + 1) * every - 1]) for b in range(blocks)]
    measured = [step_ms[b * every] + step_ms[(b + 1) * every - 1] for b in range(blocks)]
    ratios, extra_us, base_ms, unmeasured_us, measured_ms = [], [], [], [], []
    for pair in range(warmup_pairs, pairs + warmup_pairs):
        on_block, off_block = (2 * pair, 2 * pair + 1) if _Toggle.is_on(2 * pair) else (2 * pair + 1, 2 * pair)
        on, off = means[on_block], means[off_block]
        ratios.append(on / off)
        extra_us.append(1e3 * (on - off))
        base_ms.append(off)
        unmeasured_us.append(1e3 * (unmeasured[on_block] - unmeasured[off_block]))
        measured_ms.append(measured[on_block] - measured[off_block])
    del trainer, module, loader, measured
    gc.collect()
    return {
        "ratio": _ratio_stats(ratios),
        "extra_us_per_step": _ratio_stats(extra_us),
        "base_ms": statistics.median(base_ms),
        "unmeasured_extra_us": _ratio_stats(unmeasured_us),  # median unmeasured step, with - without
        "measured_extra_ms": _ratio_stats(measured_ms),  # the two measured steps of a block, together
        "pairs": len(ratios),
        "ratios": ratios,
        "step_ms": step_ms,  # every step in order (block b: steps [b * every, (b + 1) * every)), for --json
    }


def blocks_in_processes(args: argparse.Namespace, model: str, config: str, workdir: str) -> dict[str, Any]:
    """``run_blocks`` in ``args.processes`` fresh interpreters; medians of their medians, min-max over processes."""
    runs = []
    for index in range(args.processes):
        out = Path(workdir) / f"blocks-{model}-{config}-{index}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--blocks", str(args.blocks), "--models", model,
                   "--configs", config, "--warmup-pairs", str(args.warmup_pairs), "--every", str(args.every),
                   "--json", str(out)]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.read_text())["blocks"][model][config])
    merged: dict[str, Any] = {"processes": [run["ratio"]["median"] for run in runs]}
    for key in ("ratio", "extra_us_per_step", "unmeasured_extra_us", "measured_extra_ms"):
        medians = [run[key]["median"] for run in runs]
        merged[key] = {"median": statistics.median(medians), "min": min(medians), "max": max(medians)}
    merged["base_ms"] = statistics.median(run["base_ms"] for run in runs)
    merged["pairs"] = sum(run["pairs"] for run in runs)
    merged["ratios"] = [r for run in runs for r in run["ratios"]]
    return merged


def blocks_table(results: dict[str, dict[str, dict[str, Any]]], specs: dict[str, ModelSpec], every: int) -> str:
    many = any("processes" in r for rows in results.values() for r in rows.values())
    spread = "median of the processes' medians, min-max over processes" if many else "median over pairs, min-max"
    lines = [
        f"| model | configuration | step time x without ({spread}) | extra us per step | "
        f"extra us per unmeasured step (median step) | extra ms per {measure_every(every)} steps on the first and "
        f"last steps | step without (ms) | pairs of {measure_every(every)}-step blocks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, rows in results.items():
        for config, r in rows.items():
            lines.append(
                f"| {model} | {config} | {_fmt_ratio(r['ratio'])} | {_fmt_num(r['extra_us_per_step'], 0)} | "
                f"{_fmt_num(r['unmeasured_extra_us'], 0)} | {_fmt_num(r['measured_extra_ms'], 1)} | "
                f"{r['base_ms']:.2f} | {r['pairs']} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- statistics
def _ratio_stats(values: list[float]) -> dict[str, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per (model, config): median over rounds of the ratio to the same round's baseline, with min and max."""
    by_round: dict[tuple[str, int], dict[str, RunResult]] = {}
    rounds: dict[tuple[str, str], int] = {}
    for r in results:
        index = rounds.get((r.model, r.config), 0)
        rounds[(r.model, r.config)] = index + 1
        by_round.setdefault((r.model, index), {})[r.config] = r
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r.model for r in results):
        configs = dict.fromkeys(r.config for r in results if r.model == model)
        out[model] = {}
        for config in configs:
            ratios: dict[str, list[float]] = {"all": [], "unmeasured": [], "measured": []}
            extra_ms: list[float] = []
            startup: list[float] = []
            ms: list[float] = []
            for (m, _), runs in sorted(by_round.items()):
                if m != model or config not in runs or "none" not in runs:
                    continue
                run, base = runs[config], runs["none"]
                for which in ratios:
                    ratios[which].append(run.mean(which) / base.mean(which))
                extra_ms.append(run.mean("measured") - base.mean("measured"))
                startup.append(run.startup_s - base.startup_s)
                ms.append(run.mean("all"))
            base_ms = [runs["none"].mean("all") for (m, _), runs in by_round.items() if m == model and "none" in runs]
            last = next(r for r in reversed(results) if r.model == model and r.config == config)
            out[model][config] = {
                **{f"ratio_{k}": _ratio_stats(v) for k, v in ratios.items()},
                "measured_extra_ms": _ratio_stats(extra_ms),
                "startup_extra_s": _ratio_stats(startup),
                "step_ms": _ratio_stats(ms),
                # robust to a machine that switches between a fast and a slow state between runs
                "ratio_of_medians": statistics.median(ms) / statistics.median(base_ms) if ms and base_ms else math.nan,
                "rounds": len(ms),
                "params": last.params,
                "param_bytes": last.param_bytes,
                "extra": last.extra,
            }
    return out


def _fmt_ratio(s: dict[str, float]) -> str:
    if not math.isfinite(s["median"]):
        return "n/a"
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def _fmt_num(s: dict[str, float], digits: int = 1) -> str:
    if not math.isfinite(s["median"]):
        return "n/a"
    return f"{s['median']:+.{digits}f} ({s['min']:+.{digits}f} to {s['max']:+.{digits}f})"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def overhead_tables(summary: dict[str, dict[str, Any]], specs: dict[str, ModelSpec], skipped: dict) -> str:
    lines: list[str] = []
    for model, rows in summary.items():
        base = rows.get("none", {})
        lines.append(f"### {model}: {specs[model].description}")
        lines.append("")
        lines.append(
            f"{base.get('params', 0):,} parameters; baseline step {base['step_ms']['median']:.2f} ms "
            f"(rounds: {base.get('rounds', 0)}). Ratios: median over rounds (min-max)."
        )
        lines.append("")
        lines.append(
            "| configuration | all steps (x none) | median step / median none | unmeasured steps | measured steps "
            "| extra ms per measured step | startup extra (s) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for config, s in rows.items():
            lines.append(
                f"| {config} | {_fmt_ratio(s['ratio_all'])} | {s['ratio_of_medians']:.3f} | "
                f"{_fmt_ratio(s['ratio_unmeasured'])} | "
                f"{_fmt_ratio(s['ratio_measured'])} | {_fmt_num(s['measured_extra_ms'])} | "
                f"{_fmt_num(s['startup_extra_s'], 2)} |"
            )
        for config, why in skipped.get(model, {}).items():
            lines.append(f"| {config} | not run: {why} | | | | | |")
        lines.append("")
    return "\n".join(lines)


def memory_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | trainable parameter bytes | UpdateRatioMonitor transient copy (measured steps) | "
        "NaNGuard snapshot (host, kept) |",
        "| --- | --- | --- | --- |",
    ]
    for model, rows in summary.items():
        base = rows.get("none", {})
        snap = next((r["extra"]["nan_guard_snapshot_bytes"] for r in rows.values() if "nan_guard_snapshot_bytes" in
                     r["extra"]), None)  # fmt: skip
        copy = next((r["extra"]["update_ratio_copy_bytes"] for r in rows.values() if "update_ratio_copy_bytes" in
                     r["extra"]), None)  # fmt: skip
        lines.append(
            f"| {model} | {_mib(base.get('param_bytes', 0))} | {_mib(copy) if copy is not None else 'n/a'} | "
            f"{_mib(snap) if snap is not None else 'n/a'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- hook profile
def hook_profile(args: argparse.Namespace, specs: dict[str, ModelSpec], workdir: str) -> str:
    """Where the suite's time goes: each callback's own hooks, per unmeasured and per measured step."""
    lines = [
        "| model | callback | us per unmeasured step (mean) | (median) | us per measured step | amortised % of the "
        "baseline step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, spec in specs.items():
        base = run_one(spec, "none", args.steps, args.warmup, args.every, workdir)
        sink: dict[tuple[str, int], float] = {}
        run_one(spec, "suite", args.steps, args.warmup, args.every, workdir, hook_times=sink)
        timed = range(args.warmup, args.warmup + args.steps)
        base_ms = base.mean("all")
        keys = [k for k in dict.fromkeys(k[0] for k in sink) if args.profile_hooks or "." not in k]
        for cb in keys:
            per_step = {step: 1e6 * sink.get((cb, step), 0.0) for step in timed}
            unmeasured = [v for s, v in per_step.items() if not is_logging_step(s, args.every)]
            measured = [v for s, v in per_step.items() if is_logging_step(s, args.every)]
            amortised = statistics.fmean(per_step.values()) / 1e3 / base_ms * 100
            lines.append(
                f"| {name} | {cb} | {statistics.fmean(unmeasured) if unmeasured else math.nan:.0f} | "
                f"{statistics.median(unmeasured) if unmeasured else math.nan:.0f} | "
                f"{statistics.fmean(measured) if measured else math.nan:.0f} | {amortised:.2f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- size sweep
def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    ``VmHWM`` from ``/proc/self/status`` where there is one: ``getrusage``'s ``ru_maxrss`` survives ``execve`` on
    Linux, so a child started from the (large) harness would report the harness's own peak.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def sweep_child(args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: one configuration of one sweep model; prints one JSON line."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    spec = model_spec(args.child_model)
    with tempfile.TemporaryDirectory() as workdir:
        result = run_one(spec, args.child_config, args.steps, args.warmup, args.every, workdir)
    peak_bytes = peak_rss_bytes()
    payload = {
        "model": spec.name,
        "description": spec.description,
        "config": args.child_config,
        "step_ms_mean": result.mean("all"),
        "step_ms_unmeasured": result.mean("unmeasured"),
        "params": result.params,
        "param_bytes": result.param_bytes,
        "peak_rss_bytes": peak_bytes,
        **result.extra,
    }
    print("SWEEP_RESULT " + json.dumps(payload), flush=True)


def run_sweep(args: argparse.Namespace, sizes: list[float], configs: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    jobs = [(size, config, r) for r in range(args.sweep_rounds) for size in sizes for config in configs]
    rng = random.Random(args.seed + 1000)
    for r in range(args.sweep_rounds):  # interleaved: each round runs every (size, configuration), shuffled
        round_jobs = [j for j in jobs if j[2] == r]
        rng.shuffle(round_jobs)
        for size, config, _ in round_jobs:
            cmd = [
                sys.executable, __file__, "--child-model", f"mlp-{int(size)}", "--child-config", config,
                "--steps", str(args.sweep_steps), "--warmup", str(args.sweep_warmup), "--every", str(args.every),
                *(["--threads", str(args.threads)] if args.threads else []),
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("SWEEP_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"sweep child {cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            record = json.loads(line.split(" ", 1)[1])
            record["round"] = r
            out.append(record)
            print(f"  sweep {record['model']:>14s} {config:22s} {record['step_ms_mean']:9.2f} ms/step  "
                  f"peak RSS {_mib(record['peak_rss_bytes'])}", flush=True)  # fmt: skip
    return out


def sweep_table(records: list[dict[str, Any]], configs: list[str]) -> str:
    models = list(dict.fromkeys(r["model"] for r in sorted(records, key=lambda r: r["params"])))
    header = (
        "| parameters | model | "
        + " | ".join(f"{c} ms/step" + ("" if c == "none" else " (x none)") for c in configs)
        + " | "
        + " | ".join(f"{c} peak RSS" for c in configs)
        + " | NaNGuard snapshot | UpdateRatio copy |"
    )
    lines = [header, "|" + " --- |" * (2 + 2 * len(configs) + 2)]
    for model in models:
        rows = [r for r in records if r["model"] == model]
        cells_t, cells_m = [], []
        for config in configs:
            runs = [r for r in rows if r["config"] == config]
            if not runs:
                cells_t.append("n/a")
                cells_m.append("n/a")
                continue
            t = statistics.median(r["step_ms_mean"] for r in runs)
            if config == "none":
                cells_t.append(f"{t:.1f}")
            else:
                ratios = []
                for r in runs:
                    base = next((b for b in rows if b["config"] == "none" and b["round"] == r["round"]), None)
                    if base is not None:
                        ratios.append(r["step_ms_mean"] / base["step_ms_mean"])
                rs = _ratio_stats(ratios)
                cells_t.append(f"{t:.1f} ({_fmt_ratio(rs)})")
            peak = statistics.median(r["peak_rss_bytes"] for r in runs)
            cells_m.append(_mib(peak))
        snap = next((r.get("nan_guard_snapshot_bytes") for r in rows if r.get("nan_guard_snapshot_bytes")), None)
        copy = next((r.get("update_ratio_copy_bytes") for r in rows if r.get("update_ratio_copy_bytes")), None)
        lines.append(
            f"| {rows[0]['params'] / 1e6:.1f}M | {rows[0]['description']} | "
            + " | ".join(cells_t)
            + " | "
            + " | ".join(cells_m)
            + f" | {_mib(snap) if snap else 'n/a'} | {_mib(copy) if copy else 'n/a'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
        f"threads), lightning {pl.__version__}, Python {platform.python_version()}, {device}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 1-2 minute smoke run: 1 round of none, suite, grad_norm() and detect_anomaly; 1M sweep only",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"comma-separated, from {ALL_CONFIGS}")
    parser.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 3; quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 90; quick: 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every run")
    parser.add_argument("--every", type=int, default=LOG_EVERY, help="Trainer(log_every_n_steps), i.e. the cadence")
    parser.add_argument("--sweep-sizes", default=None, help="parameter counts, e.g. 1e6,5e6,20e6,50e6 ('' skips)")
    parser.add_argument("--sweep-configs", default="none,suite,NaNGuard")
    parser.add_argument("--sweep-steps", type=int, default=None, help="timed steps per sweep run (default 48)")
    parser.add_argument("--sweep-warmup", type=int, default=3)
    parser.add_argument("--sweep-rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffles")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; default 1 on machines with <= 2 cores (2 OpenMP threads on 2 shared cores slow "
        "down many-fold whenever another process takes a core), else torch's default",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="paired blocks: per model and configuration one run whose callbacks are switched on and off every "
        "--every steps, this many timed on/off pairs (lightning_debug configurations only; see _Toggle)",
    )
    parser.add_argument("--warmup-pairs", type=int, default=1, help="with --blocks: untimed pairs at the start")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="with --blocks: repeat in this many fresh processes (memory layout and allocator state differ between "
        "processes and shift a whole run; the table then gives the median of the processes' medians)",
    )
    parser.add_argument("--profile", action="store_true", help="only print where the suite's time goes, per callback")
    parser.add_argument("--profile-hooks", action="store_true", help="with --profile: also one row per hook")
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA only: count synchronising calls per step (torch.cuda.set_sync_debug_mode) for --configs",
    )
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    parser.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_model is None:
        quick = args.quick
        args.rounds = args.rounds or (1 if quick else 3)
        args.steps = args.steps or (60 if quick else 90)
        args.sweep_steps = args.sweep_steps or 48
        if args.sweep_sizes is None:
            args.sweep_sizes = "1e6" if quick else "1e6,5e6,20e6,50e6"
        if quick and args.configs == ",".join(ALL_CONFIGS):
            args.configs = "none,suite,grad_norm() log_dict,detect_anomaly"
        if quick and args.sweep_configs == "none,suite,NaNGuard":
            args.sweep_configs = "none,suite"
    else:
        args.steps = args.steps or 60
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is None and (os.cpu_count() or 1) <= 2:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_model is not None:
        sweep_child(args)
        return {}
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in ALL_CONFIGS and not (args.blocks and c.removeprefix("suite-") in CALLBACKS):
            raise SystemExit(f"unknown configuration {c!r}; choose from {ALL_CONFIGS}")
    if "none" not in configs:
        configs.insert(0, "none")
    specs = {m: model_spec(m) for m in models}
    skipped: dict[str, dict[str, str]] = {}
    jobs = []
    for m in models:
        for c in configs:
            why = config_available(c, m)
            if why is None:
                jobs.append((m, c))
            else:
                skipped.setdefault(m, {})[c] = why
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    if args.sync_debug:
        if not torch.cuda.is_available():
            raise SystemExit("--sync-debug needs a CUDA device (torch.cuda.set_sync_debug_mode)")
        lines = ["| model | configuration | synchronising calls per unmeasured step | per measured step |"]
        lines.append("|" + " --- |" * 4)
        with tempfile.TemporaryDirectory(prefix="lightning_debug_bench_") as workdir:
            for m in models:
                for c in configs:
                    res = run_one(specs[m], c, args.steps, args.warmup, args.every, workdir, sync_debug=True)
                    counts = res.extra["syncs_per_step"]
                    un = [v for s, v in counts.items() if s >= args.warmup and not is_logging_step(s, args.every)]
                    me = [v for s, v in counts.items() if s >= args.warmup and is_logging_step(s, args.every)]
                    lines.append(f"| {m} | {c} | {statistics.fmean(un) if un else math.nan:.2f} | "
                                 f"{statistics.fmean(me) if me else math.nan:.2f} |")  # fmt: skip
        print("\n".join(lines), flush=True)
        return {"sync_debug": lines}
    if args.blocks:
        toggled = [c for c in configs if c != "none"]
        for c in toggled:
            if c not in ("suite", FLOOR, *SWITCHABLE_PEERS) and c.removeprefix("suite-") not in CALLBACKS:
                raise SystemExit(
                    f"--blocks switches lightning_debug callbacks and the peers {SWITCHABLE_PEERS} on and off; "
                    f"{c!r} is not one"
                )
        block_results: dict[str, dict[str, dict[str, Any]]] = {}
        with tempfile.TemporaryDirectory(prefix="lightning_debug_bench_") as workdir:
            for m in models:
                for c in toggled:
                    if args.processes > 1:
                        res = blocks_in_processes(args, m, c, workdir)
                    else:
                        res = run_blocks(specs[m], c, args.blocks, args.warmup_pairs, args.every, workdir)
                    block_results.setdefault(m, {})[c] = res
                    print(f"  {m:11s} {c:26s} x{res['ratio']['median']:.3f} ({res['ratio']['min']:.3f}-"
                          f"{res['ratio']['max']:.3f}), {res['extra_us_per_step']['median']:+.0f} us/step, "
                          f"without {res['base_ms']:.2f} ms", flush=True)  # fmt: skip
        elapsed = time.perf_counter() - started
        command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
        table = blocks_table(block_results, specs, args.every)
        print(f"\nCommand: `{command.strip()}` ({elapsed / 60:.1f} min)\n\n{table}", flush=True)
        if args.markdown:
            Path(args.markdown).write_text(f"Machine: {machine()}\n\nCommand: `{command.strip()}`\n\n{table}\n")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "command": command, "blocks": block_results}))
        return {"blocks": block_results}
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="lightning_debug_bench_") as workdir:
            for m in models:
                run_one(specs[m], "none", 5, 2, args.every, workdir)
            table = hook_profile(args, specs, workdir)
        print("\n" + table, flush=True)
        return {"profile": table}
    print(
        f"{len(jobs)} (model, configuration) pairs x {args.rounds} rounds, {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, log_every_n_steps={args.every}",
        flush=True,
    )
    results: list[RunResult] = []
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lightning_debug_bench_") as workdir:
        for m in models:  # untimed warm-up of each model (allocator, kernels, imports)
            run_one(specs[m], "none", 5, 2, args.every, workdir)
        for r in range(args.rounds):
            order = list(jobs)
            rng.shuffle(order)
            for m, c in order:
                res = run_one(specs[m], c, args.steps, args.warmup, args.every, workdir)
                results.append(res)
                print(
                    f"  round {r + 1}/{args.rounds} {m:11s} {c:26s} {res.mean('all'):8.2f} ms/step "
                    f"(unmeasured {res.mean('unmeasured'):.2f}, measured {res.mean('measured'):.2f})",
                    flush=True,
                )
    summary = summarise(results)
    sizes = [float(s) for s in args.sweep_sizes.split(",") if s.strip()]
    sweep_configs = [c for c in args.sweep_configs.split(",") if c]
    if "none" not in sweep_configs:
        sweep_configs.insert(0, "none")
    sweep = run_sweep(args, sizes, sweep_configs) if sizes else []
    elapsed = time.perf_counter() - started
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = [
        f"Machine: {machine()}",
        "",
        f"Command: `{command.strip()}` ({elapsed / 60:.1f} min; {args.rounds} rounds, {args.steps} timed steps per "
        f"run after {args.warmup} warm-up steps, Trainer(log_every_n_steps={args.every}))",
        "",
        "## Step-time overhead",
        "",
        overhead_tables(summary, specs, skipped),
        "## Memory held by the callbacks",
        "",
        memory_table(summary),
        "",
    ]
    if sweep:
        text += ["## Size sweep (fresh subprocess per configuration)", "", sweep_table(sweep, sweep_configs), ""]
    report = "\n".join(text)
    print("\n" + report, flush=True)
    payload = {
        "machine": machine(),
        "command": command,
        "args": vars(args),
        "elapsed_s": elapsed,
        "summary": summary,
        "skipped": skipped,
        "runs": [r.__dict__ for r in results],
        "sweep": sweep,
    }
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1, default=float))
    return payload


if __name__ == "__main__":
    main()
