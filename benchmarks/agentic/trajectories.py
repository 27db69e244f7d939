"""Real coding-agent conversations (SWE-agent `.traj` files) reduced to their per-turn shape.

What it is: a reader of `data/swe-agent-trajectories/*.traj` (a copy of ../shared/data;
JSON with a `history` list of chat messages) that cuts each conversation into turns the way an agent drives a
server: turn 0 sends the system prompt and the task; every later turn appends the tool's
output (the observation) to the history; every turn ends with the assistant's reply (kept
also as a `Step`: its thought, its command and any structured function calls, for
tools.py). Also
the token counter (the served model's tokenizer: a folder or a bare `tokenizer.json`) and
the text corpus the workload draws its filler from. What it is not: the workload (scaling,
sessions, JSONL: workload.py); nothing here talks to a server.

    history:  system, user(task)[, user(demo)...], assistant, obs, assistant, obs, ..., assistant
    turns:    |---------- turn 0 prompt ---------|  reply 0 | t1 | reply 1 | ...   | last reply
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# A copy of ../shared/data/swe-agent-trajectories (MIT, LICENSE and SOURCES inside), kept in
# the repository so a clean clone anywhere (CI) has the workload's source.
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "swe-agent-trajectories"


class TokenCounter(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class _BareTokenizer:
    """A lone tokenizer.json: encode/decode, no chat template."""
    chat_template = None

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        self._tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Any:
    """The served model's tokenizer: an HF folder (with its chat template when it has one,
    via `tscompile.tokenizer.Tokenizer`) or a path to a `tokenizer.json`."""
    p = Path(path)
    if p.is_file():
        return _BareTokenizer(p)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer {p}: expected a folder with tokenizer.json or a "
                                f"tokenizer.json file (hint: pass the served model's folder)")
    from tscompile.tokenizer import Tokenizer
    return Tokenizer(p)


def count_prompt(tok: Any, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> int:
    """Prompt tokens the server will see: the rendered chat template when the tokenizer has
    one (what tsrun counts; with `tools`, tsrun's own rendering: the template's `tools`
    variable, or the tools declared in the system prompt for a template without one), else
    the messages' content tokens plus the tools' and calls' JSON (a few tokens short)."""
    if getattr(tok, "chat_template", None):
        if tools:
            from tscompile.runtime.server.chat import ChatTurn, render
            return len(tok.encode(render(tok, ChatTurn(messages, tools=tools), None)))
        return len(tok.encode(tok.apply_chat_template(messages)))
    n = sum(len(tok.encode(m.get("content") or "")) for m in messages)
    n += sum(len(tok.encode(json.dumps(c["function"]))) for m in messages
             for c in m.get("tool_calls") or ())
    return n + sum(len(tok.encode(json.dumps(t))) for t in tools or ())


@dataclass(frozen=True, slots=True)
class Step:
    """What the assistant did in one reply: `thought` (its text without the command),
    `action` (the command as SWE-agent ran it, '' when none) and `calls` (the structured
    function calls, (name, arguments JSON text), of function-calling trajectories)."""
    thought: str
    action: str
    calls: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One conversation's shape. `prefix`: the first turn's messages (system + task [+ demo]);
    `replies[i]`: the assistant's text ending turn i; `observations[i]`: the tool output
    that opens turn i + 1 (len(observations) == len(replies) - 1); `steps[i]`: reply i
    split into thought, command and calls; `command_docs`: the agent's command reference
    from the run's config (`replay_config.agent.tools.command_docs`) when it has one."""
    name: str
    prefix: tuple[dict[str, str], ...]
    replies: tuple[str, ...]
    observations: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    command_docs: str = ""

    @property
    def turns(self) -> int:
        return len(self.replies)


def _text(content: Any) -> str:
    if isinstance(content, list):          # content parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def _reply(msg: dict[str, Any]) -> str:
    """What the model generated: its text, plus the action when it lives outside the text
    (function-calling trajectories keep the call in `action`/`tool_calls`)."""
    text, action = _text(msg.get("content")), (msg.get("action") or "").strip()
    return text if not action or action in text else f"{text}\n{action}"


# The command block of a thought-action reply: SWE-agent's ``` fence or its XML <command>.
_COMMAND_BLOCK = re.compile(r"```[^\n]*\n(.*?)```|<command>\n?(.*?)</command>", re.S)


def _step(msg: dict[str, Any]) -> Step:
    """SWE-agent stores `thought` and `action` beside the text; without them the last
    command block of the text is the action and the rest the thought."""
    text = _text(msg.get("content"))
    calls = tuple((c["function"]["name"], c["function"].get("arguments") or "{}")
                  for c in msg.get("tool_calls") or () if c.get("function"))
    if "action" in msg or "thought" in msg:
        return Step((msg.get("thought") or "").strip(), (msg.get("action") or "").strip(),
                    calls)
    blocks = list(_COMMAND_BLOCK.finditer(text))
    if not blocks:
        return Step(text.strip(), "", calls)
    last = blocks[-1]
    action = (last.group(1) if last.group(1) is not None else last.group(2)).strip()
    return Step((text[:last.start()] + text[last.end():]).strip(), action, calls)


def _command_docs(run: dict[str, Any]) -> str:
    cfg = run.get("replay_config")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            return ""
    docs = ((cfg or {}).get("agent") or {}).get("tools", {}).get("command_docs")
    return docs if isinstance(docs, str) else ""


def parse(name: str, history: list[dict[str, Any]], command_docs: str = "") -> Trajectory:
    first = next((i for i, m in enumerate(history) if m["role"] == "assistant"), None)
    if first is None:
        raise ValueError(f"trajectory {name}: no assistant message, so no turn to replay")
    prefix = tuple({"role": "system" if m["role"] == "system" else "user",
                    "content": _text(m.get("content"))} for m in history[:first])
    replies: list[str] = []
    steps: list[Step] = []
    observations: list[str] = []
    pending: list[str] = []
    for m in history[first:]:
        if m["role"] == "assistant":
            if replies:                     # the tool output between two replies
                observations.append("\n".join(pending))
            replies.append(_reply(m))
            steps.append(_step(m))
            pending = []
        else:                               # tool / user observations
            pending.append(_text(m.get("content")))
    return Trajectory(name, prefix, tuple(replies), tuple(observations), tuple(steps),
                      command_docs)


def load(directory: str | Path = DEFAULT_DIR) -> list[Trajectory]:
    d = Path(directory)
    files = sorted(d.glob("*.traj"))
    if not files:
        raise FileNotFoundError(f"no .traj files in {d} (hint: --trajectories DIR)")
    runs = [(f.stem, json.loads(f.read_text())) for f in files]
    return [parse(name, run["history"], _command_docs(run)) for name, run in runs]


@dataclass(frozen=True, slots=True)
class Block:
    text: str
    tokens: int


def corpus(trajs: list[Trajectory], tok: Any, lines_per_block: int = 40) -> list[Block]:
    """The trajectories' own text (tool outputs: file views, listings, test logs; the tasks)
    cut into blocks of ~40 lines, each counted once: the material for repository-context
    filler, so the scaled prompt reads like code and logs rather than random bytes."""
    blocks: list[Block] = []
    sources = [o for t in trajs for o in t.observations] + \
              [m["content"] for t in trajs for m in t.prefix if m["role"] == "user"]
    for src in sources:
        lines = src.replace("\r\n", "\n").split("\n")
        for i in range(0, len(lines), lines_per_block):
            text = "\n".join(lines[i:i + lines_per_block]).strip()
            if text:
                blocks.append(Block(text, len(tok.encode(text))))
    if not blocks:
        raise ValueError("the trajectories hold no text to build filler from")
    return blocks
