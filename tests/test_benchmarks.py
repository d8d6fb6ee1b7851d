"""Smoke test of the benchmark harness (benchmarks/run.py): it runs and fills its tables. No timing thresholds."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
CONFIGS = ["none", "suite", "GradNormMonitor", "NaNGuard", "grad_norm() log_dict", "detect_anomaly"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lightning_debug_benchmarks_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_fills_the_tables(tmp_path: Path, bench) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    payload = bench.main(
        [
            "--models", "mlp", "--configs", ",".join(CONFIGS), "--rounds", "1", "--steps", "12", "--warmup", "2",
            "--every", "5", "--threads", "1", "--sweep-sizes", "2e5", "--sweep-configs", "none,suite",
            "--sweep-steps", "6", "--sweep-warmup", "2", "--json", str(out_json), "--markdown", str(out_md),
        ]
    )  # fmt: skip
    summary = payload["summary"]["mlp"]
    assert set(summary) == set(CONFIGS)
    for config, row in summary.items():
        for column in ("ratio_all", "ratio_unmeasured", "ratio_measured", "step_ms"):
            value = row[column]["median"]
            assert math.isfinite(value) and value > 0, (config, column, value)
    assert summary["none"]["ratio_all"]["median"] == 1.0
    assert summary["suite"]["extra"]["nan_guard_snapshot_bytes"] > 0
    assert summary["suite"]["extra"]["update_ratio_copy_bytes"] == summary["none"]["param_bytes"] > 0
    runs = payload["runs"]
    assert len(runs) == len(CONFIGS)
    assert all(len(r["step_ms"]) == 12 and any(r["measured"]) and not all(r["measured"]) for r in runs)

    table = out_md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for config in CONFIGS:
        assert any(line.startswith(f"| {config} | ") for line in rows), config
    assert "## Size sweep" in table and "## Memory held by the callbacks" in table
    sweep = payload["sweep"]
    assert {r["config"] for r in sweep} == {"none", "suite"}
    assert all(r["step_ms_mean"] > 0 and r["peak_rss_bytes"] > 0 and r["params"] > 0 for r in sweep)
    assert json.loads(out_json.read_text())["summary"]["mlp"].keys() == summary.keys()
