"""Incremental scanning of a JSON object's top-level members as its text streams in, so a
call's `"arguments"` value can be streamed before the object is complete.

What it is: `ValueScan` (where one JSON value's raw text ends: strings, escapes and nesting
tracked, nothing parsed) and `ObjectScan` (the members `{"key": value, ...}` of one object,
reported as events). What it is not: a validator: a value's text is checked with json.loads
once it is complete, by the caller.

ObjectScan.push(text) returns events, in order:
  ("key", key)            a member's key is complete;
  ("start", key, char)    its value starts with `char`;
  ("chunk", key, text)    the next raw text of that value;
  ("value", key, raw)     the value is complete (raw = all its text);
  ("done", rest)          the object closed; `rest` is the text after its `}`;
  ("error",)              the text cannot be a JSON object (nothing is scanned after it).
"""
from __future__ import annotations

import json
import re

_STR_STOP = re.compile(r'["\\]')
_BOX_STOP = re.compile(r'[\[\]{}"]')
_LITERAL = re.compile(r"[-+.0-9A-Za-z]*")
_WS = " \t\r\n"


class ValueScan:
    __slots__ = ("kind", "depth", "in_str", "esc", "done")

    def __init__(self) -> None:
        self.kind: str | None = None     # "str" | "box" | "lit"
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False

    def push(self, text: str, i: int) -> int:
        """Consume the value's characters from text[i:]; return where they stop (the value
        ends there when `done`; a literal's end is only known at the next character)."""
        n = len(text)
        if self.kind is None:
            c = text[i]
            if c == '"':
                self.kind, self.in_str = "str", True
                i += 1
            elif c in "{[":
                self.kind, self.depth = "box", 1
                i += 1
            else:
                self.kind = "lit"
        if self.kind == "lit":
            j = _LITERAL.match(text, i).end()
            self.done = j < n
            return j
        while i < n:
            if self.in_str:
                if self.esc:
                    self.esc = False
                    i += 1
                    continue
                m = _STR_STOP.search(text, i)
                if m is None:
                    return n
                i = m.end()
                if m.group() == "\\":
                    self.esc = True
                    continue
                self.in_str = False
                if self.kind == "str":
                    self.done = True
                    return i
                continue
            m = _BOX_STOP.search(text, i)
            if m is None:
                return n
            i = m.end()
            c = m.group()
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i
        return i


class ObjectScan:
    def __init__(self) -> None:
        # open -> first (key or "}") -> key -> colon -> vstart -> value -> next -> member ...
        self.state = "open"
        self.key: str | None = None
        self._scan = ValueScan()
        self._raw: list[str] = []

    @property
    def closed(self) -> bool:
        return self.state in ("done", "error", "closed", "failed")

    def push(self, text: str) -> list[tuple]:
        events: list[tuple] = []
        i, n = 0, len(text)
        while i < n and not self.closed:
            st = self.state
            if st in ("key", "value"):
                j = self._scan.push(text, i)
                piece, i = text[i:j], j
                if piece:
                    self._raw.append(piece)
                    if st == "value":
                        events.append(("chunk", self.key, piece))
                if not self._scan.done:
                    continue
                raw = "".join(self._raw)
                if st == "key":
                    try:
                        self.key = json.loads(raw)
                    except ValueError:
                        self.state = "error"
                        break
                    events.append(("key", self.key))
                    self.state = "colon"
                elif not raw:
                    self.state = "error"
                else:
                    events.append(("value", self.key, raw))
                    self.state = "next"
                continue
            c = text[i]
            if c in _WS:
                i += 1
            elif st == "open":
                if c != "{":
                    self.state = "error"
                    break
                self.state = "first"
                i += 1
            elif st in ("first", "member"):
                if c == '"':
                    self._scan, self._raw, self.state = ValueScan(), [], "key"
                elif c == "}" and st == "first":
                    self.state = "done"
                    i += 1
                else:
                    self.state = "error"
            elif st == "colon":
                if c != ":":
                    self.state = "error"
                    break
                self.state = "vstart"
                i += 1
            elif st == "vstart":
                self._scan, self._raw, self.state = ValueScan(), [], "value"
                events.append(("start", self.key, c))
            elif st == "next":
                if c == ",":
                    self.state = "member"
                elif c == "}":
                    self.state = "done"
                else:
                    self.state = "error"
                    break
                i += 1
        if self.state == "done":
            events.append(("done", text[i:]))
            self.state = "closed"
        elif self.state == "error":
            events.append(("error",))
            self.state = "failed"
        return events
