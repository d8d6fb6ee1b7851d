"""The bug zoo: one healthy model and classic broken ones on the digits data, every check on.

``lightning-debug demo`` trains each, then prints what the suite diagnosed next to the bug that was
planted. It is the quickest way to see what each callback says — and a regression test of the suite:
each planted bug must be caught by the callback meant for it, and the healthy run must stay silent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_debug.base import DiagnosticCallback
from lightning_debug.data import DigitsDataModule
from lightning_debug.preset import suite
from lightning_debug.zoo import DigitsCNN, DigitsMLP, DigitsRNN, DigitsRowRNN


@dataclass(frozen=True)
class Bug:
    """A planted bug: the model and data that carry it, and the checks that should catch it."""

    name: str
    planted: str
    make_model: Callable[[], pl.LightningModule]
    expected_checks: tuple[str, ...]
    make_data: Callable[[], pl.LightningDataModule] = DigitsDataModule
    max_epochs: int = 3
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


BUGS: dict[str, Bug] = {
    bug.name: bug
    for bug in [
        Bug("healthy", "nothing: a well-initialised MLP, SGD lr=0.05", DigitsMLP, ()),
        Bug(
            "init_too_large",
            "final layer initialised 60x too large",
            lambda: DigitsMLP(last_layer_scale=60.0),
            ("init_loss.too_high",),
        ),
        Bug(
            "lr_too_high",
            "SGD lr=10 (NaN within a few steps)",
            lambda: DigitsMLP(lr=10.0),
            ("nan_guard.nonfinite_loss", "nan_guard.nonfinite_grad", "nan_guard.backoff", "nan_guard.halt"),
        ),
        Bug(
            "dead_relu",
            "F.relu hidden layers with biases initialised to -4",
            lambda: DigitsMLP(hidden_bias=-4.0),
            ("activations.dead",),
        ),
        Bug(
            "saturated_tanh",
            "torch.tanh hidden layers with weights scaled 12x",
            lambda: DigitsMLP(activation="tanh", weight_scale=12.0),
            ("activations.saturated",),
        ),
        Bug(
            "lr_too_low",
            "Adam lr=1e-7",
            lambda: DigitsMLP(optimizer="adam", lr=1e-7),
            ("update_ratio.too_small",),
        ),
        Bug(
            "lr_decay_early",
            "an epoch-sized StepLR (LR x0.1 every 30) stepped every batch: the LR is ~0 after a fifth of the run",
            lambda: DigitsMLP(lr_lambda=lambda step: 0.1 ** (step // 30)),
            ("update_ratio.lr_decayed_early",),
            max_epochs=15,
        ),
        Bug(
            "detached_layer",
            "a .detach() after the first layer freezes it",
            lambda: DigitsMLP(detach_first=True),
            ("grad_norm.no_grad",),
        ),
        Bug(
            "exploding_rnn",
            "a ReLU RNN fed 5 corrupted records (pixels 500x too large), no gradient clipping",
            lambda: DigitsRNN(lr=0.01, nonlinearity="relu"),
            ("grad_norm.spike",),
            make_data=lambda: DigitsDataModule(batch_size=32, corrupt_records=5),
            max_epochs=2,
        ),
        Bug(
            "collapse",
            "the inputs are multiplied by a mask of zeros: the model can only learn the majority class",
            lambda: DigitsMLP(input_mask=0.0),
            ("predictions.collapsed",),
            max_epochs=6,
        ),
        Bug(
            "raw_pixels",
            "inputs left in raw 0-16 pixel units (no standardisation)",
            DigitsMLP,
            ("data.wrong_scale",),
            make_data=lambda: DigitsDataModule(standardize=False),
        ),
        Bug(
            "batch_mixing",
            "a .view where a .permute belongs: each sequence is stitched from rows of different examples",
            lambda: DigitsRowRNN(view_bug=True),
            ("batch_mixing.detected",),
        ),
        Bug(
            "bn_small_batch",
            "a CNN with BatchNorm trained on batches of 4 images: batch statistics from 4 examples",
            DigitsCNN,
            ("batchnorm.small_batch",),
            make_data=lambda: DigitsDataModule(batch_size=4, image_shape=True),
            max_epochs=1,
        ),
        Bug(
            "softmax_twice",
            "forward ends with a softmax and training_step passes its output to F.cross_entropy",
            lambda: DigitsMLP(output_softmax=True),
            ("loss_fn.softmax_before_cross_entropy",),
            max_epochs=1,
        ),
        Bug(
            "fp16_adam_eps",
            "precision='16-true' (float16 weights) with Adam's default eps=1e-8",
            lambda: DigitsMLP(optimizer="adam", lr=1e-3),
            ("update_ratio.eps_underflow",),
            max_epochs=1,
            trainer_kwargs={"precision": "16-true"},
        ),
        Bug(
            "bad_init",
            "hidden weights initialised 20x too large",
            lambda: DigitsMLP(weight_scale=20.0),
            ("weight_stats.bad_init",),
        ),
        Bug(
            "overfit",
            "a wide MLP trained with Adam on only 100 examples",
            lambda: DigitsMLP(hidden=(256, 256), optimizer="adam", lr=1e-2),
            ("loss_curve.overfitting",),
            make_data=lambda: DigitsDataModule(batch_size=50, train_size=100),
            max_epochs=12,
        ),
    ]
}


def list_bugs() -> str:
    width = max(len(name) for name in BUGS)
    return "\n".join(f"{name.ljust(width)}  {bug.planted}" for name, bug in BUGS.items())


def run_bug(bug: Bug, logdir: Path, seed: int = 0) -> dict[str, Any]:
    """Train one model of the zoo with every callback on; return what was diagnosed."""
    pl.seed_everything(seed, verbose=False)
    callbacks = suite(num_classes=10)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=bug.max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=bug.name),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **bug.trainer_kwargs,
    )
    started = time.perf_counter()
    trainer.fit(bug.make_model(), datamodule=bug.make_data())
    findings = [f for cb in callbacks if isinstance(cb, DiagnosticCallback) for f in cb.findings]
    diagnosed = sorted({f.check for f in findings if f.severity != "info"})
    caught = not diagnosed if not bug.expected_checks else any(c in diagnosed for c in bug.expected_checks)
    return {
        "bug": bug.name,
        "planted": bug.planted,
        "expected": list(bug.expected_checks),
        "diagnosed": diagnosed,
        "caught": caught,
        "seconds": round(time.perf_counter() - started, 1),
        "log_dir": trainer.log_dir,
        "findings": [f.to_dict() for f in findings],
    }


def run_demo(names: Sequence[str], logdir: Path, write_json: bool = False) -> int:
    """Run the named bugs, print the diagnosis table; 0 when every bug was caught as planted."""
    results = []
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name}: {BUGS[name].planted} ...", flush=True)
        result = run_bug(BUGS[name], logdir)
        results.append(result)
        verdict = "as expected" if result["caught"] else "MISSED"
        print(f"        {result['seconds']}s, diagnosed: {', '.join(result['diagnosed']) or 'nothing'} ({verdict})")
    print("\n" + format_results(results))
    print(f"\nLook at the runs: tensorboard --logdir {logdir}")
    if write_json:
        (logdir / "demo.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["caught"] for r in results) else 1


def format_results(results: Sequence[dict[str, Any]]) -> str:
    """One block per bug: verdict, name and planted bug, then what the suite diagnosed."""
    width = max(len(r["bug"]) for r in results)
    lines = []
    for r in results:
        verdict = "ok    " if r["caught"] else "MISSED"
        lines.append(f"{verdict}  {r['bug'].ljust(width)}  planted: {r['planted']}")
        expected = f" (meant to be caught by: {', '.join(r['expected'])})" if r["expected"] else ""
        lines.append(f"        {' ' * width}  diagnosed: {', '.join(r['diagnosed']) or 'no warnings'}{expected}")
    caught = sum(r["caught"] for r in results)
    lines.append(f"\n{caught}/{len(results)} runs diagnosed as planted.")
    return "\n".join(lines)
