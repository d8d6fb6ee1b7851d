"""The findings contract: one observation a person can act on."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One diagnosis, stable and JSON-serialisable.

    Args:
        source: the callback class name that observed it, e.g. ``"GradNormMonitor"``.
        check: a stable id ``"<area>.<condition>"``, e.g. ``"init_loss.too_high"``.
        severity: ``"info"``, ``"warning"`` (training is likely wasting compute) or ``"error"``
            (training is broken or was halted).
        step: the trainer's global step at which it was observed.
        message: what was measured against what was expected, with numbers.
        hint: the concrete change to make, with a value where one can be computed.
        data: the numbers behind it (JSON-serialisable; non-finite floats are written as strings).

    Raises:
        ValueError: if ``severity`` is not one of ``"info"``, ``"warning"``, ``"error"``, or
            ``check`` is not of the form ``"<area>.<condition>"``.
    """

    source: str
    check: str
    severity: Severity
    step: int
    message: str
    hint: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}")
        if "." not in self.check:
            raise ValueError(f"`check` must look like '<area>.<condition>', got {self.check!r}")
        object.__setattr__(self, "data", _json_safe(self.data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Finding:
        return cls(
            source=str(raw["source"]),
            check=str(raw["check"]),
            severity=raw["severity"],
            step=int(raw["step"]),
            message=str(raw["message"]),
            hint=str(raw["hint"]),
            data=dict(raw.get("data") or {}),
        )

    def format(self) -> str:
        """One readable paragraph: what, where, and the fix."""
        return f"[{self.severity}] {self.source} {self.check} @ step {self.step}: {self.message}\n    fix: {self.hint}"


def _json_safe(value: Any) -> Any:
    """Make ``value`` strictly JSON-serialisable (tensors and numpy scalars become numbers, NaN a string)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return str(value)
