"""Agentic serving benchmark: replay coding-agent sessions against an OpenAI-compatible
server and report output tokens per GPU-minute at a per-user decode floor (issue 5).

What it is, one file per step:

    trajectories.py  real SWE-agent conversations -> per-turn shape; tokenizer; filler corpus
    tools.py         a trajectory's commands -> OpenAI tools; each reply -> its tool call
    workload.py      sessions scaled to a first-turn size (default 50K tokens) -> JSONL
                     (--tool-format openai: tools, tool_calls and tool messages)
    client.py        asyncio/httpx streaming sessions, `concurrency` at a time -> records
    metrics.py       records -> per-level TPS/user, TTFT, ITL, output and prompt TPM/GPU
                     (cached / uncached apart), headline at 70 and 200 TPS/user; CSV I/O
    ceiling.py       the roofline ceiling of output TPM/GPU at each TPS/user floor for the
                     workload, model and card, and the fraction of it measured (issue 15)
    plot.py          Pareto PNG: TPS/user against output TPM/GPU, one curve per label,
                     its ceiling dashed beside it
    sweep.py         warm-up + levels 1..32 against one URL -> requests.csv, summary.json,
                     pareto.png with metadata
    __main__.py      `python -m benchmarks.agentic {make-workload,sweep,run,plot,
                     ceiling,roofs}`

What it is not: a server launcher or an engine-specific client; the same command measures
tsrun and any other OpenAI-compatible engine (`ignore_eos` is the vLLM extension tsrun
shares, off with --no-ignore-eos; other servers ignore tsrun's `x-session-id` header).
"""
