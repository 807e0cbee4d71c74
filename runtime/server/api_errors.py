"""OpenAI-shaped error bodies: {"error": {"message", "type", "param", "code"}}, and the app's handlers.

Every failure a client can cause is a 4xx with one readable line; the handlers below make sure that
FastAPI's own 422 bodies, Starlette's 404/405 and any unexpected exception never leak another shape
(or a traceback) to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError

log = logging.getLogger(__name__)

# A string right after a list index in a validation error's location is the discriminated-union tag
# (the role of a message, the type of a content part), not a field name: it is left out of `param`.
# The model names pydantic puts in a location for a member of a plain (not discriminated) union.
_UNION_MODELS = {"ImageURL"}
# Fields that are discriminated unions themselves: the tag follows the field name in a location.
_TAGGED_FIELDS = {"response_format": {"text", "json_object", "json_schema"}}
_UNION_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url", "input_audio",
               "video_frames"}


class ApiError(Exception):
    """An error to send to the client as-is."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def log_text(self) -> str:
        """The reason as the request log line shows it: code, param and message."""
        param = f" ({self.param})" if self.param else ""
        return f"{self.code or self.type}{param}: {self.message}"


def _respond(request: Request, err: ApiError) -> JSONResponse:
    request.state.error = err.log_text()  # the request log line carries the reason of every error
    return err.response()


def from_input_error(e: InputError) -> ApiError:
    """The 400 for a runtime InputError (bad image, prompt past the context, ...)."""
    return ApiError(400, str(e), param=e.param, code=e.code)


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"internal error while handling request {request_id}; see the server log",
                    type="server_error", code="internal_error")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """One 400 from pydantic's error list: the most specific errors (deepest location) are reported."""
    if not errors:
        return ApiError(400, "invalid request body")
    depth = max(len(e.get("loc", ())) for e in errors)
    deepest = [_one_error(e) for e in errors if len(e.get("loc", ())) == depth]
    first = deepest[0]
    messages = list(dict.fromkeys(e.message for e in deepest))[:3]
    return ApiError(400, "; ".join(messages), param=first.param, code=first.code)


def _one_error(err: dict[str, Any]) -> ApiError:
    kind, loc = err.get("type", ""), [p for p in err.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"request body is not valid JSON{': ' + detail if detail else ''}", code="invalid_json")
    param = _param_path(loc)
    if not param:
        if kind == "missing":
            return ApiError(400, "request body is required: a JSON object", code="invalid_request")
        return ApiError(400, "request body must be a JSON object", code="invalid_request")
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if kind == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_field")
    return ApiError(400, f"{param}: {err.get('msg', 'invalid value')}", param=param, code="invalid_value")


def _param_path(loc: list[Any]) -> str:
    """("messages", 0, "user", "content", "list[...]", 1, "image_url", "image_url", "url")
    -> "messages[0].content[1].image_url.url"."""
    out, after_index, previous = "", False, None
    for part in loc:
        if isinstance(part, int):
            out, after_index = f"{out}[{part}]", True
            continue
        part = str(part)
        skip = ("[" in part or part in ("str", "int", "float", "bool", "none") or part in _UNION_MODELS
                or (after_index and part in _UNION_TAGS) or part in _TAGGED_FIELDS.get(previous, ()))
        after_index, previous = False, part
        if not skip:
            out = f"{out}.{part}" if out else part
    return out


def install_handlers(app: FastAPI) -> None:
    """Route every error path through the OpenAI error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return _respond(request, from_input_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers)
        return _respond(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.error("request %s failed", request_id, exc_info=exc)
        return _respond(request, internal_error(request_id))
