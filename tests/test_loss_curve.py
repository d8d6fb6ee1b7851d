import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    OneCycleSGD,
    all_findings,
    assert_bit_identical,
    fp16_cpu_plugin,
    quiet_trainer,
    run_ddp_script,
    train_state,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug.data import DigitsDataModule, load_digits_tensors
from lightning_debug.init_loss import InitLossCallback
from lightning_debug.loss_curve import LossCurveMonitor
from lightning_debug.nan_guard import NaNGuard
from lightning_debug.zoo import DigitsCNN, DigitsMLP


def fit(tmp_path, model, callback, *loaders, datamodule=None, guard=False, extra=(), **kwargs):
    """``guard``: NaNGuard in the run too (the monitor then takes its losses from NaNGuard's feed and dozes);
    ``extra``: more callbacks."""
    kwargs.setdefault("max_epochs", 3)
    trainer = quiet_trainer(tmp_path, [callback, *([NaNGuard()] if guard else []), *extra], **kwargs)
    if loaders:
        trainer.fit(model, *loaders)
    else:
        trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=64))
    return trainer


def checks(callback):
    return [(f.check, f.severity) for f in callback.findings]


class RecordsLosses(DigitsMLP):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def random_imbalanced_labels():
    """Digits with random labels, 5% positives: there is nothing to learn but the prior."""
    images, labels = load_digits_tensors()
    positives = (torch.rand(len(labels), generator=torch.Generator().manual_seed(0)) < 0.05).long()
    loader = DataLoader(
        TensorDataset(images, positives), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    return loader, positives.float().mean().item()


# ---------------------------------------------------------------- healthy
@pytest.mark.parametrize("image_shape", [False, True])
def test_healthy_digits_runs_get_no_findings(tmp_path, image_shape):
    pl.seed_everything(0)
    callback = LossCurveMonitor()
    model = DigitsCNN() if image_shape else DigitsMLP()
    fit(tmp_path, model, callback, datamodule=DigitsDataModule(batch_size=64, image_shape=image_shape))
    assert callback.findings == []
    assert callback.measurements == 14  # steps 5..70 of 72
    assert callback.hockey["status"] == "ok" and callback.hockey["speedup"] < 3


@pytest.mark.parametrize("guard", [False, True])
def test_the_measured_loss_is_the_mean_of_the_training_step_losses_since_the_last_measurement(tmp_path, guard):
    pl.seed_everything(0)
    model = RecordsLosses()
    callback = LossCurveMonitor(every_n_steps=4)
    fit(tmp_path, model, callback, max_steps=12, guard=guard)
    assert (callback._loss_feed is not None) == guard
    steps_and_means = list(callback.recent_losses)
    assert [s for s, _ in steps_and_means] == [4, 8, 12][-len(steps_and_means) :]
    assert callback.start_losses[0] == pytest.approx(sum(model.losses[:4]) / 4, rel=1e-9)
    assert steps_and_means[-1][1] == pytest.approx(sum(model.losses[8:12]) / 4, rel=1e-9)


# ---------------------------------------------------------------- not decreasing
def test_a_learning_rate_far_too_small_is_not_decreasing(tmp_path):
    pl.seed_everything(0)
    callback = LossCurveMonitor()
    fit(tmp_path, DigitsMLP(lr=1e-6), callback)
    [finding] = callback.findings
    assert (finding.check, finding.severity, finding.step) == ("loss_curve.not_decreasing", "warning", 50)
    assert finding.data["recent"] > 0.95 * finding.data["start"]
    assert math.log(10) == pytest.approx(finding.data["start"], rel=0.02)
    assert "learning rate" in finding.hint


def test_a_flat_loss_while_fine_tuning_trained_weights_is_an_info(tmp_path):
    """Weights trained for 3 epochs, then fine-tuned on one batch of 64 with Adam at 1e-7: the loss starts near its
    floor and stays there. InitLossCallback finds the weights trained; "raise the LR 10x" is not the advice."""
    pl.seed_everything(0)
    model = DigitsMLP(optimizer="adam", lr=1e-2)
    fit(tmp_path / "pretrain", model, LossCurveMonitor(), max_epochs=3)
    model.hparams["lr"] = 1e-7
    images, labels = load_digits_tensors()
    one_batch = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=64)
    callback = LossCurveMonitor(every_n_steps=5, window=6)
    init_loss = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, model, callback, one_batch, extra=[init_loss], max_epochs=40)
    assert init_loss.result["status"] == "trained"
    [finding] = [f for f in callback.findings if f.check == "loss_curve.not_decreasing"]
    assert finding.severity == "info" and "init_loss.trained" in finding.message
    assert "validation metric" in finding.hint and "10x" not in finding.hint


# ---------------------------------------------------------------- hockey stick
@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("init_loss", [False, True])
def test_imbalanced_labels_with_a_default_bias_give_a_hockey_stick(tmp_path, guard, init_loss):
    pl.seed_everything(0)
    loader, _ = random_imbalanced_labels()
    callback = LossCurveMonitor()
    extra = [InitLossCallback(task="multiclass", num_classes=2)] if init_loss else []
    fit(tmp_path, DigitsMLP(num_classes=2), callback, loader, max_epochs=1, guard=guard, extra=extra)
    [finding] = callback.findings
    assert (finding.check, finding.step) == ("loss_curve.hockey_stick", 50)
    assert finding.data["early_drop"] > 0.5 and finding.data["speedup"] > 10
    assert "log class priors" in finding.hint
    if init_loss:  # the fast start stopped at the constant predictor: the bias was all it learned
        assert finding.data["knee"] >= 0.5 * finding.data["best_constant"]


def test_a_fast_start_that_learns_features_is_no_hockey_stick(tmp_path):
    """He init on balanced digits: 2.4 to 0.64 in 10 steps, 12x faster than the next 40, but far below the best
    constant predictor (2.27): those steps learned features, there was no bias to learn."""
    pl.seed_everything(0)
    model = DigitsMLP(optimizer="adam", lr=1e-3, hidden=(256, 256, 256))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    callback, init_loss = LossCurveMonitor(), InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, model, callback, datamodule=DigitsDataModule(batch_size=32), max_steps=60, extra=[init_loss])
    hockey = callback.hockey
    assert hockey["early_drop"] > 0.5 and hockey["speedup"] > 10  # the speed alone would call it a hockey stick
    assert hockey["knee"] < 0.5 * hockey["best_constant"] and hockey["status"] == "ok"
    assert checks(callback) == []


def test_the_same_run_with_the_bias_at_the_log_priors_is_no_hockey_stick(tmp_path):
    pl.seed_everything(0)
    loader, rate = random_imbalanced_labels()
    model = DigitsMLP(num_classes=2)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([math.log(1 - rate), math.log(rate)]))
    callback = LossCurveMonitor()
    fit(tmp_path, model, callback, loader, max_epochs=1)
    assert callback.hockey["status"] == "ok" and callback.hockey["early_drop"] < 0.5
    assert [c for c, _ in checks(callback)] == ["loss_curve.not_decreasing"]  # random labels: nothing to learn


# ---------------------------------------------------------------- overfitting
@pytest.mark.parametrize("guard", [False, True])
def test_a_big_model_on_100_examples_overfits_and_the_hint_names_the_best_step(tmp_path, guard):
    pl.seed_everything(0)
    images, labels = load_digits_tensors()
    train = DataLoader(TensorDataset(images[:100], labels[:100]), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(images[1000:1400], labels[1000:1400]), batch_size=200)
    callback = LossCurveMonitor()
    model = DigitsMLP(hidden=(256, 256), optimizer="adam", lr=1e-2)
    fit(tmp_path, model, callback, train, val, max_epochs=12, guard=guard)
    [finding] = [f for f in callback.findings if f.check == "loss_curve.overfitting"]
    best = min(callback.validations, key=lambda p: p["val"])
    assert finding.data["best_step"] == best["step"]
    assert finding.data["now"]["val"] > 1.05 * best["val"] and finding.data["now"]["train"] < best["train"]
    assert f"Stop at step {best['step']}" in finding.hint and "weight decay" in finding.hint


def test_shuffled_training_labels_are_no_generalisation_not_overfitting(tmp_path):
    """The training labels permuted apart from the inputs: the model memorises them (the training loss falls)
    while the validation loss never gets below the constant predictor's ln 10. There is no good step to stop at."""
    pl.seed_everything(0)
    images, labels = load_digits_tensors()
    shuffled = labels[:100][torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    train = DataLoader(TensorDataset(images[:100], shuffled), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(images[1000:1400], labels[1000:1400]), batch_size=200)
    callback = LossCurveMonitor()
    model = DigitsMLP(hidden=(256, 256), optimizer="adam", lr=1e-2)
    init_loss = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, model, callback, train, val, max_epochs=12, extra=[init_loss])
    [finding] = [f for f in callback.findings if f.severity != "info"]
    assert finding.check == "loss_curve.no_generalisation"
    constant = init_loss.result["best_constant"]
    assert constant == pytest.approx(math.log(10)) and min(p["val"] for p in callback.validations) >= constant
    assert finding.data["now"]["train"] < finding.data["best_constant"]
    assert "labels line up with the inputs" in finding.hint and "Stop at step" not in finding.hint


def test_a_too_large_init_being_undone_is_no_hockey_stick(tmp_path):
    """Inputs 200x too large: the loss starts at ~10x ln 10 and 70% of it is gone in 10 steps, the logits
    shrinking back, not a bias being learned (the classes are balanced). InitLossCallback names the cause."""
    pl.seed_everything(0)
    callback, init_loss = LossCurveMonitor(), InitLossCallback(task="multiclass", num_classes=10)
    model = DigitsMLP(input_mask=200.0, lr=1e-2, optimizer="adam")
    fit(tmp_path, model, callback, datamodule=DigitsDataModule(batch_size=32), max_steps=60, extra=[init_loss])
    assert init_loss.result["status"] == "too_high"
    assert callback.hockey["status"] == "init_too_high"
    assert callback.hockey["early_drop"] > 0.5 and callback.hockey["speedup"] > 10  # the shape alone: a hockey stick
    assert "loss_curve.hockey_stick" not in [f.check for f in callback.findings]


def test_a_start_that_diverged_and_was_rolled_back_is_not_judged(tmp_path):
    callback = LossCurveMonitor(hockey_steps=2)
    callback._early_host = [0.9, 2.9, 357.0, 0.92, 0.8, 0.3, 0.29, 0.28, 0.27, 0.26]
    trainer = type("T", (), {"world_size": 1, "callbacks": [callback]})()
    callback._judge_hockey(trainer)
    assert callback.hockey["status"] == "unstable_start" and callback.hockey["max_early"] == 357.0


def test_a_validation_bump_while_the_training_loss_rose_too_is_not_overfitting():
    """A healthy CNN's epochs (from a 25-epoch digits run): validation 0.0102-0.0107, then a bump to 0.0153 and
    0.0136 (about one of 397 images), back to 0.011 later. Its training loss rose over the same epochs, so the
    gap did not grow. The last point alone is below the best validation's training loss, which is noise."""
    vals = [0.30, 0.10, 0.05, 0.03, 0.02, 0.015, 0.0102, 0.0112, 0.0107, 0.0119, 0.0153, 0.0136]
    trains = [0.50, 0.20, 0.10, 0.06, 0.04, 0.03, 0.0240, 0.0185, 0.0177, 0.0195, 0.0210, 0.0220]

    def judged(train_losses):
        """The findings of validations ``vals`` with these training losses, one point per epoch."""
        callback, reported = LossCurveMonitor(), []
        callback.report = lambda trainer, check, *args, **kwargs: reported.append(check)
        trainer = type("T", (), {"world_size": 1, "callbacks": [callback]})()
        for epoch, (val, train) in enumerate(zip(vals, train_losses)):
            point = {"step": 22 * (epoch + 1), "val": val, "train": train, "lr": 1e-3, "epoch": epoch}
            callback.validations.append(point)
            callback._judge_overfitting(trainer, point)
        return reported

    assert judged(trains) == []
    # the training loss falling over those epochs but still above validation (dropout): no gap, no overfitting
    assert judged([*[2 * t for t in trains[:9]], 0.0180, 0.0170, 0.0160]) == []
    # the same validations with the training loss falling over those epochs: the gap grew, overfitting
    assert judged([*trains[:9], 0.0150, 0.0120, 0.0100]) == ["loss_curve.overfitting"]


def test_validation_loss_rising_with_a_one_cycle_lr_is_not_overfitting(tmp_path):
    """OneCycleLR to max_lr 0.2: while the LR rises 4x the validation loss climbs from 0.29 to ~1 (training still
    falls); that is the LR's doing, and the run ends at 95% validation accuracy. Stopping at the best step, as
    the overfitting hint advises, would be wrong here."""
    callback = LossCurveMonitor()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=8, log_every_n_steps=50)
    trainer.fit(OneCycleSGD(total_steps=940), datamodule=DigitsDataModule(batch_size=32))
    best = min(callback.validations, key=lambda p: p["val"])
    worse = [p for p in callback.validations if p["step"] > best["step"] and p["val"] > 1.5 * best["val"]]
    assert len(worse) >= callback.patience and all(p["lr"] > best["lr"] for p in worse)
    assert [f.check for f in callback.findings if f.severity != "info"] == []


def test_validating_every_10_steps_on_one_batch_is_no_overfitting(tmp_path):
    """80 validations of one 32-example batch: the validation loss falls 0.37 -> 0.054 (medians of the run's
    quarters) but wobbles by ~10% from one validation to the next, and three in a row above a lucky low one were
    called overfitting. Averaged per epoch and judged against its own noise, the healthy run stays quiet."""
    callback = LossCurveMonitor()
    pl.seed_everything(0)
    model = DigitsMLP(optimizer="adam", lr=1e-3, dropout=0.3)
    fit(
        tmp_path, model, callback, datamodule=DigitsDataModule(batch_size=32),
        max_epochs=20, val_check_interval=10, limit_val_batches=1, log_every_n_steps=50,
    )  # fmt: skip
    vals = [p["val"] for p in callback.validations]
    assert len(vals) == 80 and vals[-1] < 0.2 * vals[0]
    assert max(b / a for a, b in zip(vals[40:], vals[41:])) > 1.1  # the wobble
    assert checks(callback) == []


# ---------------------------------------------------------------- regularisation
class L2Logged(DigitsMLP):
    """Adam at 1e-3 shrinks the weights slowly, so a large coefficient keeps the penalty dominant."""

    def __init__(self, weight_decay: float) -> None:
        super().__init__(optimizer="adam", lr=1e-3)
        self.weight_decay = weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        data_loss = F.cross_entropy(self(x), y)
        reg_loss = self.weight_decay * sum(p.pow(2).sum() for p in self.parameters())
        self.log("data_loss", data_loss)
        self.log("reg_loss", reg_loss)
        return data_loss + reg_loss


@pytest.mark.parametrize("weight_decay, flagged", [(1.0, True), (1e-4, False)])
def test_a_regularisation_term_10x_the_data_loss_is_flagged(tmp_path, weight_decay, flagged):
    pl.seed_everything(0)
    callback = LossCurveMonitor()
    fit(tmp_path, L2Logged(weight_decay), callback, max_steps=20)
    reg = [f for f in callback.findings if f.check == "loss_curve.reg_dominates"]
    assert bool(reg) == flagged
    if flagged:
        assert reg[0].step == 15 and reg[0].data["ratio"] > 10  # 3 measurements in a row: 5, 10, 15


# ---------------------------------------------------------------- odd models
class ReturnsNothing(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_a_training_step_without_a_loss_is_one_info_finding(tmp_path):
    callback = LossCurveMonitor()
    trainer = fit(tmp_path, ReturnsNothing(), callback, max_steps=12)
    assert checks(callback) == [("loss_curve.no_loss", "info")]
    assert trainer.global_step == 12


# ---------------------------------------------------------------- monitor rules
def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    callback = LossCurveMonitor(every_n_steps=2, hockey_steps=2)
    with_it = train_state(tmp_path / "b", make_model, [callback], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    assert callback.measurements == 6 and len(callback.validations) == 2
    assert_bit_identical(without, with_it)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_healthy_run_gets_no_findings(tmp_path, precision):
    pl.seed_everything(0)
    callback = LossCurveMonitor()
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    fit(tmp_path, DigitsMLP(), callback, **kwargs)
    assert callback.findings == []
    assert callback.measurements == 14


def test_resume_continues_the_curves_and_reports_nothing_twice(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = LossCurveMonitor()
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=60, max_epochs=5, enable_checkpointing=True)
    trainer.fit(DigitsMLP(lr=1e-6), datamodule=DigitsDataModule())
    assert checks(first) == [("loss_curve.not_decreasing", "warning")]

    resumed = LossCurveMonitor()
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=80, max_epochs=5)
    trainer.fit(DigitsMLP(lr=1e-6), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 80
    assert checks(resumed) == checks(first)
    assert resumed.measurements == 16 and resumed.start_losses == first.start_losses
    assert [v["step"] for v in resumed.validations][: len(first.validations)] == [v["step"] for v in first.validations]


def test_ddp_averages_the_loss_across_ranks(tmp_path):
    # Rank r returns a loss of exactly r: only the mean of the two ranks gives 0.5.
    run_ddp_script(
        tmp_path,
        """
        import json, torch, lightning.pytorch as pl
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_debug.loss_curve import LossCurveMonitor

        class RankLoss(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
            def training_step(self, batch, batch_idx):
                (x,) = batch
                return torch.tensor(float(self.global_rank)) + 0 * x.float().mean() + 0 * self.w.sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        callback = LossCurveMonitor(every_n_steps=2, window=4, hockey_steps=2)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=12, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(RankLoss(), DataLoader(TensorDataset(torch.arange(256)), batch_size=4))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"recent": list(callback.recent_losses), "checks": [f.check for f in callback.findings]}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert [v for _, v in rank["recent"]] == [0.5, 0.5]
        assert rank["checks"] == ["loss_curve.not_decreasing"]
    assert [f["check"] for f in all_findings(tmp_path)] == ["loss_curve.not_decreasing"]


def test_ddp_metrics_logged_on_rank_zero_only_do_not_hang_the_other_rank(tmp_path):
    """val_loss, reg_loss and data_loss logged under `if self.global_rank == 0`: every rank takes the same
    collectives (or none), the run finishes, and the ranks agree."""
    run_ddp_script(
        tmp_path,
        """
        import json, torch, lightning.pytorch as pl
        import torch.nn.functional as F
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_debug.loss_curve import LossCurveMonitor

        class RankZeroLogs(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
            def training_step(self, batch, batch_idx):
                x, y = batch
                data = F.mse_loss(self.layer(x).squeeze(-1), y)
                reg = 1e-3 * self.layer.weight.square().sum()
                if self.global_rank == 0:
                    self.log_dict({"reg_loss": reg, "data_loss": data})
                return data + reg
            def validation_step(self, batch, batch_idx):
                x, y = batch
                if self.global_rank == 0:
                    self.log("val_loss", F.mse_loss(self.layer(x).squeeze(-1), y))
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(256, 4), torch.randn(256))
        callback = LossCurveMonitor(every_n_steps=2, window=4)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, limit_val_batches=2)
        trainer.fit(RankZeroLogs(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"measurements": callback.measurements, "validations": len(callback.validations),
                       "checks": [f.check for f in callback.findings]}, handle)
        """,
        timeout=180,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["measurements"] >= 8 and ranks[0]["validations"] == 0  # not on every rank: not judged


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window": 1}, "window"),
        ({"min_decrease": 0.0}, "min_decrease"),
        ({"min_decrease": 1.0}, "min_decrease"),
        ({"hockey_steps": -1}, "hockey_steps"),
        ({"val_metric": ""}, "val_metric"),
        ({"patience": 0}, "patience"),
        ({"reg_metric": None}, "reg_metric"),
        ({"data_metric": 3}, "data_metric"),
        ({"reg_ratio": 0}, "reg_ratio"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LossCurveMonitor(**kwargs)


def test_unmeasured_steps_do_one_tensor_op(tmp_path):
    """Per step only a copy of the loss is kept; sums, finiteness and counts wait for the measured steps."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name not in ("numel", "dim", "size"):  # metadata, no kernel
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    class Counting(LossCurveMonitor):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.per_step: list[list[str]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            measured = self.is_measured_step(trainer) or trainer.global_step == 5 * self.hockey_steps
            with Count() as mode:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if not measured:
                self.per_step.append(mode.calls)

    monitor = Counting(every_n_steps=10)
    fit(tmp_path, DigitsMLP(), monitor, max_epochs=None, max_steps=40)
    assert len(monitor.per_step) > 20
    assert max(len(calls) for calls in monitor.per_step) <= 2, monitor.per_step[:3]  # detach + one float64 copy
    assert monitor.measurements == 4


class _Unfed(LossCurveMonitor):
    """Reads the losses from ``outputs`` on every batch, as without NaNGuard, in the same run as a fed monitor."""

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        feeds = trainer.callbacks[0]._loss_feeds
        feeds[:] = [feed for feed in feeds if feed is not self._loss_feed]  # by identity: every new feed is []
        self._loss_feed = None


class _NaNLossAt(DigitsMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step in (23, 37) else loss


def test_losses_from_nanguards_feed_give_what_the_outputs_give(tmp_path):
    # one run (NaNGuard skips two non-finite steps), two monitors: one fed by NaNGuard and dozing, one reading outputs
    pl.seed_everything(0)
    fed, unfed = LossCurveMonitor(every_n_steps=7, hockey_steps=4), _Unfed(every_n_steps=7, hockey_steps=4)
    datamodule = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(tmp_path, [NaNGuard(), fed, unfed], max_epochs=4, val_check_interval=0.5)
    trainer.fit(_NaNLossAt(), datamodule=datamodule)
    assert fed._loss_feed is not None and unfed._loss_feed is None
    assert fed.measurements == unfed.measurements > 5
    assert fed.start_losses == unfed.start_losses and list(fed.recent_losses) == list(unfed.recent_losses)
    assert fed.hockey == unfed.hockey and fed.hockey["status"] in ("ok", "hockey_stick")
    assert fed.validations == unfed.validations and len(fed.validations) >= 6
    seen = [[(f.check, f.step, f.message) for f in monitor.findings] for monitor in (fed, unfed)]
    assert seen[0] == seen[1]


class _SkipsAt(DigitsMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if self.global_step in (6, 20) else loss  # the batches that end at measured steps 7 and 21


def test_a_measured_batch_without_a_loss_still_measures_what_the_feed_brought(tmp_path):
    pl.seed_everything(0)
    fed, unfed = LossCurveMonitor(every_n_steps=7, hockey_steps=4), _Unfed(every_n_steps=7, hockey_steps=4)
    quiet_trainer(tmp_path, [NaNGuard(), fed, unfed], max_steps=30).fit(
        _SkipsAt(), datamodule=DigitsDataModule(batch_size=64)
    )
    assert fed._loss_feed is not None and fed.measurements == unfed.measurements == 3
    assert list(fed.recent_losses) == list(unfed.recent_losses) and fed.start_losses == unfed.start_losses


class _RaisesAt(DigitsMLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 10:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_feeds_are_dropped_when_a_fit_raises_and_a_new_fit_starts_clean(tmp_path):
    guard, curve = NaNGuard(), LossCurveMonitor(every_n_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(tmp_path / "a", [guard, curve], max_steps=30).fit(
            _RaisesAt(), datamodule=DigitsDataModule(batch_size=64)
        )
    assert guard._loss_feeds == [] and guard._norm_feeds == []  # no list left filling up in a later fit
    quiet_trainer(tmp_path / "b", [guard, curve], max_steps=12).fit(
        DigitsMLP(), datamodule=DigitsDataModule(batch_size=64)
    )
    assert curve._loss_feed is not None and curve.recent_losses[-1][0] == 10  # fed again, measured


def test_a_float64_model_reads_its_losses_itself(tmp_path):
    curve = LossCurveMonitor(every_n_steps=4)
    fit(tmp_path, DigitsMLP(), curve, max_steps=8, guard=True, precision="64-true")
    assert curve._loss_feed is None and curve.measurements == 2  # NaNGuard's copy of the loss is float32


class SkipsSomeSteps(DigitsMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 4 == 3 else loss  # Lightning skips the step


def test_a_training_step_that_skips_some_batches_is_no_finding(tmp_path):
    callback = LossCurveMonitor()
    fit(tmp_path, SkipsSomeSteps(), callback, max_steps=12)
    assert checks(callback) == []
    assert callback.measurements >= 2 and callback.start_losses  # the other batches' losses are measured


# ---------------------------------------------------------------------------------- Trainer(overfit_batches=...)
class SmoothedLabels(DigitsMLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.1)  # its minimum is ~0.5, not 0


def overfit(tmp_path, model, callbacks, max_steps=300, data=None, **kwargs):
    """``Trainer(overfit_batches=1)`` (or ``kwargs``'s) on the digits in batches of 32, or on ``data`` (a loader)."""
    pl.seed_everything(0)
    kwargs.setdefault("overfit_batches", 1)
    trainer = quiet_trainer(
        tmp_path, callbacks, max_steps=max_steps, max_epochs=2 * max_steps, log_every_n_steps=50, **kwargs
    )
    if isinstance(data, DataLoader):
        trainer.fit(model, data)
    else:
        trainer.fit(model, datamodule=data or DigitsDataModule(batch_size=32))
    return trainer


def verdict(callback):
    [finding] = [f for f in callback.findings if f.check.startswith("loss_curve.overfit_batches")]
    return finding


def test_overfitting_one_batch_that_fits_is_an_info_and_the_whole_suite_stays_quiet(tmp_path):
    import lightning_debug

    callbacks = lightning_debug.suite(num_classes=10)
    overfit(tmp_path, DigitsMLP(optimizer="adam", lr=1e-3), callbacks)
    findings = [f for cb in callbacks for f in getattr(cb, "findings", [])]
    assert [f.format() for f in findings if f.severity != "info"] == []
    [found] = [f for f in findings if f.check.startswith("loss_curve.overfit_batches")]
    assert found.check == "loss_curve.overfit_batches_passed" and found.step == 300
    assert found.data["final"] <= 0.01 * found.data["first"]
    assert found.data["first"] == pytest.approx(math.log(10), rel=0.1)  # the loss over the first two steps
    assert "can fit 1 batch(es)" in found.message and "remove overfit_batches" in found.hint


def test_a_model_that_cannot_use_its_inputs_fails_against_the_best_constant_prediction(tmp_path):
    callback = LossCurveMonitor()
    overfit(tmp_path, DigitsMLP(input_mask=0.0), [callback, InitLossCallback(task="multiclass", num_classes=10)])
    # inputs zeroed: the best it can do is the batch's label frequencies; and the validation loss that rises
    # meanwhile is the point of the exercise, not overfitting to report
    assert checks(callback) == [("loss_curve.overfit_batches_failed", "warning")]
    finding = callback.findings[0]
    assert finding.data["final"] >= 0.9 * finding.data["best_constant"]
    assert "a constant prediction (the label frequencies, no input) scores" in finding.message
    assert "did not get 10% below it" in finding.message
    assert "inputs that never reach the model" in finding.hint


def test_without_an_init_loss_reference_a_loss_that_barely_moves_fails(tmp_path):
    callback = LossCurveMonitor()
    overfit(tmp_path, DigitsMLP(optimizer="adam", lr=1e-7), [callback])
    assert ("loss_curve.overfit_batches_failed", "warning") in checks(callback)
    finding = next(f for f in callback.findings if f.check == "loss_curve.overfit_batches_failed")
    assert finding.data["best_constant"] is None and finding.data["final"] >= 0.5 * finding.data["first"]
    assert "of where it started" in finding.message


def test_a_loss_with_a_floor_above_zero_is_partial_not_failed(tmp_path):
    callback = LossCurveMonitor()
    overfit(
        tmp_path,
        SmoothedLabels(optimizer="adam", lr=1e-3),
        [callback, InitLossCallback(task="multiclass", num_classes=10)],
    )
    assert checks(callback) == [("loss_curve.overfit_batches_partial", "info")]
    assert 0.3 < callback.findings[0].data["final"] < 0.7  # label smoothing 0.1 over 10 classes: ~0.5
    assert "label smoothing" in callback.findings[0].hint


def test_too_few_steps_to_overfit_is_an_info_and_a_normal_run_gets_no_verdict(tmp_path):
    short = LossCurveMonitor()
    overfit(tmp_path / "a", DigitsMLP(optimizer="adam", lr=1e-3), [short], max_steps=30)
    assert checks(short) == [("loss_curve.overfit_batches_too_short", "info")]
    normal = LossCurveMonitor()
    fit(tmp_path / "b", DigitsMLP(optimizer="adam", lr=1e-3), normal, max_steps=300, max_epochs=20)
    assert not any(f.check.startswith("loss_curve.overfit_batches") for f in normal.findings)


def test_ddp_ranks_reach_the_same_overfit_verdict(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, lightning.pytorch as pl
        from lightning_debug.loss_curve import LossCurveMonitor
        from lightning_debug.init_loss import InitLossCallback
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.zoo import DigitsMLP

        pl.seed_everything(0)
        callback = LossCurveMonitor()
        init = InitLossCallback(task="multiclass", num_classes=10)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=150, max_epochs=150,
                             overfit_batches=1, log_every_n_steps=50, callbacks=[callback, init], default_root_dir=".",
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(DigitsMLP(optimizer="adam", lr=1e-3), datamodule=DigitsDataModule(batch_size=16))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump([[f.check, f.data] for f in callback.findings], handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # judged on losses and targets reduced across the ranks
    assert [check for check, _ in ranks[0]] == ["loss_curve.overfit_batches_passed"]
    assert 1.5 < ranks[0][0][1]["best_constant"] < 2.3  # both ranks' batches of 16: 32 labels


def test_the_constant_prediction_is_measured_on_the_memorised_batch_itself(tmp_path):
    # a batch of 8: its own label frequencies score lower than the data set's, and zeroed inputs reach exactly them
    callback = LossCurveMonitor()
    init = InitLossCallback(task="multiclass", num_classes=10)
    overfit(tmp_path, DigitsMLP(input_mask=0.0), [callback, init], data=DigitsDataModule(batch_size=8))
    finding = verdict(callback)
    assert finding.check == "loss_curve.overfit_batches_failed"
    assert finding.data["best_constant"] < 2.1  # 8 labels: fewer classes than the data set's 2.28
    assert finding.data["final"] == pytest.approx(finding.data["best_constant"], rel=0.02)


def test_a_batch_whose_labels_are_all_alike_proves_nothing(tmp_path):
    images, labels = load_digits_tensors()
    order = torch.argsort(labels, stable=True)  # sorted by label: the first batch is all zeros
    loader = DataLoader(TensorDataset(images[order], labels[order]), batch_size=32)
    callback = LossCurveMonitor()
    init = InitLossCallback(task="multiclass", num_classes=10)
    overfit(tmp_path, DigitsMLP(input_mask=0.0), [callback, init], max_steps=150, data=loader)  # zeroed inputs
    finding = verdict(callback)  # still "fit" a batch of one class
    assert finding.check == "loss_curve.overfit_batches_uninformative" and finding.severity == "info"
    assert finding.data["best_constant"] == 0.0 and "their targets are all alike" in finding.message


def test_gradient_accumulation_does_not_shrink_the_losses(tmp_path):
    # Lightning hands on_train_batch_end the loss divided by accumulate_grad_batches
    callback = LossCurveMonitor()
    init = InitLossCallback(task="multiclass", num_classes=10)
    overfit(
        tmp_path, DigitsMLP(input_mask=0.0), [callback, init], max_steps=150, overfit_batches=2,
        accumulate_grad_batches=2,
    )  # fmt: skip
    finding = verdict(callback)
    assert finding.check == "loss_curve.overfit_batches_failed"
    assert finding.data["first"] == pytest.approx(math.log(10), rel=0.05)  # not halved
    assert callback.start_losses[0] == pytest.approx(math.log(10), rel=0.1)  # the logged curve too


def test_the_verdict_reads_the_last_steps_not_the_last_measurement_window(tmp_path):
    callback = LossCurveMonitor(every_n_steps=300, hockey_steps=0)  # one window over the whole run, no hockey start
    overfit(tmp_path, DigitsMLP(optimizer="adam", lr=1e-3), [callback])
    finding = verdict(callback)
    assert finding.check == "loss_curve.overfit_batches_passed"
    assert finding.data["first"] == pytest.approx(math.log(10), rel=0.05)  # the first two steps, not the window
    assert finding.data["final"] < 0.01


class Regularised(DigitsMLP):
    """Cross-entropy plus an L2 term large enough to keep the total loss far above 0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        data = F.cross_entropy(self(x), y)
        reg = 0.02 * sum((p * p).sum() for p in self.parameters())
        self.log("data_loss", data)
        self.log("reg_loss", reg)
        return data + reg


def test_a_logged_task_loss_is_judged_without_the_regularisation_term(tmp_path):
    callback = LossCurveMonitor(reg_ratio=1e9)
    trainer = overfit(tmp_path, Regularised(optimizer="adam", lr=1e-3), [callback])
    finding = verdict(callback)
    # the L2 term keeps the weights small: the task loss falls ~30x, not to 0; judged on it, the run is not failed
    assert finding.check == "loss_curve.overfit_batches_partial"
    assert "`data_loss`, the task loss without the regularisation term" in finding.message
    assert "(the total loss at the start)" in finding.message
    assert finding.data["final"] == pytest.approx(float(trainer.callback_metrics["data_loss"]), rel=1e-6)


def test_a_resumed_overfit_run_keeps_its_start(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    overfit(tmp_path, DigitsMLP(optimizer="adam", lr=1e-3), [LossCurveMonitor(), checkpoint], max_steps=60,
            enable_checkpointing=True)  # fmt: skip
    resumed = LossCurveMonitor()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=300, max_epochs=600, overfit_batches=1, log_every_n_steps=50)
    trainer.fit(
        DigitsMLP(optimizer="adam", lr=1e-3), datamodule=DigitsDataModule(batch_size=32),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )  # fmt: skip
    finding = verdict(resumed)
    assert finding.check == "loss_curve.overfit_batches_passed"
    assert finding.data["first"] == pytest.approx(math.log(10), rel=0.05)  # the run's start, not the resumed part's
