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


# ---------------------------------------------------------------- Anthropic Messages

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


GREEDY = {"temperature": 0}     # the anthropic client no longer takes it as an argument


def _anthropic(live):
    import anthropic
    return anthropic.Anthropic(base_url=live.url, api_key="none", max_retries=0, timeout=120)


def test_anthropic_forced_tool_use_whole_and_streamed(live):
    client = _anthropic(live)
    kw = dict(model=live.model, max_tokens=MAX_TOKENS, messages=ASK, tools=ANTHROPIC_TOOLS,
              tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    whole = client.messages.create(**kw)
    assert whole.stop_reason == "tool_use", whole
    use = [b for b in whole.content if b.type == "tool_use"]
    assert use and use[0].name == "get_weather" and use[0].id
    jsonschema.validate(use[0].input, WEATHER)

    events = []
    with client.messages.stream(**kw) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events[-2] == "message_delta", events
    assert "content_block_delta" in events, events
    starts = events.count("content_block_start")
    assert starts == events.count("content_block_stop") and starts >= 1
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == \
        [(b.name, b.input) for b in use]
    assert final.stop_reason == "tool_use"


def test_three_turn_tool_loop_anthropic(live):
    client = _anthropic(live)
    meta = {"user_id": f"s-{uuid.uuid4().hex}"}
    messages: list[dict] = [{"role": "user", "content": ASK[0]["content"]}]
    r1 = client.messages.create(model=live.model, max_tokens=MAX_TOKENS, messages=messages,
                                tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"},
                                extra_body=GREEDY, metadata=meta)
    use = next(b for b in r1.content if b.type == "tool_use")
    jsonschema.validate(use.input, SCHEMAS[use.name])
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                    for b in r1.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "18 degrees, cloudy"}]}]
    r2 = client.messages.create(model=live.model, max_tokens=24, messages=messages,
                                tools=ANTHROPIC_TOOLS, extra_body=GREEDY, metadata=meta)
    assert r2.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert r2.usage.cache_read_input_tokens > 0, r2.usage
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                    for b in r2.content] or "ok"},
                 {"role": "user", "content": "And the time there?"}]
    r3 = client.messages.create(model=live.model, max_tokens=MAX_TOKENS, messages=messages,
                                tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "tool", "name": "get_time"},
                                extra_body=GREEDY, metadata=meta)
    use3 = next(b for b in r3.content if b.type == "tool_use")
    assert use3.name == "get_time"
    jsonschema.validate(use3.input, TIME)
    assert r3.usage.cache_read_input_tokens > r2.usage.cache_read_input_tokens


# ---------------------------------------------------------------- OpenAI Responses

RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"],
                    "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]


def test_three_turn_tool_loop_responses(live):
    session = f"s-{uuid.uuid4().hex}"
    r1 = live.client.responses.create(
        model=live.model, input=ASK[0]["content"], tools=RESPONSES_TOOLS,
        tool_choice="required", temperature=0, max_output_tokens=MAX_TOKENS, user=session)
    call = next(i for i in r1.output if i.type == "function_call")
    _check_call(call.name, call.arguments)
    r2 = live.client.responses.create(
        model=live.model, previous_response_id=r1.id, tools=RESPONSES_TOOLS, temperature=0,
        max_output_tokens=24, user=session,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "18 degrees, cloudy"}])
    assert r2.status in ("completed", "incomplete")
    assert r2.usage.input_tokens_details.cached_tokens > 0, r2.usage
    r3 = live.client.responses.create(
        model=live.model, previous_response_id=r2.id, tools=RESPONSES_TOOLS, temperature=0,
        max_output_tokens=MAX_TOKENS, user=session,
        tool_choice={"type": "function", "name": "get_time"},
        input="And the time there?")
    call3 = next(i for i in r3.output if i.type == "function_call")
    _check_call(call3.name, call3.arguments, "get_time")
    assert r3.usage.input_tokens_details.cached_tokens > \
        r2.usage.input_tokens_details.cached_tokens
