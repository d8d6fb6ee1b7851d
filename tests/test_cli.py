import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_debug import Finding
from lightning_debug.cli import main
from lightning_debug.dashboard import LAYOUT
from lightning_debug.demo import BUGS, run_demo
from lightning_debug.report import append_finding


def test_demo_diagnoses_the_planted_bug_and_leaves_the_healthy_run_silent(tmp_path, capsys):
    code = run_demo(["healthy", "init_too_large"], tmp_path, write_json=True)
    assert code == 0
    results = {r["bug"]: r for r in json.loads((tmp_path / "demo.json").read_text())}
    assert results["healthy"]["diagnosed"] == []
    assert "init_loss.too_high" in results["init_too_large"]["diagnosed"]
    out = capsys.readouterr().out
    assert "[1/2] healthy" in out and f"tensorboard --logdir {tmp_path}" in out


def test_demo_writes_the_dashboard_layout_into_the_run(tmp_path):
    run_demo(["healthy"], tmp_path)
    [run_dir] = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0].decode(errors="replace")
    for category in LAYOUT:
        assert category in layout


def test_demo_list_names_every_bug(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUGS)


def test_unknown_bug_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--bug", "no_such_bug"])
    assert exit_info.value.code == 2


def write_run(root, severities):
    out = root / "lightning-debug"
    for step, severity in enumerate(severities):
        append_finding(
            out / "findings.jsonl",
            Finding("X", f"area.c{step}", severity, step, f"measured {step}", "do this"),
        )
    (out / "report.json").write_text(json.dumps({"status": "completed"}))


def test_report_exits_1_when_any_run_has_an_error_finding(tmp_path, capsys):
    write_run(tmp_path / "a", ["warning"])
    assert main(["report", str(tmp_path)]) == 0
    write_run(tmp_path / "b", ["info", "error"])
    assert main(["report", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "area.c1" in out and "fix: do this" in out


def test_report_json_is_machine_readable(tmp_path, capsys):
    write_run(tmp_path / "a", ["error"])
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["has_errors"] is True
    assert payload["runs"][0]["counts"] == {"info": 0, "warning": 0, "error": 1}


def test_report_takes_the_findings_report_json_holds_that_findings_jsonl_lacks(tmp_path, capsys):
    write_run(tmp_path / "a", ["warning"])
    before = Finding("X", "area.before", "error", 1, "found before a resume", "do that")
    report = {"status": "completed", "findings": [before.to_dict()]}
    (tmp_path / "a" / "lightning-debug" / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["runs"][0]["counts"] == {"info": 0, "warning": 1, "error": 1}


def test_report_finds_a_healthy_run_written_under_the_earlier_folder_name(tmp_path, capsys):
    old = tmp_path / "old" / "lightning_debug"  # earlier versions' folder; a healthy run has no findings.jsonl
    old.mkdir(parents=True)
    (old / "report.json").write_text(json.dumps({"status": "completed", "findings": []}))
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["counts"] == {"info": 0, "warning": 0, "error": 0}


def test_report_survives_a_truncated_report_json_and_odd_lines(tmp_path, capsys):
    write_run(tmp_path / "a", ["warning"])
    out = tmp_path / "a" / "lightning-debug"
    (out / "report.json").write_text('{"status": "comp')
    with (out / "findings.jsonl").open("a") as handle:
        handle.write("[1, 2]\n" + json.dumps({"source": "X"}) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "report.json unreadable" in text and "1 warning(s)" in text


def test_report_survives_a_report_json_whose_findings_are_not_a_list(tmp_path, capsys):
    write_run(tmp_path / "a", ["warning"])
    (tmp_path / "a" / "lightning-debug" / "report.json").write_text(json.dumps({"status": "completed", "findings": 7}))
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["counts"] == {"info": 0, "warning": 1, "error": 0}


def test_report_on_a_directory_without_runs_exits_2(tmp_path):
    assert main(["report", str(tmp_path)]) == 2


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "lightning_debug", "demo", "--list"], capture_output=True, text=True)
    assert proc.returncode == 0 and "healthy" in proc.stdout


def test_every_planted_bug_is_caught_by_the_check_meant_for_it_and_the_healthy_run_stays_silent(tmp_path):
    assert run_demo(list(BUGS), tmp_path, write_json=True) == 0
    results = {r["bug"]: r for r in json.loads((tmp_path / "demo.json").read_text())}
    assert set(results) == set(BUGS)
    assert results["healthy"]["diagnosed"] == []
    for name, bug in BUGS.items():
        assert set(bug.expected_checks) & set(results[name]["diagnosed"]) or not bug.expected_checks, name
