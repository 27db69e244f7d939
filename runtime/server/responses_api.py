"""The OpenAI Responses API: `POST /v1/responses` (whole or streamed), `GET` and `DELETE
/v1/responses/{id}` for stored responses, so Codex and the `openai` SDK's
`client.responses` run against tsrun unchanged.

What it is: the request schema (strict, like schemas.py: an unknown field is a 400 naming
it, and so is an OpenAI field tsrun does not implement unless its value changes nothing),
the mapping of Responses input items and tools onto the chat pipeline's `ChatTurn`
(chat.py renders, constrains and parses; nothing here re-implements that), the
`ResponseEncoder` that turns the choice's deltas into output items and the stream's events,
and an in-memory store of the last `MAX_STORED` responses (least recently used goes first)
for `previous_response_id`, GET and DELETE.

Input items -> chat messages: `message` (roles user / system / developer / assistant;
content a string or `input_text` / `output_text` / `refusal` parts; also the short form
`{"role", "content"}`), `reasoning` (its `content` reasoning_text, else tsrun's own
`encrypted_content`, else its summary) and `function_call` / `custom_tool_call` items
become ONE assistant message (reasoning_content, content, tool_calls) per run of
consecutive assistant items, so an earlier turn re-renders as the model wrote it and the
prefix cache hits; `function_call_output` / `custom_tool_call_output` become `tool`
messages (an output whose call_id no earlier item made is a 400). `instructions` is a
system message first; with `previous_response_id` the prompt is that response's input
items + its output items + the new input (its instructions are not carried over, as
OpenAI documents).

Tools: `function` tools map 1:1. A `custom` tool is shown to the model (and the template) as
a function with one string parameter `input`; a call of it comes back as a
`custom_tool_call` item whose `input` is that string (streamed as
`response.custom_tool_call_input.delta`s). Its `format`: "text" is free text; a "grammar"
format's definition is written into the parameter's description, and a "regex" one also
becomes the parameter's JSON Schema `pattern`, which the forced-call grammar enforces when
`tool_choice` names that tool. A "lark" grammar is never enforced (under "auto" no custom
grammar is; forced, the call and its JSON are, the string's content not). Hosted tools
(web_search, file_search, code_interpreter, mcp, local_shell, ...) are a 400 naming them.

Accepted and not acted on (echoed back): `reasoning.summary` (no summaries are generated:
`summary` is always []), `text.verbosity`, `max_tool_calls` (it limits hosted tools only).
`reasoning.effort` "none" / "minimal" turn thinking off (template kwarg
`enable_thinking: false`); other efforts leave the template's default. `include:
["reasoning.encrypted_content"]` returns each reasoning item's text in `encrypted_content`,
base64 behind a "tsrun1:" tag -- opaque, NOT encrypted -- so a client that keeps only that
(store: false) still gets its reasoning re-rendered; an `encrypted_content` tsrun did not
make (another server's) cannot be read and is skipped. Any other `include` value is a 400.

Streaming: SSE `event: <type>` + `data: <json>` frames with an increasing
`sequence_number`: response.created, response.in_progress, then per output item
output_item.added, (content_part.added, output_text.delta* / reasoning_text.delta*,
output_text.done / reasoning_text.done, content_part.done | function_call_arguments.delta*,
function_call_arguments.done | custom_tool_call_input.delta*, custom_tool_call_input.done),
output_item.done; then response.completed (or response.incomplete when max_output_tokens
ended it). An engine failure mid-stream ends it with `response.failed` (status "failed",
`error: {code: "server_error", message}`), the spec's terminal event for a failed response.
No `data: [DONE]` (the Responses API sends none). Item ids and call ids are the same in the
events, the final response and the stored one; the whole (non-streamed) response goes
through the same encoder.

What it is not: the chat pipeline (openai_api.OpenAIServer.chat_generation, chat.py), the
output parsing (parsers/), conversations, background responses, hosted tools.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, ValidationError, model_validator

from tscompile.runtime.protocol import SamplingParams
from tscompile.runtime.server import validation as V
from tscompile.runtime.server.chat import ChatTurn
from tscompile.runtime.server.errors import APIError, from_value_error, short
from tscompile.runtime.server.output import ChoiceDelta
from tscompile.runtime.server.parsers.base import ToolCallDelta
from tscompile.runtime.server.schemas import (MAX_TOOLS, Int, NonEmpty, SessionId, StrictBody,
                                              Text, ToolName)

if TYPE_CHECKING:
    from tscompile.runtime.server.openai_api import OpenAIServer
    from tscompile.runtime.server.serving import Generation, Usage

MAX_STORED = 1024                 # stored responses kept (least recently used goes first)
MAX_METADATA = 16                 # OpenAI: 16 pairs, keys <= 64 and values <= 512 chars
ENCRYPTED_TAG = "tsrun1:"         # our (unencrypted, opaque) reasoning encrypted_content

# chat.py's field names -> this API's, in error messages.
_FIELDS = {"messages": "input", "tool_call_id": "call_id", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}


def _field(name: str) -> str:
    return _FIELDS.get(name, name)


# ------------------------------------------------------------------ request schema

_Body = StrictBody


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: ToolName | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError("name and schema: required when type is 'json_schema'")
        if self.type != "json_schema" and (self.schema_ is not None or self.name is not None):
            raise ValueError("name and schema: only with type 'json_schema'")
        return self


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None     # accepted, a hint


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None     # accepted, none made
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # deprecated name


class StreamOptions(_Body):
    include_obfuscation: bool = False


# OpenAI fields tsrun does not implement: name -> (values that change nothing, why not).
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((False,), "no background responses"),
    "conversation": ((), "no conversations API; chain turns with previous_response_id"),
    "prompt": ((), "no stored prompt templates"),
    "top_logprobs": ((0,), "no logprobs in the Responses API here"),
    "safety_identifier": ((), "no abuse monitoring"),
    "context_management": (([],), "no server-side compaction"),
    "prompt_cache_retention": (("in_memory",), "the prefix cache lives in memory only"),
}


class ResponsesRequest(_Body):
    model: Text | None = None
    # A string (one user message) or a list of items; the items are checked one by one
    # (`_input_items`) so an error names its item.
    input: Text | list[dict[str, Any]] | None = None
    instructions: Text | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: Int | None = Field(None, ge=1)
    max_tool_calls: Int | None = Field(None, ge=1)      # hosted tools only: none here
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: NonEmpty | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, Text] | None = None
    user: SessionId | None = None
    prompt_cache_key: SessionId | None = None
    include: list[Text] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    service_tier: Text | None = None
    # UNSUPPORTED: declared so the 400 can say why (checked in `_check_unsupported`).
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    safety_identifier: Any = None
    context_management: Any = None
    prompt_cache_retention: Any = None


# Input items (checked by `_item`, one model per type).

class _MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[dict[str, Any]]
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None
    end_turn: bool | None = None                # Codex echoes it back on messages


class _InputText(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: Text
    annotations: list[Any] | None = None        # an echoed output_text part carries them
    logprobs: list[Any] | None = None


class _Refusal(_Body):
    type: Literal["refusal"]
    refusal: Text


class _FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: NonEmpty
    name: NonEmpty
    arguments: Text
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class _CallOutputItem(_Body):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: NonEmpty
    output: Text | list[dict[str, Any]]
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class _SummaryText(_Body):
    type: Literal["summary_text"]
    text: Text


class _ReasoningText(_Body):
    type: Literal["reasoning_text", "text"]
    text: Text


class _ReasoningItem(_Body):
    type: Literal["reasoning"]
    id: Text | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class _CustomToolCallItem(_Body):
    type: Literal["custom_tool_call"]
    call_id: NonEmpty
    name: NonEmpty
    input: Text
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


_ITEMS: dict[str, type[_Body]] = {
    "message": _MessageItem, "function_call": _FunctionCallItem,
    "function_call_output": _CallOutputItem, "reasoning": _ReasoningItem,
    "custom_tool_call": _CustomToolCallItem, "custom_tool_call_output": _CallOutputItem}

# OpenAI item / part / tool types that exist but that tsrun does not run.
_OTHER_ITEMS = ("file_search_call", "computer_call", "computer_call_output", "web_search_call",
                "image_generation_call", "code_interpreter_call", "local_shell_call",
                "local_shell_call_output", "shell_call", "shell_call_output",
                "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
                "mcp_approval_request", "mcp_approval_response", "mcp_call", "item_reference",
                "compaction", "compaction_trigger", "tool_search_call", "tool_search_output",
                "additional_tools", "program", "program_output")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")
_HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_preview_2025_03_11",
                 "web_search_2025_08_26", "file_search", "computer", "computer_use_preview",
                 "code_interpreter", "image_generation", "local_shell", "shell", "mcp",
                 "apply_patch", "tool_search", "namespace", "programmatic_tool_calling")


# Tools.

class _FunctionTool(_Body):
    type: Literal["function"]
    name: ToolName
    description: Text | None = None
    parameters: dict[str, Any] | None = None     # JSON Schema: chat.check_turn checks it
    strict: bool | None = None


class _CustomFormat(_Body):
    type: Literal["text", "grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: Text | None = None

    @model_validator(mode="after")
    def _grammar_fields(self) -> _CustomFormat:
        if (self.type == "grammar") != (self.syntax is not None and self.definition is not None):
            raise ValueError("syntax and definition: required when type is 'grammar' and "
                             "only then")
        return self


class _CustomTool(_Body):
    type: Literal["custom"]
    name: ToolName
    description: Text | None = None
    format: _CustomFormat | None = None


def _validate(model: type[_Body], data: Any, where: str, param: str) -> Any:
    """`model.model_validate(data)`, its first error as a 400 naming the path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        path = f"{where}.{loc}" if loc else where
        if err.get("type") == "extra_forbidden":
            why = "unknown parameter"
        elif err.get("type") == "missing":
            why = "required"
        else:
            why = f"{str(err.get('msg')).removeprefix('Value error, ')}, got " \
                  f"{short(err.get('input'))}"
        raise APIError(400, f"{path}: {why}", param=param) from None


# ------------------------------------------------------------------ input items

def _input_items(value: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's input as normalized items (the shape stored for chaining): messages'
    content as text parts, outputs as strings, reasoning parts checked."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    return [_item(raw, f"input[{i}]") for i, raw in enumerate(value)]


def _item(raw: dict[str, Any], where: str) -> dict[str, Any]:
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind is None:
        raise APIError(400, f"{where}.type: required", param="input")
    if kind in _OTHER_ITEMS:
        raise APIError(400, f"{where}: {short(kind)} items are not supported by this server "
                            f"(it runs no hosted tools)", param="input")
    model = _ITEMS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise APIError(400, f"{where}.type: must be one of {', '.join(_ITEMS)}, got "
                            f"{short(kind)}", param="input")
    item = _validate(model, raw, where, "input").model_dump(exclude_none=True)
    if kind == "message":
        item["content"] = _text_parts(item["content"], f"{where}.content")
    elif kind.endswith("_output"):
        if not isinstance(item["output"], str):
            item["output"] = "\n".join(
                p["text"] for p in _text_parts(item["output"], f"{where}.output"))
    elif kind == "reasoning":
        item["summary"] = [_validate(_SummaryText, p, f"{where}.summary[{j}]", "input")
                           .model_dump() for j, p in enumerate(item["summary"])]
        if "content" in item:
            item["content"] = [
                {"type": "reasoning_text",
                 "text": _validate(_ReasoningText, p, f"{where}.content[{j}]", "input").text}
                for j, p in enumerate(item["content"])]
    return item


def _text_parts(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    out = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type")
        if kind in _MEDIA_PARTS:
            raise APIError(400, f"{at}: {kind!r} parts are not supported by this server "
                                f"(it serves text models; only text parts are)",
                           param="input")
        if kind == "refusal":
            out.append({"type": "output_text",
                        "text": _validate(_Refusal, part, at, "input").refusal})
            continue
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(400, f"{at}.type: must be one of input_text, output_text, refusal, "
                                f"got {short(kind)}", param="input")
        p = _validate(_InputText, part, at, "input")
        out.append({"type": "output_text" if p.type == "output_text" else "input_text",
                    "text": p.text})
    return out


def _reasoning_text(item: dict[str, Any]) -> str:
    """What a reasoning item re-renders as: its reasoning text, else what tsrun put in its
    encrypted_content, else its summary."""
    if content := item.get("content"):
        return "".join(p["text"] for p in content)
    enc = item.get("encrypted_content") or ""
    if enc.startswith(ENCRYPTED_TAG):
        try:
            return base64.b64decode(enc[len(ENCRYPTED_TAG):], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pass
    return "\n\n".join(p["text"] for p in item.get("summary") or ())


def to_messages(items: list[dict[str, Any]], *, first_new: int = 0,
                instructions: str | None = None) -> list[dict[str, Any]]:
    """Items -> chat messages (module docstring). A call output whose call_id no earlier
    item made is a 400 naming `input[i - first_new]` (items before `first_new` came from
    the stored previous response and were checked then)."""
    msgs: list[dict[str, Any]] = []
    if instructions is not None:
        msgs.append({"role": "system", "content": instructions})
    cur: dict[str, Any] | None = None          # the assistant message being assembled
    calls: set[str] = set()

    def assistant() -> dict[str, Any]:
        nonlocal cur
        if cur is None:
            cur = {"role": "assistant", "content": ""}
            msgs.append(cur)
        return cur

    for i, it in enumerate(items):
        kind = it["type"]
        if kind == "message":
            text = "\n".join(p["text"] for p in it["content"])
            if it["role"] != "assistant":
                cur = None
                msgs.append({"role": "system" if it["role"] == "developer" else it["role"],
                             "content": text})
                continue
            if cur is not None and cur.get("tool_calls"):
                cur = None
            a = assistant()
            a["content"] = f"{a['content']}\n{text}" if a["content"] else text
        elif kind == "reasoning":
            text = _reasoning_text(it)
            if not text:
                continue
            if cur is not None and (cur["content"] or cur.get("tool_calls")):
                cur = None                     # reasoning starts the next assistant turn
            a = assistant()
            a["reasoning_content"] = a.get("reasoning_content", "") + text
        elif kind in ("function_call", "custom_tool_call"):
            arguments = it["arguments"] if kind == "function_call" else \
                json.dumps({"input": it["input"]}, ensure_ascii=False)
            assistant().setdefault("tool_calls", []).append(
                {"id": it["call_id"], "type": "function",
                 "function": {"name": it["name"], "arguments": arguments}})
            calls.add(it["call_id"])
        else:                                  # function_call_output / custom_tool_call_output
            if it["call_id"] not in calls and i >= first_new:
                raise APIError(400, f"input[{i - first_new}].call_id: {short(it['call_id'])} "
                                    f"answers no function_call or custom_tool_call before it "
                                    f"(in input or the previous response)", param="input")
            cur = None
            msgs.append({"role": "tool", "tool_call_id": it["call_id"],
                         "content": it["output"]})
    return msgs


# ------------------------------------------------------------------ tools

def _tools(raw: list[dict[str, Any]] | None
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """(the chat tools the model sees, the tools as echoed back, custom tool names)."""
    chat_tools, echo, custom = [], [], set()
    for i, tool in enumerate(raw or ()):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind in _HOSTED_TOOLS:
            raise APIError(400, f"{where}: {kind!r} tools are not supported by this server (it "
                                f"runs no hosted or built-in tools); declare a function or "
                                f"custom tool instead", param="tools")
        if kind == "function":
            f = _validate(_FunctionTool, tool, where, "tools")
            fn = {"name": f.name}
            if f.description is not None:
                fn["description"] = f.description
            if f.parameters is not None:
                fn["parameters"] = f.parameters
            if f.strict is not None:
                fn["strict"] = f.strict
            chat_tools.append({"type": "function", "function": fn})
            echo.append({"type": "function", "name": f.name, "description": f.description,
                         "parameters": f.parameters, "strict": f.strict})
        elif kind == "custom":
            c = _validate(_CustomTool, tool, where, "tools")
            chat_tools.append({"type": "function", "function": _custom_function(c)})
            custom.add(c.name)
            echo.append(c.model_dump(exclude_none=True))
        else:
            raise APIError(400, f"{where}.type: must be 'function' or 'custom', got "
                                f"{short(kind)}", param="tools")
    return chat_tools, echo, custom


def _custom_function(c: _CustomTool) -> dict[str, Any]:
    """A custom tool as the function the model sees: one string parameter `input`."""
    param: dict[str, Any] = {"type": "string", "description": "Free-form input text."}
    fmt = c.format
    if fmt is not None and fmt.type == "grammar":
        param["description"] = f"Input in this {fmt.syntax} grammar:\n{fmt.definition}"
        if fmt.syntax == "regex":
            param["pattern"] = fmt.definition
    fn: dict[str, Any] = {"name": c.name}
    if c.description is not None:
        fn["description"] = c.description
    fn["parameters"] = {"type": "object", "properties": {"input": param},
                        "required": ["input"], "additionalProperties": False}
    return fn


def _tool_choice(choice: str | dict[str, Any] | None, chat_tools: list[dict[str, Any]],
                 custom: set[str]) -> str | dict[str, Any]:
    """The Responses tool_choice as chat.py's."""
    if choice is None:
        return "auto" if chat_tools else "none"
    if isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind not in ("function", "custom"):
        if kind == "allowed_tools":
            why = "'allowed_tools' is not supported by this server; pass only those tools"
        elif kind in _HOSTED_TOOLS or kind in ("web_search_preview", "file_search", "mcp"):
            why = f"{kind!r} is a hosted tool, which this server does not run"
        else:
            why = f"type must be 'function' or 'custom', got {short(kind)}"
        raise APIError(400, f"tool_choice: {why}", param="tool_choice")
    if extra := sorted(set(choice) - {"type", "name"}):
        raise APIError(400, f"tool_choice.{extra[0]}: unknown parameter", param="tool_choice")
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "tool_choice.name: required (a non-empty string)",
                       param="tool_choice")
    names = {t["function"]["name"] for t in chat_tools}
    of_kind = sorted(custom) if kind == "custom" else sorted(names - custom)
    if name not in of_kind:
        other = " (it is a custom tool: use type 'custom')" if name in custom else \
            " (it is a function tool: use type 'function')" if name in names else ""
        raise APIError(400, f"tool_choice: {kind} tool {name!r} is not in tools{other} "
                            f"(declared {kind} tools: {', '.join(of_kind) or 'none'})",
                       param="tool_choice")
    return {"type": "function", "function": {"name": name}}


# ------------------------------------------------------------------ the encoder

def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def sse(event: dict[str, Any]) -> str:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


def usage_body(u: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens,
                                                              u.completion_tokens)},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


_INPUT_HEAD = re.compile(r'\s*\{\s*"input"\s*:\s*"')
_INPUT_HEAD_TEXT = '{"input":"'


class _InputStream:
    """The `input` string of a custom tool call, decoded as its JSON arguments stream in
    (`{"input": "...`): each feed returns the newly decoded text, never half an escape.
    Arguments of another shape decode nothing here (`ok` False): the whole input then goes
    out when the call ends."""

    def __init__(self) -> None:
        self.raw = ""
        self.pos: int | None = None      # where the undecoded rest of the string starts
        self.ok = True
        self.closed = False
        self.text = ""                   # decoded so far

    def feed(self, piece: str) -> str:
        self.raw += piece
        if not self.ok or self.closed:
            return ""
        raw = self.raw
        if self.pos is None:
            m = _INPUT_HEAD.match(raw)
            if m is None:
                self.ok = _INPUT_HEAD_TEXT.startswith(re.sub(r"\s+", "", raw))
                return ""
            self.pos = m.end()
        i, end = self.pos, len(raw)
        while i < end:
            c = raw[i]
            if c == '"':
                self.closed = True
                break
            if c != "\\":
                i += 1
                continue
            n = 6 if raw[i + 1:i + 2] == "u" else 2
            if raw[i + 1:i + 2] == "u" and raw[i + 2:i + 4].lower() in ("d8", "d9", "da", "db"):
                n = 12                   # a surrogate pair decodes as one character
            if i + n > end:
                break
            i += n
        try:
            new = json.loads(f'"{raw[self.pos:i]}"', strict=False)
        except json.JSONDecodeError:
            self.ok = False
            return ""
        self.pos = i
        self.text += new
        return new


def custom_input(arguments: str) -> str:
    """A custom tool call's input from the JSON arguments the parser read: `input` (or the
    one string value there is), else the arguments text itself."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(args, dict):
        if isinstance(args.get("input"), str):
            return args["input"]
        values = list(args.values())
        if len(values) == 1 and isinstance(values[0], str):
            return values[0]
    return arguments


@dataclass(slots=True)
class _Item:
    kind: str                    # "message" | "reasoning" | "function_call" | "custom_tool_call"
    index: int                   # output_index
    id: str
    call_id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    stream: _InputStream | None = None
    done: dict[str, Any] | None = None     # the final item, once closed

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ResponseEncoder:
    """One response's output: `feed(ChoiceDelta)` -> the stream events it makes, building
    the output items as it goes; `finish` closes them (response.completed / .incomplete),
    `fail` ends with response.failed; `response()` is the response object at any point.

    Items open in the order their text comes (reasoning, message, calls); a different kind
    of piece closes the open item. Whitespace alone opens no message or reasoning item
    (it waits for the first visible character; a response with no item at all gets one
    message). `base` holds the response fields echoed from the request; `custom`: the custom
    tool names (their calls become custom_tool_call items); `encrypted`: put
    `encrypted_content` on reasoning items; `count_tokens`: estimates reasoning_tokens."""

    def __init__(self, base: dict[str, Any], *, custom: set[str] | frozenset[str] = frozenset(),
                 encrypted: bool = False, count_tokens: Callable[[str], int] | None = None):
        self.base = base
        self.custom = custom
        self.encrypted = encrypted
        self.count_tokens = count_tokens
        self.seq = 0
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.pending = {"message": "", "reasoning": ""}
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.completed_at: int | None = None

    # ---------------------------------------------------------------- the response

    def response(self) -> dict[str, Any]:
        out = {**self.base, "status": self.status, "error": self.error,
               "incomplete_details": self.incomplete,
               "output": [self._render(it) for it in self.items], "usage": self.usage}
        if self.completed_at is not None:
            out["completed_at"] = self.completed_at
        return out

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        e = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return e

    def start(self) -> list[dict[str, Any]]:
        r = self.response()
        return [self._event("response.created", response=r),
                self._event("response.in_progress", response=r)]

    # ---------------------------------------------------------------- deltas

    def feed(self, d: ChoiceDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if d.reasoning:
            self._text("reasoning", d.reasoning, events)
        if d.text:
            self._text("message", d.text, events)
        for t in d.tool_calls:
            self._call(t, events)
        return events

    def _text(self, kind: str, piece: str, events: list[dict[str, Any]]) -> None:
        if self.open is not None and self.open.kind == kind:
            self._append(self.open, piece, events)
            return
        text = self.pending[kind] + piece
        self.pending[kind] = ""
        if not text.strip():
            self.pending[kind] = text
            return
        self._close(events)
        self._append(self._open(kind, events), text, events)

    def _call(self, t: ToolCallDelta, events: list[dict[str, Any]]) -> None:
        item = self.calls.get(t.index)
        if item is None:
            self._close(events)
            name = t.name or ""
            kind = "custom_tool_call" if name in self.custom else "function_call"
            item = self._open(kind, events, call_id=t.id or _new_id("call"), name=name)
            self.calls[t.index] = item
        if t.arguments:
            self._append(item, t.arguments, events)

    def _open(self, kind: str, events: list[dict[str, Any]], **kw: Any) -> _Item:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc",
                  "custom_tool_call": "ctc"}[kind]
        item = _Item(kind, len(self.items), _new_id(prefix), **kw)
        if kind == "custom_tool_call":
            item.stream = _InputStream()
        self.items.append(item)
        self.open = item
        events.append(self._event("response.output_item.added", output_index=item.index,
                                  item=self._render(item)))
        if kind in ("message", "reasoning"):
            events.append(self._event("response.content_part.added", item_id=item.id,
                                      output_index=item.index, content_index=0,
                                      part=self._part(item, "")))
        return item

    def _append(self, item: _Item, piece: str, events: list[dict[str, Any]]) -> None:
        item.pieces.append(piece)
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            events.append(self._event("response.output_text.delta", **at, content_index=0,
                                      delta=piece, logprobs=[]))
        elif item.kind == "reasoning":
            events.append(self._event("response.reasoning_text.delta", **at, content_index=0,
                                      delta=piece))
        elif item.kind == "function_call":
            events.append(self._event("response.function_call_arguments.delta", **at,
                                      delta=piece))
        elif (new := item.stream.feed(piece)):
            events.append(self._event("response.custom_tool_call_input.delta", **at,
                                      delta=new))

    def _close(self, events: list[dict[str, Any]], status: str = "completed") -> None:
        item, self.open = self.open, None
        if item is None:
            return
        at = {"item_id": item.id, "output_index": item.index}
        text = item.text
        if item.kind == "message":
            events.append(self._event("response.output_text.done", **at, content_index=0,
                                      text=text, logprobs=[]))
        elif item.kind == "reasoning":
            events.append(self._event("response.reasoning_text.done", **at, content_index=0,
                                      text=text))
        elif item.kind == "function_call":
            events.append(self._event("response.function_call_arguments.done", **at,
                                      arguments=text))
        else:
            final = custom_input(text)
            sent = item.stream.text
            if final.startswith(sent) and len(final) > len(sent):
                events.append(self._event("response.custom_tool_call_input.delta", **at,
                                          delta=final[len(sent):]))
            events.append(self._event("response.custom_tool_call_input.done", **at,
                                      input=final))
        if item.kind in ("message", "reasoning"):
            events.append(self._event("response.content_part.done", **at, content_index=0,
                                      part=self._part(item, text)))
        item.done = self._render(item, status)
        events.append(self._event("response.output_item.done", output_index=item.index,
                                  item=item.done))

    # ---------------------------------------------------------------- items

    @staticmethod
    def _part(item: _Item, text: str) -> dict[str, Any]:
        if item.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _render(self, item: _Item, status: str | None = None) -> dict[str, Any]:
        """The item as it stands (`status` None: in progress), or its final form."""
        if item.done is not None:
            return item.done
        text = item.text if status is not None else ""
        st = status or "in_progress"
        if item.kind == "message":
            return {"id": item.id, "type": "message", "status": st, "role": "assistant",
                    "content": [self._part(item, text)] if status is not None else []}
        if item.kind == "reasoning":
            out: dict[str, Any] = {"id": item.id, "type": "reasoning", "summary": [],
                                   "content": [self._part(item, text)]
                                   if status is not None else []}
            if self.encrypted and status is not None:
                out["encrypted_content"] = ENCRYPTED_TAG + base64.b64encode(
                    text.encode()).decode()
            return out
        if item.kind == "function_call":
            return {"id": item.id, "type": "function_call", "status": st,
                    "arguments": text, "call_id": item.call_id, "name": item.name}
        return {"id": item.id, "type": "custom_tool_call", "status": st,
                "call_id": item.call_id, "name": item.name,
                "input": custom_input(text) if status is not None else ""}

    # ---------------------------------------------------------------- the end

    def finish(self, finish_reason: str | None, usage: Usage) -> list[dict[str, Any]]:
        """Close the open item and end: completed, or incomplete when max_output_tokens
        cut it ("length"); an aborted generation ends as failed."""
        events: list[dict[str, Any]] = []
        if finish_reason == "abort":
            return self.fail("generation was aborted", usage=usage)
        truncated = finish_reason == "length"
        if not self.items:                     # never an empty output: one message
            item = self._open("message", events)
            if self.pending["message"]:
                self._append(item, self.pending["message"], events)
        self._close(events, "incomplete" if truncated else "completed")
        reasoning = "".join(it.text for it in self.items if it.kind == "reasoning")
        n = self.count_tokens(reasoning) if reasoning and self.count_tokens else 0
        self.usage = usage_body(usage, n)
        if truncated:
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
            events.append(self._event("response.incomplete", response=self.response()))
        else:
            self.status = "completed"
            self.completed_at = int(time.time())
            events.append(self._event("response.completed", response=self.response()))
        return events

    def fail(self, message: str, *, code: str = "server_error",
             usage: Usage | None = None) -> list[dict[str, Any]]:
        """End with response.failed: the items so far (the open one "incomplete")."""
        if self.open is not None:
            self.open.done = self._render(self.open, "incomplete")
            self.open = None
        self.status = "failed"
        self.error = {"code": code, "message": message}
        if usage is not None:
            self.usage = usage_body(usage)
        return [self._event("response.failed", response=self.response())]


def whole_delta(result: Any) -> ChoiceDelta:
    """A non-streamed choice (responses.ChoiceResult) as one delta for the encoder."""
    return ChoiceDelta(0, text=result.text, reasoning=result.reasoning,
                       tool_calls=[ToolCallDelta(i, c.id, c.name, c.arguments)
                                   for i, c in enumerate(result.tool_calls)],
                       finish_reason=result.finish_reason)


# ------------------------------------------------------------------ routes

@dataclass(slots=True)
class _Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]          # the input items of the chain so far
    session: str | None


class ResponsesAPI:
    """The routes and the store (one per app)."""

    def __init__(self, server: OpenAIServer, *, max_stored: int = MAX_STORED):
        self.server = server
        self.max_stored = max_stored
        self.stored: OrderedDict[str, _Stored] = OrderedDict()

    # ---------------------------------------------------------------- store

    def _put(self, rec: _Stored) -> None:
        self.stored[rec.response["id"]] = rec
        self.stored.move_to_end(rec.response["id"])
        while len(self.stored) > self.max_stored:
            self.stored.popitem(last=False)

    def _get(self, response_id: str, param: str | None = None) -> _Stored:
        rec = self.stored.get(response_id)
        if rec is None:
            where = f"{param}: " if param else ""
            raise APIError(404 if param is None else 400,
                           f"{where}no stored response with id {short(response_id)} (unknown, "
                           f"deleted, created with store: false, or older than the last "
                           f"{self.max_stored} stored)", param=param or "response_id",
                           code="previous_response_not_found" if param else "not_found")
        self.stored.move_to_end(response_id)
        return rec

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        return self._get(response_id).response

    async def delete(self, response_id: str) -> dict[str, Any]:
        self._get(response_id)
        del self.stored[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    # ---------------------------------------------------------------- create

    async def create(self, body: ResponsesRequest, request: Request) -> Any:
        arrival = time.monotonic()
        srv = self.server
        srv.check_model(body.model)
        _check_request(body)
        srv.check_ready()
        prev = self._get(body.previous_response_id, "previous_response_id") \
            if body.previous_response_id is not None else None
        if prev is not None and prev.response["status"] == "failed":
            raise APIError(400, f"previous_response_id: response "
                                f"{short(body.previous_response_id)} failed; continue from an "
                                f"earlier one", param="previous_response_id")
        chat_tools, echo_tools, custom = _tools(body.tools)
        tool_choice = _tool_choice(body.tool_choice, chat_tools, custom)
        new = _input_items(body.input)
        history = prev.items + prev.response["output"] if prev is not None else []
        if not new and not history:
            raise APIError(400, "input: required (a string or a non-empty list of items)",
                           param="input")
        messages = to_messages(history + new, first_new=len(history),
                               instructions=body.instructions)
        fmt = body.text.format if body.text else None
        effort = body.reasoning.effort if body.reasoning else None
        turn = ChatTurn(
            messages, tools=chat_tools, tool_choice=tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            json_schema=fmt.schema_ if fmt is not None and fmt.type == "json_schema" else None,
            json_object=fmt is not None and fmt.type == "json_object",
            template_kwargs={"enable_thinking": False} if effort in ("none", "minimal")
            else {})
        given = {k: getattr(body, k) for k in ("temperature", "top_p")
                 if getattr(body, k) is not None}
        try:
            params = SamplingParams(max_tokens=body.max_output_tokens or 1, **given)
        except ValueError as e:
            raise from_value_error(e) from None
        rid = _new_id("resp")
        session = V.session_id(srv.session_header, request.headers.get(srv.session_header),
                               body.prompt_cache_key or body.user)
        if session is None and prev is not None:
            session = prev.session             # a chain keeps its session (prefix cache)
        gen = await srv.chat_generation(
            rid, turn, params, n=1, seed=None, stops=(), max_tokens=body.max_output_tokens,
            max_field="max_output_tokens", session=session, arrival=arrival,
            floor=srv.decode_floor(request), fields=_field)
        enc = ResponseEncoder(
            _base(body, rid, echo_tools, params, srv.model_name), custom=custom,
            encrypted="reasoning.encrypted_content" in (body.include or ()),
            count_tokens=lambda s: len(srv.tokenizer.encode(s)))
        rec = _Stored({}, history + new, session)
        if body.stream:
            return srv._streaming(self._stream(gen, enc, rec if body.store else None))
        [result] = await srv._collect(gen, request, 1)
        enc.feed(whole_delta(result))
        enc.finish(result.finish_reason, gen.usage())
        rec.response = enc.response()
        if body.store:
            self._put(rec)
        return rec.response

    async def _stream(self, gen: Generation, enc: ResponseEncoder,
                      rec: _Stored | None) -> AsyncIterator[str]:
        for e in enc.start():
            yield sse(e)
        finish: str | None = None
        async with contextlib.aclosing(self.server._deltas(gen)) as deltas:
            async for d in deltas:
                if isinstance(d, APIError):
                    events = enc.fail(d.message, usage=gen.usage())
                    break
                for e in enc.feed(d):
                    yield sse(e)
                finish = d.finish_reason or finish
            else:
                events = enc.finish(finish, gen.usage())
        if rec is not None:                    # stored before the client sees the end
            rec.response = enc.response()
            self._put(rec)
        for e in events:
            yield sse(e)


def _check_request(body: ResponsesRequest) -> None:
    """The checks beyond the schema's types and bounds; 400s naming the field."""
    for name, (noop, why) in UNSUPPORTED.items():
        value = getattr(body, name)
        if value is not None and not any(type(value) is type(ok) and value == ok
                                         for ok in noop):
            raise APIError(400, f"{name}: not supported by this server ({why}); leave it out",
                           param=name)
    if body.truncation == "auto":
        raise APIError(400, "truncation: 'auto' is not supported by this server (it never "
                            "drops input items); use 'disabled'", param="truncation")
    if body.service_tier is not None and body.service_tier not in ("auto", "default"):
        raise APIError(400, f"service_tier: must be 'auto' or 'default' (there is one tier), "
                            f"got {short(body.service_tier)}", param="service_tier")
    for value in body.include or ():
        if value != "reasoning.encrypted_content":
            raise APIError(400, f"include: {short(value)} is not supported by this server "
                                f"(only 'reasoning.encrypted_content' is)", param="include")
    if body.stream_options is not None:
        if not body.stream:
            raise APIError(400, "stream_options: only allowed when stream is true",
                           param="stream_options")
        if body.stream_options.include_obfuscation:
            raise APIError(400, "stream_options.include_obfuscation: not supported by this "
                                "server (streams are not padded); leave it out",
                           param="stream_options")
    meta = body.metadata or {}
    if len(meta) > MAX_METADATA:
        raise APIError(400, f"metadata: at most {MAX_METADATA} pairs, got {len(meta)}",
                       param="metadata")
    for k, v in meta.items():
        if len(k) > 64 or len(v) > 512:
            raise APIError(400, f"metadata: keys are at most 64 characters and values at "
                                f"most 512, got {short(k)}", param="metadata")


def _base(body: ResponsesRequest, rid: str, tools: list[dict[str, Any]],
          params: SamplingParams, model: str) -> dict[str, Any]:
    """The response fields echoed from the request."""
    fmt = body.text.format if body.text and body.text.format else None
    text: dict[str, Any] = {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                            if fmt else {"type": "text"}}
    if body.text and body.text.verbosity:
        text["verbosity"] = body.text.verbosity
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    r = body.reasoning
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "model": model,
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "max_tool_calls": body.max_tool_calls,
        "output": [], "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": r.effort if r else None,
                      "summary": (r.summary or r.generate_summary) if r else None},
        "service_tier": "default", "store": body.store, "temperature": params.temperature,
        "text": text, "tool_choice": choice, "tools": tools, "top_p": params.top_p,
        "truncation": "disabled", "usage": None, "user": body.user,
        "prompt_cache_key": body.prompt_cache_key, "metadata": body.metadata or {},
    }


def add_routes(router: APIRouter, server: OpenAIServer) -> ResponsesAPI:
    api = ResponsesAPI(server)
    router.add_api_route("/responses", api.create, methods=["POST"])
    router.add_api_route("/responses/{response_id}", api.retrieve, methods=["GET"])
    router.add_api_route("/responses/{response_id}", api.delete, methods=["DELETE"])
    return api
