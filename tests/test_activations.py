import csv
import json
import shutil

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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from lightning_debug.activations import DeadActivationMonitor
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsCNN, DigitsMLP, DigitsRNN


def fit(tmp_path, model, callback, datamodule=None, seed=0, **kwargs):
    kwargs.setdefault("max_steps", 4)
    pl.seed_everything(seed)
    trainer = quiet_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return trainer


def monitor(**kwargs):
    kwargs.setdefault("every_n_steps", 2)
    kwargs.setdefault("window", 2)
    return DeadActivationMonitor(**kwargs)


def warnings_of(callback):
    return [f for f in callback.findings if f.severity != "info"]


def findings_for(callback, check, layer):
    return [f for f in callback.findings if f.check == check and f.data.get("layer") == layer]


def units_of(callback):
    return {name: (entry["op"], entry["units"]) for name, entry in callback.summary()["layers"].items()}


# ---------------------------------------------------------------- test models
class Block(nn.Module):
    """Three functional / method activations in one forward on a (batch, time, features) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)

    def forward(self, x):
        x = torch.relu(self.lin(x))
        return F.gelu(x) + x.sigmoid()


class ShapesModel(pl.LightningModule):
    """Sequence, conv (channels) and flat activations; a method, an in-place call and a shared module."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Linear(8, 12)
        self.block = Block()
        self.conv = nn.Conv1d(12, 6, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.proj = nn.Linear(48, 20)
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        seq = self.rows(x.reshape(-1, 8, 8)).relu()  # (batch, time 8, features 12)
        seq = self.block(seq)
        channels = self.act(self.conv(seq.transpose(1, 2)))  # (batch, channels 6, length 8)
        flat = F.relu(self.proj(channels.flatten(1)), inplace=True)  # (batch, 20)
        flat = self.act(flat)  # the shared LeakyReLU again
        return self.head(torch.tanh(flat))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class LinearOnly(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SigmoidOutput(pl.LightningModule):
    """A hidden sigmoid and an output sigmoid, both driven into saturation by a 50x pre-activation gain."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        hidden = torch.sigmoid(50 * self.hidden(x))
        return torch.sigmoid(50 * self.head(hidden))  # probabilities: the model's output

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy(self(x).clamp(1e-6, 1 - 1e-6), F.one_hot(y, 10).float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ShiftingReLU(pl.LightningModule):
    """Pre-activations shifted down by 0.5 per optimizer step: units die progressively during training."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(F.relu(self.hidden(x) - 0.5 * self.global_step))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class ModeProbe(DigitsMLP):
    """Records, at each forward, whether a torch-function mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.mode_active: dict[int, bool] = {}

    def forward(self, x):
        self.mode_active[int(self.global_step)] = len(_get_current_function_mode_stack()) > 0
        return super().forward(x)

    def on_after_backward(self) -> None:
        assert not _get_current_function_mode_stack(), "the mode must be off during backward"


# ---------------------------------------------------------------- done-when cases
@pytest.mark.parametrize(("functional", "layer"), [(True, "relu_0"), (False, "acts.0")])
def test_relu_with_bias_minus_4_is_reported_dead_naming_the_layer(tmp_path, functional, layer):
    callback = monitor()
    fit(tmp_path, DigitsMLP(hidden_bias=-4.0, functional=functional), callback)

    dead = findings_for(callback, "activations.dead", layer)
    assert len(dead) == 1
    finding = dead[0]
    assert finding.severity == "warning"
    assert f"`{layer}`" in finding.message and "`layers.0`" in finding.message
    assert finding.data["dead_fraction"] > 0.5
    assert finding.data["units"] == 64
    assert finding.data["dead_since_first_window"] is True
    assert finding.data["bias_mean"] == pytest.approx(-4.0, abs=0.05)
    assert "-4" in finding.hint and "LeakyReLU" in finding.hint and "Kaiming" in finding.hint


def test_tanh_with_weights_scaled_12x_is_reported_saturated(tmp_path):
    callback = monitor()
    fit(tmp_path, DigitsMLP(activation="tanh", weight_scale=12.0), callback)

    saturated = findings_for(callback, "activations.saturated", "tanh_0")
    assert len(saturated) == 1
    data = saturated[0].data
    assert data["saturated_fraction"] > 0.5
    # PyTorch's default Linear init has std 1/sqrt(3 * fan_in); Xavier with the tanh gain expects 5/3 * sqrt(2 / 128)
    assert data["weight_std"] == pytest.approx(12 / (3 * 64) ** 0.5, rel=0.1)
    assert data["init_std"] == pytest.approx(5 / 3 * (2 / 128) ** 0.5)
    assert "Xavier" in saturated[0].hint and "layers.0" in saturated[0].hint


def test_tanh_saturated_by_large_inputs_blames_the_inputs_not_the_weights(tmp_path):
    # default init (std 0.072, about 0.35x Xavier's tanh std): enlarging the weights would saturate it further
    callback = monitor()
    fit(tmp_path, DigitsMLP(activation="tanh", input_mask=100.0, lr=1e-5), callback)
    [saturated] = findings_for(callback, "activations.saturated", "tanh_0")
    assert saturated.data["weight_std"] < saturated.data["init_std"]
    assert saturated.hint.startswith("normalise the inputs")
    assert "`layers.0`'s weights are not the cause" in saturated.hint and "xavier_normal_" not in saturated.hint


def test_tanh_saturated_from_the_start_while_its_weights_grow_does_not_blame_the_init(tmp_path):
    # inputs 100x too large, SGD at 0.2: saturated from the first window, and by then the weights have grown from
    # PyTorch's default (0.35x Xavier's tanh std) to 2.6x Xavier's; the init was never the cause
    callback = monitor(every_n_steps=20, window=2)
    model = DigitsMLP(activation="tanh", input_mask=100.0, lr=0.2)
    fit(tmp_path, model, callback, max_steps=40, max_epochs=-1)
    [saturated] = findings_for(callback, "activations.saturated", "tanh_0")
    assert saturated.data["start_weight_std"] < saturated.data["init_std"] < saturated.data["weight_std"] / 1.5
    assert saturated.hint.startswith("normalise the inputs") and "xavier_normal_" not in saturated.hint
    assert "grew to" in saturated.hint and "the init is not the cause" in saturated.hint


@pytest.mark.parametrize(
    ("make_model", "image_shape", "expected"),
    [
        (lambda: DigitsMLP(), False, {"relu_0": ("relu", 64), "relu_1": ("relu", 64)}),
        (
            lambda: DigitsMLP(activation="tanh", functional=False),
            False,
            {"acts.0": ("tanh", 64), "acts.1": ("tanh", 64)},
        ),
        (lambda: DigitsCNN(), True, {"features.2": ("relu", 16), "features.5": ("relu", 32)}),  # channels
        (lambda: DigitsRNN(), False, {"rnn": ("tanh", 64)}),  # (batch, time, hidden): the hidden units
    ],
    ids=["mlp-relu", "mlp-tanh-modules", "cnn", "rnn"],
)
def test_healthy_models_get_no_warnings(tmp_path, make_model, image_shape, expected):
    callback = monitor(every_n_steps=5)
    datamodule = DigitsDataModule(batch_size=32, image_shape=image_shape)
    fit(tmp_path, make_model(), callback, datamodule=datamodule, max_steps=30)

    assert units_of(callback) == expected
    assert callback.windows == 3
    assert warnings_of(callback) == []
    assert callback.findings == []


# ---------------------------------------------------------------- where activations are found
def test_activations_are_found_and_named_in_every_form_and_shape(tmp_path):
    callback = monitor()
    fit(tmp_path, ShapesModel(), callback)

    assert units_of(callback) == {
        "relu_0": ("relu", 12),  # x.relu() on (batch, time, features): the last dim
        "block.relu_0": ("relu", 12),
        "block.gelu_0": ("gelu", 12),
        "block.sigmoid_0": ("sigmoid", 12),
        "act": ("leaky_relu", 6),  # after Conv1d: (batch, channels, length) -> channels
        "relu_1": ("relu", 20),  # F.relu(inplace=True)
        "act_call2": ("leaky_relu", 20),  # second call of the shared module
        "tanh_0": ("tanh", 20),
    }
    assert callback.latest["relu_0"]["values_per_unit"] == 2 * 32 * 8  # two steps of 32 samples x 8 time steps


def test_instrumentation_is_on_only_for_the_forward_of_measured_steps(tmp_path):
    model = ModeProbe()
    callback = monitor(every_n_steps=3, window=1)
    trainer = fit(tmp_path, model, callback, max_steps=7, limit_val_batches=0)

    assert model.mode_active == {step: step % 3 == 0 for step in range(7)}
    assert not _get_current_function_mode_stack()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert trainer.global_step == 7


def test_model_without_activations_gets_one_info_finding(tmp_path):
    callback = monitor(window=1)
    fit(tmp_path, LinearOnly(), callback, max_steps=6)

    assert [(f.check, f.severity) for f in callback.findings] == [("activations.none_found", "info")]


def test_output_sigmoid_is_logged_but_not_judged_while_a_hidden_one_is(tmp_path):
    callback = monitor()
    fit(tmp_path, SigmoidOutput(), callback)

    layers = callback.summary()["layers"]
    assert layers["sigmoid_1"]["is_output"] and layers["sigmoid_1"]["saturated_fraction"] > 0.5
    assert not layers["sigmoid_0"]["is_output"] and layers["sigmoid_0"]["saturated_fraction"] > 0.5
    assert [f.data["layer"] for f in callback.findings if f.check == "activations.saturated"] == ["sigmoid_0"]


class ViewedOutput(pl.LightningModule):
    """The output activation, saturated by a 50x gain, returned as a view: ``sigmoid(...).squeeze(-1)`` (a binary
    classifier) or ``tanh(...).view(batch, 8, 8)`` (an image generator)."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.view = view
        self.hidden = nn.Linear(64, 32)
        self.head = nn.Linear(32, 1 if view == "squeeze" else 64)
        self.out = nn.Sigmoid() if view == "squeeze" else nn.Tanh()

    def forward(self, x):
        out = self.out(50 * self.head(F.relu(self.hidden(x))))
        return out.squeeze(-1) if self.view == "squeeze" else out.view(-1, 8, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.view == "squeeze":
            return F.binary_cross_entropy(self(x).clamp(1e-6, 1 - 1e-6), (y >= 5).float())
        return F.mse_loss(self(x), x.tanh().view(-1, 8, 8))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("view", ["squeeze", "view"])
def test_an_output_activation_returned_as_a_view_is_logged_but_not_judged(tmp_path, view):
    callback = monitor()
    fit(tmp_path, ViewedOutput(view), callback)

    layers = callback.summary()["layers"]
    assert layers["out"]["is_output"] and layers["out"]["saturated_fraction"] > 0.5
    assert not layers["relu_0"]["is_output"]
    assert warnings_of(callback) == []


class HingeRanker(pl.LightningModule):
    """Scores digits; the loss is a hinge that every pair already satisfies (all its terms are zero), as in a
    converged ranker."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        self.criterion = criterion

    def training_step(self, batch, batch_idx):
        x, _ = batch
        scores = self.net(x).squeeze(-1)
        return self.criterion(scores + 10, scores - 10) + 1e-3 * scores.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Margin(nn.Module):
    """Per-pair hinge: a (batch,) tensor, no feature axis."""

    def forward(self, pos, neg):
        return F.relu(1.0 - pos + neg).mean()


class PairwiseHinge(nn.modules.loss._Loss):
    """Every positive against every negative: a (batch, batch) hinge matrix inside a loss module."""

    def forward(self, pos, neg):
        return F.relu(1.0 - pos[:, None] + neg[None, :]).mean()


class PairwiseHingeLoss(nn.Module):
    def forward(self, pos, neg):
        return F.relu(1.0 - pos[:, None] + neg[None, :]).mean()


@pytest.mark.parametrize("criterion", [Margin, PairwiseHinge, PairwiseHingeLoss])
def test_a_satisfied_hinge_loss_is_not_read_as_dead_units(tmp_path, criterion):
    callback = monitor()
    fit(tmp_path, HingeRanker(criterion()), callback)

    assert units_of(callback) == {"net.1": ("relu", 32)}
    assert warnings_of(callback) == []


def test_growing_dead_fraction_says_from_which_step(tmp_path):
    callback = monitor(every_n_steps=2, window=1)
    fit(tmp_path, ShiftingReLU(), callback, max_steps=12)

    history = callback.history["relu_0"]
    assert history[0] == [0, pytest.approx(0.0, abs=0.1)]
    assert [row[1] for row in history] == sorted(row[1] for row in history)  # it only grows
    dead = findings_for(callback, "activations.dead", "relu_0")
    assert len(dead) == 1
    assert dead[0].data["growing_since_step"] == 0
    assert "since step 0" in dead[0].message
    assert dead[0].hint.startswith("lower the learning rate")


def test_scalars_are_logged_per_layer(tmp_path):
    callback = monitor(every_n_steps=2, window=1)
    fit(tmp_path, DigitsMLP(hidden_bias=-4.0), callback, logger=CSVLogger(tmp_path), max_steps=4)

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    dead = [
        (int(r["step"]), float(r["activations/relu_0/dead_fraction"]))
        for r in rows
        if r.get("activations/relu_0/dead_fraction")
    ]
    assert [step for step, _ in dead] == [0, 2]
    assert all(fraction > 0.5 for _, fraction in dead)
    assert any(r.get("activations/relu_1/dormant_fraction") for r in rows)


class ConvRNN(pl.LightningModule):
    """A Conv1d over the 8 rows of a digit, then an ``nn.RNN`` with 20 hidden units over the 8 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.rnn = nn.RNN(8, 20, batch_first=True)
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        sequence, _ = self.rnn(self.conv(x.reshape(-1, 8, 8)).permute(0, 2, 1))  # (batch, 8 positions, 20)
        return self.head(sequence[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_rnn_units_are_its_hidden_units_after_a_convolution(tmp_path):
    callback = monitor()
    fit(tmp_path, ConvRNN(), callback)

    assert units_of(callback) == {"rnn": ("tanh", 20)}
    assert callback.latest["rnn"]["values_per_unit"] == 2 * 32 * 8


@pytest.mark.parametrize(
    ("activation", "consequence", "kaiming", "gain"),
    [
        (lambda: nn.LeakyReLU(0.2), "pass only 0.2x of their gradient", "a=0.2, nonlinearity='leaky_relu'", 2 / 1.04),
        (nn.GELU, "where the gradient is small", "nonlinearity='relu'", 2.0),
    ],
    ids=["leaky_relu", "gelu"],
)
def test_dead_non_relu_units_are_described_as_they_are(tmp_path, activation, consequence, kaiming, gain):
    model = DigitsMLP(hidden_bias=-4.0, functional=False)
    model.acts = nn.ModuleList(activation() for _ in model.acts)
    callback = monitor()
    fit(tmp_path, model, callback)

    (finding,) = findings_for(callback, "activations.dead", "acts.0")
    assert finding.data["dead_fraction"] > 0.5
    assert consequence in finding.message and "no gradient" not in finding.message
    assert finding.data["init_std"] == pytest.approx(gain**0.5 / 8)  # Kaiming: gain / sqrt(fan_in 64)
    assert f"nn.init.kaiming_normal_(w, {kaiming})" in finding.hint


# ---------------------------------------------------------------- precision, identity, resume
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_finds_dead_and_saturated_units(tmp_path, precision):
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    dead_callback, saturated_callback = monitor(), monitor()
    fit(tmp_path / "dead", DigitsMLP(hidden_bias=-4.0), dead_callback, **kwargs)
    fit(tmp_path / "tanh", DigitsMLP(activation="tanh", weight_scale=12.0), saturated_callback, **kwargs)

    assert findings_for(dead_callback, "activations.dead", "relu_0")
    assert findings_for(saturated_callback, "activations.saturated", "tanh_0")
    healthy = saturated_callback.summary()["layers"]
    assert set(healthy) == {"tanh_0", "tanh_1"}


@pytest.mark.parametrize(
    "make_model",
    [lambda: ShapesModel(), lambda: DigitsMLP(dropout=0.2, batchnorm=True, functional=False)],
    ids=["shapes-inplace", "mlp-dropout-batchnorm"],
)
def test_training_is_bit_identical_with_the_monitor(tmp_path, make_model):
    kwargs = dict(max_steps=6, limit_val_batches=2)
    without = train_state(tmp_path / "without", make_model, **kwargs)
    callback = DeadActivationMonitor(every_n_steps=1, window=2, log_histograms=True)
    with_monitor = train_state(tmp_path / "with", make_model, [callback], **kwargs)

    assert callback.windows == 3
    assert_bit_identical(without, with_monitor)


class DistilledTransformer(pl.LightningModule):
    """A transformer student (training mode, watched) fitted to a frozen eval-mode ``nn.TransformerEncoder`` teacher
    called in ``training_step``, which PyTorch runs on its fused inference path."""

    def __init__(self, eval_in_step: bool) -> None:
        super().__init__()
        self.eval_in_step = eval_in_step
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.teacher = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).requires_grad_(False)
        self.student = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 8)

    def on_train_start(self) -> None:
        self.teacher.eval()

    def forward(self, rows):
        return self.head(self.student(rows))

    def training_step(self, batch, batch_idx):
        rows = batch[0].reshape(-1, 8, 8)
        if self.eval_in_step:  # switched to eval inside the step, called with grad enabled
            self.teacher.eval()
            target = self.teacher(rows)
        else:
            with torch.no_grad():
                target = self.teacher(rows)
        return F.mse_loss(self(rows), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("eval_in_step", [False, True], ids=["no-grad-teacher", "eval-in-step"])
def test_a_frozen_eval_mode_transformer_keeps_training_bit_identical(tmp_path, eval_in_step):
    kwargs = dict(max_steps=6, limit_val_batches=0)
    without = train_state(tmp_path / "without", lambda: DistilledTransformer(eval_in_step), **kwargs)
    callback = DeadActivationMonitor(every_n_steps=1, window=2)
    with_monitor = train_state(tmp_path / "with", lambda: DistilledTransformer(eval_in_step), [callback], **kwargs)

    assert_bit_identical(without, with_monitor)
    assert set(callback.latest) == {"student.relu_0"}  # the teacher runs unwatched, the training student is watched
    assert callback.latest["student.relu_0"]["producer"] == "student.linear1"
    assert callback.windows == 3


def _fit_with_checkpoint(tmp_path, callback, max_steps, ckpt_path=None):
    pl.seed_everything(0)
    trainer = quiet_trainer(
        tmp_path,
        [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        enable_checkpointing=True,
        max_steps=max_steps,
        max_epochs=3,
        limit_val_batches=0,
    )
    trainer.fit(DigitsMLP(hidden_bias=-4.0), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return trainer


def test_checkpoint_resume_restores_the_monitor_state(tmp_path):
    first = monitor(window=1)
    _fit_with_checkpoint(tmp_path, first, max_steps=4)
    assert [row[0] for row in first.history["relu_0"]] == [0, 2]
    assert len(findings_for(first, "activations.dead", "relu_0")) == 1

    resumed = monitor(window=1)
    _fit_with_checkpoint(tmp_path, resumed, max_steps=8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [row[0] for row in resumed.history["relu_0"]] == [0, 2, 4, 6]
    assert resumed.windows == 4
    assert len(findings_for(resumed, "activations.dead", "relu_0")) == 1  # restored, not raised again


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"window": 0}, "window"),
        ({"window": 1.5}, "window"),
        ({"dead_threshold": 1.0}, "dead_threshold"),
        ({"saturated_threshold": 0}, "saturated_threshold"),
        ({"saturated_share": 1.5}, "saturated_share"),
        ({"tanh_threshold": 1.2}, "tanh_threshold"),
        ({"sigmoid_bounds": (0.6, 0.9)}, "sigmoid_bounds"),
        ({"sigmoid_bounds": 0.01}, "sigmoid_bounds"),
        ({"dormant_threshold": -0.1}, "dormant_threshold"),
        ({"histogram_samples": 0}, "histogram_samples"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        DeadActivationMonitor(**kwargs)


# ---------------------------------------------------------------- DDP
DDP_SCRIPT = """
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_debug.activations import DeadActivationMonitor


class Probe(pl.LightningModule):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self):
        # rank 0 trains on the even rows, rank 1 on the odd rows
        rows = slice(self.global_rank, None, 2)
        return DataLoader(TensorDataset(self.x[rows], self.y[rows]), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    pl.seed_everything(0)
    x = torch.tensor(json.loads(Path("inputs.json").read_text()))
    y = torch.arange(len(x)) % 2
    callback = DeadActivationMonitor(every_n_steps=1, window=2)
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_steps=4, default_root_dir=".", callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Probe(x, y))
    Path(f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"summary": callback.summary(), "findings": [f.to_dict() for f in callback.findings]}
    ))
"""


@pytest.mark.slow
def test_ddp_unit_dead_on_one_rank_only_is_not_dead(tmp_path):
    n = 64
    sign = torch.where(torch.arange(n) % 2 == 1, 1.0, -1.0)  # negative on rank 0, positive on rank 1
    x = torch.stack([-torch.ones(n), sign, sign, torch.ones(n)], dim=1) * (1 + torch.arange(n)[:, None] / n)
    local_dead_on_rank0 = ((x[0::2] > 0).sum(0) == 0).float().mean().item()
    assert local_dead_on_rank0 == 0.75  # judged on rank 0 alone, this layer would be reported dead
    (tmp_path / "inputs.json").write_text(json.dumps(x.tolist()))

    run_ddp_script(tmp_path, DDP_SCRIPT)

    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        layer = result["summary"]["layers"]["relu_0"]
        assert layer["dead_fraction"] == 0.25  # only unit 0 is never positive on every rank
        assert result["summary"]["windows"] == 2
        assert [f for f in result["findings"] if f["severity"] != "info"] == []
    assert [row["check"] for row in all_findings(tmp_path)] == []


needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


class CompiledBlockMLP(pl.LightningModule):
    """The first hidden layer and its ReLU under ``torch.compile``; the second hidden layer and ReLU eager."""

    def __init__(self, compile_block: bool = True) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.block = torch.compile(block) if compile_block else block
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(F.relu(self.hidden(self.block(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@needs_compiler
def test_a_compiled_submodule_runs_as_compiled_and_training_stays_bit_identical(tmp_path):
    """Instrumenting inside a compiled module changes its graph (inductor's kernels round differently from the
    eager ones the hooks and the mode fall back to): the first version of this monitor changed the weights."""
    kwargs = dict(max_steps=12, limit_val_batches=0)
    without = train_state(tmp_path / "without", CompiledBlockMLP, **kwargs)
    callback = DeadActivationMonitor(every_n_steps=2, window=2)
    with_monitor = train_state(tmp_path / "with", CompiledBlockMLP, [callback], **kwargs)
    assert_bit_identical(without, with_monitor)
    # the eager ReLU is watched, the compiled one is named in an info
    assert set(callback.latest) == {"relu_0"}
    (info,) = [f for f in callback.findings if f.check == "activations.compiled"]
    assert info.severity == "info" and info.data["compiled"] == ["block"]
    assert _get_current_function_mode_stack() == []


def test_the_same_model_uncompiled_is_watched_inside_the_block(tmp_path):
    callback = DeadActivationMonitor(every_n_steps=2, window=2)
    train_state(tmp_path, lambda: CompiledBlockMLP(compile_block=False), [callback], max_steps=12, limit_val_batches=0)
    assert set(callback.latest) == {"block.1", "relu_0"}
    assert [f.check for f in callback.findings] == []


def _mlp_with_compiled_first_layer() -> pl.LightningModule:
    model = DigitsMLP(hidden=(64, 64), optimizer="adam", lr=3e-3)
    model.layers[0] = torch.compile(model.layers[0])
    return model


@needs_compiler
def test_a_compiled_linear_layer_keeps_training_bit_identical(tmp_path):
    kwargs = dict(max_steps=40, limit_val_batches=0)
    without = train_state(tmp_path / "without", _mlp_with_compiled_first_layer, **kwargs)
    callback = DeadActivationMonitor(every_n_steps=2, window=2)
    with_monitor = train_state(tmp_path / "with", _mlp_with_compiled_first_layer, [callback], **kwargs)
    assert_bit_identical(without, with_monitor)
    assert set(callback.latest) == {"relu_0", "relu_1"}  # F.relu runs in the eager forward around the layer


class InPlaceCompiled(CompiledBlockMLP):
    """``module.compile()`` compiles in place: no wrapper module, the module's own call is compiled."""

    def __init__(self) -> None:
        super().__init__(compile_block=False)
        self.block.compile()


@needs_compiler
def test_a_module_compiled_in_place_stays_bit_identical(tmp_path):
    kwargs = dict(max_steps=12, limit_val_batches=0)
    without = train_state(tmp_path / "without", InPlaceCompiled, **kwargs)
    callback = DeadActivationMonitor(every_n_steps=2, window=2)
    with_monitor = train_state(tmp_path / "with", InPlaceCompiled, [callback], **kwargs)
    assert_bit_identical(without, with_monitor)
    assert set(callback.latest) == {"relu_0"}
    assert callback.findings[0].data["compiled"] == ["block"]
    assert _get_current_function_mode_stack() == []


class EagerWithCompiledAlias(pl.LightningModule):
    """The encoder trains eagerly; a compiled alias of it (for inference, say) is never called in training."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        with torch.no_grad():
            self.enc[0].bias.fill_(-10.0)  # dead ReLUs
        self.enc_compiled = torch.compile(self.enc)
        self.head = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.enc(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_module_used_eagerly_is_watched_although_a_compiled_alias_exists(tmp_path):
    callback = DeadActivationMonitor(every_n_steps=2, window=2)
    train_state(tmp_path, EagerWithCompiledAlias, [callback], max_steps=12, limit_val_batches=0)
    assert "activations.dead" in [f.check for f in callback.findings]
    assert set(callback.latest) == {"enc.1"}
