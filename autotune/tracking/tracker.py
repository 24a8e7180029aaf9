"""Tracker: a study observer that records trials somewhere people compare them, and closes the study there.

Call order: the StudyObserver calls during the loop (each trial logged as it ends), then finalize() once
after the report is written, with the Pareto front and the report's files. `uri` says where to look.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from autotune.report.results import TrialRecord
from autotune.study.observer import StudyObserver


class Tracker(StudyObserver):
    uri: str
    """Where the records live (a tracking server's URL or a local store URI), printed in the summary."""

    def finalize(
        self,
        records: Sequence[TrialRecord],
        front: Iterable[int],
        artifacts: Iterable[Path],
        interrupted: bool = False,
    ) -> None:
        """Tag the front, attach the study's files and close the study's record (as killed when the
        run was interrupted: a resume reopens it)."""
        raise NotImplementedError
