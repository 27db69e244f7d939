"""What every output parser gives back: a choice's new tokens split into visible text,
reasoning text and tool-call pieces.

What it is: the shapes (`ToolCallDelta`, `ParsedDelta`, `ToolCall`), the `OutputParser`
protocol every model family's parser implements, and `PlainParser` (no reasoning, no tool
calls: every token is content). What it is not: a family's format (parsers/<family>.py) or
stop strings (output.py matches them on the content only).

Contract of an OutputParser (one per choice, fed the sampled token ids in order):
  * `feed(token_id)` -> the ParsedDelta that token completes ("" everywhere while text is
    held back: a partial UTF-8 character, or text that may still turn out to be markup);
  * `finish()` -> whatever is still held back once the request ended; a tool call that
    never closed comes back as content text, never an exception;
  * markup special tokens are matched by id (tokenizer.token_to_id), never by decoding;
  * for each call, the first delta carries `id` and `name`, and the concatenation of its
    `arguments` pieces is the call's final JSON text (`calls()` returns the same).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tscompile.runtime.server.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int                  # the call's position in this turn: 0, 1, ...
    id: str | None = None       # on the call's first delta only
    name: str | None = None     # on the call's first delta only
    arguments: str = ""         # the next piece of the call's JSON arguments


@dataclass(slots=True)
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str              # JSON text


class OutputParser(Protocol):
    def feed(self, token_id: int) -> ParsedDelta: ...
    def finish(self) -> ParsedDelta: ...
    def calls(self) -> list[ToolCall]: ...


class PlainParser:
    """Every token is content (no tools and no reasoning asked for)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)

    def feed(self, token_id: int) -> ParsedDelta:
        return ParsedDelta(content=self.detok.add(token_id))

    def finish(self) -> ParsedDelta:
        return ParsedDelta(content=self.detok.flush())

    def calls(self) -> list[ToolCall]:
        return []
