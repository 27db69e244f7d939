"""Llama 3.x JSON tool calls (and SmolLM2's, whose chat template asks for the same): no
markup tokens, so the output is a call only if its text says so.

What it is: `Llama3JsonParser`. An output whose first non-space character is `{` or `[`
is held back and read as calls:
    {"name": "NAME", "parameters": {...}}            ("arguments" is accepted too)
    {...}; {...}   or   {...}{...}   or   [{...}, {...}]
optionally after Llama 3.1's `<|python_tag|>` token (when the tokenizer has it). This is
what xgrammar's "llama" structural tag produces when the output starts with a call. A call
is certain once its object has a "name" and an arguments key (a "type" key may come too);
from then on the arguments stream as they arrive. An object that is not a call (another key
first, `{"name": ...}` without arguments, invalid JSON) before anything was streamed sends
the held text as content, byte for byte; text after complete calls is content too.
What it is not: Llama 3.1's builtin-tool syntax (`<|python_tag|>brave_search.call(...)`
stays content) or Llama 4's pythonic format.
"""
from __future__ import annotations

import json

from tscompile.runtime.server.parsers.base import ParsedDelta
from tscompile.runtime.server.parsers.jsonscan import ObjectScan
from tscompile.runtime.server.parsers.markup import CONTENT, TOOL, WHITESPACE, TokenParser

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonParser(TokenParser):
    family = "llama3_json"
    markup = (PYTHON_TAG,)
    required = ()
    hold_trailing_ws = False            # calls only start an output, never follow text

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deciding = self.tools     # until the first non-space character of content
        self._lead = ""
        self._j = ""                    # where the JSON reader is, between objects
        self._in_list = False

    # ---------------------------------------------------------------- content / decision

    def _content_text(self, text: str, out: ParsedDelta) -> None:
        if not self._deciding:
            super()._content_text(text, out)
            return
        lead = self._lead + text
        if self._content_lstrip:        # right after </think>
            lead = lead.lstrip(WHITESPACE)
        s = lead.lstrip(WHITESPACE)
        if not s:
            self._lead = lead
            return
        self._deciding, self._lead = False, ""
        if s[0] not in "{[":
            super()._content_text(lead, out)
            return
        self._begin_region(lead)
        self._in_list = s[0] == "["
        self._j = "list" if self._in_list else "top"
        self._json(s[1:] if self._in_list else s, out)

    def _content_finish(self, out: ParsedDelta) -> None:
        if self._lead:
            out.content += self._lead
            self._lead = ""
        super()._content_finish(out)

    def _tool_mark(self, tid: int, out: ParsedDelta) -> None:
        if self.mode == CONTENT and self._deciding and not self._lead.strip(WHITESPACE):
            return                      # <|python_tag|> before the calls
        self._text(self.spell(tid), out)

    # ---------------------------------------------------------------- the calls

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        self._json(text, out)

    def _new_object(self) -> None:
        self._j = "obj"
        self._scan = ObjectScan()
        self._name: str | None = None
        self._args_key: str | None = None
        self._args_kind = ""
        self._held: list[str] = []

    def _json(self, text: str, out: ParsedDelta) -> None:
        while text and self.mode == TOOL:
            if self._j == "obj":
                rest = ""
                for ev in self._scan.push(text):
                    ok = self._event(ev, out)
                    if not ok:
                        if self.mode == TOOL:
                            self._reject(out)
                        return
                    if ev[0] == "done":
                        rest = ev[1]
                text = rest
                continue
            s = text.lstrip(WHITESPACE)
            if not s:
                return
            c, j = s[0], self._j
            if c == "{" and j in ("top", "list", "list_item", "between"):
                self._new_object()
                text = s
            elif j == "between" and c == ";":
                self._j, text = "top", s[1:]
            elif j == "list_next" and c == ",":
                self._j, text = "list_item", s[1:]
            elif j == "list_next" and c == "]":
                self._j, text = "after", s[1:]
            elif j in ("between", "list_next", "after") and self._done:
                self._trailing(out)
                return
            else:
                self._reject(out)
                return

    def _event(self, ev: tuple, out: ParsedDelta) -> bool:
        kind = ev[0]
        if kind == "key":
            key = ev[1]
            if self._open is None:
                if key in ARGUMENT_KEYS and self._args_key is None:
                    self._args_key = key
                    if self._name is not None:
                        self._commit(out)
                elif key not in ("name", "type"):
                    return False
        elif kind == "start":
            if ev[1] == self._args_key and not self._args_kind:
                if ev[2] not in '{"':
                    return False
                self._args_kind = "object" if ev[2] == "{" else "string"
        elif kind == "chunk":
            if ev[1] == self._args_key and self._args_kind == "object":
                self._emit(ev[2], out)
        elif kind == "value":
            key, raw = ev[1], ev[2]
            if key == "name" and self._name is None:
                try:
                    name = json.loads(raw)
                except ValueError:
                    return False
                if not isinstance(name, str) or not name:
                    return False
                self._name = name
                if self._args_key is not None:
                    self._commit(out)
            elif key == self._args_key and self._args_kind == "string":
                try:
                    self._emit(json.loads(raw), out)
                except ValueError:
                    return False
                self._args_kind = "done"
        elif kind == "done":
            if self._open is None:
                return False
            if not self._end_call(out):
                return False
            self._region = [ev[1]]       # the text after the object starts the next region
            self._j = "list_next" if self._in_list else "between"
        elif kind == "error":
            return False
        return True

    def _commit(self, out: ParsedDelta) -> None:
        self._start_call(self._name, out)
        for piece in self._held:
            self._args(piece, out)
        self._held = []

    def _emit(self, piece: str, out: ParsedDelta) -> None:
        if self._open is not None:
            self._args(piece, out)
        else:
            self._held.append(piece)

    def _reject(self, out: ParsedDelta) -> None:
        """Not a call: the held text is content, and so is the rest of the output."""
        if self._open is not None:
            self._break(out)
            return
        text = "".join(self._region)
        self._end_region()
        self._content_lstrip = False
        out.content += text

    def _trailing(self, out: ParsedDelta) -> None:
        """Text after complete calls: content."""
        text = "".join(self._region)
        self._end_region()
        self._content_text(text, out)

    def _tool_finish(self, out: ParsedDelta) -> None:
        if self._j == "obj":
            self._reject(out)
        elif "".join(self._region).strip(WHITESPACE + ";,]") or not self._done:
            self._reject(out)
        else:
            self._end_region()
