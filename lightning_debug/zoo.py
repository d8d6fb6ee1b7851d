"""Small real models on the digits data, healthy or with a classic bug planted.

The demo, the examples and the tests train these; each knob plants one bug from the checklists.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
_FUNCTIONAL = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}
_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class DigitsMLP(pl.LightningModule):
    """An MLP classifier for flat 64-pixel digits.

    Args:
        hidden: widths of the hidden layers.
        activation: the hidden non-linearity.
        functional: call it as ``F.relu``/``torch.tanh`` in ``forward`` (True) or as modules (False).
        lr: learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        last_layer_scale: multiply the final layer's initial weights (bug: a too-confident init).
        weight_scale: multiply every hidden layer's initial weights (bug: saturated tanh).
        hidden_bias: initial bias of the hidden layers (bug: -4 kills ReLUs), None keeps PyTorch's init.
        dropout: dropout probability after each hidden layer.
        batchnorm: BatchNorm1d after each hidden linear layer.
        detach_first: ``.detach()`` the first layer's output (bug: the first layer never learns).
        lr_lambda: optional LambdaLR multiplier of the step.
        input_mask: multiply the inputs by this (bug: 0.0 feeds the model nothing but its biases).
        output_softmax: end ``forward`` with a softmax (bug: ``F.cross_entropy`` applies one itself).
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (64, 64),
        activation: Activation = "relu",
        functional: bool = True,
        lr: float = 0.05,
        optimizer: Literal["sgd", "adam"] = "sgd",
        last_layer_scale: float = 1.0,
        weight_scale: float = 1.0,
        hidden_bias: float | None = None,
        dropout: float = 0.0,
        batchnorm: bool = False,
        detach_first: bool = False,
        lr_lambda: Any = None,
        num_classes: int = 10,
        input_mask: float = 1.0,
        output_softmax: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lr_lambda"])
        self.lr_lambda = lr_lambda
        widths = (64, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if batchnorm else nn.Identity() for b in hidden)
        self.acts = nn.ModuleList(_MODULES[activation]() for _ in hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, nn.Linear)
                layer.weight.mul_(weight_scale)
                if hidden_bias is not None:
                    layer.bias.fill_(hidden_bias)
            self.head.weight.mul_(last_layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        act: Any = _FUNCTIONAL[self.hparams["activation"]]
        x = x * self.hparams["input_mask"] if self.hparams["input_mask"] != 1.0 else x
        for index, (layer, norm, module_act) in enumerate(zip(self.layers, self.norms, self.acts)):
            x = norm(layer(x))
            x = act(x) if self.hparams["functional"] else module_act(x)
            if index == 0 and self.hparams["detach_first"]:
                x = x.detach()
            x = self.drop(x)
        logits = self.head(x)
        return logits.softmax(dim=-1) if self.hparams["output_softmax"] else logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        if self.hparams["optimizer"] == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        if self.lr_lambda is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DigitsCNN(pl.LightningModule):
    """A small CNN with BatchNorm for ``(1, 8, 8)`` digits."""

    def __init__(self, channels: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(8 * channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


class DigitsRNN(pl.LightningModule):
    """An Elman RNN reading a digit in ``steps`` chunks (default: 8 rows of 8 pixels): a sequence model on real data."""

    def __init__(
        self,
        hidden: int = 64,
        lr: float = 0.05,
        recurrent_scale: float = 1.0,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
        steps: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if 64 % steps:
            raise ValueError(f"`steps` must divide the 64 pixels, got {steps!r}")
        self.rnn = nn.RNN(64 // steps, hidden, batch_first=True, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden, 10)
        with torch.no_grad():
            self.rnn.get_parameter("weight_hh_l0").mul_(recurrent_scale)

    def forward(self, x: Tensor) -> Tensor:
        steps = self.hparams["steps"]
        sequence, _ = self.rnn(x.reshape(-1, steps, 64 // steps))
        return self.head(sequence[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


class DigitsRowRNN(pl.LightningModule):
    """A time-major RNN reading a digit row by row; ``view_bug=True`` uses ``.view`` where ``.permute`` belongs.

    The bug reshapes ``(batch, time, features)`` into ``(time, batch, features)`` with ``.view``, which trains and
    converges to something — but each "sequence" is stitched from rows of different examples.
    """

    def __init__(self, view_bug: bool = False, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rnn = nn.RNN(8, hidden)  # time-major: (T, B, F)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(len(x), 8, 8)  # (B, T, F)
        time_major = rows.view(8, len(x), 8) if self.hparams["view_bug"] else rows.permute(1, 0, 2)
        sequence, _ = self.rnn(time_major)
        return self.head(sequence[-1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
