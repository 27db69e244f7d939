"""tsrun under fuzzing, load, disconnect storms, hostile bodies and SIGTERM. Each test prints
its figures (requests, failures, seconds), which `pytest -rA` shows.

Servers: the real tsrun on a tiny model with SmolLM2's vocabulary and random weights (fast:
the schema fuzzer, disconnects, hostile input, SIGTERM), on SmolLM2-135M's real weights (256
concurrent streams), and the fake engine in-process (the shutdown grace period).
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import threading
import time

import httpx
import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tscompile.runtime.serve import ServeConfig

from .conftest import MODEL, Tsrun, report, serve, tiny_args

PROBE = "The reliability probe says"
# Short enough that a fuzzed request without max_tokens (the rest of the context) is quick.
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def tiny(tiny_prog, smollm2_dir, tmp_path_factory):
    s = Tsrun(tiny_prog, *tiny_args(smollm2_dir, "--max-model-len", str(MAX_MODEL_LEN),
                                     "--max-num-seqs", "64", "--kv-cache-tokens", "16384",
                                     "--threads-per-rank", "1"),
              log=tmp_path_factory.mktemp("tiny") / "tsrun.log")
    yield s
    assert s.stop() == 0


def settled(s: Tsrun, baseline_kv: float = 0.0, timeout: float = 30) -> dict[str, float]:
    """/metrics once nothing runs, waits or streams and the KV pool is back to
    `baseline_kv` (the engine publishes its stats every 0.5 s when idle)."""
    deadline = time.monotonic() + timeout
    while True:
        m = s.metrics()
        idle = (m["tsrun_num_requests_running"], m["tsrun_num_requests_waiting"],
                m["tsrun_api_requests_pending"]) == (0, 0, 0)
        if idle and m["tsrun_kv_cache_usage_perc"] == baseline_kv:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"server not back to idle with KV usage {baseline_kv}: {m}")
        time.sleep(0.2)


def is_openai_error(r: requests.Response | httpx.Response, path: str | None = None) -> bool:
    """The API's own error shape: Anthropic's on /v1/messages*, OpenAI's elsewhere."""
    try:
        body = r.json()
        err = body["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if "/v1/messages" in (path or str(getattr(r, "url", ""))):
        return body.get("type") == "error" and set(err) == {"type", "message"} \
            and bool(err["message"])
    return set(err) == {"message", "type", "param", "code"} and bool(err["message"])


# ---------------------------------------------------------------- schemathesis

EXAMPLES = 150      # per generation mode, over all operations


def test_schemathesis_finds_no_server_error(tiny, record_property):
    """Every operation of tsrun's OpenAPI schema, with bodies that fit it and bodies that
    do not: no 5xx, every error in OpenAI's shape, and the server answers correctly after."""
    want = tiny.greedy(PROBE, 16)
    schema = schemathesis.openapi.from_url(tiny.url + "/openapi.json")
    operations = {f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
            "GET /health", "GET /metrics"} <= operations
    session = requests.Session()
    statuses: collections.Counter[int] = collections.Counter()
    per_op: collections.Counter[str] = collections.Counter()
    failures = []

    def call(case) -> None:
        r = case.call(session=session, timeout=60)
        statuses[r.status_code] += 1
        per_op[f"{case.method.upper()} {case.path}"] += 1
        if r.status_code >= 500 or (r.status_code >= 400 and not is_openai_error(r, case.path)):
            failures.append((case.method, case.path, case.body, r.status_code, r.text[:300]))
        case.validate_response(r, checks=[not_a_server_error])

    t0 = time.monotonic()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        run = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                       phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
            given(case=schema.as_strategy(generation_mode=mode))(call))
        run()
    seconds = time.monotonic() - t0
    report(record_property, "schemathesis", requests=sum(statuses.values()),
           failures=len(failures), seconds=seconds, statuses=dict(sorted(statuses.items())),
           operations=dict(sorted(per_op.items())))
    assert not failures, failures[:3]
    assert set(per_op) == operations                  # every endpoint was reached
    assert httpx.get(tiny.url + "/health").status_code == 200
    assert tiny.greedy(PROBE, 16) == want


# ---------------------------------------------------------------- 256 concurrent streams

CLIENTS = 256
PROMPTS = [f"Q: What is {i} plus {i}?\nA:" for i in range(16)]


@pytest.fixture(scope="module")
def smol(smol_prog, smollm2_dir, tmp_path_factory):
    s = Tsrun(smol_prog, "--weights", str(smollm2_dir), "--max-model-len", "256",
              "--max-num-seqs", str(CLIENTS), "--kv-cache-tokens", "8192",
              "--max-num-batched-tokens", "2048",
              log=tmp_path_factory.mktemp("smol") / "tsrun.log")
    yield s
    assert s.stop() == 0


async def stream_completion(client: openai.AsyncOpenAI, model: str, prompt: str,
                            max_tokens: int) -> tuple[str, str | None]:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True)
    text, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_256_concurrent_streams_equal_their_solo_runs(smol, record_property):
    """SmolLM2-135M, 256 greedy streams at once (16 prompts, 16 clients each): every one
    finishes with exactly the text and finish reason its prompt gets alone."""
    async def main():
        async with openai.AsyncOpenAI(base_url=smol.url + "/v1", api_key="none",
                                      max_retries=0, timeout=600) as client:
            t0 = time.monotonic()
            solo = [await stream_completion(client, smol.model, p, 8) for p in PROMPTS]
            t1 = time.monotonic()
            got = await asyncio.gather(*[stream_completion(client, smol.model,
                                                           PROMPTS[i % len(PROMPTS)], 8)
                                         for i in range(CLIENTS)], return_exceptions=True)
            return solo, got, t1 - t0, time.monotonic() - t1

    solo, got, solo_s, seconds = asyncio.run(main())
    wrong = [(i, g) for i, g in enumerate(got) if g != solo[i % len(PROMPTS)]]
    report(record_property, "256 concurrent streams", requests=CLIENTS, failures=len(wrong),
           seconds=seconds, solo_requests=len(PROMPTS), solo_seconds=round(solo_s, 1))
    assert all(f in ("stop", "length") and t for t, f in solo), solo
    assert len({t for t, _ in solo}) > len(PROMPTS) // 2       # the prompts differ
    assert not wrong, wrong[:3]
    settled(smol)


# ---------------------------------------------------------------- 200 random disconnects

async def _partial_body(url: str) -> str:
    """Headers that promise 4000 bytes, 100 of them, then gone."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                 b"\r\ncontent-length: 4000\r\n\r\n" + b'{"prompt": "' + b"x" * 88)
    await writer.drain()
    writer.close()
    return "partial body"


async def _client(http: httpx.AsyncClient, url: str, model: str, plan: dict) -> str:
    """One client of the storm; what it saw (a status line it did not expect raises)."""
    if plan["kind"] == "partial body":
        return await _partial_body(url)
    body = {"model": model, "prompt": plan["prompt"], "max_tokens": plan["max_tokens"],
            "temperature": plan["temperature"], "n": plan["n"],
            "stream": plan["kind"] == "stream"}
    if plan["kind"] == "whole":                   # gives up waiting after a random time
        try:
            r = await http.post(url + "/v1/completions", json=body,
                                timeout=httpx.Timeout(10, read=plan["after_s"]))
            assert r.status_code == 200, r.text
            return "whole, finished first"
        except httpx.ReadTimeout:
            return "whole, gone"
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        seen = 0
        async for line in r.aiter_lines():        # leaves after a random number of events
            if line.startswith("data: "):
                seen += 1
                if line == "data: [DONE]":
                    return "stream, finished first"
                if seen > plan["after_events"]:
                    break
    return "stream, gone"


def test_200_clients_disconnecting_at_random_points(tiny, record_property):
    """Streams left after 0..12 events, whole requests given up after 0..0.3 s, bodies
    cut off mid-upload, all at once: afterwards nothing runs, waits or streams, the KV pool
    is back to its baseline, and greedy requests give what they gave before."""
    rng = random.Random(14)
    kinds = ["stream"] * 6 + ["whole"] * 3 + ["partial body"]
    plans = [dict(kind=rng.choice(kinds), prompt=" ".join(["word"] * rng.randint(1, 16)),
                  max_tokens=rng.randint(8, 40), temperature=rng.choice([0, 1]),
                  n=rng.choice([1, 1, 1, 2]), after_events=rng.randint(0, 12),
                  after_s=rng.uniform(0.0, 0.3))
             for _ in range(200)]
    want = tiny.greedy(PROBE, 16)
    base = settled(tiny)["tsrun_kv_cache_usage_perc"]

    async def storm():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) \
                as http:
            return await asyncio.gather(*[_client(http, tiny.url, tiny.model, p)
                                          for p in plans], return_exceptions=True)

    t0 = time.monotonic()
    seen = asyncio.run(storm())
    m = settled(tiny, base)
    seconds = time.monotonic() - t0
    failures = [s for s in seen if isinstance(s, BaseException)]
    report(record_property, "200 random disconnects", requests=len(plans),
           failures=len(failures), seconds=seconds,
           outcomes=dict(collections.Counter(s for s in seen if isinstance(s, str))),
           kv_usage_after=m["tsrun_kv_cache_usage_perc"])
    assert not failures, failures[:3]
    assert sum(s.endswith("gone") for s in seen) > 100       # most left mid-request

    async def probes():
        async with openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key="none",
                                      max_retries=0) as client:
            return await asyncio.gather(*[stream_completion(client, tiny.model, PROBE, 16)
                                          for _ in range(8)])
    assert tiny.greedy(PROBE, 16) == want
    assert [t for t, _ in asyncio.run(probes())] == [want] * 8


# ---------------------------------------------------------------- hostile bodies

def _chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size):
        yield b" " * size


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def test_hostile_bodies_get_a_clear_4xx(tiny, record_property):
    """Each gets its 4xx, OpenAI's error JSON and a message naming what is wrong; unicode
    stop strings that are valid work (one cut from the model's own greedy text), invalid
    ones are refused; the server keeps serving the same greedy text."""
    url = tiny.url + "/v1/completions"
    text = tiny.greedy(PROBE, 24)
    ok = {"model": tiny.model, "prompt": PROBE, "max_tokens": 24, "temperature": 0}
    JSON = {"content-type": "application/json"}
    cases = [  # (what, request kwargs, status, words in the message)
        ("17 MiB body", dict(content=b"{" + b" " * (17 << 20) + b"}", headers=JSON), 413,
         "over this server's limit"),
        ("17 MiB chunked body", dict(content=_chunks(17 << 20), headers=JSON), 413,
         "over this server's limit"),
        ("invalid UTF-8", dict(content=b'{"prompt": "caf\xe9 \xff"}', headers=JSON), 400,
         "not valid UTF-8"),
        ("lone surrogate", dict(content=b'{"prompt": "\\udc80"}', headers=JSON), 400,
         "prompt: not valid Unicode"),
        ("JSON nested 100000 deep", dict(content=_nested(100_000), headers=JSON), 400,
         "nested too deeply"),
        ("JSON nested 200 deep", dict(content=_nested(200), headers=JSON), 400, "prompt"),
        ("n = 10**9", dict(json={**ok, "n": 10 ** 9}), 400, "n: must be <= 128"),
        ("n = 100 (> max_n)", dict(json={**ok, "n": 100}), 400, "n: must be in [1, 8]"),
        ("max_tokens = 10**12", dict(json={**ok, "max_tokens": 10 ** 12}), 400,
         "maximum context length"),
        ("max_tokens = 2**200", dict(json={**ok, "max_tokens": 2 ** 200}), 400,
         "maximum context length"),
        ("logit_bias over the whole vocabulary",
         dict(json={**ok, "logit_bias": {str(i): 100 for i in range(49152)}}), 400,
         "logit_bias"),
        ("prompt of 10**5 token ids", dict(json={**ok, "prompt": [1] * 100_000}), 400,
         "maximum context length"),
        ("token id outside the vocabulary", dict(json={**ok, "prompt": [1, 49152]}), 400,
         "[0, 49152)"),
        ("top_logprobs = 10**6", dict(json={**ok, "logprobs": 10 ** 6}), 400, "<= 20"),
        ("Infinity", dict(content=b'{"prompt": "x", "top_p": Infinity}', headers=JSON), 400,
         "finite"),
        ("5 unicode stop strings", dict(json={**ok, "stop": ["你", "😀", "é", "ß", "ж"]}),
         400, "stop: at most 4 items"),
        ("stop with a lone surrogate",
         dict(content=b'{"prompt": "x", "stop": ["\\ud83d"]}', headers=JSON), 400,
         "stop.0: not valid Unicode"),
        ("empty stop string", dict(json={**ok, "stop": ["你", ""]}), 400, "must not be empty"),
    ]
    t0 = time.monotonic()
    failures = []
    with httpx.Client(timeout=60) as http:
        for what, kwargs, status, words in cases:
            r = http.post(url, **kwargs)
            if r.status_code != status or not is_openai_error(r) or \
                    words not in r.json()["error"]["message"]:
                failures.append((what, r.status_code, r.text[:300]))
        # Valid unicode stop strings: cut where the greedy text has them.
        stop = text[len(text) // 2:len(text) // 2 + 2]
        stops = [stop, "😀", "e\u0301", "👩‍👩‍👧"]
        r = http.post(url, json={**ok, "stop": stops})
        got = r.json()["choices"][0] if r.status_code == 200 else r.text
        if got != {**got, "text": text[:text.index(stop)], "finish_reason": "stop"}:
            failures.append(("unicode stop strings", stops, got))
        assert http.get(tiny.url + "/health").status_code == 200
    seconds = time.monotonic() - t0
    report(record_property, "hostile bodies", requests=len(cases) + 1,
           failures=len(failures), seconds=seconds)
    assert not failures, failures
    assert tiny.greedy(PROBE, 24) == text
    settled(tiny)


# ---------------------------------------------------------------- SIGTERM under load

GRACE_S = ServeConfig.__dataclass_fields__["shutdown_grace_s"].default


async def _sse_end(http: httpx.AsyncClient, url: str, body: dict,
                   first: asyncio.Event) -> str:
    """How a stream ended: "finished" (its last chunk has a finish_reason, then [DONE]),
    "error: <message>" (an error event, then [DONE]) or "cut off (...)"."""
    last = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"cut off (HTTP {r.status_code})"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    if last and "error" in last:
                        return "error: " + last["error"]["message"]
                    if last and last["choices"] and last["choices"][0]["finish_reason"]:
                        return "finished"
                    return "cut off ([DONE] without a final chunk)"
                last = json.loads(line[6:])
                if last.get("choices") and last["choices"][0]["text"]:
                    first.set()
    except httpx.HTTPError as e:
        return f"cut off ({type(e).__name__})"
    return "cut off (no [DONE])"


def test_sigterm_under_load_loses_no_request_silently(tiny_prog, smollm2_dir, tmp_path,
                                                      record_property):
    """32 streams in flight, then SIGTERM: new connections are refused, the 16 short
    streams finish normally within the grace period; a second SIGTERM ends the 16 long
    ones with an error event. No stream is cut off silently; tsrun exits 0."""
    s = Tsrun(tiny_prog, *tiny_args(smollm2_dir, "--max-model-len", "4200",
                                     "--max-num-seqs", "32", "--kv-cache-tokens", "140000",
                                     "--threads-per-rank", "1"), log=tmp_path / "tsrun.log")
    short, long = 16, 16
    bodies = [{"model": s.model, "prompt": f"{i} " * (1 + i % 7), "temperature": 0,
               "max_tokens": 48 if i < short else 4000, "stream": True}
              for i in range(short + long)]

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) \
                as http:
            firsts = [asyncio.Event() for _ in bodies]
            tasks = [asyncio.create_task(_sse_end(http, s.url, b, f))
                     for b, f in zip(bodies, firsts)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
            s.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            await asyncio.sleep(0.5)
            try:                                      # a new connection after SIGTERM
                async with httpx.AsyncClient() as fresh:
                    refused = f"HTTP {(await fresh.get(s.url + '/health')).status_code}"
            except httpx.ConnectError:
                refused = "connection refused"
            done_before = sum(t.done() for t in tasks[:short])
            ends = await asyncio.wait_for(asyncio.gather(*tasks[:short]), 30)
            drained_s = time.monotonic() - t0
            s.proc.send_signal(signal.SIGTERM)        # the second one: do not wait
            ends += await asyncio.wait_for(asyncio.gather(*tasks[short:]), 30)
            return ends, refused, short - done_before, drained_s, time.monotonic() - t0

    try:
        ends, refused, drained, drained_s, seconds = asyncio.run(main())
        rc = s.proc.wait(timeout=30)              # it exits by itself
    finally:
        s.stop()                                  # (and its ranks are gone)
    outcomes = collections.Counter(e.split(" (")[0] for e in ends)
    report(record_property, "SIGTERM under load", requests=len(bodies),
           failures=sum(e.startswith("cut off") for e in ends), seconds=seconds,
           outcomes=dict(outcomes), new_connection=refused, short_finished_after_sigterm=drained,
           short_drained_in=round(drained_s, 1))
    assert refused in ("connection refused", "HTTP 503"), refused
    assert ends[:short] == ["finished"] * short and drained > 0, (drained, ends[:short])
    assert ends[short:] == ["error: generation failed: server is shutting down"] * long, \
        ends[short:]
    # Ended by the second signal, not by the grace period running out.
    assert seconds < GRACE_S and seconds - drained_s < 3, (drained_s, seconds)
    assert rc == 0, s.log.read_text()[-3000:]


def test_shutdown_ends_what_the_grace_period_leaves(tokenizer, record_property):
    """The fake engine's [slow] requests never finish: once the server is told to exit,
    they get `grace_s` seconds, then streams end with an error event and [DONE], and a
    whole request gets a 503 in OpenAI's shape, not a dropped connection."""
    grace = 0.5
    slow = [{"role": "user", "content": "[slow] go"}]
    with serve(tokenizer, grace_s=grace) as s:
        results: dict[str, object] = {}

        def whole() -> None:
            results["whole"] = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                                          json={"model": MODEL, "messages": slow,
                                                "max_tokens": 200})

        async def main():
            async with httpx.AsyncClient(timeout=30) as http:
                firsts = [asyncio.Event() for _ in range(4)]
                body = {"model": MODEL, "prompt": "[slow] go", "max_tokens": 200,
                        "stream": True}
                tasks = [asyncio.create_task(_sse_end(http, s.url, body, f)) for f in firsts]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 10)
                s.server.should_exit = True
                t0 = time.monotonic()
                ends = await asyncio.wait_for(asyncio.gather(*tasks), 10)
                return ends, time.monotonic() - t0

        thread = threading.Thread(target=whole)
        thread.start()
        assert s.engine.wait_for(lambda m: getattr(m, "rid", "").startswith("chatcmpl-"))
        ends, seconds = asyncio.run(main())
        thread.join(10)
        s.thread.join(10)
        assert not s.thread.is_alive()                  # the server is gone
    r = results["whole"]
    report(record_property, "shutdown grace period", requests=5,
           failures=sum(not e.startswith("error") for e in ends) + (r.status_code != 503),
           seconds=seconds, outcomes=dict(collections.Counter(ends)))
    assert ends == ["error: generation failed: server is shutting down"] * 4
    assert grace <= seconds < grace + 3
    assert r.status_code == 503 and is_openai_error(r) and "shutting down" in r.text
