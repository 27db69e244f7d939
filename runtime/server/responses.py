"""OpenAI response bodies: chat and text completions, whole or as SSE chunks.

What it is: pure functions from `ChoiceDelta`s / accumulated choices to the JSON shapes of
the OpenAI API (chat: `choices[].logprobs.content[]` with token/logprob/bytes/top_logprobs;
completions: `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`). What it is not:
generation or validation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tscompile.runtime.server.detokenizer import TokenTable
from tscompile.runtime.server.output import ChoiceDelta, TokenLogprobAt
from tscompile.runtime.server.parsers.base import ToolCall, ToolCallDelta

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    id: str                 # "chatcmpl-..." / "cmpl-..."
    created: int            # unix seconds
    model: str
    top_logprobs: int = 0   # how many alternatives to show per token


@dataclass(slots=True)
class _CallParts:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceResult:
    """A choice accumulated for a non-streaming response (pieces joined once, at the end:
    `text += piece` would copy the whole text per token). Tool calls are assembled from
    their deltas exactly as a streaming client would assemble them."""
    pieces: list[str] = field(default_factory=list)
    reasoning_pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobAt] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    _calls: dict[int, _CallParts] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_pieces)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c.id, c.name, "".join(c.arguments))
                for _, c in sorted(self._calls.items())]

    def add(self, d: ChoiceDelta) -> None:
        self.pieces.append(d.text)
        self.reasoning_pieces.append(d.reasoning)
        self.logprobs.extend(d.logprobs)
        for t in d.tool_calls:
            if t.index not in self._calls:
                self._calls[t.index] = _CallParts(t.id or "", t.name or "")
            self._calls[t.index].arguments.append(t.arguments)
        self.finish_reason = d.finish_reason or self.finish_reason
        self.stop_string = d.stop_string or self.stop_string


# ------------------------------------------------------------------ logprobs

def chat_logprobs(table: TokenTable, entries: list[TokenLogprobAt], k: int) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        token, raw = table.info(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    return {"content": [one(e.lp.token_id, e.lp.logprob)
                        | {"top_logprobs": [one(t, lp) for t, lp in e.lp.top[:k]]}
                        for e in entries]}


def completion_logprobs(table: TokenTable, entries: list[TokenLogprobAt],
                        k: int) -> dict[str, Any]:
    """OpenAI shows the sampled token among the alternatives too (up to k+1 of them)."""
    tops = []
    for e in entries:
        top = {table.info(t)[0]: lp for t, lp in e.lp.top[:k]}
        top.setdefault(table.info(e.lp.token_id)[0], e.lp.logprob)
        tops.append(top)
    return {"tokens": [table.info(e.lp.token_id)[0] for e in entries],
            "token_logprobs": [e.lp.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.text_offset for e in entries]}


# ------------------------------------------------------------------ chat

def chat_chunk(meta: ResponseMeta, index: int, delta: dict[str, Any], *,
               logprobs: dict[str, Any] | None = None, finish_reason: str | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    return _chunk(meta, "chat.completion.chunk", {"index": index, "delta": delta,
                  "logprobs": logprobs, "finish_reason": finish_reason}, include_usage)


def chat_delta(d: ChoiceDelta) -> dict[str, Any]:
    """A chunk's `delta`: the content, the reasoning (as `reasoning_content`, vLLM's and
    DeepSeek's name, and `reasoning`, OpenRouter's and vLLM's newer one) and tool-call
    pieces in OpenAI's chunk format (the first piece of a call has its id, type and name;
    later ones only its index and the next piece of arguments)."""
    delta: dict[str, Any] = {}
    if d.text or not (d.finish_reason or d.reasoning or d.tool_calls):
        delta["content"] = d.text
    if d.reasoning:
        delta["reasoning_content"] = delta["reasoning"] = d.reasoning
    if d.tool_calls:
        delta["tool_calls"] = [_call_delta(t) for t in d.tool_calls]
    return delta


def _call_delta(t: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": t.index}
    if t.id is not None:
        out["id"], out["type"] = t.id, "function"
    fn: dict[str, Any] = {"arguments": t.arguments}
    if t.name is not None:
        fn["name"] = t.name
    out["function"] = fn
    return out


def chat_message(c: ChoiceResult) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text or None}
    if c.reasoning:
        msg["reasoning_content"] = msg["reasoning"] = c.reasoning
    if calls := c.tool_calls:
        msg["tool_calls"] = [{"id": t.id, "type": "function",
                              "function": {"name": t.name, "arguments": t.arguments}}
                             for t in calls]
    elif msg["content"] is None:
        msg["content"] = ""
    return msg


def chat_body(meta: ResponseMeta, table: TokenTable, choices: list[ChoiceResult],
              usage: dict[str, Any], want_logprobs: bool) -> dict[str, Any]:
    return _envelope(meta, "chat.completion", [
        {"index": i, "message": chat_message(c),
         "logprobs": (chat_logprobs(table, c.logprobs, meta.top_logprobs)
                      if want_logprobs else None),
         "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)], usage=usage)


# ------------------------------------------------------------------ completions

def completion_chunk(meta: ResponseMeta, index: int, text: str, *,
                     logprobs: dict[str, Any] | None = None, finish_reason: str | None = None,
                     include_usage: bool = False) -> dict[str, Any]:
    return _chunk(meta, "text_completion", {"index": index, "text": text,
                  "logprobs": logprobs, "finish_reason": finish_reason}, include_usage)


def completion_body(meta: ResponseMeta, table: TokenTable, choices: list[ChoiceResult],
                    usage: dict[str, Any], want_logprobs: bool) -> dict[str, Any]:
    return _envelope(meta, "text_completion", [
        {"index": i, "text": c.text,
         "logprobs": (completion_logprobs(table, c.logprobs, meta.top_logprobs)
                      if want_logprobs else None),
         "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)], usage=usage)


def usage_chunk(meta: ResponseMeta, obj: str, usage: dict[str, Any]) -> dict[str, Any]:
    return _envelope(meta, obj, [], usage=usage)


def _envelope(meta: ResponseMeta, obj: str, choices: list[dict[str, Any]],
              **extra: Any) -> dict[str, Any]:
    """The fields every response and chunk starts with, then `extra` (usage)."""
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
            "choices": choices, **extra}


def _chunk(meta: ResponseMeta, obj: str, choice: dict[str, Any],
           include_usage: bool) -> dict[str, Any]:
    """A streamed chunk of one choice; `usage: null` when the client asked for usage."""
    return _envelope(meta, obj, [choice], **({"usage": None} if include_usage else {}))
