"""UpdateRatioMonitor on real digits training: too small, too large, frozen, skipped steps, precision, resume."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    AlternatingHeads,
    LBFGSDigits,
    SparseEmbedding,
    assert_bit_identical,
    fp16_cpu_plugin,
    quiet_trainer,
    run_ddp_script,
    train_state,
)
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

import lightning_debug
from lightning_debug import zoo
from lightning_debug.data import DigitsDataModule
from lightning_debug.init_loss import InitLossCallback
from lightning_debug.nan_guard import NaNGuard
from lightning_debug.update_ratio import UpdateRatioMonitor
from lightning_debug.weight_stats import WeightStatsMonitor


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def _checks(monitor: UpdateRatioMonitor, severity: str = "warning") -> list[str]:
    return [f.check for f in monitor.findings if f.severity == severity]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"too_small": 0.0}, "too_small"),
        ({"too_large": -1.0}, "too_large"),
        ({"too_small": 0.1, "too_large": 0.01}, "too_large"),
        ({"patience": 0}, "patience"),
        ({"every_n_steps": -3}, "every_n_steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        UpdateRatioMonitor(**kwargs)


def test_adam_at_lr_1e_7_updates_too_small(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(optimizer="adam", lr=1e-7), [monitor], max_steps=30)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.too_small"]
    assert finding.severity == "warning"
    assert set(finding.data["parameters"]) == {"layers.0.weight", "layers.1.weight", "head.weight"}
    assert all(1e-7 < r < 1e-5 for r in finding.data["median_ratio"].values())  # Adam: ~lr / |w| per element
    assert 1e-5 < finding.data["suggested_lr"] < 1e-2  # raises the ratio to ~1e-3
    assert "lr 1e-07 ->" in finding.hint


def test_logged_ratio_matches_the_applied_sgd_update(tmp_path: Path) -> None:
    """Plain SGD (momentum 0): the first step's update is exactly lr * grad."""

    class PlainSGD(zoo.DigitsMLP):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Expect(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            if trainer.global_step == 0:
                w = pl_module.head.weight
                self.expected = (0.1 * w.grad.norm() / w.norm()).item()

    monitor, expect = UpdateRatioMonitor(every_n_steps=1), Expect()
    _fit(tmp_path, PlainSGD(), [monitor, expect], max_steps=1)
    assert math.isclose(monitor.last_ratios["head.weight"], expect.expected, rel_tol=1e-4)


def test_too_large_updates_at_a_huge_learning_rate(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=2, patience=3)
    _fit(tmp_path, zoo.DigitsMLP(lr=3.0), [monitor], max_steps=12)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.too_large"]
    assert min(finding.data["median_ratio"].values()) > 0.1
    assert finding.data["suggested_lr"] < 3.0


def test_detached_first_layer_is_frozen_and_named(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(detach_first=True), [monitor], max_steps=30)
    assert _checks(monitor) == ["update_ratio.frozen"]
    assert monitor.findings[0].data["parameters"] == ["layers.0.weight", "layers.0.bias"]


def test_learning_rate_zero_is_frozen_not_skipped_forever(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=2, patience=3)
    _fit(tmp_path, zoo.DigitsMLP(lr=0.0), [monitor], max_steps=10)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.frozen"]
    assert finding.data["unchanged_steps"] == 3


def test_fp16_scaler_skipped_steps_are_dropped_not_too_small(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=1, patience=3)
    _fit(tmp_path, zoo.DigitsMLP(), [monitor], max_steps=40, plugins=[fp16_cpu_plugin()])
    assert monitor.skipped_steps >= 5  # the first overflow steps while the scale calibrates
    assert _checks(monitor) == []
    assert -3.5 < math.log10(monitor.last_ratios["layers.1.weight"]) < -1


def test_bf16_mixed_without_warnings(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(), [monitor], max_steps=30, precision="bf16-mixed")
    assert _checks(monitor) == [] and monitor.skipped_steps == 0
    assert set(monitor.last_ratios) >= {"layers.0.weight", "head.weight"}


def test_monitor_leaves_training_bit_identical(tmp_path: Path) -> None:
    def make() -> pl.LightningModule:
        return zoo.DigitsMLP(dropout=0.2, batchnorm=True, optimizer="adam", lr=1e-3)

    kwargs = dict(max_steps=25, datamodule=DigitsDataModule(batch_size=16))
    plain = train_state(tmp_path / "a", make, **kwargs)
    watched = train_state(tmp_path / "b", make, [UpdateRatioMonitor(every_n_steps=2)], **kwargs)
    assert_bit_identical(plain, watched)


def test_gradient_accumulation_measures_real_steps_only(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=2)
    _fit(tmp_path, zoo.DigitsMLP(), [monitor], max_steps=10, accumulate_grad_batches=3)
    assert monitor._measured == 5 and monitor.skipped_steps == 0


def test_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    first = UpdateRatioMonitor(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    _fit(
        tmp_path, zoo.DigitsMLP(optimizer="adam", lr=1e-7), [first, checkpoint], max_steps=20, enable_checkpointing=True
    )
    assert first.findings == []  # 4 measurements: patience 5 not reached yet
    second = UpdateRatioMonitor(every_n_steps=5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=30)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    trainer.fit(zoo.DigitsMLP(optimizer="adam", lr=1e-7), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert second._measured == 6
    # the 5th measurement (step 20) completes the restored history of 4: found right after resume
    (finding,) = [f for f in second.findings if f.check == "update_ratio.too_small"]
    assert finding.step == 21


class TwoGroups(zoo.DigitsMLP):
    """The head (first param group) at a sane lr, the hidden layers (second group) at a far too small one."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": self.head.parameters(), "lr": 0.05}, {"params": self.layers.parameters(), "lr": 1e-6}], lr=0.05
        )


def test_hint_uses_the_learning_rate_of_the_flagged_parameters_group(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, TwoGroups(), [monitor], max_steps=30)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.too_small"]
    assert "head.weight" not in finding.data["parameters"]
    assert finding.data["lr"] == 1e-6 and "lr 1e-06 ->" in finding.hint and "lr 0.05" not in finding.hint
    assert set(finding.data["lr_by_parameter"].values()) == {1e-6}
    assert 1e-3 < finding.data["suggested_lr"] < 1.0  # ~1e4 x 1e-6
    assert finding.step == 21  # the 5th measurement (step 20), in effect from step 21


class ThreeGroups(zoo.DigitsMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [
                {"params": self.layers[0].parameters(), "lr": 1e-5},
                {"params": self.layers[1].parameters(), "lr": 1e-6},
                {"params": self.head.parameters(), "lr": 0.05},
            ],
            lr=0.05,
        )


def test_hint_gives_advice_per_param_group(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, ThreeGroups(), [monitor], max_steps=30)
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.too_small"]
    assert finding.data["lr_by_parameter"] == {"layers.0.weight": 1e-5, "layers.1.weight": 1e-6}
    assert finding.data["lr"] is None  # several groups: see the per-parameter entries
    suggested = finding.data["suggested_lr_by_parameter"]
    assert all(1e-3 < suggested[n] < 1.0 for n in ("layers.0.weight", "layers.1.weight"))
    assert "lr 1e-05 ->" in finding.hint and "lr 1e-06 ->" in finding.hint


def test_sparse_gradients_are_measured(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=2)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=10)
    trainer.fit(SparseEmbedding(), datamodule=DigitsDataModule(batch_size=32, standardize=False))
    assert monitor._measured == 5 and monitor.skipped_steps == 0
    assert set(monitor.last_ratios) == {"emb.weight", "head.weight", "head.bias"}


def test_the_optimizer_step_hook_is_there_on_measured_steps_only(tmp_path: Path) -> None:
    """The update is taken by a step post-hook that exists only while a measurement is pending: the optimizer steps
    in between call no hook of the monitor, and none is left on the optimizer after the run."""

    class CountHooks(pl.Callback):  # after the monitor: sees its hook on measured steps, none on the others
        def __init__(self) -> None:
            self.hooks: list[int] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            self.hooks.append(len(optimizer._optimizer_step_post_hooks))

    monitor, count = UpdateRatioMonitor(every_n_steps=4), CountHooks()
    trainer = _fit(tmp_path, zoo.DigitsMLP(), [monitor, count], max_steps=12)
    assert count.hooks == [1 if step % 4 == 0 else 0 for step in range(12)]
    assert monitor._measured == 3 and len(monitor.last_ratios) == 6
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def _cosine_to_zero(total: int) -> Any:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def test_cosine_decay_to_zero_is_not_too_small(tmp_path: Path) -> None:
    """At the end of a cosine schedule the LR, and with it every update, goes to 0 on purpose: judged as at the
    peak LR, a healthy run gets no warning (the plain ratios fall below 1e-4 over the last measurements)."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    model = zoo.DigitsMLP(optimizer="adam", lr=1e-3, lr_lambda=_cosine_to_zero(600))
    _fit(tmp_path, model, [monitor], max_steps=600, max_epochs=-1, limit_val_batches=0)
    assert max(monitor.last_ratios[n] for n in ("layers.0.weight", "layers.1.weight", "head.weight")) < 1e-4
    assert _checks(monitor) == []


def test_a_schedule_that_decays_early_is_named_with_its_numbers(tmp_path: Path) -> None:
    """The LR cut 1000x at step 80 of 300: updates too small from a quarter of the run on are the schedule's doing,
    not a too-small LR; the finding names the schedule, the peak and the current LR, and how far the run is."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    model = zoo.DigitsMLP(optimizer="adam", lr=1e-3, lr_lambda=lambda step: 1.0 if step < 80 else 1e-3)
    _fit(tmp_path, model, [monitor], max_steps=300, max_epochs=-1, limit_val_batches=0)
    assert _checks(monitor) == ["update_ratio.lr_decayed_early"]
    (finding,) = monitor.findings
    assert math.isclose(finding.data["peak_lr"], 1e-3) and math.isclose(finding.data["lr"], 1e-6)
    assert finding.data["progress"] < 0.5 and finding.data["median_ratio"] < 1e-4
    assert finding.data["median_ratio_at_peak"] > 1e-4  # at the peak LR the same updates were fine
    assert "1,000x (from 0.001 to 1e-06)" in finding.message and "Decay later" in finding.hint


def test_updates_are_not_judged_too_small_while_the_lr_warms_up(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=10)
    model = zoo.DigitsMLP(optimizer="adam", lr=1e-3, lr_lambda=lambda step: (step + 1) / 20_000)
    _fit(tmp_path, model, [monitor], max_steps=200, max_epochs=-1, limit_val_batches=0)
    assert max(monitor.last_ratios[n] for n in ("layers.0.weight", "layers.1.weight", "head.weight")) < 1e-4
    assert _checks(monitor) == []


def test_a_decay_below_3x_is_not_blamed_on_the_schedule(tmp_path: Path) -> None:
    """Adam at lr 2e-5 cut 2.5x at step 30: the ratios fall from ~1.5e-4 to ~6e-5. At the peak LR they were above
    1e-4, and a 2.5x decay is no schedule decaying too early."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    model = zoo.DigitsMLP(optimizer="adam", lr=2e-5, lr_lambda=lambda step: 1.0 if step < 30 else 0.4)
    _fit(tmp_path, model, [monitor], max_steps=200, max_epochs=-1, limit_val_batches=0)
    for name in ("layers.0.weight", "layers.1.weight", "head.weight"):
        assert monitor._small_median(name) < 1e-4 < monitor._small_median(name, at_peak=True)
        assert math.isclose(statistics.median(scale for _, scale in monitor._small[name]), 2.5)
    assert monitor.findings == []


class _FlatMetric(zoo.DigitsMLP):
    """Logs ``flat``, a metric that never improves: a scheduler or EarlyStopping watching it acts on schedule."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("flat", 1.0)
        return super().training_step(batch, batch_idx)


class _Plateau(_FlatMetric):
    """Adam under ReduceLROnPlateau(factor=0.01, patience=0) on ``flat``: the LR falls 100x after the second epoch."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.01, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "flat"}}


def test_a_reduce_lr_on_plateau_decay_is_an_info_not_a_schedule_warning(tmp_path: Path) -> None:
    """ReduceLROnPlateau cuts the LR when its metric stops improving: a reaction, not a schedule planned to decay
    too early (at 30% of the run), so no advice about T_max or StepLR."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    _fit(tmp_path, _Plateau(), [monitor], max_epochs=10)
    assert _checks(monitor) == []
    (finding,) = monitor.findings
    assert finding.check == "update_ratio.lr_reduced_on_plateau" and finding.severity == "info"
    assert math.isclose(finding.data["peak_lr"], 1e-3) and math.isclose(finding.data["lr"], 1e-5)
    assert finding.data["median_ratio"] < 1e-4 < finding.data["median_ratio_at_peak"]
    assert "100x (from 0.001 to 1e-05)" in finding.message and "into training" not in finding.message
    assert "T_max" not in finding.hint


@pytest.mark.parametrize(("patience", "decay_step", "warns"), [(2, 60, False), (5, 20, True)])
def test_with_early_stopping_a_decay_is_judged_against_the_steps_the_run_took(
    tmp_path: Path, patience: int, decay_step: int, warns: bool
) -> None:
    """max_epochs=100 only bounds a run EarlyStopping ends: the LR cut 1000x at step 60 of the 141 steps it ran
    (patience 2) is late, at step 20 of 282 (patience 5) early; neither is a percentage of 100 epochs."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    stop = EarlyStopping("flat", patience=patience, check_on_train_epoch_end=True)
    model = _FlatMetric(optimizer="adam", lr=1e-3, lr_lambda=lambda step: 1.0 if step < decay_step else 1e-3)
    trainer = _fit(tmp_path, model, [monitor, stop], max_epochs=100, limit_val_batches=0)
    assert trainer.current_epoch == patience + 1
    if not warns:
        assert monitor.findings == []
        return
    (finding,) = monitor.findings
    assert finding.check == "update_ratio.lr_decayed_early"
    assert math.isclose(finding.data["progress"], round((finding.step - 1) / trainer.global_step, 3))
    assert 0.1 < finding.data["progress"] < 0.5
    assert f"the run stopped at step {trainer.global_step}" in finding.message


def test_a_decay_waiting_for_the_run_s_end_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    """Found at step 60 under EarlyStopping, checkpointed at step 100, judged when the resumed run ends at 300."""

    def model() -> pl.LightningModule:
        return _FlatMetric(optimizer="adam", lr=1e-3, lr_lambda=lambda step: 1.0 if step < 20 else 1e-3)

    def stop() -> EarlyStopping:
        return EarlyStopping("flat", patience=100, check_on_train_epoch_end=True)

    first = UpdateRatioMonitor(every_n_steps=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100, save_top_k=-1)
    _fit(
        tmp_path,
        model(),
        [first, stop(), checkpoint],
        max_steps=100,
        max_epochs=-1,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    second = UpdateRatioMonitor(every_n_steps=10)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second, stop()], max_steps=300, max_epochs=-1, limit_val_batches=0)
    ckpt = next((tmp_path / "ckpt").glob("*step=100.ckpt"))
    trainer.fit(model(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    (finding,) = second.findings
    assert finding.check == "update_ratio.lr_decayed_early" and finding.step == 61
    assert finding.data["progress"] == 0.2 and "the run stopped at step 300" in finding.message


def _trained_mlp(tmp_path: Path) -> zoo.DigitsMLP:
    pl.seed_everything(0)
    trained = zoo.DigitsMLP(optimizer="adam", lr=1e-3)
    quiet_trainer(tmp_path, [], max_epochs=2, logger=False).fit(trained, datamodule=DigitsDataModule(batch_size=32))
    return trained


class _FineTune(zoo.DigitsMLP):
    """AdamW at a BERT-style lr of 2e-5: linear warm-up over the first 10% of the run, linear decay to 0."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-5, weight_decay=0.01)
        total = int(self.trainer.estimated_stepping_batches)
        warm = total // 10

        def factor(step: int) -> float:
            return (step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_fine_tuning_trained_weights_gets_an_info_not_raise_the_lr(tmp_path: Path) -> None:
    """Trained weights fine-tuned at 2e-5 move ~5e-5 per step, on purpose: raising the LR 10-20x to reach 1e-3
    would erase what they learned. InitLossCallback's init_loss.trained tells; the LR's mild decay is not blamed."""
    model = _FineTune()
    model.load_state_dict(_trained_mlp(tmp_path / "pretrain").state_dict())
    init_loss, monitor = InitLossCallback("multiclass", 10), UpdateRatioMonitor(every_n_steps=10)
    _fit(tmp_path, model, [init_loss, monitor], max_epochs=3)
    assert [f.check for f in init_loss.findings] == ["init_loss.trained"]
    assert _checks(monitor) == []
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.too_small"]
    assert finding.severity == "info" and finding.data["fine_tuning"] is True
    assert all(1e-5 < ratio < 1e-4 for ratio in finding.data["median_ratio"].values())
    assert "expected when fine-tuning" in finding.message and "catastrophic forgetting" in finding.hint


class LargeVocabulary(pl.LightningModule):
    """Pixels (0..16) as tokens of a 100,000-row embedding table: every batch reaches 17 of its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100_000, 8)
        self.head = torch.nn.Linear(64 * 8, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(torch.relu(self.emb(x.long().clamp(0, 16)).flatten(1))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_an_embedding_table_is_logged_but_not_judged_too_small(tmp_path: Path) -> None:
    """Adam at 1e-3 moves the 17 rows a batch reaches, ~1e-5 of the whole table: the vocabulary's size, not the LR."""
    monitor = UpdateRatioMonitor(every_n_steps=5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=40)
    trainer.fit(LargeVocabulary(), datamodule=DigitsDataModule(batch_size=32, standardize=False))
    assert monitor.findings == []
    assert 1e-6 < statistics.median(monitor._ratios["emb.weight"]) < 1e-4
    assert "emb.weight" not in monitor._small and "head.weight" in monitor._small
    events = [p for p in Path(trainer.log_dir).glob("events.out.tfevents.*")]
    assert events and b"update_ratio/emb.weight" in events[0].read_bytes()


class Memorise(pl.LightningModule):
    """An MLP fitting one fixed batch of random data (an overfit-one-batch check): the loss goes to ~0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 64, generator=generator), torch.randint(0, 10, (64,), generator=generator)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(self.x), self.y)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(range(10_000), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_fitted_batch_gets_an_info_not_raise_the_lr(tmp_path: Path) -> None:
    """Once the loss is ~0 there is little gradient left and Adam's updates shrink below 1e-4: that is the model
    fitting its data, not a learning rate to raise."""
    monitor = UpdateRatioMonitor(every_n_steps=10)
    pl.seed_everything(0)
    quiet_trainer(tmp_path, [monitor], max_steps=450).fit(Memorise())
    assert _checks(monitor) == []
    (finding,) = monitor.findings
    assert finding.check == "update_ratio.fitted" and finding.severity == "info"
    assert finding.data["median_ratio"] < 1e-4 and finding.data["loss_drop"] >= 100
    assert finding.data["first_loss"] > 2.0  # ~ln(10) at init
    assert "Not a learning-rate problem" in finding.message


def test_ddp_ranks_judge_the_mean_loss_and_agree_on_fitted(tmp_path: Path) -> None:
    """Each rank memorises its own batch, so the ranks' losses differ; the loss rides in the measured step's
    reduced transfer, and both ranks hold the same losses and the same findings."""
    run_ddp_script(
        tmp_path,
        """
        import json
        import lightning.pytorch as pl
        import torch
        import torch.nn.functional as F
        from torch import nn
        from lightning_debug.update_ratio import UpdateRatioMonitor

        class Memorise(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                         nn.Linear(256, 10))

            def setup(self, stage):
                generator = torch.Generator().manual_seed(self.global_rank)  # a different batch per rank
                self.x = torch.randn(64, 64, generator=generator)
                self.y = torch.randint(0, 10, (64,), generator=generator)

            def training_step(self, batch, batch_idx):
                loss = F.cross_entropy(self.net(self.x), self.y)
                return loss + 0.5 * self.global_rank * loss.detach()  # rank 1's reported loss is 1.5x (same gradient)

            def train_dataloader(self):
                return torch.utils.data.DataLoader(range(20_000), batch_size=None)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)

        pl.seed_everything(0)
        monitor = UpdateRatioMonitor(every_n_steps=10)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=450, callbacks=[monitor],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             logger=False, default_root_dir=".")
        trainer.fit(Memorise())
        out = {"first": monitor._first_loss, "recent": list(monitor._recent_losses),
               "checks": sorted(f.check for f in monitor.findings)}
        json.dump(out, open(f"rank{trainer.global_rank}.json", "w"))
        """,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert rank0["checks"] == ["update_ratio.fitted"]
    assert 2.0 * 1.25 * 0.9 < rank0["first"] < 2.5 * 1.25 * 1.1  # the ranks' mean: ln 10 x (1 + 1.5) / 2


def test_the_peak_lr_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    """Resumed after the schedule cut the LR: the restored peak LR still tells the schedule's decay from a
    too-small LR (without it the resumed monitor would take 1e-6 for the peak and advise raising it)."""

    def model() -> pl.LightningModule:
        return zoo.DigitsMLP(optimizer="adam", lr=1e-3, lr_lambda=lambda step: 1.0 if step < 20 else 1e-3)

    first = UpdateRatioMonitor(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    _fit(tmp_path, model(), [first, checkpoint], max_steps=20, enable_checkpointing=True)
    assert first.findings == []
    second = UpdateRatioMonitor(every_n_steps=5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=200, max_epochs=-1, limit_val_batches=0)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    trainer.fit(model(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert _checks(second) == ["update_ratio.lr_decayed_early"]
    assert math.isclose(second.findings[0].data["peak_lr"], 1e-3)


# ------------------------------------------------------------------ 16-bit weights (precision="16-true"/"bf16-true")
def test_adam_default_eps_with_float16_weights_warns_at_the_start(tmp_path: Path) -> None:
    """Adam's eps=1e-8 is 0 in float16: the weights go NaN on the first steps, and no learning rate fixes it."""
    monitor, guard = UpdateRatioMonitor(every_n_steps=5), NaNGuard()
    _fit(tmp_path, zoo.DigitsMLP(optimizer="adam", lr=1e-3), [monitor, guard], max_steps=60, precision="16-true")
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.eps_underflow"]
    assert finding.severity == "warning" and finding.step == 0
    assert finding.data["problems"] == [
        {"optimizer": "Adam", "optimizer_index": 0, "group": 0, "eps": 1e-8, "as_float16": 0.0, "float16_params": 6}
    ]
    assert "eps=1e-08 (0 in float16)" in finding.message and "eps=1e-4" in finding.hint
    # what it predicts happens, and NaNGuard's halt does not send the user to a smaller learning rate
    assert guard.first_bad is not None and guard.first_bad["step"] <= 2
    (halt,) = [f for f in guard.findings if f.check == "nan_guard.halt"]
    assert halt.hint.startswith("The learning rate is not the cause") and halt.data["float16_eps"]
    # ...and it halts on the first bad step: backing the learning rate off cannot fix a 0/0 update
    assert halt.step == guard.first_bad["step"] and "no learning-rate backoff can fix" in halt.message
    assert guard.backoffs == 0 and guard.lr_scale == 1.0 and not guard.lr_history


def test_16_bit_weights_in_sound_recipes_get_no_warning_from_the_suite(tmp_path: Path) -> None:
    class SafeEps(zoo.DigitsMLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-4)

    recipes = (
        ("16-true", "adam eps=1e-4", SafeEps()),
        ("16-true", "sgd", zoo.DigitsMLP()),
        ("bf16-true", "adam", zoo.DigitsMLP(optimizer="adam", lr=1e-3)),
    )
    for precision, name, model in recipes:
        callbacks = lightning_debug.suite(num_classes=10, every_n_steps=5)
        _fit(tmp_path / f"{precision}-{name}", model, callbacks, max_steps=60, precision=precision)
        findings = [f for cb in callbacks for f in getattr(cb, "findings", [])]
        assert [f.check for f in findings if f.severity != "info"] == [], name
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_eps_check_needs_float16_weights(tmp_path: Path) -> None:
    """Adam's default eps is fine in float32, bfloat16 (float32's exponent range) and 16-mixed (float32 weights)."""
    configs: dict[str, dict[str, Any]] = {
        "32-true": {},
        "bf16-true": {"precision": "bf16-true"},
        "16-mixed": {"plugins": [fp16_cpu_plugin()]},
    }
    for name, kwargs in configs.items():
        monitor = UpdateRatioMonitor(every_n_steps=5)
        _fit(tmp_path / name, zoo.DigitsMLP(optimizer="adam", lr=1e-3), [monitor], max_steps=10, **kwargs)
        assert [f.check for f in monitor.findings] == [], name


class _UnchangedProbe(pl.Callback):
    """An independent count, on one step: of the elements with a non-zero gradient, the share the step left equal."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.fraction = step, None, None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            self.before = [(p, p.detach().clone(), p.grad.detach().clone()) for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.before is not None and self.fraction is None:
            nonzero = sum(int((g != 0).sum()) for _, _, g in self.before)
            same = sum(int(((g != 0) & (p.detach() == b)).sum()) for p, b, g in self.before)
            self.fraction = same / nonzero


def test_bf16_weights_updates_rounded_away_are_measured_and_reported(tmp_path: Path) -> None:
    """Adam at lr 1e-4 on bfloat16 weights: most per-element updates are below half a bf16 ulp of the weight."""
    monitor, probe = UpdateRatioMonitor(every_n_steps=5), _UnchangedProbe(step=20)
    trainer = _fit(tmp_path, zoo.DigitsMLP(optimizer="adam", lr=1e-4), [monitor, probe], max_steps=30,
                   precision="bf16-true")  # fmt: skip
    assert probe.fraction is not None and 0.25 < probe.fraction < 1.0
    assert math.isclose(monitor._rounded[0][-2], probe.fraction, rel_tol=1e-9)  # the measurement of step 20
    (finding,) = [f for f in monitor.findings if f.check == "update_ratio.rounded_away"]
    assert finding.severity == "info" and finding.step == 21  # the 5th measurement: steps 0, 5, ..., 20
    assert finding.data["dtypes"] == ["bfloat16"] and finding.data["median_fraction"] >= 0.25
    assert "8 significant bits" in finding.message and "bf16-mixed" in finding.hint
    events = [p for p in Path(trainer.log_dir).glob("events.out.tfevents.*")]
    assert events and b"update_ratio/rounded_away" in events[0].read_bytes()


def test_float32_weights_are_not_counted(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(optimizer="adam", lr=1e-4), [monitor], max_steps=30)
    assert monitor._rounded == {} and monitor.findings == []


def test_bf16_weights_training_stays_bit_identical(tmp_path: Path) -> None:
    def make() -> pl.LightningModule:
        return zoo.DigitsMLP(dropout=0.2, optimizer="adam", lr=1e-4)

    kwargs = dict(max_steps=25, precision="bf16-true")
    plain = train_state(tmp_path / "a", make, **kwargs)
    watched = train_state(tmp_path / "b", make, [UpdateRatioMonitor(every_n_steps=2)], **kwargs)
    assert_bit_identical(plain, watched)


def test_rounded_away_history_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    def model() -> pl.LightningModule:
        return zoo.DigitsMLP(optimizer="adam", lr=1e-4)

    first = UpdateRatioMonitor(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1)
    _fit(tmp_path, model(), [first, checkpoint], max_steps=15, enable_checkpointing=True, precision="bf16-true")
    assert len(first._rounded[0]) == 3 and first.findings == []
    second = UpdateRatioMonitor(every_n_steps=5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=25, precision="bf16-true")
    ckpt = tmp_path / "ckpt" / "epoch=0-step=15.ckpt"
    trainer.fit(model(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert list(second._rounded[0])[:3] == list(first._rounded[0])
    # the 5th measurement (step 20) completes the restored history of 3 + step 15's
    (finding,) = [f for f in second.findings if f.check == "update_ratio.rounded_away"]
    assert finding.step == 21


def test_ddp_ranks_agree_on_rounded_away(tmp_path: Path) -> None:
    run_ddp_script(
        tmp_path,
        """
        import json
        import lightning.pytorch as pl
        from lightning_debug import zoo
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.update_ratio import UpdateRatioMonitor

        pl.seed_everything(0)
        monitor = UpdateRatioMonitor(every_n_steps=5)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=30, callbacks=[monitor],
                             precision="bf16-true", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, logger=False, default_root_dir=".")
        trainer.fit(zoo.DigitsMLP(optimizer="adam", lr=1e-4), datamodule=DigitsDataModule(batch_size=32))
        out = {"rounded": list(monitor._rounded[0]), "checks": sorted(f.check for f in monitor.findings)}
        json.dump(out, open(f"rank{trainer.global_rank}.json", "w"))
        """,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert rank0["checks"] == ["update_ratio.rounded_away"] and len(rank0["rounded"]) == 5


def test_bf16_norm_scales_whose_updates_all_round_away_are_frozen_for_that_reason(tmp_path: Path) -> None:
    """BatchNorm scales start at 1.0, where bfloat16 moves in steps of 2^-8 to 2^-7: Adam's ~1e-3 updates never move
    them. They are frozen, but not for the usual reasons (no gradient, lr 0), and the findings say so."""
    callbacks = [UpdateRatioMonitor(every_n_steps=5), WeightStatsMonitor(every_n_steps=5)]
    model = zoo.DigitsMLP(batchnorm=True, detach_first=True, optimizer="adam", lr=1e-3)
    _fit(tmp_path, model, callbacks, max_steps=60, precision="bf16-true")
    assert torch.equal(model.norms[1].weight, torch.ones_like(model.norms[1].weight))  # really never moved
    for callback in callbacks:
        frozen = [f for f in callback.findings if f.check.endswith(".frozen")]
        rounded = [f for f in frozen if f.data.get("rounded_away")]
        (finding,) = rounded
        assert finding.data["parameters"] == ["norms.1.weight"], type(callback).__name__
        assert "rounded away" in finding.message and "bf16-mixed" in finding.hint
        # the layer cut off by .detach() has no gradient: frozen for the usual reason, with the usual advice
        others = [f for f in frozen if not f.data.get("rounded_away")]
        assert others and "layers.0.weight" in others[0].data["parameters"] and ".detach()" in others[0].hint


def test_two_optimizers_keep_their_own_rounded_away_history(tmp_path: Path) -> None:
    """Manual optimization, SGD on the hidden layers and Adam on the head, bf16 weights: each optimizer's share of
    rounded-away updates is its own (one shared history mixed them by the order they stepped in)."""

    class TwoOptimizers(zoo.DigitsMLP):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            for optimizer in self.optimizers():
                optimizer.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [
                torch.optim.SGD(self.layers.parameters(), lr=0.05),
                torch.optim.Adam(self.head.parameters(), lr=1e-4),
            ]

    monitor = UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, TwoOptimizers(), [monitor], max_steps=60, precision="bf16-true")
    assert set(monitor._rounded) == {0, 1}
    findings = {f.data["optimizer_index"]: f for f in monitor.findings if f.check == "update_ratio.rounded_away"}
    assert 1 in findings and findings[1].data["parameters"] == ["head.weight", "head.bias"]
    assert "optimizer 1's" in findings[1].message
    if 0 in findings:
        assert all(name.startswith("layers.") for name in findings[0].data["parameters"])
    # each history holds its own optimizer's steps: Adam at lr 1e-4 loses far more updates than SGD at 0.05
    assert min(monitor._rounded[1]) > max(monitor._rounded[0])


def test_biases_before_batchnorm_in_16_bit_weights_are_not_frozen_warnings(tmp_path: Path) -> None:
    """A conv bias feeding BatchNorm has a zero gradient up to rounding noise and, in 16 bits, never moves: harmless
    (WeightStatsMonitor says so as an info), so no frozen warning, neither 'rounded away' nor 'no gradient'."""
    for precision in ("bf16-true", "16-true"):
        callbacks = lightning_debug.suite(num_classes=10)
        pl.seed_everything(0)
        trainer = quiet_trainer(tmp_path / precision, callbacks, max_epochs=3, precision=precision)
        trainer.fit(zoo.DigitsCNN(), datamodule=DigitsDataModule(batch_size=32, image_shape=True))
        findings = [f for cb in callbacks for f in getattr(cb, "findings", [])]
        assert [f.check for f in findings if f.severity != "info"] == [], precision
        (monitor,) = [cb for cb in callbacks if isinstance(cb, UpdateRatioMonitor)]
        assert monitor._before_norm >= {"features.3.bias"}


def test_a_head_that_changes_only_between_measured_steps_is_not_frozen(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor()  # every 2 steps with log_every_n_steps=1: the odd head never changes there
    _fit(tmp_path, AlternatingHeads(), [monitor], max_steps=16, log_every_n_steps=1)
    assert monitor._valid_measurements["odd_head.weight"] >= monitor.patience  # judged
    assert _checks(monitor) == [] and "never_changed" not in monitor.summary()


class _TrainsOnOddSteps(zoo.DigitsMLP):
    """Skips the even steps (training_step returns None): on every measured step no parameter changes."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return super().training_step(batch, batch_idx) if self.global_step % 2 else None


def test_a_run_that_changes_only_between_measured_steps_is_not_frozen(tmp_path: Path) -> None:
    monitor = UpdateRatioMonitor(every_n_steps=2)
    _fit(tmp_path, _TrainsOnOddSteps(), [monitor], max_steps=16)
    assert monitor._measured == 8 and monitor.skipped_steps == 8  # each measured step changed nothing
    assert _checks(monitor) == []


class _StepRatios(pl.Callback):
    """The applied ||Δw|| / ||w|| of ``head.weight`` over each whole training step, and the closure evaluations."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self.evaluations: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.before = pl_module.head.weight.detach().clone()
        self.evaluations.append(0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.evaluations[-1] += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        delta = pl_module.head.weight.detach() - self.before
        self.ratios.append((torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(self.before)).item())


@pytest.mark.parametrize("manual", [False, True])
def test_lbfgs_is_measured_once_per_optimizer_step_over_the_whole_step(tmp_path: Path, manual: bool) -> None:
    monitor, applied = UpdateRatioMonitor(every_n_steps=2, patience=3), _StepRatios()
    _fit(tmp_path, LBFGSDigits(manual), [monitor, applied], max_steps=12)
    assert min(applied.evaluations) > 1  # several closure evaluations per step
    assert monitor._measured == 6 and monitor.skipped_steps == 0
    assert "update_ratio.frozen" not in _checks(monitor)  # (LBFGS's steps are large: too_large is fair)
    assert monitor.last_ratios["head.weight"] == pytest.approx(applied.ratios[10], rel=1e-4)  # the last measured
