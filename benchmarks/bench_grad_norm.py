"""Overhead of GradNormMonitor and UpdateRatioMonitor, against no callback and Lightning's ``grad_norm()``.

Not a test: a harness that prints a table. Same model, same data, one process; each configuration trains
``--steps`` optimizer steps after a warm-up run and is repeated ``--repeats`` times (best time kept).

- ``fit`` columns: whole ``trainer.fit`` wall time per step and its ratio to training without a callback.
- ``hook`` columns: time spent inside the callback's own hooks, split into measured steps (one batched
  host transfer) and unmeasured steps (device work only, no host sync).
- the ``grad_norm()`` row: the usual hand-written alternative, ``self.log_dict(grad_norm(self, 2))`` in
  ``on_before_optimizer_step`` every step (one host sync per parameter when logged).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_grad_norm.py --steps 200 --width 512
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm

from lightning_debug import zoo
from lightning_debug.base import DiagnosticCallback
from lightning_debug.data import DigitsDataModule
from lightning_debug.grad_norm import GradNormMonitor
from lightning_debug.update_ratio import UpdateRatioMonitor


class GradNormLogged(zoo.DigitsMLP):
    """The hand-written baseline: Lightning's grad_norm() logged every step."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


def _timed(callback: DiagnosticCallback, hooks: tuple[str, ...]) -> dict[str, list[float]]:
    """Wrap the callback's hooks to record their time, keyed by whether the step was measured."""
    times: dict[str, list[float]] = defaultdict(list)
    for hook in hooks:
        original = getattr(callback, hook)

        def wrapper(trainer: pl.Trainer, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            measured = callback.is_measured_step(trainer)
            start = time.perf_counter()
            out = _original(trainer, *args, **kwargs)
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            times["measured" if measured else "unmeasured"].append(time.perf_counter() - start)
            return out

        setattr(callback, hook, wrapper)
    return times


def _run(make_model: Callable[[], pl.LightningModule], callbacks: list, steps: int, accelerator: str) -> float:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=50,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(make_model(), datamodule=DigitsDataModule(batch_size=64))
    if accelerator == "gpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=512, help="hidden width of the 2-hidden-layer digits MLP")
    parser.add_argument("--every", type=int, default=50, help="every_n_steps of the monitors")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    hidden = (args.width, args.width)

    def plain() -> pl.LightningModule:
        return zoo.DigitsMLP(hidden=hidden)

    configs: list[tuple[str, Callable[[], pl.LightningModule], Callable[[], list]]] = [
        ("no callback", plain, list),
        ("GradNormMonitor", plain, lambda: [GradNormMonitor(every_n_steps=args.every)]),
        ("GradNormMonitor every step", plain, lambda: [GradNormMonitor(every_n_steps=1)]),
        ("UpdateRatioMonitor", plain, lambda: [UpdateRatioMonitor(every_n_steps=args.every)]),
        ("UpdateRatioMonitor every step", plain, lambda: [UpdateRatioMonitor(every_n_steps=1)]),
        ("grad_norm() logged every step", lambda: GradNormLogged(hidden=hidden), list),
    ]
    _run(plain, [], 20, args.accelerator)  # warm-up
    rows = []
    baseline = None
    for name, make_model, make_callbacks in configs:
        best, hook_times = float("inf"), {}
        for _ in range(args.repeats):
            callbacks = make_callbacks()
            times: dict[str, list[float]] = {}
            for cb in callbacks:
                hooks = ("on_before_optimizer_step", "on_train_batch_end")
                times = _timed(cb, hooks if isinstance(cb, UpdateRatioMonitor) else hooks[:1])
            per_step = _run(make_model, callbacks, args.steps, args.accelerator)
            if per_step < best:
                best, hook_times = per_step, times
        baseline = best if baseline is None else baseline
        measured = hook_times.get("measured", [])
        unmeasured = hook_times.get("unmeasured", [])
        rows.append(
            (
                name,
                best * 1e3,
                best / baseline,
                1e6 * sum(measured) / len(measured) if measured else float("nan"),
                1e6 * sum(unmeasured) / len(unmeasured) if unmeasured else float("nan"),
            )
        )
    params = sum(p.numel() for p in plain().parameters())
    print(
        f"\ndigits MLP hidden={hidden} ({params:,} parameters), {args.steps} steps, {args.accelerator}, best of "
        f"{args.repeats}, monitors every {args.every} steps"
    )
    print(
        f"{'configuration':32s} {'ms/step':>8s} {'x none':>7s} {'hook us (measured)':>19s} "
        f"{'hook us (unmeasured)':>21s}"
    )
    for name, ms, ratio, hook_measured, hook_unmeasured in rows:
        print(f"{name:32s} {ms:8.3f} {ratio:7.3f} {hook_measured:19.1f} {hook_unmeasured:21.1f}")


if __name__ == "__main__":
    main()
