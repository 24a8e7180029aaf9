"""Suite-wide guard: no test may leave a process of ours running."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_processes() -> Iterator[None]:
    yield
    leftovers = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.is_running()]
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    names = [f"{p.pid}:{' '.join(p.cmdline()[:4])}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not names, f"processes left running after the tests: {names}"
