"""The whole suite together, on real Trainers: silence on healthy runs, bit-identical training, no host syncs
between measured steps, the odd models users bring, DDP and mixed precision."""

import json
import math
import random
import sys
import threading
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from torch import nn
from torch.utils.data import DataLoader

import lightning_debug
from lightning_debug import DiagnosticCallback, NaNGuard
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsCNN, DigitsMLP, DigitsRNN

PACKAGE_DIR = str(Path(lightning_debug.__file__).parent)


def warnings_of(callbacks):
    return [f for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings if f.severity != "info"]


@pytest.mark.parametrize(
    "make_model, image_shape",
    [(DigitsMLP, False), (DigitsCNN, True), (DigitsRNN, False), (lambda: DigitsMLP(optimizer="adam", lr=1e-3), False)],
    ids=["mlp", "cnn", "rnn", "mlp-adam"],
)
def test_healthy_runs_get_no_warnings_from_the_whole_suite(tmp_path, make_model, image_shape):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=3)
    trainer.fit(make_model(), datamodule=DigitsDataModule(image_shape=image_shape))
    assert warnings_of(callbacks) == []
    assert trainer.global_step == 72


@pytest.mark.parametrize("plugin", ["16-mixed", "bf16-mixed"])
def test_healthy_mixed_precision_runs_get_no_warnings(tmp_path, plugin):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    kwargs = {"plugins": [fp16_cpu_plugin()]} if plugin == "16-mixed" else {"precision": plugin}
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=3, **kwargs)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    assert warnings_of(callbacks) == []


def test_training_with_the_whole_suite_is_bit_identical_to_training_without(tmp_path):
    def make_model():
        return DigitsMLP(dropout=0.2, batchnorm=True)

    kwargs = dict(max_epochs=2, log_every_n_steps=3)
    without = train_state(tmp_path / "a", make_model, [], **kwargs)
    callbacks = lightning_debug.suite(num_classes=10)
    with_suite = train_state(tmp_path / "b", make_model, callbacks, **kwargs)
    summaries = {type(cb).__name__: cb.summary() for cb in callbacks if isinstance(cb, DiagnosticCallback)}
    assert summaries["InitLossCallback"]["batches"] == 4  # every monitor really measured
    assert summaries["GradNormMonitor"]["measured_steps"] >= 10
    assert summaries["UpdateRatioMonitor"]["measured_steps"] >= 10
    assert summaries["DeadActivationMonitor"]["windows"] >= 2
    assert summaries["PredictionDynamicsLogger"]["logs"] >= 10
    assert_bit_identical(without, with_suite)


def test_bit_identical_with_persistent_worker_loaders(tmp_path):
    class Workers(DigitsDataModule):
        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=32, shuffle=True, num_workers=1, persistent_workers=True)

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=32, num_workers=1, persistent_workers=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", DigitsMLP, [], datamodule=Workers(), **kwargs)
    with_suite = train_state(
        tmp_path / "b", DigitsMLP, lightning_debug.suite(num_classes=10), datamodule=Workers(), **kwargs
    )
    assert_bit_identical(without, with_suite)


class _Stream(torch.utils.data.IterableDataset):
    """A dataset that is its own one-shot iterator (a stream read once, as from a socket or a queue)."""

    def __init__(self, examples):
        self.examples = iter(examples)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.examples)


@pytest.mark.parametrize("one_shot", ["generator", "self-iterating dataset"])
def test_one_shot_training_data_reaches_training_whole_and_the_probes_say_why_they_did_not_look(tmp_path, one_shot):
    """A generator or a stream yields each batch once: a probe that read it would take batches from training."""
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    examples = [data.train_set[i] for i in range(12 * 32)]

    def run(root, callbacks):
        pl.seed_everything(0)
        model = DigitsMLP(dropout=0.2)
        trainer = quiet_trainer(root, callbacks, max_epochs=1, limit_val_batches=0)
        if one_shot == "generator":
            batches = (torch.utils.data.default_collate(examples[i : i + 32]) for i in range(0, len(examples), 32))
        else:
            batches = DataLoader(_Stream(examples), batch_size=32)
        trainer.fit(model, train_dataloaders=batches)
        return trainer.global_step, {k: v.detach().clone() for k, v in model.state_dict().items()}

    steps_without, without = run(tmp_path / "a", [])
    callbacks = lightning_debug.suite(num_classes=10)
    steps_with, with_suite = run(tmp_path / "b", callbacks)
    assert steps_without == steps_with == 12
    assert_bit_identical(without, with_suite)
    assert warnings_of(callbacks) == []
    skipped = {f.check for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings}
    assert {"init_loss.not_measured", "loss_fn.not_checked", "batch_mixing.not_checked"} <= skipped


class _JitterTransform:
    """An augmentation with its own seeded generators, as datasets write them for reproducible noise."""

    def __init__(self) -> None:
        self.numpy_rng = np.random.default_rng(0)
        self.python_rng = random.Random(0)
        self.torch_rng = torch.Generator().manual_seed(0)

    def __call__(self, x):
        noise = torch.from_numpy(self.numpy_rng.normal(0, 0.1, x.shape).astype("float32"))
        noise = noise * self.python_rng.uniform(0.5, 1.5) + 0.05 * torch.randn(x.shape, generator=self.torch_rng)
        return x + noise


class _AugmentedDigits(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.transform = base, _JitterTransform()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, y = self.base[index]
        return self.transform(x), y


def test_probes_leave_a_dataset_s_own_augmentation_generators_as_they_were(tmp_path):
    """The start-of-run probes read examples: a dataset's seeded augmentation must draw the same noise in training."""
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")

    def run(root, callbacks):
        pl.seed_everything(0)
        model = DigitsMLP(batchnorm=True)
        loader = DataLoader(_AugmentedDigits(data.train_set), batch_size=32, shuffle=True)
        quiet_trainer(root, callbacks, max_steps=8, limit_val_batches=0).fit(model, train_dataloaders=loader)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    without = run(tmp_path / "a", [])
    callbacks = lightning_debug.suite(num_classes=10)
    assert_bit_identical(without, run(tmp_path / "b", callbacks))
    assert warnings_of(callbacks) == []


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


HELPER_MODULES = {"stats", "distributed", "base"}


@pytest.fixture
def host_syncs(monkeypatch):
    """Count host transfers made by lightning_debug's callbacks, per optimizer step.

    A transfer is counted once per source line (``x.cpu().tolist()`` is one), and charged to the callback
    module that asked for it (a call through ``stats.to_host`` counts for its caller).
    """
    state = {"step": None, "seen": set(), "counts": Counter()}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if state["step"] is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
                while frame is not None and Path(frame.f_code.co_filename).stem in HELPER_MODULES:
                    frame = frame.f_back
                line = frame and (state["step"], frame.f_code.co_filename, frame.f_lineno)
                if frame is not None and line not in state["seen"]:
                    state["seen"].add(line)
                    state["counts"][(state["step"], Path(frame.f_code.co_filename).stem)] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return state


class StepTracker(pl.Callback):
    """Marks which optimizer step is running, for the sync counter."""

    def __init__(self, state):
        self.state = state

    def on_train_batch_start(self, trainer, *args):
        self.state["step"] = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.state["step"] = None


def test_monitors_make_no_host_transfer_between_measured_steps_and_nanguard_one_per_step(tmp_path, host_syncs):
    pl.seed_everything(0)
    callbacks = [StepTracker(host_syncs), *lightning_debug.suite(num_classes=10)]
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=40, max_epochs=3, log_every_n_steps=10)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    counts = host_syncs["counts"]
    measured = {0, 10, 20, 30, 40}
    # a measured step's work may sit in the batch before it (end-of-batch hooks see the incremented step)
    # or after it (the applied update is compared once the optimizer has stepped)
    # and the epoch's last batch may flush what was recorded on the device (24 batches an epoch)
    between = [s for s in range(40) if not {s - 1, s, s + 1} & measured and (s + 1) % 24]
    one_off = {("data_inspector", 7)}  # DataInspector judges once, after its 8 inspected batches
    monitors = [
        (step, module)
        for (step, module) in counts
        if module != "nan_guard" and step in between and (module, step) not in one_off
    ]
    assert monitors == [], f"host transfers on unmeasured steps: {[(k, counts[k]) for k in monitors]}"
    assert trainer.global_step == 40
    assert all(counts[(step, "nan_guard")] == 1 for step in range(40))  # it does check every step


class FrozenAndUnused(DigitsMLP):
    """A frozen embedding-like first layer and a parameter that is never used."""

    def __init__(self):
        super().__init__()
        self.layers[0].requires_grad_(False)
        self.unused_head = nn.Linear(64, 10)
        self.unused_head.requires_grad_(False)


class TwoOptimizersManual(DigitsMLP):
    """Manual optimization with two optimizers, as in GANs."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            loss = F.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.layers.parameters(), lr=0.05), torch.optim.SGD(self.head.parameters(), lr=0.05)]


class NoActivations(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.linear(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "make_model, logger",
    [(FrozenAndUnused, True), (TwoOptimizersManual, True), (NoActivations, True), (DigitsMLP, False)],
    ids=["frozen-and-unused", "two-optimizers-manual", "no-activations", "no-logger"],
)
def test_unusual_models_train_to_the_end_and_get_at_most_info_findings(tmp_path, make_model, logger):
    pl.seed_everything(0)
    callbacks = lightning_debug.suite(num_classes=10)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=2, logger=logger)
    trainer.fit(make_model(), datamodule=DigitsDataModule())
    assert trainer.current_epoch == 2
    assert warnings_of(callbacks) == []
    assert list(tmp_path.rglob("lightning-debug/report.json"))


def test_the_whole_suite_under_two_process_ddp_finishes_silently_on_a_healthy_run(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, lightning.pytorch as pl, lightning_debug
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.zoo import DigitsMLP

        pl.seed_everything(0)
        callbacks = lightning_debug.suite(num_classes=10)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, callbacks=callbacks,
                             default_root_dir=".", log_every_n_steps=4, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
        checks = sorted(f.check for cb in callbacks for f in getattr(cb, "findings", []) if f.severity != "info")
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"warnings": checks, "step": trainer.global_step}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] == {"warnings": [], "step": 24}
    [report] = tmp_path.rglob("lightning-debug/report.json")
    assert json.loads(report.read_text())["status"] == "completed"


def test_suite_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="`task`"):
        lightning_debug.suite(task="ranking")


def test_suite_without_a_task_leaves_out_the_init_loss_check_and_keeps_nanguard_last():
    callbacks = lightning_debug.suite()
    names = [type(cb).__name__ for cb in callbacks]
    assert "InitLossCallback" not in names and isinstance(callbacks[-1], NaNGuard)
    assert len(lightning_debug.suite(nan_guard=False)) == len(callbacks) - 1


class _ResumingStream(torch.utils.data.IterableDataset):
    """A stream that continues where the last pass stopped (a queue or socket reader): its position lives on the
    dataset object and every ``iter`` goes on from there, so a probe that read the dataset itself would move
    training further down the stream."""

    def __init__(self, lock: bool = False) -> None:
        self.position = 0
        self.lock = threading.Lock() if lock else None  # state deepcopy refuses, as a socket's

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.position)
            x = torch.randn(16, 64, generator=generator)
            x[:, 0] = self.position  # tags the batch with its position in the stream
            self.position += 1
            yield x, torch.randint(0, 10, (16,), generator=generator)


class _PositionsSeen(DigitsMLP):
    """Records the stream positions of the batches the training loop (not a probe) hands to training_step."""

    def __init__(self) -> None:
        super().__init__(dropout=0.2)
        self.positions: list[int] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.positions.append(int(batch[0][0, 0]))


@pytest.mark.parametrize("lock", [False, True], ids=["copyable", "holds-a-lock"])
def test_a_stream_that_resumes_where_it_stopped_reaches_training_whole_under_the_probes(tmp_path, lock):
    """The probes read a copy of an IterableDataset: the stream's own position is not moved, and training sees the
    positions and weights it sees without callbacks. A stream that cannot be copied is not read at all."""

    def run(root, callbacks):
        pl.seed_everything(0)
        model = _PositionsSeen()
        trainer = quiet_trainer(root, callbacks, max_steps=6, limit_val_batches=0)
        trainer.fit(model, train_dataloaders=DataLoader(_ResumingStream(lock), batch_size=None))
        return model.positions, {k: v.detach().clone() for k, v in model.state_dict().items()}

    positions_without, without = run(tmp_path / "a", [])
    callbacks = lightning_debug.suite(num_classes=10)
    positions_with, with_suite = run(tmp_path / "b", callbacks)
    assert positions_without == positions_with == [0, 1, 2, 3, 4, 5]
    assert_bit_identical(without, with_suite)
    assert warnings_of(callbacks) == []
    init_loss = next(cb for cb in callbacks if isinstance(cb, lightning_debug.InitLossCallback))
    predictions = next(cb for cb in callbacks if isinstance(cb, lightning_debug.PredictionDynamicsLogger))
    skipped = {f.check for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings}
    if lock:
        assert init_loss.result == {"status": "not_measured"} and predictions.fixed_batch is None
        assert {"init_loss.not_measured", "loss_fn.not_checked", "batch_mixing.not_checked"} <= skipped
    else:
        assert math.isfinite(init_loss.result["measured"]) and predictions.fixed_batch_source == "train"
        assert not any(check.endswith(("not_measured", "not_checked")) for check in skipped)


class _RestartingStream(torch.utils.data.IterableDataset):
    """The common IterableDataset: every ``iter`` starts a fresh pass, drawing from the global RNG."""

    def __iter__(self):
        for _ in range(8):
            yield torch.randn(16, 64), torch.randint(0, 10, (16,))


def test_a_stream_that_restarts_on_every_iter_is_still_probed_and_trains_bit_identically(tmp_path):
    kwargs = dict(max_steps=6, limit_val_batches=0)

    def run(root, callbacks):
        pl.seed_everything(0)
        model = DigitsMLP(dropout=0.2)
        quiet_trainer(root, callbacks, **kwargs).fit(model, train_dataloaders=DataLoader(_RestartingStream(), None))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    without = run(tmp_path / "a", [])
    init_loss = lightning_debug.InitLossCallback(task="multiclass", num_classes=10)
    predictions = lightning_debug.PredictionDynamicsLogger()
    with_probes = run(tmp_path / "b", [init_loss, predictions])
    assert_bit_identical(without, with_probes)
    assert init_loss.result is not None and init_loss.result["status"] == "ok"
    assert math.isfinite(init_loss.result["measured"]) and init_loss.result["batches"] == 4
    assert predictions.fixed_batch_source == "train"


def test_a_stream_s_copy_shares_its_large_tensors_and_copies_its_position(monkeypatch):
    """The copy a probe reads must not double the memory of an in-memory stream, nor advance the original: the
    smallest tensors (a position, a random state) are copied within the budget, the examples beyond it shared."""
    from lightning_debug import isolation

    monkeypatch.setattr(isolation, "COPY_BYTES", 1 << 20)
    stream = _ResumingStream()
    stream.examples = [torch.zeros(1 << 18) for _ in range(2)]  # 1 MiB each: over the budget
    stream.small = torch.zeros(3)
    copied = isolation.stream_copy(stream)
    assert copied is not None and copied.small is not stream.small
    assert all(a is b for a, b in zip(copied.examples, stream.examples, strict=True))
    next(iter(copied))
    assert (copied.position, stream.position) == (1, 0)
    assert isolation.stream_copy(_ResumingStream(lock=True)) is None


class IndexedDigits(DigitsMLP):
    """Batches of ``(inputs, target, index)``: the example's index rides along after the target."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return super().training_step((x, y), batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        return super().validation_step((x, y), batch_idx)


def indexed_digits_loaders():
    from lightning_debug.data import load_digits_tensors

    images, labels = load_digits_tensors()
    index = torch.arange(len(labels))
    train = DataLoader(torch.utils.data.TensorDataset(images[:1400], labels[:1400], index[:1400]), batch_size=64)
    val = DataLoader(torch.utils.data.TensorDataset(images[1400:], labels[1400:], index[1400:]), batch_size=128)
    return train, val


def test_a_batch_with_an_index_after_the_target_is_read_for_its_target(tmp_path):
    """(inputs, target, index): the target is the second element, not the last. With the index as the target, the
    start-of-run check counted priors of 10 examples out of 256 and the fixed batch scored against indices."""
    callbacks = lightning_debug.suite(num_classes=10, nan_guard=False)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=2, log_every_n_steps=10)
    trainer.fit(IndexedDigits(), *indexed_digits_loaders())
    by_type = {type(cb).__name__: cb for cb in callbacks}
    assert by_type["InitLossCallback"].result["examples"] == 4 * 64  # every example's label counted
    assert sum(by_type["DataInspector"].result["class_counts"]) == by_type["DataInspector"].num_batches * 64
    assert by_type["PredictionDynamicsLogger"].history["accuracy"][-1] >= 0.8
    assert warnings_of(callbacks) == []


def test_a_large_in_memory_stream_is_copied_for_the_probes_without_its_examples():
    """A stream over 600,000 examples held in a list: the list is its data, shared with the copy (not walked, not
    copied), while its position is copied; before, walking it exceeded the object budget and the probes skipped it."""
    from lightning_debug.isolation import one_shot, stream_copy

    class ListStream(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.examples = [(i, i % 10) for i in range(600_000)]
            self.position = 0

        def __iter__(self):
            while self.position < len(self.examples):
                self.position += 1
                yield self.examples[self.position - 1]

    stream = ListStream()
    assert not one_shot(DataLoader(stream, batch_size=4))
    copy = stream_copy(stream)
    assert copy is not None and copy.examples is stream.examples
    next(iter(copy))
    assert copy.position == 1 and stream.position == 0
