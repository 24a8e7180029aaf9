"""Measure every deployment of a grid space once, through the trial runner `autotune run` uses.

The ground truth of the search-efficiency benchmark (bench/replay.py): each point of the grid
(bench/grid/chat_grid.yaml, a factorial sub-grid of search_spaces/chat.yaml) is checked as the study
loop checks it (pre-launch rules, the serving side's validators, the memory planner), launched with
`run_trial` and turned into the default study's objectives and constraints. One JSONL line per point,
appended as soon as it is known, so an interrupted run resumes where it stopped (`--out` again).

    python bench/grid_measure.py --out bench/results/grid_chat.jsonl [hydra overrides ...]

The first line is the run's metadata (machine, date, commit, command, fidelity); every later line is a
point: its params, state (COMPLETE, FAIL, PRUNED), objective values, constraint values, metrics, the
load average before and after, its duration. Points are measured in a seeded random order, so a drift
of the machine's load during the run does not line up with one knob.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from bench.replay import read_rows  # noqa: E402

GRID_SPACE = ROOT / "bench" / "grid" / "chat_grid.yaml"
FIDELITY = (
    "tracking=none",
    "quality.enabled=false",  # dummy weights: quality is synthetic and bounds nothing (docs/tuning.md)
    "capacity.probe_concurrency=8",
    "capacity.step_s=3",
    "capacity.min_requests=12",
    "capacity.max_steps=3",
    "arrival.warmup_requests=1",
)
"""The short fidelity of every grid point: a capacity search of the nominal step plus two (the full
default is four steps of 6 s after a probe at the batch limit); the objectives stay the default study's."""


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_done(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The metadata line and the points already measured, by config key (none when nothing ran yet)."""
    return read_rows(path) if path.exists() else (None, {})


def append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file; appended to, resumed from")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/grid_runs"), help="trial directories")
    parser.add_argument("--seed", type=int, default=0, help="the measurement order's shuffle")
    parser.add_argument("--limit", type=int, default=None, help="measure at most this many new points")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="measure FAIL points again (e.g. a start-up that failed for a reason outside the deployment); "
        "the new line is appended and supersedes the old one",
    )
    parser.add_argument(
        "--first",
        type=json.loads,
        default=[],
        help="JSON list of partial params whose grid points are measured before the shuffled rest",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the fidelity's")
    args = parser.parse_args()

    from autotune.commands.session import sigterm_as_interrupt
    from autotune.config.compose import load_run, parse_args
    from autotune.study.context import build_context
    from autotune.study.loop import config_key
    from autotune.trial.device_pool import DevicePool
    from serving.config import ConfigError

    overrides = [f"search.space={GRID_SPACE}", *FIDELITY, *args.overrides]
    _cfg, settings = load_run(parse_args(["conf=chat", *overrides]))
    ctx = build_context(settings)
    command = "python bench/grid_measure.py " + shlex.join(
        [
            f"--out={args.out}",
            f"--seed={args.seed}",
            *(["--retry-failed"] if args.retry_failed else []),
            *([f"--first={json.dumps(args.first)}"] if args.first else []),
            *args.overrides,
        ]
    )
    meta, done = load_done(args.out)
    if args.retry_failed:
        done = {key: row for key, row in done.items() if row["state"] != "FAIL"}
    if meta is None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        append(
            args.out,
            {
                "kind": "meta",
                "machine": machine(),
                "date": now(),
                "commit": git_commit(),
                "command": command,
                "overrides": overrides,
                "space": str(GRID_SPACE.relative_to(ROOT)),
                "objectives": dict(ctx.objectives.settings.directions),
                "constraints": ctx.objectives.describe_constraints(),
                "load_avg_1_5_15": list(os.getloadavg()),
            },
        )
    elif meta["overrides"] != overrides:
        print(f"{args.out}: measured with {meta['overrides']}, not {overrides}; use another --out")
        return 2
    else:  # a resumed run says when, from which commit and under what load
        append(
            args.out,
            {
                "kind": "resume",
                "date": now(),
                "commit": git_commit(),
                "command": command,
                "load_avg_1_5_15": list(os.getloadavg()),
            },
        )

    points = list(ctx.space.enumerate())
    random.Random(args.seed).shuffle(points)
    wanted = [p for p in points if any(all(p.get(k) == v for k, v in f.items()) for f in args.first)]
    points = wanted + [p for p in points if p not in wanted]
    pool = DevicePool(ctx.devices, 1, settings.trial.server_cpus)
    started, new = time.monotonic(), 0
    with sigterm_as_interrupt() as stop:
        for index, params in enumerate(points):
            if args.limit is not None and new >= args.limit:
                break
            row: dict[str, Any] = {"kind": "point", "index": index, "params": params}
            try:
                config = ctx.space.deployment(ctx.base, params)
            except ConfigError as err:
                row.update(config_key=json.dumps(params, sort_keys=True), state="PRUNED", reason=str(err))
            else:
                key = config_key(config)
                if key in done:
                    continue
                row["config_key"] = key
                reason, _plan = ctx.check(config)
                if reason:
                    row.update(state="PRUNED", reason=reason)
                else:
                    row.update(measure(ctx, config, pool, stop, args.runs_dir / f"{index:04d}"))
                    new += 1
            if row["config_key"] in done:
                continue
            done[row["config_key"]] = row
            append(args.out, row)
            values = row.get("values")
            print(f"[{len(done)}/{len(points)}] {row['state']} {params} {values or row.get('reason', '')}")
            print(f"  elapsed {time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


def measure(ctx: Any, config: Any, pool: Any, stop: Any, trial_dir: Path) -> dict[str, Any]:
    """One launch as the study loop makes it; objectives and constraints as it tells Optuna."""
    from autotune.trial.runner import run_trial

    load_before = list(os.getloadavg())
    allocation = pool.acquire(config, stop)
    try:
        outcome = run_trial(
            config,
            ctx.traffic,
            ctx.settings.trial,
            trial_dir,
            cpus=list(allocation.cpus),
            extra_env=allocation.env(),
            cancel=stop,
        )
    finally:
        pool.release(allocation)
    row: dict[str, Any] = {
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
        "duration_s": outcome.duration_s,
        "finished_at": now(),
        "metrics": outcome.metrics,
    }
    if outcome.ok:
        try:
            row["values"] = ctx.objectives.values(outcome.metrics)
        except (KeyError, ValueError) as err:
            outcome.ok, outcome.reason = False, str(err)
    if outcome.ok:
        row["constraints"] = ctx.objectives.constraint_values(outcome.metrics)
        row["state"] = "COMPLETE"
    else:
        row.update(state="FAIL", reason=outcome.reason)
    return row


if __name__ == "__main__":
    sys.exit(main())
