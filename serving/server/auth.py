"""The optional API key: /v1/* answers 401 unless the request carries `Authorization: Bearer <key>`.

The OpenAI client's convention (its api_key goes there), as vLLM's --api-key. The key comes from
server.api_key or $SERVING_API_KEY; it is compared in constant time and never logged or echoed.
/health, /metrics, /tokenize and the schema stay open, as in vLLM: a supervisor and a scraper need
no secret.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.server.errors import APIError

PROTECTED_PREFIX = "/v1/"


class APIKeyMiddleware:
    """Refuses /v1/* requests without the bearer key, before their body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _unauthorized().send(send, {"www-authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


def _unauthorized() -> APIError:
    return APIError(
        "Missing or wrong API key: send the header 'Authorization: Bearer <key>'",
        status=401,
        code="invalid_api_key",
    )
