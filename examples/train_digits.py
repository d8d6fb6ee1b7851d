"""Train an MLP on scikit-learn's bundled digits with every lightning_debug check on.

    python examples/train_digits.py                      # healthy run: the report finds nothing
    python examples/train_digits.py --last-layer-scale 60  # a too-confident init: InitLossCallback warns

Then look at the run: tensorboard --logdir runs/digits
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_debug
from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--last-layer-scale", type=float, default=1.0)
    parser.add_argument("--logdir", default="runs/digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=lightning_debug.suite(num_classes=10),
        logger=TensorBoardLogger(args.logdir, name=""),
        log_every_n_steps=10,
        enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(lr=args.lr, last_layer_scale=args.last_layer_scale), DigitsDataModule())
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
