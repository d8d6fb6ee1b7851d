"""Dozing: between their busy steps the monitors' per-batch hooks are not dispatched, and nothing they find changes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_debug
from lightning_debug import DiagnosticCallback, GradNormMonitor, NaNGuard, zoo
from lightning_debug.data import DigitsDataModule

EVERY = 10
STEPS = 43


def _fit(tmp_path: Path, callbacks: list, model: pl.LightningModule | None = None, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks, log_every_n_steps=EVERY, **kwargs)
    trainer.fit(model or zoo.DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    return trainer


def _calls(profiler: SimpleProfiler, name: str) -> int:
    """How often Lightning dispatched ``Class.hook`` (its profiler action is ``[Callback]<state_key>.<hook>``)."""
    cls, hook = name.split(".")
    return sum(
        len(v)
        for k, v in profiler.recorded_durations.items()
        if k.startswith(f"[Callback]{cls}{{") and k.endswith(f".{hook}")
    )


def _busy_steps(steps: int, every: int) -> list[int]:
    return [s for s in range(steps) if s % every == 0 or (s + 1) % every == 0]


def test_hooks_are_dispatched_on_busy_steps_only(tmp_path: Path) -> None:
    profiler = SimpleProfiler()
    callbacks = lightning_debug.suite(num_classes=10)
    _fit(tmp_path, callbacks, max_steps=STEPS, profiler=profiler)
    # the monitors that read tensors measure every second logging interval (steps 0, 20, 40); busy there and on the
    # steps before them: 0, 19, 20, 39, 40; LossCurveMonitor judges every logging interval: 0, 9, 10, 19, 20, ...
    busy = len(_busy_steps(STEPS, 2 * EVERY))
    measured = len(range(0, STEPS, 2 * EVERY))
    busy_every_log = len(_busy_steps(STEPS, EVERY))
    assert _calls(profiler, "PredictionDynamicsLogger.on_train_batch_end") == busy
    assert _calls(profiler, "DeadActivationMonitor.on_train_batch_start") == busy
    assert _calls(profiler, "UpdateRatioMonitor.on_before_optimizer_step") == busy
    assert _calls(profiler, "WeightStatsMonitor.on_train_batch_end") == busy
    assert _calls(profiler, "DataInspector.on_train_batch_start") == 8  # its batches, then never again
    for check in ("BatchNormCheck", "LossFunctionCheck"):  # work at on_train_start only: never dispatched after
        for hook in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
            assert _calls(profiler, f"{check}.{hook}") == 0, (check, hook)
        assert _calls(profiler, f"{check}.on_train_start") == 1
    # NaNGuard brings every step's gradient norms to the host: GradNormMonitor wakes on its measured steps only
    assert _calls(profiler, "GradNormMonitor.on_before_optimizer_step") == measured
    # the ones that need every step never doze
    assert _calls(profiler, "NaNGuard.on_before_optimizer_step") == STEPS
    assert _calls(profiler, "NaNGuard.on_train_batch_start") == busy  # installs the gate: on busy steps
    assert _calls(profiler, "NaNGuard.on_train_batch_end") == busy  # no snapshot due in 43 steps (every 100)
    # NaNGuard brings every step's loss to the host too: LossCurveMonitor wakes around its measured steps only
    assert _calls(profiler, "LossCurveMonitor.on_train_batch_end") == busy_every_log  # (hockey check: step 50)
    # after the run every instance is as constructed: no hook left on an instance
    hooks = {"on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_before_optimizer_step"}
    assert all(not hooks & set(vars(cb)) and not cb._dozing for cb in callbacks)


def _outcome(callbacks: list[DiagnosticCallback], log_dir: str) -> dict[str, Any]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {
        tag: [(e.step, round(e.value, 5)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.startswith(("epoch", "train", "val"))
    }
    findings = [(f.source, f.check, f.severity, f.step) for cb in callbacks for f in cb.findings]
    summaries = [cb.summary() for cb in callbacks]
    return {"scalars": scalars, "findings": findings, "summaries": summaries}


def _run(
    tmp_path: Path, name: str, model: type[pl.LightningModule], accumulate: int = 1
) -> tuple[dict[str, Any], pl.Trainer]:
    callbacks = lightning_debug.suite(num_classes=10)
    logger = TensorBoardLogger(tmp_path, name=name)
    pl.seed_everything(0)
    trainer = _fit(
        tmp_path, callbacks, model=model(), max_steps=STEPS, logger=logger, accumulate_grad_batches=accumulate
    )
    logger.experiment.flush()
    return _outcome(callbacks, logger.log_dir), trainer


class _SpikeAt(zoo.DigitsMLP):
    """A gradient spike at one step between two measured ones (the loss scaled up 1000x there)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step == 33 else loss


@pytest.mark.parametrize(("model", "accumulate"), [(zoo.DigitsMLP, 1), (_SpikeAt, 1), (zoo.DigitsMLP, 3)])
def test_dozing_changes_no_finding_scalar_or_summary(
    tmp_path: Path, model: Any, accumulate: int, monkeypatch: Any
) -> None:
    # with gradient accumulation several batches share one optimizer step: all of a busy step's batches are awake
    dozing, trainer = _run(tmp_path, "dozing", model, accumulate)
    assert trainer.callbacks[0].__dict__.get("_conductor") is None  # gone after the run
    for cls in {type(cb) for cb in lightning_debug.suite(num_classes=10)}:
        monkeypatch.setattr(cls, "doze_hooks", lambda self: ())  # every hook on every batch, as before dozing
    awake, _ = _run(tmp_path, "awake", model, accumulate)
    assert dozing["findings"] == awake["findings"]
    assert dozing["summaries"] == awake["summaries"]
    assert dozing["scalars"] == awake["scalars"]
    spikes = [f for f in dozing["findings"] if f[1] == "grad_norm.spike"]
    assert bool(spikes) == (model is _SpikeAt)


@pytest.mark.parametrize("guard_first", [False, True])
def test_grad_norm_judges_every_step_from_nan_guards_norms(tmp_path: Path, guard_first: bool) -> None:
    monitor, guard = GradNormMonitor(), NaNGuard()
    _fit(tmp_path, [guard, monitor] if guard_first else [monitor, guard], model=_SpikeAt(), max_steps=STEPS)
    log = monitor._logs[0]
    assert log.finite_steps == STEPS and not log.nonfinite_steps  # every step once: none lost, none twice
    # the first spike is the 1000x step, read from NaNGuard's norms between two measured steps (30 and 40)
    steps = [s for f in monitor.findings if f.check == "grad_norm.spike" for s in f.data["spike_steps"]]
    assert steps[0] == 33


def test_grad_norm_fed_by_nan_guard_survives_resume_between_measured_steps(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=25, save_top_k=-1)
    first = GradNormMonitor()
    _fit(tmp_path, [first, NaNGuard(), checkpoint], max_steps=25, enable_checkpointing=True)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=25.ckpt"
    assert ckpt.exists() and first._logs[0].finite_steps == 25
    second = GradNormMonitor()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second, NaNGuard()], max_steps=STEPS, log_every_n_steps=EVERY)
    trainer.fit(zoo.DigitsMLP(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(ckpt))
    log = second._logs[0]
    assert log.finite_steps == STEPS  # 25 before the checkpoint (5 of them unread at save time) + 18 after
    assert all(math.isfinite(n) for n in log.recent) and len(log.recent) == STEPS


class _CrashAt(zoo.DigitsMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 37:
            raise RuntimeError("user error")
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step == 33 else loss


def test_hooks_are_restored_and_fed_norms_judged_when_training_raises(tmp_path: Path) -> None:
    callbacks = lightning_debug.suite(num_classes=10)
    with pytest.raises(RuntimeError, match="user error"):
        _fit(tmp_path, callbacks, model=_CrashAt(), max_steps=STEPS)
    monitor = next(cb for cb in callbacks if isinstance(cb, GradNormMonitor))
    steps = [s for f in monitor.findings if f.check == "grad_norm.spike" for s in f.data["spike_steps"]]
    assert steps == [33, 34, 35, 36]  # the unread steps were judged before the report was written
    hooks = {"on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_before_optimizer_step"}
    assert all(not hooks & set(vars(cb)) and not cb._dozing for cb in callbacks)


class _StepWitness(DiagnosticCallback):
    """Records the fast ``global_step`` read next to Lightning's property, before and after each optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append((self.global_step(trainer), trainer.global_step))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append((self.global_step(trainer), trainer.global_step))


class _ManualTwoSteps(zoo.DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        optimizer = self.optimizers()
        for _ in range(2):  # two optimizer steps per batch: global_step counts both
            loss = torch.nn.functional.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss


@pytest.mark.parametrize("model", [zoo.DigitsMLP, _ManualTwoSteps])
def test_fast_global_step_matches_lightnings_also_after_resume(tmp_path: Path, model: Any) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    first = _StepWitness()
    _fit(tmp_path, [first, checkpoint], model=model(), max_steps=6, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    second = _StepWitness()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=12)
    trainer.fit(model(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(ckpt))
    assert second._step_counter is not None  # the counter was found: the fast read is in use
    for witness in (first, second):
        assert witness.seen and all(fast == slow for fast, slow in witness.seen)
    assert second.seen[0][1] == 6 and second.seen[-1][1] == 12


def test_the_step_norms_are_shared_only_with_monitors_that_read_them_after_the_guard(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from lightning_debug import stats

    passes: list[int] = []
    original = stats.fused_norms

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        passes.append(len(tensors))
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(stats, "fused_norms", counting)  # the gradient passes of shared_grad_norms
    guard, reader = NaNGuard(), lightning_debug.UpdateRatioMonitor()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [guard, reader], max_steps=12, log_every_n_steps=5)
    trainer.fit(zoo.DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    # UpdateRatioMonitor reads the gradient norms after NaNGuard on steps 0, 5 and 10: NaNGuard's pass is shared
    assert guard._norms_read_after and len(passes) == 12

    monkeypatch.setattr(stats, "_NORM_MEMO", stats._NormMemo())
    alone = NaNGuard()
    trainer = quiet_trainer(tmp_path, [alone, lightning_debug.LossCurveMonitor()], max_steps=3)
    trainer.fit(zoo.DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert not alone._norms_read_after and stats._NORM_MEMO.refs == []  # no reader after it: nothing kept


def test_a_subclass_that_overrides_a_dozing_hook_keeps_it_awake(tmp_path: Path) -> None:
    class EveryBatch(lightning_debug.PredictionDynamicsLogger):
        """Adds its own per-batch work to a hook the parent needs only on measured steps."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.batches = 0

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.batches += 1
            super().on_train_batch_end(*args, **kwargs)

    callback = EveryBatch()
    _fit(tmp_path, [lightning_debug.GradNormMonitor(), callback, NaNGuard()], max_steps=STEPS)
    assert callback.batches == STEPS
    assert callback.steps == list(range(0, STEPS + 1, 2 * EVERY))  # its own evaluations unchanged


class _NaNLossAt(zoo.DigitsMLP):
    """A non-finite loss at two steps: NaNGuard skips them and counts its good steps again from zero."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step in (12, 13) else loss


@pytest.mark.parametrize("model", [zoo.DigitsMLP, _NaNLossAt])
def test_snapshots_are_taken_at_the_same_steps_while_the_guard_dozes(
    tmp_path: Path, model: Any, monkeypatch: Any
) -> None:
    from lightning_debug import nan_guard

    taken: list[int] = []
    capture = nan_guard._Snapshot.capture

    def recording(self: Any, step: int, *args: Any) -> None:
        taken.append(step)
        capture(self, step, *args)

    monkeypatch.setattr(nan_guard._Snapshot, "capture", recording)
    profiler = SimpleProfiler()
    guard = NaNGuard(snapshot_every_n_steps=7)
    _fit(tmp_path, [guard, GradNormMonitor()], model=model(), max_steps=STEPS, profiler=profiler)
    dozing = list(taken)
    assert _calls(profiler, "NaNGuard.on_train_batch_end") < STEPS  # it did doze
    taken.clear()
    monkeypatch.setattr(NaNGuard, "doze_hooks", lambda self: ())
    _fit(tmp_path, [NaNGuard(snapshot_every_n_steps=7), GradNormMonitor()], model=model(), max_steps=STEPS)
    assert dozing == taken
    # at the start, then after every 7 good steps (the two skipped steps start the count again)
    assert taken == ([0, 7, 14, 21, 28, 35, 42] if model is zoo.DigitsMLP else [0, 7, 21, 28, 35, 42])
