import json
import math

import pytest

from lightning_debug import Finding
from lightning_debug.report import build_report, format_markdown, format_report, read_findings


def make(severity="warning", step=3, **kw):
    return Finding(source="X", check="area.cond", severity=severity, step=step, message="m 1.0 vs 2.0", hint="h", **kw)


def test_finding_round_trips_through_json():
    finding = make(data={"ratio": 2.5, "names": ("a", "b")})
    restored = Finding.from_dict(json.loads(finding.to_json()))
    assert restored == Finding.from_dict(finding.to_dict())
    assert restored.data == {"ratio": 2.5, "names": ["a", "b"]}


def test_non_finite_and_tensor_data_become_json_safe():
    import torch

    finding = make(data={"loss": math.nan, "norms": torch.tensor([1.0, 2.0]), "inf": math.inf})
    assert json.loads(finding.to_json())["data"] == {"loss": "nan", "norms": [1.0, 2.0], "inf": "inf"}


@pytest.mark.parametrize("kwargs, name", [({"severity": "fatal"}, "severity"), ({"check": "nodot"}, "check")])
def test_bad_fields_raise_value_error_naming_the_field(kwargs, name):
    base = dict(source="X", check="a.b", severity="info", step=0, message="m", hint="h")
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        Finding(**base)


def test_report_orders_errors_first_and_counts_severities():
    report = build_report([make("info", 1), make("error", 9), make("warning", 2)], "completed")
    assert [f["severity"] for f in report["findings"]] == ["error", "warning", "info"]
    assert report["counts"] == {"info": 1, "warning": 1, "error": 1}
    text = format_report(report)
    assert "status: completed" in text and "fix: h" in text
    assert "| error | 9 |" in format_markdown(report)


def test_markdown_report_keeps_each_finding_on_one_table_row():
    finding = Finding("X", "a.b", "info", 3, "training_step raised ValueError: bad shape\nexpected (N, C)", "h | k")
    text = format_markdown(build_report([finding], "completed"))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 3  # header, rule, the one finding
    assert "bad shape<br>expected (N, C)" in table[2] and "h \\| k" in table[2]


def test_read_findings_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "findings.jsonl"
    path.write_text(make().to_json() + "\n" + '{"source": "X", "che')
    assert read_findings(path) == [make()]
