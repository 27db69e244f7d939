"""The official `openai` client against the live API process (fake engine, real SmolLM2
tokenizer): shapes, text, usage, stop strings, fan-out, metrics and aborts."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from tscompile.runtime.protocol import Abort

from .conftest import KERNELS, MAX_MODEL_LEN, MODEL, PAGE, REPLY

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0,
                         timeout=10)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def test_chat_whole(oai, stack, tokenizer):
    r = oai.chat.completions.create(model=MODEL, messages=HELLO)
    [c] = r.choices
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", REPLY, "stop")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    n_prompt = len(chat_prompt_ids(tokenizer, HELLO))
    n_out = len(stack.engine.script)            # REPLY's tokens + EOS
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, n_out, n_prompt + n_out)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    add = next(a for a in stack.engine.adds() if a.rid.startswith(r.id))
    assert list(add.prompt_ids) == chat_prompt_ids(tokenizer, HELLO)
    assert add.params.max_tokens == MAX_MODEL_LEN - n_prompt   # default: the rest of context


def test_chat_stream_with_usage(oai, stack):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert "\ufffd" not in text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        stack.engine.script)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_text_and_ids(oai, tokenizer, stack):
    r = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    [c] = r.choices
    assert c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert c.text == tokenizer.decode(stack.engine.script[:5])
    ids = tokenizer.encode("Once upon")
    r2 = oai.completions.create(model=MODEL, prompt=ids, max_tokens=5)
    assert r2.choices[0].text == c.text and r2.usage.prompt_tokens == len(ids)
    chunks = list(oai.completions.create(model=MODEL, prompt=ids, max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_batch_of_prompts(oai):
    r = oai.completions.create(model=MODEL, prompt=["a", "b c"], max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 12


def test_n_fans_out_with_seeds(oai, stack):
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, n=2, seed=7, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    adds = {a.rid: a for a in stack.engine.adds() if a.rid.startswith(r.id)}
    assert sorted(adds) == [f"{r.id}-0", f"{r.id}-1"]
    assert (adds[f"{r.id}-0"].params.seed, adds[f"{r.id}-1"].params.seed) == (7, 8)
    assert r.usage.prompt_tokens == len(adds[f"{r.id}-0"].prompt_ids)   # counted once
    assert r.usage.completion_tokens == 8
    stream = list(oai.chat.completions.create(model=MODEL, messages=HELLO, n=2,
                                              max_tokens=4, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in stream
                     if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [r.choices[0].message.content] * 2


def test_chat_logprobs(oai, stack):
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(stack.engine.script)
    for e in content:
        assert isinstance(e.token, str) and e.logprob < 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
    # Raw bytes are exact even where a token is half a character ("Ç", "你", "😀").
    assert bytes(b for e in content[:-1] for b in e.bytes).decode() == REPLY
    assert any(e.token.startswith("bytes:\\x") for e in content)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True,
                                              stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)
    r = oai.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.choices[0].logprobs is None


def test_completion_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt="x", max_tokens=10, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert len(lp.text_offset) == 10 and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    # A token's offset is where its text starts: the ASCII tokens line up exactly.
    text = r.choices[0].text
    for tok, off in zip(lp.tokens, lp.text_offset):
        if tok.isascii() and not tok.startswith("bytes:"):
            assert text[off:off + len(tok)] == tok
    assert all(len(t) == 1 for t in lp.top_logprobs)      # sampled == best here


@pytest.mark.parametrize("stop", ["swer i", "va? 你", "😀 The"])
def test_stop_string_spanning_tokens(oai, stack, stop):
    want = REPLY[:REPLY.index(stop)]
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < len(stack.engine.script)
    assert stack.engine.wait_for(lambda m: m == Abort(f"{r.id}-0", "stop"))
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, stop=[stop, "zzz"],
                                              stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in p or p.endswith(stop[:2]) for p in pieces)
    r = oai.completions.create(model=MODEL, prompt="x", stop=stop, max_tokens=100)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


def test_near_miss_stop_is_released(oai):
    """'answer was' shares 'answer ' with the text: held back, then sent."""
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO,
                                              stop="answer was", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY


def test_stop_token_ids_and_ignore_eos(oai, stack, tokenizer):
    eos = stack.engine.eos
    r = oai.completions.create(model=MODEL, prompt="x", max_tokens=40,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert r.choices[0].text.startswith(REPLY + REPLY[:5])
    world = tokenizer.encode(" world")[0]
    r = oai.completions.create(model=MODEL, prompt="x", extra_body={"stop_token_ids": [world]})
    assert r.choices[0].text == "Hello world" and r.choices[0].finish_reason == "stop"
    assert eos not in [world]


def test_logit_bias_reaches_the_engine(oai, stack):
    r = oai.completions.create(model=MODEL, prompt="x", max_tokens=2,
                               logit_bias={"15": 5, "7": -100})
    add = next(a for a in stack.engine.adds() if a.rid.startswith(r.id))
    assert sorted(add.params.logit_bias) == [(7, -100.0), (15, 5.0)]


def test_sessions_and_cached_tokens(oai, stack):
    long = [{"role": "user", "content": "tell me a long story about " + "cats " * 40}]
    r1 = oai.chat.completions.create(model=MODEL, messages=long, max_tokens=2,
                                     extra_headers={"x-session-id": "s1"}, user="u1")
    r2 = oai.chat.completions.create(model=MODEL, messages=long, max_tokens=2,
                                     extra_headers={"x-session-id": "s1"})
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % PAGE == 0 and cached <= r2.usage.prompt_tokens
    sessions = {a.rid.rsplit("-", 1)[0]: a.session_id for a in stack.engine.adds()}
    assert sessions[r1.id] == "s1" and sessions[r2.id] == "s1"     # header beats user
    r3 = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, user="u9")
    assert {a.session_id for a in stack.engine.adds() if a.rid.startswith(r3.id)} == {"u9"}


def test_models_health_metrics(oai, stack):
    [m] = oai.models.list().data
    assert m.id == MODEL
    assert httpx.get(stack.url + "/health").status_code == 200
    oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    text = httpx.get(stack.url + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        count = next(line for line in text.splitlines()
                     if line.startswith(f"tsrun_{name}_count"))
        assert float(count.split()[-1]) > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"\ntsrun_{name} " in text, name
    totals = stack.engine.totals
    for name, key in (("prompt_tokens_total", "prompt"), ("generation_tokens_total",
                                                          "generation")):
        value = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith(f"tsrun_{name} "))
        assert 0 < value <= totals[key], name
    assert "tsrun_prefix_cache_hit_tokens_total " in text
    assert 'tsrun_request_success_total{finish_reason="length"}' in text
    for op, backend in KERNELS:
        assert f'tsrun_kernel_info{{backend="{backend}",op="{op}"}} 1.0' in text


def test_stream_disconnect_aborts(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "[slow] go"}],
            "stream": True, "max_tokens": 200}
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]       # role chunk + a couple of tokens
    rid = [a.rid for a in stack.engine.adds()][-1]
    assert any("content" in g for g in got)
    assert stack.engine.wait_for(lambda m: m == Abort(rid, "abort"))
    assert stack.client.num_pending == 0


def test_whole_request_disconnect_aborts(stack):
    body = {"model": MODEL, "prompt": "[slow] go", "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.url + "/v1/completions", json=body, timeout=0.3)
    rid = [a.rid for a in stack.engine.adds()][-1]
    assert stack.engine.wait_for(lambda m: m == Abort(rid, "abort"))


def test_engine_error(oai, stack):
    bad = [{"role": "user", "content": "[error]"}]
    with pytest.raises(openai.InternalServerError, match="fake engine failure"):
        oai.chat.completions.create(model=MODEL, messages=bad)
    with pytest.raises(openai.APIError, match="fake engine failure"):
        list(oai.chat.completions.create(model=MODEL, messages=bad, stream=True))
    assert oai.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content \
        == REPLY
    t0 = time.monotonic()
    assert httpx.get(stack.url + "/health").status_code == 200
    assert time.monotonic() - t0 < 1


def test_raw_sse_framing(stack):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}
    r = httpx.post(stack.url + "/v1/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert r.text.endswith("\n\n")


def test_decode_floor_header(tokenizer):
    """`x-decode-floor` reaches the engine as the request's floor on every route when the
    engine keeps floors; malformed values, and any value when it keeps none, are a 400
    naming the header (and the server keeps serving)."""
    import anthropic

    from .conftest import serve
    with serve(tokenizer, decode_floor=True) as s:
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                            timeout=10)
        hdr = {"x-decode-floor": "70"}
        r1 = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                         extra_headers=hdr)
        r2 = oai.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                    extra_headers={"x-decode-floor": "212.5"})
        r3 = oai.responses.create(model=MODEL, input="hi", max_output_tokens=2,
                                  extra_headers=hdr)
        ant = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
        r4 = ant.messages.create(model=MODEL, max_tokens=2, extra_headers=hdr,
                                 messages=[{"role": "user", "content": "hi"}])
        r5 = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        floors = {a.rid.rsplit("-", 1)[0]: a.decode_floor_tps for a in s.engine.adds()}
        assert floors[r1.id] == 70.0 and floors[r2.id] == 212.5 and floors[r5.id] == 0.0
        assert floors[r3.id] == 70.0 and floors[r4.id] == 70.0
        for bad in ("fast", "0", "-5", "nan", "1e9"):
            with pytest.raises(openai.BadRequestError, match="x-decode-floor header"):
                oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                            extra_headers={"x-decode-floor": bad})
    with serve(tokenizer) as s:                 # no step-time model: no floors
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                            timeout=10)
        with pytest.raises(openai.BadRequestError, match="keeps no decode floors"):
            oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                        extra_headers={"x-decode-floor": "70"})
        assert oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).id
