"""Output parsers: a choice's sampled token ids -> content, reasoning and tool calls, per
model family.

What it is: the registry (`FAMILIES`, the names --tool-call-parser accepts), `family_for`
(a checkpoint's model type + tokenizer -> its family) and `make_parser` (one parser per
choice). The shapes and the protocol are in base.py, the shared machinery in markup.py,
each family's format in its module. What it is not: the wire format of tool calls
(openai_api.py) or the grammar that makes a model emit them (xgrammar's structural tags,
whose builtin formats these parsers accept: "kimi", "deepseek_r1", "deepseek_v3_1",
"qwen_3", "qwen_3_coder", "llama").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tscompile.runtime.server.parsers.base import (OutputParser, ParsedDelta, PlainParser,
                                                   ToolCall, ToolCallDelta)
from tscompile.runtime.server.parsers.deepseek import (CALLS_BEGIN, SEP, DeepSeekV3Parser,
                                                       DeepSeekV31Parser)
from tscompile.runtime.server.parsers.kimi_k2 import SECTION_BEGIN, KimiK2Parser
from tscompile.runtime.server.parsers.llama3_json import Llama3JsonParser
from tscompile.runtime.server.parsers.markup import (THINK_CLOSE, THINK_OPEN, TokenParser,
                                                     token_id)
from tscompile.runtime.server.parsers.qwen3 import (TOOL_CALL, Qwen3CoderParser,
                                                    Qwen3Parser)

__all__ = ["FAMILIES", "OutputParser", "ParsedDelta", "PlainParser", "ToolCall",
           "ToolCallDelta", "family_for", "make_parser"]

_PARSERS: dict[str, type[TokenParser]] = {
    "kimi_k2": KimiK2Parser,
    "deepseek_v3": DeepSeekV3Parser,
    "deepseek_v31": DeepSeekV31Parser,
    "qwen3": Qwen3Parser,
    "qwen3_coder": Qwen3CoderParser,
    "llama3_json": Llama3JsonParser,
}
FAMILIES: tuple[str, ...] = tuple(_PARSERS)


def family_for(model_type: str | None, tokenizer: Any) -> str | None:
    """The family of a checkpoint (config.json's model_type) with this tokenizer; None when
    we know no tool-call format for it (then every token is content).

    Formats that share a model type are told apart by the tokenizer: Kimi K2 is a
    "deepseek_v3"/"kimi_k2" model with Kimi's section token; DeepSeek V3/R1 and V3.1 share
    "deepseek_v3" and differ in the chat template (V3's wraps arguments in a ```json fence);
    Qwen3-Coder/Qwen3.5 are Qwen models whose template writes `<function=`."""
    mt = (model_type or "").lower()
    template = getattr(tokenizer, "chat_template", None) or ""
    if token_id(tokenizer, SECTION_BEGIN) is not None:
        return "kimi_k2"
    if mt.startswith("kimi"):
        return None
    if mt.startswith("deepseek"):
        if token_id(tokenizer, CALLS_BEGIN) is None:
            return None
        if mt in ("deepseek_v32", "deepseek_v3_2"):
            return "deepseek_v31"           # V3.2-Exp keeps V3.1's format
        if SEP in template and "```json" not in template:
            return "deepseek_v31"
        return "deepseek_v3"
    if mt.startswith(("qwen2", "qwen3")):
        if token_id(tokenizer, TOOL_CALL) is None:
            return None
        return "qwen3_coder" if "<function=" in template else "qwen3"
    if mt == "llama":
        return "llama3_json"
    return None


def make_parser(family: str | None, tokenizer: Any, prompt_ids: Sequence[int], *,
                tools: bool, reasoning: bool, call_id: Callable[[int], str] | None = None,
                tool_schemas: Mapping[str, Any] | None = None) -> OutputParser:
    """One choice's parser. tools=False: tool markup is content (spelled out); reasoning=False:
    no `<think>` split (a no-op too when the tokenizer has no `<think>` token). call_id(i)
    makes the id of call i (default "call_" + 24 random hex digits) unless the format carries
    its own (Kimi). tool_schemas (tool name -> parameters JSON schema) types Qwen3-Coder's
    XML arguments; the other families ignore it. A family whose markup tokens the tokenizer
    lacks raises ValueError (check once at startup)."""
    if family is None:
        has_think = (token_id(tokenizer, THINK_OPEN) is not None
                     and token_id(tokenizer, THINK_CLOSE) is not None)
        if reasoning and has_think:
            return TokenParser(tokenizer, prompt_ids, tools=False, reasoning=True)
        return PlainParser(tokenizer, prompt_ids)
    cls = _PARSERS.get(family)
    if cls is None:
        raise ValueError(f"unknown tool-call parser {family!r}; known: {', '.join(FAMILIES)}")
    return cls(tokenizer, prompt_ids, tools=tools, reasoning=reasoning, call_id=call_id,
               tool_schemas=tool_schemas)
