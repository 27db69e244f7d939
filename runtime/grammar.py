"""Grammar-constrained decoding with xgrammar: structured outputs and forced tool calls.

What it is: `GrammarCompiler`, which turns a `protocol.GrammarSpec` into a compiled xgrammar
grammar for one tokenizer and model vocabulary (cached, bounded LRU), answers "does this
compile?" (`check`, the API process turns a ValueError into a 400) and hands the engine one
`GrammarMatcher` per request (`matcher`); and `tool_call_spec`, the structural tag that
forces a tool call in a model family's own syntax (OpenAI `tool_choice` "required" or a
named function).
What it is not: the mask application (runtime/sampler.py fills and applies the bitmask,
runtime/engine.py advances the matchers with the sampled tokens) or tool-call parsing
(runtime/server/parsers/).

Vocabulary: the compiler is built for the MODEL's vocab (the logits' width). Ids beyond the
tokenizer's vocabulary (padding of the embedding) have no text, so xgrammar never allows
them; a tokenizer larger than the model is cut to the model's vocab.

JSON: `json_schema` compiles in xgrammar's strict mode (properties and items the schema
does not declare are not generated, as OpenAI's strict structured outputs require),
`json_object` is any JSON object (a schema `{"type": "object"}` without strict mode). Both
allow any whitespace between tokens, capped at `MAX_WHITESPACE` characters in a row so a
small model cannot spin on newlines until max_tokens; tool-call arguments likewise.

xgrammar (and transformers, which it imports) load on first use, not when this module is
imported.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from tscompile.runtime.protocol import GrammarSpec

MAX_WHITESPACE = 24          # longest whitespace run a JSON grammar allows between tokens
CACHE_SIZE = 256             # compiled grammars kept per GrammarCompiler

# Our tool-call parser families -> xgrammar's builtin structural-tag model keys. DeepSeek V3
# is xgrammar's "deepseek_r1": <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>
# NAME\n```json\n{...}\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>, V3's own format.
TOOL_CALL_FAMILIES = {
    "kimi_k2": "kimi",
    "deepseek_v3": "deepseek_r1",
    "deepseek_v31": "deepseek_v3_1",
    "qwen3": "qwen_3",
    "qwen3_coder": "qwen_3_coder",
    "llama3_json": "llama",
}

_LOG_PREFIX = re.compile(r"\[[\d:]+\] \S+:\d+: ")          # "[13:50:59] /project/cpp/x.cc:12: "


def _reason(e: BaseException) -> str:
    """xgrammar's message without its C++ log prefix, on one line."""
    text = _LOG_PREFIX.sub("", str(e)).replace("Check failed: (error.empty()) is false: ", "")
    return " ".join(text.split()) or type(e).__name__


def tool_call_spec(family: str, tools: list[dict], tool_choice: str | dict, *,
                   parallel: bool = True, reasoning: bool = False) -> GrammarSpec:
    """The structural tag that makes the model call a tool in `family`'s syntax.

    `tools`: OpenAI chat shape, `[{"type": "function", "function": {"name", "description",
    "parameters"}}]`; `tool_choice`: "required" (at least one of the tools) or
    `{"type": "function", "function": {"name": N}}` (exactly that one). The output starts
    with a call (after the reasoning block, with `reasoning`). `parallel`: more than one call
    may follow (OpenAI's parallel_tool_calls; in llama3_json, qwen3 and qwen3_coder, whose
    calls are triggered tags, text may then also follow a call); without it the output ends
    after the first call. `reasoning`: the output starts inside a reasoning block that the
    model closes before the calls (the prompt opened it); otherwise no reasoning block
    (llama3_json has none either way: xgrammar's llama format ignores `reasoning`).
    Raises ValueError for an unknown family, a tool_choice other than these two, or tools
    that do not fit it (e.g. a named tool that is not among `tools`)."""
    model = TOOL_CALL_FAMILIES.get(family)
    if model is None:
        raise ValueError(f"grammar: no tool-call grammar for parser family {family!r} "
                         f"(known: {', '.join(TOOL_CALL_FAMILIES)})")
    if not (tool_choice == "required" or (isinstance(tool_choice, dict)
                                          and tool_choice.get("type") == "function")):
        raise ValueError(f"tool_choice: a grammar forces 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, "
                         f"got {tool_choice!r}")
    if not tools:
        raise ValueError("tools: tool_choice 'required' or a named tool needs tools")
    import xgrammar as xgr

    try:
        tag = xgr.get_model_structural_tag(
            model, tools=tools, tool_choice=tool_choice,
            reasoning="enabled" if reasoning else "disabled",
            parallel_tool_calls=parallel, max_whitespace_cnt=MAX_WHITESPACE)
    except Exception as e:       # pydantic's ValidationError (a ValueError), xgrammar's own
        raise ValueError(f"grammar: no tool-call grammar for these tools: {_reason(e)}") from e
    return GrammarSpec("structural_tag", json.dumps(_calls_only(json.loads(
        tag.model_dump_json()), CALL_SEPARATORS.get(family, ""))))


# Between two calls of a forced turn, in the families whose calls xgrammar triggers from
# free text (what their parsers accept between calls).
CALL_SEPARATORS = {"llama3_json": ";", "qwen3": "\n", "qwen3_coder": "\n"}


def _calls_only(fmt: Any, separator: str) -> Any:
    """xgrammar's "required" format for the triggered families lets free text run before,
    between and after the calls, and a small model then talks on until max_tokens; a
    forced turn is calls only: the triggered tags become tags with a separator."""
    if isinstance(fmt, list):
        return [_calls_only(f, separator) for f in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if fmt.get("type") == "triggered_tags" and fmt.get("at_least_one"):
        return {"type": "tags_with_separator", "tags": fmt["tags"], "separator": separator,
                "at_least_one": True, "stop_after_first": fmt.get("stop_after_first", False)}
    return {k: _calls_only(v, separator) for k, v in fmt.items()}


class GrammarMatcher:
    """One request's position in its grammar (engine side). `fill(bitmask, row)` writes the
    allowed next tokens into `bitmask[row]` (a CPU int32 tensor from `allocate_bitmask`),
    `accept(token)` advances (False: the grammar refuses the token, the state is unchanged),
    `terminated`: the grammar accepted a stop token, nothing may follow."""

    __slots__ = ("spec", "_m")

    def __init__(self, spec: GrammarSpec, matcher: Any):
        self.spec = spec
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def describe(self) -> str:
        """For error messages: the grammar's kind and the start of its value."""
        v = self.spec.value
        return self.spec.kind + (f" {v[:80]!r}{'...' if len(v) > 80 else ''}" if v else "")


def allocate_bitmask(rows: int, vocab_size: int, *, pin: bool = False) -> torch.Tensor:
    """A host bitmask [rows, ceil(vocab_size / 32)] int32 (all allowed), pinned if asked."""
    t = torch.full((rows, -(-vocab_size // 32)), -1, dtype=torch.int32)
    return t.pin_memory() if pin else t


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits[r, token] = -inf for each of `rows` and each token `bitmask[r]` disallows
    (in place; `bitmask` on the logits' device, rows of other requests untouched)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                    indices=rows)


def _tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    import xgrammar as xgr
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer
    if hasattr(tok, "_tok"):                       # tscompile.tokenizer.Tokenizer
        tok = tok._tok
    if isinstance(tok, HFTokenizer):               # a `tokenizers.Tokenizer`: wrap, offline
        tok = PreTrainedTokenizerFast(tokenizer_object=tok)
    stop = [int(t) for t in stop_token_ids]
    bad = [t for t in stop if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids: {bad[0]} outside the vocabulary [0, {vocab_size})")
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size,
                                              stop_token_ids=stop or None)


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and model vocabulary; see the module
    docstring. `tokenizer`: a tscompile `Tokenizer`, a `tokenizers.Tokenizer` or a
    transformers fast tokenizer. `vocab_size`: the model's (logits width). `stop_token_ids`:
    the engine's EOS ids, the tokens a completed grammar allows (so a finished match ends
    the request as "stop"; none given: xgrammar guesses them, and the engine ends a request
    whose grammar has finished itself). Thread-safe (the API process may check from worker threads)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE, max_threads: int = 4):
        import xgrammar as xgr

        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.info = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.stop_token_ids = tuple(self.info.stop_token_ids)
        # Our LRU is the one cache (xgrammar's own would be unbounded by default).
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._lock = threading.Lock()

    def _compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            if (hit := self._cache.get(spec)) is not None:
                self._cache.move_to_end(spec)
                return hit
        c = self._xgr
        try:
            if spec.kind == "json_object":
                compiled = c.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                 max_whitespace_cnt=MAX_WHITESPACE)
            elif spec.kind == "json_schema":
                try:
                    json.loads(spec.value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the schema is not JSON: {e}") from None
                compiled = c.compile_json_schema(spec.value, max_whitespace_cnt=MAX_WHITESPACE)
            elif spec.kind == "structural_tag":
                compiled = c.compile_structural_tag(spec.value)
            elif spec.kind == "ebnf":
                compiled = c.compile_grammar(spec.value)
            else:
                compiled = c.compile_regex(spec.value)
        except Exception as e:       # RuntimeError from the C++ side, xgrammar's own errors
            raise ValueError(f"grammar: the {spec.kind} does not compile: {_reason(e)}") from e
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def check(self, spec: GrammarSpec) -> None:
        """Compile `spec` (cached); ValueError saying why when it does not compile."""
        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"spec must be a GrammarSpec, got {type(spec).__name__}")
        self._compile(spec)

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec` (ValueError as `check`)."""
        import xgrammar as xgr

        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"spec must be a GrammarSpec, got {type(spec).__name__}")
        return GrammarMatcher(spec, xgr.GrammarMatcher(self._compile(spec)))

    @property
    def cached(self) -> int:
        return len(self._cache)
