"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) through the
official `anthropic` client against the live API process (fake engine, real SmolLM2
tokenizer): whole and streamed text (the exact event order; the SDK's stream helper builds
the same message), system + history with tool_use / tool_result / thinking blocks rendered
into the prompt, stop_sequences, max_tokens and the context window, usage with the prefix
cache, count_tokens, sessions, tool calls read back by the llama3_json parser (whole and
streamed as input_json_delta), tool_choice and output_config grammars, x-api-key, and bad
input as 4xx in Anthropic's error shape naming the field. The encoder's delta -> event
mapping, the request mapping and the ping pacing are unit-tested directly."""
from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import pytest

from tscompile.runtime.server import anthropic_api as AA
from tscompile.runtime.server import chat
from tscompile.runtime.server.chat import ChatTurn
from tscompile.runtime.server.output import ChoiceDelta
from tscompile.runtime.server.parsers.base import ToolCallDelta
from tscompile.runtime.server.serving import Usage
from tscompile.tokenizer import Tokenizer

from .conftest import MAX_MODEL_LEN, MODEL, PAGE, REPLY, serve

HELLO = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
TOOL = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}
CALL_TEXT = '{"name": "get_weather", "parameters": {"city": "Paris"}}'

# A template that renders reasoning, tools and tool results (as test_responses_api.py's).
TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}<|im_start|>assistant
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>
{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{"name": \
"{{ c.function.name }}", "arguments": {{ c.function.arguments }}}</tool_call>{% endfor %}\
<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>tool
[{{ m.tool_call_id }}] {{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>
{% endif %}{% endif %}"""


def client(url: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def ant(stack) -> anthropic.Anthropic:
    return client(stack.url)


@pytest.fixture(scope="module")
def rich(smollm2_dir):
    """A template that renders tools and reasoning, the llama3_json parser; `reply` sets
    what the fake model says."""
    tok = Tokenizer(smollm2_dir)
    tok.chat_template = TEMPLATE
    with serve(tok, tool_parser="llama3_json") as s:
        yield s, tok, client(s.url)


@pytest.fixture
def reply(rich):
    stack, tok, _ = rich
    script = stack.engine.script

    def say(text: str) -> None:
        stack.engine.script = tok.encode(text) + [stack.engine.eos]
    yield say
    stack.engine.script = script


def add_of(stack, rid: str):
    [add] = [a for a in stack.engine.adds() if a.rid.startswith(rid + "-")]
    return add


def prompt_of(stack, tok, rid: str) -> str:
    return tok.decode(list(add_of(stack, rid).prompt_ids), skip_special_tokens=False)


def template_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def post(url: str, body, path: str = "/v1/messages", **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, timeout=10,
                          headers={"content-type": "application/json", **kw.pop("headers", {})},
                          **kw)
    return httpx.post(url + path, json=body, timeout=10, **kw)


def sse_events(url: str, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(event line, data) of each SSE frame; every frame is exactly those two lines and the
    event line names the data's type."""
    out = []
    with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True},
                      headers=headers or {}, timeout=10) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert text.endswith("\n\n")
    for frame in text.split("\n\n")[:-1]:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), frame
        kind, obj = event[len("event: "):], json.loads(data[len("data: "):])
        assert obj["type"] == kind
        out.append((kind, obj))
    return out


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


# ------------------------------------------------------------------ text

def test_text_whole(ant, stack, tokenizer):
    r = ant.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert r.id.startswith("msg_") and (r.type, r.role, r.model) == ("message", "assistant",
                                                                     MODEL)
    assert [b.model_dump(exclude_none=True) for b in r.content] == [
        {"type": "text", "text": REPLY}]
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    add = add_of(stack, r.id)
    assert list(add.prompt_ids) == template_ids(tokenizer, HELLO)
    assert add.params.max_tokens == 100 and add.params.temperature == 1.0
    u = r.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_input_tokens,
            u.cache_creation_input_tokens) == (len(add.prompt_ids), len(stack.engine.script),
                                              0, 0)
    raw = post(stack.url, {"model": MODEL, "max_tokens": 100, "messages": HELLO}).json()
    assert set(raw) == {"id", "type", "role", "model", "content", "stop_reason",
                        "stop_sequence", "usage"}
    assert set(raw["usage"]) == {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                 "cache_creation_input_tokens"}


def test_text_streamed_event_order(ant, stack):
    body = {"model": MODEL, "max_tokens": 100, "messages": HELLO}
    events = sse_events(stack.url, body)
    kinds = [k for k, _ in events]
    n = kinds.count("content_block_delta")
    assert n >= 2
    assert kinds == (["message_start", "ping", "content_block_start"]
                     + ["content_block_delta"] * n
                     + ["content_block_stop", "message_delta", "message_stop"])
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["id"].startswith("msg_") and start["model"] == MODEL
    assert start["usage"]["input_tokens"] == len(add_of(stack, start["id"]).prompt_ids)
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    deltas = [d for k, d in events if k == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == REPLY
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(stack.engine.script)

    whole = ant.messages.create(**body)
    with ant.messages.stream(**body) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == REPLY
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})


def test_stop_sequences(ant, stack):
    stop = "va? 你"
    r = ant.messages.create(model=MODEL, max_tokens=100, messages=HELLO,
                            stop_sequences=["zzz", stop])
    assert r.content[0].text == REPLY[:REPLY.index(stop)]
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    assert r.usage.output_tokens < len(stack.engine.script)
    with ant.messages.stream(model=MODEL, max_tokens=100, messages=HELLO,
                             stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert final.model_dump(exclude={"id", "usage"}) == r.model_dump(exclude={"id", "usage"})


def test_max_tokens(ant, stack, tokenizer):
    r = ant.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert (r.stop_reason, r.stop_sequence) == ("max_tokens", None)
    assert r.usage.output_tokens == 5
    assert r.content[0].text == tokenizer.decode(stack.engine.script[:5])
    events = sse_events(stack.url, {"model": MODEL, "max_tokens": 5, "messages": HELLO})
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 5


def test_max_tokens_over_the_context_is_cut_to_fit(ant, stack, tokenizer):
    """Claude Code asks for 32000 tokens whatever the model: the rest of the context it is,
    and running out of context says so."""
    r = ant.messages.create(model=MODEL, max_tokens=32000, messages=HELLO)
    add = add_of(stack, r.id)
    assert add.params.max_tokens == MAX_MODEL_LEN - len(add.prompt_ids)
    assert r.stop_reason == "end_turn" and r.content[0].text == REPLY
    # A prompt that leaves 3 tokens: the reply does not fit.
    words = 1
    while len(template_ids(tokenizer, [{"role": "user", "content": "x " * words}])) < \
            MAX_MODEL_LEN - 3:
        words += 1
    messages = [{"role": "user", "content": "x " * words}]
    room = MAX_MODEL_LEN - len(template_ids(tokenizer, messages))
    r = ant.messages.create(model=MODEL, max_tokens=32000, messages=messages)
    assert r.stop_reason == "model_context_window_exceeded"
    assert r.usage.output_tokens == room
    r = ant.messages.create(model=MODEL, max_tokens=room, messages=messages)
    assert r.stop_reason == "max_tokens"
    # No room at all: Anthropic's "prompt is too long" (Claude Code compacts on it).
    too_long = [{"role": "user", "content": "x " * (MAX_MODEL_LEN + 10)}]
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model=MODEL, max_tokens=10, messages=too_long)
    assert e.value.body["error"]["message"].startswith("prompt is too long: ")
    assert f"> {MAX_MODEL_LEN - 1} maximum" in e.value.body["error"]["message"]


def test_max_tokens_zero_warms_the_cache(ant, stack):
    r = ant.messages.create(model=MODEL, max_tokens=0, messages=HELLO)
    assert (r.content, r.stop_reason, r.usage.output_tokens) == ([], "max_tokens", 0)
    assert add_of(stack, r.id).params.max_tokens == 1
    events = sse_events(stack.url, {"model": MODEL, "max_tokens": 0, "messages": HELLO})
    assert [k for k, _ in events] == ["message_start", "ping", "message_delta",
                                      "message_stop"]


def test_sampling_and_headers(ant, stack):
    r = ant.messages.create(model=MODEL, max_tokens=4, messages=HELLO,
                            extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5},
                            extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,"
                                                             "context-management-2025-06-27"})
    p = add_of(stack, r.id).params
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 5)
    # Claude Code's URL carries ?beta=true.
    raw = post(stack.url, {"model": MODEL, "max_tokens": 4, "messages": HELLO},
               path="/v1/messages?beta=true")
    assert raw.status_code == 200 and raw.json()["stop_reason"] == "max_tokens"


# ------------------------------------------------------------------ prompts

def test_system_and_history_rendered(rich):
    stack, tok, ant = rich
    r = ant.messages.create(
        model=MODEL, max_tokens=4,
        system=[{"type": "text", "text": "You are terse.",
                 "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in English."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                          "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "sig-abc"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Here:"},
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C sunny"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_01B", "name": "get_weather",
                 "input": {"city": "Lyon"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01B", "is_error": True,
                 "content": [{"type": "text", "text": "timeout"}]}]}],
        tools=[{**TOOL, "cache_control": {"type": "ephemeral"}}],
        tool_choice={"type": "none"})
    text = prompt_of(stack, tok, r.id)
    for piece in ("You are terse.\nAnswer in English.", "Weather in Paris?",
                  "<think>Use the tool.</think>\nChecking.<tool_call>",
                  '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                  "[toolu_01A] 18C sunny", "[toolu_01B] Error: timeout", '"get_weather"'):
        assert piece in text, piece
    assert "opaque" not in text and "sig-abc" not in text
    assert text.index("[toolu_01A] 18C sunny") < text.index("Here:")   # results first
    expected = ChatTurn([
        {"role": "system", "content": "You are terse.\nAnswer in English."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.",
         "tool_calls": [{"id": "toolu_01A", "type": "function", "function": {
             "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C sunny"},
        {"role": "user", "content": "Here:"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "toolu_01B", "type": "function", "function": {
             "name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01B", "content": "Error: timeout"}],
        tools=[{"type": "function", "function": {
            "name": "get_weather", "description": TOOL["description"],
            "parameters": WEATHER}}], tool_choice="none")
    assert list(add_of(stack, r.id).prompt_ids) == tok.encode(
        chat.render(tok, expected, "llama3_json"))
    assert r.content[0].type == "text"           # tool_choice none: no calls parsed


def test_thinking_config_reaches_the_template(rich):
    stack, tok, ant = rich
    off = ant.messages.create(model=MODEL, max_tokens=2, messages=HELLO,
                              thinking={"type": "disabled"})
    assert prompt_of(stack, tok, off.id).endswith("<|im_start|>assistant\n<think></think>\n")
    for thinking in ({"type": "enabled", "budget_tokens": 2048},
                     {"type": "adaptive", "display": "summarized"}):
        on = ant.messages.create(model=MODEL, max_tokens=2, messages=HELLO, thinking=thinking)
        assert prompt_of(stack, tok, on.id).endswith("<|im_start|>assistant\n")


def test_count_tokens(ant, stack, tokenizer):
    body = {"model": MODEL, "system": "Be brief.",
            "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    n = ant.messages.count_tokens(**body).input_tokens
    r = ant.messages.create(**body, max_tokens=3)
    assert n == len(add_of(stack, r.id).prompt_ids) == r.usage.input_tokens
    assert n == len(template_ids(tokenizer, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "What is 2 + 2?"}]))
    # Tools count too (no tool parser is needed to count), and a conversation may end with
    # the assistant's turn.
    with_tools = ant.messages.count_tokens(**body, tools=[TOOL]).input_tokens
    turn = ChatTurn([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2 + 2?"}],
                    tools=[{"type": "function", "function": {
                        "name": "get_weather", "description": TOOL["description"],
                        "parameters": WEATHER}}])
    assert with_tools == len(tokenizer.encode(chat.render(tokenizer, turn, None))) > n
    ended = ant.messages.count_tokens(model=MODEL, messages=[
        *body["messages"], {"role": "assistant", "content": "4"}]).input_tokens
    assert ended > 0
    r = post(stack.url, {**body, "max_tokens": 5}, path="/v1/messages/count_tokens")
    assert "max_tokens: unknown parameter" in anthropic_error(r, 400, "invalid_request_error")


def test_session_and_cache_read(ant, stack):
    system = "You are a helpful assistant. " * 6          # > 2 pages of shared prefix
    body = {"model": MODEL, "max_tokens": 3, "system": system, "messages": HELLO}
    r1 = ant.messages.create(**body, metadata={"user_id": "s-anthropic-1"})
    assert add_of(stack, r1.id).session_id == "s-anthropic-1"
    assert r1.usage.cache_read_input_tokens == 0
    r2 = ant.messages.create(**body, metadata={"user_id": "s-anthropic-1"})
    n = len(add_of(stack, r2.id).prompt_ids)
    cached = n // PAGE * PAGE
    assert cached >= 2 * PAGE
    assert (r2.usage.cache_read_input_tokens, r2.usage.input_tokens,
            r2.usage.cache_creation_input_tokens) == (cached, n - cached, 0)
    # The session header wins over metadata; streamed usage carries the cache too.
    headers = {"x-session-id": "s-anthropic-2"}
    ant.messages.create(**body, extra_headers=headers)
    with ant.messages.stream(**body, metadata={"user_id": "ignored"},
                             extra_headers=headers) as s:
        final = s.get_final_message()
    assert add_of(stack, final.id).session_id == "s-anthropic-2"
    assert (final.usage.cache_read_input_tokens, final.usage.input_tokens) == (
        cached, n - cached)


# ------------------------------------------------------------------ tool calls

def test_tool_use_whole_streamed_and_answered(rich, reply):
    stack, tok, ant = rich
    reply(CALL_TEXT)
    body = {"model": MODEL, "max_tokens": 100, "tools": [TOOL],
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    r = ant.messages.create(**body)
    assert r.stop_reason == "tool_use" and r.stop_sequence is None
    [use] = r.content
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert use.id.startswith("toolu_")

    events = sse_events(stack.url, body)
    kinds = [k for k, _ in events]
    n = kinds.count("content_block_delta")
    assert n >= 2
    assert kinds == (["message_start", "ping", "content_block_start"]
                     + ["content_block_delta"] * n
                     + ["content_block_stop", "message_delta", "message_stop"])
    block = events[2][1]["content_block"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("get_weather", {})
    pieces = [d["delta"] for k, d in events if k == "content_block_delta"]
    assert all(p["type"] == "input_json_delta" for p in pieces)
    assert json.loads("".join(p["partial_json"] for p in pieces)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with ant.messages.stream(**body) as s:
        final = s.get_final_message()
    assert final.model_dump(exclude={"id"}, exclude_none=True)["content"][0] | {"id": None} \
        == use.model_dump(exclude_none=True) | {"id": None}
    assert final.stop_reason == "tool_use"

    # Turn 2 answers the call.
    reply("It is 18C.")
    r2 = ant.messages.create(**{**body, "messages": [
        *body["messages"], {"role": "assistant", "content": r.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "18C"}]}]})
    assert [b.text for b in r2.content] == ["It is 18C."] and r2.stop_reason == "end_turn"
    text = prompt_of(stack, tok, r2.id)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert f"<|im_start|>tool\n[{use.id}] 18C<|im_end|>" in text


def test_text_then_tool_use_blocks(rich, reply):
    stack, tok, ant = rich
    reply(f"{CALL_TEXT}; " + CALL_TEXT.replace("Paris", "Rome"))
    body = {"model": MODEL, "max_tokens": 100, "tools": [TOOL],
            "messages": [{"role": "user", "content": "Paris and Rome?"}]}
    r = ant.messages.create(**body)
    assert [(b.type, b.input) for b in r.content] == [("tool_use", {"city": "Paris"}),
                                                     ("tool_use", {"city": "Rome"})]
    assert len({b.id for b in r.content}) == 2
    events = sse_events(stack.url, body)
    starts = [d for k, d in events if k == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1]
    # disable_parallel_tool_use: at most one call comes back.
    one = ant.messages.create(**body, tool_choice={"type": "auto",
                                                   "disable_parallel_tool_use": True})
    assert [b.input for b in one.content] == [{"city": "Paris"}]
    assert one.stop_reason == "tool_use"
    events = sse_events(stack.url, {**body, "tool_choice": {
        "type": "auto", "disable_parallel_tool_use": True}})
    assert [d["index"] for k, d in events if k == "content_block_start"] == [0]


def test_tool_choice_and_output_format_grammars(rich):
    stack, tok, ant = rich
    base = {"model": MODEL, "max_tokens": 2, "tools": [TOOL], "messages": HELLO}
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        r = ant.messages.create(**base, tool_choice=choice)
        assert add_of(stack, r.id).params.grammar is not None, choice
    r = ant.messages.create(**base, tool_choice={"type": "auto"})
    assert add_of(stack, r.id).params.grammar is None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = ant.messages.create(model=MODEL, max_tokens=2, messages=HELLO,
                            output_config={"format": {"type": "json_schema", "schema": schema},
                                           "effort": "low"})
    g = add_of(stack, r.id).params.grammar
    assert g.kind == "json_schema" and json.loads(g.value) == schema


def test_claude_code_shaped_request(rich, reply):
    """What Claude Code sends: system blocks with cache_control, tools, metadata.user_id,
    adaptive thinking, effort, context_management, a stream."""
    stack, tok, ant = rich
    reply(CALL_TEXT)
    body = {
        "model": MODEL, "max_tokens": 32000, "stream": True, "temperature": 1,
        "system": [{"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "Weather?", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{**TOOL, "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user_abc_account_x_session_y"},
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }
    events = sse_events(stack.url, body, headers={
        "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
        "x-api-key": "anything"})
    assert events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    add = add_of(stack, events[0][1]["message"]["id"])
    assert add.session_id == "user_abc_account_x_session_y"


# ------------------------------------------------------------------ failures

BAD = [
    # (body changes, status, error type, words the message must contain)
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens: Field required"),
    ({"max_tokens": -1}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": []}, 400, "invalid_request_error", "messages"),
    ({"temprature": 0.5}, 400, "invalid_request_error", "temprature: unknown parameter"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature: must be <= 1"),
    ({"model": "claude-sonnet-4-5"}, 404, "not_found_error", "model: 'claude-sonnet-4-5'"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400,
     "invalid_request_error", "messages[0].content[0].type: must be one of text"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0]: 'image' blocks are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "foo": 1}]}]},
     400, "invalid_request_error", "messages[0].content[0].foo: unknown parameter"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]}, 400,
     "invalid_request_error", "messages[0].content[0].tool_use_id: 'toolu_nope' answers no"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, 400,
     "invalid_request_error", "tool_use blocks belong in assistant messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                       "content": "The answer is"}]}, 400,
     "invalid_request_error", "prefill is not supported"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, 400,
     "invalid_request_error", "tool_choice: tool 'nope' is not in tools"),
    ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error",
     "tool_choice: type 'any' needs at least one tool"),
    ({"tool_choice": {"type": "auto", "parallel": False}}, 400, "invalid_request_error",
     "tool_choice.parallel: unknown parameter"),
    ({"tools": [{**TOOL, "input_schema": {"type": 5}}], "tool_choice": {"type": "none"}}, 400,
     "invalid_request_error", "tools[0].input_schema: not a valid JSON Schema"),
    ({"tools": [{"name": "f"}]}, 400, "invalid_request_error", "tools[0].input_schema: required"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}, 400,
     "invalid_request_error", "tools[0].type: 'web_search_20250305' tools are not supported"),
    ({"tools": [TOOL]}, 400, "invalid_request_error",
     "tools: this server reads no tool calls"),        # no --tool-call-parser
    ({"thinking": {"type": "on"}}, 400, "invalid_request_error", "thinking.type"),
    ({"thinking": {"type": "enabled"}}, 400, "invalid_request_error",
     "thinking.budget_tokens: required"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, 400,
     "invalid_request_error", "mcp_servers: not supported"),
    ({"metadata": {"user_id": "u" * 257}}, 400, "invalid_request_error",
     "metadata.user_id: at most 256 characters"),
    ({"system": [{"type": "image"}]}, 400, "invalid_request_error",
     "system[0]: 'image' blocks are not supported"),
    ({"system": [{"type": "tool_use"}]}, 400, "invalid_request_error",
     "system[0].type: must be 'text' here, got 'tool_use'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}],
      "thinking": {"type": "enabled", "budget_tokens": 2048.0}}, 400, "invalid_request_error",
     "'x' answers no tool_use block"),           # 2048.0 is an integer: past thinking
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}},
     400, "invalid_request_error", "output_config.format.schema: not a valid JSON Schema"),
]


@pytest.mark.parametrize("change,status,kind,words", BAD, ids=[w for *_, w in BAD])
def test_bad_request(stack, change, status, kind, words):
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, **change}
    body = {k: v for k, v in body.items() if v is not None}
    message = anthropic_error(post(stack.url, body), status, kind)
    assert words in message, message
    ok = post(stack.url, {"model": MODEL, "max_tokens": 2, "messages": HELLO})
    assert ok.status_code == 200 and ok.json()["stop_reason"] == "max_tokens"


def test_bad_json_and_routes(stack):
    msg = anthropic_error(post(stack.url, b'{"model": "x", "messages": ['), 400,
                          "invalid_request_error")
    assert "malformed JSON" in msg
    assert "not valid UTF-8" in anthropic_error(post(stack.url, b'{"a": "\xff"}'), 400,
                                                "invalid_request_error")
    anthropic_error(httpx.get(stack.url + "/v1/messages"), 405, "invalid_request_error")
    anthropic_error(post(stack.url, {}, path="/v1/messages/nope"), 404, "not_found_error")
    # Other routes keep OpenAI's shape.
    r = httpx.get(stack.url + "/v1/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = post(stack.url, {"model": MODEL}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_sdk_raises_typed_errors(ant):
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model=MODEL, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "tool_use_id" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.create(model="claude-opus-4-1", max_tokens=8, messages=HELLO)


def test_api_key_and_body_limit(tokenizer):
    with serve(tokenizer, api_key="sekret", max_body_bytes=4096) as s:
        body = {"model": MODEL, "max_tokens": 4, "messages": HELLO}
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer nope"}):
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                msg = anthropic_error(post(s.url, body, path=path, headers=headers), 401,
                                      "authentication_error")
                assert "x-api-key" in msg
        with pytest.raises(anthropic.AuthenticationError):
            client(s.url, "wrong").messages.create(**body)
        ok = client(s.url, "sekret")
        assert ok.messages.create(**body).stop_reason == "max_tokens"
        assert ok.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens > 0
        big = {**body, "messages": [{"role": "user", "content": "x" * 5000}]}
        msg = anthropic_error(post(s.url, big, headers={"x-api-key": "sekret"}), 413,
                              "request_too_large")
        assert "over this server's limit of 4096" in msg
        r = post(s.url, big, path="/v1/chat/completions", headers={"x-api-key": "sekret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_engine_failure(tokenizer):
    with serve(tokenizer) as s:
        ant = client(s.url)
        boom = [{"role": "user", "content": "[error]"}]
        msg = anthropic_error(post(s.url, {"model": MODEL, "max_tokens": 50,
                                           "messages": boom}), 500, "api_error")
        assert "fake engine failure" in msg
        events = sse_events(s.url, {"model": MODEL, "max_tokens": 50, "messages": boom})
        assert [k for k, _ in events][:3] == ["message_start", "ping", "content_block_start"]
        assert events[-1] == ("error", {"type": "error", "error": {
            "type": "api_error", "message": "generation failed: fake engine failure"}})
        assert "message_stop" not in [k for k, _ in events]
        with pytest.raises(anthropic.APIStatusError, match="fake engine failure"):
            with ant.messages.stream(model=MODEL, max_tokens=50, messages=boom) as st:
                st.get_final_message()
        s.engine.kill()
        msg = anthropic_error(post(s.url, {"model": MODEL, "max_tokens": 5, "messages": HELLO}),
                              503, "overloaded_error")
        assert "engine" in msg
        assert s.client.num_pending == 0


# ------------------------------------------------------------------ units

def _usage(prompt=10, completion=7, cached=0) -> Usage:
    return Usage(prompt, completion, cached)


def test_encoder_events_for_reasoning_text_and_split_tool_calls():
    enc = AA.MessageEncoder("msg_1", MODEL, prompt_tokens=10)
    args = '{"city": "Par\\u00eds", "days": [1, 2]}'
    pieces = [args[i:i + 3] for i in range(0, len(args), 3)]
    deltas = [ChoiceDelta(0, reasoning="Think"), ChoiceDelta(0, reasoning="ing."),
              ChoiceDelta(0, text="Checking"), ChoiceDelta(0, text="."),
              ChoiceDelta(0, tool_calls=[ToolCallDelta(0, "call_abc", "get_weather",
                                                       pieces[0])]),
              *[ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments=p)]) for p in pieces[1:]],
              ChoiceDelta(0, tool_calls=[ToolCallDelta(1, "functions.get_time:1", "get_time",
                                                       ""),
                                         ToolCallDelta(1, arguments="{}")],
                          finish_reason="tool_calls")]
    events = enc.start()
    for d in deltas:
        events += enc.feed(d)
    events += enc.finish("tool_calls", None, _usage(cached=4))
    kinds = [(e["type"], e.get("index"), (e.get("delta") or {}).get("type")) for e in events]
    n = len(pieces)
    assert kinds == (
        [("message_start", None, None), ("ping", None, None),
         ("content_block_start", 0, None), ("content_block_delta", 0, "thinking_delta"),
         ("content_block_delta", 0, "thinking_delta"),
         ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
         ("content_block_start", 1, None), ("content_block_delta", 1, "text_delta"),
         ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
         ("content_block_start", 2, None)]
        + [("content_block_delta", 2, "input_json_delta")] * n
        + [("content_block_stop", 2, None), ("content_block_start", 3, None),
           ("content_block_delta", 3, "input_json_delta"), ("content_block_stop", 3, None),
           ("message_delta", None, None), ("message_stop", None, None)])
    streamed = "".join(e["delta"]["partial_json"] for e in events
                       if e["type"] == "content_block_delta" and e["index"] == 2)
    assert json.loads(streamed) == {"city": "París", "days": [1, 2]}
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[2] == {"type": "tool_use", "id": "toolu_abc", "name": "get_weather",
                         "input": {}}
    assert starts[3]["id"].startswith(AA.TOOL_ID_TAG)
    assert AA.call_id(starts[3]["id"]) == "functions.get_time:1"     # round trip
    assert events[-2] == {"type": "message_delta",
                          "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"input_tokens": 6, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 4, "output_tokens": 7}}
    msg = enc.message()
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_abc", "name": "get_weather",
         "input": {"city": "París", "days": [1, 2]}},
        {"type": "tool_use", "id": starts[3]["id"], "name": "get_time", "input": {}}]
    assert (msg["stop_reason"], msg["usage"]["input_tokens"]) == ("tool_use", 6)
    # The whole answer as one delta gives the same message.
    whole = AA.MessageEncoder("msg_1", MODEL, prompt_tokens=10)
    whole.feed(ChoiceDelta(0, reasoning="Thinking.", text="Checking.", tool_calls=[
        ToolCallDelta(0, "call_abc", "get_weather", args),
        ToolCallDelta(1, "functions.get_time:1", "get_time", "{}")]))
    whole.finish("tool_calls", None, _usage(cached=4))
    assert whole.message() == msg


def test_encoder_stop_reasons_and_omitted_thinking():
    def reason(finish, stop=None, bound=False, **kw):
        enc = AA.MessageEncoder("m", MODEL, prompt_tokens=3, **kw)
        enc.feed(ChoiceDelta(0, text="x"))
        enc.finish(finish, stop, _usage(), context_bound=bound)
        return enc.stop_reason, enc.stop_sequence
    assert reason("stop") == ("end_turn", None)
    assert reason("stop", "END") == ("stop_sequence", "END")
    assert reason("length") == ("max_tokens", None)
    assert reason("length", bound=True) == ("model_context_window_exceeded", None)
    assert reason("stop", discard=True) == ("max_tokens", None)

    enc = AA.MessageEncoder("m", MODEL, prompt_tokens=3, omit_thinking=True)
    events = enc.feed(ChoiceDelta(0, reasoning="secret plan")) + enc.feed(
        ChoiceDelta(0, text="Done."))
    assert [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"] == [
        "signature_delta", "text_delta"]
    enc.finish("stop", None, _usage())
    [thinking, text] = enc.message()["content"]
    assert thinking["thinking"] == "" and thinking["signature"].startswith(AA.SIGNATURE_TAG)
    # Sent back, the signature re-renders the reasoning.
    body = AA.MessagesRequest.model_validate({"max_tokens": 5, "messages": [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": [thinking, text]},
        {"role": "user", "content": "again"}]})
    msgs = AA.to_turn(body).turn.messages
    assert msgs[1] == {"role": "assistant", "content": "Done.",
                       "reasoning_content": "secret plan"}


def test_request_mapping():
    body = AA.MessagesRequest.model_validate({
        "max_tokens": 5, "system": "S",
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_tsrun_" + "ZnVuY3Rpb25zLmY6MA",
                 "name": "get_weather", "input": {"city": "Zürich"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "after"},
                {"type": "tool_result", "tool_use_id": "toolu_tsrun_ZnVuY3Rpb25zLmY6MA",
                 "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"type": "thinking", "thinking": "stray"}]}]})
    p = AA.to_turn(body)
    assert p.turn.template_kwargs == {"enable_thinking": True}
    assert (p.turn.tool_choice, p.turn.parallel_tool_calls, p.max_calls) == (
        "required", False, None)
    assert p.turn.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": TOOL["description"], "parameters": WEATHER}}]
    assert p.turn.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.f:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
        {"role": "tool", "tool_call_id": "functions.f:0", "content": "a\nb"},
        {"role": "user", "content": "after"}]
    assert AA.tool_use_id("functions.f:0") == "toolu_tsrun_ZnVuY3Rpb25zLmY6MA"
    assert AA.tool_use_id("toolu_01XYZ") == "toolu_01XYZ"
    assert AA.tool_use_id("call_12ab") == "toolu_12ab"
    assert AA.tool_use_id(None).startswith("toolu_")
    auto = AA.to_turn(AA.MessagesRequest.model_validate({
        "max_tokens": 5, "tools": [TOOL], "messages": HELLO,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}))
    assert (auto.turn.tool_choice, auto.max_calls) == ("auto", 1)
    none = AA.to_turn(AA.MessagesRequest.model_validate({"max_tokens": 5, "messages": HELLO}))
    assert (none.turn.tool_choice, none.turn.template_kwargs) == ("none", {})


def test_paced_pings_and_closes_its_source():
    closed = []

    async def source():
        try:
            for i in range(3):
                await asyncio.sleep(0.25)
                yield i
            await asyncio.sleep(10)
            yield 99
        finally:
            closed.append(True)

    async def main():
        got = []
        paced = AA.paced(source(), 0.1)
        async for x in paced:
            got.append(x)
            if len([g for g in got if g is not None]) == 3 and got.count(None) >= 8:
                break
        await paced.aclose()
        return got

    got = asyncio.run(main())
    assert [g for g in got if g is not None] == [0, 1, 2]
    assert got.count(None) >= 4 and closed == [True]
