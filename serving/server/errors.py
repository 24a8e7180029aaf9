"""OpenAI-style error bodies, so clients (the `openai` package, vLLM's benchmark) parse our failures.

Every failure leaves the server through `APIError`: one status, one body
`{"error": {"message", "type", "param", "code"}}`, and the message names the field and the fix.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send


class APIError(Exception):
    """A request that cannot be served; becomes an OpenAI-style JSON error response."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    async def send(self, send: Send, headers: dict[str, str] | None = None) -> None:
        """Answer with this error from a pure ASGI middleware (before the app, so no body is read)."""
        body = json.dumps(self.body()).encode()
        raw = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
        encoded = [(k.encode(), v.encode()) for k, v in raw.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": encoded})
        await send({"type": "http.response.body", "body": body})


def model_not_found(name: str, served: str) -> APIError:
    return APIError(
        f"The model {name!r} does not exist; this server serves {served!r}",
        status=404,
        param="model",
        code="model_not_found",
    )


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, phrased with the field's dotted name."""
    first = err.errors(include_url=False)[0]
    kind = first["type"]
    loc = [str(part) for part in first["loc"]]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(
            f"Unrecognized request argument supplied: {param!r}; this server does not accept it, remove it",
            param=param,
            code="unknown_field",
        )
    if kind == "missing":
        return APIError(f"Missing required field {param!r}", param=param, code="missing_field")
    if kind == "model_type" and not loc:
        return APIError("The request body must be a JSON object", code="invalid_body")
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    where = f"{param}: " if param else ""
    return APIError(f"{where}{first['msg']} (got {shown})", param=param, code="invalid_value")


async def handle_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)  # registered for APIError only
    return exc.response()


async def handle_http_exception(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 get the OpenAI body too, so every error has one shape."""
    assert isinstance(exc, StarletteHTTPException)  # registered for HTTPException only
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(str(exc.detail), status=exc.status_code, type=kind).response()


async def handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
    return APIError(
        f"Internal server error: {type(exc).__name__}: {exc}", status=500, type="server_error"
    ).response()
