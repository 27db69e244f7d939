"""A trajectory's commands as OpenAI function tools, and each reply's command as a call.

What it is: the tool side of `--tool-format openai`. SWE-agent documents its commands in the
system prompt (`COMMANDS:`, as YAML-like blocks or one line each) or, for function-calling
runs, in the run's config (`replay_config.agent.tools.command_docs`); SWE-agent turns those
same docs into function tools, and so do we:

    doc                                           -> tool
    open:                                            {"type": "function", "function": {
      docstring: opens the file at ...                 "name": "open",
      signature: open <path> [<line_number>]           "description": "opens the file at ...",
      arguments:                                       "parameters": {"type": "object",
        - path (string) [required]: ...                  "properties": {"path": {"type":
        - line_number (integer) [optional]: ...            "string", ...}, "line_number": ...},
                                                         "required": ["path"]}}}
    open <path> [<line_number>] - opens the ...   -> the same from the signature alone
                                                     (`*_line`, `line_number`: integer)

plus `bash` ({"command": string}, SWE-agent's `enable_bash_tool`) and, for a function a
trajectory calls without a doc (function_calling_simple), a schema inferred from its calls.
Calls, per reply, in this order of trust:

    1. the reply's own `tool_calls` (function-calling runs), arguments as recorded;
    2. its `action` text parsed against the command's signature: `open foo.py 10` ->
       open({"path": "foo.py", "line_number": 10}), `edit 3:5\\n<text>\\nend_of_edit` ->
       edit({"start_line": 3, "end_line": 5, "replacement_text": "<text>"});
    3. otherwise bash({"command": action}) (`python x.py`, `ls`, and a documented command
       whose text does not fit its signature; `fallbacks` counts the latter).

Every call's arguments validate against its tool's schema (a call that does not becomes
step 3); a reply with no command has no call. Tool names are deduplicated (SWE-agent's docs
list `scroll_down` twice in some prompts; a server refuses duplicates). What it is not: the
workload (workload.py puts the tools and calls into sessions) or a SWE-agent tool runner.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

import jsonschema

from .trajectories import Trajectory

BASH = "bash"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")          # OpenAI's tool-name rule (+ dots)
_TYPES = {"string": "string", "str": "string", "file path": "string", "path": "string",
          "integer": "integer", "int": "integer", "boolean": "boolean", "bool": "boolean",
          "number": "number", "float": "number"}
_SHELL_OPS = {"&&", "||", "|", ";", ">", ">>", "<", "2>&1"}
_ARG = re.compile(r"^\s*-\s*([\w-]+)\s*\(([^)]*)\)\s*\[(required|optional)\]\s*:?\s*(.*)$")


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str                 # a JSON Schema type
    required: bool
    description: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    description: str
    signature: str            # as documented, first line first
    args: tuple[Arg, ...]

    def tool(self) -> dict[str, Any]:
        props = {a.name: {"type": a.type, **({"description": a.description}
                                             if a.description else {})} for a in self.args}
        params: dict[str, Any] = {"type": "object", "properties": props}
        if req := [a.name for a in self.args if a.required]:
            params["required"] = req
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": params}}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """`tools`: the OpenAI tools of the trajectory; `calls[i]`: reply i's calls as
    (function name, arguments); `parsed`: replies whose action text became a call of a
    documented command; `fallbacks`: documented commands whose text fit no signature
    (sent as bash)."""
    tools: tuple[dict[str, Any], ...]
    calls: tuple[tuple[tuple[str, dict[str, Any]], ...], ...]
    parsed: int
    fallbacks: int


# ------------------------------------------------------------------ docs -> commands

def _section(system: str) -> str:
    """The COMMANDS section of a SWE-agent system prompt ('' when it has none)."""
    i = system.find("COMMANDS:")
    if i < 0:
        return ""
    body = system[i + len("COMMANDS:"):]
    end = min((j for j in (body.find("\n\n\n"), body.find("Please note"),
                           body.find("RESPONSE FORMAT")) if j >= 0), default=len(body))
    return body[:end]


def _placeholders(signature: str) -> list[tuple[str, bool]]:
    """(name, required) of the signature's arguments, in order (the block argument of a
    multi-line signature last)."""
    out = []
    for tok in re.findall(r"\[[^\]]*\]|\S+", signature):
        optional = tok.startswith("[")
        names = re.findall(r"<([^>]+)>", tok) or \
            ([tok.strip("[]")] if optional and not tok.strip("[]").startswith("-") else [])
        out += [(n, not optional) for n in names]
    return out


def _type_from_name(name: str) -> str:
    return "integer" if name == "line_number" or name.endswith("_line") else "string"


def parse_docs(text: str) -> list[Command]:
    """SWE-agent command docs, in either layout, in documented order."""
    lines = text.strip("\n").split("\n")
    if any(re.match(r"^\w+:\s*$", ln) for ln in lines) and "docstring:" in text:
        return _parse_yaml(lines)
    return _parse_one_line(lines)


def _parse_yaml(lines: list[str]) -> list[Command]:
    cmds: list[Command] = []
    cur: dict[str, Any] | None = None
    field = None

    def close() -> None:
        if cur is None:
            return
        sig = "\n".join(s for s in cur["signature"] if s.strip())
        args = list(cur["args"])
        named = {a.name for a in args}
        if not args:         # no arguments section: the signature's placeholders
            args = [Arg(n, _type_from_name(n), r) for n, r in _placeholders(sig)]
        elif missing := [(n, r) for n, r in _placeholders(sig) if n not in named]:
            args += [Arg(n, _type_from_name(n), r) for n, r in missing]
        cmds.append(Command(cur["name"], " ".join(" ".join(cur["doc"]).split()), sig,
                            tuple(args)))

    for i, ln in enumerate(lines):
        nxt = next((x for x in lines[i + 1:] if x.strip()), "")
        if (m := re.match(r"^(\w+):\s*$", ln)) and \
                re.match(r"^\s+(docstring|signature):", nxt):   # not a docstring's "Tips:"
            close()
            cur, field = {"name": m.group(1), "doc": [], "signature": [], "args": []}, None
        elif cur is None:
            continue
        elif m := re.match(r"^\s+docstring:\s*(.*)$", ln):
            field = "doc"
            cur["doc"].append(m.group(1))
        elif m := re.match(r"^\s+signature:\s*(.*)$", ln):
            field = "signature"
            cur["signature"].append(m.group(1))
        elif re.match(r"^\s+arguments:\s*$", ln):
            field = "args"
        elif field == "args" and (m := _ARG.match(ln)):
            kind = m.group(2).strip().lower()
            cur["args"].append(Arg(m.group(1), _TYPES.get(kind, "string"),
                                   m.group(3) == "required", m.group(4).strip()))
        elif field in ("doc", "signature"):
            cur[field].append(ln)          # continuation (multi-line docstring, edit's body)
    close()
    return cmds


def _parse_one_line(lines: list[str]) -> list[Command]:
    """`name <a> [<b>] - docstring`; a signature may span lines (edit's block) until the
    line with ' - '."""
    cmds, pending = [], []
    for ln in lines:
        if not ln.strip():
            continue
        pending.append(ln)
        if " - " not in ln:
            continue
        last_sig, doc = pending[-1].split(" - ", 1)
        sig = "\n".join(pending[:-1] + [last_sig]).strip()
        pending = []
        name = sig.split()[0] if sig.split() else ""
        if not re.fullmatch(r"\w+", name):
            continue
        args = tuple(Arg(n, _type_from_name(n), r) for n, r in _placeholders(sig))
        cmds.append(Command(name, doc.strip(), sig, args))
    return cmds


def bash_command() -> Command:
    return Command(BASH, "runs the given command directly in bash", "<command>",
                   (Arg("command", "string", True, "a command to run directly in the "
                                                   "current shell"),))


def _infer(name: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The tool of a function called without a doc: the arguments seen, typed by value,
    required when every call passes them."""
    def typ(v: Any) -> str | None:
        return "boolean" if isinstance(v, bool) else "integer" if isinstance(v, int) else \
            "number" if isinstance(v, float) else "string" if isinstance(v, str) else None
    props: dict[str, dict[str, Any]] = {}
    for c in calls:
        for k, v in c.items():
            t = typ(v)
            if k not in props:
                props[k] = {"type": t} if t else {}
            elif props[k].get("type") not in (None, t):
                props[k] = {}                     # mixed types: any value
    params: dict[str, Any] = {"type": "object", "properties": props}
    if req := [k for k in props if all(k in c for c in calls)]:
        params["required"] = req
    return {"type": "function", "function": {"name": name, "description": "",
                                             "parameters": params}}


# ------------------------------------------------------------------ action -> call

def _coerce(value: str, typ: str) -> Any:
    if typ == "integer":
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError(value)
        return int(value)
    if typ == "number":
        return float(value)
    if typ == "boolean":
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    return value


def parse_action(action: str, cmd: Command) -> dict[str, Any] | None:
    """The arguments of `action` (a SWE-agent command line) per `cmd`'s signature, or None
    when it does not fit (missing required argument, a non-integer line number...)."""
    sig_lines = cmd.signature.split("\n")
    block = next((n for ln in sig_lines[1:] if (n := re.fullmatch(r"\s*<([^>]+)>\s*", ln))),
                 None)
    head, _, rest = action.partition("\n")
    words = head.split(None, 1)
    if not words or words[0] != cmd.name:
        return None
    head = words[1] if len(words) > 1 else ""
    types = {a.name: a.type for a in cmd.args}
    out: dict[str, Any] = {}
    if block is not None:                           # edit: the text up to end_of_edit
        term = sig_lines[-1].strip()
        body = rest.split("\n")
        if term in (b.strip() for b in body):
            body = body[:[b.strip() for b in body].index(term)]
        out[block.group(1)] = "\n".join(body)
    elif rest.strip():
        head = f"{head}\n{rest}"
    try:
        toks = shlex.split(head)
    except ValueError:                              # an unbalanced quote: plain words
        toks = head.split()
    if _SHELL_OPS & set(toks):                      # `cmd a && cmd b`: a shell line, bash's
        return None
    for a in cmd.args:                              # `--name value`, documented or not
        if (flag := f"--{a.name}") in toks:
            i = toks.index(flag)
            if i + 1 >= len(toks):
                return None
            out[a.name] = toks[i + 1]
            del toks[i:i + 2]
    sig_toks = re.findall(r"\[[^\]]*\]|\S+", sig_lines[0])
    if sig_toks and not sig_toks[0].lstrip("[").startswith(("<", "-", "'", '"')):
        sig_toks = sig_toks[1:]                     # the command's own name
    positional: list[tuple[list[str], str, bool]] = []
    for tok in sig_toks:
        optional = tok.startswith("[")
        inner = tok.strip("[]").strip("'\"")
        names = re.findall(r"<([^>]+)>", inner) or ([inner] if optional else [])
        if inner.startswith("--"):                  # [--flag <value>] of another name
            flag = inner.split()[0]
            if flag in toks:
                i = toks.index(flag)
                if i + 1 >= len(toks) or not names:
                    return None
                out[names[0]] = toks[i + 1]
                del toks[i:i + 2]
            continue
        sep = re.sub(r"<[^>]+>", "", inner)
        if names:
            positional.append((names, sep, not optional))
    seen = {n for p in positional for n in p[0]} | set(out)
    positional += [([a.name], "", a.required) for a in cmd.args
                   if a.name not in seen and a.name != (block.group(1) if block else None)]
    # The arguments section, when there is one, says what is required (a signature may
    # write an optional argument as <name>).
    required_of = {a.name: a.required for a in cmd.args}
    last = None
    for names, sep, required in positional:
        if set(names) <= set(out):
            continue
        if not toks:
            if all(required_of.get(n, required) for n in names):
                return None
            continue
        t = toks.pop(0)
        parts = t.split(sep, len(names) - 1) if sep and len(names) > 1 else [t]
        if len(parts) != len(names):
            return None
        out.update(zip(names, parts))
        last = names[-1]
    if toks:                                        # unquoted words: the last argument's
        if last is None or types.get(last, "string") != "string":
            return None
        out[last] = " ".join([out[last], *toks])
    try:
        return {k: _coerce(v, types[k]) for k, v in out.items() if k in types}
    except ValueError:
        return None


# ------------------------------------------------------------------ trajectory -> tools

def derive(traj: Trajectory) -> ToolUse:
    system = "\n\n".join(m["content"] for m in traj.prefix if m["role"] == "system")
    docs = _section(system) or traj.command_docs
    commands: dict[str, Command] = {}
    for c in parse_docs(docs) if docs else []:
        commands.setdefault(c.name, c)             # first of a duplicated name wins
    commands.setdefault(BASH, bash_command())
    tools = {name: c.tool() for name, c in commands.items()}
    validators = {n: jsonschema.Draft202012Validator(t["function"]["parameters"])
                  for n, t in tools.items()}

    structured: list[list[tuple[str, dict[str, Any]] | None]] = []
    for step in traj.steps:
        calls: list[tuple[str, dict[str, Any]] | None] = []
        for name, args in step.calls:
            try:
                a = json.loads(args)
            except json.JSONDecodeError:
                a = None
            calls.append((name, a) if isinstance(a, dict) and _NAME.match(name) else None)
        structured.append(calls)
    undocumented: dict[str, list[dict[str, Any]]] = {}
    for calls in structured:
        for c in calls:
            if c is not None and c[0] not in tools:
                undocumented.setdefault(c[0], []).append(c[1])
    for name, seen in undocumented.items():
        tools[name] = _infer(name, seen)
        validators[name] = jsonschema.Draft202012Validator(tools[name]["function"]["parameters"])

    parsed = fallbacks = 0
    out: list[tuple[tuple[str, dict[str, Any]], ...]] = []
    for step, calls in zip(traj.steps, structured):
        if calls and all(c is not None and validators[c[0]].is_valid(c[1]) for c in calls):
            out.append(tuple(c for c in calls if c is not None))
            continue
        action = step.action.strip()
        if not action:
            out.append(())                          # no command: a reply without a call
            continue
        name = action.split()[0]
        args = parse_action(action, commands[name]) if name in commands and name != BASH \
            else None
        if args is not None and validators[name].is_valid(args):
            parsed += 1
            out.append(((name, args),))
        else:
            fallbacks += name in commands and name != BASH
            out.append(((BASH, {"command": action}),))
    return ToolUse(tuple(tools.values()), tuple(out), parsed, fallbacks)
