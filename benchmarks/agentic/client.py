"""The load generator: agent sessions against any OpenAI-compatible server, over asyncio.

What it is: `concurrency` workers; each takes the next session instance and runs its turns in
order, sending the whole history every turn (as agents do) with `stream=True` and
`stream_options.include_usage`, appending the server's actual reply and the next tool output,
sleeping `pause` seconds between turns (the tool running). Every request becomes one
`RequestRecord`: start, TTFT, the arrival time of every streamed content chunk, output /
prompt / cached tokens from the final usage chunk, errors. What it is not: metrics (metrics.py)
or a sweep (sweep.py); it never tokenizes (token counts come from the server's usage).

Concurrency counts sessions, as an agent fleet does: a session paused for its tool still
holds its slot (and, on tsrun, its pinned prefix), so the server sees fewer than
`concurrency` requests in flight whenever pauses are long.

Each session instance gets a unique tag at the start of its first user message, so replaying
a workload session at another level (or twice) never hits another instance's cached prefix;
the agent's system prompt before it stays shared, as it is across real agent sessions.

A session with `tools` (workload `--tool-format openai`) sends them, identical on every
turn, with `tool_choice: "auto"`; its history is the trajectory's own replies and calls
(each turn's messages open with them), never the server's, so every tool message answers a
call the history holds. The record counts the calls the server streamed back (`tool_calls`)
and keeps its finish_reason ("tool_calls" when it ended on one); a streamed call's argument
chunks count as token arrivals, as content chunks do.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from .workload import Session


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str                              # server root, e.g. http://127.0.0.1:8000
    model: str | None = None              # None: the first id of /v1/models
    pause: float = 1.0                    # seconds between a reply and the next turn
    duration: float | None = 120.0        # per level: no new turn starts after this
    sessions: int | None = None           # per level: session instances to run (None: no cap)
    ignore_eos: bool = True               # replies get the workload's length
    temperature: float = 0.0
    timeout: float = 900.0                # per request, seconds
    api_key: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r}: expected http(s)://host:port")
        if self.pause < 0:
            raise ValueError(f"pause must be >= 0 seconds, got {self.pause}")
        if self.duration is None and self.sessions is None:
            raise ValueError("a level needs an end: set duration or sessions")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.sessions is not None and self.sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {self.sessions}")


@dataclass(slots=True)
class RequestRecord:
    level: int                      # concurrency of the run that sent it
    session: str                    # the session instance (also the server's session id)
    source: str                     # the trajectory it is shaped by
    turn: int
    max_tokens: int
    start: float = 0.0              # seconds since the level started
    latency: float = 0.0            # request sent -> stream ended
    ttft: float | None = None       # request sent -> first content chunk
    token_times: list[float] = field(default_factory=list)  # chunk arrivals, since the request
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    tools: int = 0                  # tools declared in the request
    tool_calls: int = 0             # calls the response streamed back


def headers(cfg: ClientConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def server_model(http: httpx.AsyncClient, cfg: ClientConfig) -> str:
    r = await http.get(cfg.url.rstrip("/") + "/v1/models", headers=headers(cfg))
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{cfg.url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def request_body(cfg: ClientConfig, model: str, rec: RequestRecord,
                 messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The /v1/chat/completions body of one turn."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": rec.max_tokens,
                            "temperature": cfg.temperature, "stream": True,
                            "stream_options": {"include_usage": True}, "user": rec.session}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if tools:
        body["tools"] = tools
        body["tool_choice"] = "auto"
    return body


def turn_messages(s: Session, k: int, sid: str) -> list[dict[str, Any]]:
    """What turn k appends to the history: the workload's messages, the first user message
    of turn 0 tagged with the instance id (module docstring)."""
    new = [dict(m) for m in s.turns[k].messages]
    if k == 0:
        u = next(i for i, m in enumerate(new) if m["role"] == "user")
        new[u]["content"] = f"[{sid}]\n" + new[u]["content"]
    return new


async def chat(http: httpx.AsyncClient, cfg: ClientConfig, model: str, rec: RequestRecord,
               messages: list[dict[str, Any]], t_level: float,
               tools: list[dict[str, Any]] | None = None) -> str:
    """One streamed chat completion, filling `rec`; returns the reply text."""
    body = request_body(cfg, model, rec, messages, tools)
    rec.tools = len(tools or ())
    calls: set[tuple[int, int]] = set()
    hdrs = {**headers(cfg), "x-session-id": rec.session}
    text: list[str] = []
    t0 = time.perf_counter()
    rec.start = t0 - t_level
    try:
        async with http.stream("POST", cfg.url.rstrip("/") + "/v1/chat/completions",
                               json=body, headers=hdrs) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                        break
                    for c in chunk.get("choices") or []:
                        delta = c.get("delta") or {}
                        if content := delta.get("content"):
                            rec.token_times.append(time.perf_counter() - t0)
                            text.append(content)
                        elif delta.get("tool_calls"):
                            rec.token_times.append(time.perf_counter() - t0)
                        for t in delta.get("tool_calls") or ():
                            calls.add((c.get("index", 0), t.get("index", 0)))
                        rec.finish_reason = c.get("finish_reason") or rec.finish_reason
                    if usage := chunk.get("usage"):
                        rec.output_tokens = usage.get("completion_tokens")
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        rec.cached_tokens = details.get("cached_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    rec.latency = time.perf_counter() - t0
    rec.tool_calls = len(calls)
    rec.ttft = rec.token_times[0] if rec.token_times else None
    if rec.error is None and not rec.token_times:
        rec.error = "no content streamed"
    return "".join(text)


async def run_level(cfg: ClientConfig, sessions: list[Session], concurrency: int, *,
                    tag: str, max_turns: int | None = None,
                    model: str | None = None) -> list[RequestRecord]:
    """Run sessions `concurrency` at a time until `cfg.sessions` instances have run or
    `cfg.duration` has passed (then no new turn starts; requests in flight finish)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(cfg.timeout, connect=30.0)
    records: list[RequestRecord] = []
    total = None
    if cfg.sessions is not None:
        total = sum(min(len(sessions[j % len(sessions)].turns), max_turns or 10**9)
                    for j in range(cfg.sessions))
    bar = tqdm(total=total, desc=f"{tag} c={concurrency}", unit="req", leave=False,
               disable=not cfg.progress, dynamic_ncols=True)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        model = model or cfg.model or await server_model(http, cfg)
        t_level = time.perf_counter()
        deadline = t_level + cfg.duration if cfg.duration is not None else float("inf")
        next_instance = 0

        async def session_loop(j: int) -> None:
            s = sessions[j % len(sessions)]
            sid = f"{tag}-c{concurrency}-{j:04d}-{s.id}"
            history: list[dict[str, Any]] = []
            for k, turn in enumerate(s.turns[:max_turns]):
                if k and time.perf_counter() >= deadline:
                    return                                   # level over: truncate
                history += turn_messages(s, k, sid)
                rec = RequestRecord(concurrency, sid, s.source, k, turn.max_tokens)
                reply = await chat(http, cfg, model, rec, history, t_level, s.tools)
                records.append(rec)
                bar.update(1)
                if rec.error:
                    return                                   # the agent cannot go on
                if not s.tools:           # tool format: the next turn brings the trajectory's
                    history.append({"role": "assistant", "content": reply})
                if k + 1 < len(s.turns[:max_turns]) and cfg.pause:
                    await asyncio.sleep(cfg.pause)

        async def worker() -> None:
            nonlocal next_instance
            while time.perf_counter() < deadline and \
                    (cfg.sessions is None or next_instance < cfg.sessions):
                j, next_instance = next_instance, next_instance + 1
                await session_loop(j)

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            bar.close()
    return records


def run(cfg: ClientConfig, sessions: list[Session], concurrency: int, **kw: Any
        ) -> list[RequestRecord]:
    return asyncio.run(run_level(cfg, sessions, concurrency, **kw))
