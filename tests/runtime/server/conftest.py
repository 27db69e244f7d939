"""A fake engine behind the real API process, served by uvicorn on 127.0.0.1.

FakeEngine speaks runtime/protocol.py over two multiprocessing queues exactly as the engine
process does (so every message is pickled), but its "model" replays a script: the tokens
of REPLY, then EOS. It emits 1 or 2 tokens per step (alternating), honours max_tokens,
stop_token_ids, ignore_eos and logprobs, reports cached_tokens for a session's repeated
prefix (whole 16-token pages) and sends EngineStats every step. Markers in the prompt text
change its behaviour: "[slow]" = one token per 50 ms, never EOS (until max_tokens);
"[error]" = fail after two tokens.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from tscompile.runtime.protocol import (Abort, AddRequest, EngineReady, EngineStats,
                                        RequestOutput, Shutdown, StepOutputs, TokenLogprob)
from tscompile.runtime.server import EngineClient, create_app
from tscompile.tokenizer import Tokenizer

REPLY = "Hello world! Ça va? 你好 😀 The answer is 42."
MODEL = "smollm2-fake"
MAX_MODEL_LEN = 256
PAGE = 16


@dataclass
class _Active:
    req: AddRequest
    slow: bool
    error: bool
    sent: int = 0
    next_at: float = 0.0
    first: bool = True


class FakeEngine(threading.Thread):
    def __init__(self, tokenizer: Tokenizer, step_s: float = 0.002):
        super().__init__(name="fake-engine", daemon=True)
        self.tokenizer = tokenizer
        self.step_s = step_s
        self.received: list = []            # every AddRequest / Abort, in order
        self.requests: mp.Queue = mp.Queue()
        self.outputs: mp.Queue = mp.Queue()
        self.eos = self.tokenizer.eos_token_ids[0]
        self.script = self.tokenizer.encode(REPLY) + [self.eos]
        self.sessions: dict[str, tuple[int, ...]] = {}
        self.totals = dict(prompt=0, generation=0, hit=0)
        self._killed = threading.Event()

    def kill(self) -> None:
        """Exit at once without finishing anything: a crashed engine."""
        self._killed.set()
        self.join(5)

    def aborts(self) -> list[Abort]:
        return [m for m in self.received if isinstance(m, Abort)]

    def adds(self) -> list[AddRequest]:
        return [m for m in self.received if isinstance(m, AddRequest)]

    def wait_for(self, pred, timeout: float = 3.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(pred(m) for m in list(self.received)):
                return True
            time.sleep(0.01)
        return False

    def _token(self, a: _Active) -> int:
        if a.slow:          # cycle through REPLY's tokens, never EOS
            return self.script[a.sent % (len(self.script) - 1)]
        return self.script[a.sent % len(self.script)]

    def _admit(self, req: AddRequest) -> _Active:
        text = self.tokenizer.decode(list(req.prompt_ids))
        return _Active(req, slow="[slow]" in text, error="[error]" in text)

    def _cached(self, req: AddRequest) -> int:
        if req.session_id is None:
            return 0
        prev = self.sessions.get(req.session_id, ())
        self.sessions[req.session_id] = req.prompt_ids
        common = 0
        for x, y in zip(prev, req.prompt_ids):
            if x != y:
                break
            common += 1
        return common // PAGE * PAGE

    def run(self) -> None:
        self.outputs.put(EngineReady(MODEL, MAX_MODEL_LEN, self.tokenizer.vocab_size,
                                     self.tokenizer.eos_token_ids))
        active: dict[str, _Active] = {}
        step = 0
        while not self._killed.is_set():
            outs: list[RequestOutput] = []
            msgs = []
            try:
                msgs.append(self.requests.get(timeout=0.05 if not active else self.step_s))
                while True:
                    msgs.append(self.requests.get_nowait())
            except queue.Empty:
                pass
            for m in msgs:
                if isinstance(m, Shutdown):
                    return
                self.received.append(m)
                if isinstance(m, AddRequest):
                    active[m.rid] = self._admit(m)
                elif isinstance(m, Abort) and active.pop(m.rid, None) is not None:
                    outs.append(RequestOutput(m.rid, finish_reason="abort"))
            now = time.monotonic()
            step += 1
            for rid, a in list(active.items()):
                if a.slow and now < a.next_at:
                    continue
                a.next_at = now + 0.05
                p = a.req.params
                ids, lps, finish = [], [], None
                for _ in range(1 if a.slow else 1 + step % 2):
                    tok = self._token(a)
                    a.sent += 1
                    ids.append(tok)
                    lp = -0.25 * (a.sent % 4 + 1)
                    top = tuple((tok if j == 0 else (tok + j) % self.tokenizer.vocab_size,
                                 lp - j) for j in range(p.top_logprobs))
                    lps.append(TokenLogprob(tok, lp, top))
                    if a.error and a.sent >= 2:
                        finish = "error"
                    elif tok in p.stop_token_ids or (tok == self.eos and not p.ignore_eos):
                        finish = "stop"
                    elif a.sent >= p.max_tokens:
                        finish = "length"
                    if finish:
                        break
                extra = {}
                if a.first:
                    a.first = False
                    cached = self._cached(a.req)
                    extra = dict(prompt_tokens=len(a.req.prompt_ids), cached_tokens=cached)
                    self.totals["prompt"] += len(a.req.prompt_ids) - cached
                    self.totals["hit"] += cached
                self.totals["generation"] += len(ids)
                if finish == "error":
                    outs.append(RequestOutput(rid, finish_reason="error",
                                              error="fake engine failure", **extra))
                else:
                    outs.append(RequestOutput(rid, tuple(ids),
                                              tuple(lps) if p.logprobs else (), finish,
                                              **extra))
                if finish:
                    del active[rid]
            stats = EngineStats(running=len(active), waiting=0, kv_blocks_total=100,
                                kv_blocks_used=3 * len(active),
                                prefix_hit_tokens=self.totals["hit"],
                                prompt_tokens=self.totals["prompt"],
                                generation_tokens=self.totals["generation"], preemptions=0)
            if outs or step % 50 == 0:
                self.outputs.put(StepOutputs(tuple(outs), stats))


@dataclass
class Stack:
    url: str
    engine: FakeEngine
    client: EngineClient
    app: object


@contextlib.contextmanager
def serve(tokenizer: Tokenizer, **app_kwargs) -> Iterator[Stack]:
    """Fake engine + EngineClient + app, uvicorn on a free port in a thread."""
    engine = FakeEngine(tokenizer)
    engine.start()
    client = EngineClient(engine.requests, engine.outputs, engine=engine, poll_s=0.05)
    ready = client.wait_ready(timeout=10)
    app = create_app(client, tokenizer, model_name=ready.model,
                     max_model_len=ready.max_model_len, **app_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Stack(f"http://127.0.0.1:{port}", engine, client, app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        if engine.is_alive():
            engine.requests.put(Shutdown())
            engine.join(5)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def stack(tokenizer) -> Iterator[Stack]:
    with serve(tokenizer) as s:
        yield s
