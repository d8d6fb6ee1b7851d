import json
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import all_findings, assert_bit_identical, fp16_cpu_plugin, quiet_trainer, run_ddp_script, train_state
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from lightning_debug.data import DigitsDataModule, load_digits_tensors
from lightning_debug.data_inspector import DataInspector, _grid_image
from lightning_debug.zoo import DigitsCNN, DigitsMLP


def fit(tmp_path, model, callback, data, **kwargs):
    kwargs.setdefault("max_steps", 8)
    trainer = quiet_trainer(tmp_path, [callback], **kwargs)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, data)
    return trainer


def warnings_of(callback):
    return [(f.check, f.severity) for f in callback.findings if f.severity != "info"]


def loader(images, labels, batch_size=64, shuffle_seed=0):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(TensorDataset(images[order], labels[order]), batch_size=batch_size)


def imbalanced_binary(ratio: int):
    """Is it a zero? Positives are zeros, negatives digits 1-9, ``ratio`` negatives per positive."""
    images, labels = load_digits_tensors()
    negatives = (labels != 0).nonzero().flatten()
    positives = (labels == 0).nonzero().flatten()
    positives = positives[: min(len(positives), len(negatives) // ratio)]
    negatives = negatives[: len(positives) * ratio]
    index = torch.cat([negatives, positives])
    return images[index], (labels[index] == 0).long()


# ---------------------------------------------------------------- the acceptance runs
def test_inputs_left_in_0_to_16_pixel_units_are_flagged_with_the_measured_statistics(tmp_path):
    pl.seed_everything(0)
    callback = DataInspector(num_batches=4)
    fit(tmp_path, DigitsMLP(), callback, DigitsDataModule(batch_size=64, standardize=False, shuffle=False))
    assert warnings_of(callback) == [("data.wrong_scale", "warning")]  # not_centred is folded into it
    [finding] = [f for f in callback.findings if f.check == "data.wrong_scale"]
    datamodule = DigitsDataModule(standardize=False, shuffle=False)
    datamodule.setup()
    first = datamodule.train_set.tensors[0][: 4 * 64]  # exactly the inspected batches
    assert finding.data["max"] == 16.0 and finding.data["min"] == 0.0
    assert finding.data["mean"] == pytest.approx(first.mean().item(), rel=1e-6)
    assert finding.data["std"] == pytest.approx(first.std(unbiased=False).item(), rel=1e-6)
    assert f"mean {finding.data['mean']:.4g}, std {finding.data['std']:.4g}" in finding.hint
    assert "std away from 0" in finding.message  # the centring problem is named too


def test_image_shaped_raw_pixels_get_a_per_channel_normalize_hint_and_a_grid_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = DataInspector(num_batches=2)
    datamodule = DigitsDataModule(batch_size=64, standardize=False, image_shape=True, shuffle=False)
    fit(tmp_path, DigitsCNN(), callback, datamodule, logger=logger, max_steps=2)
    [finding] = [f for f in callback.findings if f.check == "data.wrong_scale"]
    assert "Normalize(mean=[" in finding.hint and "per channel" in finding.hint
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    assert "data/inputs" in events.Tags()["images"]
    [image] = events.Images("data/inputs")
    assert (image.width, image.height) == (4 * 34, 4 * 34)  # 16 digits of 8x8 upscaled 4x, 4 per row, 1px border
    assert "data/input_labels/text_summary" in events.Tags()["tensors"]
    for tag in ("data/input_mean", "data/input_std", "data/input_min", "data/input_max"):
        assert tag in events.Tags()["scalars"]


def test_the_grid_shows_the_exact_tensors_fed_to_the_model():
    images = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    grid, low, high = _grid_image(images.numpy())
    assert (low, high) == (0.0, 127.0)
    assert grid.dtype.name == "uint8" and grid.shape == (34, 68, 3)
    # pixel (0, 0) of image 0 is the minimum (black), the last pixel of image 1 the maximum (white)
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[32, 66].tolist() == [255, 255, 255]


def test_a_1_to_20_class_imbalance_is_flagged_with_weights_and_log_priors(tmp_path):
    pl.seed_everything(0)
    images, labels = imbalanced_binary(ratio=20)
    callback = DataInspector(num_batches=8)
    fit(tmp_path, DigitsMLP(num_classes=2), callback, loader(images, labels))
    [finding] = [f for f in callback.findings if f.severity != "info"]
    assert finding.check == "data.class_imbalance"
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    expected = torch.bincount(shuffled[: 8 * 64], minlength=2).tolist()  # exactly the first 8 batches
    assert finding.data["class_counts"] == expected
    assert 12 < finding.data["ratio"] < 35
    assert "class weights" in finding.hint and "log class priors" in finding.hint
    n0, n1 = expected  # two classes: the single-logit form of the same fix
    assert f"BCEWithLogitsLoss(pos_weight=torch.tensor({n0 / n1:.3g}))" in finding.hint
    assert f"logit(p) = {math.log(n1 / n0):.3g}" in finding.hint


def test_a_1_to_3_imbalance_is_not_flagged(tmp_path):
    pl.seed_everything(0)
    images, labels = imbalanced_binary(ratio=3)
    callback = DataInspector(num_batches=8)
    fit(tmp_path, DigitsMLP(num_classes=2), callback, loader(images, labels))
    assert warnings_of(callback) == []
    assert 2 < callback.result["imbalance_ratio"] < 4.5


class NextToken(pl.LightningModule):
    """An embedding and a linear head predicting a label per token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return torch.nn.functional.cross_entropy(self.head(self.embed(tokens)).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_token_labels_skewed_like_language_are_an_info_not_an_imbalance_warning(tmp_path):
    """Labels per token follow Zipf's law (the commonest token 50x the rarest here): natural, not a sampling bug.
    The same counts as one label per example stay a warning (above)."""
    pl.seed_everything(0)
    vocab, generator = 50, torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    tokens = torch.multinomial(zipf, 512 * 16, replacement=True, generator=generator).reshape(512, 16)
    callback = DataInspector(num_batches=8, num_classes=vocab)
    fit(tmp_path, NextToken(vocab), callback, DataLoader(TensorDataset(tokens, tokens.roll(-1, 1)), batch_size=64))
    assert warnings_of(callback) == []
    [finding] = [f for f in callback.findings if f.check == "data.class_imbalance"]
    assert finding.severity == "info" and finding.data["per_position"] and finding.data["ratio"] >= 10
    assert "Zipf" in finding.message


def test_token_ids_that_never_occur_are_counted_apart_from_the_rare_ones(tmp_path):
    """Id 0 is a padding index that is never a target: the message names the rarest id present and counts the
    absent ones, instead of calling id 0 the rare class with an infinite ratio."""
    pl.seed_everything(0)
    vocab, generator = 50, torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, vocab, dtype=torch.float64)
    tokens = 1 + torch.multinomial(zipf, 512 * 16, replacement=True, generator=generator).reshape(512, 16)
    callback = DataInspector(num_batches=8, num_classes=vocab)
    fit(tmp_path, NextToken(vocab), callback, DataLoader(TensorDataset(tokens, tokens.roll(-1, 1)), batch_size=64))
    [finding] = [f for f in callback.findings if f.check == "data.class_imbalance"]
    assert "the rarest class present" in finding.message and "never appears" not in finding.message
    assert "1 of the 50 classes do not appear in the sample" in finding.message


@pytest.mark.parametrize("image_shape", [False, True])
def test_standardised_digits_get_no_warnings(tmp_path, image_shape):
    pl.seed_everything(0)
    callback = DataInspector(num_batches=8, num_classes=10)
    model = DigitsCNN() if image_shape else DigitsMLP()
    fit(tmp_path, model, callback, DigitsDataModule(batch_size=64, image_shape=image_shape))
    assert warnings_of(callback) == []
    assert callback.result["status"] == "ok"
    assert callback.result["median_mean_over_std"] < 0.3
    assert callback.result["imbalance_ratio"] < 3


# ---------------------------------------------------------------- the other checks
def test_an_offset_that_leaves_the_scale_alone_is_not_centred(tmp_path):
    pl.seed_everything(0)
    images, labels = load_digits_tensors()
    callback = DataInspector(num_batches=4)
    fit(tmp_path, DigitsMLP(), callback, loader(images + 3.0, labels), max_steps=4)
    assert warnings_of(callback) == [("data.not_centred", "warning")]
    assert callback.result["median_mean_over_std"] > 2


def test_nan_in_the_inputs_is_an_error(tmp_path):
    images, labels = load_digits_tensors()
    images[5, 3] = float("nan")
    images[70, 0] = float("inf")
    callback = DataInspector(num_batches=2)
    fit(tmp_path, DigitsMLP(), callback, DataLoader(TensorDataset(images, labels), batch_size=64), max_steps=2)
    [finding] = [f for f in callback.findings if f.check == "data.non_finite"]
    assert finding.severity == "error" and finding.data["non_finite"] == 2
    assert callback.result["input_max"] == pytest.approx(images[:128][torch.isfinite(images[:128])].max().item())


def test_duplicates_and_conflicting_labels_are_found(tmp_path):
    images, labels = load_digits_tensors()
    # 100 examples, then 20 of them again with the same label, then 5 again with a different label
    data_x = torch.cat([images[:100], images[:20], images[20:25]])
    data_y = torch.cat([labels[:100], labels[:20], (labels[20:25] + 1) % 10])
    callback = DataInspector(num_batches=4)
    fit(tmp_path, DigitsMLP(), callback, DataLoader(TensorDataset(data_x, data_y), batch_size=32), max_steps=4)
    by_check = {f.check: f for f in callback.findings}
    assert by_check["data.duplicates"].data == {"duplicates": 25, "examples": 125, "fraction": 0.2}
    assert by_check["data.duplicates"].severity == "warning"
    assert by_check["data.conflicting_labels"].data["conflicts"] == 5


def _repeats_of_independent_draws(weights: torch.Tensor, draws: int) -> float:
    p = weights.double() / weights.double().sum()
    return draws - float((1 - (1 - p) ** draws).sum())


def test_repeats_drawn_by_a_weighted_sampler_are_an_info_with_the_expected_count(tmp_path):
    """The resampling the class_imbalance hint recommends draws with replacement: repeats are by design."""
    pl.seed_everything(0)
    images, labels = load_digits_tensors()
    keep = torch.cat(
        [(labels == 0).nonzero().flatten()] + [(labels == c).nonzero().flatten()[:15] for c in range(1, 10)]
    )
    images, labels = images[keep], labels[keep]  # 178 zeros, 15 of each other digit
    weights = 1.0 / torch.bincount(labels).double()[labels]
    sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=torch.Generator().manual_seed(0))
    callback = DataInspector(num_batches=8)
    fit(tmp_path, DigitsMLP(), callback, DataLoader(TensorDataset(images, labels), batch_size=32, sampler=sampler))
    assert warnings_of(callback) == []
    [finding] = [f for f in callback.findings if f.check == "data.duplicates"]
    expected = _repeats_of_independent_draws(weights, 8 * 32)
    assert finding.severity == "info" and finding.data["sampler"] == "WeightedRandomSampler"
    assert finding.data["expected"] == pytest.approx(expected, rel=1e-9)
    assert 0.8 * expected < finding.data["duplicates"] < 1.2 * expected  # measured 127, expected 121.5
    assert f"about {expected:.1f} expected" in finding.message


def test_a_replacement_sampler_does_not_hide_a_dataset_full_of_copies(tmp_path):
    """RandomSampler(replacement=True) inside a batch_sampler: repeats far beyond its draws stay a warning."""
    pl.seed_everything(0)
    images, labels = load_digits_tensors()
    images, labels = images[:200].repeat(4, 1), labels[:200].repeat(4)  # every example 4 times
    sampler = RandomSampler(range(len(labels)), replacement=True, generator=torch.Generator().manual_seed(0))
    batches = BatchSampler(sampler, batch_size=32, drop_last=False)
    callback = DataInspector(num_batches=8)
    fit(tmp_path, DigitsMLP(), callback, DataLoader(TensorDataset(images, labels), batch_sampler=batches))
    [finding] = [f for f in callback.findings if f.check == "data.duplicates"]
    expected = _repeats_of_independent_draws(torch.ones(800), 8 * 32)
    assert finding.data["sampler"] == "RandomSampler" and finding.data["expected"] == pytest.approx(expected)
    assert finding.data["duplicates"] > 2 * expected + 10 and finding.severity == "warning"
    assert "Deduplicate" in finding.hint


def test_an_epoch_shorter_than_num_batches_is_judged_before_the_examples_repeat(tmp_path):
    pl.seed_everything(0)
    callback = DataInspector(num_batches=8)
    fit(
        tmp_path,
        DigitsMLP(),
        callback,
        DigitsDataModule(batch_size=32),
        max_epochs=2,
        max_steps=-1,
        limit_train_batches=3,
    )
    assert callback.result["batches"] == 3 and callback.result["examples"] == 96
    assert callback.result["duplicates"] == 0
    assert warnings_of(callback) == []


def test_a_batch_without_an_input_tensor_is_an_info_finding(tmp_path):
    callback = DataInspector(num_batches=2, input_fn=lambda batch: None)
    trainer = fit(tmp_path, DigitsMLP(), callback, DigitsDataModule(), max_steps=3)
    assert [(f.check, f.severity) for f in callback.findings] == [("data.not_inspected", "info")]
    assert trainer.global_step == 3


# ---------------------------------------------------------------- monitor rules
def test_training_is_bit_identical_with_and_without_the_inspector(tmp_path):
    def make_model():
        return DigitsMLP(dropout=0.3, batchnorm=True)

    kwargs = dict(max_epochs=2, limit_train_batches=6, limit_val_batches=2)
    without = train_state(tmp_path / "a", make_model, [], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    callback = DataInspector(num_batches=4)
    with_it = train_state(tmp_path / "b", make_model, [callback], datamodule=DigitsDataModule(batch_size=32), **kwargs)
    assert callback.result["batches"] == 4
    assert_bit_identical(without, with_it)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_sees_the_same_inputs(tmp_path, precision):
    pl.seed_everything(0)
    callback = DataInspector(num_batches=2)
    kwargs = {"plugins": [fp16_cpu_plugin()]} if precision == "16-mixed" else {"precision": precision}
    fit(tmp_path, DigitsMLP(), callback, DigitsDataModule(standardize=False), max_steps=2, **kwargs)
    assert warnings_of(callback) == [("data.wrong_scale", "warning")]
    assert callback.result["input_max"] == 16.0


def test_resume_keeps_the_result_and_does_not_inspect_again(tmp_path):
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = DataInspector(num_batches=2)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=3, enable_checkpointing=True)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(standardize=False))
    assert first.result["status"] == "wrong_scale"

    resumed = DataInspector(num_batches=2)
    trainer = quiet_trainer(tmp_path, [resumed], max_steps=6, max_epochs=5)
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 6
    assert resumed.result == first.result
    assert [f.check for f in resumed.findings] == [f.check for f in first.findings]


def test_ddp_sums_the_statistics_of_both_ranks(tmp_path):
    run_ddp_script(
        tmp_path,
        """
        import json, lightning.pytorch as pl
        from lightning_debug.data import DigitsDataModule
        from lightning_debug.data_inspector import DataInspector, _grid_image
        from lightning_debug.zoo import DigitsMLP

        callback = DataInspector(num_batches=3, num_classes=10)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=4, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(batch_size=16, standardize=False))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"result": callback.result, "checks": [f.check for f in callback.findings]}, handle)
        """,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["result"] == ranks[1]["result"]
    assert ranks[0]["result"]["examples"] == 2 * 3 * 16  # both ranks' batches
    assert sum(ranks[0]["result"]["class_counts"]) == 2 * 3 * 16
    assert "data.wrong_scale" in ranks[0]["checks"]
    written = [f["check"] for f in all_findings(tmp_path)]
    assert written.count("data.wrong_scale") == 1  # rank 0 writes once


def test_ddp_inputs_of_a_different_width_per_rank_are_skipped_on_every_rank_without_a_hang(tmp_path):
    """Token ids padded to each batch's longest sequence: one rank's batches are 6 wide, the other's 9."""
    run_ddp_script(
        tmp_path,
        """
        import json, lightning.pytorch as pl, torch
        from torch.utils.data import DataLoader, Dataset
        from lightning_debug.data_inspector import DataInspector

        class Sequences(Dataset):  # the sequences rank 0 draws hold 6 tokens, rank 1's 9
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return (torch.arange(6 + 3 * torch.distributed.get_rank()) * 7 + i) % 50, i % 5

        def collate(items):
            tokens = torch.zeros(len(items), max(len(s) for s, _ in items), dtype=torch.long)
            for k, (s, _) in enumerate(items):
                tokens[k, : len(s)] = s
            return tokens, torch.tensor([t for _, t in items])

        class Bag(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.bag, self.head = torch.nn.EmbeddingBag(50, 8), torch.nn.Linear(8, 5)

            def training_step(self, batch, batch_idx):
                return torch.nn.functional.cross_entropy(self.head(self.bag(batch[0])), batch[1])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        callback = DataInspector(num_batches=1)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=3, callbacks=[callback],
                             default_root_dir=".", enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, logger=False)
        trainer.fit(Bag(), DataLoader(Sequences(), batch_size=4, collate_fn=collate))
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"step": trainer.global_step, "result": callback.result,
                       "findings": [[f.check, f.severity, f.data] for f in callback.findings]}, handle)
        """,
        timeout=120,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["step"] == 3
        assert rank["result"] == {"status": "not_inspected", "batches": 1}
        assert rank["findings"] == [["data.not_inspected", "info", {"width_min": 6, "width_max": 9}]]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_batches": 0}, "num_batches"),
        ({"num_classes": 1}, "num_classes"),
        ({"imbalance_ratio": 1.0}, "imbalance_ratio"),
        ({"max_abs": -1}, "max_abs"),
        ({"center_tol": 0}, "center_tol"),
        ({"max_duplicate_fraction": 1.5}, "max_duplicate_fraction"),
        ({"grid_size": -1}, "grid_size"),
        ({"input_fn": 1}, "input_fn"),
        ({"target_fn": "y"}, "target_fn"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        DataInspector(**kwargs)


def test_token_labels_balanced_among_the_ids_that_occur_are_no_imbalance(tmp_path):
    """Ids 1-9 equally often, id 0 (padding) never a target: no imbalance to report."""
    pl.seed_everything(0)
    tokens = 1 + torch.arange(512 * 18).reshape(512, 18) % 9
    callback = DataInspector(num_batches=8, num_classes=10)
    fit(tmp_path, NextToken(10), callback, DataLoader(TensorDataset(tokens, tokens.roll(-1, 1)), batch_size=64))
    assert [f.check for f in callback.findings if f.check == "data.class_imbalance"] == []
