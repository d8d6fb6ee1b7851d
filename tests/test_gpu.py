"""Checks that need a CUDA device (skipped without one): real fp16 GradScaler, bf16, and no host sync
inside the monitors' hooks between measured steps, proven with ``torch.cuda.set_sync_debug_mode``."""

import functools

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer

import lightning_debug
from lightning_debug import DataInspector, DiagnosticCallback, NaNGuard
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsCNN, DigitsMLP

pytestmark = pytest.mark.gpu

STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")  # fmt: skip


def fail_on_sync_between_measured_steps(callback: DiagnosticCallback, interval: int, epoch_batches: int) -> None:
    """Run the callback's per-step hooks with CUDA sync debugging set to "error" on unmeasured steps.

    The allowed steps are those of tests/test_suite.py's host-transfer count: a measured step's work can sit in the
    batch before it or after it, the epoch's last batch may flush what was recorded on the device, and
    DataInspector judges once, on its last inspected batch.
    """
    one_off = {callback.num_batches - 1} if isinstance(callback, DataInspector) else set()
    for name in STEP_HOOKS:
        hook = getattr(callback, name)

        @functools.wraps(hook)
        def guarded(trainer, *args, _hook=hook, **kwargs):
            step = trainer.global_step
            quiet = (
                all((step + offset) % interval for offset in (-1, 0, 1))
                and (step + 1) % epoch_batches
                and step not in one_off
            )
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")
            try:
                return _hook(trainer, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        setattr(callback, name, guarded)


def test_monitors_never_sync_the_gpu_between_measured_steps(tmp_path):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    epoch_batches = len(datamodule.train_dataloader())
    guarded = [callback for callback in callbacks if not isinstance(callback, NaNGuard)]
    for callback in guarded:  # NaNGuard reads one flag every step, by design
        fail_on_sync_between_measured_steps(callback, interval=10, epoch_batches=epoch_batches)
    trainer = quiet_trainer(tmp_path, callbacks, accelerator="gpu", max_steps=60, max_epochs=5, log_every_n_steps=10)
    trainer.fit(DigitsMLP(), datamodule=datamodule)
    assert trainer.global_step == 60
    assert len(guarded) == len(callbacks) - 1 and epoch_batches < 60  # the guard saw unmeasured steps


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_healthy_cuda_mixed_precision_runs_get_no_warnings(tmp_path, precision):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    trainer = quiet_trainer(tmp_path, callbacks, accelerator="gpu", precision=precision, max_epochs=3)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(image_shape=True))
    warnings = [
        f for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings if f.severity != "info"
    ]
    assert warnings == []
