"""`autotune <command> [key=value ...]`: the tuner's entry point; each command lives in its own module."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("autotune.commands.run", "search deployment configs for a workload (Hydra: conf=chat ...)"),
    "plan": ("autotune.commands.plan", "print the search space, what the memory planner prunes, and an ETA"),
    "export": ("autotune.commands.export", "write best.yaml from a finished study"),
    "bench": ("autotune.commands.bench", "drive an OpenAI-compatible server with synthetic traffic"),
    "worker": ("autotune.commands.worker", "join a shared study as one more worker"),
}


def _usage() -> str:
    lines = ["usage: autotune <command> [options] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`autotune <command> --help` describes one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"autotune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
