"""LossFunctionCheck on real digits training: what the loss functions receive, and the logs of probabilities."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from helpers import assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_debug
from lightning_debug import LossFunctionCheck, zoo
from lightning_debug.data import DigitsDataModule


class Loss(zoo.DigitsMLP):
    """The zoo MLP with the loss computed one of several ways (``kind``), some of them wrong."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.softmax = nn.Softmax(dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        kind = self.kind
        if kind == "cross_entropy":
            loss = F.cross_entropy(logits, y)
        elif kind == "softmax_then_cross_entropy":  # the module in forward, the loss module in training_step
            loss = nn.CrossEntropyLoss()(self.softmax(logits), y)
        elif kind == "nll_on_logits":
            loss = F.nll_loss(logits, y)
        elif kind == "nll_on_probabilities":
            loss = F.nll_loss(logits.softmax(dim=1), y)
        elif kind == "nll_on_log_softmax":
            loss = F.nll_loss(F.log_softmax(logits, dim=1), y)
        elif kind == "log_of_softmax":
            loss = F.nll_loss(torch.log(F.softmax(logits, dim=1)), y)
        elif kind == "bce_on_sigmoid":
            loss = F.binary_cross_entropy(torch.sigmoid(logits[:, 0]), (y == 0).float())
        elif kind == "bce_with_logits":
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], (y == 0).float())
        elif kind == "sigmoid_then_bce_with_logits":  # the loss module in training_step
            loss = nn.BCEWithLogitsLoss()(torch.sigmoid(logits[:, 0]), (y == 0).float())
        else:
            raise AssertionError(kind)
        self.log("train_loss", loss)
        return loss


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0)
    kwargs.setdefault("max_steps", 5)
    trainer = quiet_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def _checks(check: LossFunctionCheck) -> list[tuple[str, str]]:
    return [(f.check, f.severity) for f in check.findings]


def test_a_softmax_before_cross_entropy_is_found_and_its_loss_floor_holds(tmp_path: Path) -> None:
    """Softmax twice: the loss cannot fall below ln(1 + 9/e) = 1.461 for 10 classes, however long it trains."""
    check = LossFunctionCheck()
    model = Loss("softmax_then_cross_entropy", optimizer="adam", lr=3e-3)
    trainer = _fit(tmp_path, model, [check], max_steps=300, max_epochs=-1, limit_val_batches=0)
    assert _checks(check) == [("loss_fn.softmax_before_cross_entropy", "warning")]
    (finding,) = check.findings
    assert finding.step == 0 and finding.data["classes"] == 10
    assert math.isclose(finding.data["loss_floor"], math.log(1 + 9 / math.e), abs_tol=1e-4)
    assert "1.46 for 10 classes" in finding.message
    final = float(trainer.callback_metrics["train_loss"])
    assert finding.data["loss_floor"] < final < finding.data["loss_floor"] + 0.2  # fitted against the floor


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cross_entropy", []),
        ("nll_on_log_softmax", []),
        ("bce_with_logits", []),
        ("nll_on_logits", [("loss_fn.nll_without_log_probs", "warning")]),
        ("nll_on_probabilities", [("loss_fn.nll_without_log_probs", "warning")]),
        ("log_of_softmax", [("loss_fn.unstable_log", "warning")]),  # log-probabilities for nll_loss: no nll finding
        ("bce_on_sigmoid", [("loss_fn.bce_on_sigmoid", "info")]),
        ("sigmoid_then_bce_with_logits", [("loss_fn.sigmoid_before_bce_with_logits", "warning")]),
    ],
)
def test_each_way_of_computing_the_loss(tmp_path: Path, kind: str, expected: list) -> None:
    check = LossFunctionCheck()
    _fit(tmp_path, Loss(kind), [check])
    assert _checks(check) == expected
    assert check.result is not None and check.result["status"] == "ok"
    if kind == "nll_on_logits":
        logsumexp = check.findings[0].data["logsumexp"]
        assert logsumexp > 1.0 and f"{logsumexp:.3g}" in check.findings[0].message
    if kind == "nll_on_probabilities":
        assert check.findings[0].data["probabilities"] is True
    if kind == "log_of_softmax":
        assert 0 < check.findings[0].data["smallest_probability"] < 0.1  # 10 classes near uniform at init


def test_a_sigmoid_before_bce_with_logits_is_found_and_its_loss_floor_holds(tmp_path: Path) -> None:
    """Sigmoid twice: on positives the loss cannot fall below -ln sigmoid(1) = 0.313, on negatives below ln 2."""
    check = LossFunctionCheck()
    model = Loss("sigmoid_then_bce_with_logits", optimizer="adam", lr=3e-3)
    trainer = _fit(tmp_path, model, [check], max_steps=300, max_epochs=-1, limit_val_batches=0)
    (finding,) = check.findings
    assert finding.check == "loss_fn.sigmoid_before_bce_with_logits" and finding.step == 0
    floor = 0.1 * finding.data["loss_floor_positive"] + 0.9 * finding.data["loss_floor_negative"]  # 1 digit in 10
    assert finding.data["loss_floor_positive"] == pytest.approx(-math.log(1 / (1 + math.exp(-1))), abs=1e-4)
    assert floor < float(trainer.callback_metrics["train_loss"]) < floor + 0.1  # fitted against the floor


def test_log_of_sigmoid_is_unstable_too(tmp_path: Path) -> None:
    class LogSigmoid(zoo.DigitsMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            p = self(x)[:, 0].sigmoid()
            target = (y == 0).float()
            return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()

    check = LossFunctionCheck()
    _fit(tmp_path, LogSigmoid(), [check])
    (finding,) = check.findings
    assert finding.check == "loss_fn.unstable_log" and finding.data["ops"] == ["sigmoid"]
    assert "F.logsigmoid" in finding.hint


def test_training_stays_bit_identical_and_the_probe_leaves_no_logged_metric(tmp_path: Path) -> None:
    def make() -> pl.LightningModule:
        return Loss("softmax_then_cross_entropy", dropout=0.3, batchnorm=True)

    kwargs = dict(max_steps=12, datamodule=DigitsDataModule(batch_size=16))
    plain = train_state(tmp_path / "a", make, **kwargs)
    check = LossFunctionCheck()
    watched = train_state(tmp_path / "b", make, [check], **kwargs)
    assert_bit_identical(plain, watched)
    assert check.findings  # it did look


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_finds_the_softmax_before_cross_entropy(tmp_path: Path, precision: str) -> None:
    check = LossFunctionCheck()
    kwargs: dict[str, Any] = (
        {"precision": "bf16-mixed"} if precision == "bf16-mixed" else {"plugins": [fp16_cpu_plugin()]}
    )
    _fit(tmp_path, Loss("softmax_then_cross_entropy"), [check], **kwargs)
    assert _checks(check) == [("loss_fn.softmax_before_cross_entropy", "warning")]


def test_manual_optimization_is_not_probed(tmp_path: Path) -> None:
    class Manual(zoo.DigitsMLP):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.steps += 1
            optimizer = self.optimizers()
            optimizer.zero_grad()
            x, y = batch
            self.manual_backward(F.cross_entropy(self(x), y))
            optimizer.step()

    check, model = LossFunctionCheck(), Manual()
    _fit(tmp_path, model, [check])
    assert _checks(check) == [("loss_fn.not_checked", "info")]
    assert "manual optimization" in check.findings[0].message and model.steps == 5  # training_step never probed


def test_a_training_step_that_raises_in_the_probe_is_an_info_and_training_goes_on(tmp_path: Path) -> None:
    class FailsOnce(zoo.DigitsMLP):
        calls = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("first call")
            return super().training_step(batch, batch_idx)

    check = LossFunctionCheck()
    trainer = _fit(tmp_path, FailsOnce(), [check])
    assert _checks(check) == [("loss_fn.not_checked", "info")] and "RuntimeError: first call" in check.result["reason"]
    assert trainer.global_step == 5


def test_the_suite_includes_it_and_healthy_models_get_nothing(tmp_path: Path) -> None:
    callbacks = lightning_debug.suite()
    assert any(isinstance(cb, LossFunctionCheck) for cb in callbacks)
    _fit(tmp_path, zoo.DigitsMLP(dropout=0.2, batchnorm=True), callbacks)
    (check,) = [cb for cb in callbacks if isinstance(cb, LossFunctionCheck)]
    assert check.findings == [] and check.result == {"status": "ok", "flags": []}


def test_the_result_survives_checkpoint_and_resume_without_a_second_probe(tmp_path: Path) -> None:
    first = LossFunctionCheck()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    _fit(tmp_path, Loss("nll_on_logits"), [first, checkpoint], enable_checkpointing=True)
    assert [c for c, _ in _checks(first)] == ["loss_fn.nll_without_log_probs"]
    second = LossFunctionCheck()
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [second], max_steps=8)
    model = Loss("nll_on_logits")
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    # the finding comes back with the checkpoint, once: the probe did not run again
    assert [f.to_dict() for f in second.findings] == [f.to_dict() for f in first.findings]
    assert second.result == first.result


def test_ddp_ranks_report_the_same(tmp_path: Path) -> None:
    run_ddp_script(
        tmp_path,
        """
        import json
        import lightning.pytorch as pl
        import torch.nn.functional as F
        from lightning_debug import LossFunctionCheck, zoo
        from lightning_debug.data import DigitsDataModule

        class NllOnLogits(zoo.DigitsMLP):
            def training_step(self, batch, batch_idx):
                x, y = batch
                if self.global_rank == 1:  # only rank 1 takes the wrong branch: rank 0 reports it all the same
                    return F.nll_loss(self(x), y)
                return F.cross_entropy(self(x), y)

        pl.seed_everything(0)
        check = LossFunctionCheck()
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=3, callbacks=[check],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             logger=False, default_root_dir=".")
        trainer.fit(NllOnLogits(), datamodule=DigitsDataModule(batch_size=32))
        json.dump({"result": check.result, "findings": [f.to_dict() for f in check.findings]},
                  open(f"rank{trainer.global_rank}.json", "w"))
        """,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # the same findings, numbers and words included
    (finding,) = rank0["findings"]
    assert finding["check"] == "loss_fn.nll_without_log_probs" and finding["data"]["logsumexp"] > 1.0


class WithMetric(zoo.DigitsMLP):
    """A torchmetrics metric updated in training_step and logged per epoch, as Lightning's docs teach."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)


def test_the_probes_leave_a_metric_updated_in_training_step_as_it_was(tmp_path: Path) -> None:
    """The suite runs training_step outside the loop twice (InitLossCallback, LossFunctionCheck): the metric's
    accumulated state is put back, so the epoch's value counts the training batches only."""

    def epoch_accuracy(callbacks: list) -> float:
        pl.seed_everything(0)
        model = WithMetric()
        trainer = _fit(tmp_path / str(len(callbacks)), model, callbacks, max_steps=-1, max_epochs=1,
                       limit_train_batches=3, limit_val_batches=0)  # fmt: skip
        return float(trainer.callback_metrics["train_acc"])

    assert epoch_accuracy(lightning_debug.suite(num_classes=10)) == epoch_accuracy([])


def test_a_training_step_without_batch_idx_is_checked(tmp_path: Path) -> None:
    class NoBatchIdx(zoo.DigitsMLP):
        def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
            x, y = batch
            return F.cross_entropy(self(x).softmax(dim=1), y)

    check = LossFunctionCheck()
    _fit(tmp_path, NoBatchIdx(), [check])
    assert _checks(check) == [("loss_fn.softmax_before_cross_entropy", "warning")]


def test_log_probabilities_padded_with_an_eps_over_a_large_vocabulary_are_log_probabilities() -> None:
    """log(p + 1e-6) over 32,000 classes has logsumexp ln(1.032) = 0.03: normalised enough, not raw scores."""
    from lightning_debug.loss_function import _LossCalls

    logits = torch.randn(8, 32_000, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(8, dtype=torch.long)
    recorder = _LossCalls()
    with recorder:
        F.nll_loss(torch.log(F.softmax(logits, dim=1) + 1e-6), target)
    assert recorder.flags == {}
    with recorder:
        F.nll_loss(logits, target)
    assert recorder.flags == {"nll_without_log_probs": 1}
