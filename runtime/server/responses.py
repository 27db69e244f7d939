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
class ChoiceResult:
    """A choice accumulated for a non-streaming response (pieces joined once, at the end:
    `text += piece` would copy the whole text per token)."""
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobAt] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, d: ChoiceDelta) -> None:
        self.pieces.append(d.text)
        self.logprobs.extend(d.logprobs)
        self.finish_reason = d.finish_reason or self.finish_reason


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


def chat_body(meta: ResponseMeta, table: TokenTable, choices: list[ChoiceResult],
              usage: dict[str, Any], want_logprobs: bool) -> dict[str, Any]:
    return _envelope(meta, "chat.completion", [
        {"index": i, "message": {"role": "assistant", "content": c.text},
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
