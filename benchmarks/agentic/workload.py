"""The agentic workload: coding-agent sessions shaped by real trajectories, as JSONL.

What it is: N sessions, each replaying one real trajectory's shape (its number of turns, its
tool-output and reply lengths, counted in the served model's tokens) with the first turn
scaled to a target size (default 50K tokens: the agent's system prompt, then repository
context, then the task). Filler is the trajectories' own text (file views, logs, tasks) in a
seeded order, so the prompt reads like an agent's and the whole file is a function of
(trajectories, tokenizer, config). What it is not: a client; the assistant replies are not
stored (the client appends what the server actually generated, as an agent does).

One session in the JSONL (after one header line):

    {"id": "s0003", "source": "pydicom__pydicom-1458", "turns": [
       {"messages": [system, user], "max_tokens": 112, "reply_tokens": 112,
        "new_tokens": 50000, "context_tokens": 50000},          # turn 0: the whole first prompt
       {"messages": [user(tool output)], "max_tokens": 64, ...},  # turn k: what is appended
       ...]}

`tool_format="openai"` (`--tool-format openai`) makes each session a real tool-using
conversation instead (tools.py derives the tools and calls from the trajectory):

    {"id": ..., "tools": [{"type": "function", "function": {...}}, ...],  # every request
     "turns": [
       {"messages": [system, user], ...},                                 # turn 0 as above
       {"messages": [assistant(content: thought, tool_calls: [{"id": "call_0_0", ...}]),
                     tool(tool_call_id: "call_0_0", content: tool output)], ...},
       ...]}

Turn k then opens with the trajectory's own reply k - 1 (its thought and its call), so the
client replays it instead of what the server generated (a tool message must answer the call
before it); a reply with no command stays a plain assistant message, its observation a user
message. Token counts: turn 0 is counted rendered with the tools (count_prompt passes them
to tsrun's rendering), so the first-turn target includes the tools' declarations; a later
turn's `new_tokens` is its thought + each call's JSON (name and arguments) + the tool output
+ TURN_OVERHEAD, an estimate of the template's markup around a call as in the text format
(within 1% of the rendered count over a session on SmolLM2).
The text format (the default) builds the same sessions as before (same lines in the JSONL:
no `tools` key, observations as user messages; the header's config gains `tool_format`).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import tools as X
from . import trajectories as T

TURN_OVERHEAD = 8     # template tokens per appended message pair (role markers), an estimate
TOOL_FORMATS = ("text", "openai")   # observations as user messages | tools, calls, tool msgs
EMPTY_OUTPUT = "Your command ran successfully and did not produce any output."


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    trajectories: str = str(T.DEFAULT_DIR)
    sessions: int = 32
    first_turn_tokens: int = 50_000       # system prompt + repository context + task
    tool_output_scale: float = 1.0        # tool outputs keep their real size by default
    max_tool_tokens: int | None = 8192
    max_reply_tokens: int = 2048          # caps each turn's max_tokens
    max_turns: int | None = None          # None: the trajectory's own count
    max_context_tokens: int | None = 131_072   # end a session before it outgrows this
    seed: int = 0
    tool_format: str = "text"             # "openai": tools + tool_calls + tool messages

    def __post_init__(self):
        if self.sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {self.sessions}")
        if self.first_turn_tokens < 16:
            raise ValueError(f"first_turn_tokens must be >= 16, got {self.first_turn_tokens}")
        if self.tool_output_scale <= 0:
            raise ValueError(f"tool_output_scale must be > 0, got {self.tool_output_scale}")
        for name in ("max_tool_tokens", "max_reply_tokens", "max_turns", "max_context_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format must be one of {', '.join(TOOL_FORMATS)}, got "
                             f"{self.tool_format!r}")


@dataclass(slots=True)
class Turn:
    messages: list[dict[str, Any]]   # appended to the history at this turn
    max_tokens: int                  # the reply length to generate (ignore_eos)
    reply_tokens: int                # the trajectory's real reply length (before the cap)
    new_tokens: int                  # tokens of `messages` (turn 0: the whole rendered prompt)
    context_tokens: int              # estimated prompt tokens of this turn


@dataclass(slots=True)
class Session:
    id: str
    source: str
    turns: list[Turn] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None   # sent with every request (tool format)


def _filler(rng: random.Random, blocks: list[T.Block], tok: Any, n: int) -> list[int]:
    """>= n token ids of the trajectories' text in a seeded order (blocks may repeat)."""
    picked, total = [], 0
    while total < n + 256:
        b = rng.choice(blocks)
        picked.append(b.text)
        total += b.tokens
    return tok.encode("\n\n".join(picked))


def _fit(target: int, render, knob: int, tok: Any,
         tools: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, str]], int]:
    """Adjust `knob` until render(knob) measures `target` tokens (token merges at the cut
    make each step a few tokens off; three corrections land within a handful)."""
    msgs = render(knob)
    for _ in range(3):
        got = T.count_prompt(tok, msgs, tools)
        if got == target:
            break
        knob = max(0, knob + target - got)
        msgs = render(knob)
    return msgs, T.count_prompt(tok, msgs, tools)


def first_turn(traj: T.Trajectory, tok: Any, target: int, blocks: list[T.Block],
               rng: random.Random, sid: str, tools: list[dict[str, Any]] | None = None
               ) -> tuple[list[dict[str, str]], int]:
    system = "\n\n".join(m["content"] for m in traj.prefix if m["role"] == "system")
    task = "\n\n".join(m["content"] for m in traj.prefix if m["role"] == "user")
    sys_ids, task_ids = tok.encode(system), tok.encode(task)

    def msgs(sys_text: str, user_text: str) -> list[dict[str, str]]:
        return ([{"role": "system", "content": sys_text}] if sys_text else []) + \
               [{"role": "user", "content": user_text}]

    natural = T.count_prompt(tok, msgs(system, task), tools)
    if tools and (floor := T.count_prompt(tok, msgs("", "x"), tools)) >= target:
        raise ValueError(f"first_turn_tokens {target}: the tools of {traj.name} alone "
                         f"render to {floor} tokens (hint: raise --first-turn-tokens)")
    if natural >= target:
        # Smaller than the real prompt (tiny test workloads): cut system prompt and task in
        # proportion, keeping the start of each.
        share = len(sys_ids) / max(1, len(sys_ids) + len(task_ids))

        def render(budget: int) -> list[dict[str, str]]:
            ns = int(budget * share)
            return msgs(tok.decode(sys_ids[:ns]), tok.decode(task_ids[:max(1, budget - ns)]))
        return _fit(target, render, target - (natural - len(sys_ids) - len(task_ids)), tok,
                    tools)

    head = f"Repository context (session {sid}): files and logs follow.\n\n"
    ids = _filler(rng, blocks, tok, target - natural)

    def render(n: int) -> list[dict[str, str]]:
        ctx = tok.decode(ids[:n])
        return msgs(system, f"{head}{ctx}\n\n{task}")
    return _fit(target, render, target - natural - len(tok.encode(head)) - 2, tok, tools)


def tool_output(text: str, tok: Any, cfg: WorkloadConfig, blocks: list[T.Block],
                rng: random.Random) -> str:
    """The observation at `tool_output_scale` of its real token count (capped): cut when
    shrinking, extended with trajectory text when growing."""
    text = text or EMPTY_OUTPUT
    ids = tok.encode(text)
    n = max(1, round(len(ids) * cfg.tool_output_scale))
    if cfg.max_tool_tokens is not None:
        n = min(n, cfg.max_tool_tokens)
    if n <= len(ids):
        return tok.decode(ids[:n])
    return text + "\n" + tok.decode(_filler(rng, blocks, tok, n - len(ids))[:n - len(ids)])


def call_id(reply: int, j: int) -> str:
    """Stable per session: the j-th call of reply `reply` (the trajectories' own ids repeat
    within a run, so they are not used)."""
    return f"call_{reply}_{j}"


def tool_turn(step: T.Step, calls: tuple[tuple[str, dict[str, Any]], ...], reply: int,
              obs: str, tok: Any) -> tuple[list[dict[str, Any]], int]:
    """Turn reply + 1 of the tool format: reply `reply` as an assistant message with its
    calls, then the observation answering them; and its estimated tokens."""
    tool_calls = [{"id": call_id(reply, j), "type": "function",
                   "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                  for j, (name, args) in enumerate(calls)]
    assistant: dict[str, Any] = {"role": "assistant", "content": step.thought}
    if tool_calls:
        assistant["tool_calls"] = tool_calls
    # SWE-agent runs one command per reply; a reply with several calls (none in the data)
    # gets the observation on its first and an empty output on the others.
    answers = [{"role": "tool", "tool_call_id": c["id"], "content": obs if j == 0 else
                EMPTY_OUTPUT} for j, c in enumerate(tool_calls)] or \
        [{"role": "user", "content": obs}]
    new = len(tok.encode(step.thought)) + TURN_OVERHEAD + sum(
        len(tok.encode(json.dumps(c["function"], ensure_ascii=False))) for c in tool_calls) + \
        sum(len(tok.encode(m["content"])) for m in answers)
    return [assistant, *answers], new


def build(cfg: WorkloadConfig, tok: Any) -> list[Session]:
    trajs = T.load(cfg.trajectories)
    blocks = T.corpus(trajs, tok)
    rng = random.Random(f"agentic-workload:{cfg.seed}")
    order: list[T.Trajectory] = []
    while len(order) < cfg.sessions:          # every trajectory once per cycle, seeded order
        cycle = list(trajs)
        rng.shuffle(cycle)
        order += cycle
    sessions = []
    for i, traj in enumerate(order[:cfg.sessions]):
        srng = random.Random(f"agentic-session:{cfg.seed}:{i}")
        s = Session(id=f"s{i:04d}", source=traj.name)
        use = X.derive(traj) if cfg.tool_format == "openai" else None
        if use is not None:
            s.tools = [dict(t) for t in use.tools]
        n_turns = min(traj.turns, cfg.max_turns or traj.turns)
        context = 0
        for k in range(n_turns):
            if k == 0:
                messages, new = first_turn(traj, tok, cfg.first_turn_tokens, blocks, srng, s.id,
                                           s.tools)
            elif use is not None:
                obs = tool_output(traj.observations[k - 1], tok, cfg, blocks, srng)
                messages, new = tool_turn(traj.steps[k - 1], use.calls[k - 1], k - 1, obs, tok)
            else:
                obs = tool_output(traj.observations[k - 1], tok, cfg, blocks, srng)
                messages = [{"role": "user", "content": obs}]
                new = len(tok.encode(obs)) + TURN_OVERHEAD
            reply = max(1, len(tok.encode(traj.replies[k])))
            max_tokens = min(reply, cfg.max_reply_tokens)
            if k and cfg.max_context_tokens and \
                    context + new + max_tokens > cfg.max_context_tokens:
                break                          # the agent would have hit the context limit
            context += new
            s.turns.append(Turn(messages, max_tokens, reply, new, context))
            if use is None:
                context += max_tokens          # the reply joins the history (tool format:
                                               # the trajectory's, in the next turn's `new`)
        sessions.append(s)
    return sessions


def save(path: str | Path, sessions: list[Session], cfg: WorkloadConfig | None = None,
         tokenizer: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        header = {"format": "tscompile-agentic-workload/1", "tokenizer": tokenizer,
                  "config": asdict(cfg) if cfg else None}
        f.write(json.dumps({"header": header}) + "\n")
        for s in sessions:
            d = asdict(s)
            if d["tools"] is None:             # the text format's lines stay as they were
                del d["tools"]
            f.write(json.dumps(d) + "\n")
    return path


def load(path: str | Path) -> tuple[dict[str, Any], list[Session]]:
    header: dict[str, Any] = {}
    sessions = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        d = json.loads(line)
        if "header" in d:
            header = d["header"]
            continue
        if "turns" not in d:
            raise ValueError(f"{path}:{i + 1}: not a session (no 'turns'); "
                             f"hint: make it with `python -m benchmarks.agentic make-workload`")
        sessions.append(Session(d["id"], d["source"], [Turn(**t) for t in d["turns"]],
                                d.get("tools")))
    if not sessions:
        raise ValueError(f"{path}: no sessions")
    return header, sessions


def describe(sessions: list[Session]) -> dict[str, Any]:
    """Shape summary for the CLI and the run metadata."""
    turns = [len(s.turns) for s in sessions]
    first = [s.turns[0].new_tokens for s in sessions]
    follow = [t.new_tokens for s in sessions for t in s.turns[1:]]
    out = [t.max_tokens for s in sessions for t in s.turns]
    last = [s.turns[-1].context_tokens for s in sessions]
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else None   # noqa: E731
    return {"sessions": len(sessions), "requests": sum(turns), "turns_mean": mean(turns),
            "turns_max": max(turns), "first_turn_tokens_mean": mean(first),
            "appended_tokens_mean": mean(follow), "max_tokens_mean": mean(out),
            "last_context_tokens_mean": mean(last),
            **({"tools_mean": mean([len(s.tools) for s in sessions if s.tools])}
               if any(s.tools for s in sessions) else {})}
