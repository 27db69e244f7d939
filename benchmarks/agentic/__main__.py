"""Command line of the agentic serving benchmark (defaults come from the config dataclasses).

    python -m benchmarks.agentic make-workload --tokenizer MODEL_DIR -o wl.jsonl [--sessions 32]
        [--first-turn-tokens 50000] [--max-turns N] [--max-reply-tokens 2048] [--seed 0]
        [--tool-format text|openai]
    python -m benchmarks.agentic sweep --url http://127.0.0.1:8000 --workload wl.jsonl
        --gpus 1 --out benchmarks/results/agentic/tsrun-h100 [--concurrency 1,2,4,8,16,32]
        [--duration 120] [--sessions-per-level N] [--pause 1.0] [--label tsrun]
    python -m benchmarks.agentic run   ... same as sweep, one --concurrency level
    python -m benchmarks.agentic plot a/summary.json b/summary.json -o pareto.png

`sweep`/`run` also take --tokenizer plus the workload options instead of --workload (the
workload is then built in memory and saved into the output folder). Not a server launcher.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import client as C
from . import plot as P
from . import sweep as S
from . import trajectories as T
from . import workload as W

_W = W.WorkloadConfig()
_C = C.ClientConfig(url="http://x")
_S = S.SweepConfig(out="-")


def _opt_int(v: str) -> int | None:
    return None if v.lower() in ("none", "0") else int(v)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--tokenizer", help="the served model's tokenizer: an HF folder (chat "
                                       "template used when present) or a tokenizer.json")
    g.add_argument("--trajectories", default=_W.trajectories, help="folder of .traj files")
    g.add_argument("--sessions", type=int, default=_W.sessions)
    g.add_argument("--first-turn-tokens", type=int, default=_W.first_turn_tokens)
    g.add_argument("--tool-output-scale", type=float, default=_W.tool_output_scale)
    g.add_argument("--max-tool-tokens", type=_opt_int, default=_W.max_tool_tokens,
                   help="cap per tool output (0/none: no cap)")
    g.add_argument("--max-reply-tokens", type=int, default=_W.max_reply_tokens,
                   help="cap on each turn's max_tokens (the trajectory's reply length)")
    g.add_argument("--max-turns", type=_opt_int, default=_W.max_turns)
    g.add_argument("--max-context-tokens", type=_opt_int, default=_W.max_context_tokens,
                   help="end a session before its context outgrows this (the server's "
                        "max model length)")
    g.add_argument("--seed", type=int, default=_W.seed)
    g.add_argument("--tool-format", choices=W.TOOL_FORMATS, default=_W.tool_format,
                   help="text: observations as user messages (the default, comparable with "
                        "earlier results); openai: the trajectory's commands as `tools`, its "
                        "replies as assistant tool_calls, observations as tool messages")


def workload_config(a: argparse.Namespace) -> W.WorkloadConfig:
    return W.WorkloadConfig(
        trajectories=a.trajectories, sessions=a.sessions, first_turn_tokens=a.first_turn_tokens,
        tool_output_scale=a.tool_output_scale, max_tool_tokens=a.max_tool_tokens,
        max_reply_tokens=a.max_reply_tokens, max_turns=a.max_turns,
        max_context_tokens=a.max_context_tokens, seed=a.seed, tool_format=a.tool_format)


def make_workload(a: argparse.Namespace) -> int:
    if not a.tokenizer:
        raise ValueError("make-workload needs --tokenizer (the served model's tokenizer)")
    cfg = workload_config(a)
    sessions = W.build(cfg, T.load_tokenizer(a.tokenizer))
    W.save(a.out, sessions, cfg, tokenizer=str(a.tokenizer))
    print(f"{a.out}: {W.describe(sessions)}")
    return 0


def bench(a: argparse.Namespace) -> int:
    levels = (a.concurrency,) if isinstance(a.concurrency, int) else \
        tuple(int(c) for c in a.concurrency.split(","))
    if a.workload:
        header, sessions = W.load(a.workload)
        info = {"path": str(a.workload), **header}
    elif a.tokenizer:
        cfg = workload_config(a)
        sessions = W.build(cfg, T.load_tokenizer(a.tokenizer))
        path = W.save(Path(a.out) / "workload.jsonl", sessions, cfg, str(a.tokenizer))
        info = {"path": str(path), "tokenizer": str(a.tokenizer),
                "config": dataclasses.asdict(cfg)}
    else:
        raise ValueError("pass --workload FILE (from make-workload) or --tokenizer to build one")
    ccfg = C.ClientConfig(url=a.url, model=a.model, pause=a.pause, duration=a.duration,
                          sessions=a.sessions_per_level, ignore_eos=not a.no_ignore_eos,
                          temperature=a.temperature, timeout=a.timeout, api_key=a.api_key,
                          progress=not a.no_progress)
    scfg = S.SweepConfig(out=a.out, levels=levels, gpus=a.gpus, label=a.label,
                         warmup_sessions=a.warmup_sessions, warmup_turns=a.warmup_turns)
    summary = S.run_sweep(ccfg, scfg, sessions, info)
    print(S.format_headline(summary))
    print(f"wrote {a.out}/requests.csv, summary.json, pareto.png")
    return 0


def plot(a: argparse.Namespace) -> int:
    P.pareto([P.load_summary(s) for s in a.summaries], a.out, title=a.title)
    print(f"wrote {a.out}")
    return 0


def add_bench_args(p: argparse.ArgumentParser, one_level: bool) -> None:
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", help="JSONL from make-workload")
    p.add_argument("--out", required=True, help="output folder")
    if one_level:
        p.add_argument("--concurrency", type=int, required=True)
    else:
        p.add_argument("--concurrency", default=",".join(map(str, _S.levels)),
                       help="comma-separated levels")
    p.add_argument("--gpus", type=int, default=_S.gpus, help="GPUs serving the model")
    p.add_argument("--label", help="curve name in the plot (default: the model id)")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--pause", type=float, default=_C.pause, help="seconds between turns")
    p.add_argument("--duration", type=float, default=_C.duration,
                   help="seconds per level after which no new turn starts")
    p.add_argument("--sessions-per-level", type=int, default=_C.sessions,
                   help="session instances per level (default: until --duration)")
    p.add_argument("--warmup-sessions", type=int, default=_S.warmup_sessions)
    p.add_argument("--warmup-turns", type=int, default=_S.warmup_turns)
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="for servers that reject ignore_eos (reply lengths then vary)")
    p.add_argument("--temperature", type=float, default=_C.temperature)
    p.add_argument("--timeout", type=float, default=_C.timeout, help="seconds per request")
    p.add_argument("--api-key")
    p.add_argument("--no-progress", action="store_true")
    add_workload_args(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agentic",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-workload", help="build sessions from the trajectories -> JSONL")
    m.add_argument("-o", "--out", required=True)
    add_workload_args(m)
    m.set_defaults(fn=make_workload)
    for name, one in (("sweep", False), ("run", True)):
        b = sub.add_parser(name, help="one concurrency level" if one else
                           "concurrency sweep against one server")
        add_bench_args(b, one)
        b.set_defaults(fn=bench)
    pl = sub.add_parser("plot", help="Pareto PNG from one or more summary.json")
    pl.add_argument("summaries", nargs="+")
    pl.add_argument("-o", "--out", required=True)
    pl.add_argument("--title")
    pl.set_defaults(fn=plot)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"benchmarks.agentic: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
