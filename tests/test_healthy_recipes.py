"""The whole suite on healthy training recipes: no warnings (a false alarm costs the user's trust).

Each recipe is a common, sound way to train the digits models: learning-rate schedules that warm up and decay
to zero, step and plateau decay, clipping, mixed precision, small batches, gradient accumulation, label
smoothing, dropout with BatchNorm, He initialisation, and fine-tuning weights that are already trained. Every
one of them trains to 95-98% validation accuracy; info findings (a bias before BatchNorm, constant blank pixels)
are allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import fp16_cpu_plugin, quiet_trainer

import lightning_debug
from lightning_debug import zoo
from lightning_debug.data import DigitsDataModule


def _step_schedule(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AdamWWarmupCosine(zoo.DigitsMLP):
    """AdamW with weight decay, 50 steps of linear warm-up, then cosine decay to 0 at the last step."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)
        total = int(self.trainer.estimated_stepping_batches)

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        return _step_schedule(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))


class CosineCNN(zoo.DigitsCNN):
    """AdamW and CosineAnnealingLR to 0 over the run."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.05)
        total = int(self.trainer.estimated_stepping_batches)
        return _step_schedule(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total))


class MultiStepCNN(zoo.DigitsCNN):
    """SGD with momentum, the LR cut 10x at epochs 5 and 8 of 10."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 8], gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class PlateauMLP(zoo.DigitsMLP):
    """Adam with ReduceLROnPlateau on the validation loss."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.3)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


class LabelSmoothing(zoo.DigitsMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=0.1)
        self.log("train_loss", loss)
        return loss


def _fine_tuned() -> pl.LightningModule:
    """A digits MLP trained for 5 epochs, loaded into a fresh module for fine-tuning at a lower LR."""
    trained = zoo.DigitsMLP(optimizer="adam", lr=1e-3)
    trainer = quiet_trainer(Path.cwd(), [], max_epochs=5, logger=False, enable_checkpointing=False)
    trainer.fit(trained, datamodule=DigitsDataModule(batch_size=32))
    model = zoo.DigitsMLP(optimizer="adam", lr=1e-4)
    model.load_state_dict(trained.state_dict())
    return model


def _he_init() -> pl.LightningModule:
    """He (Kaiming) normal init for the ReLU layers, zero biases: learns digits fast from the first steps."""
    model = zoo.DigitsMLP(optimizer="adam", lr=1e-3, hidden=(256, 256, 256))
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    return model


def _adam() -> pl.LightningModule:
    return zoo.DigitsMLP(optimizer="adam", lr=1e-3)


# name: (model, Trainer arguments, DigitsDataModule arguments)
RECIPES: dict[str, tuple[Callable[[], pl.LightningModule], dict[str, Any], dict[str, Any]]] = {
    "adamw_warmup_cosine": (lambda: AdamWWarmupCosine(optimizer="adam"), {"max_epochs": 20}, {}),
    "cosine_cnn": (CosineCNN, {"max_epochs": 12}, {"image_shape": True}),
    "multistep_cnn": (MultiStepCNN, {"max_epochs": 10}, {"image_shape": True}),
    "plateau": (lambda: PlateauMLP(optimizer="adam"), {"max_epochs": 15}, {}),
    "clipping": (_adam, {"max_epochs": 10, "gradient_clip_val": 1.0}, {}),
    "rnn_clipping": (zoo.DigitsRNN, {"max_epochs": 6, "gradient_clip_val": 1.0}, {}),
    "bf16_mixed": (_adam, {"max_epochs": 10, "precision": "bf16-mixed"}, {}),
    "fp16_mixed_grad_scaler": (_adam, {"max_epochs": 10, "plugins": [fp16_cpu_plugin(2.0**16)]}, {}),
    "batch_8": (_adam, {"max_epochs": 4}, {"batch_size": 8}),
    "accumulate_4": (zoo.DigitsMLP, {"max_epochs": 10, "accumulate_grad_batches": 4}, {}),
    "label_smoothing": (lambda: LabelSmoothing(optimizer="adam", lr=1e-3), {"max_epochs": 10}, {}),
    "dropout_batchnorm": (
        lambda: zoo.DigitsMLP(dropout=0.3, batchnorm=True, optimizer="adam", lr=1e-3),
        {"max_epochs": 15},
        {},
    ),
    "fine_tuning": (_fine_tuned, {"max_epochs": 3}, {}),
    "he_init": (_he_init, {"max_epochs": 5}, {}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_suite_stays_quiet_on_a_healthy_recipe(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, trainer_kwargs, data_kwargs = RECIPES[name]
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0)
    model = make()
    callbacks = lightning_debug.suite(num_classes=10)
    trainer = quiet_trainer(tmp_path, callbacks, log_every_n_steps=50, **trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(**{"batch_size": 32, **data_kwargs}))
    found = [f.format() for cb in callbacks for f in getattr(cb, "findings", []) if f.severity != "info"]
    assert found == []
    assert trainer.global_step >= 100  # long enough for the per-layer checks (every 100 steps) to judge
    if "val_acc" in trainer.callback_metrics:
        assert float(trainer.callback_metrics["val_acc"]) > 0.9  # healthy indeed
