"""`autotune bench --url URL [--model M] [--cfg] [key=value ...]`: synthetic traffic against any
OpenAI-compatible server, composed from conf/bench.yaml (Hydra) and reported with vLLM bench-serve metrics."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from autotune.config.paths import CONF_DIR
from autotune.traffic.capacity import find_capacity
from autotune.traffic.capacity_result import LoadStep
from autotune.traffic.config import ArrivalConfig, CapacityConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.runner import print_summary, run_sweep
from autotune.traffic.schedule import run_in_loop

TOP_LEVEL_KEYS = {"workload", "arrival", "slo", "capacity", "client", "url", "model", "out_dir", "progress"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune bench",
        description=__doc__,
        epilog="examples: autotune bench --url http://127.0.0.1:8000 workload=chat arrival.rate=4\n"
        "          autotune bench --url http://127.0.0.1:8000 arrival=closed arrival.concurrency=8\n"
        "          autotune bench --url http://127.0.0.1:8000 'arrival.sweep=[1,2,4]' client.processes=2\n"
        "          autotune bench --url http://127.0.0.1:8000 --capacity slo.ttft_ms=500 capacity.step_s=20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="server root, e.g. http://127.0.0.1:8000 (overrides url=)")
    parser.add_argument("--model", help="model name to send (default: the server's first /v1/models entry)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="search the highest rate whose SLO attainment stays >= slo.attainment (as every trial does)",
    )
    parser.add_argument(
        "--config-dir", type=Path, default=CONF_DIR, help=f"Hydra config dir (default {CONF_DIR})"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: workload=summarise arrival.rate=4 ...")
    return parser


def compose_config(overrides: list[str], config_dir: Path = CONF_DIR) -> DictConfig:
    """conf/bench.yaml with the overrides applied; unknown top-level keys are rejected by name."""
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
        cfg = compose(config_name="bench", overrides=overrides)
    unknown = sorted({str(k) for k in cfg} - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"conf/bench.yaml: unknown key(s) {unknown}; known keys are {sorted(TOP_LEVEL_KEYS)}"
        )
    return cfg


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        cfg = compose_config(list(args.overrides), args.config_dir)
        if args.url:
            cfg.url = args.url
        if args.model:
            cfg.model = args.model
        if args.capacity:
            cfg.capacity.enabled = True
        if args.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        if not cfg.url:
            raise ValueError("no server: pass --url http://host:port (or url=...)")
        workload = WorkloadConfig.from_config(cfg.workload)
        arrival = ArrivalConfig.from_config(cfg.arrival)
        slo = SLOConfig.from_config(cfg.slo)
        client = ClientConfig.from_config(cfg.client)
        capacity = CapacityConfig.from_config(cfg.capacity)
    except ValueError as error:
        console.print(f"[red]autotune bench: {error}[/red]")
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "bench" / f"{workload.name}-{stamp}"
    if capacity.enabled:
        return _capacity(str(cfg.url), cfg.model, workload, arrival, slo, client, capacity, out_dir, console)
    results = run_sweep(
        str(cfg.url),
        cfg.model,
        workload,
        arrival,
        slo=slo,
        client=client,
        out_dir=out_dir,
        progress=bool(cfg.progress),
        console=console,
    )
    for point, result in zip(arrival.expand(), results, strict=True):
        print_summary(result, console, title=f"{workload.name} {point.label()}")
        if result.alignment is not None and result.alignment.mismatched:
            a = result.alignment
            console.print(
                f"re-aligned {a.mismatched}/{a.checked} prompts to the server's tokenizer "
                f"({a.unresolved} still off)"
            )
    console.print(f"records and summary in {out_dir}")
    return 0


def _capacity(
    url: str,
    model: str | None,
    workload: WorkloadConfig,
    arrival: ArrivalConfig,
    slo: SLOConfig,
    client: ClientConfig,
    capacity: CapacityConfig,
    out_dir: Path,
    console: Console,
) -> int:
    """The trial's capacity search against the server at `url`; summary.json has the trial's metric keys."""

    def shown(step: LoadStep) -> None:
        s = step.summary
        verdict = "probe" if step.kind == "probe" else ("carried" if step.carried else "not carried")
        console.print(
            f"{step.label:>16}: {step.planned:4d} requests, attainment {step.attainment:6.1%}, "
            f"p99 TTFT {s['p99_ttft_ms']:8.1f} ms, {s['output_throughput']:8.1f} output tok/s -> {verdict}"
            + (" (stopped early)" if step.stopped_early else "")
        )

    try:
        result = run_in_loop(
            find_capacity(
                url,
                model,
                workload,
                arrival,
                slo,
                client=client,
                settings=capacity,
                out_dir=out_dir,
                on_step=shown,
            ),
            client.uvloop,
        )
    except ValueError as error:
        console.print(f"[red]autotune bench: {error}[/red]")
        return 2
    metrics = result.metrics(devices=1)
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")
    upper = f", below {result.failing_rps:.3g}" if result.failing_rps is not None else ""
    console.print(
        f"capacity: {result.capacity_rps:.3g} req/s{upper} with SLO attainment >= {slo.attainment:.0%} "
        f"({metrics['capacity_output_throughput']:.1f} output tok/s there); steps in {out_dir}"
    )
    return 0
