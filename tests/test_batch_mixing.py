import json

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
    two_digits_loaders,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from lightning_debug.batch_mixing import BatchMixingCheck
from lightning_debug.data import DigitsDataModule, load_digits_tensors
from lightning_debug.zoo import DigitsCNN, DigitsMLP, DigitsRNN


class _Classifier(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RowRNN(_Classifier):
    """Reads a digit row by row with a time-major RNN; `bug=True` uses .view where .permute belongs."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.bug = bug
        self.rnn = nn.RNN(8, 32)  # time-major: (T, B, F)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        rows = x.reshape(len(x), 8, 8)  # (B, T, F)
        time_major = rows.view(8, len(x), 8) if self.bug else rows.permute(1, 0, 2)
        sequence, _ = self.rnn(time_major)
        return self.head(sequence[-1])


class FlattenCNN(_Classifier):
    """`bug=True` flattens (B, C, H, W) as reshape(C*H*W, -1).T, which interleaves examples."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.bug = bug
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = self.conv(x)
        flat = h.reshape(h.shape[1] * h.shape[2] * h.shape[3], -1).T if self.bug else h.flatten(1)
        return self.head(flat)


class BatchCentred(DigitsMLP):
    """Subtracts the batch mean inside forward: a reduction over dim 0."""

    def forward(self, x):
        return super().forward(x - x.mean(0, keepdim=True))


class TimeConv(_Classifier):
    """Conv1d over the 8 rows; returns per-position outputs (B, T, 10). Causal: left padding only."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv1d(8, 16, kernel_size=3, padding=0 if causal else 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        rows = x.transpose(1, 2)  # (B, T, F) -> (B, F, T)
        if self.causal:
            rows = F.pad(rows, (2, 0))
        return self.head(torch.relu(self.conv(rows)).transpose(1, 2))  # (B, T, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[:, -1], y)


class TokenModel(_Classifier):
    """Pixels (0..16) as tokens through an embedding; `bug=True` averages with a .view that mixes the batch."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.bug = bug
        self.embed = nn.Embedding(17, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, tokens):
        e = self.embed(tokens)  # (B, 64, 16)
        pooled = e.view(64, len(tokens), 16).mean(0) if self.bug else e.mean(1)
        return self.head(pooled)


def rows_loader():
    """Digits as sequences of 8 rows of 8 pixels: (B, T=8, F=8)."""
    images, labels = load_digits_tensors()
    return DataLoader(TensorDataset(images.reshape(-1, 8, 8), labels), batch_size=32)


def token_loader():
    images, labels = load_digits_tensors(standardize=False)
    return DataLoader(TensorDataset(images.long(), labels), batch_size=32)


def fit(tmp_path, model, callback, datamodule=None, **kwargs):
    kwargs.setdefault("max_steps", 1)
    trainer = quiet_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return trainer


def checks(callback):
    return [(f.check, f.severity) for f in callback.findings]


# ---------------------------------------------------------------- the acceptance runs
def test_view_where_a_permute_belongs_is_caught_at_fit_start(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, RowRNN(bug=True), callback)
    [finding] = callback.findings
    assert (finding.check, finding.severity, finding.step) == ("batch_mixing.detected", "warning", 0)
    assert finding.data["leak"] > 0.01  # other examples get a gradient comparable with the probe's own
    assert finding.data["pairs"][0]["probe"] == 0 and finding.data["pairs"][0]["count"] >= 1
    assert "example 0's output depends on example(s)" in finding.message
    assert "permute" in finding.hint


def test_the_same_model_with_permute_passes(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, RowRNN(bug=False), callback)
    assert callback.findings == []
    assert callback.result["status"] == "ok" and callback.result["leak"] == 0.0
    assert callback.result["probes"] == [0, 16, 31]


def test_a_flatten_that_folds_the_batch_into_the_features_is_caught(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, FlattenCNN(bug=True), callback, datamodule=DigitsDataModule(batch_size=32, image_shape=True))
    assert checks(callback) == [("batch_mixing.detected", "warning")]


def test_a_reduction_over_the_batch_dimension_is_caught(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, BatchCentred(), callback)
    [finding] = callback.findings
    assert finding.check == "batch_mixing.detected"
    # x - x.mean(0): every other example leaks in with weight 1/B of the probe's own
    assert finding.data["pairs"][0]["count"] == 31
    assert 0.5 / 32 < finding.data["leak"] < 2 / 32


@pytest.mark.parametrize(
    "make_model, image_shape",
    [(lambda: DigitsMLP(batchnorm=True, dropout=0.3), False), (DigitsCNN, True), (DigitsRNN, False)],
    ids=["mlp_batchnorm_dropout", "cnn_batchnorm", "rnn"],
)
def test_healthy_zoo_models_pass_because_batchnorm_is_checked_in_eval_mode(tmp_path, make_model, image_shape):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, make_model(), callback, datamodule=DigitsDataModule(batch_size=32, image_shape=image_shape))
    assert callback.findings == []
    assert callback.result["leak"] == 0.0


# ---------------------------------------------------------------- causality and token inputs
def test_a_symmetric_convolution_over_time_is_not_causal(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck(causal_dim=1)
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeConv(causal=False), rows_loader())
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("batch_mixing.non_causal", "warning")
    # kernel 3, padding 1: the output at t sees t + 1 (t = 0 and t = 4 are probed)
    assert [(f["t"], f["positions"]) for f in finding.data["future"]] == [(0, [1]), (4, [5])]
    assert "left-pad" in finding.hint


def test_a_left_padded_convolution_is_causal_and_does_not_mix_the_batch(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck(causal_dim=1)
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeConv(causal=True), rows_loader())
    assert callback.findings == []
    assert callback.result["causal_leak"] == 0.0 and callback.result["leak"] == 0.0


def test_a_causal_dim_the_output_does_not_have_is_an_info_finding(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck(causal_dim=1)
    fit(tmp_path, DigitsMLP(), callback)  # input (B, 64), output (B, 10): no shared time dimension
    assert checks(callback) == [("batch_mixing.not_checked", "info")]
    assert callback.result["leak"] == 0.0  # the batch-mixing part still ran


@pytest.mark.parametrize("bug", [True, False])
def test_integer_token_inputs_are_probed_at_the_embedding_output(tmp_path, bug):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(TokenModel(bug=bug), token_loader())
    assert callback.result["probed"] == "embedding output"
    assert checks(callback) == ([("batch_mixing.detected", "warning")] if bug else [])


def test_custom_batches_use_input_fn_and_forward_fn(tmp_path):
    class DictModel(RowRNN):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["pixels"]), batch["label"])

    class DictData(TensorDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return {"pixels": x, "label": y}

    images, labels = load_digits_tensors()
    loader = DataLoader(DictData(images, labels), batch_size=16)
    pl.seed_everything(0)
    callback = BatchMixingCheck(
        input_fn=lambda batch: batch["pixels"], forward_fn=lambda module, batch: module(batch["pixels"])
    )
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(DictModel(bug=True), loader)
    assert checks(callback) == [("batch_mixing.detected", "warning")]


def test_a_batch_it_cannot_read_is_an_info_finding_and_training_goes_on(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck(input_fn=lambda batch: None)
    trainer = fit(tmp_path, DigitsMLP(), callback, max_steps=2)
    assert checks(callback) == [("batch_mixing.not_checked", "info")]
    assert trainer.global_step == 2


# ---------------------------------------------------------------- monitor rules
class AssertUntouched(Callback):
    """Runs after the check: parameter gradients and train/eval flags must be as Lightning left them."""

    def on_train_start(self, trainer, pl_module):
        self.grads = [p.grad for p in pl_module.parameters()]
        self.training = [m.training for m in pl_module.modules()]


def test_parameter_gradients_and_train_flags_are_untouched(tmp_path):
    pl.seed_everything(0)
    callback, after = BatchMixingCheck(), AssertUntouched()
    model = DigitsMLP(batchnorm=True, dropout=0.3)
    trainer = quiet_trainer(tmp_path, [callback, after], max_steps=1)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert callback.result["status"] == "ok"
    assert after.grads == [None] * len(after.grads)
    assert all(after.training)


@pytest.mark.parametrize("explicit_generator", [False, True])
def test_training_is_bit_identical_with_and_without_the_check(tmp_path, explicit_generator):
    class Shuffled(DigitsDataModule):
        def train_dataloader(self):
            generator = torch.Generator().manual_seed(7) if explicit_generator else None
            return DataLoader(self.train_set, batch_size=32, shuffle=True, generator=generator)

    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], datamodule=Shuffled(), **kwargs)
    callback = BatchMixingCheck()
    with_check = train_state(tmp_path / "b", make_model, [callback], datamodule=Shuffled(), **kwargs)
    assert callback.result["status"] == "ok"
    assert_bit_identical(without, with_check)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("bug", [True, False])
def test_mixed_precision(tmp_path, precision, bug):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    fit(tmp_path, RowRNN(bug=bug), callback, **kwargs)
    assert checks(callback) == ([("batch_mixing.detected", "warning")] if bug else [])


def test_resume_keeps_the_result_and_does_not_check_again(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BatchMixingCheck()
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=2, enable_checkpointing=True)
    trainer.fit(RowRNN(bug=True), datamodule=DigitsDataModule(batch_size=32))
    assert first.result["status"] == "mixing"

    resumed = BatchMixingCheck()
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=4, max_epochs=5)
    trainer.fit(
        RowRNN(bug=True), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert trainer.global_step == 4
    assert resumed.result == first.result
    assert checks(resumed) == [("batch_mixing.detected", "warning")]  # restored, not raised a second time


def test_ddp_every_rank_probes_and_rank_zero_writes_one_finding(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, torch, lightning.pytorch as pl
        from torch import nn
        import torch.nn.functional as F
        from lightning_debug.batch_mixing import BatchMixingCheck
        from lightning_debug.data import DigitsDataModule

        class RowRNN(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.rnn = nn.RNN(8, 32)
                self.head = nn.Linear(32, 10)
            def forward(self, x):
                sequence, _ = self.rnn(x.reshape(len(x), 8, 8).view(8, len(x), 8))
                return self.head(sequence[-1])
            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        callback = BatchMixingCheck()
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=2, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(RowRNN(), datamodule=DigitsDataModule(batch_size=16))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"result": callback.result, "checks": [f.check for f in callback.findings],
                       "step": trainer.global_step}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["checks"] == ["batch_mixing.detected"] and rank["step"] == 2
        assert rank["result"]["status"] == "mixing"
    assert ranks[0]["result"]["leak"] == ranks[1]["result"]["leak"]  # reduced: both judge the same number
    assert [(f["check"], f["step"]) for f in all_findings(tmp_path)] == [("batch_mixing.detected", 0)]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_probes": 0}, "num_probes"),
        ({"num_probes": True}, "num_probes"),
        ({"causal_dim": 0}, "causal_dim"),
        ({"causal_dim": 1.5}, "causal_dim"),
        ({"tolerance": -1e-3}, "tolerance"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"batch_dim": 2}, "batch_dim"),
        ({"batch_dim": True}, "batch_dim"),
        ({"input_fn": "x"}, "input_fn"),
        ({"forward_fn": 3}, "forward_fn"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        BatchMixingCheck(**kwargs)


class DictLoaders(DigitsMLP):
    def training_step(self, batch, batch_idx):
        x, y = batch["digits"]
        return F.cross_entropy(self(x), y)


def test_a_dict_of_training_loaders_is_probed_with_the_dict_training_step_gets(tmp_path):
    pl.seed_everything(0)
    loaders = two_digits_loaders()
    seen = []
    callback = BatchMixingCheck(input_fn=lambda batch: seen.append(type(batch)) or batch["digits"][0])
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(DictLoaders(), train_dataloaders=loaders)
    assert seen == [dict]
    assert callback.findings == [] and callback.result["leak"] == 0.0


# ---------------------------------------------------------------- time-major batches
class TimeMajorLM(pl.LightningModule):
    """A token LSTM language model on (T, B) batches, time-major as nn.LSTM expects; `bug=True` centres the hidden
    states over the batch (dim 1), which mixes the examples."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.embed = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 32)
        self.out = nn.Linear(32, 50)

    def forward(self, tokens):
        hidden, _ = self.rnn(self.embed(tokens))  # (T, B, 32)
        if self.bug:
            hidden = hidden - hidden.mean(1, keepdim=True)
        return self.out(hidden)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, 50), y.reshape(-1), ignore_index=0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def time_major_loader(with_batch_size: bool = True):
    """Sequences of 5-11 tokens padded by pad_sequence's default (batch_first=False): (T, B) batches of 8."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 12, (64,), generator=generator).tolist()
    sequences = [torch.randint(1, 50, (n,), generator=generator) for n in lengths]

    def collate(items):
        return pad_sequence([s[:-1] for s in items]), pad_sequence([s[1:] for s in items])

    if with_batch_size:
        return DataLoader(sequences, batch_size=8, collate_fn=collate)
    return DataLoader(sequences, batch_sampler=BatchSampler(SequentialSampler(sequences), 8, False), collate_fn=collate)


@pytest.mark.parametrize("bug", [False, True])
def test_a_time_major_batch_is_probed_along_the_dimension_that_has_the_loaders_batch_size(tmp_path, bug):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeMajorLM(bug=bug), time_major_loader())
    # the first batch is (T=9, B=8): the loader's batch size is on dim 1
    assert callback.result["batch_dim"] == 1 and callback.result["batch_size"] == 8
    assert callback.result["probes"] == [0, 4, 7]
    if bug:  # hidden - hidden.mean(1): each of the 7 others leaks in
        assert checks(callback) == [("batch_mixing.detected", "warning")]
        assert callback.result["pairs"][0]["count"] == 7
    else:
        assert callback.findings == [] and callback.result["leak"] == 0.0


def test_a_dim_0_that_leaks_from_earlier_indices_only_is_a_time_axis_info_without_a_batch_size(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    loader = time_major_loader(with_batch_size=False)
    steps = len(next(iter(loader))[0])
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeMajorLM(), loader)
    # no batch size to read (a batch_sampler, 2-D targets): dim 0 (time) is probed, and position t depends on 0..t
    assert checks(callback) == [("batch_mixing.not_checked", "info")]
    finding = callback.findings[0]
    assert "each index depends only on earlier ones" in finding.message and f"(size {steps})" in finding.message
    assert "input_fn and forward_fn" in finding.hint and "batch_first=True" in finding.hint
    assert callback.result["status"] == "not_checked" and callback.result["time_leak"] > 0.01


class BatchFirstIntoTimeMajorLSTM(_Classifier):
    """(B, T, F) rows into an nn.LSTM built without batch_first=True: it reads the batch as time."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        sequence, _ = self.rnn(x)  # (B, T, F) taken as (T, B, F)
        return self.head(sequence[:, -1])


def test_an_lstm_without_batch_first_on_batch_first_input_is_still_a_warning(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(BatchFirstIntoTimeMajorLSTM(), rows_loader())
    # example i depends on examples 0..i only, but dim 0 has the loader's batch size (32): the batch, not time
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("batch_mixing.detected", "warning")
    assert callback.result["batch_dim"] == 0
    assert [p["probe"] for p in finding.data["pairs"]] == [16, 31]
    assert "batch_first=True" in finding.hint


# ---------------------------------------------------------------- BatchNorm without running statistics
class TransductiveNorm(_Classifier):
    """BatchNorm with track_running_stats=False (few-shot / MAML): batch statistics at evaluation too."""

    def __init__(self, centre_batch: bool = False) -> None:
        super().__init__()
        self.centre_batch = centre_batch
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x):
        if self.centre_batch:  # a real leak besides the BatchNorm
            x = x - x.mean(0, keepdim=True)
        return self.net(x)


def test_batchnorm_without_running_statistics_mixes_by_design_and_is_an_info(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, TransductiveNorm(), callback)
    assert checks(callback) == [("batch_mixing.by_design", "info")]
    finding = callback.findings[0]
    assert "`net.1`" in finding.message and "mix the batch by design" in finding.message
    assert "track_running_stats=True" in finding.hint
    assert callback.result["leak"] == 0.0 and callback.result["by_design"] == ["net.1"]


def test_a_leak_besides_a_batchnorm_without_running_statistics_is_still_a_warning(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    fit(tmp_path, TransductiveNorm(centre_batch=True), callback)
    [finding] = callback.findings
    assert finding.check == "batch_mixing.detected" and finding.data["pairs"][0]["count"] == 31
    assert 0.1 / 32 < finding.data["leak"] < 10 / 32  # x - x.mean(0): weight ~1/B, seen through the network


def test_training_with_batchnorm_without_running_statistics_is_bit_identical(tmp_path):
    kwargs = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    without = train_state(tmp_path / "a", TransductiveNorm, [], **kwargs)
    callback, models = BatchMixingCheck(), []

    def make_model():
        models.append(TransductiveNorm())
        return models[-1]

    with_check = train_state(tmp_path / "b", make_model, [callback], **kwargs)
    assert callback.result["by_design"] == ["net.1"]
    assert "forward" not in vars(models[0].net[1])  # the probe's forward with fixed statistics is gone
    assert_bit_identical(without, with_check)


def test_a_true_precision_run_is_checked(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    quiet_trainer(tmp_path, [callback], max_steps=1, precision="64-true").fit(
        DigitsMLP(), datamodule=DigitsDataModule(batch_size=64)
    )
    assert callback.findings == [] and callback.result["leak"] == 0.0


# ---------------------------------------------------------------- the batch size on dims 0 and 1 (T == B)
class TimeMajorGRU(_Classifier):
    """A GRU on time-major (T, B, F) rows, as nn.GRU expects without batch_first; `centre_batch=True` subtracts the
    batch mean (over dim 1), which mixes the examples."""

    def __init__(self, centre_batch: bool = False) -> None:
        super().__init__()
        self.centre_batch = centre_batch
        self.rnn = nn.GRU(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        if self.centre_batch:
            x = x - x.mean(1, keepdim=True)
        sequence, _ = self.rnn(x)  # (T, B, 32)
        return self.head(sequence[-1])


def time_major_rows_loader():
    """Digits as 8 rows of 8 pixels, collated time-major in batches of 8: (T=8, B=8, F=8), the batch size on dim 0
    and dim 1."""
    images, labels = load_digits_tensors()

    def collate(items):
        return torch.stack([x for x, _ in items]).transpose(0, 1), torch.stack([y for _, y in items])

    return DataLoader(TensorDataset(images.reshape(-1, 8, 8), labels), batch_size=8, collate_fn=collate)


def test_a_time_major_gru_whose_sequence_length_equals_the_batch_size_is_not_a_warning(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeMajorGRU(), time_major_rows_loader())
    # clean along dim 1, every time step feeds the output along dim 0: the same gradients as a batch-first model
    # mixing dim 0, so an info that names the ambiguity, not a warning
    assert checks(callback) == [("batch_mixing.not_checked", "info")]
    finding = callback.findings[0]
    assert "could not tell the batch dimension" in finding.message and "(8, 8, 8)" in finding.message
    assert "If dim 1 is the batch" in finding.message and "batch size different" in finding.hint
    assert "batch_dim=0 or 1" in finding.hint
    assert callback.result["status"] == "not_checked" and callback.result["leak"] == 0.0
    assert callback.result["batch_dim"] == 1 and callback.result["batch_dims"] == [0, 1]


def test_batch_dim_settles_the_ambiguity_both_ways(tmp_path):
    # told dim 1 is the batch: the time-major GRU is clean; told dim 0 (a batch-first LSTM reading the batch as
    # time): the leak is a warning
    pl.seed_everything(0)
    callback = BatchMixingCheck(batch_dim=1)
    quiet_trainer(tmp_path / "gru", [callback], max_steps=1).fit(TimeMajorGRU(), time_major_rows_loader())
    assert checks(callback) == [] and callback.result["status"] == "ok" and callback.result["batch_dim"] == 1
    pl.seed_everything(0)
    callback = BatchMixingCheck(batch_dim=0)
    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images.reshape(-1, 8, 8), labels), batch_size=8)  # (B=8, T=8, F=8)
    quiet_trainer(tmp_path / "lstm", [callback], max_steps=1).fit(BatchFirstIntoTimeMajorLSTM(), loader)
    assert checks(callback) == [("batch_mixing.detected", "warning")]


def test_a_leak_over_the_batch_of_a_time_major_input_with_t_equal_to_b_is_still_a_warning(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(TimeMajorGRU(centre_batch=True), time_major_rows_loader())
    [finding] = callback.findings
    assert (finding.check, finding.severity) == ("batch_mixing.detected", "warning")
    assert "on both dim 0 and dim 1" in finding.message
    # shown along the batch (dim 1, the smaller leak): x - x.mean(1) brings in the 7 other examples
    assert callback.result["batch_dim"] == 1 and finding.data["pairs"][0]["count"] == 7


def test_an_lstm_without_batch_first_on_batch_first_input_with_t_equal_to_b_is_still_a_warning(tmp_path):
    pl.seed_everything(0)
    callback = BatchMixingCheck()
    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images.reshape(-1, 8, 8), labels), batch_size=8)  # (B=8, T=8, F=8)
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(BatchFirstIntoTimeMajorLSTM(), loader)
    assert checks(callback) == [("batch_mixing.detected", "warning")]
