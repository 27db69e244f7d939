"""The API process's end of the engine IPC (runtime/protocol.py): asyncio on one side, two
multiprocessing queues on the other.

What it is: one background thread blocks on the engine's output queue and hands each
`StepOutputs` to the event loop (`loop.call_soon_threadsafe`), which routes every
`RequestOutput` to the asyncio.Queue of its request; `generate()` is the per-request async
iterator; `abort()` tells the engine a request is over. If the engine dies (its queue
closes or its process exits), every pending request gets an `"error"` output and `healthy`
turns False (/health answers 503). What it is not: detokenization, stop strings or the
OpenAI format (detokenizer.py, openai_api.py).

Threads: the reader thread only reads the queue and schedules callbacks; all request state
(`_streams`, `stats`) is touched on the event loop thread alone, so it needs no locks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

from tscompile.runtime.protocol import (Abort, AddRequest, EngineReady, EngineStats,
                                        RequestOutput, Shutdown, StepOutputs)

log = logging.getLogger(__name__)


class _Alive(Protocol):
    """A multiprocessing.Process (or, in tests, a threading.Thread)."""

    def is_alive(self) -> bool: ...


class EngineClient:
    def __init__(self, request_queue: Any, output_queue: Any, *, engine: _Alive | None = None,
                 poll_s: float = 0.1):
        """`request_queue` takes AddRequest/Abort/Shutdown, `output_queue` yields EngineReady
        once and then StepOutputs. `engine` (the engine process) lets the client notice a
        crash: a dead producer never closes a multiprocessing queue, so without it a crash
        is only seen if the queue itself breaks."""
        self._requests = request_queue
        self._outputs = output_queue
        self._engine = engine
        self._poll_s = poll_s
        self.ready: EngineReady | None = None
        self.stats: EngineStats | None = None     # latest, cumulative counters inside
        self.dead_reason: str | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.dead_reason is None

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    def wait_ready(self, timeout: float | None = None) -> EngineReady:
        """Block (before `start()`, no event loop needed) until the engine's EngineReady
        arrives, so the caller can size the API from it (max_model_len, model name)."""
        if self._thread is not None:
            raise RuntimeError("wait_ready() must run before start(); the reader thread "
                               "owns the output queue afterwards")
        waited = 0.0
        while self.ready is None:
            msg = self._get()
            if msg is None:
                waited += self._poll_s
                if self.dead_reason is not None:
                    raise RuntimeError(f"engine died before it was ready: {self.dead_reason}")
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(f"no EngineReady from the engine within {timeout} s")
            elif isinstance(msg, EngineReady):
                self.ready = msg
            else:
                raise RuntimeError(f"engine sent {type(msg).__name__} before EngineReady")
        return self.ready

    async def start(self) -> None:
        """Bind to the running event loop and start the reader thread (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._read_outputs, name="engine-client",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader thread (the engine keeps running; see `shutdown()`)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self._poll_s + 1)
        self._thread = None

    def shutdown(self) -> None:
        """Ask the engine to exit, then stop reading."""
        self._send(Shutdown())
        self.close()

    # ------------------------------------------------------------------ requests

    async def generate(self, request: AddRequest) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request; ends after the one with finish_reason.
        Leaving early (break, cancellation, client gone) aborts the request in the engine;
        use `contextlib.aclosing` so that happens at once rather than at garbage collection."""
        rid = request.rid
        if self.dead_reason is not None:
            yield RequestOutput(rid, finish_reason="error", error=self.dead_reason)
            return
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = stream
        if not self._send(request):
            self._streams.pop(rid, None)
            yield RequestOutput(rid, finish_reason="error", error=self.dead_reason)
            return
        try:
            while True:
                out = await stream.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            # Still registered: we left before the engine finished it.
            if self._streams.pop(rid, None) is not None:
                self._send(Abort(rid, reason="abort"))

    def fail_pending(self, reason: str) -> None:
        """End every pending request, and refuse later ones, with an `"error"` output
        saying `reason` (the server is shutting down); `healthy` turns False. The engine is
        told to drop them and keeps running until `shutdown()`."""
        for rid in list(self._streams):
            self._send(Abort(rid, reason="abort"))
        self._on_dead(reason)

    def abort(self, rid: str, reason: str = "abort") -> None:
        """Tell the engine to drop `rid` ("stop": a stop string matched; "abort": client
        gone). Its generate() then ends with an output whose finish_reason is `reason`;
        later engine outputs for it are discarded. A no-op for a finished request."""
        if (stream := self._streams.pop(rid, None)) is not None:
            self._send(Abort(rid, reason=reason))
            stream.put_nowait(RequestOutput(rid, finish_reason=reason))

    def _send(self, msg: AddRequest | Abort | Shutdown) -> bool:
        if self.dead_reason is not None and not isinstance(msg, Shutdown):
            return False
        try:
            self._requests.put(msg)
            return True
        except (ValueError, OSError) as e:          # closed queue
            self._on_dead(f"engine request queue is closed ({e})")
            return False

    # ------------------------------------------------------------------ reader thread

    def _get(self) -> Any | None:
        """One message, or None after a poll interval with nothing (dead_reason set when
        the engine is gone)."""
        try:
            return self._outputs.get(timeout=self._poll_s)
        except queue.Empty:
            if self._engine is not None and not self._engine.is_alive():
                code = getattr(self._engine, "exitcode", None)
                self.dead_reason = ("engine process exited" +
                                    (f" with code {code}" if code is not None else ""))
            return None
        except (EOFError, OSError, ValueError) as e:  # closed / broken queue
            self.dead_reason = f"engine output queue is closed ({type(e).__name__}: {e})"
            return None

    def _read_outputs(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stop.is_set():
            msg = self._get()
            try:
                if self.dead_reason is not None:
                    loop.call_soon_threadsafe(self._fail_all)
                    return
                if msg is None:
                    continue
                if isinstance(msg, StepOutputs):
                    loop.call_soon_threadsafe(self._dispatch, msg)
                elif isinstance(msg, EngineReady):
                    self.ready = msg
                else:
                    log.warning("engine sent an unexpected %s; ignored", type(msg).__name__)
            except RuntimeError:                      # event loop closed under us
                return

    # ------------------------------------------------------------------ event-loop side

    def _dispatch(self, step: StepOutputs) -> None:
        if step.stats is not None:
            self.stats = step.stats
        for out in step.outputs:
            stream = self._streams.get(out.rid)
            if stream is None:                        # aborted or unknown: drop
                continue
            if out.finish_reason is not None:
                del self._streams[out.rid]
            stream.put_nowait(out)

    def _on_dead(self, reason: str) -> None:
        """Called on the event loop (a failed put)."""
        if self.dead_reason is None:
            self.dead_reason = reason
        self._fail_all()

    def _fail_all(self) -> None:
        reason = self.dead_reason or "engine is gone"
        if self._streams:
            log.error("failing %d pending request(s): %s", len(self._streams), reason)
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            stream.put_nowait(RequestOutput(rid, finish_reason="error", error=reason))
