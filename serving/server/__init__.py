"""The builtin engine's OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from serving.server.app import build_app
from serving.server.serve import serve

__all__ = ["build_app", "serve"]
