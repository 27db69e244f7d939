"""Messages between the API process and the engine process (pickled over multiprocessing
queues), and the per-request sampling parameters the engine enforces.

What it is: plain frozen values, validated at construction so a bad request fails in the
API process with a message naming the field, before it reaches the engine. What it is not:
the OpenAI wire format (runtime/server/ maps it onto these) or the scheduler's state.

Division of labour: the engine decides `length` (max_tokens), stop token ids and EOS; the
API process detokenizes incrementally and matches stop *strings* (they can span tokens),
then sends `Abort(rid, reason="stop")`. A `GrammarSpec` says what the output must match
(structured outputs, forced tool calls); the API process checks that it compiles
(`runtime/grammar.GrammarCompiler.check`), the engine masks the logits with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024               # OpenAI: at most 1024 entries, each in [-100, 100]
GRAMMAR_KINDS = ("json_object", "json_schema", "structural_tag", "ebnf", "regex")


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request's output must match; the engine masks every token outside it.

    `kind`: "json_object" (any JSON object; `value` is ""), "json_schema" (`value`: the
    schema's JSON text), "structural_tag" (`value`: an xgrammar structural tag's JSON text,
    e.g. from `grammar.tool_call_spec`), "ebnf" (`value`: an xgrammar EBNF grammar, root rule
    `root`) or "regex" (`value`: the pattern). Only the shape is checked here; whether the
    value compiles is `GrammarCompiler.check`'s question."""
    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar: kind must be one of {', '.join(GRAMMAR_KINDS)}, "
                             f"got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError(f"grammar: value must be a string, got {type(self.value).__name__}")
        if self.kind == "json_object" and self.value:
            raise ValueError("grammar: json_object takes no value")
        if self.kind != "json_object" and not self.value.strip():
            raise ValueError(f"grammar: {self.kind} needs a non-empty value")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0: off
    min_p: float = 0.0
    seed: int | None = None          # None: a fresh seed per request
    presence_penalty: float = 0.0    # OpenAI: on generated tokens, -2..2
    frequency_penalty: float = 0.0   # OpenAI: on generated tokens, -2..2
    repetition_penalty: float = 1.0  # HF/vLLM: on prompt and generated tokens, > 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit)
    grammar: GrammarSpec | None = None   # the output must match it (EOS ends a match)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 disables it)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs=true")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, "
                             f"got {len(self.logit_bias)}")
        seen = set()
        for tok, bias in self.logit_bias:
            if not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias: token ids must be non-negative ints, got {tok!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {bias!r} "
                                 f"for token {tok}")
            if tok in seen:
                raise ValueError(f"logit_bias: token {tok} is given twice")
            seen.add(tok)
        if self.grammar is not None:
            if not isinstance(self.grammar, GrammarSpec):
                raise bad("grammar", "must be a GrammarSpec or None")
            # A finished match allows only EOS: without EOS ending the request it could not
            # go on (every token masked), so the two cannot be combined.
            if self.ignore_eos:
                raise ValueError("ignore_eos: cannot be combined with grammar (a completed "
                                 "grammar allows only EOS)")


# ------------------------------------------------------------------ API -> engine

@dataclass(frozen=True, slots=True)
class AddRequest:
    rid: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    session_id: str | None = None    # keeps the prefix cached between an agent's turns
    arrival: float = 0.0             # time.monotonic() in the API process
    decode_floor_tps: float = 0.0    # tokens/s this request keeps while decoding (0: the
                                     # engine's --decode-floor-tps)


@dataclass(frozen=True, slots=True)
class Abort:
    rid: str
    reason: str = "abort"            # "abort" (client gone) or "stop" (stop string matched)


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# ------------------------------------------------------------------ engine -> API

@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob), best first


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens of one request from one engine step. `finish_reason` is set on the last
    message of a request: "stop" (EOS / stop token), "length", "abort" or "error" (then
    `error` says why)."""
    rid: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens served from the prefix cache
    error: str | None = None
    # Speculative decoding, on the last message of a request that speculated: its verify
    # steps, the draft tokens they carried and the drafts accepted (acceptance rate =
    # accepted / draft; mean accepted length per verify step = accepted / verify steps).
    spec_verify_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_hit_tokens: int           # cumulative
    prompt_tokens: int               # cumulative
    generation_tokens: int           # cumulative
    preemptions: int                 # cumulative
    steps: int = 0                   # cumulative forward steps
    eager_steps: int = 0             # cumulative: steps no CUDA graph replayed
    spec_verify_steps: int = 0       # cumulative: speculative verify rows
    spec_draft_tokens: int = 0       # cumulative: draft tokens those rows carried
    spec_accepted_tokens: int = 0    # cumulative: drafts accepted (and kept)


@dataclass(frozen=True, slots=True)
class StepOutputs:
    outputs: tuple[RequestOutput, ...] = ()
    stats: EngineStats | None = None


@dataclass(frozen=True, slots=True)
class EngineReady:
    """First message from the engine: what the API needs to validate requests."""
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = field(default=())
    # ("op@device/dtype", backend) for every kernel the warm-up selected (/metrics shows it)
    kernels: tuple[tuple[str, str], ...] = field(default=())
    decode_floor: bool = False       # a step-time model: requests may set decode floors
