"""GradNormMonitor on real digits training: spikes, clip suggestion, missing gradients, precision, DDP, resume."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    AlternatingHeads,
    LBFGSDigits,
    OneCycleSGD,
    SparseEmbedding,
    assert_bit_identical,
    fp16_cpu_plugin,
    quiet_trainer,
    run_ddp_script,
    train_state,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_debug import zoo
from lightning_debug.data import DigitsDataModule
from lightning_debug.grad_norm import GradNormMonitor
from lightning_debug.loss_curve import LossCurveMonitor
from lightning_debug.nan_guard import NaNGuard
from lightning_debug.stats import fused_norms
from lightning_debug.update_ratio import UpdateRatioMonitor


class CorruptedDigits(DigitsDataModule):
    """Digits with a handful of training records whose pixels are ``factor`` times too large."""

    def __init__(self, corrupted: int = 5, factor: float = 500.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.corrupted = corrupted
        self.factor = factor

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_set is None
        super().setup(stage)
        if fresh and self.train_set is not None:
            images, labels = self.train_set.tensors
            rows = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[: self.corrupted]
            images[rows] *= self.factor


def _fit(tmp_path: Path, model: pl.LightningModule, datamodule: pl.LightningDataModule, callbacks: list, **kwargs: Any):
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def _warnings(*callbacks: Any) -> list[str]:
    return [f.format() for cb in callbacks for f in cb.findings if f.severity != "info"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"group_by": "layer"}, "group_by"),
        ({"window": 1}, "window"),
        ({"min_history": 0}, "min_history"),
        ({"min_history": 60, "window": 50}, "min_history"),
        ({"spike_factor": 1.0}, "spike_factor"),
        ({"clip_factor": float("nan")}, "clip_factor"),
        ({"vanishing_ratio": 1.5}, "vanishing_ratio"),
        ({"patience": 0}, "patience"),
        ({"autoclip": "yes"}, "autoclip"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradNormMonitor(**kwargs)


def test_corrupted_records_raise_a_spike_warning_and_a_clip_suggestion(tmp_path: Path) -> None:
    monitor = GradNormMonitor(every_n_steps=10)
    _fit(tmp_path, zoo.DigitsMLP(lr=0.01), CorruptedDigits(batch_size=32), [monitor], max_epochs=2)
    spikes = [f for f in monitor.findings if f.check == "grad_norm.spike"]
    assert spikes and all(f.severity == "warning" for f in spikes)
    assert spikes[0].data["ratio"] >= 25.0
    assert spikes[0].data["norm"] >= 25.0 * spikes[0].data["reference"]
    clip = monitor.suggested_clip_value
    assert clip is not None and 0 < clip < spikes[0].data["norm"]
    summary = monitor.summary()["global"]
    assert summary["steps"] == 94  # every optimizer step recorded, not only the 10 measured ones
    assert summary["spikes"] >= 1
    # it clips outliers, not most steps (the run-to-run value is 0.06-0.2: norms rise after the first spikes)
    assert 0 < summary["clipped_fraction_all_steps"] < 0.5 and summary["clipped_fraction_recent"] < 0.5
    assert f"gradient_clip_val={summary['suggested_clip_value']}" in summary["trainer_args"]
    assert "median" in summary["statistic"]
    assert "gradient_clip_val=" in spikes[0].hint


def test_spike_between_measured_steps_is_found(tmp_path: Path) -> None:
    # measured every 50 steps: the spikes of steps 33 and 58 lie between measurements
    monitor = GradNormMonitor(every_n_steps=50)
    _fit(tmp_path, zoo.DigitsMLP(lr=0.01), CorruptedDigits(batch_size=32), [monitor], max_epochs=2)
    steps = [s for f in monitor.findings if f.check == "grad_norm.spike" for s in f.data["spike_steps"]]
    assert steps and all(s % 50 != 0 for s in steps)


def test_hard_batches_near_convergence_are_not_spikes(tmp_path: Path) -> None:
    """Once the loss is ~0, most batches give almost no gradient and the running median falls ~100x, while a batch
    with a not-yet-fitted example still reaches the norms the run trained through: 25x-150x the running median,
    yet no spike (below clip_factor x the run's largest running median). Corrupted records stay spikes (above)."""
    monitor = GradNormMonitor(every_n_steps=10)
    pl.seed_everything(0)  # the initial weights too (seeded once: the batches' order follows from the same seed)
    trainer = quiet_trainer(tmp_path, [monitor], max_epochs=20, log_every_n_steps=50)
    trainer.fit(OneCycleSGD(), datamodule=DigitsDataModule(batch_size=32))
    norms = list(monitor._logs[0].history)
    ratios = [norm / statistics.median(norms[max(0, i - 50) : i]) for i, norm in enumerate(norms) if i >= 20]
    assert max(ratios) >= 25.0  # what the running median alone would have called a spike
    peak = monitor._logs[0].peak_median
    assert max(norms[len(norms) // 2 :]) < monitor.clip_factor * peak
    assert _warnings(monitor) == []


def test_the_run_s_largest_running_median_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    """Resumed at step 800, where the running median has fallen ~100x: the restored peak still tells the hard
    batches of the converged phase from spikes (a peak rebuilt from the resumed steps alone would not)."""
    first = GradNormMonitor(every_n_steps=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=800, save_top_k=-1)
    pl.seed_everything(0)
    trainer = quiet_trainer(
        tmp_path, [first, checkpoint], max_steps=800, max_epochs=20, log_every_n_steps=50, enable_checkpointing=True
    )
    trainer.fit(OneCycleSGD(total_steps=940), datamodule=DigitsDataModule(batch_size=32))
    peak = first._logs[0].peak_median
    assert statistics.median(first._logs[0].recent) < peak / 20
    second = GradNormMonitor(every_n_steps=10)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=940, max_epochs=20, log_every_n_steps=50)
    ckpt = next((tmp_path / "ckpt").glob("*step=800.ckpt"))
    trainer.fit(OneCycleSGD(total_steps=940), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert second._logs[0].peak_median == peak
    assert _warnings(second) == []


@pytest.mark.parametrize("which", ["mlp", "cnn", "rnn"])
def test_healthy_runs_get_no_warnings_from_either_monitor(tmp_path: Path, which: str) -> None:
    model, datamodule = {
        "mlp": (zoo.DigitsMLP, DigitsDataModule(batch_size=32)),
        "cnn": (zoo.DigitsCNN, DigitsDataModule(batch_size=32, image_shape=True)),
        "rnn": (zoo.DigitsRNN, DigitsDataModule(batch_size=32)),
    }[which]
    grad, update = GradNormMonitor(every_n_steps=5), UpdateRatioMonitor(every_n_steps=5)
    _fit(tmp_path, model(), datamodule, [grad, update], max_epochs=2)
    assert _warnings(grad, update) == []
    assert grad.suggested_clip_value is not None
    assert grad.summary()["global"]["spikes"] == 0


def test_batchnorm_cnn_bias_before_norm_is_info_not_warning(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsCNN(), DigitsDataModule(batch_size=32, image_shape=True), [grad], max_steps=40)
    vanishing = [f for f in grad.findings if f.check == "grad_norm.vanishing"]
    assert [f.severity for f in vanishing] == ["info"]
    assert set(vanishing[0].data["parameters"]) == {"features.0.bias", "features.3.bias"}


class LargeVocabulary(pl.LightningModule):
    """(Pixel position, value) pairs as tokens of a 100,000-row table (up to 1,088 rows per batch), their vectors
    averaged (an ``nn.EmbeddingBag``, or an ``nn.Embedding`` and a mean)."""

    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.bag = bag
        self.emb = torch.nn.EmbeddingBag(100_000, 8) if bag else torch.nn.Embedding(100_000, 8)
        self.head = torch.nn.Linear(8, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        tokens = torch.arange(64) * 17 + x.long().clamp(0, 16)
        features = self.emb(tokens) if self.bag else self.emb(tokens).mean(1)
        return torch.nn.functional.cross_entropy(self.head(torch.relu(features)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("bag", [False, True])
def test_an_embedding_table_is_logged_but_not_judged_vanishing(tmp_path: Path, bag: bool) -> None:
    """A batch's gradient reaches a few rows of a large table: its RMS over the table is tiny by construction."""
    monitor = GradNormMonitor(every_n_steps=5)
    trainer = _fit(tmp_path, LargeVocabulary(bag), DigitsDataModule(batch_size=32, standardize=False), [monitor],
                   max_steps=40)  # fmt: skip
    assert monitor.findings == []
    assert monitor._last_rms_ratio["emb.weight"] < monitor.vanishing_ratio
    assert "emb.weight" not in monitor._vanishing_run and monitor._vanishing_run["head.weight"] == 0
    events = [p for p in Path(trainer.log_dir).glob("events.out.tfevents.*")]
    assert events and b"grad_norm/emb.weight" in events[0].read_bytes()


def test_detached_first_layer_is_named(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(detach_first=True), DigitsDataModule(batch_size=32), [grad], max_steps=30)
    (finding,) = [f for f in grad.findings if f.check == "grad_norm.no_grad"]
    assert finding.severity == "warning"
    assert finding.data["parameters"] == ["layers.0.weight", "layers.0.bias"]
    assert "layers.0.weight" in finding.message


def test_deep_sigmoid_mlp_has_vanishing_first_layers(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    model = zoo.DigitsMLP(hidden=(64,) * 8, activation="sigmoid")
    _fit(tmp_path, model, DigitsDataModule(batch_size=32), [grad], max_steps=30)
    warned = [f for f in grad.findings if f.check == "grad_norm.vanishing" and f.severity == "warning"]
    assert warned and "layers.0.weight" in warned[0].data["parameters"]
    assert "head.weight" not in warned[0].data["parameters"]
    assert warned[0].data["rms_ratio"]["layers.0.weight"] < 1e-3


def test_monitor_leaves_training_bit_identical(tmp_path: Path) -> None:
    def make() -> pl.LightningModule:
        return zoo.DigitsMLP(dropout=0.2, batchnorm=True)

    kwargs = dict(max_steps=25, datamodule=DigitsDataModule(batch_size=16))
    plain = train_state(tmp_path / "a", make, **kwargs)
    watched = train_state(tmp_path / "b", make, [GradNormMonitor(every_n_steps=3)], **kwargs)
    assert_bit_identical(plain, watched)


class _AppliedNorms(pl.Callback):
    """Records the global gradient norm after the callbacks before it ran (what the optimizer applies)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item())


def _max_over_median(norms: list[float]) -> float:
    return max(norms) / statistics.median(norms)


def test_autoclip_clips_the_applied_gradients_and_is_off_by_default(tmp_path: Path) -> None:
    plain, plain_applied = GradNormMonitor(every_n_steps=10), _AppliedNorms()
    _fit(tmp_path / "a", zoo.DigitsMLP(lr=0.01), CorruptedDigits(batch_size=32), [plain, plain_applied], max_epochs=2)
    clipped, clipped_applied = GradNormMonitor(every_n_steps=10, autoclip=True), _AppliedNorms()
    _fit(
        tmp_path / "b", zoo.DigitsMLP(lr=0.01), CorruptedDigits(batch_size=32), [clipped, clipped_applied], max_epochs=2
    )
    # off by default: the applied norms are the recorded ones
    assert plain_applied.norms == pytest.approx([n for _, n in _recorded(plain)], rel=1e-5)
    # once a threshold exists (step 21 on), no applied step exceeds 5x its running median by much
    assert _max_over_median(plain_applied.norms[21:]) > 25
    assert _max_over_median(clipped_applied.norms[21:]) < 10


def _recorded(monitor: GradNormMonitor) -> list[tuple[int, float]]:
    return [(0, n) for n in monitor._logs[0].history]


def test_fp16_scaler_skipped_steps_are_counted_and_kept_out(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(), DigitsDataModule(batch_size=32), [grad], max_steps=40, plugins=[fp16_cpu_plugin()])
    log = grad._logs[0]
    assert len(log.nonfinite_steps) >= 5  # init_scale 2**40 overflows while the scaler calibrates
    assert log.finite_steps + len(log.nonfinite_steps) == 40
    assert all(torch.isfinite(torch.tensor(list(log.recent))))
    (finding,) = [f for f in grad.findings if f.check == "grad_norm.non_finite"]
    assert finding.severity == "info"
    assert _warnings(grad) == []
    # unscaled: the median norm is of the order of fp32 training's (~0.1-5), not 2**40 times larger
    assert 0.01 < statistics.median(log.recent) < 10


def test_bf16_mixed_records_finite_norms_without_warnings(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    _fit(tmp_path, zoo.DigitsMLP(), DigitsDataModule(batch_size=32), [grad], max_steps=30, precision="bf16-mixed")
    assert grad._logs[0].finite_steps == 30
    assert _warnings(grad) == []


def test_clip_below_median_is_reported_as_normalisation(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=10)
    _fit(tmp_path, zoo.DigitsMLP(), DigitsDataModule(batch_size=32), [grad], max_steps=40, gradient_clip_val=0.01)
    (finding,) = [f for f in grad.findings if f.check == "grad_norm.clip_normalises"]
    assert finding.severity == "info"
    assert finding.data["clip_fraction"] > 0.9


def test_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    first = GradNormMonitor(every_n_steps=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=23, save_top_k=-1)
    _fit(
        tmp_path,
        zoo.DigitsMLP(),
        DigitsDataModule(batch_size=32),
        [first, checkpoint],
        max_steps=23,
        enable_checkpointing=True,
    )
    ckpt = tmp_path / "ckpt" / "epoch=0-step=23.ckpt"
    assert ckpt.exists()
    second = GradNormMonitor(every_n_steps=5)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=40)
    trainer.fit(zoo.DigitsMLP(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(ckpt))
    log = second._logs[0]
    assert log.finite_steps == 40  # 23 before the checkpoint (3 of them unread at save time) + 17 after
    assert second._measured == first._measured + 3  # steps 25, 30, 35
    assert len(log.recent) == 40 and second.suggested_clip_value is not None


def test_ddp_two_processes_agree(tmp_path: Path) -> None:
    run_ddp_script(
        tmp_path,
        """
        import json
        import lightning.pytorch as pl
        from lightning_debug import zoo
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.grad_norm import GradNormMonitor
        from lightning_debug.stats import fused_norms
        from lightning_debug.update_ratio import UpdateRatioMonitor

        pl.seed_everything(0)
        grad, update = GradNormMonitor(every_n_steps=5), UpdateRatioMonitor(every_n_steps=5)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp_find_unused_parameters_true", devices=2, max_steps=30,
                             callbacks=[grad, update],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             log_every_n_steps=5, default_root_dir=".")
        trainer.fit(zoo.DigitsMLP(detach_first=True), datamodule=DigitsDataModule(batch_size=32))
        out = {"clip": grad.suggested_clip_value, "recent": list(grad._logs[0].recent),
               "ratios": update.last_ratios, "checks": sorted(f.check for f in grad.findings + update.findings)}
        json.dump(out, open(f"rank{trainer.global_rank}.json", "w"))
        """,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert len(rank0["recent"]) == 30 and rank0["clip"] > 0
    assert "grad_norm.no_grad" in rank0["checks"] and "update_ratio.frozen" in rank0["checks"]


def test_sparse_gradients_use_the_norm_of_the_stored_values(tmp_path: Path) -> None:
    grad = GradNormMonitor(every_n_steps=2, min_history=2, window=4)
    data = DigitsDataModule(batch_size=32, standardize=False)
    _fit(tmp_path, SparseEmbedding(), data, [grad], max_steps=10)
    assert grad.summary()["global"]["steps"] == 10 and grad.summary()["global"]["nonfinite_steps"] == 0
    assert "no_grad" not in grad.summary() and grad.suggested_clip_value is not None
    model = SparseEmbedding()
    model(torch.zeros(2, 64)).sum().backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.is_sparse
    (norm,) = fused_norms([model.emb.weight.grad])
    dense = torch.linalg.vector_norm(model.emb.weight.grad.to_dense())
    assert torch.allclose(norm, dense, rtol=1e-6) and norm > 0


def test_fp16_overflowed_steps_are_not_missing_gradients(tmp_path: Path) -> None:
    """GradScaler calibration (init_scale 2**40): the first measured steps overflow; they are no 'no gradient'."""
    grad = GradNormMonitor(every_n_steps=1)
    _fit(tmp_path, zoo.DigitsMLP(), DigitsDataModule(batch_size=32), [grad], max_steps=12, plugins=[fp16_cpu_plugin()])
    assert grad.summary()["global"]["nonfinite_steps"] >= 5  # the calibration steps were measured
    assert [f.check for f in grad.findings if f.severity == "warning"] == []


class ZeroHead(zoo.DigitsMLP):
    """A zero-initialised final layer: at step 0 every earlier layer's gradient is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)


def test_zero_initialised_head_is_not_judged_on_one_measured_step(tmp_path: Path) -> None:
    grad = GradNormMonitor()  # measures every log_every_n_steps=50: only step 0 in 30 steps
    _fit(tmp_path, ZeroHead(), DigitsDataModule(batch_size=32), [grad], max_steps=30, log_every_n_steps=50)
    assert grad.summary()["measured_steps"] == 1
    assert grad.findings == []


class SpikeThenCrash(zoo.DigitsMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 40:
            raise RuntimeError("user error")
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step == 25 else loss  # a gradient spike at step 25


def test_exception_flushes_unread_norms_into_the_report(tmp_path: Path) -> None:
    grad = GradNormMonitor()  # measured at step 0 only: the spike sits unread on the device at the crash
    first = LossCurveMonitor()  # another callback writes the report, before GradNormMonitor's own hooks run
    with pytest.raises(RuntimeError, match="user error"):
        _fit(
            tmp_path,
            SpikeThenCrash(),
            DigitsDataModule(batch_size=32),
            [first, grad],
            max_steps=45,
            log_every_n_steps=50,
        )
    (spike,) = [f for f in grad.findings if f.check == "grad_norm.spike"]
    assert spike.data["spike_steps"][0] == 25
    assert spike.step == spike.data["step"] < 40  # the step the worst spike was measured at, not the judging step
    (report,) = list(tmp_path.rglob("report.json"))
    data = json.loads(report.read_text())
    assert data["status"].startswith("failed") and [f["check"] for f in data["findings"]] == ["grad_norm.spike"]


@pytest.mark.parametrize("every_step", [False, True])
def test_global_norm_is_logged_on_measured_steps_with_the_interval_max(tmp_path: Path, every_step: bool) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor, applied = GradNormMonitor(every_n_steps=5, log_every_step=every_step), _AppliedNorms()
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, zoo.DigitsMLP(), DigitsDataModule(batch_size=32), [monitor, applied], max_steps=12, logger=logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("grad_norm/global")}
    if every_step:
        assert sorted(logged) == list(range(12)) and "grad_norm/global_max" not in events.Tags()["scalars"]
        assert [logged[s] for s in range(12)] == pytest.approx(applied.norms, rel=1e-5)
        return
    # measured at 0, 5 and 10; the steps after the last measured one are read when training ends
    assert sorted(logged) == [0, 5, 10, 11]
    assert [logged[s] for s in (0, 5, 10, 11)] == pytest.approx([applied.norms[s] for s in (0, 5, 10, 11)], rel=1e-5)
    largest = {e.step: e.value for e in events.Scalars("grad_norm/global_max")}
    intervals = {0: [0], 5: range(1, 6), 10: range(6, 11), 11: [11]}
    expected = {s: max(applied.norms[i] for i in steps) for s, steps in intervals.items()}
    assert largest == pytest.approx(expected, rel=1e-5)


class _OddStepBranch(zoo.DigitsMLP):
    """An extra head used on odd steps only: its parameters have a gradient on every other step."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if self.global_step % 2:
            x, y = batch
            loss = loss + torch.nn.functional.cross_entropy(self.extra(x.flatten(1)), y)
        return loss


def test_global_norms_are_right_when_the_parameters_with_a_gradient_change_between_steps(tmp_path: Path) -> None:
    monitor, applied = GradNormMonitor(every_n_steps=5, log_every_step=True), _AppliedNorms()
    _fit(tmp_path, _OddStepBranch(), DigitsDataModule(batch_size=32), [monitor, applied], max_steps=12)
    assert [n for _, n in _recorded(monitor)] == pytest.approx(applied.norms, rel=1e-5)
    assert "no_grad" not in monitor.summary()


@pytest.mark.parametrize("model", [zoo.DigitsMLP, _OddStepBranch])
def test_norms_read_from_nan_guards_transfer_vector_are_the_applied_ones(tmp_path: Path, model: Any) -> None:
    from lightning_debug.nan_guard import NaNGuard

    monitor, applied = GradNormMonitor(every_n_steps=5), _AppliedNorms()
    _fit(tmp_path, model(), DigitsDataModule(batch_size=32), [monitor, NaNGuard(), applied], max_steps=12)
    assert [n for _, n in _recorded(monitor)] == pytest.approx(applied.norms, rel=1e-5)


class _NaNLossAt7(zoo.DigitsMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == 7 else loss


@pytest.mark.parametrize("guarded", [False, True])
def test_the_non_finite_finding_says_whether_the_step_was_applied(tmp_path: Path, guarded: bool) -> None:
    grad = GradNormMonitor(every_n_steps=5)
    callbacks = [grad, NaNGuard()] if guarded else [grad]
    _fit(tmp_path, _NaNLossAt7(), DigitsDataModule(batch_size=32), callbacks, max_steps=15)
    (finding,) = [f for f in grad.findings if f.check == "grad_norm.non_finite"]
    assert finding.severity == "warning" and finding.step == 7
    if guarded:
        assert "NaNGuard skipped these steps" in finding.message and "NaNGuard" not in finding.hint.split("(")[0]
    else:
        assert "The optimizer applied them" in finding.message and finding.hint.startswith("Add NaNGuard")


def test_a_head_that_gets_gradients_only_between_measured_steps_is_not_no_grad(tmp_path: Path) -> None:
    grad = GradNormMonitor()  # every 2 steps with log_every_n_steps=1: the odd head never has a gradient there
    _fit(tmp_path, AlternatingHeads(), DigitsDataModule(batch_size=32), [grad], max_steps=16, log_every_n_steps=1)
    assert grad._finite_measured >= grad.patience  # judged
    assert _warnings(grad) == [] and "no_grad" not in grad.summary()


class _ZeroGradientBranch(zoo.DigitsMLP):
    """An extra layer whose gradient is an all-zero tensor on every step (multiplied by 0), under AdamW's decay."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = torch.nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + 0.0 * self.dead(batch[0]).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def test_weights_moved_by_weight_decay_alone_still_got_no_gradient(tmp_path: Path) -> None:
    """Weights that moved between measured steps got a gradient there, unless their gradient was an all-zero tensor
    under weight decay: decay moves them without one."""
    grad = GradNormMonitor(every_n_steps=2)
    _fit(tmp_path, _ZeroGradientBranch(), DigitsDataModule(batch_size=32), [grad], max_steps=16)
    (finding,) = [f for f in grad.findings if f.check == "grad_norm.no_grad"]
    assert finding.data["parameters"] == ["dead.weight", "dead.bias"]


class _FirstEvaluationNorms(_AppliedNorms):
    """The global gradient norm at the first closure evaluation of each optimizer step (its starting point)."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluations: list[int] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if len(self.evaluations) == trainer.global_step:
            self.evaluations.append(0)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.evaluations[-1] += 1


@pytest.mark.parametrize("manual", [False, True])
def test_lbfgs_closure_evaluations_make_one_step_each(tmp_path: Path, manual: bool) -> None:
    grad, first = GradNormMonitor(every_n_steps=2), _FirstEvaluationNorms()
    _fit(tmp_path, LBFGSDigits(manual), DigitsDataModule(batch_size=32), [grad, first], max_steps=12)
    assert min(first.evaluations) > 1 and len(first.evaluations) == 12  # several closure evaluations per step
    assert grad.summary()["global"]["steps"] == 12 and grad.summary()["measured_steps"] == 6
    assert [n for _, n in _recorded(grad)] == pytest.approx(first.norms, rel=1e-5)
    assert _warnings(grad) == []
