"""NaNGuard on real Trainers: skip, roll back, back off, halt — and stay out of the way of healthy runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import all_findings, assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_debug.data import DigitsDataModule
from lightning_debug.nan_guard import NaNGuard, NaNGuardHalt
from lightning_debug.zoo import DigitsMLP

NAN = float("nan")


class FaultyMLP(DigitsMLP):
    """DigitsMLP that plants a NaN at chosen optimizer steps: in the loss, a gradient, or the input."""

    nan_loss_at: frozenset[int] = frozenset()
    nan_grad_at: frozenset[int] = frozenset()
    nan_grad_from: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.nan_loss_at:
            loss = loss + NAN  # a NaN constant: the gradients stay finite, only the loss check sees it
        return loss

    def on_after_backward(self) -> None:
        step = self.global_step
        if step in self.nan_grad_at or (self.nan_grad_from is not None and step >= self.nan_grad_from):
            grad = self.layers[1].weight.grad
            assert grad is not None
            grad[0, 0] = NAN


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


class StepSnapshot(Callback):
    """Copies parameters and optimizer state before and after one optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def _copy(trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        optimizer = trainer.optimizers[0]
        state = {
            f"{index}.{key}": value.clone() if isinstance(value, torch.Tensor) else value
            for index, param_state in optimizer.state_dict()["state"].items()
            for key, value in param_state.items()
        }
        return {"params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, "state": state}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = self._copy(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self._copy(trainer, pl_module)


def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    """Train ``model`` (built right after seeding, see :func:`faulty`) on digits, batch size 64."""
    trainer = quiet_trainer(tmp_path, callbacks, **{"max_epochs": -1, **kwargs})
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return trainer


def faulty(**kwargs: Any) -> FaultyMLP:
    injections = {k: kwargs.pop(k) for k in ("nan_loss_at", "nan_grad_at", "nan_grad_from") if k in kwargs}
    pl.seed_everything(0, workers=True)
    model = FaultyMLP(**kwargs)
    for key, value in injections.items():
        setattr(model, key, frozenset(value) if isinstance(value, (set, list, tuple)) else value)
    return model


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def guard_checks(guard: NaNGuard) -> list[str]:
    return [f.check for f in guard.findings]


# ---------------------------------------------------------------------------------------------- done-when criteria
def test_sgd_at_lr_10_diverges_without_the_guard_and_finishes_finite_with_it(tmp_path: Path) -> None:
    recorder = LossRecorder()
    plain = faulty(lr=10.0)
    fit(tmp_path / "plain", plain, [recorder], max_steps=10)
    assert not all(math.isfinite(loss) for loss in recorder.losses), "the unguarded run should hit NaN in 10 steps"

    guard = NaNGuard()
    model = faulty(lr=10.0)
    trainer = fit(tmp_path / "guarded", model, [guard], max_steps=30)
    assert trainer.global_step == 30 and guard.halted_reason is None
    assert weights_finite(model)
    final_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert final_lr < 10.0 and final_lr == pytest.approx(10.0 * guard.lr_scale)
    assert guard.backoffs >= 1 and guard.skipped_steps >= 1 and guard.rollbacks >= 1
    assert {f.severity for f in guard.findings} <= {"warning", "error"} and guard.findings
    assert "nan_guard.backoff" in guard_checks(guard)
    assert guard.lr_history[0]["old_lr"] == pytest.approx(10.0)


def test_backoff_survives_a_lambda_lr_warmup_to_lr_30(tmp_path: Path) -> None:
    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 10)

    plain = faulty(lr=30.0, lr_lambda=warmup)
    fit(tmp_path / "plain", plain, [], max_steps=16)
    assert not weights_finite(plain), "the unguarded warm-up to lr=30 should diverge"

    guard = NaNGuard()
    model = faulty(lr=30.0, lr_lambda=warmup)
    trainer = fit(tmp_path / "guarded", model, [guard], max_steps=40)
    assert trainer.global_step == 40 and weights_finite(model)
    assert guard.backoffs >= 1
    # the scheduler rewrote the LR on each of the steps after the last backoff, and the backoff is still there
    assert guard.lr_history[-1]["step"] < 30
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(30.0 * guard.lr_scale) and lr < 30.0
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(lr)


def test_fp16_grad_scaler_calibration_is_not_a_divergence(tmp_path: Path) -> None:
    guard = NaNGuard()
    plugin = fp16_cpu_plugin()
    model = faulty(lr=0.05)
    trainer = fit(tmp_path, model, [guard], max_steps=40, plugins=[plugin])
    assert plugin.scaler is not None and plugin.scaler.get_scale() < 2.0**40, "the scaler should have skipped steps"
    assert guard.backoffs == 0 and guard.lr_scale == 1.0 and guard.skipped_steps == 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05
    assert not [f for f in guard.findings if f.severity != "info"]
    assert weights_finite(model)


def test_fp16_persistent_overflow_is_a_scaler_collapse(tmp_path: Path) -> None:
    guard = NaNGuard(max_scaler_skips=5)
    model = faulty(lr=0.05, nan_grad_from=30)
    trainer = fit(tmp_path, model, [guard], max_steps=45, plugins=[fp16_cpu_plugin()])
    assert "nan_guard.scaler_collapse" in guard_checks(guard)
    collapse = next(f for f in guard.findings if f.check == "nan_guard.scaler_collapse")
    assert collapse.step == 34  # steps 30..34: the fifth consecutive skip after calibration
    assert guard.backoffs >= 1 and trainer.optimizers[0].param_groups[0]["lr"] < 0.05
    assert weights_finite(model)


def test_ddp_nan_in_one_ranks_batch_is_skipped_on_both_ranks(tmp_path: Path) -> None:
    body = """
        import json, torch, lightning.pytorch as pl
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.nan_guard import NaNGuard
        from lightning_debug.zoo import DigitsMLP
        import torch.nn.functional as F

        class OneRankNaN(DigitsMLP):
            def training_step(self, batch, batch_idx):
                x, y = batch
                if self.global_rank == 1 and self.global_step == 3:
                    x = x * float("nan")
                loss = F.cross_entropy(self(x), y)
                return loss

        if __name__ == "__main__":
            pl.seed_everything(0)
            guard = NaNGuard()
            model = OneRankNaN(lr=0.05)
            trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=8, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 default_root_dir=".", callbacks=[guard])
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
            weights = torch.cat([p.detach().flatten() for p in model.parameters()])
            out = {"global_step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                   "backoffs": guard.backoffs, "skipped": guard.skipped_steps, "bad_steps": guard.bad_steps,
                   "finite": bool(torch.isfinite(weights).all()), "checksum": float(weights.double().abs().sum())}
            with open(f"rank{trainer.global_rank}.json", "w") as fh:
                json.dump(out, fh)
    """
    run_ddp_script(tmp_path, body)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["global_step"] == 8 and rank["finite"]
        assert rank["skipped"] == 1 and rank["backoffs"] == 1
        assert rank["bad_steps"] == [{"step": 3, "kind": "nonfinite_loss", "lr": 0.05}]
        assert rank["lr"] == pytest.approx(0.05 / 3)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_ddp_checkpoint_follows_rank_zeros_weights_when_one_rank_s_buffers_differ(tmp_path: Path) -> None:
    """BatchNorm statistics are synced from rank 0 at the next forward: a non-finite buffer on one rank only must not
    make that rank refuse the save while rank 0 writes it and waits for it (a hang on NCCL, a crash on gloo)."""
    body = """
        import json, torch, lightning.pytorch as pl
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.nan_guard import NaNGuard, NaNGuardError
        from lightning_debug.zoo import DigitsMLP

        if __name__ == "__main__":
            pl.seed_everything(0)
            guard = NaNGuard(snapshot_every_n_steps=None)
            model = DigitsMLP(batchnorm=True)
            trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=4, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 default_root_dir=".", callbacks=[guard])
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
            outcome = {}
            for bad_rank in (1, 0):
                buffer = next(b for name, b in model.named_buffers() if name.endswith("running_mean"))
                saved = buffer.clone()
                if trainer.global_rank == bad_rank:
                    buffer[0] = float("nan")
                try:
                    trainer.save_checkpoint(f"rank{bad_rank}_bad.ckpt")
                    outcome[bad_rank] = "saved"
                except NaNGuardError:
                    outcome[bad_rank] = "refused"
                buffer.copy_(saved)
            with open(f"rank{trainer.global_rank}.json", "w") as fh:
                json.dump({"outcome": outcome, "checks": [f.check for f in guard.findings]}, fh)
    """
    run_ddp_script(tmp_path, body, timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # rank 1's buffer alone: rank 0's finite state is written; rank 0's: both refuse
        assert rank["outcome"] == {"1": "saved", "0": "refused"}
    assert (tmp_path / "rank1_bad.ckpt").exists() and not (tmp_path / "rank0_bad.ckpt").exists()


# ---------------------------------------------------------------------------------------------- injected faults
def test_nan_loss_skips_the_step_leaving_weights_and_momentum_untouched(tmp_path: Path) -> None:
    guard, watch = NaNGuard(), StepSnapshot(step=3)
    model = faulty(lr=0.05, nan_loss_at={3})
    trainer = fit(tmp_path, model, [guard, watch], max_steps=6)
    assert watch.before["state"], "momentum buffers exist by step 3"
    assert_bit_identical(watch.before["params"], watch.after["params"])
    assert_bit_identical(watch.before["state"], watch.after["state"])
    assert guard.bad_steps == [{"step": 3, "kind": "nonfinite_loss", "lr": 0.05}]
    assert guard.first_bad is not None and guard.first_bad["step"] == 3 and math.isnan(guard.first_bad["loss"])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    assert guard.rollbacks == 0 and weights_finite(model)


def test_nan_gradient_skips_the_adam_step_and_names_the_parameter(tmp_path: Path) -> None:
    guard, watch = NaNGuard(save_batch=True), StepSnapshot(step=4)
    model = faulty(lr=1e-3, optimizer="adam", nan_grad_at={4})
    fit(tmp_path, model, [guard, watch], max_steps=7)
    assert_bit_identical(watch.before["state"], watch.after["state"])  # exp_avg, exp_avg_sq and step counters
    assert_bit_identical(watch.before["params"], watch.after["params"])
    finding = next(f for f in guard.findings if f.check == "nan_guard.nonfinite_grad")
    assert finding.step == 4
    assert finding.data["first_nonfinite"] == "layers.1.weight" == finding.data["nearest_output"]
    saved = torch.load(finding.data["batch_file"])
    assert saved[0].shape == (64, 64)
    assert weights_finite(model)


class GroupedBackwards(FaultyMLP):
    """The optimizer gets the parameters in two groups (biases, then weights), each last layer first; at
    ``nan_grad_at`` the middle layer's and the first layer's gradients go NaN, the last layer's stay finite."""

    def on_after_backward(self) -> None:
        if self.global_step in self.nan_grad_at:
            for layer in self.layers[:2]:
                layer.weight.grad[0, 0] = NAN  # type: ignore[index]
                layer.bias.grad[0] = NAN  # type: ignore[index]

    def configure_optimizers(self) -> Any:
        layers = list(reversed(self.layers))
        groups = [{"params": [layer.bias for layer in layers]}, {"params": [layer.weight for layer in layers]}]
        return torch.optim.SGD(groups, lr=self.hparams["lr"], momentum=0.9)


def test_the_nonfinite_gradients_are_named_in_registration_order_whatever_the_optimizer_s_order(
    tmp_path: Path,
) -> None:
    pl.seed_everything(0, workers=True)
    model = GroupedBackwards(hidden=(32, 32))
    model.nan_grad_at = frozenset({3})
    guard = NaNGuard()
    fit(tmp_path, model, [guard], max_steps=5)
    finding = next(f for f in guard.findings if f.check == "nan_guard.nonfinite_grad")
    assert finding.data["first_nonfinite"] == "layers.0.weight"  # the optimizer lists it last
    assert finding.data["nearest_output"] == "layers.1.bias"  # the optimizer lists it second
    assert "`layers.1.bias` in backward order (`layers.0.weight` first in registration order)" in finding.message


class MaskedLogits(DigitsMLP):
    """Adds a mask buffer of -inf to the logits of one impossible class (the way a causal attention mask is
    kept), as a persistent and as a non-persistent buffer: -inf by design, never written by an update."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        mask = torch.zeros(10)
        mask[9] = -math.inf
        self.register_buffer("logit_mask", mask)
        self.register_buffer("scratch_mask", mask.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.maximum(self.logit_mask, self.scratch_mask)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y.clamp(max=8))


def test_buffers_non_finite_by_design_are_not_taken_for_divergence(tmp_path: Path) -> None:
    pl.seed_everything(0)
    guard = NaNGuard()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer = fit(
        tmp_path, MaskedLogits(), [guard, checkpoints], max_steps=30, log_every_n_steps=5, enable_checkpointing=True
    )
    assert trainer.global_step == 30 and guard.halted_reason is None and guard.skipped_steps == 0
    assert guard_checks(guard) == ["nan_guard.nonfinite_buffers_by_design"]
    [info] = guard.findings
    assert info.severity == "info" and info.data["buffers"] == ["logit_mask", "scratch_mask"]
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=30.ckpt", weights_only=True)["state_dict"]
    assert saved["logit_mask"][9] == -math.inf  # written as it is


class NoOptimizer(DigitsMLP):
    def configure_optimizers(self) -> Any:
        return None  # Lightning trains without stepping


def test_a_run_without_an_optimizer_is_an_info_not_a_crash(tmp_path: Path) -> None:
    pl.seed_everything(0)
    guard = NaNGuard()
    trainer = fit(tmp_path, NoOptimizer(), [guard], max_steps=4)
    assert trainer.global_step == 4 and guard_checks(guard) == ["nan_guard.not_supported"]


def test_nan_parameter_rolls_back_to_the_last_good_snapshot(tmp_path: Path) -> None:
    class PoisonWeight(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 5:
                with torch.no_grad():
                    pl_module.head.weight[2, 2] = NAN

    guard = NaNGuard(snapshot_every_n_steps=2)
    model = faulty(lr=0.05)
    trainer = fit(tmp_path, model, [guard, PoisonWeight()], max_steps=9)
    assert trainer.global_step == 9 and weights_finite(model)
    assert guard.rollbacks == 1
    rollback = next(f for f in guard.findings if f.check == "nan_guard.rollback")
    assert rollback.data["to_step"] == 4 and rollback.data["from_step"] == 5
    nonfinite = next(f for f in guard.findings if f.check == "nan_guard.nonfinite_param")
    assert nonfinite.data["nonfinite_param"] == "head.weight"


class UnreadBuffer(FaultyMLP):
    """A float buffer no loss reads (like a running statistic used only in eval): NaN there never reaches the loss."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("eval_only", torch.zeros(3))


class PoisonBuffer(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.eval_only[1] = NAN


def test_nan_in_weights_no_loss_reads_is_caught_on_the_next_measured_step(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = UnreadBuffer(lr=0.05)
    guard = NaNGuard(every_n_steps=4, snapshot_every_n_steps=1000)
    trainer = fit(tmp_path, model, [guard, PoisonBuffer(step=5)], max_steps=10)
    nonfinite = [f for f in guard.findings if f.check == "nan_guard.nonfinite_param"]
    assert [(f.step, f.data["nonfinite_param"]) for f in nonfinite] == [(8, "eval_only")]
    rollback = next(f for f in guard.findings if f.check == "nan_guard.rollback")
    assert rollback.data["to_step"] == 0
    assert trainer.global_step == 10 and weights_finite(model)


def test_a_snapshot_is_never_taken_of_nan_weights(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = UnreadBuffer(lr=0.05)
    guard = NaNGuard(every_n_steps=1000, snapshot_every_n_steps=3)
    fit(tmp_path, model, [guard, PoisonBuffer(step=4)], max_steps=10)
    # snapshots at the start and after steps 2 (3 good steps); the one due after step 5 finds the NaN instead:
    # the next step names it and rolls back to the snapshot before the poison
    nonfinite = next(f for f in guard.findings if f.check == "nan_guard.nonfinite_param")
    assert nonfinite.step == 6 and nonfinite.data["nonfinite_param"] == "eval_only"
    rollback = next(f for f in guard.findings if f.check == "nan_guard.rollback")
    assert rollback.data["to_step"] == 3
    assert weights_finite(model)


def test_between_measured_steps_only_the_gradients_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_debug.nan_guard as nan_guard_module

    read: list[tuple[int, str]] = []
    original_params, original_grads = nan_guard_module.fused_norms, nan_guard_module.shared_grad_norms

    def params_read(tensors: Any) -> Any:
        read.append((trainer_step[0], "params"))
        return original_params(tensors)

    def grads_read(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        read.append((trainer_step[0], "grads"))
        return original_grads(tensors, *args, **kwargs)

    class Step(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            trainer_step[0] = trainer.global_step

    trainer_step = [0]
    monkeypatch.setattr(nan_guard_module, "fused_norms", params_read)
    monkeypatch.setattr(nan_guard_module, "shared_grad_norms", grads_read)
    pl.seed_everything(0)
    fit(tmp_path, DigitsMLP(), [Step(), NaNGuard(every_n_steps=4, snapshot_every_n_steps=None)], max_steps=9)
    assert [step for step, kind in read if kind == "params"] == [0, 4, 8]
    assert [step for step, kind in read if kind == "grads"] == list(range(9))


def test_loss_spike_is_skipped_when_enabled(tmp_path: Path) -> None:
    class SpikyMLP(FaultyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return loss * 1000 if self.global_step == 12 else loss

    pl.seed_everything(0)
    guard = NaNGuard(spike_factor=10.0, spike_window=10)
    fit(tmp_path, SpikyMLP(lr=0.05), [guard], max_steps=15)
    assert [(b["step"], b["kind"]) for b in guard.bad_steps] == [(12, "loss_spike")]


def test_healthy_run_is_bit_identical_with_and_without_the_guard(tmp_path: Path) -> None:
    def make() -> pl.LightningModule:
        return DigitsMLP(lr=0.05, dropout=0.1, batchnorm=True)

    guard = NaNGuard(snapshot_every_n_steps=3)
    plain = train_state(tmp_path / "a", make, max_steps=12)
    guarded = train_state(tmp_path / "b", make, callbacks=[guard], max_steps=12)
    assert_bit_identical(plain, guarded)
    assert guard.findings == [] and guard.backoffs == 0 and guard.skipped_steps == 0


# ---------------------------------------------------------------------------------------------- checkpoints, halting
def test_resume_after_a_backoff_keeps_the_reduced_learning_rate(tmp_path: Path) -> None:
    def constant(step: int) -> float:
        return 1.0

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    guard = NaNGuard()
    model = faulty(lr=0.05, lr_lambda=constant, nan_loss_at={3})
    fit(tmp_path, model, [guard, checkpoint], max_steps=6, enable_checkpointing=True)
    assert guard.backoffs == 1
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    assert path.exists()

    resumed_guard = NaNGuard()
    resumed = faulty(lr=0.05, lr_lambda=constant)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [resumed_guard], max_steps=10)
    trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=64), ckpt_path=str(path))
    assert trainer.global_step == 10
    assert resumed_guard.lr_scale == pytest.approx(1 / 3) and resumed_guard.backoffs == 1
    assert resumed_guard.lr_history == guard.lr_history
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 3)


def test_checkpoint_never_gets_non_finite_weights(tmp_path: Path) -> None:
    class PoisonAfterStep(Callback):  # runs before ModelCheckpoint, which Lightning always puts last
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.layers[0].bias[0] = NAN

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    guard = NaNGuard(snapshot_every_n_steps=2)
    model = faulty(lr=0.05)
    fit(tmp_path, model, [guard, PoisonAfterStep(), checkpoint], max_steps=6, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for v in saved["state_dict"].values() if v.is_floating_point())
    assert "nan_guard.checkpoint_replaced" in guard_checks(guard)
    assert guard.rollbacks == 1 and weights_finite(model)  # and training itself rolled back at step 4


def test_halts_cleanly_with_the_report_written(tmp_path: Path) -> None:
    guard = NaNGuard(max_backoffs=2, cooldown_steps=1)
    model = faulty(lr=0.5, nan_loss_at=set(range(100)))
    trainer = fit(tmp_path, model, [guard], max_steps=40, logger=CSVLogger(tmp_path, name="csv"))
    assert trainer.global_step < 40 and guard.halted_reason is not None
    assert guard.backoffs == 2 and weights_finite(model)
    halt = next(f for f in guard.findings if f.check == "nan_guard.halt")
    assert halt.severity == "error"
    assert halt.data["first_bad_lr"] == pytest.approx(0.5)
    assert halt.data["lowest_bad_lr"] == pytest.approx(0.5 / 9)
    assert halt.data["try_lr_max"] == pytest.approx(0.5 / 27)
    assert [h["new_lr"] for h in halt.data["lr_history"]] == pytest.approx([0.5 / 3, 0.5 / 9])
    reports = list(tmp_path.rglob("lightning-debug/report.json"))
    assert len(reports) == 1 and "halted" in json.loads(reports[0].read_text())["status"]
    assert any(row["check"] == "nan_guard.halt" for row in all_findings(tmp_path))
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0]
    assert {"nan_guard/lr_scale", "nan_guard/skipped_steps", "nan_guard/backoffs"} <= set(metrics.split(","))


def test_halt_can_raise_instead(tmp_path: Path) -> None:
    guard = NaNGuard(max_backoffs=0, on_halt="raise")
    with pytest.raises(NaNGuardHalt, match="max_backoffs=0"):
        fit(tmp_path, faulty(lr=0.05, nan_loss_at={2}), [guard], max_steps=5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"backoff_factor": 0}, "backoff_factor"),
        ({"max_backoffs": -1}, "max_backoffs"),
        ({"min_lr": -1.0}, "min_lr"),
        ({"cooldown_steps": 1.5}, "cooldown_steps"),
        ({"rollback_after": 0}, "rollback_after"),
        ({"snapshot_every_n_steps": 0}, "snapshot_every_n_steps"),
        ({"spike_factor": 0.5}, "spike_factor"),
        ({"spike_window": 2}, "spike_window"),
        ({"min_loss_scale": 0}, "min_loss_scale"),
        ({"max_scaler_skips": True}, "max_scaler_skips"),
        ({"on_halt": "explode"}, "on_halt"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        NaNGuard(**kwargs)


class WithExtraState(DigitsMLP):
    """A module whose state_dict carries a non-tensor entry (``get_extra_state``), as quantisation layers do."""

    def get_extra_state(self):
        return {"calibrated": True, "bins": [1, 2, 3]}

    def set_extra_state(self, state):
        self.restored_extra = state


def test_snapshots_and_checkpoints_keep_non_tensor_extra_state(tmp_path):
    pl.seed_everything(0)
    guard = NaNGuard(snapshot_every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, [guard, checkpoint], max_steps=6, enable_checkpointing=True)
    trainer.fit(WithExtraState(), datamodule=DigitsDataModule())
    assert trainer.global_step == 6
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved["_extra_state"] == {"calibrated": True, "bins": [1, 2, 3]}


# ---------------------------------------------------------------------------------------------- fits and optimizers
def test_a_second_fit_on_the_same_trainer_keeps_the_backed_off_learning_rate(tmp_path: Path) -> None:
    def constant(step: int) -> float:
        return 1.0

    guard = NaNGuard()
    model = faulty(lr=0.05, lr_lambda=constant, nan_loss_at={3})
    trainer = fit(tmp_path, model, [guard], max_steps=6)
    assert guard.backoffs == 1 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    trainer.fit_loop.epoch_loop.max_steps = 10
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))  # Lightning builds a new optimizer at lr 0.05
    assert trainer.global_step == 10
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(0.05 / 3)]  # the next sched step too
    carried = [f for f in guard.findings if f.check == "nan_guard.backoff_carried"]
    assert len(carried) == 1 and carried[0].severity == "info" and "x0.333" in carried[0].message


def test_a_new_trainer_starts_the_guard_afresh(tmp_path: Path) -> None:
    guard = NaNGuard()
    fit(tmp_path / "a", faulty(lr=0.05, nan_loss_at={3}), [guard], max_steps=6)
    assert guard.backoffs == 1 and guard.lr_scale == pytest.approx(1 / 3)
    trainer = fit(tmp_path / "b", faulty(lr=0.05), [guard], max_steps=6)
    assert guard.backoffs == 0 and guard.lr_scale == 1.0 and guard.findings == []
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)


class TwoOptimizers(FaultyMLP):
    """Manual optimization: two SGD optimizers (first layer / the rest) step on the same loss every batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        first = list(self.layers[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = DigitsMLP.training_step(self, batch, batch_idx)
        if batch_idx in self.nan_loss_at:
            loss = loss * NAN  # every gradient NaN: both optimizers' steps are bad
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()
        return loss


def test_one_bad_batch_under_two_optimizers_is_skipped_not_rolled_back(tmp_path: Path) -> None:
    guard = NaNGuard()
    pl.seed_everything(0, workers=True)
    model = TwoOptimizers()
    model.nan_loss_at = frozenset({10})
    fit(tmp_path, model, [guard], max_steps=30)
    assert guard.skipped_steps == 2  # both optimizers' steps on the bad batch
    assert guard.rollbacks == 0  # one bad batch: rollback_after=2 counts batches, not optimizer steps
    assert weights_finite(model)


class LBFGSMLP(FaultyMLP):
    """LBFGS (4 iterations per step): the loss goes NaN at the third closure evaluation of step 4."""

    evaluations: dict[int, int]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = DigitsMLP.training_step(self, batch, batch_idx)
        count = self.evaluations.get(self.global_step, 0)
        self.evaluations[self.global_step] = count + 1
        return loss * NAN if (self.global_step, count) == (4, 2) else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_bad_later_evaluation_skips_the_whole_step(tmp_path: Path) -> None:
    guard = NaNGuard()
    pl.seed_everything(0, workers=True)
    model = LBFGSMLP()
    model.evaluations = {}
    snapshot = StepSnapshot(step=4)
    fit(tmp_path, model, [snapshot, guard], max_steps=6)
    assert model.evaluations[4] == 3 and guard.skipped_steps == 1
    for key, before in snapshot.before["params"].items():
        assert torch.equal(before, snapshot.after["params"][key]), key  # the line search's moves undone
    assert snapshot.before["state"]["0.n_iter"] == snapshot.after["state"]["0.n_iter"]
    assert snapshot.before["state"]["0.func_evals"] == snapshot.after["state"]["0.func_evals"]
    assert model.optimizers().optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 3)  # the backoff stays


# ------------------------------------------------------------------ fused optimizers, unfreezing, several optimizers
class FusedAdamMLP(FaultyMLP):
    """Adam(fused=True) unscales inside its own step: Lightning leaves its gradients scaled for the hooks."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_fused_optimizer_under_a_real_grad_scaler_trains_bit_identical_and_quiet(tmp_path: Path) -> None:
    """The scaler's calibration overflows are its own to skip, also when the optimizer unscales in its step."""
    kwargs: dict[str, Any] = dict(max_steps=30, datamodule=DigitsDataModule(batch_size=64))
    plain = train_state(tmp_path / "a", FusedAdamMLP, plugins=[fp16_cpu_plugin()], **kwargs)
    guard = NaNGuard()
    guarded = train_state(tmp_path / "b", FusedAdamMLP, [guard], plugins=[fp16_cpu_plugin()], **kwargs)
    assert guard.findings == [] and guard.skipped_steps == 0 and guard.lr_scale == 1.0
    assert_bit_identical(plain, guarded)


def test_fused_optimizer_under_a_grad_scaler_still_skips_a_nan_loss_and_names_the_unscaled_norm(tmp_path: Path) -> None:
    class NaNAt20(FusedAdamMLP):
        nan_loss_at = frozenset({20})

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            if self.global_step == 20:  # the gradients as the optimizer will unscale them
                scale = self.trainer.precision_plugin.scaler.get_scale()
                norms = torch.stack([p.grad.double().norm() for p in self.parameters()])
                self.true_norm = float(norms.norm()) / scale

    guard, model = NaNGuard(), NaNAt20()
    pl.seed_everything(0)
    plugin = fp16_cpu_plugin(init_scale=2.0**10)  # calibrated: step 20's gradients are finite when scaled
    quiet_trainer(tmp_path, [guard], max_steps=25, plugins=[plugin]).fit(
        model, datamodule=DigitsDataModule(batch_size=64)
    )
    (finding,) = [f for f in guard.findings if f.check == "nan_guard.nonfinite_loss"]
    assert finding.step == 20 and guard.skipped_steps == 1
    assert math.isclose(finding.data["grad_norm"], model.true_norm, rel_tol=1e-3)
    assert f"grad norm {model.true_norm:.4g}" in finding.message


def test_a_parameter_unfrozen_mid_run_has_its_nan_gradient_skipped_on_the_step(tmp_path: Path) -> None:
    """BaseFinetuning-style: frozen but in the optimizer, then requires_grad_(True): checked from that step on."""

    class Unfrozen(FaultyMLP):
        nan_grad_at = frozenset({6})

        def on_train_start(self) -> None:
            self.layers[1].requires_grad_(False)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.global_step == 3:
                self.layers[1].requires_grad_(True)

    guard = NaNGuard()
    pl.seed_everything(0)
    quiet_trainer(tmp_path, [guard], max_steps=10).fit(Unfrozen(lr=0.05), datamodule=DigitsDataModule(batch_size=64))
    assert [(f.check, f.step) for f in guard.findings if f.check != "nan_guard.backoff"] == [
        ("nan_guard.nonfinite_grad", 6)
    ]
    assert guard.skipped_steps == 1 and guard.rollbacks == 0


class FirstOptimizerGoesBad(TwoOptimizers):
    """From batch 5 on, only the first optimizer's gradient is NaN; the second one's steps stay good."""

    def on_after_backward(self) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_idx >= 5:
            self.layers[0].weight.grad[0, 0] = NAN


def test_bad_batches_in_a_row_roll_back_although_another_optimizer_steps_fine_on_them(tmp_path: Path) -> None:
    guard = NaNGuard(rollback_after=2, snapshot_every_n_steps=2, max_backoffs=100, cooldown_steps=0)
    pl.seed_everything(0)
    quiet_trainer(tmp_path, [guard], max_steps=16).fit(
        FirstOptimizerGoesBad(), datamodule=DigitsDataModule(batch_size=64)
    )
    assert len(guard.bad_steps) == 3  # batches 5-7 (two optimizer steps per batch: 16 steps)
    assert guard.rollbacks >= 1  # the second bad batch in a row rolls back


def test_a_second_fit_on_the_same_trainer_after_a_halt_is_guarded_again(tmp_path: Path) -> None:
    class AlwaysBad(FaultyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = DigitsMLP.training_step(self, batch, batch_idx)
            return loss + NAN if self.global_step >= 3 else loss

    guard, model = NaNGuard(max_backoffs=1, cooldown_steps=1), AlwaysBad(lr=0.05)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [guard], max_steps=40, max_epochs=-1)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    first_halt = trainer.global_step
    trainer.fit_loop.epoch_loop.max_steps = 60
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert sum(f.check == "nan_guard.halt" for f in guard.findings) == 2
    assert trainer.global_step < first_halt + 5  # halted again, not 55 silently skipped steps


def test_a_backoff_during_stochastic_weight_averaging_survives_swalr(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    class NaNInEpoch3(DigitsMLP):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return loss + NAN if (self.current_epoch, batch_idx) == (3, 2) else loss

    guard = NaNGuard()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [guard, swa], max_epochs=6)
    trainer.fit(NaNInEpoch3(lr=0.05), datamodule=DigitsDataModule(batch_size=256))
    assert guard.backoffs == 1
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], 0.05 / 3)
