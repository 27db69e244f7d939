"""Error responses: OpenAI's `{"error": {"message", "type", "param", "code"}}`, or on the
Anthropic routes (/v1/messages, /v1/messages/*) Anthropic's `{"type": "error", "error":
{"type", "message"}}`.

What it is: `APIError` (raise it anywhere in a route) and the handlers that turn it, FastAPI's
422 validation errors (re-mapped to 400, the status OpenAI and Anthropic use) and
Starlette's HTTP errors (404 route, 405 method) into that body. Messages start with the field
they are about, e.g. `temperature: must be in [0, 2], got -1.0`; the client's own value is
quoted shortened (`short`), so an 8 MiB prompt or a 1000-deep list never comes back in an
error.

The shape follows the route: the handlers look at the request's path, and `error_body`
(which body_limit.py calls before any route runs: 413, body not UTF-8) at the path that
`ErrorShape`, the outermost middleware (install_error_handlers adds it), notes for the
request. Anthropic's error type follows the status (`anthropic_type`: 400
invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error,
413 request_too_large, 429 rate_limit_error, 503 / 529 overloaded_error, other 5xx
api_error).
"""
from __future__ import annotations

import contextvars
import reprlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tscompile.runtime.server.schemas import UNSUPPORTED


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        """OpenAI's shape (Anthropic's while serving an Anthropic route)."""
        if _ANTHROPIC_ROUTE.get():
            return self.anthropic_body()
        return openai_error_body(self.message, type=self.type, param=self.param,
                                 code=self.code)

    def anthropic_body(self) -> dict[str, Any]:
        return anthropic_error_body(self.message, anthropic_type(self.status, self.code))

    def response(self, path: str | None = None) -> JSONResponse:
        """The error as a response; `path` (the request's) picks the shape."""
        body = self.anthropic_body() if path is not None and is_anthropic_route(path) \
            else self.body()
        return JSONResponse(body, status_code=self.status)


# Set by ErrorShape for the request being served: True on an Anthropic route.
_ANTHROPIC_ROUTE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "anthropic_route", default=False)


def is_anthropic_route(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_type(status: int, code: str | int | None = None) -> str:
    """Anthropic's error type for an HTTP status."""
    if code == "request_too_large":
        return "request_too_large"
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500
                                else "invalid_request_error")


def anthropic_error_body(message: str, type: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}}


def openai_error_body(message: str, *, type: str = "invalid_request_error",
                      param: str | None = None,
                      code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """The body of an error sent outside the handlers (body_limit.py): OpenAI's shape, or
    Anthropic's while an Anthropic route is being served (the status is not known here:
    the type follows `code` and OpenAI's `type`)."""
    if _ANTHROPIC_ROUTE.get():
        status = 500 if type == "server_error" else 400
        return anthropic_error_body(message, anthropic_type(status, code))
    return openai_error_body(message, type=type, param=param, code=code)


class ErrorShape:
    """ASGI middleware: notes whether the request is on an Anthropic route, for the error
    bodies written before a route runs (body_limit.py). Outermost, so it sees every
    request first (Starlette's add_middleware puts the middleware added last outside)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _ANTHROPIC_ROUTE.set(is_anthropic_route(scope.get("path", "")))
        try:
            await self.app(scope, receive, send)
        finally:
            _ANTHROPIC_ROUTE.reset(token)


def from_value_error(e: ValueError, *, status: int = 400) -> APIError:
    """SamplingParams and friends say `field: why, got X`; the field becomes `param`."""
    msg = str(e)
    field = msg.split(":", 1)[0] if ":" in msg else None
    return APIError(status, msg, param=field if field and " " not in field else None)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 8, 8


def short(value: Any) -> str:
    """repr() of a client's value, cut to ~100 characters and 3 levels of nesting."""
    return _REPR.repr(value)


def _extra_field(name: str) -> str:
    """The message for a body field that is not one of the model's."""
    if name in UNSUPPORTED:
        return f"{name}: not supported by this server ({UNSUPPORTED[name][1]}); leave it out"
    return f"{name}: unknown parameter"


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "constrained-str", "constrained-int"}
_GENERIC_TAGS = ("list[", "dict[", "tuple[", "function-")


# pydantic's constraint errors, in the `field: must be >= 0, got -1` style SamplingParams uses.
_CONSTRAINTS = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "too_long": "at most {max_length} items", "too_short": "at least {min_length} items",
    "string_too_long": "at most {max_length} characters",
    "string_too_short": "at least {min_length} characters",
    "finite_number": "must be a finite number",
    "string_unicode": "not valid Unicode (a lone UTF-16 surrogate)",
}


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report. A union (`stop`: a string or a list of strings) fails once per
    member; `["a", "b", "c", "d", "e"]` is "at most 4 items", not "not a string": prefer the
    first error of the first field that is not a wrong-type one, if it has any."""
    field = errors[0].get("loc", ())[:2]
    same = [e for e in errors if e.get("loc", ())[:2] == field]
    return next((e for e in same if not str(e.get("type")).endswith("_type")), errors[0])


def _validation_error(exc: RequestValidationError) -> APIError:
    err = _first_error(list(exc.errors()))
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error", err.get("msg"))
        at = f" at char {loc[0]}" if loc else ""
        return APIError(400, f"malformed JSON in the request body{at}: {why}")
    if not loc:
        return APIError(400, f"request body: {err.get('msg')} (expected a JSON object)")
    # Union members show up in loc as type names ('str', 'list[int]'); keep the field path.
    path = ".".join(x for x in loc if x not in _TYPE_TAGS and not x.startswith(_GENERIC_TAGS))
    if err.get("type") == "extra_forbidden":
        prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
        return APIError(400, prefix + _extra_field(loc[-1]), param=loc[0])
    if err.get("type") in ("too_short", "string_too_short") and \
            (err.get("ctx") or {}).get("min_length") == 1:
        msg = "must not be empty"
    elif err.get("type") in _CONSTRAINTS:
        msg = _CONSTRAINTS[err["type"]].format(**err.get("ctx") or {})
    else:
        msg = str(err.get("msg")).removeprefix("Value error, ")
    got = "" if err.get("type") == "missing" else f", got {short(err.get('input'))}"
    return APIError(400, f"{path or loc[0]}: {msg}{got}", param=loc[0])


def install_error_handlers(app: FastAPI) -> None:
    """The handlers, and ErrorShape as the outermost middleware: call this after the other
    add_middleware calls (create_app adds BodyLimit first)."""
    app.add_middleware(ErrorShape)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if isinstance(exc.__cause__, RecursionError):     # FastAPI's "error parsing the body"
            return APIError(400, "request body: JSON nested too deeply").response(path)
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code).response(path)
