"""Checks that need a CUDA device (skipped without one): real fp16 GradScaler, bf16, and no host sync
inside the monitors' hooks between measured steps, proven with ``torch.cuda.set_sync_debug_mode``.

The sync checks fence the callbacks with two plain callbacks (one first, one after the monitors) rather than wrapping
the monitors' hooks: a hook wrapped on the instance is an instance attribute, which would keep the monitors from
dozing between their measured steps, and the run under test must be the run users get."""

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback

import lightning_debug
from lightning_debug import DataInspector, DiagnosticCallback, NaNGuard
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.gpu

STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")  # fmt: skip
INTERVAL = 10


def _quiet(step: int, epoch_batches: int, one_off: set[int]) -> bool:
    """Steps on which no monitor may synchronise: those of tests/test_suite.py's host-transfer count (a measured
    step's work can sit in the batch before it or after it, the epoch's last batch may flush what was recorded on
    the device, and DataInspector judges once, on its last inspected batch)."""
    return bool(
        all((step + offset) % INTERVAL for offset in (-1, 0, 1)) and (step + 1) % epoch_batches and step not in one_off
    )


class _Fence(Callback):
    """In every per-step hook: ``set_sync_debug_mode("error")`` on quiet steps (``opens``), or back to "default"."""

    def __init__(self, opens: bool, quiet: Any, watched: list[DiagnosticCallback] = ()) -> None:
        self.opens = opens
        self.quiet = quiet
        self.watched = watched
        self.guarded_steps: set[int] = set()
        self.dozing_steps: set[int] = set()  # quiet steps on which a watched monitor's hooks were asleep
        for name in STEP_HOOKS:
            setattr(self, name, self._switch)

    def _switch(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.opens and self.quiet(step):
            self.guarded_steps.add(step)
            torch.cuda.set_sync_debug_mode("error")
        else:
            torch.cuda.set_sync_debug_mode("default")
            if self.quiet(step) and any(cb._dozing for cb in self.watched):
                self.dozing_steps.add(step)


class _SyncCount(Callback):
    """First and last callback: counts synchronising calls from the first ``on_train_batch_start`` to the last
    ``on_train_batch_end`` of each step (the forward, backward and optimizer step included)."""

    def __init__(self, counts: dict[int, int] | None) -> None:
        self.counts = counts  # None: the closing end
        self.opening: _SyncCount | None = None
        self._catch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.counts is not None:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        opening = self.opening
        if opening is not None and opening._catch is not None and opening.counts is not None:
            torch.cuda.set_sync_debug_mode("default")
            step = trainer.global_step - 1  # the step this batch took
            opening.counts[step] = sum("synchroniz" in str(w.message) for w in opening._records)
            opening._catch.__exit__(None, None, None)
            opening._catch = None


def _counted_run(tmp_path, callbacks: list[Callback], epoch_batches: int) -> dict[int, int]:
    pl.seed_everything(0)
    counts: dict[int, int] = {}
    opening, closing = _SyncCount(counts), _SyncCount(None)
    closing.opening = opening
    trainer = quiet_trainer(
        tmp_path, [opening, *callbacks, closing], accelerator="gpu", max_steps=60, max_epochs=5, log_every_n_steps=10
    )
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert trainer.global_step == 60 and len(counts) == 60
    return counts


def test_monitors_never_sync_the_gpu_between_measured_steps(tmp_path):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    epoch_batches = len(datamodule.train_dataloader())
    monitors = [cb for cb in callbacks if not isinstance(cb, NaNGuard)]  # NaNGuard reads one flag every step
    guard = [cb for cb in callbacks if isinstance(cb, NaNGuard)]
    one_off = {cb.num_batches - 1 for cb in monitors if isinstance(cb, DataInspector)}

    def quiet(step: int) -> bool:
        return _quiet(step, epoch_batches, one_off)

    opening, closing = _Fence(True, quiet), _Fence(False, quiet, monitors)
    trainer = quiet_trainer(
        tmp_path,
        [opening, *monitors, closing, *guard],
        accelerator="gpu",
        max_steps=60,
        max_epochs=5,
        log_every_n_steps=INTERVAL,
    )
    trainer.fit(DigitsMLP(), datamodule=datamodule)
    assert trainer.global_step == 60 and epoch_batches < 60
    assert len(opening.guarded_steps) >= 20  # the fence was up on many unmeasured steps
    # the monitors dozed between their measured steps (the run under test is the dozing one)
    assert closing.dozing_steps >= opening.guarded_steps - {0}
    findings = [f for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings]
    assert all(f.severity == "info" for f in findings), findings


def test_the_suite_adds_one_sync_per_unmeasured_step_and_it_is_nanguards(tmp_path):
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    epoch_batches = len(datamodule.train_dataloader())
    bare = _counted_run(tmp_path / "none", [], epoch_batches)
    guard = _counted_run(tmp_path / "guard", [NaNGuard()], epoch_batches)
    suite = _counted_run(tmp_path / "suite", lightning_debug.suite(num_classes=10), epoch_batches)
    one_off = {DataInspector().num_batches - 1}
    quiet = [step for step in range(60) if _quiet(step, epoch_batches, one_off)]
    assert len(quiet) >= 20
    assert {suite[s] - bare[s] for s in quiet} == {1}, (bare, suite)
    assert {guard[s] - bare[s] for s in quiet} == {1}, (bare, guard)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_healthy_cuda_mixed_precision_runs_get_no_warnings(tmp_path, precision):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    trainer = quiet_trainer(tmp_path, callbacks, accelerator="gpu", precision=precision, max_epochs=3)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(image_shape=True))
    warnings_ = [
        f for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings if f.severity != "info"
    ]
    assert warnings_ == []
