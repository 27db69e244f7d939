"""DeepSeek's tool calls: one section of calls, every marker a token of its vocabulary.

What it is: `DeepSeekV3Parser` (DeepSeek V3 / R1, xgrammar's "deepseek_r1" tag):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}
    \\n```<｜tool▁call▁end｜>\\n<｜tool▁call▁begin｜>...<｜tool▁calls▁end｜>
and `DeepSeekV31Parser` (V3.1 / V3.2-Exp, xgrammar's "deepseek_v3_1" tag):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>
    ...<｜tool▁calls▁end｜>
(wrapped to fit; the newlines of the format are the \\n). The arguments JSON is streamed as it arrives (V3's code fence and surrounding whitespace
dropped). Reasoning is `<think>`..`</think>`; a V3.1/R1 prompt that ends with `<think>`
starts the output inside reasoning (markup.py). What it is not: V3.2's DSML format.

Also accepted: whitespace between calls, a call outside a section, V3 without the fence
(`NAME\\n{...}`) and any call type before `<｜tool▁sep｜>` (the models only write "function").
"""
from __future__ import annotations

import re

from tscompile.runtime.server.parsers.base import ParsedDelta
from tscompile.runtime.server.parsers.markup import (CONTENT, WHITESPACE, ArgStream,
                                                     TokenParser)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
# V3: what may stand between <｜tool▁sep｜> and the arguments' first "{".
_V3_HEADER = re.compile(r"\s*([^\s`{]+)\s*(?:```(?:json)?\s*)?")
MAX_HEADER_CHARS = 512


class _DeepSeekBase(TokenParser):
    markup = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
    required = markup
    fenced = False

    def _tool_mark(self, tid: int, out: ParsedDelta) -> None:
        ids = self.ids
        if self.mode == CONTENT:
            if tid == ids[CALLS_BEGIN] or tid == ids[CALL_BEGIN]:
                self._begin_region(self.spell(tid))
                self._implicit = tid == ids[CALL_BEGIN]
                self._state = "section"
                if self._implicit:
                    self._begin_call()
            else:
                self._text(self.spell(tid), out)     # stray markup in content
            return
        state = self._state
        if state == "section" and tid == ids[CALL_BEGIN]:
            self._region.append(self.spell(tid))
            self._begin_call()
        elif state == "section" and tid == ids[CALLS_END]:
            self._end_region()
        elif state == "before_sep" and tid == ids[SEP]:
            self._region.append(self.spell(tid))
            self._after_sep(out)
        elif state == "args" and tid == ids[CALL_END]:
            self._region.append(self.spell(tid))
            if self._end_call(out):
                self._state = "section"
        else:
            self._break(out, tid)

    def _begin_call(self) -> None:
        self._state, self._buf = "before_sep", ""

    def _after_sep(self, out: ParsedDelta) -> None:
        raise NotImplementedError

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        if self._state == "before_sep":
            self._buf += text
        elif self._state == "args":
            self._args(self._stream.push(text), out)
        elif self._state == "name":
            self._name_text(text, out)
        elif text.strip(WHITESPACE):                # text between calls
            if self._implicit:
                self._end_region()
                self._text(text, out)
            else:
                self._break(out)

    def _name_text(self, text: str, out: ParsedDelta) -> None:
        raise NotImplementedError

    def _tool_finish(self, out: ParsedDelta) -> None:
        if self._state == "section" and self._open is None \
                and not "".join(self._region).strip(WHITESPACE):
            self._end_region()                      # calls done, section end left out
        else:
            self._break(out)


class DeepSeekV31Parser(_DeepSeekBase):
    family = "deepseek_v31"

    def _after_sep(self, out: ParsedDelta) -> None:
        name = self._buf.strip(WHITESPACE)
        if not name or any(c in name for c in "\n{}"):
            self._break(out)
            return
        self._start_call(name, out)
        self._state, self._stream = "args", ArgStream()


class DeepSeekV3Parser(_DeepSeekBase):
    family = "deepseek_v3"

    def _after_sep(self, out: ParsedDelta) -> None:
        self._state, self._buf = "name", ""     # the call type ("function") is not checked

    def _name_text(self, text: str, out: ParsedDelta) -> None:
        self._buf += text
        start = min((i for i in (self._buf.find("{"), self._buf.find("[")) if i >= 0),
                    default=-1)
        if start < 0:
            if len(self._buf) > MAX_HEADER_CHARS:
                self._break(out)
            return
        m = _V3_HEADER.fullmatch(self._buf[:start])
        if m is None:
            self._break(out)
            return
        self._start_call(m.group(1), out)
        self._state, self._stream = "args", ArgStream(WHITESPACE + "`")
        self._args(self._stream.push(self._buf[start:]), out)
