"""Real data with no download: scikit-learn's bundled digits (1797 8x8 images, 10 classes).

Used by the examples, the demo and the tests. Requires scikit-learn (``pip install lightning-debug[examples]``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images (N, 64) float32, labels (N,) int64)``; pixels are 0..16 unless standardised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits data needs scikit-learn: pip install 'lightning-debug[examples]'") from err
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if standardize:
        images = (images - images.mean(0)) / (images.std(0) + 1e-6)
    return images, labels


class DigitsDataModule(pl.LightningDataModule):
    """Digits split 1497 train / 300 validation, flat (64 features) or as ``(1, 8, 8)`` images.

    Args:
        batch_size: examples per batch.
        image_shape: yield ``(N, 1, 8, 8)`` images instead of flat vectors.
        standardize: centre and scale every pixel (False leaves the raw 0..16 pixel units).
        shuffle: shuffle the training set each epoch.
        seed: the seed of the fixed train/validation split.
        corrupt_records: multiply the pixels of this many training records by ``corrupt_factor`` (a planted
            data bug: a handful of records in the wrong units).
        corrupt_factor: how much too large the corrupted records are.
        train_size: keep only this many training examples (None: all 1497); a tiny set invites overfitting.
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_shape: bool = False,
        standardize: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        corrupt_records: int = 0,
        corrupt_factor: float = 500.0,
        train_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.image_shape = image_shape
        self.standardize = standardize
        self.shuffle = shuffle
        self.seed = seed
        self.corrupt_records = corrupt_records
        self.corrupt_factor = corrupt_factor
        self.train_size = train_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.standardize)
        if self.image_shape:
            images = images.reshape(-1, 1, 8, 8)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train, val = order[300:], order[:300]
        if self.train_size is not None:
            train = train[: self.train_size]
        if self.corrupt_records:
            images = images.clone()
            images[train[: self.corrupt_records]] *= self.corrupt_factor
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size)
