"""uvicorn's graceful shutdown, bounded, and never cutting a response off silently.

What it is: `DrainingServer`, a uvicorn.Server whose shutdown (on SIGINT/SIGTERM, or
`should_exit`) runs in this order:

1. uvicorn stops accepting connections and closes idle keep-alive ones;
2. the app drains (`OpenAIServer.drain`): a new request on an open connection gets 503,
   /health answers 503, requests in flight keep generating for `grace_s` seconds;
3. past the grace period, or at once on a second signal, every request still in flight
   ends with an error: a stream gets an error event and `data: [DONE]`, a whole response
   a 503 body, so no client mistakes a cut-off answer for a complete one;
4. uvicorn waits for the responses to be written (up to `BACKSTOP_S` more: a client that
   stops reading cannot hold the process), then runs the lifespan shutdown.

A third signal, or a second Ctrl-C, is uvicorn's own force-quit. What it is not: the
engine's shutdown (runtime/serve.py sends it Shutdown after this returns).
"""
from __future__ import annotations

import asyncio
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from tscompile.runtime.server.openai_api import OpenAIServer

BACKSTOP_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, api: OpenAIServer, *, grace_s: float):
        if grace_s < 0:
            raise ValueError(f"shutdown grace: must be >= 0 s, got {grace_s}")
        config.timeout_graceful_shutdown = grace_s + BACKSTOP_S
        super().__init__(config)
        self.api = api
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and self._loop is not None:   # a second signal: do not wait
            self._loop.call_soon_threadsafe(self.api.end_in_flight)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.api.drain(self.grace_s)
        await super().shutdown(sockets)
