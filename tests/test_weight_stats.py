import json

import lightning.pytorch as pl
import pytest
import torch
from helpers import all_findings, assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_debug.data import DigitsDataModule
from lightning_debug.weight_stats import WeightStatsMonitor
from lightning_debug.zoo import DigitsCNN, DigitsMLP, DigitsRNN


def fit(tmp_path, model, callback, image_shape=False, **kwargs):
    kwargs.setdefault("max_steps", 40)
    kwargs.setdefault("max_epochs", 3)
    trainer = quiet_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, image_shape=image_shape))
    return trainer


def checks(callback):
    return [(f.check, f.severity) for f in callback.findings]


# ---------------------------------------------------------------- init
def test_hidden_weights_scaled_20x_are_a_bad_init_at_step_0(tmp_path):
    pl.seed_everything(0)
    model = DigitsMLP(weight_scale=20.0)
    expected_std = model.layers[0].weight.detach().std().item()
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, model, callback, max_steps=5)
    [finding] = callback.findings
    assert (finding.check, finding.severity, finding.step) == ("weight_stats.bad_init", "warning", 0)
    weights = {w["name"]: w for w in finding.data["weights"]}
    assert set(weights) == {"layers.0.weight", "layers.1.weight"}  # the head was not scaled
    assert weights["layers.0.weight"]["std"] == pytest.approx(expected_std, rel=1e-4)
    assert weights["layers.0.weight"]["side"] == "large"
    assert "kaiming_normal_" in finding.hint and "std 0.177" in finding.hint  # sqrt(2 / 64)
    assert finding.hint.startswith("Initialise `layers.0.weight`, `layers.1.weight` with")  # both, not the worst
    assert "xavier_uniform_(w) before tanh/sigmoid (gain=5/3 for tanh)" in finding.hint


def test_weights_scaled_down_100x_are_a_bad_init_too(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, DigitsMLP(weight_scale=0.01), callback, max_steps=5)
    [finding] = callback.findings
    assert finding.check == "weight_stats.bad_init"
    assert {w["side"] for w in finding.data["weights"]} == {"small"}


class ConstantHidden(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.layers[1].weight.fill_(0.05)
            self.head.weight.zero_()


def test_constant_hidden_weights_warn_and_a_zero_head_is_info(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, ConstantHidden(), callback, max_steps=5)
    assert checks(callback) == [("weight_stats.constant_init", "warning"), ("weight_stats.zero_init", "info")]
    assert callback.findings[0].data["weights"] == ["layers.1.weight"]
    assert callback.findings[1].data["weights"] == ["head.weight"]


@pytest.mark.parametrize(
    "make_model, image_shape",
    [(lambda: DigitsMLP(batchnorm=True, dropout=0.2), False), (DigitsCNN, True), (DigitsRNN, False)],
    ids=["mlp", "cnn", "rnn"],
)
def test_healthy_zoo_runs_get_no_findings(tmp_path, make_model, image_shape):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, make_model(), callback, image_shape=image_shape)
    assert [f for f in callback.findings if f.severity != "info"] == []
    for finding in callback.findings:  # conv/linear biases feeding BatchNorm get a zero gradient by design
        assert finding.check == "weight_stats.bias_before_norm"
        assert set(finding.data["parameters"]) <= {
            "features.0.bias",
            "features.3.bias",
            "layers.0.bias",
            "layers.1.bias",
        }
    assert callback.summary()["measurements"] == 9  # fit start and steps 5..40


# ---------------------------------------------------------------- never changing
def test_a_detached_first_layer_never_changes_and_is_reported(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    fit(tmp_path, DigitsMLP(detach_first=True), callback)
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("weight_stats.frozen", "warning")
    assert finding.data["parameters"] == ["layers.0.weight", "layers.0.bias"]
    assert finding.step == 15  # fit start is the reference; unchanged at steps 5, 10 and 15: patience 3


class ForgottenInOptimizer(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(64, 64)  # used in forward, but not given to the optimizer
        self.head.requires_grad_(False)  # frozen on purpose: never reported

    def forward(self, x):
        return super().forward(self.extra(x))

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("extra")], lr=0.05)


def test_a_parameter_missing_from_the_optimizer_is_reported_but_requires_grad_false_is_not(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    fit(tmp_path, ForgottenInOptimizer(), callback)
    assert checks(callback) == [("weight_stats.frozen", "warning")]
    assert callback.findings[0].data["parameters"] == ["extra.weight", "extra.bias"]


# ---------------------------------------------------------------- unfreezing mid-run
class UnfrozenAtStep12(DigitsMLP):
    """Gradual unfreezing: the hidden layers train from step 12 on (by requires_grad or by add_param_group)."""

    def __init__(self, add_param_group=False, in_optimizer=True):
        super().__init__()
        self.add_group, self.in_optimizer = add_param_group, in_optimizer
        self.layers.requires_grad_(False)

    def configure_optimizers(self):
        params = self.head.parameters() if self.add_group or not self.in_optimizer else self.parameters()
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step >= 12 and not self.layers[0].weight.requires_grad:
            self.layers.requires_grad_(True)
            if self.add_group:
                self.optimizers().optimizer.add_param_group({"params": list(self.layers.parameters()), "lr": 0.01})


@pytest.mark.parametrize("add_param_group", [False, True], ids=["requires_grad", "add_param_group"])
def test_layers_unfrozen_mid_run_are_judged_from_when_they_became_trainable(tmp_path, add_param_group):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    fit(tmp_path, UnfrozenAtStep12(add_param_group), callback)
    assert callback.findings == []
    assert all(callback._changed.values())
    # reference at step 15, the first measurement after the unfreeze; compared at steps 20..40
    assert callback._counts == {"layers.0.weight": 5, "layers.0.bias": 5, "layers.1.weight": 5,
                                "layers.1.bias": 5, "head.weight": 8, "head.bias": 8}  # fmt: skip


def test_layers_unfrozen_but_missing_from_the_optimizer_are_reported_after_patience_of_their_own(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    fit(tmp_path, UnfrozenAtStep12(in_optimizer=False), callback)
    [finding] = callback.findings
    assert (finding.check, finding.step) == ("weight_stats.frozen", 30)  # reference at 15; unchanged at 20, 25, 30
    assert finding.data["parameters"] == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert finding.data["measurements"] == 3
    assert "never changed over 3 measurements since they became trainable" in finding.message


class RefrozenWithLrZero(DigitsMLP):
    """The first layer trains, is frozen at step 10 (requires_grad off, lr 0) and unfrozen at 20 with lr still 0."""

    def configure_optimizers(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("layers.0.")]
        groups = [{"params": self.layers[0].parameters()}, {"params": rest}]
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 10:
            self.layers[0].requires_grad_(False)
            self.optimizers().optimizer.param_groups[0]["lr"] = 0.0
        if self.global_step == 20:
            self.layers[0].requires_grad_(True)  # the group's lr is never restored


def test_a_layer_frozen_again_gets_a_fresh_reference_when_unfrozen(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    fit(tmp_path, RefrozenWithLrZero(), callback)
    [finding] = callback.findings  # it moved before step 10, but not since it became trainable again
    assert (finding.check, finding.step) == ("weight_stats.frozen", 40)  # reference at 25; unchanged at 30..40
    assert finding.data["parameters"] == ["layers.0.weight", "layers.0.bias"]
    assert finding.data["per_parameter"] == {"layers.0.weight": 3, "layers.0.bias": 3}


def test_resume_after_an_unfreeze_keeps_the_counts_per_parameter(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = WeightStatsMonitor(every_n_steps=5, patience=3)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=20, enable_checkpointing=True, max_epochs=3)
    trainer.fit(UnfrozenAtStep12(in_optimizer=False), datamodule=DigitsDataModule())
    assert first._counts["layers.0.weight"] == 1  # reference at 15, compared at 20

    resumed = WeightStatsMonitor(every_n_steps=5, patience=3)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=40, max_epochs=5)
    trainer.fit(
        UnfrozenAtStep12(in_optimizer=False),
        datamodule=DigitsDataModule(),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    [finding] = resumed.findings
    assert (finding.check, finding.step, finding.data["measurements"]) == ("weight_stats.frozen", 30, 3)
    assert resumed._counts == {"layers.0.weight": 5, "layers.0.bias": 5, "layers.1.weight": 5,
                               "layers.1.bias": 5, "head.weight": 8, "head.bias": 8}  # fmt: skip

    state = resumed.extra_state()  # a state saved without per-parameter counts: every reference at the first
    del state["counts"]
    older = WeightStatsMonitor(every_n_steps=5, patience=3)
    older.load_extra_state(state)
    assert older._counts == dict.fromkeys(resumed._reference, state["measurements"] - 1)


# ---------------------------------------------------------------- parameters without a fan-in
class TinyViT(pl.LightningModule):
    """A ViT on 8x8 digits with cls token and position embedding as nn.Parameter(torch.randn(...))."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        patches = x.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        h = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(patches)], 1) + self.pos_embedding
        return self.head(self.encoder(h)[:, 0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_vit_tokens_and_position_embeddings_are_not_judged_by_a_fan_in(tmp_path):
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, TinyViT(), callback, max_steps=5)
    assert callback.findings == []
    checked = set(callback.init_result)
    assert {"cls_token", "pos_embedding"}.isdisjoint(checked)
    assert {"patch.weight", "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.linear1.weight"} <= checked


class CustomMatmul(DigitsMLP):
    """A custom layer with an unscaled randn weight, next to a learned query and a broadcast offset."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(64, 64))  # the bug: std 1, PyTorch's default would be 0.072
        self.queries = nn.Parameter(torch.randn(64, 64))
        self.offset = nn.Parameter(torch.randn(1, 4, 64))

    def forward(self, x):
        h = ((x @ self.mix).unsqueeze(1) + self.offset).mean(1) + self.queries.mean(0)
        return super().forward(h)


def test_an_unscaled_randn_matmul_weight_is_still_a_bad_init(tmp_path):
    pl.seed_everything(0)
    model = CustomMatmul()
    expected_std = model.mix.detach().std().item()
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, model, callback, max_steps=5)
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("weight_stats.bad_init", "warning")
    [weight] = finding.data["weights"]  # the learned queries and the (1, 4, 64) offset are no matmul weights
    assert (weight["name"], weight["fan_in"], weight["side"]) == ("mix", 64, "large")
    assert weight["std"] == pytest.approx(expected_std, rel=1e-4)
    assert weight["pytorch"] == pytest.approx(1 / (3 * 64) ** 0.5)


# ---------------------------------------------------------------- logging
def test_std_per_layer_and_histograms_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    model = DigitsMLP()
    init_std = model.layers[1].weight.detach().std().item()
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = WeightStatsMonitor(every_n_steps=5)
    fit(tmp_path, model, callback, max_steps=10, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    series = events.Scalars("weight_stats/layers.1.weight/std")
    assert [e.step for e in series] == [0, 5, 10]
    assert series[0].value == pytest.approx(init_std, rel=1e-4)
    assert series[-1].value == pytest.approx(model.layers[1].weight.detach().std().item(), rel=1e-4)
    assert "weight_stats/head.bias" in events.Tags()["histograms"]
    assert "weight_stats/layers.0.weight" in events.Tags()["histograms"]


# ---------------------------------------------------------------- monitor rules
def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    callback = WeightStatsMonitor(every_n_steps=2)
    with_it = train_state(tmp_path / "b", make_model, [callback], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    assert callback.summary()["measurements"] == 7
    assert_bit_identical(without, with_it)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_skipped_steps_are_not_frozen_parameters(tmp_path, precision):
    # fp16: the GradScaler skips the first ~25 steps, when nothing moves at all
    pl.seed_everything(0)
    callback = WeightStatsMonitor(every_n_steps=5, patience=3)
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    fit(tmp_path, DigitsMLP(), callback, max_steps=45, **kwargs)
    assert callback.findings == []
    assert all(callback._changed.values())


def test_resume_keeps_the_reference_and_reports_nothing_twice(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = WeightStatsMonitor(every_n_steps=5, patience=3)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=30, enable_checkpointing=True, max_epochs=3)
    trainer.fit(DigitsMLP(detach_first=True, weight_scale=20.0), datamodule=DigitsDataModule())
    assert checks(first) == [("weight_stats.bad_init", "warning"), ("weight_stats.frozen", "warning")]

    resumed = WeightStatsMonitor(every_n_steps=5, patience=3)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=50, max_epochs=5)
    trainer.fit(
        DigitsMLP(detach_first=True), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert trainer.global_step == 50
    assert checks(resumed) == checks(first)  # restored; no second init check, no second frozen report
    assert resumed.summary()["measurements"] == 7 + 4  # continued counting from the checkpoint
    assert resumed._changed["layers.0.weight"] is False  # still compared with the weights at the first fit start


def test_ddp_every_rank_judges_the_same_weights(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, lightning.pytorch as pl
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.weight_stats import WeightStatsMonitor
        from lightning_debug.zoo import DigitsMLP

        pl.seed_everything(0)
        callback = WeightStatsMonitor(every_n_steps=4, patience=2)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp_find_unused_parameters_true", devices=2,
                             max_steps=16, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, log_every_n_steps=4)
        trainer.fit(DigitsMLP(detach_first=True, weight_scale=20.0), datamodule=DigitsDataModule(batch_size=32))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"findings": [f.to_dict() for f in callback.findings], "std": callback.last_std}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert [f["check"] for f in ranks[0]["findings"]] == ["weight_stats.bad_init", "weight_stats.frozen"]
    assert sorted(f["check"] for f in all_findings(tmp_path)) == ["weight_stats.bad_init", "weight_stats.frozen"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"too_large": 1.0}, "too_large"),
        ({"too_small": 1.0}, "too_small"),
        ({"too_small": 0}, "too_small"),
        ({"patience": 0}, "patience"),
        ({"histograms": "yes"}, "histograms"),
        ({"check_init": None}, "check_init"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        WeightStatsMonitor(**kwargs)
