"""Writing findings as they happen, and the end-of-run report."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_debug.findings import SEVERITIES, Finding

FINDINGS_FILE = "findings.jsonl"
REPORT_FILE = "report.json"
OUTPUT_SUBDIR = "lightning-debug"  # not importable: a run in a source tree cannot shadow the package
_OUTPUT_NAMES = (OUTPUT_SUBDIR, "lightning_debug")  # and the name earlier versions wrote


def append_finding(path: Path, finding: Finding) -> None:
    """Append one finding as a JSON line and flush it to disk at once, so a crash loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(finding.to_json() + "\n")
        handle.flush()


def read_findings(path: str | Path) -> list[Finding]:
    """Read a ``findings.jsonl`` file back; a truncated last line (a killed run) is ignored."""
    raws = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            raws.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return parse_findings(raws)


def parse_findings(raws: Iterable[Any]) -> list[Finding]:
    """The findings among ``raws`` (dicts as ``Finding.to_dict`` writes them); anything else is left out."""
    findings = []
    for raw in raws:
        try:
            findings.append(Finding.from_dict(raw))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return findings


def merge_findings(findings: Sequence[Finding], more: Iterable[Finding]) -> list[Finding]:
    """``findings`` followed by those of ``more`` not among them (each once, in order)."""
    merged = list(findings)
    seen = {finding.to_json() for finding in merged}
    for finding in more:
        if finding.to_json() not in seen:
            seen.add(finding.to_json())
            merged.append(finding)
    return merged


def build_report(
    findings: Sequence[Finding], status: str, summaries: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The report as a JSON-serialisable dict: status, counts per severity, findings, per-callback summaries."""
    counts = Counter(f.severity for f in findings)
    ordered = sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), f.step))
    return {
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": {severity: counts.get(severity, 0) for severity in SEVERITIES},
        "findings": [f.to_dict() for f in ordered],
        "summaries": summaries or {},
    }


def format_report(report: dict[str, Any], title: str = "lightning_debug report") -> str:
    """A console table: one row per finding, most severe first, each followed by its fix."""
    counts = report["counts"]
    head = (
        f"{title} — status: {report['status']} — "
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
    )
    findings = [Finding.from_dict(raw) for raw in report["findings"]]
    if not findings:
        return f"{head}\n  No problems found."
    rows = [("SEVERITY", "STEP", "SOURCE", "CHECK")] + [
        (f.severity.upper(), str(f.step), f.source, f.check) for f in findings
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head, "  " + "  ".join(cell.ljust(w) for cell, w in zip(rows[0], widths))]
    for row, finding in zip(rows[1:], findings):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        lines.append(f"      {finding.message}")
        lines.append(f"      fix: {finding.hint}")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, for TensorBoard's text dashboard."""
    counts = report["counts"]
    lines = [
        f"**status:** {report['status']} — {counts['error']} error(s), "
        f"{counts['warning']} warning(s), {counts['info']} info",
        "",
    ]
    if not report["findings"]:
        lines.append("No problems found.")
    else:
        lines += ["| severity | step | source | check | message | fix |", "|---|---|---|---|---|---|"]
        for raw in report["findings"]:
            cells = [raw["severity"], str(raw["step"]), raw["source"], raw["check"], raw["message"], raw["hint"]]
            # a message quoting a user's exception may hold line breaks: a table row must stay on one line
            lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", "<br>") for cell in cells) + " |")
    return "\n".join(lines)


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return path


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``lightning-debug`` output directory (holding findings.jsonl or report.json) at or below ``paths``."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path.parent)
        elif path.is_dir():
            found.update(p.parent for name in (FINDINGS_FILE, REPORT_FILE) for p in path.rglob(name))
    return sorted(d for d in found if d.name in _OUTPUT_NAMES or (d / FINDINGS_FILE).exists())
