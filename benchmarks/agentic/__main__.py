"""Command line of the agentic serving benchmark (defaults come from the config dataclasses).

    python -m benchmarks.agentic make-workload --tokenizer MODEL_DIR -o wl.jsonl [--sessions 32]
        [--first-turn-tokens 50000] [--max-turns N] [--max-reply-tokens 2048] [--seed 0]
        [--tool-format text|openai]
    python -m benchmarks.agentic sweep --url http://127.0.0.1:8000 --workload wl.jsonl
        --gpus 1 --out benchmarks/results/agentic/tsrun-h100 [--concurrency 1,2,4,8,16,32]
        [--duration 120] [--sessions-per-level N] [--pause 1.0] [--label tsrun]
    python -m benchmarks.agentic run   ... same as sweep, one --concurrency level
    python -m benchmarks.agentic plot a/summary.json b/summary.json -o pareto.png
    python -m benchmarks.agentic ceiling --preset qwen3-8b --workload wl.jsonl
        (--bw 4.3e12 --flops 7.9e14 | --roofs roofs.json | --measure-roofs)
        [--kv-pool-tokens N | --gpu-memory-gib 139] [--gpus 1] [--summary S.json]
        [--json OUT.json] [--plot OUT.png]
    python -m benchmarks.agentic roofs -o roofs.json        # on the GPU, before the server

`sweep`/`run` also take --tokenizer plus the workload options instead of --workload (the
workload is then built in memory and saved into the output folder), and the ceiling's
model and roofs (--ceiling-preset/--ceiling-program, --roofs/--measure-roofs/--bw --flops)
to add the "ceiling" block to summary.json. Not a server launcher.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import ceiling as CE
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
    summary = S.run_sweep(ccfg, scfg, sessions, info, ceiling_spec(a, "ceiling_"))
    print(S.format_headline(summary))
    print(f"wrote {a.out}/requests.csv, summary.json, pareto.png")
    return 0


def add_roofs_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ceiling: the card (roofs measured in the same run, or given)")
    g.add_argument("--roofs", help="JSON from `python -m benchmarks.agentic roofs` (or a kernel "
                                   "harness / decode_step result with its 'roofs')")
    g.add_argument("--measure-roofs", action="store_true",
                   help="measure them here (benchmarks.kernels.harness.roofs; CUDA)")
    g.add_argument("--bw", type=float, help="copy bandwidth, bytes/s (e.g. 4.3e12)")
    g.add_argument("--flops", type=float, help="matmul roof, FLOP/s (e.g. 7.9e14)")
    g.add_argument("--kv-pool-tokens", type=float,
                   help="the server's KV pool in tokens (default: GPU memory - weights)")
    g.add_argument("--gpu-memory-gib", type=float,
                   help="one GPU's memory (default: the measured card's; none: no memory bound)")
    g.add_argument("--param-bytes", type=int, default=2, help="bytes per weight and per KV "
                                                              "element (2: bf16)")


def add_model_args(p: argparse.ArgumentParser, prefix: str) -> None:
    g = p.add_argument_group("ceiling: the model")
    g.add_argument(f"--{prefix}preset", help="a model preset (e.g. qwen3-8b)")
    g.add_argument(f"--{prefix}model-file", help="the model file of the preset (default: the "
                                                 "built-in file that has it)")
    g.add_argument(f"--{prefix}program", help="a .tsprog (its model and config)")


def get_roofs(a: argparse.Namespace) -> CE.Roofs | None:
    given = [bool(a.roofs), a.measure_roofs, a.bw is not None or a.flops is not None]
    if sum(given) > 1:
        raise ValueError("give one of --roofs, --measure-roofs, or --bw with --flops")
    if a.roofs:
        return CE.load_roofs(a.roofs)
    if a.measure_roofs:
        return CE.measure_roofs()
    if a.bw is not None or a.flops is not None:
        if a.bw is None or a.flops is None:
            raise ValueError("--bw and --flops go together")
        return CE.Roofs(a.bw, a.flops, "given on the command line")
    return None


def ceiling_spec(a: argparse.Namespace, prefix: str) -> S.CeilingSpec | None:
    preset, mfile, prog = (getattr(a, f"{prefix}{k}") for k in ("preset", "model_file",
                                                                  "program"))
    roofs = get_roofs(a)
    if preset is None and prog is None:
        if roofs is not None:
            raise ValueError(f"roofs given but no model for the ceiling: pass "
                             f"--{prefix.replace('_', '-')}preset or "
                             f"--{prefix.replace('_', '-')}program")
        return None
    if preset is not None and prog is not None:
        raise ValueError("give a preset or a program for the ceiling, not both")
    if roofs is None:
        raise ValueError("the ceiling needs the card's roofs: --roofs FILE, --measure-roofs, "
                         "or --bw and --flops")
    stats = CE.model_stats(preset, mfile, prog, a.param_bytes, a.param_bytes)
    mem = a.gpu_memory_gib * 2**30 if a.gpu_memory_gib is not None else None
    return S.CeilingSpec(stats, roofs, a.kv_pool_tokens, mem)


def ceiling(a: argparse.Namespace) -> int:
    spec = ceiling_spec(a, "")
    if spec is None:
        raise ValueError("pass the model: --preset NAME or --program X.tsprog")
    summary = P.load_summary(a.summary) if a.summary else None
    floors = tuple(float(f) for f in a.floors.split(",")) if a.floors else (
        tuple(float(k) for k in summary["headline"]) if summary else CE.FLOORS)
    gpus = a.gpus or (summary or {}).get("metadata", {}).get("gpus") or 1
    work = CE.workload_file_stats(a.workload)
    b = CE.block(spec.model, work, spec.roofs, gpus=gpus, kv_pool_tokens=spec.kv_pool_tokens,
                 gpu_memory_bytes=spec.gpu_memory_bytes, floors=floors,
                 levels=(summary or {}).get("levels"), headline=(summary or {}).get("headline"))
    run = b["inputs"]["from_run"]
    print(f"{spec.model.name} ({spec.model.source}); {work.source}: ctx {work.ctx:.0f}, "
          f"uncached/output {work.uncached_per_output:.2f}, prefix {work.prefix_mean:.0f}; "
          f"BW {run['copy_Bps'] / 1e12:.2f} TB/s, {run['matmul_flops'] / 1e12:.0f} TFLOP/s, "
          f"pool {run['kv_pool_tokens'] or 0:.0f} tokens, gpus {gpus}")
    print(CE.format_table(b, floors_only=not a.all))
    if summary is None:
        print("(no --summary: fractions need a measured run)")
    if a.json:
        out = {**summary, "ceiling": b} if summary else b
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.plot:
        P.pareto([{**summary, "ceiling": b} if summary else
                  {"metadata": {"label": spec.model.name, "gpus": gpus}, "levels": [],
                   "ceiling": b}], a.plot, floors)
        print(f"wrote {a.plot}")
    return 0


def roofs(a: argparse.Namespace) -> int:
    r = CE.measure_roofs()
    Path(a.out).write_text(json.dumps(CE.roofs_to_json(r), indent=2) + "\n")
    print(f"{r.device}: copy {r.bw / 1e9:.0f} GB/s, matmul {r.flops / 1e12:.0f} TFLOP/s; "
          f"wrote {a.out}")
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
    add_model_args(p, "ceiling-")
    add_roofs_args(p)


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
    ce = sub.add_parser("ceiling", help="roofline ceiling of output TPM/GPU at TPS/user floors "
                                        "(a table; with --summary, the fractions measured)")
    add_model_args(ce, "")
    ce.add_argument("--workload", required=True, help="the JSONL the sweep replays")
    ce.add_argument("--summary", help="a sweep's summary.json: fractions of the ceiling")
    ce.add_argument("--gpus", type=int, help="GPUs of one model copy (default: the summary's, "
                                             "else 1)")
    ce.add_argument("--floors", help="comma-separated TPS/user floors (default: the "
                                     "summary's, else 70,200)")
    ce.add_argument("--all", action="store_true", help="print the whole curve, not only the "
                                                      "floors")
    ce.add_argument("--json", help="write the block (with --summary: the summary with it)")
    ce.add_argument("--plot", help="write the Pareto PNG with the ceiling")
    add_roofs_args(ce)
    ce.set_defaults(fn=ceiling)
    ro = sub.add_parser("roofs", help="measure the card's copy and matmul roofs (CUDA) -> JSON")
    ro.add_argument("-o", "--out", required=True)
    ro.set_defaults(fn=roofs)
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
