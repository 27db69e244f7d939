"""The checks of a request body that need the model or the server, beyond its types and
OpenAI's static bounds (schemas.py): `n` within the server's max_n, token ids inside the
vocabulary (stop ids, logit_bias keys), `top_k` at most the vocabulary, `stream_options` only with `stream`, the session
header's length, and chat messages: text content parts only, tool calls on assistant
turns and tool call ids on tool turns only. Each
failure is a 400 whose message starts with the field. What it is not: the context-length
check (openai_api.py: it needs the prompt's tokens).
"""
from __future__ import annotations

import re
from typing import Any

from tscompile.runtime.server.errors import APIError, short
from tscompile.runtime.server.schemas import (MAX_SESSION_ID_CHARS, ChatMessage, ContentPart,
                                              SamplingFields)

# OpenAI's content-part types; tsrun renders only text.
UNSUPPORTED_PARTS = ("image_url", "input_audio", "file", "refusal")


def _bad(field: str, why: str, value: Any) -> APIError:
    """`field` may be a path (`messages[0].role`); `param` is the body field it is in."""
    return APIError(400, f"{field}: {why}, got {short(value)}",
                    param=re.match(r"\w+", field).group())


def check_sampling(body: SamplingFields, *, vocab_size: int, max_n: int) -> None:
    if body.n > max_n:
        raise _bad("n", f"must be in [1, {max_n}] on this server", body.n)
    if body.top_k is not None and body.top_k > vocab_size:
        raise _bad("top_k", f"must be in [-1, {vocab_size}] (-1 or 0 disables it)",
                   body.top_k)
    if bad := [t for t in body.stop_token_ids or () if t >= vocab_size]:
        raise _bad("stop_token_ids", f"token ids must be in [0, {vocab_size})", bad[0])
    for key in body.logit_bias or ():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise _bad("logit_bias", f"keys must be token ids in [0, {vocab_size})", key)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed when stream is true",
                       param="stream_options")


def session_id(header_name: str, header: str | None, user: str | None) -> str | None:
    """The session id: the header `header_name` if given, else the body's `user`."""
    if header and len(header) > MAX_SESSION_ID_CHARS:
        raise APIError(400, f"{header_name} header: at most {MAX_SESSION_ID_CHARS} "
                            f"characters, got {len(header)}")
    return header or user


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The dicts a chat template expects (`developer` is OpenAI's new name for `system`),
    content as text (text parts joined by newlines); an assistant turn keeps its
    `tool_calls` and reasoning, a tool turn its `tool_call_id`."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "function":
            raise APIError(400, f"{where}.role: 'function' (the deprecated functions API) is "
                                f"not supported; use tools and the 'tool' role",
                           param="messages")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"{where}.tool_calls: only assistant messages carry tool "
                                f"calls", param="messages")
        if m.tool_call_id is not None and m.role != "tool":
            raise APIError(400, f"{where}.tool_call_id: only tool messages carry one",
                           param="messages")
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(400, f"{where}.tool_call_id: required in a tool message",
                           param="messages")
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None and m.role != "assistant":
            raise APIError(400, f"{where}.reasoning_content: only assistant messages carry "
                                f"reasoning", param="messages")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(400, f"{where}.content: required", param="messages")
        content = "" if m.content is None else m.content if isinstance(m.content, str) \
            else _joined_text(m.content, where)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out


def _joined_text(parts: list[ContentPart], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        if part.type in UNSUPPORTED_PARTS:
            raise APIError(400, f"{at}: {part.type!r} parts are not supported by this server "
                                f"(only text parts are)", param="messages")
        if part.type != "text":
            raise _bad(f"{at}.type", f"must be one of text, {', '.join(UNSUPPORTED_PARTS)}",
                       part.type)
        if extra := sorted(part.model_extra or ()):
            raise APIError(400, f"{at}.{extra[0]}: unknown parameter", param="messages")
        if part.text is None:
            raise APIError(400, f"{at}.text: required", param="messages")
        texts.append(part.text)
    return "\n".join(texts)
