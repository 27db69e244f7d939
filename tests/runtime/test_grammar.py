"""Grammar-constrained decoding (runtime/grammar.py, the sampler's mask, the engine's
matchers): specs and compile errors, every tool-call family's structural tag against a
sample of that family's own syntax, the mask on CPU (constrained rows only ever pick
allowed tokens, never a padded id; free rows of the same step bit-for-bit as without the
constrained one; raw logprobs; no grammar work in steps without a constrained row), and
SmolLM2-135M-Instruct's real weights end to end: JSON schema, JSON object and forced tool
calls (greedy and seeded) that parse and validate, under preemption, next to a free request
whose tokens are its tokens alone; error outputs, never a crash, for an engine without a
grammar backend, a schema that does not compile and a token the grammar refuses."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime.engine import Engine, EngineConfig
from tscompile.runtime.grammar import (
    TOOL_CALL_FAMILIES, GrammarCompiler, GrammarMatcher, allocate_bitmask, tool_call_spec,
)
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import AddRequest, GrammarSpec, SamplingParams
from tscompile.runtime.sampler import BatchSampler
from tscompile.tokenizer import Tokenizer

PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather for a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED_ADD = {"type": "function", "function": {"name": "add"}}

# One call of get_weather(city="Paris") in each family's own syntax.
FAMILY_SAMPLES = {
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                   "</function>\n</tool_call>",
    "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
               "<|tool_calls_section_end|>",
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                   '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "deepseek_v31": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                    '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
}


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:
    return GrammarCompiler(tok, vocab_size=tok.vocab_size, stop_token_ids=tok.eos_token_ids)


def allowed(matcher, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the tokens `matcher` allows next, decoded from its bitmask."""
    bm = allocate_bitmask(1, vocab_size)
    matcher.fill(bm, 0)
    bits = (bm[0].long()[:, None] >> torch.arange(32)) & 1
    return bits.flatten()[:vocab_size].bool()


# ------------------------------------------------------------------ specs and compiling

def test_spec_validation():
    assert GrammarSpec("json_object") == GrammarSpec("json_object", "")
    for bad, match in ((("yaml", "x"), "grammar: kind must be one of"),
                       (("json_object", "{}"), "json_object takes no value"),
                       (("json_schema", " "), "json_schema needs a non-empty value"),
                       (("regex", 3), "value must be a string")):
        with pytest.raises(ValueError, match=match):
            GrammarSpec(*bad)
    with pytest.raises(ValueError, match="ignore_eos: cannot be combined with grammar"):
        SamplingParams(ignore_eos=True, grammar=GrammarSpec("json_object"))
    with pytest.raises(ValueError, match="grammar: must be a GrammarSpec"):
        SamplingParams(grammar={"kind": "json_object"})


def test_spec_crosses_processes_and_offline_refuses_it():
    import pickle

    from tscompile.runtime.offline import _check_offline

    p = SamplingParams(grammar=GrammarSpec("regex", "a+"))
    assert pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(ValueError, match="does not apply grammar"):
        _check_offline(p)


def test_serve_builds_the_engine_grammar_backend_from_the_tokenizer_folder(smollm2_dir,
                                                                            tmp_path):
    from tscompile.runtime.serve import ServeConfig, _grammar_compiler

    c = _grammar_compiler(ServeConfig("m.tsprog", weights=str(smollm2_dir)), 49152, (2,))
    assert isinstance(c, GrammarCompiler) and c.vocab_size == 49152 and c.stop_token_ids == (2,)
    assert _grammar_compiler(ServeConfig("m.tsprog", dummy_weights=True), 49152, (2,)) is None
    (tmp_path / "tokenizer.json").write_text("not a tokenizer")
    broken = ServeConfig("m.tsprog", dummy_weights=True, tokenizer=str(tmp_path))
    assert _grammar_compiler(broken, 49152, (2,)) is None        # logged, not raised


def test_check_accepts_valid_and_explains_invalid(compiler):
    for spec in (GrammarSpec("json_schema", json.dumps(PERSON)), GrammarSpec("json_object"),
                 GrammarSpec("regex", r"[a-z]+ \d{2}"),
                 GrammarSpec("ebnf", 'root ::= "yes" | "no"')):
        compiler.check(spec)
    for spec, why in ((GrammarSpec("json_schema", '{"type": "nonsense"}'),
                       'json_schema does not compile: Unsupported type "nonsense"'),
                      (GrammarSpec("json_schema", "not json"), "the schema is not JSON"),
                      (GrammarSpec("json_schema", '{"properties": {"a": {"type": "strin"}}}'),
                       'Unsupported type "strin"'),
                      (GrammarSpec("regex", "([a-z"), "regex does not compile"),
                      (GrammarSpec("ebnf", "root ::= undefined_rule"), "ebnf does not compile"),
                      (GrammarSpec("structural_tag", '{"type": "structural_tag"}'),
                       "structural_tag does not compile")):
        with pytest.raises(ValueError, match="grammar: ") as e:
            compiler.check(spec)
        assert why in str(e.value) and "\n" not in str(e.value) and ".cc:" not in str(e.value)


def test_compiled_grammars_are_cached_in_a_bounded_lru(tok):
    c = GrammarCompiler(tok, vocab_size=tok.vocab_size, stop_token_ids=(2,), cache_size=2)
    specs = [GrammarSpec("regex", f"a{{{n}}}") for n in (1, 2, 3)]
    c.check(specs[0])
    first = c._compile(specs[0])
    assert c._compile(specs[0]) is first and c.cached == 1
    c.check(specs[1])
    c.check(specs[0])                       # most recent: specs[1] is evicted next
    c.check(specs[2])
    assert c.cached == 2 and set(c._cache) == {specs[0], specs[2]}


@pytest.mark.parametrize("family", sorted(TOOL_CALL_FAMILIES))
def test_tool_call_spec_compiles_and_matches_the_family_syntax(compiler, family):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        spec = tool_call_spec(family, TOOLS, choice, parallel=False)
        assert spec.kind == "structural_tag"
        m = compiler.matcher(spec)
        assert m._m.accept_string(FAMILY_SAMPLES[family]), (family, choice)
        assert allowed(m, compiler.vocab_size)[2]          # the call is complete: EOS
        # The wrong tool's arguments (or free text first) are outside the grammar.
        wrong = compiler.matcher(spec)
        assert not wrong._m.accept_string(FAMILY_SAMPLES[family].replace("city", "town"))
    named_add = compiler.matcher(tool_call_spec(family, TOOLS, NAMED_ADD))
    assert not named_add._m.accept_string(FAMILY_SAMPLES[family])
    thinking = compiler.matcher(tool_call_spec(family, TOOLS, "required", reasoning=True))
    # Llama 3 has no reasoning block (xgrammar's llama format ignores `reasoning`).
    assert thinking._m.accept_string("Let me see.</think>") == (family != "llama3_json")


def test_tool_call_spec_errors():
    with pytest.raises(ValueError, match="no tool-call grammar for parser family 'mistral'"):
        tool_call_spec("mistral", TOOLS, "required")
    for choice in ("auto", "none", {"type": "allowed_tools"}):
        with pytest.raises(ValueError, match="tool_choice: a grammar forces"):
            tool_call_spec("qwen3", TOOLS, choice)
    with pytest.raises(ValueError, match="needs tools"):
        tool_call_spec("qwen3", [], "required")
    with pytest.raises(ValueError, match="'nope' is not found"):
        tool_call_spec("qwen3", TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="grammar: no tool-call grammar for these tools"):
        tool_call_spec("qwen3", [{"type": "function", "function": {"description": "x"}}],
                       "required")


# ------------------------------------------------------------------ the mask, on CPU

@pytest.mark.parametrize("greedy", [True, False])
def test_constrained_row_next_to_free_rows(tok, greedy):
    """A model vocab 40 ids beyond the tokenizer's, those ids favoured by +50: the free rows
    pick them, the constrained row never does, and picks only what its grammar allows;
    free rows are bit-for-bit a step without the constrained row; logits stay raw."""
    n_tok = tok.vocab_size
    vocab = n_tok + 40
    compiler = GrammarCompiler(tok, vocab_size=vocab, stop_token_ids=tok.eos_token_ids)
    temp = 0.0 if greedy else 1.0
    free_a = SamplingParams(temperature=temp, seed=1, logprobs=True, top_logprobs=2)
    free_b = SamplingParams(temperature=temp, top_k=50, seed=3)
    con = SamplingParams(temperature=temp, seed=9, logprobs=True,
                         grammar=GrammarSpec("json_schema", json.dumps(PERSON)))
    matcher = compiler.matcher(con.grammar)
    mixed, plain = BatchSampler(4, vocab), BatchSampler(4, vocab)
    for s in (mixed, plain):
        s.admit(0, free_a, [1])
        s.admit(3, free_b, [1])
    mixed.admit(2, con, [1], grammar=matcher)
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(40):
        logits = torch.randn(3, vocab, generator=gen) * 4
        logits[:, n_tok:] += 50
        raw = logits.clone()
        ok = allowed(matcher, vocab)
        assert not ok[n_tok:].any()
        # The constrained row moves between steps (0, 1, 2, 0, ...): a stale mask row
        # must never reach a free row.
        c = step % 3
        free_rows = [i for i in range(3) if i != c]
        order = [0, 3]
        order.insert(c, 2)
        r = mixed.sample(logits, torch.tensor(order), torch.full((3,), step))
        p = plain.sample(logits[free_rows], torch.tensor([0, 3]), torch.full((2,), step))
        assert torch.equal(logits, raw)
        assert torch.equal(r.token_ids[free_rows], p.token_ids)
        assert (r.token_ids[free_rows] >= n_tok).all()         # the padding was likely...
        assert torch.equal(r.logprobs[free_rows], p.logprobs)
        assert torch.equal(r.top_ids[free_rows], p.top_ids)
        tok_id = int(r.token_ids[c])
        assert tok_id < n_tok and ok[tok_id], step              # ...but masked for this row
        assert r.logprobs[c] == torch.log_softmax(raw, -1)[c, tok_id]       # raw logprob
        assert matcher.accept(tok_id)
        out.append(tok_id)
        if matcher.terminated:
            break
    assert mixed._bitmask is not None and plain._bitmask is None


def test_steps_without_a_constrained_row_do_no_grammar_work(tok, compiler, monkeypatch):
    import tscompile.runtime.grammar as grammar_mod

    calls = []

    class Spy:
        def fill(self, bitmask, row):
            calls.append(row)
            bitmask[row] = 0
            bitmask[row, 0] = 1 << 5                           # only token 5

    vocab = tok.vocab_size
    s = BatchSampler(4, vocab)
    s.admit(0, SamplingParams(temperature=0.0), [1])
    logits = torch.randn(2, vocab)
    s.sample(logits[:1], torch.tensor([0]), torch.tensor([0]))
    assert s._bitmask is None                                  # nothing allocated
    s.admit(1, SamplingParams(temperature=0.0, grammar=GrammarSpec("json_object")), [1],
            grammar=Spy())
    real_apply = grammar_mod.apply_bitmask
    monkeypatch.setattr(grammar_mod, "apply_bitmask",
                        lambda *a: pytest.fail("masked a step without a constrained row"))
    out = s.sample(logits[:1], torch.tensor([0]), torch.tensor([1]))
    assert out.token_ids.tolist() == [int(logits[0].argmax())] and not calls
    monkeypatch.setattr(grammar_mod, "apply_bitmask", real_apply)
    out = s.sample(logits, torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert calls == [1] and out.token_ids.tolist() == [int(logits[0].argmax()), 5]
    s.release(1)
    s.sample(logits[:1], torch.tensor([0]), torch.tensor([3]))
    assert calls == [1]
    with pytest.raises(ValueError, match="needs a matcher"):
        s.admit(1, SamplingParams(grammar=GrammarSpec("json_object")), [1])
    with pytest.raises(ValueError, match="needs a matcher"):
        s.admit(1, SamplingParams(), [1], grammar=Spy())


# ------------------------------------------------------------------ SmolLM2, end to end

@pytest.fixture(scope="module")
def smol(smollm2_dir, tok, compiler, tmp_path_factory):
    prog = build("llama", preset="smollm2-135m", mesh=Mesh.build(1)).save(
        tmp_path_factory.mktemp("grammar") / "smol.tsprog")
    program = RankProgram(prog, 0, weights=smollm2_dir)
    return program, program.config


def smol_engine(smol, compiler, **kw) -> Engine:
    program, c = smol
    cfg = EngineConfig(**{"page_size": 16, "max_num_seqs": 8, "max_num_batched_tokens": 512,
                          "kv_cache_tokens": 4096, **kw})
    return Engine(program, cfg, vocab_size=c.vocab_size, eos_token_ids=compiler.stop_token_ids,
                  max_position_embeddings=2048, grammar=compiler)


def chat(tok, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}])))


def run(eng: Engine, reqs: list[AddRequest]) -> dict[str, tuple[list[int], object]]:
    """rid -> (tokens, last output)."""
    for r in reqs:
        assert eng.add(r) is None
    toks: dict[str, list[int]] = {r.rid: [] for r in reqs}
    last = {}
    for _ in range(2000):
        if not eng.has_work:
            break
        for o in eng.step():
            toks[o.rid] += o.token_ids
            last[o.rid] = o
    assert not eng.has_work
    return {rid: (toks[rid], last[rid]) for rid in toks}


PERSON_Q = "Give me a person as JSON."
OBJECT_Q = 'Reply with a JSON object with a key "color" and a color as its value.'
WEATHER_Q = "What's the weather in Paris?"
FREE_Q = "Hi"


@pytest.fixture(scope="module")
def batch(smol, compiler, tok):
    """Every end-to-end case in one batch, under a KV pool small enough to preempt."""
    def p(temp, grammar, n=56, seed=5):
        return SamplingParams(max_tokens=n, temperature=temp, seed=seed, grammar=grammar)
    person = GrammarSpec("json_schema", json.dumps(PERSON))
    reqs = [
        AddRequest("schema_greedy", chat(tok, PERSON_Q), p(0.0, person)),
        AddRequest("schema_seeded", chat(tok, PERSON_Q), p(1.0, person)),
        AddRequest("object_greedy", chat(tok, OBJECT_Q), p(0.0, GrammarSpec("json_object"))),
        AddRequest("object_seeded", chat(tok, OBJECT_Q),
                   p(0.8, GrammarSpec("json_object"), seed=7)),
        AddRequest("tool_required", chat(tok, WEATHER_Q),
                   p(0.0, tool_call_spec("llama3_json", TOOLS, "required", parallel=False))),
        AddRequest("tool_parallel", chat(tok, WEATHER_Q),
                   p(0.7, tool_call_spec("llama3_json", TOOLS, "required"))),
        AddRequest("tool_named", chat(tok, WEATHER_Q),
                   p(0.7, tool_call_spec("llama3_json", TOOLS, NAMED_ADD), seed=3)),
        AddRequest("free", chat(tok, FREE_Q), p(0.0, None, n=24)),
    ]
    eng = smol_engine(smol, compiler, kv_cache_tokens=160)      # 10 pages: preemptions
    admitted = []
    admit = eng.sampler.admit

    def spy(slot, params, prompt, outputs=(), **kw):
        if kw.get("grammar") is not None:
            admitted.append((id(kw["grammar"]), len(outputs)))
        return admit(slot, params, prompt, outputs, **kw)
    eng.sampler.admit = spy
    out = run(eng, reqs)
    assert eng.stats().kv_blocks_used == 0
    # Some constrained request was preempted mid-output and re-admitted with its matcher.
    assert any(n > 0 for _, n in admitted) and len({g for g, _ in admitted}) < len(admitted)
    return out


def text(tok, tokens):
    return tok.decode(tokens)


@pytest.mark.parametrize("rid", ["schema_greedy", "schema_seeded"])
def test_json_schema_output_validates(batch, tok, rid):
    tokens, last = batch[rid]
    assert last.finish_reason == "stop" and tokens[-1] == 2, text(tok, tokens)
    jsonschema.validate(json.loads(text(tok, tokens)), PERSON)


@pytest.mark.parametrize("rid", ["object_greedy", "object_seeded"])
def test_json_object_output_is_an_object(batch, tok, rid):
    tokens, last = batch[rid]
    assert last.finish_reason == "stop", text(tok, tokens)
    assert isinstance(json.loads(text(tok, tokens)), dict)


def test_required_tool_call_parses_and_validates(batch, tok):
    tokens, last = batch["tool_required"]
    assert last.finish_reason == "stop", text(tok, tokens)
    call = json.loads(text(tok, tokens))
    assert set(call) == {"name", "parameters"} and call["name"] in SCHEMAS
    jsonschema.validate(call["parameters"], SCHEMAS[call["name"]])
    # parallel calls allowed: the output still starts with a valid call
    tokens, _ = batch["tool_parallel"]
    call, _ = json.JSONDecoder().raw_decode(text(tok, tokens))
    assert call["name"] in SCHEMAS
    jsonschema.validate(call["parameters"], SCHEMAS[call["name"]])


def test_named_tool_choice_forces_that_tool(batch, tok):
    tokens, last = batch["tool_named"]
    assert last.finish_reason == "stop", text(tok, tokens)
    call = json.loads(text(tok, tokens))
    assert call["name"] == "add"                # the weather question, the add tool
    jsonschema.validate(call["parameters"], SCHEMAS["add"])


def test_free_request_next_to_grammars_is_its_tokens_alone(batch, smol, compiler, tok):
    alone = run(smol_engine(smol, compiler),
                [AddRequest("free", chat(tok, FREE_Q),
                            SamplingParams(max_tokens=24, temperature=0.0))])
    assert batch["free"][0] == alone["free"][0]


def test_grammar_errors_are_outputs_not_crashes(smol, compiler, tok):
    q = chat(tok, PERSON_Q)
    person = GrammarSpec("json_schema", json.dumps(PERSON))
    # No grammar backend.
    program, c = smol
    bare = Engine(program, EngineConfig(page_size=16, kv_cache_tokens=1024),
                  vocab_size=c.vocab_size, eos_token_ids=(2,), max_position_embeddings=2048)
    out = bare.add(AddRequest("g", q, SamplingParams(grammar=person)))
    assert out.finish_reason == "error" and "no grammar backend" in out.error
    with pytest.raises(ValueError, match="built for a vocab of 49192"):
        Engine(program, EngineConfig(page_size=16, kv_cache_tokens=1024),
               vocab_size=c.vocab_size, max_position_embeddings=2048,
               grammar=GrammarCompiler(tok, vocab_size=c.vocab_size + 40, stop_token_ids=(2,)))

    eng = smol_engine(smol, compiler, kv_cache_tokens=1024)
    out = eng.add(AddRequest("bad", q, SamplingParams(
        grammar=GrammarSpec("json_schema", '{"type": "nonsense"}'))))
    assert out.finish_reason == "error" and 'Unsupported type "nonsense"' in out.error
    res = run(eng, [AddRequest("ok", q, SamplingParams(max_tokens=4, temperature=0.0))])
    assert res["ok"][1].finish_reason == "length"


def test_refused_token_ends_that_request_with_an_error_naming_the_grammar(
        smol, compiler, tok, monkeypatch):
    eng = smol_engine(smol, compiler, kv_cache_tokens=1024)
    real = compiler.matcher

    class Refusing(GrammarMatcher):
        __slots__ = ()

        def accept(self, token_id):
            return False

    def refusing(spec):
        m = real(spec)
        return Refusing(m.spec, m._m)
    monkeypatch.setattr(eng.grammar, "matcher", refusing)
    spec = GrammarSpec("regex", "[a-z]+")
    free = SamplingParams(max_tokens=24, temperature=0.0)
    res = run(eng, [AddRequest("r", chat(tok, FREE_Q), SamplingParams(max_tokens=8, grammar=spec)),
                    AddRequest("free", chat(tok, FREE_Q), free)])
    tokens, last = res["r"]
    assert tokens == [] and last.finish_reason == "error"
    assert last.error.startswith("grammar: sampled token") and "regex '[a-z]+'" in last.error
    # ...and that request only: the free one next to it runs to its end.
    assert res["free"][1].finish_reason in ("stop", "length") and res["free"][0]
    assert eng.stats().kv_blocks_used == 0


def test_finished_grammar_ends_the_request_without_eos_in_the_stop_ids(smol, compiler, tok):
    """xgrammar's stop tokens are the engine's EOS ids; should the scheduler not stop on the
    token that completed the grammar (here: an engine given no EOS ids), the engine ends
    the request itself, as "stop"."""
    program, c = smol
    eng = Engine(program, EngineConfig(page_size=16, kv_cache_tokens=1024),
                 vocab_size=c.vocab_size, eos_token_ids=(), max_position_embeddings=2048,
                 grammar=compiler)
    spec = GrammarSpec("regex", "(yes|no)")
    res = run(eng, [AddRequest("y", chat(tok, "Is Paris in France? Answer yes or no."),
                               SamplingParams(max_tokens=16, temperature=0.0, grammar=spec))])
    tokens, last = res["y"]
    assert last.finish_reason == "stop" and tokens[-1] == 2 and len(tokens) < 16
    assert text(tok, tokens) in ("yes", "no")
