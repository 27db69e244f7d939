"""The request body, read and checked before any route sees it: at most `max_bytes` (413)
and valid UTF-8 (400), both with OpenAI's error JSON.

What it is: an ASGI middleware that buffers the body (the routes parse it whole anyway),
refuses it early when Content-Length already says it is too large, counts the bytes of a
chunked one as they come, and then replays it to the app; later `receive()` calls go to
the server, so a route still hears the client disconnect. Why: uvicorn reads bodies of any
size, and a body that is not UTF-8 would reach FastAPI's JSON parser as a generic "error
parsing the body". What it is not: field validation (schemas.py, validation.py).

Napkin math for the default: a 128k-token prompt is ~0.9 MB as JSON token ids and ~0.6 MB
as English text; 16 MiB leaves room for batches of prompts and long chat histories while
bounding the JSON parse and validation one request can put on the event loop (~0.1 s).
"""
from __future__ import annotations

import json
from typing import Any

from tscompile.runtime.server.errors import error_body

MAX_BODY_BYTES = 16 << 20

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        if max_bytes < 1:
            raise ValueError(f"max_body_bytes: must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return                                # gone before the body arrived
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, size, at_least=True)
                return
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            await _send_error(send, 400, error_body(
                f"request body: not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                f"{e.start}); JSON bodies must be UTF-8"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: int, at_least: bool = False) -> None:
        more = "more than " if at_least else ""
        await _send_error(send, 413, error_body(
            f"request body: {more}{size} bytes, over this server's limit of {self.max_bytes}",
            code="request_too_large"))


async def _send_error(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
