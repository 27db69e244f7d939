"""Qwen's two tool-call formats, both between the `<tool_call>` and `</tool_call>` tokens.

What it is: `Qwen3Parser` (Hermes style, Qwen2.5/Qwen3):
    <tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>
with the arguments object streamed as its text arrives; and `Qwen3CoderParser` (XML style,
Qwen3-Coder/Qwen3.5):
    <tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...
    </function>\\n</tool_call>
(wrapped to fit; the newlines of the format are the \\n), whose parameters become a JSON
object typed by the tool's JSON schema. These are what xgrammar's "qwen_3" and
"qwen_3_coder" structural tags force (any whitespace around the JSON, one newline around
each XML value). What it is not: the reasoning split (markup.py).

Hermes details: "parameters" is accepted for "arguments"; a call without arguments gets
"{}"; arguments given as a JSON string holding an object are unwrapped (sent in one piece).
XML details: a string value loses one leading and one trailing newline and is streamed as
it arrives; integer/number/boolean/null/object/array values are parsed (a value that does
not parse is kept as a string); a parameter the schema does not describe is a string.
"""
from __future__ import annotations

import json
from typing import Any

from tscompile.runtime.server.parsers.base import ParsedDelta
from tscompile.runtime.server.parsers.jsonscan import ObjectScan
from tscompile.runtime.server.parsers.markup import (CONTENT, TOOL, WHITESPACE, TokenParser,
                                                     json_escape)

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")
# A `<function=NAME>` / `<parameter=NAME>` header longer than this is not one.
MAX_HEADER_CHARS = 512


class _QwenBase(TokenParser):
    markup = (TOOL_CALL, TOOL_CALL_END)
    required = (TOOL_CALL, TOOL_CALL_END)

    def _tool_mark(self, tid: int, out: ParsedDelta) -> None:
        if tid == self.ids[TOOL_CALL] and self.mode == CONTENT:
            self._begin_region(self.spell(tid))
            self._begin_call()
        elif tid == self.ids[TOOL_CALL_END] and self.mode == TOOL:
            if self._close_call(out):
                self._end_region()
        elif self.mode == TOOL:
            self._break(out, tid)
        else:
            self._text(self.spell(tid), out)        # a stray </tool_call> in content

    def _begin_call(self) -> None:
        raise NotImplementedError

    def _close_call(self, out: ParsedDelta) -> bool:
        raise NotImplementedError


class Qwen3Parser(_QwenBase):
    family = "qwen3"

    def _begin_call(self) -> None:
        self._scan = ObjectScan()
        self._name: str | None = None
        self._args_key: str | None = None
        self._args_kind = ""                # "object" (streamed) | "string" (unwrapped)
        self._held: list[str] = []          # arguments text that came before the name
        self._closed = False

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        if self._closed:
            if text.strip(WHITESPACE):
                self._break(out)
            return
        for ev in self._scan.push(text):
            if not self._event(ev, out):
                self._break(out)
                return

    def _event(self, ev: tuple, out: ParsedDelta) -> bool:
        kind = ev[0]
        if kind == "start":
            if ev[1] in ARGUMENT_KEYS and self._args_key is None:
                if ev[2] not in '{"':
                    return False
                self._args_key = ev[1]
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
                self._start_call(name, out)
                for piece in self._held:
                    self._args(piece, out)
                self._held = []
            elif key == self._args_key and self._args_kind == "string":
                try:
                    inner = json.loads(raw)
                except ValueError:
                    return False
                self._emit(inner, out)
                self._args_kind = "done"
        elif kind == "done":
            self._closed = True
            if ev[1].strip(WHITESPACE):
                return False
        elif kind == "error":
            return False
        return True

    def _emit(self, piece: str, out: ParsedDelta) -> None:
        if self._open is not None:
            self._args(piece, out)
        else:
            self._held.append(piece)

    def _close_call(self, out: ParsedDelta) -> bool:
        if not self._closed or self._open is None:
            self._break(out, self.ids[TOOL_CALL_END])
            return False
        if self._args_key is None:
            self._args("{}", out)
        self._region.append(self.spell(self.ids[TOOL_CALL_END]))
        return self._end_call(out)


# ---------------------------------------------------------------- Qwen3-Coder (XML)

_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


def _schema_types(schema: Any) -> list[str]:
    """The JSON types a property's schema allows, in order (anyOf/oneOf branches too)."""
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        types = [t]
    elif isinstance(t, list):
        types = [x for x in t if isinstance(x, str)]
    else:
        types = []
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or ():
            types += _schema_types(branch)
    if not types:
        if "properties" in schema:
            types = ["object"]
        elif "items" in schema:
            types = ["array"]
    return types


def _value_json(raw: str, types: list[str]) -> str:
    """A parameter's text as JSON typed by its schema types (string when unsure)."""
    text = raw.strip(WHITESPACE)
    if text.lower() == "null" and "null" in types:
        return "null"
    for t in types:
        if t in ("integer", "int"):
            try:
                return str(int(text))
            except ValueError:
                continue
        if t in ("number", "float", "double"):
            try:
                value = json.loads(text)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return json.dumps(value, allow_nan=False)
            except ValueError:
                pass
            continue
        if t in ("boolean", "bool"):
            if text.lower() in ("true", "false"):
                return text.lower()
            continue
        if t in ("object", "array", "dict", "list"):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict if t in ("object", "dict") else list):
                return json.dumps(value, ensure_ascii=False)
    if text.lower() == "null" and types and not set(types) & _STRING_TYPES:
        return "null"
    return '"' + json_escape(_strip_one_newline(raw)) + '"'


def _strip_one_newline(raw: str) -> str:
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    return raw


def _partial_tail(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"


class Qwen3CoderParser(_QwenBase):
    family = "qwen3_coder"

    def _begin_call(self) -> None:
        self._x = "function"            # function -> body <-> value -> after
        self._buf = ""
        self._nparams = 0
        self._types: list[str] = []
        self._is_string = False
        self._first_char = True

    def _tool_text(self, text: str, out: ParsedDelta) -> None:
        self._buf += text
        while self.mode == TOOL and self._step(out):
            pass

    def _step(self, out: ParsedDelta) -> bool:
        """One move of the XML reader; False when it needs more text (or broke)."""
        if self._x == "value":
            return self._value(out)
        s = self._buf.lstrip(WHITESPACE)
        if not s:
            self._buf = ""
            return False
        if self._x == "after":
            self._break(out)
            return False
        if self._x == "function":
            return self._header(s, FUNCTION_OPEN, out)
        if s.startswith(FUNCTION_CLOSE):
            self._args("}" if self._nparams else "{}", out)
            self._buf, self._x = s[len(FUNCTION_CLOSE):], "after"
            return True
        if s.startswith(PARAMETER_OPEN):
            return self._header(s, PARAMETER_OPEN, out)
        if PARAMETER_OPEN.startswith(s) or FUNCTION_CLOSE.startswith(s):
            self._buf = s
            return False
        self._break(out)
        return False

    def _header(self, s: str, opener: str, out: ParsedDelta) -> bool:
        if not s.startswith(opener):
            if not opener.startswith(s):
                self._break(out)
            else:
                self._buf = s
            return False
        end = s.find(">", len(opener))
        if end < 0:
            if len(s) > MAX_HEADER_CHARS or "\n" in s or "<" in s[len(opener):]:
                self._break(out)
            else:
                self._buf = s
            return False
        name = s[len(opener):end].strip(WHITESPACE)
        if not name or "<" in name or "\n" in name:
            self._break(out)
            return False
        self._buf = s[end + 1:]
        if opener == FUNCTION_OPEN:
            self._start_call(name, out)
            self._x = "body"
            return True
        schema = self.tool_schemas.get(self._open.name)
        props = schema.get("properties") if isinstance(schema, dict) else None
        prop = props.get(name) if isinstance(props, dict) else None
        self._types = _schema_types(prop) if prop is not None else ["string"]
        self._is_string = not self._types or bool(set(self._types) & _STRING_TYPES)
        self._key = (("{" if self._nparams == 0 else ", ")
                     + json.dumps(name, ensure_ascii=False) + ": ")
        self._nparams += 1
        if self._is_string:
            self._args(self._key + '"', out)
        self._first_char = True
        self._searched = 0              # chars of the value already searched for its end
        self._x = "value"
        return True

    def _value(self, out: ParsedDelta) -> bool:
        buf = self._buf
        if self._is_string and self._first_char and buf:
            if buf.startswith("\n"):
                buf = buf[1:]
            self._first_char = False
        end = buf.find(PARAMETER_CLOSE, max(0, self._searched - len(PARAMETER_CLOSE) + 1))
        if end >= 0:
            raw, self._buf = buf[:end], buf[end + len(PARAMETER_CLOSE):]
            if self._is_string:
                self._args(json_escape(raw[:-1] if raw.endswith("\n") else raw) + '"', out)
            else:
                self._args(self._key + _value_json(raw, self._types), out)
            self._x = "body"
            return True
        if self._is_string:
            keep = _partial_tail(buf, PARAMETER_CLOSE)
            safe = buf[:len(buf) - keep]
            if safe.endswith("\n"):
                safe = safe[:-1]
            self._args(json_escape(safe), out)
            buf = buf[len(safe):]
        self._buf, self._searched = buf, len(buf)
        return False

    def _close_call(self, out: ParsedDelta) -> bool:
        if self._x == "body" and not self._buf.strip(WHITESPACE):
            self._args("}" if self._nparams else "{}", out)     # </function> left out
            self._x = "after"
        if self._x != "after" or self._buf.strip(WHITESPACE):
            self._break(out, self.ids[TOOL_CALL_END])
            return False
        self._region.append(self.spell(self.ids[TOOL_CALL_END]))
        return self._end_call(out)
