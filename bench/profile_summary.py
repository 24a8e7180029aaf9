"""Where an engine step's time goes, from a py-spy raw profile: shares of the samples inside LLMEngine.step.

    py-spy record -r 250 --format raw -o step.txt -- .venv/bin/python -m bench.decode_step \\
        --attention paged --batch 1 --steps 400
    .venv/bin/python bench/profile_summary.py step.txt [--top 15]

py-spy (from the package registry) samples the Python stacks; a sample's leaf is the Python line that was
running, native time included (a torch op is charged to the line that called it). Printed: the functions
by inclusive share, and the leaf lines by self share.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

STEP = "LLMEngine.step "


def step_stacks(path: Path) -> list[tuple[list[str], int]]:
    """(frames from LLMEngine.step down, sample count) for every stack that is inside a step."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        starts = [i for i, f in enumerate(frames) if f.startswith(STEP)]
        if starts:
            stacks.append((frames[starts[0] :], int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = sum(n for _, n in stacks)
    for frames, n in stacks:
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[name] += n
        leaves[frames[-1]] += n
    lines = [f"{total} samples inside LLMEngine.step", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("self (leaf line):")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaves.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    stacks = step_stacks(args.profile)
    if not stacks:
        raise SystemExit(
            f"{args.profile}: no samples inside LLMEngine.step (was it a py-spy --format raw file?)"
        )
    print(summarise(stacks, args.top))


if __name__ == "__main__":
    main()
