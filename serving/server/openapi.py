"""The OpenAPI schema of the builtin server (/openapi.json, browsable at /docs, as vLLM's server has).

The routes parse their bodies themselves (so every bad body gets the same OpenAI-style 400), which
leaves FastAPI no body to describe; the request models are added here, their nested models as
components, so a client generator or a fuzzer (schemathesis) sees every field and its bounds.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
ERRORS = {
    "400": "Invalid request (the message names the field)",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "429": "Server full (server.max_waiting); see Retry-After",
    "503": "Engine not healthy",
    "504": "Past server.request_timeout_s",
}


def install_openapi(app: FastAPI) -> None:
    """Serve the schema with the request bodies filled in (built once, on the first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        if path.startswith("/v1/"):
            operation["responses"].update({code: {"description": text} for code, text in ERRORS.items()})
    return schema
