"""PredictionDynamicsLogger on real Trainers: digits classification, regression, collapse, DDP, AMP, resume."""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_debug.data import DigitsDataModule
from lightning_debug.init_loss import InitLossCallback
from lightning_debug.predictions import (
    FIXED_BATCH_FILE,
    PredictionDynamicsLogger,
    colormap,
    render_probabilities,
    render_trajectory,
)
from lightning_debug.zoo import DigitsCNN, DigitsMLP

STEPS_PER_EPOCH = 47  # 1497 training digits in batches of 32


# ---------------------------------------------------------------------- models and data for these tests
class DigitsRegressor(pl.LightningModule):
    """Regress the digit's value (0..9, as a float) from its pixels: a real regression problem."""

    def __init__(self, lr: float = 0.003) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (N, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x)[:, 0], y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x)[:, 0], y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RegressionDigits(DigitsDataModule):
    """The digits with the label as a float target."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        assert self.train_set is not None and self.val_set is not None
        self.train_set = TensorDataset(self.train_set.tensors[0], self.train_set.tensors[1].float())
        self.val_set = TensorDataset(self.val_set.tensors[0], self.val_set.tensors[1].float())


class InputBlindMLP(DigitsMLP):
    """Bug: the features are multiplied by zero, so the head only learns the bias (the class prior)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * 0.0)


class DictOutputMLP(DigitsMLP):
    """Returns a dict, as many real models do."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": super().forward(x), "aux": x.mean(dim=1)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x)["logits"], y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x)["logits"], y))


class GeneratorDigits(DigitsDataModule):
    """Shuffled training loader with its own generator (a second RNG stream the monitor must not advance)."""

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(7)
        )


class StreamedValDigits(DigitsDataModule):
    """The validation set as an IterableDataset in batches of 5: the fixed batch must be read by iterating."""

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(_Stream(*self.val_set.tensors), batch_size=5)


class _Stream(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Any:
        return iter(zip(self.x, self.y))


def val_examples(count: int, seed: int = 0, spread: bool = True) -> tuple[Tensor, Tensor]:
    """The validation digits the logger picks: ``count`` evenly spaced ones (index ``i * 300 // count``), or the
    first ``count`` (``spread=False``: an iterable dataset's first batch)."""
    datamodule = DigitsDataModule(seed=seed)
    datamodule.setup()
    assert datamodule.val_set is not None
    x, y = datamodule.val_set.tensors
    index = torch.arange(count) * len(y) // count if spread else torch.arange(count)
    return x[index], y[index]


def tensorboard_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(tmp_path, callbacks, logger=TensorBoardLogger(str(tmp_path), name="tb"), **kwargs)


def read_events(trainer: pl.Trainer) -> EventAccumulator:
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return events


def fit_collecting_warnings(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=datamodule)
    return [str(w.message) for w in caught if "predictions." in str(w.message)]


# ---------------------------------------------------------------------- classification and regression
def test_classification_run_shows_prediction_images_and_fixed_batch_scalars_in_tensorboard(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(num_examples=12, every_n_steps=5, images_every_n_logs=1)
    trainer = tensorboard_trainer(tmp_path, [logger], limit_train_batches=20, max_epochs=1)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))

    assert logger.resolved_task == "classification"
    assert logger.fixed_batch_source == "val"
    assert logger.steps == [0, 5, 10, 15, 20]  # the initial model, then every 5 optimizer steps
    events = read_events(trainer)
    scalar_tags = set(events.Tags()["scalars"])
    for name in ("loss", "accuracy", "jitter", "flips", "movement"):
        assert f"predictions/{name}" in scalar_tags
    assert [e.step for e in events.Scalars("predictions/loss")] == [0, 5, 10, 15, 20]
    assert [e.step for e in events.Scalars("predictions/jitter")] == [5, 10, 15, 20]  # a change needs two logs
    losses = [e.value for e in events.Scalars("predictions/loss")]
    assert losses[-1] < losses[0] - 0.5  # the MLP learns: the fixed batch's loss falls from ~ln 10
    flips = [e.value for e in events.Scalars("predictions/flips")]
    assert all(0 <= f <= 12 and f == int(f) for f in flips)

    images = events.Tags()["images"]
    assert {"predictions/probabilities", "predictions/trajectory"} <= set(images)
    probabilities = events.Images("predictions/probabilities")
    assert len(probabilities) == 5
    assert probabilities[-1].height == 12 * 16 and probabilities[-1].width > 10 * 24  # 12 rows, 10 classes + strip
    trajectory = events.Images("predictions/trajectory")
    assert trajectory[0].width < trajectory[-1].width  # one column per log

    # the fixed batch is 12 validation examples evenly spaced over the 300 (0, 25, ..., 275), saved with the run
    saved = torch.load(logger.output_dir / FIXED_BATCH_FILE)
    x, y = val_examples(12)
    assert saved["source"] == "val"
    assert torch.equal(saved["batch"][0], x) and torch.equal(saved["batch"][1], y)


def test_regression_run_shows_prediction_vs_target_and_the_error_trajectory(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(num_examples=16, every_n_steps=5, images_every_n_logs=1)
    trainer = tensorboard_trainer(tmp_path, [logger], limit_train_batches=30, max_epochs=1)
    trainer.fit(DigitsRegressor(), datamodule=RegressionDigits(batch_size=32))

    assert logger.resolved_task == "regression"
    events = read_events(trainer)
    assert {"predictions/loss", "predictions/jitter", "predictions/movement"} <= set(events.Tags()["scalars"])
    assert "predictions/accuracy" not in events.Tags()["scalars"]
    losses = [e.value for e in events.Scalars("predictions/loss")]
    assert losses[-1] < 0.5 * losses[0]  # MSE of predicting ~0 for digits 0..9 is ~28; it learns
    assert {"predictions/vs_target", "predictions/trajectory"} <= set(events.Tags()["images"])
    assert len(events.Images("predictions/vs_target")) == len(logger.steps) == 7
    # trajectory rows hold (prediction - target) / std(target); at init the model predicts ~0 for digits 0..9
    y = val_examples(16)[1].float()
    assert np.isfinite(logger.trajectory).all()
    assert np.mean(np.abs(logger.trajectory[0])) > 2 * np.mean(np.abs(logger.trajectory[-1]))
    assert logger._target_scale == pytest.approx(float(y.std()), rel=1e-5)


def test_output_without_targets_falls_back_to_summary_statistics(tmp_path: Path) -> None:
    pl.seed_everything(0)
    inputs_only = val_examples(8)[0]
    logger = PredictionDynamicsLogger(every_n_steps=5, fixed_batch=inputs_only)
    trainer = tensorboard_trainer(tmp_path, [logger], limit_train_batches=10, max_epochs=1)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))

    assert logger.resolved_task == "summary" and logger.fixed_batch_source == "argument"
    events = read_events(trainer)
    for name in ("output_mean", "output_std", "output_min", "output_max", "jitter", "movement"):
        assert f"predictions/{name}" in events.Tags()["scalars"]
    assert "predictions/outputs" in events.Tags()["histograms"]
    model_outputs_min = min(e.value for e in events.Scalars("predictions/output_min"))
    model_outputs_max = max(e.value for e in events.Scalars("predictions/output_max"))
    assert model_outputs_min < model_outputs_max


def test_task_that_does_not_fit_the_output_falls_back_to_summary_with_an_info(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, task="regression")  # but DigitsMLP classifies
    trainer = quiet_trainer(tmp_path, [logger], limit_train_batches=10, max_epochs=1)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert logger.resolved_task == "summary" and logger.steps == [0, 5, 10]
    assert [(f.check, f.severity) for f in logger.findings] == [("predictions.fallback", "info")]
    assert "(16, 10)" in logger.findings[0].message and "output_mean" in logger.history


# ---------------------------------------------------------------------- findings
def test_model_that_ignores_its_input_collapses_to_one_class_and_gets_a_warning(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=2)
    messages = fit_collecting_warnings(trainer, InputBlindMLP(), DigitsDataModule(batch_size=32))

    collapsed = [f for f in logger.findings if f.check == "predictions.collapsed"]
    assert len(collapsed) == 1 and collapsed[0].severity == "warning"
    data = collapsed[0].data
    assert data["predicted_share"] >= 0.9 and data["absorbed"] >= 0.9 and data["label_share"] < 0.5
    assert logger._warmup_step == 50 and collapsed[0].step == 60  # judged after the warm-up, 3 logs in a row
    assert any("predictions.collapsed" in m for m in messages)
    assert "CrossEntropyLoss(weight=...)" in collapsed[0].hint


@pytest.mark.parametrize("make_model, image_shape", [(DigitsMLP, False), (DigitsCNN, True)], ids=["mlp", "cnn"])
def test_healthy_digits_runs_get_no_warnings(tmp_path: Path, make_model: Any, image_shape: bool) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=3)
    messages = fit_collecting_warnings(trainer, make_model(), DigitsDataModule(batch_size=32, image_shape=image_shape))

    assert logger.findings == [] and messages == []
    assert logger.fixed_batch_source == ("train" if make_model is DigitsCNN else "val")  # DigitsCNN has no validation
    assert logger.steps[-1] == 3 * STEPS_PER_EPOCH - 1  # 141 steps: the last measured one is 140
    assert logger.history["accuracy"][-1] >= 0.8


def test_too_high_learning_rate_is_reported_as_late_jitter_with_a_lower_lr(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=3)
    trainer.fit(DigitsMLP(lr=2.0), datamodule=DigitsDataModule(batch_size=32))

    jitter = [f for f in logger.findings if f.check == "predictions.jitter"]
    assert jitter and jitter[0].severity == "warning"
    assert jitter[0].step >= 0.5 * 3 * STEPS_PER_EPOCH  # judged late only
    assert all(v > 0.2 for v in jitter[0].data["jitter"]) and jitter[0].data["net_progress"] < 0.5
    assert "from 2 to 0.667" in jitter[0].hint


def test_too_low_learning_rate_is_reported_as_stuck_with_a_10x_higher_lr(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=2)
    trainer.fit(DigitsMLP(lr=1e-4), datamodule=DigitsDataModule(batch_size=32))

    stuck = [f for f in logger.findings if f.check == "predictions.stuck"]
    assert len(stuck) == 1 and stuck[0].severity == "warning"
    assert all(v < 0.01 for v in stuck[0].data["movement"])
    assert "from 0.0001 to 0.001" in stuck[0].hint
    assert not [f for f in logger.findings if f.check != "predictions.stuck"]


# ---------------------------------------------------------------------- the bars
@pytest.mark.parametrize(
    "source, datamodule_cls",
    [("val", DigitsDataModule), ("train", GeneratorDigits), ("val", StreamedValDigits)],
    ids=["val", "train-with-generator", "streamed-val"],
)
def test_training_stays_bit_identical_with_dropout_batchnorm_and_shuffling(
    tmp_path: Path, source: str, datamodule_cls: type[DigitsDataModule]
) -> None:
    def make_model() -> pl.LightningModule:
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs: dict[str, Any] = dict(limit_train_batches=8, max_epochs=2, limit_val_batches=2)
    plain = train_state(tmp_path / "a", make_model, datamodule=datamodule_cls(batch_size=32), **kwargs)
    logger = PredictionDynamicsLogger(every_n_steps=2, source=source)  # type: ignore[arg-type]
    watched = train_state(tmp_path / "b", make_model, [logger], datamodule=datamodule_cls(batch_size=32), **kwargs)

    assert logger.fixed_batch_source == source and len(logger.steps) == 9  # steps 0, 2, ..., 16
    # 16 evenly spaced validation examples, at most one batch of the loader: 16 indexed, the first batch of 5 streamed
    x, y = val_examples(5, spread=False) if datamodule_cls is StreamedValDigits else val_examples(16)
    if source == "val":
        assert torch.equal(logger.fixed_batch[0], x) and torch.equal(logger.fixed_batch[1], y)
    assert_bit_identical(plain, watched)


def test_two_process_ddp_evaluates_on_rank_zero_only_without_deadlock(tmp_path: Path) -> None:
    body = """
    import json, os
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning_debug.data import DigitsDataModule
    from lightning_debug.predictions import PredictionDynamicsLogger
    from lightning_debug.zoo import DigitsMLP

    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(num_examples=8, every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=8, limit_val_batches=2,
        callbacks=[logger], logger=TensorBoardLogger(".", name="tb"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(dropout=0.2), datamodule=DigitsDataModule(batch_size=16))
    with open(f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"steps": logger.steps, "source": logger.fixed_batch_source, "dir": str(logger.output_dir)}, f)
    """
    run_ddp_script(tmp_path, body, timeout=180)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["steps"] == [0, 2, 4, 6, 8] and rank0["source"] == "val"
    assert rank1["steps"] == [] and rank1["source"] is None  # rank 1 never evaluates
    output_dir = tmp_path / rank0["dir"]  # relative to the script's working directory
    saved = torch.load(output_dir / FIXED_BATCH_FILE)
    assert torch.equal(saved["batch"][0], val_examples(8)[0])  # evenly spaced over the dataset, not rank 0's shard
    events = EventAccumulator(str(output_dir.parent), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "predictions/probabilities" in events.Tags()["images"]
    assert len(events.Scalars("predictions/accuracy")) == 5


def test_model_returning_a_dict_is_measured_through_output_transform(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, output_transform=lambda out: out["logits"])
    trainer = quiet_trainer(tmp_path, [logger], limit_train_batches=15, max_epochs=1)
    trainer.fit(DictOutputMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert logger.resolved_task == "classification" and logger.steps == [0, 5, 10, 15]
    assert logger.findings == []


def test_dict_output_without_transform_is_an_info_finding_not_a_crash(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], limit_train_batches=10, max_epochs=1)
    trainer.fit(DictOutputMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert [(f.check, f.severity) for f in logger.findings] == [("predictions.not_measured", "info")]
    assert "output_transform" in logger.findings[0].hint and "aux" in logger.findings[0].message
    assert logger.steps == []


def test_resume_from_checkpoint_keeps_the_fixed_batch_and_the_history(tmp_path: Path) -> None:
    pl.seed_everything(0)
    first = PredictionDynamicsLogger(num_examples=8, every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(
        tmp_path, [first, checkpoint], limit_train_batches=10, max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert first.steps == [0, 5, 10]

    # resume with another train/validation split: the checkpoint's fixed batch must win
    resumed = PredictionDynamicsLogger(num_examples=8, every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [resumed], limit_train_batches=10, max_epochs=2)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32, seed=1), ckpt_path=tmp_path / "ckpt/last.ckpt")

    assert resumed.steps == [0, 5, 10, 15, 20]
    assert resumed.history["accuracy"][:3] == first.history["accuracy"]
    assert len(resumed.trajectory) == 5
    x, y = val_examples(8, seed=0)
    assert not torch.equal(x, val_examples(8, seed=1)[0])
    assert torch.equal(resumed.fixed_batch[0], x) and torch.equal(resumed.fixed_batch[1], y)
    assert resumed._first is not None and first._first is not None and torch.equal(resumed._first, first._first)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_runs_log_finite_predictions(tmp_path: Path, precision: str) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    amp: dict[str, Any] = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    trainer = quiet_trainer(tmp_path, [logger], limit_train_batches=15, max_epochs=1, **amp)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    assert logger.resolved_task == "classification" and logger.steps == [0, 5, 10, 15]
    assert all(np.isfinite(v) for values in logger.history.values() for v in values)
    assert logger._previous is not None and logger._previous.dtype == torch.float32
    assert torch.allclose(logger._previous.sum(dim=1), torch.ones(16))


# ---------------------------------------------------------------------- arguments and rendering
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"task": "segmentation"}, "task"),
        ({"source": "test"}, "source"),
        ({"output_transform": "logits"}, "output_transform"),
        ({"batch_fn": 3}, "batch_fn"),
        ({"max_history": 0}, "max_history"),
        ({"collapse_fraction": 0.5}, "collapse_fraction"),
        ({"jitter_threshold": 0.0}, "jitter_threshold"),
        ({"stuck_threshold": float("nan")}, "stuck_threshold"),
        ({"patience": True}, "patience"),
        ({"images_every_n_logs": 0}, "images_every_n_logs"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"late_fraction": -0.1}, "late_fraction"),
        ({"ignore_index": 255.0}, "ignore_index"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        PredictionDynamicsLogger(**kwargs)


@pytest.mark.parametrize(("max_steps", "image_steps"), [(40, [0, 25, 40]), (45, [0, 25, 45]), (50, [0, 25, 50])])
def test_images_are_logged_every_n_logs_and_at_the_end(tmp_path: Path, max_steps: int, image_steps: list[int]) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, images_every_n_logs=5)
    trainer = tensorboard_trainer(tmp_path, [logger], max_steps=max_steps, max_epochs=-1)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))
    events = read_events(trainer)
    assert [e.step for e in events.Scalars("predictions/loss")] == list(range(0, max_steps + 1, 5))
    for tag in ("predictions/probabilities", "predictions/trajectory"):
        assert [e.step for e in events.Images(tag)] == image_steps


def test_images_of_many_classes_and_examples_are_capped_and_keep_the_true_classes() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(512, 1000, generator=generator), dim=1)
    labels = torch.randint(0, 1000, (512,), generator=generator)
    labels[:3] = torch.tensor([999, 0, 500])
    probs[:, 700] += 5.0  # one class clearly the most probable everywhere
    probs /= probs.sum(dim=1, keepdim=True)
    image = render_probabilities(probs, labels)
    assert image.shape[0] == 64 * (320 // 64)  # 64 rows of 5-pixel cells
    shown_columns = (image.shape[1] - 8) // 5  # strip (6) + gap (2), then 64 columns of width 320 // 64
    assert shown_columns == 64
    small = render_probabilities(probs[:3, :], labels[:3], max_rows=3, max_classes=4)
    # 3 rows; columns: the true classes 0, 500, 999 and the most probable 700, in class order
    assert small.shape[0] == 3 * 16
    cw = 24  # 4 columns get the widest cells; the strip is as wide, then a 2-pixel gap
    heat = small[:, cw + 2 :]
    assert heat.shape[1] == 4 * cw
    frame_rows = [r * 16 for r in range(3)]
    frames = ((255, 255, 255), (0, 0, 0))
    framed = [[c for c in range(4) if tuple(heat[top, c * cw + cw // 2]) in frames] for top in frame_rows]
    assert framed == [[3], [0], [1]]  # classes 999, 0, 500 sit in columns 3, 0, 1 of [0, 500, 700, 999]


def test_renderers_make_readable_uint8_images() -> None:
    ends = colormap(np.array([0.0, 1.0, np.nan]), 0.0, 1.0)
    assert ends.dtype == np.uint8 and ends[0].tolist() == [68, 1, 84] and ends[1].tolist() == [253, 231, 37]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    image = render_probabilities(probs, torch.tensor([0, 0, 0]))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] == 3 * 16  # nearest-neighbour cells
    strip = image[::16, 0]
    assert strip[0].tolist() == [46, 160, 67] and strip[1].tolist() == [214, 39, 40]  # right / wrong
    trajectory = render_trajectory([[0.1, 0.5], [0.2, 0.9], [0.3, 1.0]], 0.0, 1.0)
    assert trajectory.shape[:2] == (2 * 16, 3 * 12)


def test_the_fixed_batch_is_at_most_one_batch_of_its_loader(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(num_examples=16, every_n_steps=5)
    trainer = tensorboard_trainer(tmp_path, [logger], max_steps=5, max_epochs=-1)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=8))
    x, y = val_examples(8)
    assert torch.equal(logger.fixed_batch[0], x) and torch.equal(logger.fixed_batch[1], y)


# ---------------------------------------------------------------------- sequences: a class per position
VOCAB = 6


class TokenTagger(pl.LightningModule):
    """Tags every token with its own class (a copy task); ``blind`` sees no tokens and can only learn the prior."""

    def __init__(self, layout: str = "flat", blind: bool = False) -> None:
        super().__init__()
        self.layout, self.blind = layout, blind
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        logits = self.head(self.embed(torch.zeros_like(tokens) if self.blind else tokens))  # (N, T, C)
        if self.layout == "flat":
            return logits.reshape(-1, VOCAB)  # as a language model hands it to its loss
        return logits.transpose(1, 2) if self.layout == "channels_first" else logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        logits = self(tokens)
        if self.layout == "channels_first":
            return F.cross_entropy(logits, labels, ignore_index=-100)
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def token_loader() -> DataLoader:
    """256 sequences of 12 tokens, token 0 four times as frequent as each other one; 1 label in 6 is padding."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([4.0] + [1.0] * (VOCAB - 1))
    tokens = torch.multinomial(weights, 256 * 12, replacement=True, generator=generator).reshape(256, 12)
    labels = tokens.clone()
    labels[torch.rand(labels.shape, generator=generator) < 1 / 6] = -100
    return DataLoader(TensorDataset(tokens, labels), batch_size=16)


@pytest.mark.parametrize("layout", ["flat", "channels_first", "channels_last"])
def test_sequence_outputs_are_measured_per_position_without_the_padding(tmp_path: Path, layout: str) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_steps=40, max_epochs=5)
    loader = token_loader()
    trainer.fit(TokenTagger(layout), train_dataloaders=loader)

    assert logger.resolved_task == "classification" and logger.findings == []
    _, labels = logger.fixed_batch
    assert labels.shape == (16, 12) and logger._positions is not None
    assert logger._positions.numel() == int((labels >= 0).sum()) < labels.numel()  # the padding is left out
    accuracy = logger.history["accuracy"]
    assert accuracy[0] < 0.6 and accuracy[-1] == 1.0  # the copy task is learnt, position by position
    assert len(logger.trajectory[-1]) == logger._positions.numel()


def test_a_sequence_model_blind_to_its_tokens_collapses_to_the_frequent_one(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, warmup_steps=10)
    trainer = quiet_trainer(tmp_path, [logger], max_steps=60, max_epochs=5)
    trainer.fit(TokenTagger("channels_last", blind=True), train_dataloaders=token_loader())

    collapsed = [f for f in logger.findings if f.check == "predictions.collapsed"]
    assert len(collapsed) == 1 and collapsed[0].severity == "warning"
    assert collapsed[0].data["predicted_share"] == 1.0 and collapsed[0].data["label_share"] < 0.5


def test_a_resumed_sequence_run_measures_the_same_positions(tmp_path: Path) -> None:
    pl.seed_everything(0)
    first = PredictionDynamicsLogger(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=10, max_epochs=5, enable_checkpointing=True)
    trainer.fit(TokenTagger(), train_dataloaders=token_loader())

    resumed = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=20, max_epochs=5)
    trainer.fit(TokenTagger(), train_dataloaders=token_loader(), ckpt_path=tmp_path / "ckpt/last.ckpt")

    assert resumed.steps == [0, 5, 10, 15, 20] and resumed.resolved_task == "classification"
    assert first._positions is not None and resumed._positions is not None
    assert torch.equal(resumed._positions, first._positions)
    assert {len(row) for row in resumed.trajectory} == {first._positions.numel()}


def test_dense_layouts_pick_positions_from_the_targets_alone() -> None:
    from lightning_debug.predictions import MAX_POSITIONS, _dense_layout

    labels = torch.randint(0, 5, (16, 100))
    labels[:, :10] = -100
    layout, positions = _dense_layout(torch.randn(16, 5, 100), labels)  # F.cross_entropy's (N, C, T)
    assert layout == "channels_first" and positions is not None and positions.numel() == MAX_POSITIONS
    assert bool((labels.reshape(-1)[positions] >= 0).all()) and positions.unique().numel() == MAX_POSITIONS
    assert int(positions[0]) == 10 and int(positions[-1]) == labels.numel() - 1  # evenly spread, ends included
    # many classes: fewer positions, at most 2**21 class scores kept
    assert _dense_layout(torch.randn(16 * 100, 50_000), torch.randint(0, 50_000, (16, 100)))[1].numel() == 64
    assert _dense_layout(torch.randn(16, 100, 5), labels)[0] == "channels_last"
    assert _dense_layout(torch.randn(16, 5), torch.randint(0, 5, (16, 1)))[0] == "flat"  # (N, 1) targets
    # labels the output has no class for: not a per-position classification (summary, as before)
    assert _dense_layout(torch.randn(16, 5, 100), labels.clamp(min=0) + 1) == ("none", None)
    # segmentation's "void" label 255 is left out only when named
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[:, 0] = 255
    assert _dense_layout(torch.randn(2, 3, 8, 8), masks) == ("none", None)
    layout, positions = _dense_layout(torch.randn(2, 3, 8, 8), masks, ignore_index=255)
    assert layout == "channels_first" and positions is not None and positions.numel() == 2 * 7 * 8
    # (N, T, T) logits for (N, T) targets: the classes could sit in either dimension
    assert _dense_layout(torch.randn(4, 6, 6), torch.randint(0, 6, (4, 6))) == ("ambiguous", None)


def test_an_ambiguous_sequence_layout_falls_back_to_summary_with_an_info(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    tokens = torch.randint(0, VOCAB, (64, VOCAB))  # sequences as long as the vocabulary: (N, T, C) with T == C
    loader = DataLoader(TensorDataset(tokens, tokens.clone()), batch_size=16)
    trainer = quiet_trainer(tmp_path, [logger], max_steps=10, max_epochs=5)
    trainer.fit(TokenTagger("channels_last"), train_dataloaders=loader)
    assert logger.resolved_task == "summary"
    assert [(f.check, f.severity) for f in logger.findings] == [("predictions.fallback", "info")]
    assert "out.reshape(-1, out.shape[-1])" in logger.findings[0].hint


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_per_position_measuring_leaves_training_bit_identical(tmp_path: Path, precision: str) -> None:
    def train(callbacks: list[Any], root: Path) -> tuple[dict[str, Tensor], list[Any]]:
        pl.seed_everything(0)
        model = TokenTagger("channels_first")
        amp: dict[str, Any] = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
        trainer = quiet_trainer(root, callbacks, max_steps=20, max_epochs=5, **amp)
        trainer.fit(model, train_dataloaders=token_loader())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, callbacks

    plain, _ = train([], tmp_path / "a")
    watched, (logger,) = train([PredictionDynamicsLogger(every_n_steps=5)], tmp_path / "b")
    assert logger.resolved_task == "classification" and logger.steps == [0, 5, 10, 15, 20]
    assert all(np.isfinite(v) for values in logger.history.values() for v in values)
    assert_bit_identical(plain, watched)


def test_images_are_written_as_the_same_pixels_that_add_image_writes(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_debug.base import _tensorboard_png

    image = render_probabilities(torch.softmax(torch.randn(12, 10), 1), torch.randint(0, 10, (12,)))
    direct, reference = SummaryWriter(str(tmp_path / "direct")), SummaryWriter(str(tmp_path / "reference"))
    assert _tensorboard_png(direct, "predictions/probabilities", image, 7)
    assert not _tensorboard_png(direct, "x", image.astype(np.float32), 7)  # not uint8 HWC: add_image's job
    reference.add_image("predictions/probabilities", image, 7, dataformats="HWC")
    written = []
    for writer, folder in ((direct, "direct"), (reference, "reference")):
        writer.close()
        events = EventAccumulator(str(tmp_path / folder))
        events.Reload()
        (event,) = events.Images("predictions/probabilities")
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        written.append((event.step, event.height, event.width, pixels))
    assert written[0][:3] == written[1][:3] == (7, *image.shape[:2])
    assert np.array_equal(written[0][3], written[1][3]) and np.array_equal(written[0][3], image)


def test_image_tensors_are_written_too_and_others_fall_back_to_add_image(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_debug.base import _tensorboard_png

    image = render_probabilities(torch.softmax(torch.randn(4, 3), 1), torch.randint(0, 3, (4,)))
    writer = SummaryWriter(str(tmp_path))
    assert _tensorboard_png(writer, "a", torch.from_numpy(image)[:, ::2], 1)  # a uint8 tensor, not contiguous
    floats = torch.rand(5, 4, 3, requires_grad=True)
    assert not _tensorboard_png(writer, "b", floats, 1)  # add_image's job (no conversion attempted here)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (event,) = events.Images("a")
    assert (event.height, event.width) == (image.shape[0], (image.shape[1] + 1) // 2)


# ---------------------------------------------------------------------- binary classifiers with float targets
class BinaryDigits(DigitsDataModule):
    """Is the digit 5 or more? Float 0/1 targets, as BCEWithLogitsLoss takes them; ``noise`` flips that share of the
    training labels (a healthy run that cannot fit every label)."""

    def __init__(self, noise: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.noise = noise

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        assert self.train_set is not None and self.val_set is not None
        x, y = self.train_set.tensors
        target = (y >= 5).float()
        flip = torch.rand(len(y), generator=torch.Generator().manual_seed(3)) < self.noise
        self.train_set = TensorDataset(x, torch.where(flip, 1 - target, target))
        self.val_set = TensorDataset(self.val_set.tensors[0], (self.val_set.tensors[1] >= 5).float())


class BinaryMLP(DigitsMLP):
    """One logit per digit, trained with BCEWithLogitsLoss; ``squeeze``: output ``(N,)``, else ``(N, 1)``."""

    def __init__(self, squeeze: bool = True, lr: float = 0.05) -> None:
        super().__init__(num_classes=1, lr=lr)
        self.squeeze = squeeze

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        return logits[:, 0] if self.squeeze else logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.binary_cross_entropy_with_logits(logits, y.reshape(logits.shape))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.binary_cross_entropy_with_logits(logits, y.reshape(logits.shape)))


@pytest.mark.parametrize("squeeze", [True, False], ids=["N", "N-1"])
def test_binary_classifier_with_float_targets_is_measured_as_classification(tmp_path: Path, squeeze: bool) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=3)
    messages = fit_collecting_warnings(trainer, BinaryMLP(squeeze, lr=0.2), BinaryDigits(noise=0.1, batch_size=32))

    assert logger.resolved_task == "classification"  # not a regression of the logits onto 0/1
    losses, accuracy = logger.history["loss"], logger.history["accuracy"]
    assert losses[0] == pytest.approx(math.log(2), abs=0.1) and losses[-1] < 0.5  # binary cross-entropy falls
    assert accuracy[-1] >= 0.8
    assert max(logger.history["jitter"][len(logger.steps) // 2 :]) < 0.2  # probabilities barely move late
    assert logger.findings == [] and messages == []  # 10% noisy labels: healthy, no jitter warning


def test_soft_labels_stay_regression_and_suite_passes_its_task_on() -> None:
    from lightning_debug import suite
    from lightning_debug.predictions import _infer_task

    logits = torch.randn(16)
    assert _infer_task(logits, torch.tensor([0.0, 1.0] * 8)) == "classification"
    assert _infer_task(logits[:, None], torch.tensor([[1.0], [0.0]] * 8)) == "classification"
    assert _infer_task(logits, torch.tensor([0.1, 0.9] * 8)) == "regression"  # soft labels: not 0/1
    assert _infer_task(logits, torch.tensor([0.0, 1.0, 2.0, 3.0] * 4)) == "regression"

    def task_of(**kwargs: Any) -> str:
        (logger,) = [c for c in suite(**kwargs) if isinstance(c, PredictionDynamicsLogger)]
        return logger.task

    assert task_of(task="binary") == task_of(num_classes=10) == "classification"
    assert task_of(task="regression") == "regression" and task_of() == "auto"


# ---------------------------------------------------------------------- which examples: class-sorted data
class SortedValDigits(DigitsDataModule):
    """The validation set sorted by class, as ImageFolder lists it: its first 16 examples are all 0s."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        assert self.val_set is not None
        x, y = self.val_set.tensors
        order = torch.argsort(y, stable=True)
        self.val_set = TensorDataset(x[order], y[order])


def test_a_class_sorted_validation_set_gives_a_batch_of_every_class_and_shows_the_collapse(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=2)
    trainer.fit(InputBlindMLP(), datamodule=SortedValDigits(batch_size=32))

    labels = logger.fixed_batch[1]
    assert labels.tolist() == sorted(labels.tolist()) and labels.unique().numel() == 10  # 16 spread over 300
    collapsed = [f for f in logger.findings if f.check == "predictions.collapsed"]
    assert len(collapsed) == 1 and collapsed[0].severity == "warning"
    assert collapsed[0].data["predicted_share"] >= 0.9 and collapsed[0].data["label_share"] < 0.5
    assert logger.history["accuracy"][-1] < 0.3  # one class out of ten, not 1.00 on a batch of 0s


def test_a_fixed_batch_of_one_class_gets_an_info_that_collapse_cannot_be_judged(tmp_path: Path) -> None:
    datamodule = DigitsDataModule()
    datamodule.setup()
    assert datamodule.val_set is not None
    x, y = datamodule.val_set.tensors
    threes = (x[y == 3][:16], y[y == 3][:16])
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, fixed_batch=threes)
    trainer = quiet_trainer(tmp_path, [logger], max_epochs=2)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=32))

    assert [(f.check, f.severity, f.step) for f in logger.findings] == [("predictions.single_class_batch", "info", 0)]
    finding = logger.findings[0]
    assert finding.data == {"labels": 16, "classes": 1, "class": 3, "count": 16}
    assert "all 16 class 3" in finding.message and "fixed_batch=" in finding.hint


# ---------------------------------------------------------------------- resume with the user's batch classes
class Sample(NamedTuple):
    x: Tensor
    y: Tensor


class SampleDigits(Dataset):
    """The training digits as NamedTuples: the default collate keeps the type, ``training_step`` reads ``batch.x``."""

    def __init__(self) -> None:
        datamodule = DigitsDataModule()
        datamodule.setup()
        assert datamodule.train_set is not None
        self.x, self.y = datamodule.train_set.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.x[index], self.y[index])


@dataclass
class Pair:
    x: Tensor
    y: Tensor


class AttributeBatchMLP(DigitsMLP):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch.x), batch.y)


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass"])
def test_resume_with_a_namedtuple_or_dataclass_fixed_batch(tmp_path: Path, kind: str) -> None:
    def make_logger() -> PredictionDynamicsLogger:
        if kind == "namedtuple":
            return PredictionDynamicsLogger(num_examples=8, every_n_steps=5, batch_fn=lambda b: (b.x, b.y))
        pair = Pair(*val_examples(8))  # a dataclass, passed again on resume: it cannot travel in the checkpoint
        return PredictionDynamicsLogger(every_n_steps=5, fixed_batch=pair, batch_fn=lambda b: (b.x, b.y))

    def loader() -> DataLoader:
        return DataLoader(SampleDigits(), batch_size=32)

    pl.seed_everything(0)
    first = make_logger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=10, max_epochs=-1, enable_checkpointing=True)
    trainer.fit(AttributeBatchMLP(), train_dataloaders=loader())

    resumed = make_logger()
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=20, max_epochs=-1)
    trainer.fit(AttributeBatchMLP(), train_dataloaders=loader(), ckpt_path=tmp_path / "ckpt/last.ckpt")

    assert resumed.steps == [0, 5, 10, 15, 20] and resumed.findings == []
    assert type(resumed.fixed_batch) is type(first.fixed_batch)  # batch_fn reads .x and .y again
    assert torch.equal(resumed.fixed_batch.x, first.fixed_batch.x) and torch.equal(
        resumed.fixed_batch.y, first.fixed_batch.y
    )
    assert resumed.history["accuracy"][:3] == first.history["accuracy"]
    if kind == "namedtuple":  # 8 training digits evenly spaced over the 1497: indices 0, 187, ...
        assert torch.equal(first.fixed_batch.x, SampleDigits().x[torch.arange(8) * 1497 // 8])


# ---------------------------------------------------------------------- fine-tuning: already right, need not move
def test_fine_tuning_trained_weights_with_a_small_lr_is_not_called_stuck(tmp_path: Path) -> None:
    pl.seed_everything(0)
    trained = DigitsMLP()
    quiet_trainer(tmp_path / "pretrain", logger=False, max_epochs=3).fit(
        trained, datamodule=DigitsDataModule(batch_size=32)
    )

    results = {}
    for with_init_loss in (False, True):
        pl.seed_everything(0)
        model = DigitsMLP(lr=1e-4)  # the LR of the stuck test below: moves trained predictions very little
        model.load_state_dict(trained.state_dict())
        logger = PredictionDynamicsLogger(every_n_steps=5)
        init_loss = [InitLossCallback(task="multiclass", num_classes=10)] if with_init_loss else []
        trainer = quiet_trainer(tmp_path / str(with_init_loss), [*init_loss, logger], max_epochs=2)
        messages = fit_collecting_warnings(trainer, model, DigitsDataModule(batch_size=32))
        results[with_init_loss] = logger
        assert messages == []  # no warning: the predictions are already right

        stuck = [f for f in logger.findings if f.check == "predictions.stuck"]
        assert len(stuck) == 1 and stuck[0].severity == "info" and logger.history["accuracy"][0] >= 0.9
        assert all(v < 0.01 for v in stuck[0].data["movement"])  # the predictions did not move: judged otherwise
        start, best = stuck[0].data["start_loss"], stuck[0].data["best_constant"]
        assert start < 0.5 * best and best > 2.0  # ~0.1 against the entropy of 16 digit labels (> ln 8)
        reason = "init_loss.trained" if with_init_loss else "best constant predictor"
        assert reason in stuck[0].message and "Raise the learning rate 10x" not in stuck[0].hint
    assert len(results) == 2


# ---------------------------------------------------------------------- several inputs
class TwoInputMLP(DigitsMLP):
    """``forward(top, bottom)``: the upper and lower halves of a digit as two inputs."""

    def forward(self, top: Tensor, bottom: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cat([top, bottom], dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        top, bottom, y = batch
        return F.cross_entropy(self(top, bottom), y)


def halves_loader() -> DataLoader:
    datamodule = DigitsDataModule()
    datamodule.setup()
    assert datamodule.train_set is not None
    x, y = datamodule.train_set.tensors
    return DataLoader(TensorDataset(x[:, :32], x[:, 32:], y), batch_size=32)


@pytest.mark.parametrize(
    "batch_fn",
    [None, lambda b: ((b[0], b[1]), b[2]), lambda b: ({"bottom": b[1], "top": b[0]}, b[2])],
    ids=["default", "tuple", "dict"],
)
def test_a_model_taking_two_inputs_is_called_with_both(tmp_path: Path, batch_fn: Any) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, batch_fn=batch_fn)
    trainer = quiet_trainer(tmp_path, [logger], max_steps=40, max_epochs=-1)
    trainer.fit(TwoInputMLP(), train_dataloaders=halves_loader())

    assert logger.findings == [] and logger.resolved_task == "classification"
    assert logger.steps == list(range(0, 41, 5))
    assert logger.history["accuracy"][-1] >= logger.history["accuracy"][0] + 0.3  # the model learns both halves


def test_inputs_that_fit_no_forward_get_a_hint_on_how_the_model_is_called(tmp_path: Path) -> None:
    pl.seed_everything(0)
    logger = PredictionDynamicsLogger(every_n_steps=5, batch_fn=lambda b: ((b[0], b[1], b[1]), b[2]))
    trainer = quiet_trainer(tmp_path, [logger], max_steps=5, max_epochs=-1)
    trainer.fit(TwoInputMLP(), train_dataloaders=halves_loader())
    assert [(f.check, f.severity) for f in logger.findings] == [("predictions.not_measured", "info")]
    assert "module(inputs)" in logger.findings[0].message and "forward(x1, x2)" in logger.findings[0].hint
