"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

What it is: `APIError` (raise it anywhere in a route) and the handlers that turn it, FastAPI's
422 validation errors (re-mapped to 400, the status OpenAI uses) and Starlette's HTTP
errors (404 route, 405 method) into that body. Messages start with the field they are about,
e.g. `temperature: must be in [0, 2], got -1.0`; the client's own value is quoted shortened
(`short`), so an 8 MiB prompt or a 1000-deep list never comes back in an error.
"""
from __future__ import annotations

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
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):     # FastAPI's "error parsing the body"
            return APIError(400, "request body: JSON nested too deeply").response()
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code).response()
