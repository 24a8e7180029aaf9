"""Live terminal view of a running study (rich): progress, current config, last metrics, best so far, ETA.

On a terminal it redraws one panel; otherwise (CI logs, pipes) it prints one line per event.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from autotune.report.objectives import Objectives
from autotune.report.pareto import candidates, front
from autotune.report.results import TrialRecord
from autotune.study.observer import StudyObserver

if TYPE_CHECKING:
    from autotune.trial.runner import TrialOutcome


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_num(v)}" for k, v in params.items()) or "base config"


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


@dataclass
class _Running:
    label: str
    started: float
    phase: str = ""


class LiveView(StudyObserver):
    def __init__(
        self,
        objectives: Objectives,
        *,
        mode: str = "auto",
        console: Console | None = None,
        parallel_trials: int = 1,
    ) -> None:
        self.objectives = objectives
        self.parallel_trials = parallel_trials
        self.console = console or Console()
        self.fancy = mode == "on" or (mode == "auto" and sys.stdout.isatty())
        self.live: Live | None = None
        self.name = ""
        self.total = 0
        self.records: list[TrialRecord] = []
        self.running: dict[int, _Running] = {}
        """Trials being measured now (several with study.parallel_trials > 1)."""
        self.last: str = "-"
        self.started = time.monotonic()

    # --- numbers ---------------------------------------------------------------------------------

    def measured(self) -> list[TrialRecord]:
        return [r for r in self.records if r.measured and r.repeat_of is None]

    def eta_s(self) -> float | None:
        durations = [r.duration_s for r in self.measured() if r.duration_s]
        if not durations:
            return None
        remaining = max(0, self.total - len(self.measured()))
        return remaining * sum(durations) / len(durations) / self.parallel_trials

    def best_lines(self) -> list[str]:
        pool = candidates(self.records)
        lines = []
        for index, (name, direction) in enumerate(
            zip(self.objectives.names, self.objectives.directions, strict=True)
        ):
            if not pool:
                break
            ranked = sorted(pool, key=lambda r: (r.values or ())[index], reverse=direction == "maximize")
            best = ranked[0]
            lines.append(f"{name}: {(best.values or ())[index]:.4g} (#{best.number} {best.label or 'base'})")
        return lines

    # --- rendering -------------------------------------------------------------------------------

    def render(self) -> Panel:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        done = len(self.measured())
        other = sum(1 for r in self.records if not r.measured and r.repeat_of is None and r.state == "PRUNED")
        table.add_row(
            "trials",
            f"{done}/{self.total} measured, {other} pruned, elapsed "
            f"{_duration(time.monotonic() - self.started)}, ETA {_duration(self.eta_s())}",
        )
        now = time.monotonic()
        running = [
            f"{r.label}" + (f" [{r.phase} {_duration(now - r.started)}]" if r.phase else "")
            for _, r in sorted(self.running.items())
        ]
        # plain Text: reasons quote server logs, whose brackets are no rich markup (`[/...]` would raise)
        table.add_row("running" if len(running) > 1 else "current", Text("\n".join(running) or "-"))
        table.add_row("last", Text(self.last))
        best = self.best_lines()
        table.add_row("best so far", Text("\n".join(best) if best else "-"))
        table.add_row(
            "front", str(len(front(self.records, self.objectives.directions))) + " configuration(s)"
        )
        return Panel(Group(table), title=f"autotune study {self.name}", border_style="cyan")

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.update(self.render())
        else:
            self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    # --- observer --------------------------------------------------------------------------------

    def study_started(self, name: str, total: int, records: Sequence[TrialRecord]) -> None:
        self.name, self.total, self.records = name, total, list(records)
        if self.fancy:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        resumed = len(self.measured())
        self._say(f"study {name}: {resumed} of {total} configurations already measured")

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        label = f"#{number} {_short(params)}"
        self.running[number] = _Running(label, time.monotonic())
        self._say(f"trial {label}: launching")

    def phase(self, number: int, text: str) -> None:
        if number in self.running:
            self.running[number].phase = text
        if self.live is not None:
            self.live.update(self.render())

    def trials_seen(self, records: Sequence[TrialRecord]) -> None:
        self.records = list(records)  # with several workers the count and best are the study's

    def trial_finished(self, record: TrialRecord, outcome: TrialOutcome | None) -> None:
        self.records = [r for r in self.records if r.number != record.number] + [record]
        self.running.pop(record.number, None)
        summary = record.state
        if record.values:
            summary += " " + ", ".join(
                f"{n}={v:.4g}" for n, v in zip(self.objectives.names, record.values, strict=True)
            )
            summary += "" if record.feasible else " (misses a constraint)"
        if record.reason:
            summary += f": {record.reason}"
        if record.repeat_of is not None:
            summary += f" (same config as #{record.repeat_of})"
        self.last = f"#{record.number} {record.label or 'base'} -> {summary}"
        done = len(self.measured())
        self._say(f"[{done}/{self.total}] {self.last} | ETA {_duration(self.eta_s())}")

    def study_finished(self, records: Sequence[TrialRecord]) -> None:
        self.records = list(records)
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()
            self.live = None
