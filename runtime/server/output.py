"""One choice of a request: engine `RequestOutput`s in, content / reasoning / tool-call
deltas out.

What it is: per-choice state (the output parser, which detokenizes and splits reasoning and
tool calls off by token id; the stop matcher; token count; usage) turning each
RequestOutput into a `ChoiceDelta` the routes format as chunks or accumulate. Stop strings
are matched on the content only (never inside reasoning or a tool call's arguments). A
choice that made tool calls and ended on a stop token finishes with "tool_calls".
What it is not: the wire format (openai_api.py, anthropic_api.py, responses_api.py) or the
fan-out over n choices (serving.py).

Order inside one RequestOutput: tokens are taken one at a time, so a stop string that
completes at token j drops tokens j+1.. of the same step (they are not counted either);
the caller then sends `Abort(rid, "stop")` because the engine does not know stop strings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tscompile.runtime.protocol import RequestOutput, TokenLogprob
from tscompile.runtime.server.detokenizer import StopMatcher
from tscompile.runtime.server.parsers.base import (OutputParser, ParsedDelta, PlainParser,
                                                   ToolCall, ToolCallDelta)


@dataclass(frozen=True, slots=True)
class TokenLogprobAt:
    """A sampled token's logprobs and where its text starts in the choice's text."""
    lp: TokenLogprob
    text_offset: int


@dataclass(frozen=True, slots=True)
class ChoiceUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str = ""                     # content
    logprobs: list[TokenLogprobAt] = field(default_factory=list)
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | "tool_calls" | "abort" | "error"
    error: str | None = None
    usage: ChoiceUsage | None = None   # set on the finishing delta
    stop_string: str | None = None     # the stop string that ended it (finishing delta)


class ChoiceProcessor:
    def __init__(self, index: int, tokenizer: Any, prompt_ids: Sequence[int],
                 stops: Sequence[str] = (), *, want_logprobs: bool = False,
                 parser: OutputParser | None = None):
        self.index = index
        self.prompt_tokens = len(prompt_ids)
        self.parser = parser or PlainParser(tokenizer, prompt_ids)
        self.stop = StopMatcher(stops)
        self.want_logprobs = want_logprobs
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.stopped_by_string = False

    def process(self, out: RequestOutput) -> ChoiceDelta:
        if self.finish_reason is not None:
            raise RuntimeError(f"choice {self.index} got output after finishing: {out}")
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        delta = ChoiceDelta(self.index)
        if out.finish_reason == "error":
            self.finish_reason = delta.finish_reason = "error"
            delta.error = out.error or "engine error"
            delta.usage = self.usage()
            return delta
        lps = out.logprobs if self.want_logprobs else ()
        for j, token_id in enumerate(out.token_ids):
            offset = self.stop.length
            self.completion_tokens += 1
            if j < len(lps):
                delta.logprobs.append(TokenLogprobAt(lps[j], offset))
            if self._take(delta, self.parser.feed(token_id)):
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and out.finish_reason is not None:
            self._take(delta, self.parser.finish())
            self.finish_reason = "stop" if self.stopped_by_string else out.finish_reason
            if self.finish_reason == "stop" and self.parser.calls():
                self.finish_reason = "tool_calls"
        delta.finish_reason = self.finish_reason
        delta.text = self.stop.take(final=self.finish_reason is not None)
        if self.finish_reason is not None:
            delta.usage = self.usage()
            delta.stop_string = self.stop.matched
        return delta

    def _take(self, delta: ChoiceDelta, parsed: ParsedDelta) -> bool:
        """Add one token's parsed pieces; True once a stop string matched the content."""
        delta.reasoning += parsed.reasoning
        delta.tool_calls.extend(parsed.tool_calls)
        if parsed.content and self.stop.feed(parsed.content):
            self.stopped_by_string = True
        return self.stopped_by_string

    def calls(self) -> list[ToolCall]:
        return self.parser.calls()

    def usage(self) -> ChoiceUsage:
        return ChoiceUsage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
