import json
import math
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_bit_identical,
    fp16_cpu_plugin,
    quiet_trainer,
    run_ddp_script,
    train_state,
    two_digits_loaders,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug import InitLossCallback, InitLossError
from lightning_debug.data import DigitsDataModule, load_digits_tensors
from lightning_debug.zoo import DigitsMLP


def fit(tmp_path, model, callback, datamodule=None, **kwargs):
    kwargs.setdefault("max_steps", 3)
    trainer = quiet_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=64))
    return trainer


def warnings_of(callback):
    return [f for f in callback.findings if f.severity != "info"]


# ---------------------------------------------------------------- expected-loss formulas
def test_multiclass_references_are_ln_c_and_prior_entropy():
    refs = InitLossCallback(task="multiclass", num_classes=4)._references([10, 10, 10, 70])
    assert refs["expected"] == pytest.approx(math.log(4))
    priors = [0.1, 0.1, 0.1, 0.7]
    assert refs["best_constant"] == pytest.approx(-sum(p * math.log(p) for p in priors))
    # bias = centred log priors, smoothed by half a count per class: softmax(bias) reproduces them
    smoothed = [(c + 0.5) / 102 for c in (10, 10, 10, 70)]
    assert torch.softmax(torch.tensor(refs["bias"]), 0).tolist() == pytest.approx(smoothed, abs=1e-3)


def test_a_class_the_probe_batches_missed_gets_a_finite_bias():
    refs = InitLossCallback(task="multiclass", num_classes=4)._references([0, 30, 30, 140])
    assert refs["priors"][0] == 0 and refs["best_constant"] < math.log(4) * 0.75
    # add-half smoothing: log(0.5 / 202) centred, not log(1e-6) (a class the model would then never predict)
    assert min(refs["bias"]) > -5
    assert torch.softmax(torch.tensor(refs["bias"]), 0)[0] == pytest.approx(0.5 / 202, abs=1e-4)


def test_a_few_labels_of_a_balanced_set_are_not_taken_for_imbalance():
    # 8 digits drawn from ten equal classes (counts 1, 4, 2, 1): label entropy 1.21, but chance gives that
    counts = [0, 0, 1, 0, 4, 0, 2, 0, 1, 0]
    refs = InitLossCallback(task="multiclass", num_classes=10)._references(counts)
    assert refs["best_constant"] == pytest.approx(math.log(10)) and refs["bias"] is None and refs["priors_uniform"]
    assert refs["majority_rate"] == pytest.approx(0.5)
    # the same proportions over 80 examples are imbalance
    refs = InitLossCallback(task="multiclass", num_classes=10)._references([10 * c for c in counts])
    assert refs["best_constant"] == pytest.approx(1.2130, abs=1e-3) and len(refs["bias"]) == 10
    # binary: 3 positives of 4 is chance, 60 of 80 is not
    assert InitLossCallback(task="binary")._references([3.0, 4.0])["best_constant"] == pytest.approx(math.log(2))
    assert InitLossCallback(task="binary")._references([60.0, 80.0])["positive_rate"] == pytest.approx(0.75)


def test_a_balanced_set_read_one_example_per_batch_is_not_called_imbalanced(tmp_path):
    # 4 probe examples hold at most 4 of the 10 classes: label entropy <= ln 4 = 1.39, against ln 10 = 2.30
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(), callback, datamodule=DigitsDataModule(batch_size=1))
    assert [f.check for f in callback.findings] == [] and callback.result["status"] == "ok"


def test_large_outputs_from_large_inputs_are_blamed_on_the_inputs_not_the_final_layer(tmp_path):
    # the inputs 200x their standardised scale; every layer at PyTorch's default init (std 0.58/sqrt(fan_in))
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    images, labels = load_digits_tensors()
    raw = DataLoader(TensorDataset(images * 200, labels), batch_size=64, shuffle=True)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(DigitsMLP(), raw)
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high" and finding.data["output_std"] > 5
    assert finding.data["final_weight_std"] == pytest.approx((3 * 64) ** -0.5, rel=0.15)
    assert finding.data["input_rms"] > 100  # standardised digits (root mean square 0.9), times 200
    assert "the inputs are not normalised (root mean square" in finding.message
    assert "starts out too large" not in finding.message
    assert finding.hint.startswith("Normalise the inputs") and "would bring the loss at init down" in finding.hint


def test_large_features_from_standardised_inputs_are_a_new_head_to_scale(tmp_path):
    # large hidden weights (a trained backbone's large features) under a head at PyTorch's default init: the
    # inputs are standardised, so scaling the head is the fix (as for a new head on a pretrained network)
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(weight_scale=20.0), callback)
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high" and finding.data["input_rms"] < 2
    assert "not normalised" not in finding.message and finding.hint.startswith("Multiply `head`'s initial weights")


class SummedLoss(DigitsMLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="sum")


def test_a_loss_summed_over_the_batch_is_named_as_such(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, SummedLoss(), callback, datamodule=DigitsDataModule(batch_size=64))
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high" and finding.data["targets_per_batch"] == 64
    assert finding.data["measured"] / finding.data["expected"] == pytest.approx(64, rel=0.25)
    assert "summed over the batch" in finding.message and "reduction='mean'" in finding.hint


def test_binary_references_are_ln2_and_entropy_of_the_positive_rate():
    refs = InitLossCallback(task="binary", positive_rate=0.2)._references(None)
    assert refs["expected"] == pytest.approx(math.log(2))
    assert refs["best_constant"] == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    assert refs["bias"] == pytest.approx(math.log(0.2 / 0.8), abs=1e-4)


def test_regression_references_are_second_moment_and_variance():
    # targets 1, 3 -> mean 2, variance 1
    refs = InitLossCallback(task="regression")._references([4.0, 10.0, 2.0])
    assert refs["expected"] == pytest.approx(1.0 + 4.0)
    assert refs["best_constant"] == pytest.approx(1.0)
    assert refs["bias"] == pytest.approx(2.0)


# ---------------------------------------------------------------- the acceptance runs
def test_last_layer_scaled_60x_gets_a_warning_with_a_last_layer_hint(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(last_layer_scale=60.0), callback)
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high" and finding.severity == "warning"
    assert finding.data["measured"] > 3 * math.log(10)
    assert finding.data["final_layer"] == "head"
    # digits' ten classes are balanced: the bias to start from is zero, not the probe batches' sampling noise
    assert "`head`" in finding.hint and "set its bias to zero" in finding.hint
    # the suggested factor brings the measured output std to ~0.5
    factor = float(finding.hint.split("initial weights by ")[1].split(" ")[0])
    assert factor * finding.data["output_std"] == pytest.approx(0.5, rel=0.01)


def test_default_init_gets_no_finding_and_measures_close_to_ln_10(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(), callback)
    assert callback.findings == []
    assert callback.result["status"] == "ok"
    assert callback.result["measured"] == pytest.approx(math.log(10), rel=0.05)


def test_measured_loss_is_the_mean_training_step_loss_of_the_first_batches(tmp_path):
    pl.seed_everything(0)
    model = DigitsMLP(last_layer_scale=5.0)
    datamodule = DigitsDataModule(batch_size=64, shuffle=False)
    datamodule.setup()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y).item() for x, y in list(datamodule.train_dataloader())[:3]]
    callback = InitLossCallback(task="multiclass", num_classes=10, num_batches=3)
    fit(tmp_path, model, callback, datamodule=datamodule)
    assert callback.result["batches"] == 3
    assert callback.result["measured"] == pytest.approx(sum(losses) / 3, rel=1e-5)


class BinaryDigits(pl.LightningModule):
    """Is the digit >= 5? A binary logit model trained with BCE-with-logits."""

    def __init__(self, head_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.head(self.body(x)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def binary_loader(positive_rate: float):
    images, labels = load_digits_tensors()
    positives = (labels >= 5).nonzero().flatten()
    negatives = (labels < 5).nonzero().flatten()
    n_pos = int(len(negatives) * positive_rate / (1 - positive_rate))
    index = torch.cat([positives[:n_pos], negatives])
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(0))]
    return DataLoader(TensorDataset(images[index], (labels[index] >= 5).float()), batch_size=128)


def test_binary_task_flags_a_large_head_and_suggests_the_logit_of_the_positive_rate(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="binary")
    trainer = quiet_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(BinaryDigits(head_scale=80.0), binary_loader(positive_rate=0.2))
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high"
    assert finding.data["positive_rate"] == pytest.approx(0.2, abs=0.05)
    assert f"logit(p) = {finding.data['bias']}" in finding.hint
    assert finding.data["bias"] == pytest.approx(math.log(0.2 / 0.8), abs=0.3)


def test_binary_default_init_is_ok(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="binary")
    trainer = quiet_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(BinaryDigits(), binary_loader(positive_rate=0.5))
    assert warnings_of(callback) == []
    assert callback.result["measured"] == pytest.approx(math.log(2), rel=0.1)


class DigitRegressor(pl.LightningModule):
    """Regress the digit's value (0..9, mean ~4.5) with MSE."""

    def __init__(self, head_bias: float | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        if head_bias is not None:
            with torch.no_grad():
                self.net[2].bias.fill_(head_bias)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def regression_loader():
    images, labels = load_digits_tensors()
    return DataLoader(TensorDataset(images, labels.float()), batch_size=256)


def test_regression_measures_target_statistics_and_predicting_zero_is_expected(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="regression")
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(DigitRegressor(), regression_loader())
    _, labels = load_digits_tensors()
    first = labels[:1024].double()
    assert callback.result["bias"] == pytest.approx(first.mean().item(), abs=1e-3)
    assert callback.result["best_constant"] == pytest.approx(first.var(unbiased=False).item(), rel=1e-4)
    assert warnings_of(callback) == []


def test_regression_with_an_output_far_too_large_is_flagged_with_the_target_mean_as_bias(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="regression", target_mean=4.5, target_var=8.25)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(DigitRegressor(head_bias=-30.0), regression_loader())
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_high"
    assert finding.data["expected"] == pytest.approx(8.25 + 4.5**2)
    assert "Set its bias to the target mean 4.5 (its outputs average -30 now)" in finding.hint
    assert "multiply" not in finding.hint  # the outputs are offset, not too spread: no weight scaling


class WrongReduction(DigitsMLP):
    """Divides the mean loss by the batch size a second time."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) / len(y)


def test_a_loss_divided_twice_by_the_batch_size_is_suspiciously_low(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, WrongReduction(), callback)
    [finding] = warnings_of(callback)
    assert finding.check == "init_loss.too_low"
    assert "reduction" in finding.hint
    # the predictions are untrained: the low loss is the loss's own fault, not trained weights
    assert finding.data["accuracy"] < 0.3 and "at chance" in finding.message and "pretrained" not in finding.hint


@pytest.mark.parametrize("strict", [False, True])
def test_fine_tuning_trained_weights_is_an_info_not_a_too_low_warning(tmp_path, strict):
    """Trained weights start far below ln(10), as they should: the predictions show it (accuracy ~95% against
    ~14% for the majority class), so the check says it does not apply instead of hunting for a bug."""
    pl.seed_everything(0)
    trained = DigitsMLP(optimizer="adam", lr=1e-3)
    quiet_trainer(tmp_path / "pre", [], max_epochs=5).fit(trained, datamodule=DigitsDataModule(batch_size=32))
    model = DigitsMLP(optimizer="adam", lr=1e-4)
    model.load_state_dict(trained.state_dict())
    callback = InitLossCallback(task="multiclass", num_classes=10, strict=strict)
    fit(tmp_path / "fine", model, callback)  # strict: no InitLossError either
    assert warnings_of(callback) == []
    [finding] = callback.findings
    assert finding.check == "init_loss.trained" and callback.result["status"] == "trained"
    assert finding.data["measured"] < 0.5 and finding.data["accuracy"] > 0.8
    assert finding.data["majority_rate"] < 0.2 and "does not apply" in finding.message


def test_predictions_are_counted_only_where_they_line_up_with_the_targets():
    from lightning_debug.init_loss import _chance, _hits

    logits, target = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), torch.tensor([0, 2])
    assert _hits("multiclass", logits, target, 3).tolist() == [1.0, 2.0]
    assert _hits("multiclass", logits, torch.tensor([0, -100]), 3).tolist() == [1.0, 1.0]  # ignore_index
    assert _hits("multiclass", logits, target, 5).tolist() == [0.0, 0.0]  # not this task's logits
    assert _hits("multiclass", logits.unsqueeze(0), target, 3).tolist() == [0.0, 0.0]  # shapes differ
    assert _hits("binary", torch.tensor([[1.5], [-0.5], [0.2]]), torch.tensor([1.0, 0.0, 0.0]), None).tolist() == [
        2.0,
        3.0,
    ]
    assert _hits("regression", logits, target, None).tolist() == [0.0, 0.0]
    assert _chance(0.9, 0.1, 128) == "above" and _chance(0.15, 0.1, 128) == "at"
    assert _chance(0.995, 0.99, 128) is None  # 99% in the majority class: 128 examples cannot tell


def test_expected_loss_alone_works_for_any_loss(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(expected_loss=0.1)
    fit(tmp_path, DigitsMLP(), callback)
    assert callback.result["expected"] == 0.1
    [finding] = callback.findings
    assert finding.check == "init_loss.too_high"
    assert "outputs are not large" in finding.hint  # default-init logits are small: no weight-scaling advice


class RaisesInStep(DigitsMLP):
    def training_step(self, batch, batch_idx):
        if not self.trainer.training or self.global_step == 0:
            raise ValueError("bad batch")
        return super().training_step(batch, batch_idx)


def test_a_training_step_that_raises_during_the_measurement_is_an_info_finding_not_our_crash(tmp_path):
    callback = InitLossCallback(task="multiclass", num_classes=10)
    with pytest.raises(ValueError, match="bad batch"):  # the user's own step fails in training, as it would anyway
        fit(tmp_path, RaisesInStep(), callback)
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("init_loss.not_measured", "info")
    assert "training_step raised ValueError: bad batch" in finding.message


# ---------------------------------------------------------------- strict, report, files, logging
def test_strict_stops_before_any_update_and_still_writes_the_report(tmp_path):
    pl.seed_everything(0)
    model = DigitsMLP(last_layer_scale=60.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = InitLossCallback(task="multiclass", num_classes=10, strict=True)
    with pytest.raises(InitLossError, match="init_loss.too_high"):
        fit(tmp_path, model, callback)
    assert_bit_identical(before, model.state_dict())
    [report_path] = tmp_path.rglob("lightning-debug/report.json")
    report = json.loads(report_path.read_text())
    assert report["status"].startswith("failed: InitLossError")
    assert [f["check"] for f in report["findings"]] == ["init_loss.too_high"]


class FailsAtStep(DigitsMLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("data loader exploded")
        return super().training_step(batch, batch_idx)


def test_findings_are_flushed_when_they_happen_and_the_report_is_written_when_training_raises(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    with pytest.raises(RuntimeError, match="exploded"):
        fit(tmp_path, FailsAtStep(last_layer_scale=60.0), callback, max_steps=10)
    [findings_path] = tmp_path.rglob("lightning-debug/findings.jsonl")
    rows = [json.loads(line) for line in findings_path.read_text().splitlines()]
    assert [(r["source"], r["check"], r["severity"], r["step"]) for r in rows] == [
        ("InitLossCallback", "init_loss.too_high", "warning", 0)
    ]
    assert set(rows[0]) == {"source", "check", "severity", "step", "message", "hint", "data"}
    report = json.loads(findings_path.with_name("report.json").read_text())
    assert report["status"] == "failed: RuntimeError: data loader exploded"
    assert report["summaries"]["InitLossCallback"]["status"] == "too_high"


def test_warns_once_through_lightning_rank_zero_warning(tmp_path):
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match=r"(?s)init_loss.too_high.*fix: Multiply `head`"):
        fit(tmp_path, DigitsMLP(last_layer_scale=60.0), InitLossCallback(task="multiclass", num_classes=10))


def test_scalars_text_and_report_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(last_layer_scale=60.0), callback, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("init_loss/measured", "init_loss/expected", "init_loss/best_constant", "init_loss/output_std"):
        assert tag in scalars
    assert events.Scalars("init_loss/measured")[0].value == pytest.approx(callback.result["measured"], rel=1e-5)
    texts = events.Tags()["tensors"]
    assert "lightning_debug/findings/text_summary" in texts and "lightning_debug/report/text_summary" in texts


class FrozenTeacher(DigitsMLP):
    """Distillation-style: a frozen teacher with BatchNorm kept in eval mode (Lightning keeps it so in training);
    its running statistics differ from any batch's, so train mode would give another loss."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10)).requires_grad_(False)
        self.teacher[1].running_mean.fill_(3.0)
        self.teacher[1].running_var.fill_(0.25)
        self.teacher.eval()
        self.first_loss: float | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x) + self.teacher(x), y)
        if self.first_loss is None and torch.is_grad_enabled():  # training's own first step, not a probe
            self.first_loss = loss.item()
        return loss


def test_a_submodule_kept_in_eval_mode_is_measured_in_eval_mode_as_training_runs_it(tmp_path):
    pl.seed_everything(0)
    model = FrozenTeacher()
    callback = InitLossCallback(task="multiclass", num_classes=10, num_batches=1)
    fit(tmp_path, model, callback, datamodule=DigitsDataModule(batch_size=64, shuffle=False), max_steps=1)
    assert not model.teacher.training  # as the user left it
    assert callback.result["measured"] == pytest.approx(model.first_loss, rel=1e-5)


def test_without_any_logger_findings_and_report_go_to_the_default_root_dir(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(last_layer_scale=60.0), callback, logger=False)
    assert (tmp_path / "lightning-debug" / "findings.jsonl").exists()
    assert (tmp_path / "lightning-debug" / "report.json").exists()
    # a run in the user's working directory must not leave a folder that Python imports instead of the package
    probe = "import lightning_debug; print(lightning_debug.suite.__module__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "lightning_debug.preset", result.stderr


class ManualOptimization(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_gets_an_info_finding_and_trains_normally(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    trainer = fit(tmp_path, ManualOptimization(), callback)
    assert [(f.check, f.severity) for f in callback.findings] == [("init_loss.not_measured", "info")]
    assert trainer.global_step == 3


# ---------------------------------------------------------------- bit-identical training
@pytest.mark.parametrize("explicit_generator", [False, True])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, explicit_generator):
    class Shuffled(DigitsDataModule):
        def train_dataloader(self):
            generator = torch.Generator().manual_seed(7) if explicit_generator else None
            return DataLoader(self.train_set, batch_size=32, shuffle=True, generator=generator)

    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=10, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], datamodule=Shuffled(), **kwargs)
    callback = InitLossCallback(task="multiclass", num_classes=10, num_batches=3)
    with_callback = train_state(tmp_path / "b", make_model, [callback], datamodule=Shuffled(), **kwargs)
    assert callback.result is not None and callback.result["batches"] == 3
    assert_bit_identical(without, with_callback)


def test_training_is_bit_identical_with_persistent_worker_loaders(tmp_path):
    class Workers(DigitsDataModule):
        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=32, shuffle=True, num_workers=1, persistent_workers=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=0)
    without = train_state(tmp_path / "a", DigitsMLP, [], datamodule=Workers(), **kwargs)
    callback = InitLossCallback(task="multiclass", num_classes=10, num_batches=2)
    with_callback = train_state(tmp_path / "b", DigitsMLP, [callback], datamodule=Workers(), **kwargs)
    assert callback.result["batches"] == 2
    assert_bit_identical(without, with_callback)


class EmaTeacher(DigitsMLP):
    """A mean teacher updated in place inside training_step, and a buffer counting the steps."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(64, 10)
        self.teacher.requires_grad_(False)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.teacher.weight.lerp_(self.layers[0].weight[:10], 0.5)
            self.steps_seen += 1
        return super().training_step(batch, batch_idx)


def test_parameters_a_training_step_updates_in_place_are_restored(tmp_path):
    kwargs = dict(max_epochs=1, limit_train_batches=5, limit_val_batches=0)
    without = train_state(tmp_path / "a", EmaTeacher, [], **kwargs)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    with_callback = train_state(tmp_path / "b", EmaTeacher, [callback], **kwargs)
    assert int(with_callback["steps_seen"]) == 5
    assert_bit_identical(without, with_callback)


def test_ignore_index_labels_are_not_counted_as_a_class():
    callback = InitLossCallback(task="multiclass", num_classes=3)
    counts = callback._target_stats(torch.tensor([0, 1, 2, 2, -100, 255]))
    assert counts.tolist() == [1.0, 1.0, 2.0]


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_measures_the_same_loss_as_fp32(tmp_path, precision):
    results = {}
    for name in ("32", precision):
        pl.seed_everything(0)
        callback = InitLossCallback(task="multiclass", num_classes=10)
        kwargs = {"plugins": [fp16_cpu_plugin()]} if name == "16-mixed" else {"precision": name} if name != "32" else {}
        fit(tmp_path / name, DigitsMLP(last_layer_scale=60.0), callback, **kwargs)
        results[name] = callback.result
        assert [f.check for f in callback.findings] == ["init_loss.too_high"]
    assert results[precision]["measured"] == pytest.approx(results["32"]["measured"], rel=0.02)


# ---------------------------------------------------------------- resume
def test_resume_restores_the_result_and_does_not_measure_the_trained_model_again(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = InitLossCallback(task="multiclass", num_classes=10)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=4, enable_checkpointing=True)
    trainer.fit(DigitsMLP(last_layer_scale=60.0), datamodule=DigitsDataModule())
    assert first.result["status"] == "too_high"

    resumed = InitLossCallback(task="multiclass", num_classes=10)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=8, max_epochs=5)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    assert resumed.result == first.result
    assert [f.check for f in resumed.findings] == ["init_loss.too_high"]


# ---------------------------------------------------------------- DDP
def test_ddp_averages_the_init_loss_across_ranks(tmp_path):
    # Rank r measures a loss of exactly r: only the mean across the two ranks gives 0.5.
    run_ddp_script(
        tmp_path,
        """
        import json, torch, lightning.pytorch as pl
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_debug import InitLossCallback

        class MeanLoss(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
            def training_step(self, batch, batch_idx):
                (x,) = batch
                return torch.tensor(float(self.global_rank)) + 0 * x.float().mean() + 0 * self.w.sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = TensorDataset(torch.arange(64) % 2)
        callback = InitLossCallback(expected_loss=0.5, num_batches=2)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=2, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(MeanLoss(), DataLoader(data, batch_size=4, shuffle=False))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump(callback.result, handle)
        """,
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["measured"] == pytest.approx(0.5) and results[1]["measured"] == pytest.approx(0.5)
    assert results[0]["batches"] == 4  # 2 batches on each of 2 ranks
    assert not list(tmp_path.rglob("findings.jsonl"))  # 0.5 is what was expected: no finding


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({}, "task"),
        ({"task": "segmentation"}, "task"),
        ({"task": "multiclass"}, "num_classes"),
        ({"task": "multiclass", "num_classes": 1}, "num_classes"),
        ({"task": "binary", "num_classes": 2}, "num_classes"),
        ({"task": "multiclass", "num_classes": 3, "class_priors": [0.5, 0.5]}, "class_priors"),
        ({"task": "binary", "positive_rate": 1.5}, "positive_rate"),
        ({"task": "multiclass", "num_classes": 3, "positive_rate": 0.5}, "positive_rate"),
        ({"task": "binary", "target_mean": 1.0}, "target_mean"),
        ({"task": "regression", "target_var": 0.0}, "target_var"),
        ({"expected_loss": -1.0}, "expected_loss"),
        ({"task": "binary", "num_batches": 0}, "num_batches"),
        ({"task": "binary", "rtol": 0.0}, "rtol"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        InitLossCallback(**kwargs)


# ---------------------------------------------------------------- unusual losses and loaders
class ShapedLoss(DigitsMLP):
    def __init__(self, shape) -> None:
        super().__init__()
        self.shape = shape

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.shape == (1,):
            return F.cross_entropy(self(x), y).reshape(1)
        return F.cross_entropy(self(x), y, reduction="none")  # one loss per example


def test_a_loss_of_shape_1_is_measured(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    trainer = fit(tmp_path, ShapedLoss((1,)), callback)
    assert callback.result["status"] == "ok" and trainer.global_step == 3
    assert callback.result["measured"] == pytest.approx(math.log(10), rel=0.05)


def test_a_loss_per_example_is_an_info_finding_not_a_crash_of_the_callback(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        fit(tmp_path, ShapedLoss((64,)), callback)  # Lightning's own error about the loss, not ours
    assert [(f.check, f.severity) for f in callback.findings] == [("init_loss.not_measured", "info")]
    assert "shape (64,)" in callback.findings[0].message


class TwoLoaders(DigitsMLP):
    def training_step(self, batch, batch_idx):
        assert isinstance(batch, dict), f"got {type(batch).__name__}"
        x, y = batch["digits"]
        return F.cross_entropy(self(x), y)


def test_a_dict_of_training_loaders_is_probed_with_the_batches_training_step_gets(tmp_path):
    pl.seed_everything(0)
    loaders = two_digits_loaders()
    callback = InitLossCallback(task="multiclass", num_classes=10)
    quiet_trainer(tmp_path, [callback], max_steps=3).fit(TwoLoaders(), train_dataloaders=loaders)
    assert callback.findings == [] and callback.result["status"] == "ok"
    assert callback.result["measured"] == pytest.approx(math.log(10), rel=0.05)


def test_a_true_precision_run_is_measured_in_its_dtype(tmp_path):
    pl.seed_everything(0)
    callback = InitLossCallback(task="multiclass", num_classes=10)
    fit(tmp_path, DigitsMLP(), callback, precision="64-true")  # the batch is converted as the fit loop does
    assert callback.findings == [] and callback.result["status"] == "ok"
    assert callback.result["measured"] == pytest.approx(math.log(10), rel=0.05)
