"""Which API key a server demands: server.api_key, else $SERVING_API_KEY (the secret a stored config
lacks); shared by the builtin server and the launcher, which hands the key to a child by environment
(never on its command line or in the config file it writes)."""

from __future__ import annotations

import os

from serving.config import API_KEY_ENV, REDACTED, ConfigError, DeploymentConfig


def resolve_api_key(config: DeploymentConfig) -> str | None:
    """The key this server demands: server.api_key, else $SERVING_API_KEY; None: no key."""
    key = config.server.api_key
    if key is not None and key != REDACTED:
        return key
    from_env = os.environ.get(API_KEY_ENV) or None
    if key == REDACTED and from_env is None:
        raise ConfigError(
            f"server.api_key is {REDACTED!r} (the config was stored without its secret): set "
            f"${API_KEY_ENV} to the key, or give server.api_key"
        )
    return from_env
