"""`conf=NAME key=value ...` -> the composed, validated run config (Hydra's compose API over conf/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from autotune.config.paths import CONF_DIR
from autotune.config.settings import RunSettings

DEFAULT_CONF = "chat"


class UsageError(ValueError):
    """Bad command-line arguments or config; the message says what to change."""


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: which primary config, the Hydra overrides, and flags."""

    conf: str
    overrides: tuple[str, ...]
    print_config: bool = False
    help: bool = False


def parse_args(argv: Sequence[str], flags: Sequence[str] = ("--cfg",)) -> Invocation:
    """`conf=NAME` picks conf/NAME.yaml; `--cfg` prints the config; everything else goes to Hydra."""
    conf = DEFAULT_CONF
    overrides: list[str] = []
    print_config = show_help = False
    for arg in argv:
        if arg in ("-h", "--help"):
            show_help = True
        elif arg == "--cfg" and "--cfg" in flags:
            print_config = True
        elif arg.startswith("conf="):
            conf = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UsageError(
                f"unknown option {arg!r}: give Hydra overrides as key=value (e.g. study.n_trials=4)"
            )
        elif "=" not in arg:
            raise UsageError(f"{arg!r} is not key=value: write conf=chat or study.n_trials=4")
        else:
            overrides.append(arg)
    return Invocation(conf, tuple(overrides), print_config, show_help)


def available_confs() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def compose_config(conf: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/<conf>.yaml with the overrides, interpolations resolved."""
    if conf not in available_confs():
        raise UsageError(f"conf={conf!r}: no conf/{conf}.yaml; choose one of {available_confs()}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="autotune"):
            cfg = compose(config_name=conf, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(f"conf={conf}: {err}") from None
    return cfg


def build_settings(cfg: DictConfig) -> RunSettings:
    """Check the composed config against the schemas; errors name the full key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunSettings), cfg)
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"{key}: " if key else ""
        message = str(err).splitlines()[0]
        raise UsageError(f"{where}{message} (check the key's spelling, or conf/ for the section)") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not isinstance(settings, RunSettings):  # pragma: no cover - to_object of a structured config
        raise TypeError("composed config did not build RunSettings")
    return settings


def to_plain(section: Any) -> Any:
    """A DictConfig section as plain dicts and lists (what the traffic config builders take)."""
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return section


def load_run(invocation: Invocation) -> tuple[DictConfig, RunSettings]:
    cfg = compose_config(invocation.conf, invocation.overrides)
    return cfg, build_settings(cfg)
