"""The Anthropic Messages API: `POST /v1/messages` (whole or streamed) and `POST
/v1/messages/count_tokens`, so Claude Code and the `anthropic` SDK run against tsrun
unchanged (point them at the served model's name: ANTHROPIC_MODEL and the small/fast
model variables).

What it is: the request schema (strict, like schemas.py: an unknown field is a 400 naming
it), the mapping of Anthropic messages, tools and tool_choice onto the chat pipeline's
`ChatTurn` (chat.py renders, constrains and parses; nothing here re-implements that), and
`MessageEncoder`, which turns the choice's deltas into Anthropic content blocks and
stream events; the whole (non-streamed) message goes through the same encoder.

Request -> ChatTurn:
  * `system` (a string or text blocks) is a system message first;
  * a user message's `tool_result` blocks become `tool` messages, in order, before a user
    message with its text blocks (a result whose `tool_use_id` no earlier `tool_use` block
    made is a 400; `is_error` results read "Error: ..."); an assistant message's `thinking`
    blocks become its `reasoning_content`, its text blocks its content and its `tool_use`
    blocks its `tool_calls` (arguments = json.dumps(input)); `redacted_thinking` is
    dropped; `image` / `document` / `search_result` and server-tool blocks are a 400;
  * the last message must be the user's (assistant prefill is a 400, as on Anthropic's
    models that do not support it);
  * `tools` (custom tools: name, description, input_schema) map 1:1 to function tools;
    server and Anthropic-defined tools (`type` web_search_*, bash_*, ...) are a 400 naming
    them. `tool_choice` auto / any / tool / none -> "auto" / "required" / named / "none";
    `disable_parallel_tool_use` -> parallel_tool_calls False (and under "auto" only the
    first call is returned);
  * `thinking` enabled / disabled -> template kwarg enable_thinking True / False; adaptive
    leaves the template's default. `budget_tokens` is not a cap here. `display:
    "omitted"` returns empty thinking text with the reasoning in the `signature` (opaque,
    "tsrun1:" + base64, NOT encrypted), read back when a client returns the block;
  * `output_config.format` (or the beta's `output_format`) json_schema -> the answer's
    grammar; `output_config.effort` is accepted and not acted on;
  * `metadata.user_id` is the session id (the session header wins, as in openai_api.py);
  * accepted and ignored: `cache_control` anywhere (a cache hint: tsrun's prefix cache is
    automatic), `context_management` (no server-side edits: the context is kept whole),
    `service_tier`, `speed`, `inference_geo`, `diagnostics`, `user_profile_id`,
    `workspace_id`, the anthropic-version / anthropic-beta headers. `container` and
    `mcp_servers` are a 400 unless empty.

`max_tokens` larger than what the context leaves is cut to fit (the message then ends with
stop_reason "model_context_window_exceeded" when it runs out, as Anthropic's newer models
do); a prompt that leaves no room is a 400 "prompt is too long: N tokens > M maximum",
Anthropic's wording (Claude Code compacts the conversation on it). `max_tokens: 0` warms the
prefix cache: the prompt is prefilled, nothing is returned (stop_reason "max_tokens").

Response: content = a thinking block, a text block, tool_use blocks (ids "toolu_...": the
parser's call id when it is a valid Anthropic id, "call_X" as "toolu_X", anything else
encoded reversibly so the model's own ids re-render), in the order the model wrote them;
stop_reason end_turn / max_tokens / stop_sequence (+ the sequence) / tool_use; usage counts
input_tokens without the prefix-cache hit, which is cache_read_input_tokens.

Streaming: `event: <type>` + `data: <json>` frames: message_start (content [], the prompt's
tokens as input_tokens), ping, per block content_block_start, content_block_delta*
(text_delta / thinking_delta, then one signature_delta / input_json_delta),
content_block_stop; message_delta (stop_reason, stop_sequence, the final usage) and
message_stop. A new block starts when the kind changes (thinking -> text -> tool_use i).
A ping goes out every PING_INTERVAL_S seconds without output (a long prefill). An engine
failure mid-stream is an `error` event (`{"type": "error", "error": {"type": "api_error" |
"overloaded_error", "message"}}`) and the end of the stream.

Errors on these routes have Anthropic's shape (errors.py). What it is not: the chat
pipeline (openai_api.OpenAIServer.chat_generation, chat.py), the output parsing
(parsers/), server tools, images or documents.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request
from pydantic import Field, StringConstraints, ValidationError
from starlette.concurrency import run_in_threadpool

from tscompile.runtime.protocol import SamplingParams
from tscompile.runtime.server import chat
from tscompile.runtime.server import validation as V
from tscompile.runtime.server.chat import ChatTurn
from tscompile.runtime.server.errors import APIError, from_value_error, short
from tscompile.runtime.server.output import ChoiceDelta
from tscompile.runtime.server.parsers.base import ToolCallDelta
from tscompile.runtime.server.schemas import (Int, NonEmpty, SessionId, Stop, StrictBody,
                                              Text)
from tscompile.runtime.server.serving import Generation

if TYPE_CHECKING:
    from tscompile.runtime.server.openai_api import OpenAIServer
    from tscompile.runtime.server.responses import ChoiceResult
    from tscompile.runtime.server.serving import Usage

MAX_TOOLS = 1024               # Claude Code with many MCP servers declares hundreds
MAX_STOP_SEQUENCES = 64        # ours: bounds the stop matcher's set-up
PING_INTERVAL_S = 10.0         # a stream without output for this long gets a ping
SIGNATURE_TAG = "tsrun1:"      # our (unencrypted, opaque) thinking signature
TOOL_ID_TAG = "toolu_tsrun_"   # a call id that is no Anthropic id, base64url-encoded

# chat.py's field names -> this API's, in error messages.
_FIELDS = {"tool_call_id": "tool_use_id", "parameters": "input_schema",
           "response_format": "output_config.format",
           "response_format.json_schema.schema": "output_config.format.schema"}


def _field(name: str) -> str:
    return _FIELDS.get(name, name)


# ------------------------------------------------------------------ request schema

_Body = StrictBody


# Anthropic: ^[a-zA-Z0-9_-]{1,128}$ (dots too, which some MCP tool names use).
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]


class _Metadata(_Body):
    user_id: SessionId | None = None


class _JSONFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class _OutputConfig(_Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # not acted on
    format: _JSONFormat | None = None


class _Message(_Body):
    role: Literal["user", "assistant"]
    # A string (one text block) or blocks, each checked by its type (`_user_message`,
    # `_assistant_message`) so an error names its block.
    content: Text | list[dict[str, Any]]


class CountTokensRequest(_Body):
    """The body of /v1/messages/count_tokens (and the prompt half of /v1/messages)."""
    model: Text | None = None
    messages: list[_Message] = Field(min_length=1)
    system: Text | list[dict[str, Any]] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: _OutputConfig | None = None
    output_format: _JSONFormat | None = None       # the structured-outputs beta's name
    # Accepted and ignored (module docstring).
    cache_control: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: Text | None = None
    workspace_id: Text | None = None
    mcp_servers: list[Any] | None = None            # only [] (no MCP connector)


class MessagesRequest(CountTokensRequest):
    max_tokens: Int = Field(ge=0)                   # 0: prefill only (warms the cache)
    stream: bool = False
    stop_sequences: Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0)           # 0: off
    metadata: _Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: Text | None = None
    diagnostics: dict[str, Any] | None = None
    container: Any = None                           # only null (no code execution)


# Content blocks (checked by `_validate`, one model per type).

class _CacheHinted(_Body):
    cache_control: dict[str, Any] | None = None     # a cache hint, ignored


class _TextBlock(_CacheHinted):
    type: Literal["text"]
    text: Text
    citations: list[Any] | None = None


class _ToolUseBlock(_CacheHinted):
    type: Literal["tool_use"]
    id: NonEmpty
    name: NonEmpty
    input: dict[str, Any]
    caller: dict[str, Any] | None = None
    toolset_name: Text | None = None


class _ToolResultBlock(_CacheHinted):
    type: Literal["tool_result"]
    tool_use_id: NonEmpty
    content: Text | list[dict[str, Any]] = ""
    is_error: bool = False
    toolset_name: Text | None = None


class _Tool(_CacheHinted):
    type: Literal["custom"] | None = None
    name: ToolName
    description: Text | None = None
    input_schema: dict[str, Any]                   # JSON Schema: chat.check_turn checks it
    # Accepted and not acted on (no tool search, no programmatic calling here).
    strict: bool | None = None
    defer_loading: bool | None = None
    eager_input_streaming: bool | None = None
    input_examples: list[Any] | None = None
    allowed_callers: list[Any] | None = None


_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")
_MEDIA_BLOCKS = ("image", "document", "search_result", "container_upload")
_SERVER_BLOCKS = ("server_tool_use", "mcp_tool_use", "mcp_tool_result")


# Union members in a pydantic error's loc (errors.py drops them the same way).
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_GENERIC_TAGS = ("list[", "dict[", "tuple[", "function-", "constrained-")


def _validate(model: type[_Body], data: Any, where: str, param: str) -> Any:
    """`model.model_validate(data)`, its first error as a 400 naming the path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = where
        for x in err.get("loc", ()):
            if isinstance(x, int):
                path += f"[{x}]"
            elif x not in _TYPE_TAGS and not x.startswith(_GENERIC_TAGS):
                path += f".{x}"
        if err.get("type") == "extra_forbidden":
            why = "unknown parameter"
        elif err.get("type") == "missing":
            why = "required"
        else:
            why = f"{str(err.get('msg')).removeprefix('Value error, ')}, got " \
                  f"{short(err.get('input'))}"
        raise APIError(400, f"{path}: {why}", param=param) from None


def _block_type(block: dict[str, Any], where: str, param: str = "messages") -> str:
    kind = block.get("type")
    _check_supported(kind, where, param)
    if kind not in _BLOCKS:
        raise APIError(400, f"{where}.type: must be one of {', '.join(_BLOCKS)}, got "
                            f"{short(kind)}", param=param)
    return kind


def _check_supported(kind: Any, where: str, param: str) -> None:
    """400 for the block types Anthropic has and this server does not serve."""
    if kind in _MEDIA_BLOCKS:
        raise APIError(400, f"{where}: {kind!r} blocks are not supported by this server (it "
                            f"serves text models; only text blocks are)", param=param)
    if kind in _SERVER_BLOCKS or (isinstance(kind, str) and kind.endswith("_tool_result")):
        raise APIError(400, f"{where}: {kind!r} blocks are not supported by this server (it "
                            f"runs no server tools)", param=param)


# ------------------------------------------------------------------ ids

_ANTHROPIC_ID = re.compile(r"[A-Za-z0-9_-]+")


def tool_use_id(call_id: str | None) -> str:
    """The tool_use id of a parser's call id (module docstring); `call_id` reverses it."""
    if not call_id:
        return "toolu_" + secrets.token_hex(12)
    if _ANTHROPIC_ID.fullmatch(call_id):
        return "toolu_" + call_id[5:] if call_id.startswith("call_") else call_id
    return TOOL_ID_TAG + base64.urlsafe_b64encode(call_id.encode()).decode().rstrip("=")


def call_id(use_id: str) -> str:
    """The id the chat template sees for a client's tool_use / tool_result id."""
    if use_id.startswith(TOOL_ID_TAG):
        raw = use_id[len(TOOL_ID_TAG):]
        try:
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
    return use_id


def _signature(reasoning: str) -> str:
    return SIGNATURE_TAG + base64.b64encode(reasoning.encode()).decode()


def _from_signature(signature: Any) -> str:
    if isinstance(signature, str) and signature.startswith(SIGNATURE_TAG):
        try:
            return base64.b64decode(signature[len(SIGNATURE_TAG):], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pass
    return ""


# ------------------------------------------------------------------ request -> ChatTurn

def to_chat_messages(system: str | list[dict[str, Any]] | None, messages: list[_Message], *,
                     prefill_ok: bool = False) -> list[dict[str, Any]]:
    """The system prompt and the messages as OpenAI chat messages (module docstring).
    `prefill_ok`: a last assistant message is allowed (counting tokens)."""
    out: list[dict[str, Any]] = []
    if system is not None:
        text = system if isinstance(system, str) else "\n".join(
            _text_block(b, f"system[{j}]", "system") for j, b in enumerate(system))
        if text:
            out.append({"role": "system", "content": text})
    uses: set[str] = set()                 # tool_use ids of the assistant turns so far
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) \
            else m.content
        if m.role == "user":
            out.extend(_user_message(blocks, where, uses))
        else:
            out.append(_assistant_message(blocks, where, uses))
    if messages[-1].role != "user" and not prefill_ok:
        raise APIError(400, f"messages[{len(messages) - 1}].role: the last message must be "
                            f"the user's; assistant prefill is not supported by this server",
                       param="messages")
    return out


def _text_block(block: dict[str, Any], where: str, param: str) -> str:
    """A block where only text blocks go (system, a tool_result's content)."""
    kind = block.get("type")
    if kind != "text":
        _check_supported(kind, where, param)
        raise APIError(400, f"{where}.type: must be 'text' here, got {short(kind)}",
                       param=param)
    return _validate(_TextBlock, block, where, param).text


def _user_message(blocks: list[dict[str, Any]], where: str,
                  uses: set[str]) -> list[dict[str, Any]]:
    results, texts = [], []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            texts.append(_validate(_TextBlock, block, at, "messages").text)
        elif kind == "tool_result":
            r = _validate(_ToolResultBlock, block, at, "messages")
            if r.tool_use_id not in uses:
                raise APIError(400, f"{at}.tool_use_id: {short(r.tool_use_id)} answers no "
                                    f"tool_use block of an earlier assistant message",
                               param="messages")
            content = r.content if isinstance(r.content, str) else "\n".join(
                _text_block(b, f"{at}.content[{k}]", "messages")
                for k, b in enumerate(r.content))
            if r.is_error:
                content = f"Error: {content}" if content else "Error"
            results.append({"role": "tool", "tool_call_id": call_id(r.tool_use_id),
                            "content": content})
        elif kind == "tool_use":
            raise APIError(400, f"{at}: tool_use blocks belong in assistant messages",
                           param="messages")
        # thinking / redacted_thinking in a user message: dropped
    if texts or not results:
        results.append({"role": "user", "content": "\n".join(texts)})
    return results


def _assistant_message(blocks: list[dict[str, Any]], where: str,
                       uses: set[str]) -> dict[str, Any]:
    texts, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            texts.append(_validate(_TextBlock, block, at, "messages").text)
        elif kind == "thinking":           # passed through whatever else it carries
            text = block.get("thinking")
            text = text if isinstance(text, str) and text else \
                _from_signature(block.get("signature"))
            if text:
                reasoning.append(text)
        elif kind == "tool_use":
            u = _validate(_ToolUseBlock, block, at, "messages")
            uses.add(u.id)
            calls.append({"id": call_id(u.id), "type": "function",
                          "function": {"name": u.name,
                                       "arguments": json.dumps(u.input, ensure_ascii=False)}})
        elif kind == "tool_result":
            raise APIError(400, f"{at}: tool_result blocks belong in user messages",
                           param="messages")
        # redacted_thinking: dropped (its data is Anthropic's, unreadable here)
    msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(raw: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(raw or ()):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind is not None and kind != "custom":
            raise APIError(400, f"{where}.type: {short(kind)} tools are not supported by this "
                                f"server (it runs no server tools and knows no built-in tool "
                                f"schemas); declare a custom tool: name, description, "
                                f"input_schema", param="tools")
        t = _validate(_Tool, tool, where, "tools")
        fn: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            fn["description"] = t.description
        fn["parameters"] = t.input_schema
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: dict[str, Any] | None, tools: list[dict[str, Any]]
                 ) -> tuple[str | dict[str, Any], bool]:
    """(chat.py's tool_choice, parallel calls allowed)."""
    if raw is None:
        return ("auto" if tools else "none"), True
    kind = raw.get("type")
    keys = {"auto": {"disable_parallel_tool_use"}, "any": {"disable_parallel_tool_use"},
            "tool": {"name", "disable_parallel_tool_use"}, "none": set()}
    if kind not in keys:
        raise APIError(400, f"tool_choice.type: must be one of auto, any, tool, none, got "
                            f"{short(kind)}", param="tool_choice")
    if extra := sorted(set(raw) - keys[kind] - {"type"}):
        raise APIError(400, f"tool_choice.{extra[0]}: unknown parameter", param="tool_choice")
    disable = raw.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise APIError(400, f"tool_choice.disable_parallel_tool_use: must be a boolean, got "
                            f"{short(disable)}", param="tool_choice")
    if kind in ("any", "tool") and not tools:
        raise APIError(400, f"tool_choice: type {kind!r} needs at least one tool in tools",
                       param="tool_choice")
    if kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "tool_choice.name: required (a non-empty string) when type "
                                "is 'tool'", param="tool_choice")
        return {"type": "function", "function": {"name": name}}, False
    return {"auto": "auto", "any": "required", "none": "none"}[kind], not disable


@dataclass(frozen=True, slots=True)
class _Thinking:
    template_kwargs: dict[str, Any]
    omit: bool                      # display "omitted": the text goes in the signature


def _thinking(raw: dict[str, Any] | None) -> _Thinking:
    if raw is None:
        return _Thinking({}, False)
    kind = raw.get("type")
    keys = {"enabled": {"budget_tokens", "display"}, "adaptive": {"display"},
            "disabled": set()}
    if kind not in keys:
        raise APIError(400, f"thinking.type: must be one of enabled, adaptive, disabled, got "
                            f"{short(kind)}", param="thinking")
    if extra := sorted(set(raw) - keys[kind] - {"type"}):
        raise APIError(400, f"thinking.{extra[0]}: unknown parameter", param="thinking")
    if kind == "enabled":
        budget = raw.get("budget_tokens")
        if isinstance(budget, float) and budget.is_integer():     # 2048.0 is an integer
            budget = int(budget)
        if type(budget) is not int or budget < 1:
            raise APIError(400, f"thinking.budget_tokens: required with type 'enabled', an "
                                f"integer >= 1, got {short(budget)}", param="thinking")
    display = raw.get("display")
    if display not in (None, "summarized", "omitted"):
        raise APIError(400, f"thinking.display: must be 'summarized' or 'omitted', got "
                            f"{short(display)}", param="thinking")
    kwargs = {"enabled": {"enable_thinking": True}, "disabled": {"enable_thinking": False},
              "adaptive": {}}[kind]
    return _Thinking(kwargs, display == "omitted")


@dataclass(frozen=True, slots=True)
class _Prompt:
    turn: ChatTurn
    thinking: _Thinking
    max_calls: int | None           # disable_parallel_tool_use under "auto": 1


def to_turn(body: CountTokensRequest, *, counting: bool = False) -> _Prompt:
    """The request as the chat pipeline's turn (module docstring); 400s naming the field.
    `counting`: for count_tokens, which takes a conversation ending with either role."""
    if body.mcp_servers:
        raise APIError(400, "mcp_servers: not supported by this server (no MCP connector; "
                            "the client runs its MCP tools); leave it out",
                       param="mcp_servers")
    if getattr(body, "container", None) is not None:
        raise APIError(400, "container: not supported by this server (no code execution); "
                            "leave it out", param="container")
    if body.output_format is not None and body.output_config is not None \
            and body.output_config.format is not None:
        raise APIError(400, "output_format: give the format once, in output_config.format",
                       param="output_format")
    fmt = body.output_config.format if body.output_config and body.output_config.format \
        else body.output_format
    tools = _tools(body.tools)
    choice, parallel = _tool_choice(body.tool_choice, tools)
    thinking = _thinking(body.thinking)
    turn = ChatTurn(to_chat_messages(body.system, body.messages, prefill_ok=counting),
                    tools=tools,
                    tool_choice=choice, parallel_tool_calls=parallel,
                    json_schema=fmt.schema_ if fmt is not None else None,
                    template_kwargs=thinking.template_kwargs)
    return _Prompt(turn, thinking, 1 if choice == "auto" and not parallel else None)


# ------------------------------------------------------------------ the encoder

def sse(event: dict[str, Any]) -> str:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


def usage_body(u: Usage, *, output_tokens: int | None = None) -> dict[str, Any]:
    """Anthropic counts input_tokens without the cache hit (cache_read_input_tokens)."""
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens,
            "output_tokens": u.completion_tokens if output_tokens is None else output_tokens}


def error_event(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": e.anthropic_body()["error"]}


@dataclass(slots=True)
class _Block:
    index: int
    kind: str                       # "thinking" | "text" | "tool_use"
    parts: list[str] = field(default_factory=list)
    id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's parsed arguments; {} when they are no JSON object (cut off by max_tokens)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class MessageEncoder:
    """The choice's deltas -> content blocks and stream events (module docstring).
    `discard`: a max_tokens-0 request, whose output is dropped."""

    def __init__(self, msg_id: str, model: str, *, prompt_tokens: int, omit_thinking: bool =
                 False, max_calls: int | None = None, discard: bool = False):
        self.id, self.model = msg_id, model
        self.prompt_tokens = prompt_tokens
        self.omit_thinking = omit_thinking
        self.max_calls = max_calls
        self.discard = discard
        self.blocks: list[_Block] = []
        self.open: _Block | None = None
        self.calls: dict[int, _Block] = {}
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] = {"input_tokens": prompt_tokens,
                                      "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0, "output_tokens": 0}

    # ---------------------------------------------------------------- events

    def start(self) -> list[dict[str, Any]]:
        msg = self._envelope([])
        return [{"type": "message_start", "message": msg}, {"type": "ping"}]

    def feed(self, d: ChoiceDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.discard:
            return events
        if d.reasoning:
            self._add("thinking", d.reasoning, events)
        if d.text:
            self._add("text", d.text, events)
        for t in d.tool_calls:
            if self.max_calls is not None and t.index >= self.max_calls:
                continue
            block = self.calls.get(t.index)
            if block is None:
                block = self.calls[t.index] = self._open(
                    "tool_use", events, id=tool_use_id(t.id), name=t.name or "")
            if t.arguments:
                block.parts.append(t.arguments)
                if block is self.open:
                    events.append(self._delta(block, {"type": "input_json_delta",
                                                      "partial_json": t.arguments}))
        return events

    def finish(self, finish_reason: str | None, stop_string: str | None, usage: Usage, *,
               context_bound: bool = False) -> list[dict[str, Any]]:
        """Close the open block and end the message. `context_bound`: max_tokens was cut to
        what the context leaves, so running out is the context window's doing."""
        events: list[dict[str, Any]] = []
        self._close(events)
        if self.discard:
            self.stop_reason = "max_tokens"
        elif finish_reason == "tool_calls" and self.calls:
            self.stop_reason = "tool_use"
        elif finish_reason == "length":
            self.stop_reason = "model_context_window_exceeded" if context_bound \
                else "max_tokens"
        elif stop_string:
            self.stop_reason, self.stop_sequence = "stop_sequence", stop_string
        else:
            self.stop_reason = "end_turn"
        self.usage = usage_body(usage, output_tokens=0 if self.discard else None)
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": self.stop_reason,
                                 "stop_sequence": self.stop_sequence},
                       "usage": dict(self.usage)})
        events.append({"type": "message_stop"})
        return events

    # ---------------------------------------------------------------- the message

    def message(self) -> dict[str, Any]:
        return self._envelope([self._render(b) for b in self.blocks])

    def _envelope(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": self.stop_reason,
                "stop_sequence": self.stop_sequence, "usage": dict(self.usage)}

    def _render(self, b: _Block) -> dict[str, Any]:
        if b.kind == "thinking":
            return {"type": "thinking", "thinking": "" if self.omit_thinking else b.text,
                    "signature": self._signature(b)}
        if b.kind == "text":
            return {"type": "text", "text": b.text}
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": _tool_input(b.text)}

    def _signature(self, b: _Block) -> str:
        return _signature(b.text) if self.omit_thinking else ""

    # ---------------------------------------------------------------- blocks

    def _add(self, kind: str, text: str, events: list[dict[str, Any]]) -> None:
        block = self.open if self.open is not None and self.open.kind == kind else \
            self._open(kind, events)
        block.parts.append(text)
        if kind == "text":
            events.append(self._delta(block, {"type": "text_delta", "text": text}))
        elif not self.omit_thinking:
            events.append(self._delta(block, {"type": "thinking_delta", "thinking": text}))

    def _open(self, kind: str, events: list[dict[str, Any]], **kw: str) -> _Block:
        self._close(events)
        block = _Block(len(self.blocks), kind, **kw)
        self.blocks.append(block)
        self.open = block
        start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""},
                 "tool_use": {"type": "tool_use", "id": block.id, "name": block.name,
                              "input": {}}}[kind]
        events.append({"type": "content_block_start", "index": block.index,
                       "content_block": start})
        return block

    def _close(self, events: list[dict[str, Any]]) -> None:
        block, self.open = self.open, None
        if block is None:
            return
        if block.kind == "thinking":
            events.append(self._delta(block, {"type": "signature_delta",
                                              "signature": self._signature(block)}))
        events.append({"type": "content_block_stop", "index": block.index})

    @staticmethod
    def _delta(block: _Block, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": block.index, "delta": delta}


def whole_delta(result: ChoiceResult) -> ChoiceDelta:
    """A non-streamed choice as one delta for the encoder."""
    return ChoiceDelta(0, text=result.text, reasoning=result.reasoning,
                       tool_calls=[ToolCallDelta(i, c.id, c.name, c.arguments)
                                   for i, c in enumerate(result.tool_calls)],
                       finish_reason=result.finish_reason, stop_string=result.stop_string)


_T = TypeVar("_T")


async def paced(source: AsyncIterator[_T], interval: float) -> AsyncIterator[_T | None]:
    """`source`'s items, and None whenever `interval` seconds pass without one (closing
    this closes `source`). Use with contextlib.aclosing."""
    nxt: asyncio.Future[Any] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield None
                continue
            fut, nxt = nxt, None
            try:
                item = fut.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if nxt is not None:
            nxt.cancel()
            await asyncio.wait({nxt})
            if not nxt.cancelled():
                nxt.exception()              # retrieved: no "never retrieved" warning
        await source.aclose()                # type: ignore[attr-defined]


# ------------------------------------------------------------------ routes

_PROMPT_TOKENS = re.compile(r"the prompt is (\d+) tokens")


class AnthropicAPI:
    def __init__(self, server: OpenAIServer):
        self.server = server

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, Any]:
        srv = self.server
        srv.check_model(body.model)
        turn = to_turn(body, counting=True).turn
        chat.check_turn(turn, fields=_field)
        ids = await run_in_threadpool(srv._render_chat, turn)
        return {"input_tokens": len(ids)}

    async def messages(self, body: MessagesRequest, request: Request) -> Any:
        arrival = time.monotonic()
        srv = self.server
        srv.check_model(body.model)
        prompt = to_turn(body)
        if body.top_k is not None and body.top_k > srv.vocab_size:
            raise APIError(400, f"top_k: must be in [0, {srv.vocab_size}] (0 disables it), "
                                f"got {body.top_k}", param="top_k")
        given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k")
                 if getattr(body, k) is not None}
        try:
            params = SamplingParams(max_tokens=max(body.max_tokens, 1), **given)
        except ValueError as e:
            raise from_value_error(e) from None
        srv.check_ready()
        session = V.session_id(srv.session_header, request.headers.get(srv.session_header),
                               body.metadata.user_id if body.metadata else None)
        rid = f"msg_{secrets.token_hex(12)}"
        gen, context_bound = await self._generation(rid, prompt.turn, params, body, session,
                                                    arrival, srv.decode_floor(request))
        enc = MessageEncoder(rid, srv.model_name,
                             prompt_tokens=len(gen.specs[0].request.prompt_ids),
                             omit_thinking=prompt.thinking.omit, max_calls=prompt.max_calls,
                             discard=body.max_tokens == 0)
        if body.stream:
            return srv._streaming(self._stream(gen, enc, context_bound))
        [result] = await srv._collect(gen, request, 1)
        if result.finish_reason == "abort":
            raise APIError(500, "generation was aborted", type="server_error")
        enc.feed(whole_delta(result))
        enc.finish(result.finish_reason, result.stop_string, gen.usage(),
                   context_bound=context_bound)
        return enc.message()

    async def _generation(self, rid: str, turn: ChatTurn, params: SamplingParams,
                          body: MessagesRequest, session: str | None,
                          arrival: float, floor: float = 0.0) -> tuple[Generation, bool]:
        """The generation, its max_tokens cut to what the context leaves (and whether it
        was cut); a prompt that leaves no room is Anthropic's "prompt is too long"."""
        srv = self.server
        try:
            gen = await srv.chat_generation(
                rid, turn, params, n=1, seed=None, stops=tuple(body.stop_sequences or ()),
                max_tokens=None, max_field="max_tokens", session=session, arrival=arrival,
                floor=floor, fields=_field)
        except APIError as e:
            if e.code != "context_length_exceeded":
                raise
            m = _PROMPT_TOKENS.search(e.message)
            n = m.group(1) if m else "too many"
            raise APIError(400, f"prompt is too long: {n} tokens > {srv.max_model_len - 1} "
                                f"maximum (this model's context is {srv.max_model_len} "
                                f"tokens); shorten the conversation", param="messages",
                           code="context_length_exceeded") from None
        [spec] = gen.specs
        room = spec.request.params.max_tokens        # the rest of the context
        want = max(body.max_tokens, 1)
        if want >= room:
            return gen, want > room
        req = dataclasses.replace(spec.request, params=dataclasses.replace(
            spec.request.params, max_tokens=want))
        return Generation(gen.client, gen.tokenizer, gen.metrics,
                          [dataclasses.replace(spec, request=req)]), False

    async def _stream(self, gen: Generation, enc: MessageEncoder,
                      context_bound: bool) -> AsyncIterator[str]:
        for e in enc.start():
            yield sse(e)
        last: ChoiceDelta | None = None
        async with contextlib.aclosing(paced(self.server._deltas(gen), PING_INTERVAL_S)) \
                as deltas:
            async for d in deltas:
                if d is None:
                    yield sse({"type": "ping"})
                    continue
                if isinstance(d, APIError) or d.finish_reason == "abort":
                    err = d if isinstance(d, APIError) else \
                        APIError(500, "generation was aborted", type="server_error")
                    yield sse(error_event(err))
                    return
                for e in enc.feed(d):
                    yield sse(e)
                if d.finish_reason is not None:
                    last = d
        for e in enc.finish(last.finish_reason if last else None,
                            last.stop_string if last else None, gen.usage(),
                            context_bound=context_bound):
            yield sse(e)


def add_routes(router: APIRouter, server: OpenAIServer) -> AnthropicAPI:
    api = AnthropicAPI(server)
    router.add_api_route("/messages", api.messages, methods=["POST"])
    router.add_api_route("/messages/count_tokens", api.count_tokens, methods=["POST"])
    return api
