"""StudyObserver: what the live view and the trackers hear from the study loop.

Call order: study_started once; per trial trial_started, phase (zero or more), trials_seen,
trial_finished; then study_finished once (also after an interruption). With study.parallel_trials > 1
the calls of several trials interleave, but never overlap: the loop makes them one at a time. Every
method has a no-op default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autotune.report.results import TrialRecord

if TYPE_CHECKING:
    from autotune.trial.runner import TrialOutcome


class StudyObserver:
    def study_started(self, name: str, total: int, records: Sequence[TrialRecord]) -> None:
        """The study is open; `records` are trials from earlier runs of the same study."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        """A configuration passed the pre-launch checks and is about to be launched."""

    def phase(self, number: int, text: str) -> None:
        """What trial `number` is doing (starting server, benchmarking, ...)."""

    def trials_seen(self, records: Sequence[TrialRecord]) -> None:
        """Every trial of the study now, other workers' included; called before each trial_finished."""

    def trial_finished(self, record: TrialRecord, outcome: TrialOutcome | None) -> None:
        """A trial ended (complete, failed, pruned or repeated); outcome is None when nothing launched."""

    def study_finished(self, records: Sequence[TrialRecord]) -> None:
        """The loop ended; records are all trials of the study."""
