"""The result of one verification check, how a list of them is shown, and the ONNX Runtime tolerances.

Shared by :mod:`permcompile.export.verify` and :mod:`permcompile.export.verify_quant` (and the pipeline's
verify step), so that neither verifier imports the other for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import VerificationError

# max |onnx - torch| / max |torch| allowed, by export precision
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    value: float | None = None


def aggregate(name: str, total: int, bad: list[str], ok_detail: str) -> Check:
    """One check over ``total`` layers: failed with the first three of ``bad`` shown, else ``ok_detail``."""
    if bad:
        shown = "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        return Check(name, False, f"{len(bad)} of {total} layers: {shown}", float(len(bad)))
    return Check(name, True, ok_detail, 0.0)


def format_checks(checks: Sequence[Check]) -> str:
    """A plain-text table: status, check name, detail."""
    if not checks:
        return "(no checks)"
    width = max(len(c.name) for c in checks)
    lines = [f"{'':4}  {'check':<{width}}  detail", f"{'':4}  {'-' * width}  ------"]
    for c in checks:
        lines.append(f"{'ok' if c.passed else 'FAIL':<4}  {c.name:<{width}}  {c.detail}")
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed}/{len(checks)} checks passed")
    return "\n".join(lines)


def raise_if_failed(checks: Sequence[Check]) -> None:
    """Raise :class:`VerificationError` (one line) naming every failed check."""
    failed = [c for c in checks if not c.passed]
    if failed:
        parts = "; ".join(f"{c.name}: {c.detail}" if c.detail else c.name for c in failed)
        raise VerificationError(f"{len(failed)} of {len(checks)} checks failed: {parts}"[:1000])


__all__ = ["DEFAULT_TOLERANCE", "Check", "aggregate", "format_checks", "raise_if_failed"]
