"""How many trials does each sampler need to find the front? Replayed against a measured grid.

    python bench/search_efficiency.py --grid bench/results/grid_chat.jsonl \
        --rates bench/results/grid_chat_rates.json --out bench/results/search_efficiency.json

For every sampler (NSGA-II, TPE, GP, random, the staged search, and the warm start in front of TPE and
NSGA-II) and seed, bench/replay.py replays a study of `--budgets` trials against the grid; the table is
the feasible hypervolume of what it measured as a share of the whole grid's (the true front's), median
and range over seeds. The warm start's estimate (autotune/trial/estimate.py) is also compared with the
grid's measurements: Spearman's rank correlation per objective.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replay import (  # noqa: E402
    Point,
    grid_key,
    grid_points,
    hypervolume,
    hypervolume_curve,
    load_grid,
    losses,
    reference_point,
    replay,
    with_sampler,
)

SAMPLERS = ("random", "nsga2", "tpe", "gp", "staged", "warm+tpe", "warm+nsga2", "ranked")
"""`warm+X`: study.warm_start=W in front of sampler X; `ranked`: the estimate's order alone (the warm start
as long as the budget; no sampler, so every seed measures the same points)."""


def spearman(estimated: list[float], measured: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(estimated, measured).statistic)


def estimate_table(
    ctx: Any, rates: Any, grid: dict[str, Point]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The warm ranking of the grid space and the estimate's Spearman correlation with the grid."""
    from autotune.study.warm_start import shape_of, study_ranking
    from autotune.trial.estimate import estimate

    shape = shape_of(ctx.traffic)
    names = list(ctx.objectives.names)
    pairs: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for point in grid.values():
        if point.state != "COMPLETE" or point.values is None:
            continue
        config = ctx.space.deployment(ctx.base, point.params)
        est = estimate(config, ctx.geometry, rates, ctx.devices, shape, ctx.settings.planner)
        predicted = (est.capacity_rps_per_device, est.ttft_ms, est.memory_mb)
        for name, guess, value in zip(names, predicted, point.values, strict=True):
            # latency at the nominal rate means something only where that step was carried: a step
            # abandoned early reports p99 TTFT 0 (no request got its first token in time)
            if math.isfinite(guess) and (name != "p99_ttft_ms" or point.feasible):
                pairs[name][0].append(guess)
                pairs[name][1].append(value)
    correlation = {
        name: {"spearman": spearman(*pair), "points": len(pair[0])} for name, pair in pairs.items()
    }
    ranked = [{"params": p, "estimate": vars(e)} for p, e in study_ranking(ctx, rates)]
    return ranked, correlation


@dataclass(frozen=True)
class Job:
    """What every replay shares (handed to forked workers as a global)."""

    grid: dict[str, Point]
    ctx: Any
    settings: Any
    reference: Any
    full: float
    warm: list[dict[str, Any]]
    ranked: list[dict[str, Any]]
    budgets: list[int]


JOB: Job | None = None


def replay_one(task: tuple[str, int]) -> tuple[str, int, dict[int, float], float, int]:
    """One sampler and seed: hypervolume ratio at each budget. The staged search splits its budget by
    n_trials, so it runs one study per budget; the others one study to the largest budget."""
    import torch

    torch.set_num_threads(1)  # GP's model fit: one thread per worker, the workers share the cores
    name, seed = task
    job = JOB
    assert job is not None, "replay_one runs in workers forked after JOB is set"
    started = time.monotonic()
    base = "random" if name == "ranked" else name.removeprefix("warm+")
    queue = job.warm if name.startswith("warm+") else job.ranked if name == "ranked" else []
    directions = job.ctx.objectives.directions
    ratios: dict[int, float] = {}
    launched = 0
    for budget in job.budgets if base == "staged" else [max(job.budgets)]:
        study = with_sampler(job.settings.study, base, seed, budget)
        trail = replay(
            job.grid, job.ctx.space, job.ctx.base, job.ctx.objectives, study, job.settings.export, warm=queue
        )
        launched = len(trail)  # of the largest budget: fewer when the study stopped on repeats
        wanted = [budget] if base == "staged" else job.budgets
        for n, hv in hypervolume_curve(trail, directions, job.reference, wanted).items():
            ratios[n] = hv / job.full
    return name, seed, ratios, time.monotonic() - started, launched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument(
        "--rates", type=Path, required=True, help="MachineRates JSON (measure with --measure)"
    )
    parser.add_argument("--measure-rates", action="store_true", help="measure the rates now into --rates")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 18, 20, 40])
    parser.add_argument("--warm", type=int, default=6, help="study.warm_start of the warm+X rows")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--jobs", type=int, default=2, help="replays at once (worker processes)")
    parser.add_argument(
        "--missing-as-pruned",
        action="store_true",
        help="points the grid file lacks count as pruned (the replay space is then the measured points); "
        "the output lists them",
    )
    args = parser.parse_args()

    from autotune.config.compose import load_run, parse_args
    from autotune.study.context import build_context
    from autotune.study.warm_start import warm_points
    from autotune.trial.rates import MachineRates, measure_rates

    meta, rows = load_grid(args.grid)
    _cfg, settings = load_run(parse_args(["conf=chat", *meta["overrides"]]))
    ctx = build_context(settings)
    if args.measure_rates:
        measure_rates([1, ctx.devices.count]).save(args.rates)
    rates = MachineRates.load(args.rates)
    grid, missing = grid_points(ctx.space, ctx.base, rows)
    if missing and args.missing_as_pruned:
        print(f"{len(missing)} unmeasured grid points count as pruned: the replay space is the measured ones")
        for params in missing:
            grid[grid_key(ctx.space, ctx.base, params)] = Point(params, "PRUNED", reason="not measured")
    elif missing:
        print(f"{len(missing)} grid points not measured yet, e.g. {missing[0]}")
        return 2

    directions = ctx.objectives.directions
    points = list(grid.values())
    reference = reference_point(points, directions)
    full = hypervolume(points, directions, reference)
    measured = [p for p in points if p.state != "PRUNED"]
    ranked, correlation = estimate_table(ctx, rates, grid)
    warm = warm_points([r["params"] for r in ranked], args.warm, ctx.space.seeds)
    ranked_all = warm_points([r["params"] for r in ranked], max(args.budgets), ctx.space.seeds)

    global JOB
    JOB = Job(grid, ctx, settings, reference, full, warm, ranked_all, args.budgets)
    tasks = [(name, seed) for name in args.samplers for seed in range(args.seeds)]
    tasks.sort(key=lambda t: t[0] != "gp")  # the slowest first, so the workers finish together
    runs: dict[str, dict[str, list[float]]] = {n: {str(b): [] for b in args.budgets} for n in args.samplers}
    timing: dict[str, float] = dict.fromkeys(args.samplers, 0.0)
    lengths: dict[str, list[int]] = {}
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for name, _seed, ratios, seconds, launched in pool.imap_unordered(replay_one, tasks):
            timing[name] += seconds
            lengths.setdefault(name, []).append(launched)
            for n, ratio in ratios.items():
                runs[name][str(n)].append(ratio)
    runs = {name: runs[name] for name in args.samplers}
    for name in args.samplers:
        print(f"{name}: {summary_row(runs[name], args.budgets)} ({timing[name]:.0f} s)", flush=True)

    feasible = [p for p in points if p.feasible]
    front = pareto_front(feasible, directions)
    result = {
        "grid": str(args.grid),
        "grid_meta": meta,
        "grid_points": len(points),
        "unmeasured_points": missing,
        "measured_points": len(measured),
        "feasible_points": len(feasible),
        "front": [{"params": p.params, "values": p.values} for p in front],
        "reference_point": reference.tolist(),
        "full_hypervolume": full,
        "rates": vars(rates),
        "warm_start": args.warm,
        "warm_points": warm,
        "seeds": args.seeds,
        "budgets": args.budgets,
        "hypervolume_ratio": runs,
        "replay_seconds": timing,
        "measured_at_largest_budget": lengths,
        "spearman": correlation,
        "ranking": ranked,
    }
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tables = "\n\n".join(
        [
            markdown(runs, args.budgets, len(measured), lengths),
            reach_table(runs, args.budgets),
            spearman_table(correlation),
            front_table(front, ctx.objectives.names),
        ]
    )
    args.out.with_suffix(".md").write_text(tables + "\n")
    print(tables)
    return 0


def pareto_front(feasible: list[Point], directions: list[str]) -> list[Point]:
    """The true front: the feasible grid points no other feasible point dominates (Optuna's sort)."""
    from optuna.study._multi_objective import _fast_non_domination_rank

    if not feasible:
        return []
    ranks = _fast_non_domination_rank(losses(feasible, directions))
    front = [p for p, r in zip(feasible, ranks, strict=True) if r == 0]
    return sorted(front, key=lambda p: -(p.values or (0.0,))[0])


def front_table(front: list[Point], names: list[str]) -> str:
    head = "| deployment | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(names)
    rows = []
    for p in front:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in p.params.items())
        rows.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in p.values or ()) + " |")
    return "\n".join([head, rule, *rows])


def reach_table(runs: dict[str, dict[str, list[float]]], budgets: list[int]) -> str:
    """Share of seeds whose hypervolume ratio reached 95% at each budget."""
    head = "| sampler | " + " | ".join(f">= 95% at {n}" for n in budgets) + " |"
    rule = "|---|" + "---:|" * len(budgets)
    rows = []
    for name, ratios in runs.items():
        cells = [f"{sum(r >= 0.95 for r in ratios[str(n)])}/{len(ratios[str(n)])}" for n in budgets]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def spearman_table(correlation: dict[str, Any]) -> str:
    rows = [f"| {name} | {c['spearman']:.2f} | {c['points']} |" for name, c in correlation.items()]
    return "\n".join(["| objective | Spearman (estimate vs grid) | points |", "|---|---:|---:|", *rows])


def summary_row(ratios: dict[str, list[float]], budgets: list[int]) -> str:
    cells = []
    for n in budgets:
        values = ratios[str(n)]
        cells.append(f"{statistics.median(values):.1%} [{min(values):.0%}-{max(values):.0%}]")
    return " | ".join(cells)


def markdown(
    runs: dict[str, dict[str, list[float]]], budgets: list[int], measured: int, lengths: dict[str, list[int]]
) -> str:
    head = "| sampler | " + " | ".join(f"{n} trials ({n / measured:.0%})" for n in budgets)
    head += f" | launched of {max(budgets)} |"
    rule = "|---|" + "---|" * (len(budgets) + 1)
    rows = [
        f"| {name} | {summary_row(ratios, budgets)} | {min(lengths[name])}-{max(lengths[name])} |"
        for name, ratios in runs.items()
    ]
    return "\n".join([head, rule, *rows])


if __name__ == "__main__":
    sys.exit(main())
