"""Experiment trackers: observers of the study loop that record trials somewhere people can compare them."""

from __future__ import annotations

from autotune.config.settings import TrackingSettings
from autotune.tracking.tracker import Tracker


def make_tracker(settings: TrackingSettings, *, study_name: str, resolved_config: str) -> Tracker | None:
    """The tracker named by tracking.backend (None for `none`)."""
    if settings.backend == "none":
        return None
    from autotune.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(settings, study_name=study_name, resolved_config=resolved_config)


__all__ = ["Tracker", "make_tracker"]
