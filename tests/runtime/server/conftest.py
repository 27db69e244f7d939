"""A fake engine behind the real API process, served by uvicorn on 127.0.0.1.

FakeEngine speaks runtime/protocol.py over two multiprocessing queues exactly as the engine
process does (so every message is pickled), but its "model" replays a script: the tokens
of REPLY, then EOS. It emits 1 or 2 tokens per step (alternating), honours max_tokens,
stop_token_ids, ignore_eos and logprobs, reports cached_tokens for a session's repeated
prefix (whole 16-token pages) and sends EngineStats every step. Markers in the prompt text
change its behaviour: "[slow]" = one token per 50 ms, never EOS (until max_tokens);
"[error]" = fail after two tokens.

Below it: `Tsrun`, the real `tsrun` as a subprocess (on SmolLM2-135M, or on a tiny model
with SmolLM2's vocabulary and random weights), for the reliability suite.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.demo import wait_healthy
from tscompile.runtime.distributed import free_port
from tscompile.runtime.protocol import (Abort, AddRequest, EngineReady, EngineStats,
                                        RequestOutput, Shutdown, StepOutputs, TokenLogprob)
from tscompile.runtime.server import EngineClient, create_app
from tscompile.runtime.server.shutdown import DrainingServer
from tscompile.tokenizer import Tokenizer

REPLY = "Hello world! Ça va? 你好 😀 The answer is 42."
MODEL = "smollm2-fake"
MAX_MODEL_LEN = 256
KERNELS = (("gqa_decode@cpu/float32", "reference"), ("rms_norm@cpu/float32", "reference"))
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
                                     self.tokenizer.eos_token_ids, kernels=KERNELS))
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
                if a.error and a.sent >= 2:      # its two tokens went out in earlier steps
                    outs.append(RequestOutput(rid, finish_reason="error",
                                              error="fake engine failure"))
                    del active[rid]
                    continue
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
                        break
                    if tok in p.stop_token_ids or (tok == self.eos and not p.ignore_eos):
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
                outs.append(RequestOutput(rid, tuple(ids), tuple(lps) if p.logprobs else (),
                                          finish, **extra))
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
    server: DrainingServer
    thread: threading.Thread


@contextlib.contextmanager
def serve(tokenizer: Tokenizer, grace_s: float = 0.0, **app_kwargs) -> Iterator[Stack]:
    """Fake engine + EngineClient + app, uvicorn on a free port in a thread (tsrun's
    DrainingServer: leaving gives requests in flight `grace_s` seconds, then ends them)."""
    engine = FakeEngine(tokenizer)
    engine.start()
    client = EngineClient(engine.requests, engine.outputs, engine=engine, poll_s=0.05)
    ready = client.wait_ready(timeout=10)
    app = create_app(client, tokenizer, model_name=ready.model,
                     max_model_len=ready.max_model_len, **app_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on"),
                            app.state.server, grace_s=grace_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Stack(f"http://127.0.0.1:{port}", engine, client, app, server, thread)
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


# ---------------------------------------------------------------- a live tsrun (subprocess)

TSRUN = str(Path(sys.executable).parent / "tsrun")


class Tsrun:
    """`tsrun PROGRAM ARGS...` on a free port, as tests/runtime/test_tsrun.py starts it, with
    its output in a log file (a pipe nobody reads would block a chatty server)."""

    def __init__(self, prog: Path, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([TSRUN, str(prog), "--port", str(self.port), *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            if not wait_healthy(self.url, self.proc, timeout=300):
                raise RuntimeError("tsrun did not become healthy")
        except RuntimeError as e:
            self.proc.kill()
            raise RuntimeError(f"{e}:\n{log.read_text()[-4000:]}") from None
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        self.children = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                                       capture_output=True, text=True).stdout.split()

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics, by name."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def greedy(self, prompt: str, max_tokens: int) -> str:
        return self.client.completions.create(model=self.model, prompt=prompt,
                                              max_tokens=max_tokens,
                                              temperature=0).choices[0].text

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Signal tsrun, wait for it, check that its ranks are gone too; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + 20
        while [p for p in self.children if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in self.children if _alive(p)], "tsrun left processes behind"
        return rc


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# A 2-layer Llama with SmolLM2's vocabulary (random weights): the whole tsrun (engine
# process, C++ scheduler, real tokenizer) at a few milliseconds per step.
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="session")
def tiny_prog(smollm2_dir, tmp_path_factory) -> Path:
    config = {**json.loads((smollm2_dir / "config.json").read_text()), **TINY}
    return build("llama", config=config, mesh=Mesh.build(1)).save(
        tmp_path_factory.mktemp("tiny") / "tiny.tsprog")


@pytest.fixture(scope="session")
def smol_prog(tmp_path_factory) -> Path:
    return build("llama", preset="smollm2-135m", mesh=Mesh.build(1)).save(
        tmp_path_factory.mktemp("smol") / "smol.tsprog")


def tiny_args(smollm2_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("--dummy-weights", "--tokenizer", str(smollm2_dir), *extra)


def report(record_property, test: str, *, requests: int, failures: int, seconds: float,
           **more: object) -> None:
    """A reliability test's figures: recorded as properties (every run's "reliability
    figures" section, tests/conftest.py; a --junitxml report) and printed (`-rA`)."""
    extra = "".join(f", {k}={v}" for k, v in more.items())
    print(f"[reliability] {test}: {requests} requests, {failures} failures, "
          f"{seconds:.1f} s{extra}")
    for key, value in dict(requests=requests, failures=failures, seconds=round(seconds, 2),
                           **more).items():
        record_property(key, value)
