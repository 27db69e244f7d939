"""Bad input gets OpenAI's error JSON with the right status and the field named, and the
server keeps serving; API key enforcement; a dead engine turns /health and requests 503."""
from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MAX_MODEL_LEN, MODEL, REPLY, serve

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
LONG = "word " * (MAX_MODEL_LEN + 10)

# (route, body or raw bytes, status, param, words the message must contain)
CASES = [
    ("chat", b'{"model": "x", "messages": [', 400, None, "malformed JSON"),
    ("chat", b'[1, 2]', 400, None, "request body"),
    ("chat", {"model": MODEL}, 400, "messages", "messages"),
    ("chat", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("chat", {**CHAT, "messages": [{"content": "no role"}]}, 400, "messages", "role"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("chat", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens", "max_tokens"),
    ("chat", {**CHAT, "stream": "yes"}, 400, "stream", "stream"),
    ("chat", {**CHAT, "stop": 3}, 400, "stop", "stop"),
    ("chat", {**CHAT, "stop": ["ok", ""]}, 400, "stop", "stop"),
    ("chat", {**CHAT, "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("chat", {**CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "maximum context"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "maximum context"),
    ("chat", {**CHAT, "temperature": -1}, 400, "temperature", ">= 0"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p", "> 0"),
    ("chat", {**CHAT, "top_p": 1.5}, 400, "top_p", "<= 1"),
    ("chat", {**CHAT, "min_p": 2}, 400, "min_p", "min_p"),
    ("chat", {**CHAT, "presence_penalty": 3}, 400, "presence_penalty", "<= 2"),
    ("chat", {**CHAT, "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("chat", {**CHAT, "n": 9}, 400, "n", "[1, 8]"),
    ("chat", {**CHAT, "n": 0}, 400, "n", ">= 1"),
    ("chat", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("chat", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages", "text parts"),
    ("completions", {"model": MODEL}, 400, "prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ("completions", {"model": MODEL, "prompt": [1, 10 ** 9]}, 400, "prompt", "token ids"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, "prompt", "maximum context"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens", "maximum context"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs", "20"),
    ("completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", "echo"),
    # Fields: unknown ones, and OpenAI's that tsrun does not implement, are named.
    ("chat", {**CHAT, "temprature": 0.5}, 400, "temprature", "unknown parameter"),
    ("chat", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions", "use tools"),
    # Tools and structured outputs: schemas are JSON Schema, names are declared.
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}]}, 400, "tools",
     "tools[0].function.parameters: not a valid JSON Schema"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400,
     "tools", "should match pattern"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, 400,
     "tools", "declared twice"),
    ("chat", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice", "only allowed when tools"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
     "tool_choice", "tool 'g' is not in tools"),
    ("chat", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format",
     "not a valid JSON Schema"),
    ("chat", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format",
     "json_schema: required"),
    ("chat", {**CHAT, "logit_bias": {"49152": 5}}, 400, "logit_bias",
     "keys must be token ids in [0, 49152)"),
    ("chat", {**CHAT, "logit_bias": {"abc": 5}}, 400, "logit_bias", "keys must be token ids"),
    ("chat", {**CHAT, "logit_bias": {"15": 101}}, 400, "logit_bias", "100"),
    ("chat", {**CHAT, "logit_bias": {"15": 1, "015": 2}}, 400, "logit_bias", "given twice"),
    ("chat", {**CHAT, "store": True}, 400, "store", "not supported"),
    ("chat", {**CHAT, "stream": True, "stream_options": {"include_obfuscation": True}}, 400,
     "stream_options", "stream_options.include_obfuscation: not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", "use n"),
    ("completions", {"model": MODEL, "prompt": "x", "suffix": "}"}, 400, "suffix",
     "not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "tools": []}, 400, "tools",
     "unknown parameter"),
    # Messages: known roles and content-part types only.
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "messages", "messages[0].tool_calls: only assistant messages"),
    ("chat", {**CHAT, "messages": [{"role": "tool", "content": "42"}]}, 400, "messages",
     "messages[0].tool_call_id: required"),
    ("chat", {**CHAT, "messages": [{"role": "tool", "content": "42", "tool_call_id": "c9"}]},
     400, "messages", "'c9' answers no tool call"),
    ("chat", {**CHAT, "messages": [{"role": "function", "content": "42"}]}, 400, "messages",
     "deprecated functions API"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages",
     "Input should be 'system', 'developer'"),
    ("chat", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages",
     "messages[0].content: required"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
     "messages", "messages[0].content[0].type: must be one of text"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "cache_control": {}}]}]}, 400, "messages",
     "content[0].cache_control: unknown parameter"),
    ("chat", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "messages",
     "lone surrogate U+D800"),
    # Values: bounded as OpenAI bounds them, token ids inside the vocabulary.
    ("chat", {**CHAT, "temperature": 2.5}, 400, "temperature", "<= 2"),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature", "finite"),
    ("chat", {**CHAT, "seed": 2 ** 64}, 400, "seed", f"<= {2 ** 63 - 1}"),
    ("chat", {**CHAT, "top_k": 10 ** 6}, 400, "top_k", "[-1, 49152]"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("chat", {**CHAT, "stop": "x" * 1025}, 400, "stop", "at most 1024 characters"),
    ("chat", {**CHAT, "stop_token_ids": [1, 49152]}, 400, "stop_token_ids", "[0, 49152)"),
    ("chat", {**CHAT, "stop_token_ids": [1] * 257}, 400, "stop_token_ids", "at most 256"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
    ("chat", {**CHAT, "user": "u" * 257}, 400, "user", "at most 256 characters"),
    ("chat", {**CHAT, "n": 10 ** 12}, 400, "n", "<= 128"),
]


@pytest.mark.parametrize("route,body,status,param,words", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request(stack, route, body, status, param, words):
    url = f"{stack.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"], err["message"]
    if param:
        assert err["message"].startswith(param), err["message"]


def test_no_op_values_of_unsupported_fields_are_accepted(stack):
    """Clients that send every field with its neutral value (`null`, `[]`, `"none"`) work."""
    body = {**CHAT, "tools": [], "tool_choice": "none", "logit_bias": {}, "n": None,
            "response_format": {"type": "text"}, "parallel_tool_calls": None,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}],
                          "tool_calls": []}]}
    r = httpx.post(stack.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY


def test_still_serving_after_bad_requests(stack):
    r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY
    assert stack.client.num_pending == 0


def test_unknown_route_and_method(stack):
    r = httpx.get(stack.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(stack.url + "/v1/completions").status_code == 405


def test_api_key(tokenizer):
    with serve(tokenizer, api_key="sekret") as s:
        url = s.url + "/v1/chat/completions"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            r = httpx.post(url, json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope",
                          max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.chat.completions.create(**CHAT).choices[0].message.content == REPLY
        assert httpx.get(s.url + "/health").status_code == 200      # probes need no key


def test_engine_death(tokenizer):
    with serve(tokenizer) as s:
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=10)
        stream = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[slow]"}], stream=True)
        next(iter(stream))
        s.engine.kill()
        with pytest.raises(openai.APIError, match="engine process exited"):
            list(stream)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "exited" in r.json()["reason"]
        r = httpx.post(s.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert s.client.num_pending == 0
