"""The machinery every token-level output parser shares: markup special tokens matched by
id, the text between them decoded incrementally, a `<think>`..`</think>` split, tool-call
bookkeeping and the fallback that turns a broken call back into content text.

What it is: `TokenParser`, the base class of the family parsers (kimi_k2.py, deepseek.py,
qwen3.py, llama3_json.py) and, used as is, the reasoning-only parser; `ArgStream` (a call's
arguments text with leading whitespace dropped and a tail held back until it is known not to
be the format's closing decoration); `token_id`. What it is not: any family's grammar (each
subclass implements `_tool_mark` / `_tool_text` / `_tool_finish`) or stop strings.

Modes of a choice's output, and what its text becomes:
  * CONTENT: content. Leading whitespace is dropped right after `</think>` and after a tool
    call; when tool calls are on, trailing whitespace is held until more content comes (a
    call that follows drops it; `finish()` sends it).
  * REASONING: reasoning, its leading and trailing whitespace dropped (the chat templates
    strip them too when the turn is rendered back).
  * TOOL: inside a call's markup; the family parser owns the text. Everything since the
    region began is kept (`_region`) so a call that breaks comes back as content, verbatim.
  * RAW: after a call broke: every token is content, markup spelled out as its text.
Markup that is not parsed (tools=False: tool markup; reasoning=False: `<think>` tokens) is
spelled out as its text too, so nothing silently disappears.

A call is reported (first delta: index, id, name) once its header is certain. If its
arguments later turn out malformed, or the request ends inside it, its text comes back as
content and it is left out of `calls()`; deltas already streamed for it cannot be taken back
(the index stays used, `broken` lists it). Everything after a broken call is content.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tscompile.runtime.server.detokenizer import (INITIAL_PREFIX_TOKENS, REPLACEMENT,
                                                   IncrementalDetokenizer)
from tscompile.runtime.server.parsers.base import ParsedDelta, ToolCall, ToolCallDelta

CONTENT, REASONING, TOOL, RAW = "content", "reasoning", "tool", "raw"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
WHITESPACE = " \t\r\n"
# A prompt whose last `<think>` is among its last this-many tokens, followed by whitespace
# only, leaves the output inside reasoning (DeepSeek V3.1/R1, Qwen3 thinking-2507, Kimi K2.5).
PROMPT_THINK_WINDOW = 16


def token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the single token spelled `text`, or None (tscompile.tokenizer.Tokenizer has
    no public lookup yet; its `tokenizers.Tokenizer` does)."""
    lookup = getattr(tokenizer, "token_to_id", None) or tokenizer._tok.token_to_id
    return lookup(text)


def random_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


def starts_in_reasoning(tokenizer: Any, prompt_ids: Sequence[int], open_id: int,
                        close_id: int) -> bool:
    tail = list(prompt_ids[-PROMPT_THINK_WINDOW:])
    for i in range(len(tail) - 1, -1, -1):
        if tail[i] == close_id:
            return False
        if tail[i] == open_id:
            return not tokenizer.decode(tail[i + 1:], skip_special_tokens=True).strip()
    return False


class _Detok(IncrementalDetokenizer):
    def cut(self) -> str:
        """Flush held text at a markup boundary (it belongs to the segment before the markup),
        keeping the decoded tail as context so the next text token decodes as it would in the
        whole sequence (a SentencePiece token keeps its leading space)."""
        if self.read_offset == len(self.ids):
            return ""
        text = self.flush()
        start = max(0, self.read_offset - INITIAL_PREFIX_TOKENS)
        if not self._decode(self.ids[start:self.read_offset]).endswith(REPLACEMENT):
            self.prefix_offset = start
        return text


class ArgStream:
    """A call's arguments text between two markers: leading whitespace dropped, a trailing
    run of `tail` characters held back until more text shows it is not the end (then the
    held run is dropped: it is whitespace, or DeepSeek V3's closing code fence)."""

    def __init__(self, tail: str = WHITESPACE):
        self.tail = tail
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip(WHITESPACE)
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip(self.tail)
        self.held = text[len(body):]
        return body


@dataclass(slots=True)
class _Call:
    index: int
    id: str
    name: str
    parts: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return "".join(self.parts)


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One delta per call and run: a call's header and its first argument pieces from one
    token come out as one delta."""
    merged: list[ToolCallDelta] = []
    for d in deltas:
        if merged and merged[-1].index == d.index and d.id is None and d.name is None:
            p = merged[-1]
            merged[-1] = ToolCallDelta(p.index, p.id, p.name, p.arguments + d.arguments)
        elif d.id is None and d.name is None and not d.arguments:
            continue
        else:
            merged.append(d)
    return merged


class TokenParser:
    """Reasoning split plus tool-call bookkeeping; subclasses add their markup."""

    family: str | None = None
    markup: tuple[str, ...] = ()        # tool markup tokens, matched by id
    required: tuple[str, ...] = ()      # of which the tokenizer must have these
    hold_trailing_ws = True             # may a call follow content (then hold its whitespace)?

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, tools: bool = True,
                 reasoning: bool = True, call_id: Callable[[int], str] | None = None,
                 tool_schemas: Mapping[str, Any] | None = None):
        self.tok = tokenizer
        self._spellings: dict[int, str] = {}
        self.tools = tools
        self.tool_schemas = dict(tool_schemas or {})
        self._call_id = call_id or random_call_id
        self.detok = _Detok(tokenizer, prompt_ids)
        self.ids: dict[str, int | None] = {m: token_id(tokenizer, m) for m in self.markup}
        missing = [m for m in self.required if self.ids.get(m) is None]
        if tools and missing:
            raise ValueError(f"tool-call parser {self.family!r}: the tokenizer has no "
                             f"{', '.join(map(repr, missing))} token")
        markup_ids = {i for i in self.ids.values() if i is not None}
        think_open, think_close = token_id(tokenizer, THINK_OPEN), token_id(tokenizer, THINK_CLOSE)
        has_think = think_open is not None and think_close is not None
        self.think_open = think_open if reasoning and has_think else None
        self.think_close = think_close if reasoning and has_think else None
        # Ids this parser acts on, and ids it only spells out as text.
        self._structural: set[int] = set(markup_ids) if tools else set()
        self._spelled: set[int] = set() if tools else set(markup_ids)
        for t in (think_open, think_close):
            if t is not None:
                (self._structural if self.think_open is not None else self._spelled).add(t)
        self.mode = CONTENT
        if self.think_open is not None and starts_in_reasoning(tokenizer, prompt_ids,
                                                               self.think_open, self.think_close):
            self.mode = REASONING
        self._reason_lstrip = True
        self._reason_ws = ""
        self._content_lstrip = False
        self._content_ws = ""
        self._region: list[str] = []        # TOOL: the literal text since the region began
        self._open: _Call | None = None     # the call being streamed
        self._next_index = 0
        self._done: list[_Call] = []
        self.broken: list[int] = []         # indexes of streamed calls that broke

    # ------------------------------------------------------------------ the protocol

    def feed(self, token_id: int) -> ParsedDelta:
        out = ParsedDelta()
        if token_id in self._structural and self.mode != RAW:
            self._text(self.detok.cut(), out)
            self._mark(token_id, out)
        elif token_id in self._structural or token_id in self._spelled:
            self._text(self.detok.cut(), out)
            self._text(self.spell(token_id), out)
        else:
            self._text(self.detok.add(token_id), out)
        out.tool_calls = _merge(out.tool_calls)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._text(self.detok.flush(), out)
        if self.mode == TOOL:
            self._tool_finish(out)
        if self.mode == CONTENT:
            self._content_finish(out)
        out.tool_calls = _merge(out.tool_calls)
        return out

    def calls(self) -> list[ToolCall]:
        return [ToolCall(c.id, c.name, c.arguments) for c in self._done]

    # ------------------------------------------------------------------ text routing

    def spell(self, token_id: int) -> str:
        """A markup token as text (its decoding, special or not)."""
        text = self._spellings.get(token_id)
        if text is None:
            text = self._spellings[token_id] = self.tok.decode([token_id],
                                                               skip_special_tokens=False)
        return text

    def _text(self, text: str, out: ParsedDelta) -> None:
        if not text:
            return
        if self.mode == CONTENT:
            self._content_text(text, out)
        elif self.mode == REASONING:
            self._reasoning_text(text, out)
        elif self.mode == TOOL:
            self._region.append(text)
            self._tool_text(text, out)
        else:
            out.content += text

    def _content_text(self, text: str, out: ParsedDelta) -> None:
        if self._content_lstrip:
            text = text.lstrip(WHITESPACE)
            if not text:
                return
            self._content_lstrip = False
        if self.tools and self.hold_trailing_ws:
            text = self._content_ws + text
            body = text.rstrip(WHITESPACE)
            self._content_ws = text[len(body):]
            text = body
        out.content += text

    def _content_finish(self, out: ParsedDelta) -> None:
        out.content += self._content_ws
        self._content_ws = ""

    def _reasoning_text(self, text: str, out: ParsedDelta) -> None:
        if self._reason_lstrip:
            text = text.lstrip(WHITESPACE)
            if not text:
                return
            self._reason_lstrip = False
        text = self._reason_ws + text
        body = text.rstrip(WHITESPACE)
        self._reason_ws = text[len(body):]
        out.reasoning += body

    # ------------------------------------------------------------------ markup

    def _mark(self, tid: int, out: ParsedDelta) -> None:
        if tid == self.think_open or tid == self.think_close:
            if self.mode == TOOL:                       # inside a call it is just text
                self._text(self.spell(tid), out)
            elif tid == self.think_open:
                if self.mode == CONTENT:
                    self._content_ws = ""
                    self.mode = REASONING
                    self._reason_lstrip, self._reason_ws = True, ""
                # a second <think> inside reasoning is dropped
            elif self.mode == REASONING:
                self._end_reasoning()
            # a stray </think> in content is dropped
            return
        if self.mode == REASONING and not self._mark_ends_reasoning(tid):
            self._text(self.spell(tid), out)            # tool markup inside reasoning is text
            return
        if self.mode == REASONING:
            self._end_reasoning()
        self._tool_mark(tid, out)

    def _end_reasoning(self) -> None:
        self._reason_ws = ""
        self.mode = CONTENT
        self._content_lstrip = True

    def _mark_ends_reasoning(self, tid: int) -> bool:
        """Does this tool markup token end an unclosed reasoning block (Kimi)?"""
        return False

    # Family hooks. _tool_mark: a structural tool markup id in CONTENT or TOOL mode.
    def _tool_mark(self, tid: int, out: ParsedDelta) -> None:
        self._text(self.spell(tid), out)

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        self._break(out)

    def _tool_finish(self, out: ParsedDelta) -> None:
        """The request ended in TOOL mode: by default whatever is open is broken."""
        if self._open is not None or "".join(self._region).strip(WHITESPACE):
            self._break(out)
        else:
            self._end_region()

    # ------------------------------------------------------------------ helpers for families

    def _begin_region(self, literal: str) -> None:
        # Held whitespace before the markup is dropped, unless the call breaks: then it
        # comes back with the call's text.
        self._region = [self._content_ws, literal]
        self._content_ws = ""
        self._content_lstrip = False
        self.mode = TOOL

    def _end_region(self) -> None:
        self.mode = CONTENT
        self._content_lstrip = True
        self._region = []

    def _start_call(self, name: str, out: ParsedDelta, call_id: str | None = None) -> _Call:
        index = self._next_index
        self._next_index += 1
        call = _Call(index, call_id or self._call_id(index), name)
        self._open = call
        out.tool_calls.append(ToolCallDelta(index, call.id, name, ""))
        return call

    def _args(self, piece: str, out: ParsedDelta) -> None:
        assert self._open is not None
        if piece:
            self._open.parts.append(piece)
            out.tool_calls.append(ToolCallDelta(self._open.index, arguments=piece))

    def _end_call(self, out: ParsedDelta) -> bool:
        """Close the open call: kept if its arguments are a JSON object, else broken."""
        call = self._open
        assert call is not None
        try:
            ok = isinstance(json.loads(call.arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            self._break(out)
            return False
        self._done.append(call)
        self._open = None
        self._region = []
        return True

    def _break(self, out: ParsedDelta, tid: int | None = None) -> None:
        """The current region is not a well-formed call: its text is content, and so is
        everything after it (with `tid`, the token that showed it)."""
        if self._open is not None:
            self.broken.append(self._open.index)
            self._open = None
        out.content += "".join(self._region)
        self._region = []
        self.mode = RAW
        if tid is not None:
            out.content += self.spell(tid)


def json_escape(text: str) -> str:
    """`text` as the inside of a JSON string (escaping is per character, so pieces escaped
    separately concatenate to the whole escaped)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
