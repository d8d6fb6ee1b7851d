"""Shared test helpers: real Trainers on real data, DDP runs as subprocesses, exact state comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_debug import zoo
from lightning_debug.data import DigitsDataModule

REPO_ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(tmp_path: Path, callbacks: Sequence[Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar, model summary or checkpoints, logging into ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def fp16_cpu_plugin(init_scale: float = 2.0**40) -> MixedPrecision:
    """16-mixed with a real GradScaler on CPU; the huge init_scale overflows during the first steps."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def train_state(
    tmp_path: Path,
    make_model: Callable[[], pl.LightningModule],
    callbacks: Sequence[Callback] = (),
    datamodule: pl.LightningDataModule | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Seed, build, train; return a copy of the final ``state_dict``."""
    pl.seed_everything(seed, workers=True)
    model = make_model()
    trainer = quiet_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{key} differs: max |diff| = {(a[key].double() - b[key].double()).abs().max()}"
        )


# Gloo's worker threads can still hold tensors when the interpreter finalizes without destroy_process_group(); freeing
# them then needs the GIL and aborts the process ("terminate called without an active exception", exit -6) now and
# then. Reached only when the script's own code ran through.
_DDP_FOOTER = """

import torch.distributed as _dist

if _dist.is_available() and _dist.is_initialized():
    _dist.destroy_process_group()
"""


def run_ddp_script(tmp_path: Path, body: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (a Python script using ``strategy="ddp", devices=2``) in a subprocess.

    Lightning re-executes ``sys.argv`` for the second rank, so DDP cannot run inside pytest itself.
    The script runs with ``cwd=tmp_path``; fails the test with the output when it exits non-zero.
    """
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(body) + _DDP_FOOTER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"DDP script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def two_digits_loaders(batch_size: int = 64) -> dict[str, Any]:
    """A dict of two training loaders (``fit(train_dataloaders=...)``): ``training_step`` gets a dict of batches."""
    datamodule = DigitsDataModule(batch_size=batch_size)
    datamodule.setup()
    return {"digits": datamodule.train_dataloader(), "again": datamodule.train_dataloader()}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def findings_files(root: Path) -> list[Path]:
    return sorted(root.rglob("lightning-debug/findings.jsonl"))


def all_findings(root: Path) -> list[dict[str, Any]]:
    return [row for path in findings_files(root) for row in read_jsonl(path)]


class SparseEmbedding(pl.LightningModule):
    """Pixels (0..16) as tokens through ``nn.Embedding(sparse=True)``: SGD gets sparse (COO) gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(17, 8, sparse=True)
        self.head = torch.nn.Linear(64 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(x.long().clamp(0, 16)).flatten(1)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class OneCycleSGD(zoo.DigitsMLP):
    """SGD with Nesterov momentum under OneCycleLR (max_lr 0.2): trains the digits MLP to a training loss of ~0.001."""

    def __init__(self, total_steps: int | None = None) -> None:
        super().__init__()
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LBFGSDigits(zoo.DigitsMLP):
    """DigitsMLP under LBFGS (3 iterations per step), automatic or manual: Lightning calls on_before_optimizer_step
    after each closure evaluation."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        x, y = batch

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss

        return optimizer.step(closure=closure)

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


class AlternatingHeads(zoo.DigitsMLP):
    """Two tasks, one head each: ``head`` on even steps, ``odd_head`` on odd ones. Both heads train (on every other
    step); a cadence of 2 steps (the default, ``2 * log_every_n_steps``, is always even) measures even steps only."""

    def __init__(self) -> None:
        super().__init__()
        self.odd_head = torch.nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        for layer in self.layers:
            x = torch.relu(layer(x))
        head = self.head if self.global_step % 2 == 0 else self.odd_head
        return torch.nn.functional.cross_entropy(head(x), y)
