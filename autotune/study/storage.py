"""Open a study in its Optuna storage, and refuse one whose results would not be comparable."""

from __future__ import annotations

import json
import warnings

import optuna

from autotune.study.context import StudyContext
from autotune.study.samplers import make_sampler
from autotune.study.staged import policy_pick
from serving.config import flatten

TRAFFIC_ATTR = "autotune.traffic"
"""Study user attr: the workload, arrival and SLO every trial of the study was measured under."""


def open_study(ctx: StudyContext) -> optuna.Study:
    """Create the study, or load it when the name exists (then the objectives must match)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if ctx.storage_url.startswith("sqlite:///"):
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=ctx.name,
        storage=ctx.storage_url,
        directions=[optuna.study.StudyDirection[d.upper()] for d in ctx.objectives.directions],
        sampler=make_sampler(
            ctx.settings.study, ctx.space, pick=policy_pick(ctx.objectives, ctx.settings.export)
        ),
        load_if_exists=True,
    )
    names = study.metric_names
    if names is None:
        study.set_metric_names(ctx.objectives.names)
    elif list(names) != ctx.objectives.names:
        raise ValueError(
            f"study {ctx.name!r} in {ctx.storage_url} optimises {list(names)}, not {ctx.objectives.names}: "
            "use another study.name for other objectives"
        )
    _check_traffic(study, ctx)
    return study


def _check_traffic(study: optuna.Study, ctx: StudyContext) -> None:
    """Results are comparable only under one traffic: a run (or worker) with other traffic is refused."""
    s = ctx.settings
    now = json.loads(
        json.dumps(flatten({"workload": s.workload, "arrival": s.arrival, "slo": s.slo or {}}), default=str)
    )
    stored = study.user_attrs.get(TRAFFIC_ATTR)
    if stored is None:
        study.set_user_attr(TRAFFIC_ATTR, now)
        return
    differ = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if differ:
        shown = "; ".join(f"{k}={stored.get(k)!r} there, {now.get(k)!r} now" for k in differ[:5])
        raise ValueError(
            f"study {ctx.name!r} in {ctx.storage_url} was measured under other traffic ({shown}): "
            "its results would not be comparable; use the study's overrides, or another study.name"
        )
