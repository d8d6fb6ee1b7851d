import json

import lightning.pytorch as pl
import pytest
from helpers import quiet_trainer, read_jsonl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_debug import DiagnosticCallback
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsMLP


class StepCounter(DiagnosticCallback):
    """Reports a finding on every measured step and logs the step as a scalar."""

    def __init__(self, every_n_steps=None):
        super().__init__(every_n_steps)
        self.measured_steps: list[int] = []
        self.lines_on_disk: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.is_measured_step(trainer):
            return
        self.measured_steps.append(trainer.global_step)
        self.log_scalars(trainer, {"counter/step": float(trainer.global_step)})
        self.report(trainer, "counter.seen", "warning", f"step {trainer.global_step}", "none")
        self.lines_on_disk.append(len(read_jsonl(self.output_dir / "findings.jsonl")))

    def summary(self):
        return {"measured": len(self.measured_steps)}

    def extra_state(self):
        return {"measured_steps": self.measured_steps}

    def load_extra_state(self, state):
        self.measured_steps = list(state["measured_steps"])


def fit(tmp_path, callbacks, **kwargs):
    kwargs.setdefault("max_steps", 10)
    trainer = quiet_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    return trainer


class HostJudge(StepCounter):
    log_intervals_per_measurement = 1  # judges values already on the host (as LossCurveMonitor does)


def test_cadence_is_two_logging_intervals_by_default_one_for_host_judges_unless_set(tmp_path):
    default, host, own = StepCounter(), HostJudge(), StepCounter(every_n_steps=3)
    fit(tmp_path, [default, host, own], log_every_n_steps=4, max_steps=17)
    assert default.measured_steps == [0, 8, 16]
    assert host.measured_steps == [0, 4, 8, 12, 16]
    assert own.measured_steps == [0, 3, 6, 9, 12, 15]


def test_the_suite_measures_every_second_logging_interval_and_judges_the_loss_curve_on_every_one(tmp_path):
    from lightning_debug import suite

    periodic = ("GradNormMonitor", "UpdateRatioMonitor", "DeadActivationMonitor", "PredictionDynamicsLogger",
                "WeightStatsMonitor", "NaNGuard")  # fmt: skip

    def intervals(every_n_steps):
        callbacks = suite(num_classes=10, every_n_steps=every_n_steps)
        trainer = fit(tmp_path, callbacks, log_every_n_steps=4, max_steps=2)
        return {type(cb).__name__: cb.measure_interval(trainer) for cb in callbacks if hasattr(cb, "measure_interval")}

    default = intervals(None)
    assert {name: default[name] for name in periodic} == dict.fromkeys(periodic, 8)
    assert default["LossCurveMonitor"] == 4
    explicit = intervals(4)  # suite(every_n_steps=...) sets every periodic callback's cadence, NaNGuard's too
    assert {name: explicit[name] for name in (*periodic, "LossCurveMonitor")} == dict.fromkeys(
        (*periodic, "LossCurveMonitor"), 4
    )


def test_each_finding_is_on_disk_when_it_happens_and_warned_once_per_check(tmp_path):
    callback = StepCounter(every_n_steps=2)
    with pytest.warns(UserWarning, match="counter.seen") as record:
        fit(tmp_path, [callback])
    assert callback.lines_on_disk == [1, 2, 3, 4, 5]
    assert len([w for w in record if "counter.seen" in str(w.message)]) == 1
    assert len(callback.findings) == 5


def test_the_first_callback_writes_one_report_for_all(tmp_path):
    first, second = StepCounter(every_n_steps=5), StepCounter(every_n_steps=2)
    fit(tmp_path, [first, second])
    [report_path] = tmp_path.rglob("lightning-debug/report.json")
    report = json.loads(report_path.read_text())
    assert report["status"] == "completed"
    assert report["counts"]["warning"] == 2 + 5
    assert report["summaries"] == {"StepCounter[0]": {"measured": 2}, "StepCounter[1]": {"measured": 5}}


def test_scalars_reach_loggers_other_than_tensorboard(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, [StepCounter(every_n_steps=5)], logger=logger)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "counter/step" in text.splitlines()[0]


class ManyScalars(DiagnosticCallback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self.log_scalars(trainer, {"many/a": float(step), "many/b": -2.0 * step, "many/nan": float("nan")})


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_tensorboard_reads_every_tag_of_a_one_event_write(tmp_path, prefix):
    logger = TensorBoardLogger(tmp_path, name="tb", prefix=prefix)
    fit(tmp_path, [ManyScalars()], logger=logger, max_steps=3)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    name = (lambda tag: f"{prefix}-{tag}") if prefix else (lambda tag: tag)
    assert {name("many/a"), name("many/b"), name("many/nan")} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars(name("many/a"))] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars(name("many/b"))] == [(0, -0.0), (1, -2.0), (2, -4.0)]
    assert all(e.value != e.value for e in events.Scalars(name("many/nan")))


def test_findings_and_state_survive_checkpoint_and_resume(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = StepCounter(every_n_steps=2)
    fit(tmp_path, [first, checkpoint], max_steps=4, enable_checkpointing=True)
    resumed = StepCounter(every_n_steps=2)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=8, max_epochs=5)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    assert resumed.measured_steps == [0, 2, 4, 6]
    assert [f.step for f in resumed.findings] == [0, 2, 4, 6]


def test_a_resumed_runs_findings_file_holds_the_findings_from_before_the_resume(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [StepCounter(every_n_steps=2), checkpoint], max_steps=4, enable_checkpointing=True)
    resumed = StepCounter(every_n_steps=2)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=8, max_epochs=5)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.output_dir is not None and resumed.output_dir.parent.name == "version_1"  # a new log directory
    assert [line["step"] for line in read_jsonl(resumed.output_dir / "findings.jsonl")] == [0, 2, 4, 6]


def test_resuming_into_the_same_log_directory_writes_each_finding_once(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(tmp_path, [StepCounter(every_n_steps=2), checkpoint], max_steps=4, enable_checkpointing=True, logger=logger)
    resumed = StepCounter(every_n_steps=2)
    trainer = quiet_trainer(
        tmp_path, [resumed], max_steps=8, max_epochs=5, logger=CSVLogger(tmp_path, name="run", version=0)
    )
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [
        line["step"] for line in read_jsonl(tmp_path / "run" / "version_0" / "lightning-debug" / "findings.jsonl")
    ] == [
        0,
        2,
        4,
        6,
    ]


def test_an_instance_in_a_new_trainer_starts_a_new_run_and_a_second_fit_continues(tmp_path):
    callback = StepCounter(every_n_steps=2)
    trainer = fit(tmp_path / "a", [callback], max_steps=4, max_epochs=-1)
    assert callback.measured_steps == [0, 2] and len(callback.findings) == 2
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())  # the same Trainer: the run goes on
    assert callback.measured_steps == [0, 2, 4] and len(callback.findings) == 3
    fit(tmp_path / "b", [callback], max_steps=4)  # a new Trainer: a new run, nothing of the last one
    assert callback.measured_steps == [0, 2] and [f.step for f in callback.findings] == [0, 2]
    assert callback.every_n_steps == 2  # the constructor's arguments are kept


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "5"])
def test_every_n_steps_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="`every_n_steps`"):
        StepCounter(every_n_steps=value)


def test_state_key_names_the_passed_arguments_so_two_configurations_share_a_checkpoint(tmp_path):
    default, explicit_default, other = StepCounter(), StepCounter(every_n_steps=None), StepCounter(every_n_steps=3)
    assert default.state_key == explicit_default.state_key == "StepCounter{}"
    assert other.state_key == "StepCounter{'every_n_steps': 3}"
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [default, other, checkpoint], max_steps=4, enable_checkpointing=True)
    resumed_default, resumed_other = StepCounter(), StepCounter(every_n_steps=3)
    trainer = quiet_trainer(tmp_path, [resumed_default, resumed_other], max_steps=11, max_epochs=5)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_default.measured_steps == [0, 10]  # step 0 restored, step 10 (2 x log_every_n_steps) measured after
    assert resumed_other.measured_steps == [0, 3, 6, 9]  # 0 and 3 restored; 6 and 9 measured after the resume


def only_before_optimizer_step() -> type:
    """A DiagnosticCallback class that uses one per-batch hook and records what it sees."""

    class OnlyBeforeOptimizerStep(DiagnosticCallback):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []
            self.skipped_in_run: list[bool] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.calls.append("on_before_optimizer_step")
            self.skipped_in_run.append(self.on_train_batch_end is None and self.on_before_zero_grad is None)

    return OnlyBeforeOptimizerStep


def test_lightning_skips_the_per_batch_hooks_a_callback_does_not_use(tmp_path):
    from lightning.pytorch.profilers import SimpleProfiler

    callback = only_before_optimizer_step()()
    profiler = SimpleProfiler()
    trainer = quiet_trainer(tmp_path, [callback], max_steps=3, profiler=profiler)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert callback.calls == ["on_before_optimizer_step"] * 3 and callback.skipped_in_run == [True] * 3
    actions = {action for action in profiler.recorded_durations if "OnlyBeforeOptimizerStep" in action}
    assert any(a.endswith(".on_before_optimizer_step") for a in actions)
    unused = (".on_train_batch_end", ".on_before_zero_grad", ".on_train_batch_start")
    assert not any(a.endswith(unused) for a in actions)
    # outside a run (teardown) the instance is as constructed: every hook callable, the class untouched
    assert callable(callback.on_train_batch_end) and "on_train_batch_end" not in vars(callback)
    assert "on_train_batch_end" not in vars(type(callback))


def test_a_subclass_hook_can_call_super_on_a_hook_its_parent_does_not_use(tmp_path):
    class Parent(only_before_optimizer_step()):
        pass

    class Child(Parent):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.calls.append("on_train_batch_end")

    def late_hook(self, trainer, pl_module, optimizer):  # attached after the class exists (as cloudpickle does)
        super(Late, self).on_before_zero_grad(trainer, pl_module, optimizer)
        self.calls.append("on_before_zero_grad")

    class Late(Parent):
        pass

    Late.on_before_zero_grad = late_hook
    child, late, parent = Child(), Late(), Parent()
    trainer = quiet_trainer(tmp_path, [child, late, parent], max_steps=2)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert child.calls == ["on_before_optimizer_step", "on_train_batch_end"] * 2
    assert late.calls == ["on_before_zero_grad", "on_before_optimizer_step"] * 2  # zero_grad comes first
    assert parent.calls == ["on_before_optimizer_step"] * 2 and parent.skipped_in_run == [True] * 2


def test_a_callback_mixin_after_a_lightning_debug_class_keeps_its_hooks(tmp_path):
    class CountingMixin(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.calls.append("on_train_batch_end")

    class Mixed(only_before_optimizer_step(), CountingMixin):
        pass

    mixed = Mixed()
    trainer = quiet_trainer(tmp_path, [mixed], max_steps=2)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert mixed.calls == ["on_before_optimizer_step", "on_train_batch_end"] * 2


class Forwarding(pl.Callback):
    """A composite callback that hands every hook it gets to callbacks Lightning does not know about."""

    def __init__(self, children):
        self.children = children

    def setup(self, trainer, pl_module, stage):
        for child in self.children:
            child.setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for child in self.children:
            child.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # its no-op: must not be None


def test_a_callback_forwarded_by_another_keeps_its_hooks_callable(tmp_path):
    child = only_before_optimizer_step()()
    trainer = quiet_trainer(tmp_path, [Forwarding([child])], max_steps=2)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert callable(child.on_train_batch_end)


class RaisesAtStep2(DigitsMLP):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_callable_again_after_a_run_that_raised(tmp_path):
    callback = only_before_optimizer_step()()
    trainer = quiet_trainer(tmp_path, [callback], max_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(RaisesAtStep2(), datamodule=DigitsDataModule())
    assert callback.skipped_in_run == [True, True]  # skipped while it ran
    assert callable(callback.on_train_batch_end) and "on_train_batch_end" not in vars(callback)
