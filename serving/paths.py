"""Where this copy of the `serving` package lives: child processes (the server a backend launches, the
engine's rank workers) must import this very copy, not another one on their path."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The directory holding the `serving` package."""


def pythonpath_with_package() -> str:
    """PYTHONPATH for a child: this package's root first, then whatever the parent had."""
    return os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
