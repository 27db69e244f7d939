"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

What it is: `APIError` (raise it anywhere in a route) and the handlers that turn it, FastAPI's
422 validation errors (re-mapped to 400, the status OpenAI uses) and Starlette's HTTP
errors (404 route, 405 method) into that body. Messages start with the field they are about,
e.g. `temperature: must be >= 0, got -1.0`.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_GENERIC_TAGS = ("list[", "dict[", "tuple[", "function-")


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error", err.get("msg"))
        at = f" at char {loc[0]}" if loc else ""
        return APIError(400, f"malformed JSON in the request body{at}: {why}")
    if not loc:
        return APIError(400, f"request body: {err.get('msg')} (expected a JSON object)")
    # Union members show up in loc as type names ('str', 'list[int]'); keep the field path.
    path = ".".join(x for x in loc if x not in _TYPE_TAGS and not x.startswith(_GENERIC_TAGS))
    got = err.get("input")
    got_s = "" if err.get("type") == "missing" else f", got {got!r}"[:200]
    return APIError(400, f"{path or loc[0]}: {err.get('msg')}{got_s}", param=loc[0])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code).response()
