"""`serving`: start a deployment from a DeploymentConfig (a deploy YAML, --set overrides, or a best.yaml).

    serving serve [--config deploy.yaml] [--set key=value ...] [--port N] [--host H] [--print-config]
    serving launch best.yaml [--port N] [--host H]
    serving schema      # every config key: type, default, meaning (the tables in docs/serving.md)

Errors in the config are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from serving.config import ConfigError, DeploymentConfig

# OpenMP threads that spin at barriers steal the cores a co-located client (the benchmark, the front end)
# needs: a batch-1 decode step measured 57 ms spinning vs 21 ms passive on 2 shared cores. It only takes
# effect before torch is imported, which this module does not do; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_CONFIG_ERROR = 2

SET_HELP = """\
override one field with a dotted key; the value is parsed as a YAML scalar
(--set scheduler.max_num_seqs=8 --set model.path=llama-tiny --set scheduler.chunked_prefill=true).
Keys: {keys}"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2 like config errors)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")


def build_parser() -> _Parser:
    parser = _Parser(
        prog="serving",
        description="Serve an LLM deployment described by a DeploymentConfig (serving/config.py). "
        "The builtin engine runs in this process; the URL is printed on stdout once it answers, "
        "the startup log goes to stderr. SIGTERM or Ctrl+C shut it down gracefully (exit code 0).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,launch,schema}")

    serve = commands.add_parser(
        "serve",
        help="serve a deployment built from defaults, a deploy YAML and --set overrides",
        description="Serve a deployment: defaults <- --config YAML <- --set overrides <- --host/--port.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="deployment YAML (the DeploymentConfig schema; a best.yaml's `deployment:` section works too)",
    )
    keys = ", ".join(DeploymentConfig().to_flat())
    serve.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=SET_HELP.format(keys=keys),
    )
    _add_address(serve)
    serve.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )

    launch = commands.add_parser(
        "launch",
        help="start exactly the deployment in a best.yaml (as exported by `autotune`)",
        description="Start the deployment in a YAML file (top level or its `deployment:` section) for the "
        "backend it names: builtin runs in this process, other backends run their own server command.",
    )
    launch.add_argument("file", type=Path, metavar="BEST_YAML", help="best.yaml or a deploy YAML")
    _add_address(launch)

    commands.add_parser(
        "schema",
        help="print every config key with its type, default and meaning (Markdown)",
        description="Print the DeploymentConfig schema from the field docstrings in serving/config.py.",
    )
    return parser


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="TCP port (server.port; 0 picks a free one)")
    parser.add_argument("--host", help="bind address (server.host; default 127.0.0.1)")


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as a YAML scalar (`8` -> 8, `true` -> True, `x` -> 'x')."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set scheduler.max_num_seqs=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not a YAML scalar ({err})") from None
    if isinstance(value, dict | list):
        raise ConfigError(f"--set {item!r}: the value must be a scalar; set nested keys one by one")
    return key.strip(), value


def resolve_config(
    config_path: Path | None,
    overrides: Sequence[str] = (),
    *,
    port: int | None = None,
    host: str | None = None,
) -> DeploymentConfig:
    """defaults <- YAML <- --set <- --host/--port, each step checked by DeploymentConfig."""
    config = _read_yaml(config_path) if config_path is not None else DeploymentConfig()
    flat = dict(parse_override(item) for item in overrides)
    if port is not None:
        flat["server.port"] = port
    if host is not None:
        flat["server.host"] = host
    return config.replace(**flat) if flat else config


def _read_yaml(path: Path) -> DeploymentConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return DeploymentConfig.from_yaml(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None


def run_deployment(config: DeploymentConfig) -> int:
    """Builtin: serve in this process. Other backends: replace this process by their server command."""
    from serving.api_key import resolve_api_key
    from serving.backends import get_backend

    backend = get_backend(config.backend)
    backend.validate(config)
    if config.backend == "builtin":
        from serving.server.serve import serve

        return serve(config)
    command = backend.command(config, config.server.port)
    env = backend.process_env(config, None, os.environ, resolve_api_key(config))
    print(f"serving: starting {config.backend}: {' '.join(command)}", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


def config_schema_markdown() -> str:
    """One Markdown table per config section, from the field annotations, defaults and docstrings."""
    lines: list[str] = []

    def section(cls: type, prefix: str) -> None:
        docs = _field_docstrings(cls)
        hints = typing.get_type_hints(cls)
        defaults = cls()
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                nested.append((hint, f"{prefix}{f.name}."))
                continue
            default = yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True)
            default = default.removesuffix("\n").removesuffix("\n...").strip()
            rows.append(f"| `{prefix}{f.name}` | {_type_text(hint)} | `{default}` | {docs.get(f.name, '')} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines.extend(
                [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
            )
        for hint, sub in nested:
            section(hint, sub)

    section(DeploymentConfig, "")
    return "\n".join(lines)


def _field_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated field (the attribute docstrings of serving/config.py)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for field, doc in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def _type_text(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type_text(inner)} or null"
    return getattr(hint, "__name__", str(hint))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            print(config_schema_markdown())
            return 0
        if args.command == "serve":
            config = resolve_config(args.config, args.overrides, port=args.port, host=args.host)
            if args.print_config:
                print(config.to_yaml(), end="")
                return 0
        else:
            config = resolve_config(args.file, port=args.port, host=args.host)
        return run_deployment(config)
    except ConfigError as err:
        _fail(str(err))


def _fail(message: str) -> NoReturn:
    print(f"serving: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)


if __name__ == "__main__":
    sys.exit(main())
