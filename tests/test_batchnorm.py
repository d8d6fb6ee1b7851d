"""BatchNormCheck: dropout before BatchNorm (variance shift between training and evaluation), and small batches."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    all_findings,
    assert_bit_identical,
    fp16_cpu_plugin,
    quiet_trainer,
    run_ddp_script,
    train_state,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_debug import BatchMixingCheck, BatchNormCheck, DataInspector, InitLossCallback, suite
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsCNN, DigitsMLP


class DropoutIntoNorm(pl.LightningModule):
    """Standardised pixels -> Dropout(p) -> BatchNorm1d -> classifier: the shift is analytic, std sqrt(1 - p)."""

    def __init__(self, p: float, after: bool = False) -> None:
        super().__init__()
        self.after = after
        self.hidden = nn.Linear(64, 64)
        self.drop = nn.Dropout(p)
        self.norm = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 10)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        if self.after:  # BatchNorm first, dropout after it: the order the checklist recommends
            return self.head(self.drop(F.relu(self.norm(self.hidden(x)))))
        return self.head(F.relu(self.norm(self.drop(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(tmp_path, model, callbacks, batch_size=32, max_steps=2, **kwargs):
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=batch_size, image_shape=isinstance(model, DigitsCNN)))
    return trainer


def checks(callback):
    return [(f.check, f.severity) for f in callback.findings]


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_straight_into_batchnorm_shifts_the_eval_std_by_sqrt_one_minus_p(tmp_path, p):
    callback = BatchNormCheck()
    fit(tmp_path, DropoutIntoNorm(p), [callback])
    # standardised pixels have mean ~0: the variance with dropout off is (1 - p) times the one in training
    assert callback.result["worst_std_ratio"] == pytest.approx(math.sqrt(1 - p), abs=0.06)
    assert checks(callback) == [("batchnorm.variance_shift", "info")]  # 0.71x and 0.84x: more than 10% off
    finding = callback.findings[0]
    assert "`norm`" in finding.message and "after `drop`" in finding.message and "expected 1.00x" in finding.message
    assert "Move dropout after the last BatchNorm" in finding.hint
    assert finding.data["eval_std_ratio"]["norm"] == pytest.approx(callback.result["worst_std_ratio"])


def test_a_shift_within_max_shift_is_not_reported(tmp_path):
    quiet, strict = BatchNormCheck(), BatchNormCheck(max_shift=0.02)
    fit(tmp_path / "a", DropoutIntoNorm(0.1), [quiet])
    fit(tmp_path / "b", DropoutIntoNorm(0.1), [strict])
    assert quiet.result["worst_std_ratio"] == pytest.approx(math.sqrt(0.9), abs=0.03)  # 0.95x: within 10%
    assert quiet.findings == [] and quiet.result["shifted"] == {}
    assert checks(strict) == [("batchnorm.variance_shift", "info")]


def test_dropout_after_the_last_batchnorm_is_the_recommended_order_and_not_reported(tmp_path):
    callback = BatchNormCheck()
    model = DropoutIntoNorm(0.5, after=True)
    fit(tmp_path, model, [callback])
    assert callback.result["examples"] == 32 and "worst_std_ratio" not in callback.result  # no dropout before it
    assert callback.findings == []
    assert model.forwards == 2 + 3  # two training steps; the probe: dropout on, then off twice


def test_the_common_mlp_with_dropout_between_batchnorm_layers_gets_an_info_with_its_shift(tmp_path):
    callback = BatchNormCheck()
    trainer = fit(tmp_path, DigitsMLP(dropout=0.3, batchnorm=True, optimizer="adam", lr=1e-3), [callback])
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert logged["batchnorm/examples_per_device"] == [(0, 32.0)]
    assert logged["batchnorm/eval_std_ratio"] == [(0, pytest.approx(callback.result["worst_std_ratio"]))]
    # Linear -> BN -> ReLU -> Dropout(0.3) -> Linear -> BN: the second BatchNorm sees the shift through a layer
    assert set(callback.result["shifted"]) == {"norms.1"}
    assert 0.7 < callback.result["shifted"]["norms.1"] < 0.9
    assert checks(callback) == [("batchnorm.variance_shift", "info")]
    assert "after `drop`" in callback.findings[0].message


@pytest.mark.parametrize("batch_size, expected", [(4, [("batchnorm.small_batch", "warning")]), (16, []), (32, [])])
def test_batchnorm_over_fewer_than_min_batch_examples_per_device_is_a_warning(tmp_path, batch_size, expected):
    callback = BatchNormCheck()
    fit(tmp_path, DigitsCNN(), [callback], batch_size=batch_size)
    assert callback.result["examples"] == batch_size
    assert checks(callback) == expected
    if expected:
        finding = callback.findings[0]
        assert "over 4 example(s) per device" in finding.message and "expected at least 8" in finding.message
        assert "GroupNorm" in finding.hint and "gradient accumulation does not help" in finding.hint


def test_a_batchnorm_the_user_keeps_in_eval_mode_is_not_a_small_batch(tmp_path):
    class FreezeNorms(Callback):
        def on_train_start(self, trainer, pl_module):
            for module in pl_module.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()

    callback = BatchNormCheck()
    fit(tmp_path, DigitsCNN(), [FreezeNorms(), callback], batch_size=4)
    assert "examples" not in callback.result and callback.findings == []


class FrozenBackbone(pl.LightningModule):
    """Fine-tuning with the backbone's BatchNorm frozen (eval) in the module's own on_train_start, which Lightning
    calls after the callbacks' on_train_start; `head_norm=True` adds a BatchNorm in the head that trains."""

    def __init__(self, head_norm: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32) if head_norm else nn.Identity(), nn.ReLU())
        self.classifier = nn.Linear(32, 10)

    def on_train_start(self):
        self.backbone.eval()

    def forward(self, x):
        return self.classifier(self.head(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        assert not self.backbone[1].training
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_batchnorm_the_module_freezes_in_its_own_on_train_start_is_not_a_small_batch(tmp_path):
    callback = BatchNormCheck()
    fit(tmp_path, FrozenBackbone(), [callback], batch_size=4)
    assert callback.result == {"status": "ok", "batchnorms": 1} and callback.findings == []


def test_only_the_batchnorms_still_in_train_mode_at_the_first_batch_are_judged(tmp_path):
    callback = BatchNormCheck()
    fit(tmp_path, FrozenBackbone(head_norm=True), [callback], batch_size=4)
    assert callback.result["examples"] == 4
    [finding] = callback.findings
    assert (finding.check, finding.step) == ("batchnorm.small_batch", 0)  # before the first optimizer step
    assert finding.data["layers"] == ["head.1"] and "1 BatchNorm layer(s) normalise over 4" in finding.message


class ManualOptimization(DigitsCNN):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


@pytest.mark.parametrize("model", [DigitsCNN, ManualOptimization], ids=["dozing", "manual_optimization"])
def test_the_judgement_costs_one_hook_call_at_the_first_batch_and_none_after(tmp_path, model):
    profiler = SimpleProfiler()
    first, callback = DataInspector(num_batches=1), BatchNormCheck()  # another callback conducts the dozing
    fit(tmp_path, model(), [first, callback], batch_size=16, max_steps=6, profiler=profiler)
    hooks = {k.rsplit(".", 1)[-1]: len(v) for k, v in profiler.recorded_durations.items() if "BatchNormCheck{" in k}
    assert hooks.get("on_train_batch_start") == 1, hooks
    assert callback.result["examples"] == 16 and callback.findings == []
    assert "on_train_batch_start" not in vars(callback) and not callback._dozing  # as constructed after the run


def test_a_model_without_batchnorm_costs_no_forward_and_one_without_dropout_one(tmp_path):
    class NoNorm(DropoutIntoNorm):
        def __init__(self):
            super().__init__(0.5)
            self.norm = nn.Identity()

    no_norm = NoNorm()
    callback = BatchNormCheck()
    fit(tmp_path / "a", no_norm, [callback], max_steps=1)
    assert callback.result == {"status": "no_batchnorm"} and no_norm.forwards == 1  # training's own forward

    no_dropout = DropoutIntoNorm(0.0)
    callback = BatchNormCheck()
    fit(tmp_path / "b", no_dropout, [callback], max_steps=1)
    assert no_dropout.forwards == 2 and callback.result["examples"] == 32 and "worst_std_ratio" not in callback.result

    with_dropout = DropoutIntoNorm(0.5)
    fit(tmp_path / "c", with_dropout, [BatchNormCheck()], max_steps=1)
    assert with_dropout.forwards == 4  # dropout on, then off twice (what differs then is other randomness)


def test_training_is_bit_identical_with_and_without_the_check(tmp_path):
    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], **kwargs)
    callback = BatchNormCheck()
    with_check = train_state(tmp_path / "b", make_model, [callback], **kwargs)
    assert callback.result["status"] == "ok" and callback.result["shifted"]
    assert_bit_identical(without, with_check)


def test_a_forward_that_raises_is_an_info_finding_and_training_goes_on(tmp_path):
    callback = BatchNormCheck(input_fn=lambda batch: batch[0][:, :10])  # the wrong width for the model
    trainer = fit(tmp_path, DropoutIntoNorm(0.5), [callback])
    assert trainer.global_step == 2
    assert checks(callback) == [("batchnorm.not_checked", "info")]
    assert "the forward pass raised RuntimeError" in callback.findings[0].message


def test_custom_batches_use_forward_fn(tmp_path):
    seen = []

    def forward_fn(pl_module, batch):
        seen.append(len(batch))
        return pl_module(batch[0])

    callback = BatchNormCheck(forward_fn=forward_fn)
    fit(tmp_path, DropoutIntoNorm(0.5), [callback])
    assert seen == [2, 2, 2]  # dropout on, then off twice
    assert checks(callback) == [("batchnorm.variance_shift", "info")]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision(tmp_path, precision):
    callback = BatchNormCheck()
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    fit(tmp_path, DropoutIntoNorm(0.5), [callback], **kwargs)
    assert callback.result["worst_std_ratio"] == pytest.approx(math.sqrt(0.5), abs=0.06)
    assert checks(callback) == [("batchnorm.variance_shift", "info")]


def test_resume_keeps_the_result_and_does_not_check_again(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BatchNormCheck()
    fit(tmp_path, DropoutIntoNorm(0.5), [first, checkpoint], enable_checkpointing=True)
    assert checks(first) == [("batchnorm.variance_shift", "info")]

    resumed, model = BatchNormCheck(), DropoutIntoNorm(0.5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=4, max_epochs=5)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 4
    assert resumed.result == first.result
    assert model.forwards == 2  # the two training steps: no probe
    assert checks(resumed) == [("batchnorm.variance_shift", "info")]  # restored, not raised a second time


def test_ddp_ranks_average_their_shifts_and_rank_zero_writes_one_finding(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, torch, lightning.pytorch as pl
        from torch import nn
        import torch.nn.functional as F
        from lightning_debug import BatchNormCheck
        from lightning_debug.data import DigitsDataModule

        class DropoutIntoNorm(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.drop = nn.Dropout(0.5)
                self.norm = nn.BatchNorm1d(64)
                self.head = nn.Linear(64, 10)
            def forward(self, x):
                return self.head(F.relu(self.norm(self.drop(x))))
            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        pl.seed_everything(0)
        callback = BatchNormCheck()
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=2, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(DropoutIntoNorm(), datamodule=DigitsDataModule(batch_size=6))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"result": callback.result, "checks": sorted(f.check for f in callback.findings),
                       "hint": [f.hint for f in callback.findings if f.check == "batchnorm.small_batch"]}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["result"] == ranks[1]["result"]  # reduced before judging: both ranks judge the same numbers
    for rank in ranks:
        assert rank["checks"] == ["batchnorm.small_batch", "batchnorm.variance_shift"]
        assert rank["result"]["examples"] == 6
        assert "Trainer(sync_batchnorm=True) normalises over all 2 devices' examples" in rank["hint"][0]
    assert 0.55 < ranks[0]["result"]["worst_std_ratio"] < 0.85
    assert sorted(f["check"] for f in all_findings(tmp_path)) == ["batchnorm.small_batch", "batchnorm.variance_shift"]


def test_the_last_batch_of_one_example_is_a_warning_at_step_0_before_it_crashes_the_epoch(tmp_path):
    callback = BatchNormCheck()
    # 1497 training digits in batches of 22: 68 full batches, then one of 1, which BatchNorm1d cannot normalise
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fit(tmp_path, DigitsMLP(batchnorm=True), [callback], batch_size=22, max_steps=-1, limit_val_batches=0)
    assert checks(callback) == [("batchnorm.small_last_batch", "warning")]
    finding = callback.findings[0]
    assert finding.step == 0 and "a batch of 1 example(s) per device" in finding.message
    assert "raises 'Expected more than 1 value per channel when training'" in finding.message
    assert "drop_last=True" in finding.hint


def test_a_full_last_batch_or_drop_last_is_not_reported(tmp_path):
    divides = BatchNormCheck()
    fit(tmp_path / "a", DigitsMLP(batchnorm=True), [divides], batch_size=499)  # 1497 = 3 x 499
    assert "last_batch_examples" not in divides.result and divides.findings == []

    class DropLast(DigitsDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_set, batch_size=22, shuffle=True, drop_last=True)

    dropped = BatchNormCheck()
    pl.seed_everything(0)
    quiet_trainer(tmp_path / "b", [dropped], max_steps=2).fit(DigitsMLP(batchnorm=True), datamodule=DropLast())
    assert "last_batch_examples" not in dropped.result and dropped.findings == []


@pytest.mark.parametrize(
    "limit", [{"overfit_batches": 1}, {"limit_train_batches": 10}, {"max_steps": 20, "max_epochs": 1}]
)
def test_a_last_batch_training_never_reaches_is_not_reported(tmp_path, limit):
    callback = BatchNormCheck()
    kwargs = {"max_steps": -1, "max_epochs": 1, **limit}  # each case alone keeps the last batch from running
    fit(tmp_path, DigitsMLP(batchnorm=True), [callback], batch_size=22, limit_val_batches=0, **kwargs)
    assert "last_batch_examples" not in callback.result and callback.findings == []


def test_dropout_the_run_keeps_in_eval_mode_is_not_switched_on(tmp_path):
    class FrozenDropout(Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.drop.eval()  # e.g. a frozen backbone: its dropout stays off for the whole run

    callback = BatchNormCheck()
    fit(tmp_path, DropoutIntoNorm(0.5), [FrozenDropout(), callback])
    assert "worst_std_ratio" not in callback.result and callback.findings == []


def test_batchnorm_without_running_statistics_has_no_shift_to_judge(tmp_path):
    model = DropoutIntoNorm(0.5)
    model.norm = nn.BatchNorm1d(64, track_running_stats=False)  # batch statistics at evaluation too
    callback = BatchNormCheck()
    fit(tmp_path, model, [callback])
    assert "worst_std_ratio" not in callback.result and callback.findings == []


def test_a_batchnorm_that_other_randomness_reaches_is_not_judged(tmp_path):
    class FunctionalDropoutToo(DropoutIntoNorm):
        def __init__(self):
            super().__init__(0.5)
            self.norm2 = nn.BatchNorm1d(64)

        def forward(self, x):  # a module dropout before `norm`, a functional one before `norm2`
            hidden = F.relu(self.norm(self.drop(x)))
            return self.head(self.norm2(F.dropout(hidden, 0.3, self.training)))

    for seed in range(4):
        callback = BatchNormCheck()
        pl.seed_everything(seed)
        quiet_trainer(tmp_path / str(seed), [callback], max_steps=1).fit(
            FunctionalDropoutToo(), datamodule=DigitsDataModule(batch_size=32)
        )
        assert set(callback.result["shifted"]) == {"norm"}  # `norm2` gets a different input each time: not judged


def test_the_shift_estimate_has_no_bias_at_small_batches(tmp_path):
    ratios = []
    for seed in range(6):
        callback = BatchNormCheck()
        pl.seed_everything(seed)
        quiet_trainer(tmp_path / str(seed), [callback], max_steps=1).fit(
            DropoutIntoNorm(0.1), datamodule=DigitsDataModule(batch_size=8, seed=seed)
        )
        ratios.append(callback.result["worst_std_ratio"])
        assert not any(f.check == "batchnorm.variance_shift" for f in callback.findings)
    assert sum(ratios) / len(ratios) == pytest.approx(math.sqrt(0.9), abs=0.015)  # 0.949


def test_a_batchnorm_called_with_a_keyword_is_measured(tmp_path):
    class KeywordCall(DropoutIntoNorm):
        def forward(self, x):
            return self.head(F.relu(self.norm(input=self.drop(x))))

    callback = BatchNormCheck()
    fit(tmp_path, KeywordCall(0.5), [callback], batch_size=4)
    assert callback.result["examples"] == 4
    assert sorted(checks(callback)) == [("batchnorm.small_batch", "warning"), ("batchnorm.variance_shift", "info")]


def test_lazy_modules_not_initialised_yet_are_an_info_with_the_fix(tmp_path):
    class Lazy(DropoutIntoNorm):
        def __init__(self):
            super().__init__(0.5)
            self.norm = nn.LazyBatchNorm1d()

    callback = BatchNormCheck()
    trainer = fit(tmp_path, Lazy(), [callback])
    assert trainer.global_step == 2
    assert checks(callback) == [("batchnorm.not_checked", "info")]
    assert "lazy modules not initialised yet" in callback.findings[0].message
    assert "one forward pass on a batch in setup()" in callback.findings[0].hint


@pytest.mark.parametrize(
    "make_check", [BatchNormCheck, BatchMixingCheck, lambda: InitLossCallback(task="multiclass", num_classes=10)]
)
def test_an_iterable_dataset_loaded_by_workers_is_probed_without_crashing(tmp_path, make_check):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            for _ in range(64):
                yield torch.randn(64, generator=generator), torch.randint(0, 10, (), generator=generator)

    class Streamed(DropoutIntoNorm):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Stream(), batch_size=16, num_workers=2)

    callback = make_check()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(Streamed(0.5))
    assert trainer.global_step == 3
    assert not any(f.check.endswith(("not_checked", "not_measured")) for f in callback.findings)
    assert callback.result["status"] == "ok"


def test_the_suite_includes_it():
    assert any(isinstance(callback, BatchNormCheck) for callback in suite(num_classes=10))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_batch": 1}, "min_batch"),
        ({"min_batch": True}, "min_batch"),
        ({"min_batch": 8.0}, "min_batch"),
        ({"max_shift": 0.0}, "max_shift"),
        ({"max_shift": 1.0}, "max_shift"),
        ({"max_shift": "0.2"}, "max_shift"),
        ({"input_fn": "x"}, "input_fn"),
        ({"forward_fn": 3}, "forward_fn"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        BatchNormCheck(**kwargs)
