import subprocess
import sys
from pathlib import Path

import yaml
from helpers import all_findings

import lightning_debug
from lightning_debug import DiagnosticCallback

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_lightning_cli_configures_every_callback_from_the_example_yaml(tmp_path):
    config = REPO_ROOT / "examples" / "config.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "cli.py"),
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    configured = {cb["class_path"].split(".")[-1] for cb in yaml.safe_load(config.read_text())["trainer"]["callbacks"]}
    public = {getattr(lightning_debug, name) for name in lightning_debug.__all__}
    callbacks = {obj.__name__ for obj in public if isinstance(obj, type) and issubclass(obj, DiagnosticCallback)}
    assert configured == callbacks - {"DiagnosticCallback"}
    assert "init_loss.too_high" in {row["check"] for row in all_findings(tmp_path)}


def test_train_digits_example_prints_the_report(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "train_digits.py"),
            "--epochs",
            "1",
            "--last-layer-scale",
            "60",
            "--logdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "lightning_debug report" in proc.stdout and "init_loss.too_high" in proc.stdout
    assert f"tensorboard --logdir {tmp_path}" in proc.stdout
