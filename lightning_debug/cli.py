"""The ``lightning-debug`` command: ``demo`` (the bug zoo) and ``report`` (read runs' findings)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_debug.report import (
    FINDINGS_FILE,
    REPORT_FILE,
    build_report,
    find_run_dirs,
    format_report,
    merge_findings,
    parse_findings,
    read_findings,
)


def report_command(paths: Sequence[str], as_json: bool) -> int:
    """Print the findings of every run at or below ``paths``; 1 when any error-level finding exists."""
    run_dirs = find_run_dirs(paths)
    runs: list[dict[str, Any]] = []
    for directory in run_dirs:
        saved = _read_saved_report(directory / REPORT_FILE)
        status = str(saved.get("status", "unknown (no report.json: still running?)"))
        written = read_findings(directory / FINDINGS_FILE) if (directory / FINDINGS_FILE).exists() else []
        # report.json lists the whole run's findings when it ended; findings.jsonl those written as they happened
        # (all of them, or those up to a crash): the union, each once
        listed = saved.get("findings", [])
        findings = merge_findings(written, parse_findings(listed if isinstance(listed, list) else []))
        run = build_report(findings, status)
        run["run"] = str(directory.parent)
        runs.append(run)
    has_errors = any(run["counts"]["error"] for run in runs)
    if as_json:
        print(json.dumps({"runs": runs, "has_errors": has_errors}, indent=2))
    elif not runs:
        print(f"No lightning_debug runs (findings.jsonl or report.json) under: {', '.join(paths)}")
    else:
        for run in runs:
            print(format_report(run, title=run["run"]))
            print()
    if not run_dirs:
        return 2
    return 1 if has_errors else 0


def _read_saved_report(path: Path) -> dict[str, Any]:
    """``report.json`` as a dict; empty when missing, and a status saying so when unreadable (a run killed while
    writing it)."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"status": f"unknown (report.json unreadable: {type(err).__name__})"}
    return saved if isinstance(saved, dict) else {"status": "unknown (report.json is not a JSON object)"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-debug", description="Training diagnosis for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train healthy and broken models on the digits data and show the diagnosis")
    demo.add_argument("--bug", action="append", help="run only this bug (repeatable); see --list")
    demo.add_argument("--list", action="store_true", help="list the planted bugs and exit")
    demo.add_argument("--logdir", default="runs/demo", help="where TensorBoard logs go (default: runs/demo)")
    demo.add_argument("--json", action="store_true", help="also write the results as JSON to LOGDIR/demo.json")

    report = commands.add_parser("report", help="print the findings of runs from their findings files")
    report.add_argument("logdir", nargs="+", help="run directories or findings.jsonl files")
    report.add_argument("--json", action="store_true", help="machine-readable output")

    args = parser.parse_args(argv)
    if args.command == "report":
        return report_command(args.logdir, args.json)
    import torch

    from lightning_debug.demo import BUGS, list_bugs, run_demo

    torch.set_num_threads(1)  # the zoo's models are tiny: more threads only add contention

    if args.list:
        print(list_bugs())
        return 0
    unknown = [name for name in args.bug or [] if name not in BUGS]
    if unknown:
        parser.error(f"unknown --bug {', '.join(unknown)}; choose from: {', '.join(BUGS)}")
    return run_demo(args.bug or list(BUGS), Path(args.logdir), write_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
