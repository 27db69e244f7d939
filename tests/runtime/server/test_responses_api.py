"""The OpenAI Responses API (`/v1/responses`) through the official `openai` client against the
live API process (fake engine, real SmolLM2 tokenizer): whole and streamed responses (the
exact event order), usage and cached tokens, previous_response_id chaining on token ids,
the store (GET / DELETE / store: false), max_output_tokens, engine failure mid-stream, the
input items rendered into the prompt (a template that renders reasoning and tools), function
and custom tool calls read back by the llama3_json parser, and 400s naming the field.
The encoder's delta -> event / item mapping is unit-tested with hand-made deltas."""
from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from tscompile.runtime.protocol import Abort
from tscompile.runtime.server import chat
from tscompile.runtime.server import responses_api as RA
from tscompile.runtime.server.chat import ChatTurn
from tscompile.runtime.server.output import ChoiceDelta
from tscompile.runtime.server.parsers.base import ToolCallDelta
from tscompile.runtime.server.serving import Usage
from tscompile.tokenizer import Tokenizer

from .conftest import MODEL, PAGE, REPLY, serve

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
FUNCTION = {"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": WEATHER, "strict": True}
# Small: the fake engine's context is 256 tokens.
PATCH = {"type": "custom", "name": "apply_patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return client(stack.url)


def template_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def add_of(stack, rid: str):
    [add] = [a for a in stack.engine.adds() if a.rid.startswith(rid)]
    return add


def sse_events(url: str, body: dict) -> list[tuple[str, dict]]:
    """(event line, data) of each SSE frame; no frame may be anything else."""
    out = []
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=10) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    for frame in text.split("\n\n"):
        if not frame:
            continue
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), frame
        out.append((event[len("event: "):], json.loads(data[len("data: "):])))
    return out


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/responses", json=body, timeout=10)


# ------------------------------------------------------------------ whole responses

def test_string_input_whole(oai, stack, tokenizer):
    r = oai.responses.create(model=MODEL, input="hi")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert (r.status, r.error, r.incomplete_details) == ("completed", None, None)
    assert r.output_text == REPLY
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert msg.id.startswith("msg_")
    assert [(c.type, c.text, c.annotations) for c in msg.content] == [("output_text", REPLY, [])]
    add = add_of(stack, r.id)
    assert list(add.prompt_ids) == template_ids(tokenizer, [{"role": "user", "content": "hi"}])
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (len(add.prompt_ids), len(stack.engine.script))
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0
    # Echoed request fields.
    assert (r.tool_choice, r.tools, r.parallel_tool_calls, r.store) == ("auto", [], True, True)
    assert (r.temperature, r.top_p, r.truncation, r.previous_response_id) == (
        1.0, 1.0, "disabled", None)
    assert r.text.format.type == "text" and r.metadata == {}
    raw = post(stack.url, {"model": MODEL, "input": "hi"}).json()
    assert "output_text" not in raw and raw["completed_at"] >= raw["created_at"]


def test_instructions_and_message_items(oai, stack, tokenizer):
    r = oai.responses.create(
        model=MODEL, instructions="Be brief.", temperature=0.5, top_p=0.9,
        input=[{"role": "developer", "content": "Answer in English."},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "one"},
                            {"type": "input_text", "text": "two"}]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
               {"role": "user", "content": "three"}])
    assert r.instructions == "Be brief." and (r.temperature, r.top_p) == (0.5, 0.9)
    add = add_of(stack, r.id)
    assert list(add.prompt_ids) == template_ids(tokenizer, [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "three"}])
    assert (add.params.temperature, add.params.top_p) == (0.5, 0.9)


def test_max_output_tokens_incomplete(oai, stack):
    r = oai.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3
    assert r.output[0].status == "incomplete" and REPLY.startswith(r.output_text)
    assert add_of(stack, r.id).params.max_tokens == 3
    events = sse_events(stack.url, {"model": MODEL, "input": "hi", "max_output_tokens": 3,
                                    "stream": True})
    assert events[-1][0] == "response.incomplete"
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete" and final["output"][0]["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_cached_tokens_on_a_repeated_session_prefix(oai):
    text = "Tell me a long story about a lighthouse keeper and the sea, " * 3
    first = oai.responses.create(model=MODEL, input=text, prompt_cache_key="rs-cache")
    again = oai.responses.create(model=MODEL, input=text, prompt_cache_key="rs-cache")
    assert first.usage.input_tokens_details.cached_tokens == 0
    cached = again.usage.input_tokens_details.cached_tokens
    assert cached > 0 and cached % PAGE == 0 and cached <= again.usage.input_tokens


def test_session_header_and_user_are_the_session(oai, stack):
    r = oai.responses.create(model=MODEL, input="hi", user="u-1")
    assert add_of(stack, r.id).session_id == "u-1"
    r = oai.responses.create(model=MODEL, input="hi", user="u-1", prompt_cache_key="k-1",
                             extra_headers={"x-session-id": "h-1"})
    assert add_of(stack, r.id).session_id == "h-1"


# ------------------------------------------------------------------ streaming

def test_stream_event_order_exact(stack):
    events = sse_events(stack.url, {"model": MODEL, "input": "hi", "stream": True})
    kinds = [k for k, _ in events]
    assert all(data["type"] == k for k, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    n = kinds.count("response.output_text.delta")
    assert n >= 2
    assert kinds == (["response.created", "response.in_progress",
                      "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * n
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.completed"])
    by = {k: d for k, d in events}
    assert by["response.created"]["response"]["status"] == "in_progress"
    assert by["response.created"]["response"]["output"] == []
    item_id = by["response.output_item.added"]["item"]["id"]
    deltas = [d for k, d in events if k == "response.output_text.delta"]
    assert all((d["item_id"], d["output_index"], d["content_index"]) == (item_id, 0, 0)
               for d in deltas)
    assert "".join(d["delta"] for d in deltas) == REPLY
    assert by["response.output_text.done"]["text"] == REPLY
    assert by["response.content_part.done"]["part"]["text"] == REPLY
    done = by["response.output_item.done"]["item"]
    final = by["response.completed"]["response"]
    assert done["id"] == item_id and final["output"] == [done]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] > 0
    assert final["id"] == by["response.created"]["response"]["id"]


def test_sdk_stream_equals_whole(oai):
    whole = oai.responses.create(model=MODEL, input="hi")
    with oai.responses.stream(model=MODEL, input="hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == whole.output_text == REPLY
    assert final.status == "completed" and final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in oai.responses.create(model=MODEL, input="hi", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_engine_failure_mid_stream(oai, stack):
    events = sse_events(stack.url, {"model": MODEL, "input": "[error]", "stream": True})
    kind, data = events[-1]
    assert kind == "response.failed" and not any(k == "response.completed" for k, _ in events)
    r = data["response"]
    assert r["status"] == "failed" and r["error"]["code"] == "server_error"
    assert "fake engine failure" in r["error"]["message"]
    with pytest.raises(openai.InternalServerError, match="fake engine failure"):
        oai.responses.create(model=MODEL, input="[error]")
    assert oai.responses.create(model=MODEL, input="hi").output_text == REPLY


def test_client_gone_mid_stream_aborts_the_engine_request(oai, stack):
    body = {"model": MODEL, "input": "[slow] tell me", "stream": True}
    with httpx.stream("POST", stack.url + "/v1/responses", json=body, timeout=10) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"response.created"' in line:
                rid = json.loads(line[6:])["response"]["id"]
            if "response.output_text.delta" in line:
                break
    assert stack.engine.wait_for(lambda m: isinstance(m, Abort) and m.rid == f"{rid}-0")
    with pytest.raises(openai.NotFoundError):               # never finished: not stored
        oai.responses.retrieve(rid)


# ------------------------------------------------------------------ store and chaining

def test_previous_response_id_chains_on_token_ids(oai, stack, tokenizer):
    r1 = oai.responses.create(model=MODEL, input="hi", prompt_cache_key="rs-chain")
    r2 = oai.responses.create(model=MODEL, input="and then?", previous_response_id=r1.id)
    assert r2.previous_response_id == r1.id
    p1, p2 = list(add_of(stack, r1.id).prompt_ids), list(add_of(stack, r2.id).prompt_ids)
    turn1 = p1 + stack.engine.script                       # prompt + REPLY + EOS
    assert p2[:len(turn1)] == turn1
    assert p2 == template_ids(tokenizer, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": REPLY},
                                          {"role": "user", "content": "and then?"}])
    # The chain keeps turn 1's session: turn 2 hits the prefix cache.
    assert add_of(stack, r2.id).session_id == "rs-chain"
    assert r2.usage.input_tokens_details.cached_tokens >= len(p1) // PAGE * PAGE > 0
    r3 = oai.responses.create(model=MODEL, input="more", previous_response_id=r2.id)
    assert list(add_of(stack, r3.id).prompt_ids)[:len(p2)] == p2


def test_instructions_are_not_carried_over(oai, stack, tokenizer):
    r1 = oai.responses.create(model=MODEL, input="hi", instructions="Be brief.")
    r2 = oai.responses.create(model=MODEL, input="again", previous_response_id=r1.id)
    text = tokenizer.decode(list(add_of(stack, r2.id).prompt_ids), skip_special_tokens=False)
    assert "Be brief." not in text and "again" in text and REPLY in text
    assert r2.instructions is None


def test_get_and_delete(oai, stack):
    r = oai.responses.create(model=MODEL, input="hi", metadata={"k": "v"})
    got = oai.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"k": "v"}
    events = sse_events(stack.url, {"model": MODEL, "input": "hi", "stream": True})
    final = events[-1][1]["response"]
    stored = httpx.get(f"{stack.url}/v1/responses/{final['id']}").json()
    assert stored == final
    assert stored["output"][0]["id"] == events[2][1]["item"]["id"]
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match="no stored response"):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(r.id)


def test_store_false_stores_nothing(oai):
    r = oai.responses.create(model=MODEL, input="hi", store=False)
    assert r.store is False and r.output_text == REPLY
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="more", previous_response_id=r.id)


def test_store_is_bounded():
    api = RA.ResponsesAPI(None, max_stored=2)
    for i in range(3):
        api._put(RA._Stored({"id": f"r{i}"}, [], None))
    api._get("r1")                                       # used: r2 is now the oldest
    api._put(RA._Stored({"id": "r3"}, [], None))
    assert list(api.stored) == ["r1", "r3"]


# ------------------------------------------------------------------ bad requests

CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}'}
BAD = [
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0]"),
    ({"input": [{"type": "telepathy", "text": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
     "input[1].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": "hi", "colour": "red"}]}, "input[0].colour"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"tools": [FUNCTION], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"tools": [FUNCTION], "tool_choice": {"type": "custom", "name": "get_weather"}},
     "tool_choice"),
    ({"tools": [{**FUNCTION, "parameters": {"type": 5}}]}, "tools[0].parameters"),
    ({"tools": [{**FUNCTION, "parameters": [1, 2]}]}, "tools[0].parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "custom", "name": "x", "format": {"type": "grammar"}}]},
     "tools[0].format"),
    ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x",
                          "schema": {"type": "nonsense"}}}}, "text.format"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("extra,field", BAD, ids=[f for _, f in BAD])
def test_bad_request_is_a_400_naming_the_field(oai, stack, extra, field):
    r = post(stack.url, {"model": MODEL, "input": "hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(field) or f"{field}:" in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert oai.responses.create(model=MODEL, input="hi").output_text == REPLY


def test_unknown_model_is_a_404(stack):
    r = post(stack.url, {"model": "gpt-9", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ------------------------------------------------------------------ the prompt side

# A small template that renders what SmolLM2's does not: tools, reasoning, tool calls and
# results, and enable_thinking.
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


@pytest.fixture(scope="module")
def rich(smollm2_dir):
    tok = Tokenizer(smollm2_dir)
    tok.chat_template = TEMPLATE
    with serve(tok, tool_parser="llama3_json") as s:
        yield s, tok, client(s.url)


def test_input_items_rendered_into_the_prompt(rich):
    stack, tok, oai = rich
    fn = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    r = oai.responses.create(model=MODEL, tools=[fn, PATCH], instructions="Sys.", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "summary": [], "content": [
            {"type": "reasoning_text", "text": "Call it."}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Checking."}]},
        CALL,
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "s"}],
         "encrypted_content": RA.ENCRYPTED_TAG + base64.b64encode(b"Patch now.").decode()},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch",
         "input": "P1\nP2"},
        {"type": "custom_tool_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "Done"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-not-ours"},
        {"role": "user", "content": "Thanks"}])
    assert REPLY.startswith(r.output_text)           # little room is left: 256 tokens
    prompt = list(add_of(stack, r.id).prompt_ids)
    text = tok.decode(prompt, skip_special_tokens=False)
    for piece in ("<think>Call it.</think>\nChecking.<tool_call>",
                  '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                  "[call_1] 18C", "<think>Patch now.</think>",
                  '"arguments": {"input": "P1\\nP2"}',
                  "[call_2] Done", '"name": "apply_patch"', '"input": {"type": "string"',
                  "lark grammar"):
        assert piece in text, piece
    assert "gAAAA" not in text
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object"}}},
             {"type": "function", "function": RA._custom_function(RA._CustomTool(**PATCH))}]
    expected = ChatTurn([
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.",
         "reasoning_content": "Call it.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "", "reasoning_content": "Patch now.",
         "tool_calls": [{"id": "call_2", "type": "function",
                         "function": {"name": "apply_patch",
                                      "arguments": json.dumps(
                                          {"input": "P1\nP2"})}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "Done"},
        {"role": "user", "content": "Thanks"}], tools=tools)
    assert prompt == tok.encode(chat.render(tok, expected, "llama3_json"))


def test_reasoning_effort_none_turns_thinking_off(rich):
    stack, tok, oai = rich
    r = oai.responses.create(model=MODEL, input="hi", reasoning={"effort": "none"})
    assert r.reasoning.effort == "none"
    text = tok.decode(list(add_of(stack, r.id).prompt_ids), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n<think></think>\n")
    r = oai.responses.create(model=MODEL, input="hi", reasoning={"effort": "high",
                                                                 "summary": "auto"})
    text = tok.decode(list(add_of(stack, r.id).prompt_ids), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and r.reasoning.summary == "auto"


def test_json_schema_text_format(oai, stack):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = oai.responses.create(model=MODEL, input="hi", text={"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    g = add_of(stack, r.id).params.grammar
    assert g.kind == "json_schema" and json.loads(g.value) == schema
    assert r.text.format.type == "json_schema" and r.text.format.name == "thing"
    r = oai.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_object"}})
    assert add_of(stack, r.id).params.grammar.kind == "json_object"


# ------------------------------------------------------------------ tool calls read back

@pytest.fixture(scope="module")
def tools_stack(tokenizer):
    """SmolLM2 with the llama3_json parser; each test sets what the fake model replies."""
    with serve(tokenizer, tool_parser="llama3_json") as s:
        yield s, client(s.url)


def reply_with(stack, tokenizer, text: str) -> None:
    stack.engine.script = tokenizer.encode(text) + [stack.engine.eos]


def test_function_call_whole_streamed_and_answered(tools_stack, tokenizer):
    stack, oai = tools_stack
    reply_with(stack, tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    r = oai.responses.create(model=MODEL, input="Weather in Paris?", tools=[FUNCTION])
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    assert r.status == "completed" and r.output_text == "" and r.usage.output_tokens > 10

    events = sse_events(stack.url, {"model": MODEL, "input": "Weather in Paris?",
                                    "tools": [FUNCTION], "stream": True})
    kinds = [k for k, _ in events]
    n = kinds.count("response.function_call_arguments.delta")
    assert n >= 2
    assert kinds == (["response.created", "response.in_progress",
                      "response.output_item.added"]
                     + ["response.function_call_arguments.delta"] * n
                     + ["response.function_call_arguments.done", "response.output_item.done",
                        "response.completed"])
    by = {k: d for k, d in events}
    added, done = by["response.output_item.added"]["item"], by["response.output_item.done"]["item"]
    deltas = [d for k, d in events if k == "response.function_call_arguments.delta"]
    assert {d["item_id"] for d in deltas} == {added["id"]}
    args = "".join(d["delta"] for d in deltas)
    assert args == by["response.function_call_arguments.done"]["arguments"] == done["arguments"]
    assert (added["id"], added["call_id"]) == (done["id"], done["call_id"])
    assert by["response.completed"]["response"]["output"] == [done]
    stored = oai.responses.retrieve(by["response.completed"]["response"]["id"])
    assert (stored.output[0].id, stored.output[0].call_id) == (done["id"], done["call_id"])

    # Turn 2 answers the call through previous_response_id.
    reply_with(stack, tokenizer, "It is 18C.")
    r2 = oai.responses.create(model=MODEL, previous_response_id=r.id, tools=[FUNCTION], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert r2.output_text == "It is 18C."
    text = tokenizer.decode(list(add_of(stack, r2.id).prompt_ids), skip_special_tokens=False)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\n18C<|im_end|>" in text


def test_custom_tool_call_whole_and_streamed(tools_stack, tokenizer):
    stack, oai = tools_stack
    patch = '*** Begin Patch\n+print("héllo 😀")\n*** End Patch'
    reply_with(stack, tokenizer, json.dumps({"name": "apply_patch",
                                             "parameters": {"input": patch}}))
    r = oai.responses.create(model=MODEL, input="Add a.py", tools=[PATCH])
    [call] = r.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch"
    assert call.input == patch and call.call_id.startswith("call_")
    assert r.status == "completed"

    events = sse_events(stack.url, {"model": MODEL, "input": "Add a.py",
                                    "tools": [PATCH], "stream": True})
    deltas = [d["delta"] for k, d in events if k == "response.custom_tool_call_input.delta"]
    assert len(deltas) >= 2 and "".join(deltas) == patch
    by = {k: d for k, d in events}
    assert by["response.custom_tool_call_input.done"]["input"] == patch
    assert by["response.output_item.done"]["item"]["input"] == patch
    assert by["response.completed"]["response"]["output"][0]["input"] == patch


def test_forced_custom_tool_with_a_regex_is_constrained(tools_stack, tokenizer):
    stack, oai = tools_stack
    digits = {"type": "custom", "name": "digits",
              "format": {"type": "grammar", "syntax": "regex", "definition": "[0-9]{1,8}"}}
    reply_with(stack, tokenizer, '{"name": "digits", "parameters": {"input": "123"}}')
    r = oai.responses.create(model=MODEL, input="Pick a number", tools=[digits],
                             tool_choice={"type": "custom", "name": "digits"})
    assert r.output[0].type == "custom_tool_call" and r.output[0].input == "123"
    g = add_of(stack, r.id).params.grammar
    assert g.kind == "structural_tag" and "digits" in g.value and "[0-9]{1,8}" in g.value
    assert r.tool_choice.type == "custom" and r.tool_choice.name == "digits"


# ------------------------------------------------------------------ the encoder, by hand

def events_of(enc: RA.ResponseEncoder, deltas: list[ChoiceDelta], finish: str = "stop"):
    out = enc.start()
    for d in deltas:
        out += enc.feed(d)
    out += enc.finish(finish, Usage(10, 20, 0))
    return out


def test_encoder_reasoning_text_and_calls_in_pieces():
    enc = RA.ResponseEncoder({"id": "resp_x"}, encrypted=True, count_tokens=len)
    pieces = ['{"ci', 'ty"', ': "Pa', "ris", '"}']
    deltas = [ChoiceDelta(0, reasoning="\n"), ChoiceDelta(0, reasoning="Think"),
              ChoiceDelta(0, reasoning="ing.", text="\n\n"), ChoiceDelta(0, text="Sure"),
              ChoiceDelta(0, text=".", tool_calls=[ToolCallDelta(0, "call_a", "get_weather")])]
    deltas += [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments=p)]) for p in pieces]
    deltas += [ChoiceDelta(0, tool_calls=[ToolCallDelta(1, "call_b", "get_weather", "{}")]),
               ChoiceDelta(0, text=" \n")]                # trailing whitespace: no new item
    events = events_of(enc, deltas, "tool_calls")
    kinds = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added"] + ["response.function_call_arguments.delta"] * 5 + [
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    final = events[-1]["response"]
    rs, msg, fc, fc2 = final["output"]
    assert rs["type"] == "reasoning" and rs["id"].startswith("rs_") and rs["summary"] == []
    assert rs["content"] == [{"type": "reasoning_text", "text": "\nThinking."}]
    assert RA._reasoning_text({"encrypted_content": rs["encrypted_content"]}) == "\nThinking."
    assert msg["content"][0]["text"] == "\n\nSure." and msg["status"] == "completed"
    assert (fc["call_id"], fc["name"], fc["arguments"]) == ("call_a", "get_weather",
                                                            '{"city": "Paris"}')
    arg_deltas = [e["delta"] for e in events if e["type"].endswith("arguments.delta")
                  and e["item_id"] == fc["id"]]
    assert arg_deltas == pieces
    dones = {e["item"]["id"]: e["item"] for e in events
             if e["type"] == "response.output_item.done"}
    addeds = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [a["id"] for a in addeds] == [i["id"] for i in final["output"]] == list(dones)
    assert [dones[i["id"]] for i in final["output"]] == final["output"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == \
        [0, 1, 2, 3]
    assert fc2["call_id"] == "call_b" and fc2["arguments"] == "{}"
    assert final["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 20,
                              "output_tokens_details": {"reasoning_tokens": 10},
                              "total_tokens": 30}
    # The whole (non-streamed) path: one delta with everything, the same items.
    whole = RA.ResponseEncoder({"id": "resp_y"}, count_tokens=len)
    whole.feed(ChoiceDelta(0, reasoning="\nThinking.", text="\n\nSure. \n", tool_calls=[
        ToolCallDelta(0, "call_a", "get_weather", '{"city": "Paris"}'),
        ToolCallDelta(1, "call_b", "get_weather", "{}")]))
    whole.finish("tool_calls", Usage(10, 20, 0))
    strip = [{k: v for k, v in i.items() if k not in ("id", "encrypted_content")}
             for i in final["output"]]
    got = [{k: v for k, v in i.items() if k != "id"} for i in whole.response()["output"]]
    strip[1]["content"][0]["text"] += " \n"          # whole: the trailing text is one piece
    assert got == strip


def test_encoder_custom_tool_input_streams_decoded():
    patch = 'line "one"\n\tcafé 😀 \\ end'
    args = json.dumps({"input": patch})                      # \" \n \t \u00e9 \ud83d\ude00 \\
    for size in (1, 2, 3, 5, 7):
        enc = RA.ResponseEncoder({"id": "r"}, custom={"apply_patch"})
        pieces = [args[i:i + size] for i in range(0, len(args), size)]
        deltas = [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, "call_p", "apply_patch",
                                                           pieces[0])])]
        deltas += [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments=p)])
                   for p in pieces[1:]]
        events = events_of(enc, deltas)
        streamed = [e["delta"] for e in events
                    if e["type"] == "response.custom_tool_call_input.delta"]
        assert "".join(streamed) == patch and len(streamed) > 1, size
        assert all("\ufffd" not in s for s in streamed)
        [done] = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
        item = events[-1]["response"]["output"][0]
        assert done["input"] == item["input"] == patch and item["type"] == "custom_tool_call"
        assert item["call_id"] == "call_p" and item["id"].startswith("ctc_")
    # Arguments of another shape: the whole input in one delta at the end.
    enc = RA.ResponseEncoder({"id": "r"}, custom={"apply_patch"})
    events = events_of(enc, [ChoiceDelta(0, tool_calls=[
        ToolCallDelta(0, "call_q", "apply_patch", '{"patch": '),
        ToolCallDelta(0, arguments='"x y"}')])])
    assert [e["delta"] for e in events if e["type"].endswith("input.delta")] == ["x y"]


def test_encoder_failure_and_empty_output():
    enc = RA.ResponseEncoder({"id": "r"})
    enc.start()
    enc.feed(ChoiceDelta(0, text="Hel"))
    [failed] = enc.fail("engine died")
    r = failed["type"], failed["response"]
    assert r[0] == "response.failed" and r[1]["status"] == "failed"
    assert r[1]["error"] == {"code": "server_error", "message": "engine died"}
    assert r[1]["output"][0]["status"] == "incomplete"
    assert r[1]["output"][0]["content"][0]["text"] == "Hel"
    enc = RA.ResponseEncoder({"id": "r"})
    events = events_of(enc, [ChoiceDelta(0, text=" ")])
    [msg] = events[-1]["response"]["output"]
    assert msg["type"] == "message" and msg["content"][0]["text"] == " "


def test_input_stream_head_variants():
    for args in ('{"input":"a\\u00e9b"}', ' { "input" : "a\\u00e9b" } ', '{"input": "a\\u00e9b"}'):
        s = RA._InputStream()
        assert "".join(s.feed(c) for c in args) == "a\u00e9b" and s.ok and s.closed
    s = RA._InputStream()
    assert s.feed('{"inp') == "" and s.ok
    assert s.feed('ut_x": 1}') == "" and not s.ok
    assert RA.custom_input("not json") == "not json"
    assert RA.custom_input('{"input": "x", "other": 1}') == "x"
