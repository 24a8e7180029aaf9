"""Quality next to speed in the report and the end-of-run summary: columns, the synthetic warning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autotune.quality.guard import SYNTHETIC_NOTE
from autotune.report.results import TrialRecord

COLUMNS = (
    ("token agreement", "quality_token_agreement"),
    ("mean KL", "quality_mean_kl"),
    ("perplexity ratio", "quality_perplexity_ratio"),
)
"""(header, metric) of the quality columns, after the objectives in the report's trial table."""


def probed(records: Sequence[TrialRecord]) -> bool:
    return any("quality_synthetic" in r.metrics for r in records)


def header(records: Sequence[TrialRecord]) -> list[str]:
    """The quality column headers; none when no trial was probed."""
    return [h for h, _ in COLUMNS] if probed(records) else []


def cells(record: TrialRecord, records: Sequence[TrialRecord]) -> list[Any]:
    return [record.metrics.get(m, "") for _, m in COLUMNS] if probed(records) else []


def note(records: Sequence[TrialRecord]) -> str:
    """What the quality numbers are, and the warning when they come from dummy weights."""
    if not probed(records):
        return ""
    if any(r.metrics.get("quality_synthetic") for r in records):
        return f"Quality: {SYNTHETIC_NOTE}; its bounds are not enforced (quality.enforce_on_dummy_weights)."
    return (
        "Quality: each trial's fidelity to the reference deployment (token agreement on the reference's "
        "greedy continuations, mean top-k KL, perplexity ratio), measured through the OpenAI API."
    )


def summary(record: TrialRecord) -> str:
    """One line for the end-of-run summary: the selected trial's quality."""
    m = record.metrics
    shown = ", ".join(f"{h} {m[k]:.4g}" for h, k in COLUMNS if k in m) or "probe failed (see quality.json)"
    synthetic = f" ({SYNTHETIC_NOTE})" if m.get("quality_synthetic") else ""
    return f"quality of trial #{record.number} vs the reference: {shown}{synthetic}"
