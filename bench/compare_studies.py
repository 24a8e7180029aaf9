"""Finished studies side by side: wall time, trials, Pareto front and the exported winner, with the machine.

Why: the default chat and summarisation studies are claimed to pick different deployments; this reads what
two `autotune run` invocations wrote (their Optuna storage and best.yaml) and prints one JSON record per
study, plus the CPU model, its ISA flags that decide the dtype choices, and the load average at the end
(the machine is shared; a busy one slows every trial). Launches nothing.

Usage: python bench/compare_studies.py DIR:STUDY [DIR:STUDY ...] [--out bench/results/x.json]
  DIR is where `autotune run` ran (runs/<study>/study.db and reports/<study>/best.yaml below it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.report.pareto import front as pareto_front
from autotune.report.results import load_records

KEYS = (
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "precision.dtype",
    "precision.quantization",
    "attention",
    "scheduler.policy",
    "scheduler.max_num_seqs",
    "scheduler.chunked_prefill",
    "scheduler.max_num_batched_tokens",
    "scheduler.queue_order",
    "cache.kv_cache_memory_gb",
    "cache.block_size",
)
METRICS = ("output_throughput", "p99_ttft_ms", "p99_tpot_ms", "median_ttft_ms", "duration")


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def study_record(directory: Path, name: str) -> dict[str, Any]:
    storage = f"sqlite:///{directory / 'runs' / name / 'study.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    directions = [d.name.lower() for d in study.directions]
    front = {r.number for r in pareto_front(load_records(study), directions)}
    best_path = directory / "reports" / name / "best.yaml"
    best = yaml.safe_load(best_path.read_text()) if best_path.is_file() else None
    rows = []
    for t in trials:
        deployment = t.user_attrs.get("deployment") or {}
        metrics = t.user_attrs.get("metrics") or {}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "measured": bool(t.user_attrs.get("measured")),
                "pareto": t.number in front,
                "feasible": all(v <= 0 for v in t.constraints.values()) if t.constraints else None,
                "minutes": round((t.datetime_complete - t.datetime_start).total_seconds() / 60, 2)
                if t.datetime_start and t.datetime_complete
                else None,
                **{k: deployment.get(k) for k in KEYS},
                **{m: round(metrics[m], 1) for m in METRICS if m in metrics},
                "reason": t.user_attrs.get("reason"),
            }
        )
    return {
        "study": name,
        "wall_minutes": round((max(ends) - min(starts)).total_seconds() / 60, 1) if starts and ends else None,
        "measured": sum(r["measured"] for r in rows),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "front": sorted(front),
        "winner": best["selected_by"] if best else None,
        "winner_deployment": {k: _flat(best["deployment"]).get(k) for k in KEYS} if best else None,
        "trials": rows,
    }


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="DIR:STUDY")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = {"machine": machine(), "studies": []}
    for spec in args.studies:
        directory, _, name = spec.rpartition(":")
        result["studies"].append(study_record(Path(directory), name))
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
