"""Where the tuner finds its Hydra configs and search spaces: beside the package, in the repository."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (an editable install)."""
CONF_DIR = REPO_ROOT / "conf"
"""Hydra config directory: primary configs (chat.yaml, summarise.yaml) and config groups."""
SEARCH_SPACES_DIR = REPO_ROOT / "search_spaces"
"""Declarative search spaces addressed by bare name (`search.space=chat`)."""
