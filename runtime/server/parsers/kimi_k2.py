"""Kimi K2 / K2.5 tool calls, all markup being special tokens:

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>
(no newlines: those here only fit the line)

What it is: `KimiK2Parser`. The call's id is the model's own "functions.NAME:IDX" (the chat
template sends it back as tool_call_id); the arguments JSON is streamed between
`<|tool_call_argument_begin|>` and `<|tool_call_end|>` (surrounding whitespace dropped).
This is what xgrammar's "kimi" structural tag forces (calls back to back, no separator); we
also accept whitespace between calls, a call outside a section, a header without the
"functions." prefix, and a section that starts before `</think>` (K2 thinking models may go
straight from reasoning to calls: the section ends the reasoning). What it is not: Kimi K3's
format (different markup).
"""
from __future__ import annotations

import re

from tscompile.runtime.server.parsers.base import ParsedDelta
from tscompile.runtime.server.parsers.markup import (CONTENT, TOOL, WHITESPACE, ArgStream,
                                                     TokenParser)

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
_HEADER = re.compile(r"(?:functions\.)?([^\s:]+(?:[^\n:]*[^\s:])?):(\d+)")


class KimiK2Parser(TokenParser):
    family = "kimi_k2"
    markup = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
    required = markup

    def _mark_ends_reasoning(self, tid: int) -> bool:
        return tid in (self.ids[SECTION_BEGIN], self.ids[CALL_BEGIN])

    def _tool_mark(self, tid: int, out: ParsedDelta) -> None:
        ids = self.ids
        if self.mode == CONTENT:
            if tid == ids[SECTION_BEGIN] or tid == ids[CALL_BEGIN]:
                self._begin_region(self.spell(tid))
                self._state, self._implicit = "section", tid == ids[CALL_BEGIN]
                if self._implicit:
                    self._state, self._header = "header", ""
            else:
                self._text(self.spell(tid), out)     # stray markup in content
            return
        state = self._state
        if state == "section" and tid == ids[CALL_BEGIN]:
            self._region.append(self.spell(tid))
            self._state, self._header = "header", ""
        elif state == "section" and tid == ids[SECTION_END]:
            self._end_region()
        elif state == "header" and tid == ids[ARGUMENT_BEGIN]:
            m = _HEADER.fullmatch(self._header.strip(WHITESPACE))
            if m is None:
                self._break(out, tid)
                return
            self._region.append(self.spell(tid))
            self._start_call(m.group(1), out, call_id=m.group(0))
            self._state, self._stream = "args", ArgStream()
        elif state == "args" and tid == ids[CALL_END]:
            self._region.append(self.spell(tid))
            if self._end_call(out):
                self._state = "section"
        else:
            self._break(out, tid)

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        if self._state == "header":
            self._header += text
        elif self._state == "args":
            self._args(self._stream.push(text), out)
        elif text.strip(WHITESPACE):                # text between calls
            if self._implicit:                      # calls outside a section, then text
                self._end_region()
                self._text(text, out)
            else:
                self._break(out)

    def _tool_finish(self, out: ParsedDelta) -> None:
        if self.mode == TOOL and self._state == "section" and self._open is None \
                and not "".join(self._region).strip(WHITESPACE):
            self._end_region()                      # calls done, section end left out
        else:
            self._break(out)
