"""One chat turn, whatever API it came through: messages, tools, tool choice and output
format in; the prompt's token ids, the grammar that constrains the answer and the parser
that reads it out.

What it is: `ChatTurn` (the request pipeline's common form: OpenAI chat messages and
function tools, which the Anthropic Messages and OpenAI Responses encoders map onto),
`check_turn` (the checks every API shares: tool schemas are JSON Schema, a named tool is
declared, a tool result answers a call of an earlier turn), `render` (the model's own
chat template with `tools` passed to it; a template that knows no tools gets them declared
in the system prompt and earlier calls written in the family's text format) and
`grammar_for` (xgrammar specs for `response_format` and `tool_choice` required / named).
What it is not: an API's wire format (openai_api.py, anthropic_api.py, responses_api.py) or
the parsing of the output (parsers/).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jsonschema

from tscompile.runtime.grammar import tool_call_spec
from tscompile.runtime.protocol import GrammarSpec
from tscompile.runtime.server.errors import APIError

ToolChoice = str | dict[str, Any]      # "none" | "auto" | "required" | {"type": "function", ...}


@dataclass(frozen=True, slots=True)
class ChatTurn:
    messages: list[dict[str, Any]]        # OpenAI chat shape (tool_calls, tool_call_id, ...)
    tools: list[dict[str, Any]] = field(default_factory=list)   # [{"type": "function", ...}]
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None    # the answer must validate against it
    json_object: bool = False                    # the answer must be a JSON object
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """The tool a named tool_choice forces."""
        if isinstance(self.tool_choice, dict):
            return self.tool_choice["function"]["name"]
        return None

    def tool_schemas(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"].get("parameters") or {}
                for t in self.tools}


# ------------------------------------------------------------------ checks

def check_turn(turn: ChatTurn, *, fields: Callable[[str], str] = lambda f: f) -> None:
    """400s naming the field. `fields` maps this module's names ("tools", "tool_choice",
    "messages") to the API's own (Anthropic says "tool_result" where OpenAI says "tool")."""
    names: set[str] = set()
    for i, tool in enumerate(turn.tools):
        fn = tool["function"]
        where = f"{fields('tools')}[{i}]"
        if fn["name"] in names:
            raise APIError(400, f"{where}: tool name {fn['name']!r} is declared twice",
                           param=fields("tools"))
        names.add(fn["name"])
        schema = fn.get("parameters")
        if schema is not None:
            check_schema(schema, f"{where}.{fields('parameters')}", fields("tools"))
    forced = turn.forced_tool
    if forced is not None and forced not in names:
        raise APIError(400, f"{fields('tool_choice')}: tool {forced!r} is not in "
                            f"{fields('tools')} (declared: {', '.join(sorted(names)) or 'none'})",
                       param=fields("tool_choice"))
    if turn.tool_choice == "required" and not turn.tools:
        raise APIError(400, f"{fields('tool_choice')}: 'required' needs at least one tool in "
                            f"{fields('tools')}", param=fields("tool_choice"))
    if turn.json_schema is not None:
        check_schema(turn.json_schema, fields("response_format.json_schema.schema"),
                     fields("response_format"))
    json_answer = turn.json_schema is not None or turn.json_object
    if json_answer and (turn.tool_choice == "required" or forced is not None):
        raise APIError(400, f"{fields('response_format')}: cannot be combined with a "
                            f"{fields('tool_choice')} that forces a tool call",
                       param=fields("response_format"))
    calls: set[str] = set()
    for i, m in enumerate(turn.messages):
        for call in m.get("tool_calls") or ():
            calls.add(call["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in calls:
            raise APIError(400, f"{fields('messages')}[{i}].{fields('tool_call_id')}: "
                                f"{m.get('tool_call_id')!r} answers no tool call of an earlier "
                                f"assistant turn", param=fields("messages"))


def check_schema(schema: Any, where: str, param: str) -> None:
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: must be a JSON Schema object, got "
                            f"{type(schema).__name__}", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        raise APIError(400, f"{where}: not a valid JSON Schema"
                            f"{f' at {at}' if at else ''}: {e.message}", param=param) from None


# ------------------------------------------------------------------ rendering

def render(tokenizer: Any, turn: ChatTurn, family: str | None) -> str:
    """The prompt text: the model's chat template with `tools` (and the template kwargs),
    or, for a template that knows no tools, the tools declared in a system message and the
    earlier calls written out as the model would have (`family`'s text format)."""
    messages = turn.messages
    extra = dict(turn.template_kwargs)
    if turn.tools:
        if knows_tools(tokenizer):
            extra["tools"] = turn.tools
        else:
            messages = _tools_in_text(messages, turn.tools)
    elif not knows_tools(tokenizer):
        messages = _tools_in_text(messages, [])
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"messages: the chat template rejected them: "
                            f"{type(e).__name__}: {e}", param="messages") from None


def knows_tools(tokenizer: Any) -> bool:
    return "tools" in (tokenizer.chat_template or "")


_TOOLS_PROMPT = (
    "You have access to the following functions. To call a function, reply with only a JSON "
    'object of the form {"name": function name, "parameters": dictionary of argument name '
    "and its value}; for several calls, separate the objects with \";\". Do not use "
    "variables.\n\n")


def _tools_in_text(messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with no `tools`: Llama 3.1's JSON tool-call convention,
    written into the text (tsrun's llama3_json parser reads it back)."""
    out = []
    if tools:
        decl = _TOOLS_PROMPT + "\n\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": f"{messages[0]['content']}\n\n{decl}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": decl})
    for m in messages:
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            text = "; ".join(
                f'{{"name": {json.dumps(c["function"]["name"])}, "parameters": '
                f'{c["function"]["arguments"]}}}' for c in calls)
            content = m.get("content") or ""
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{content}\n{text}" if content else text
        elif m.get("content") is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


# ------------------------------------------------------------------ grammars

def grammar_for(turn: ChatTurn, family: str | None) -> GrammarSpec | None:
    """The grammar the answer is sampled under: response_format's JSON, or the family's
    tool-call format for tool_choice required / named (parallel calls per the turn)."""
    if turn.json_schema is not None:
        return GrammarSpec("json_schema", json.dumps(turn.json_schema))
    if turn.json_object:
        return GrammarSpec("json_object")
    if turn.tools and (turn.tool_choice == "required" or turn.forced_tool):
        if family is None:
            raise APIError(400, "tool_choice: this model has no tool-call format "
                                "(start tsrun with --tool-call-parser)", param="tool_choice")
        return tool_call_spec(family, turn.tools, turn.tool_choice,
                              parallel=turn.parallel_tool_calls and not turn.forced_tool)
    return None
