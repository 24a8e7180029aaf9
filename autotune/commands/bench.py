"""`autotune bench --url URL [--model M] [--cfg] [key=value ...]`: synthetic traffic against any
OpenAI-compatible server, composed from conf/bench.yaml (Hydra) and reported with vLLM bench-serve metrics."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from autotune.config.paths import CONF_DIR
from autotune.traffic.config import ArrivalConfig, ClientConfig, SLOConfig, WorkloadConfig
from autotune.traffic.runner import print_summary, run_sweep

TOP_LEVEL_KEYS = {"workload", "arrival", "slo", "client", "url", "model", "out_dir", "progress"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune bench",
        description=__doc__,
        epilog="examples: autotune bench --url http://127.0.0.1:8000 workload=chat arrival.rate=4\n"
        "          autotune bench --url http://127.0.0.1:8000 arrival=closed arrival.concurrency=8\n"
        "          autotune bench --url http://127.0.0.1:8000 'arrival.sweep=[1,2,4]' client.processes=2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="server root, e.g. http://127.0.0.1:8000 (overrides url=)")
    parser.add_argument("--model", help="model name to send (default: the server's first /v1/models entry)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
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
        if args.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        if not cfg.url:
            raise ValueError("no server: pass --url http://host:port (or url=...)")
        workload = WorkloadConfig.from_config(cfg.workload)
        arrival = ArrivalConfig.from_config(cfg.arrival)
        slo = SLOConfig.from_config(cfg.slo)
        client = ClientConfig.from_config(cfg.client)
    except ValueError as error:
        console.print(f"[red]autotune bench: {error}[/red]")
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "bench" / f"{workload.name}-{stamp}"
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
