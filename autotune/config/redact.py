"""Secrets out of everything shown or stored: URL passwords (study.storage, tracking.uri) and API keys.

docs/gpu.md puts a password in the PostgreSQL URL every worker uses; the composed config, the report,
MLflow's config artifact and error messages would all carry it. The live connection keeps the URL as
given: only what is printed or written passes through here.
"""

from __future__ import annotations

import re

from serving.config import REDACTED

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*):(?P<password>[^/\s]*)@")
_API_KEY_LINE = re.compile(r"(?P<head>\bapi_key\s*[:=]\s*)(?P<value>[^\s,}]+)")
MASK = "***"


def redact_url(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`; other URLs unchanged."""
    return _URL_PASSWORD.sub(rf"\g<head>:{MASK}@", url)


def redact_text(text: str) -> str:
    """Every URL password and every `api_key: value` in free text (YAML, messages, logs) masked."""

    def key(match: re.Match[str]) -> str:
        value = match.group("value")
        if value in ("null", "None", "~", REDACTED, f"'{REDACTED}'"):
            return match.group(0)
        return f"{match.group('head')}'{REDACTED}'"

    return _API_KEY_LINE.sub(key, redact_url(text))
