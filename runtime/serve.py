"""`tsrun`'s processes: one per tensor-parallel rank plus the API process.

    API process (this one): uvicorn + FastAPI, tokenizer, detokenizer, /metrics
        | AddRequest / Abort / Shutdown            ^ EngineReady, then StepOutputs
        v (multiprocessing queues)                 |
    rank 0: Engine (C++ scheduler, sampler) ----- broadcast of each step's inputs ----> ranks 1..N-1
                                                                           (follow_steps)
What it is: process launch, the engine rank's event loop (drain the request queue, step
while there is work, publish outputs and stats) and clean shutdown on SIGINT/SIGTERM.
What it is not: the HTTP layer (runtime/server/) or the step itself (runtime/engine.py).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tscompile.kernels import REGISTRY
from tscompile.runtime.distributed import free_port
from tscompile.runtime.engine import Engine, EngineConfig, RankFailure, forward_step
from tscompile.runtime.kv_cache import bind_rank, kv_blocks
from tscompile.runtime.program import RankProgram
from tscompile.runtime.protocol import (
    Abort, AddRequest, EngineReady, RequestOutput, Shutdown, StepOutputs,
)
from tscompile.runtime.step_io import (
    broadcast_step, control_group, follow_steps, set_control_group,
)
from tscompile.tsprog import read_tsprog

log = logging.getLogger("tsrun")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STATS_EVERY_S = 0.5


@dataclass(frozen=True, slots=True)
class ServeConfig:
    program: str
    weights: str | None = None
    dummy_weights: bool = False
    seed: int = 0                        # dummy weights
    tokenizer: str | None = None         # default: the --weights folder
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    threads_per_rank: int | None = None
    shutdown_grace_s: float = 10.0       # SIGTERM: in-flight requests' time to finish
    tool_call_parser: str | None = None  # a parsers.FAMILIES name, "none", or None: detect
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if (self.weights is None) == (not self.dummy_weights):
            raise ValueError("give exactly one of --weights DIR or --dummy-weights")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"--shutdown-grace must be >= 0, got {self.shutdown_grace_s}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.program).stem


def _rank_main(rank: int, world: int, port: int, cfg: ServeConfig, eos: tuple[int, ...],
               requests: Any, outputs: Any, parent: int) -> None:
    # Ctrl-C / `kill` of the process group reach every rank: only the API process acts on
    # them (it sends Shutdown); ranks exit on Shutdown, or when the parent is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threads = cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(message)s")
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)         # NCCL and Triton launch on the current device
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        if cfg.device == "cuda":      # step inputs travel in host memory: a gloo side group
            set_control_group(dist.new_group(backend="gloo"))
    try:
        dtype = _DTYPES[cfg.dtype]
        program = RankProgram(cfg.program, rank, weights=cfg.weights,
                              dummy_seed=cfg.seed if cfg.dummy_weights else None, dtype=dtype,
                              device=device)
        c = program.config
        max_len = cfg.engine.model_len(getattr(c, "max_position_embeddings", None))
        # The pool size first (every rank runs the profile step; rank 0's count wins), then
        # every rank binds its caches and captures its graphs (collectives inside) together.
        num_blocks = _share_pool_size(kv_blocks(cfg.engine, program, dtype, device, max_len))
        if rank == 0:
            engine = Engine(program, cfg.engine, vocab_size=c.vocab_size, eos_token_ids=eos,
                            max_position_embeddings=getattr(c, "max_position_embeddings", None),
                            dtype=dtype, device=device, num_blocks=num_blocks,
                            grammar=_grammar_compiler(cfg, c.vocab_size, eos))
            outputs.put(EngineReady(cfg.model_name, engine.max_model_len, c.vocab_size, eos,
                                    kernels=tuple(REGISTRY.selections().items()),
                                    decode_floor=engine.step_model is not None))
            _engine_loop(engine, requests, outputs, parent)
        else:
            graphs = bind_rank(program, cfg.engine, num_blocks, max_len, dtype, device)
            follow_steps(lambda step: forward_step(program, graphs, step, device))
    except RankFailure:
        # The other ranks may be blocked in the failed step's collectives, so neither the
        # STOP broadcast nor destroy_process_group() could complete: flush the error
        # outputs to the API and exit, which breaks the others' connections (they exit with
        # that error; the API process sees the engine gone and answers 503).
        log.critical("rank 0: a step failed at world %d; exiting", world)
        outputs.close()
        outputs.join_thread()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _grammar_compiler(cfg: ServeConfig, vocab_size: int, eos: tuple[int, ...]) -> Any:
    """The engine's grammar backend (structured outputs, forced tool calls), built from the
    tokenizer folder for the model's vocab and EOS ids; None (those requests then get an
    error output) when there is no tokenizer or xgrammar cannot take it."""
    tok_dir = cfg.tokenizer or cfg.weights
    if tok_dir is None or not (Path(tok_dir) / "tokenizer.json").is_file():
        return None
    try:
        from tscompile.runtime.grammar import GrammarCompiler
        from tscompile.tokenizer import Tokenizer

        return GrammarCompiler(Tokenizer(tok_dir), vocab_size=vocab_size, stop_token_ids=eos)
    except Exception:
        log.exception("no grammar backend: requests with a grammar will get an error")
        return None


def _share_pool_size(num_blocks: int) -> int:
    """Rank 0 decides the KV pool size (free memory differs per GPU); the others follow."""
    if not dist.is_initialized():
        return num_blocks
    t = torch.tensor([num_blocks], dtype=torch.int64)
    dist.broadcast(t, src=0, group=control_group())
    return int(t[0])


def _engine_loop(engine: Engine, requests: Any, outputs: Any, parent: int) -> None:
    last_stats = 0.0
    released = False
    try:
        while os.getppid() == parent:         # the API process died: stop too
            outs: list[RequestOutput] = []
            stop = False
            wait = None if engine.has_work else _STATS_EVERY_S
            while True:                       # drain everything that arrived
                try:
                    msg = requests.get(timeout=wait) if wait else requests.get_nowait()
                except queue.Empty:
                    break
                wait = None
                if isinstance(msg, AddRequest):
                    if (out := engine.add(msg)) is not None:
                        outs.append(out)
                elif isinstance(msg, Abort):
                    if (out := engine.abort(msg.rid, msg.reason)) is not None:
                        outs.append(out)
                elif isinstance(msg, Shutdown):
                    stop = True
            if stop:
                break
            if engine.has_work:
                try:
                    outs += engine.step()
                except RankFailure as e:      # fatal at world > 1: fail everything, exit
                    released = True           # the others may sit in a collective: no STOP
                    outs += e.outputs + engine.fail_all(str(e))
                    outputs.put(StepOutputs(tuple(outs), engine.stats()))
                    raise
            now = time.monotonic()
            if outs or now - last_stats > _STATS_EVERY_S:
                outputs.put(StepOutputs(tuple(outs), engine.stats()))
                last_stats = now
    finally:
        if not released:
            broadcast_step(None)              # release the other ranks


def _eos_ids(cfg: ServeConfig, tokenizer: Any, model_config: Any) -> tuple[int, ...]:
    if tokenizer is not None and tokenizer.eos_token_ids:
        return tuple(tokenizer.eos_token_ids)
    eos = getattr(model_config, "eos_token_id", None)
    return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def tool_call_family(cfg: ServeConfig, prog: Any, tokenizer: Any) -> str | None:
    """--tool-call-parser if given ("none": no tool calls), else the family of the
    checkpoint's model type (config.json's `model_type`, or the program's model file)."""
    from tscompile.runtime.server.parsers import FAMILIES, family_for, make_parser

    if cfg.tool_call_parser == "none":
        return None
    if cfg.tool_call_parser is not None:
        if cfg.tool_call_parser not in FAMILIES:
            raise ValueError(f"--tool-call-parser must be one of none, {', '.join(FAMILIES)}; "
                             f"got {cfg.tool_call_parser!r}")
        try:      # the tokenizer has the family's markup tokens
            make_parser(cfg.tool_call_parser, tokenizer, (), tools=True, reasoning=True)
        except ValueError as e:
            raise ValueError(f"--tool-call-parser {cfg.tool_call_parser}: {e}") from None
        return cfg.tool_call_parser
    config = Path(cfg.weights or "") / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if cfg.weights and \
        config.is_file() else prog.manifest["model"]["module"].rsplit(".", 1)[-1]
    return family_for(model_type, tokenizer)


def serve(cfg: ServeConfig) -> int:
    """Start the ranks and the API; block until SIGINT/SIGTERM; shut everything down."""
    import uvicorn

    from tscompile.runtime.program import model_config
    from tscompile.runtime.server.engine_client import EngineClient
    from tscompile.runtime.server.openai_api import create_app
    from tscompile.runtime.server.shutdown import DrainingServer
    from tscompile.tokenizer import Tokenizer

    prog = read_tsprog(cfg.program)
    tok_dir = cfg.tokenizer or cfg.weights
    if tok_dir is None or not (Path(tok_dir) / "tokenizer.json").is_file():
        raise ValueError("tsrun needs a tokenizer: tokenizer.json in --weights or --tokenizer")
    tokenizer = Tokenizer(tok_dir)
    eos = _eos_ids(cfg, tokenizer, model_config(prog))
    family = tool_call_family(cfg, prog, tokenizer)
    log.info("tool calls and reasoning: %s format", family or "no")
    world = prog.world_size
    ctx = mp.get_context("spawn")
    requests, outputs = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, name=f"tsrun-rank{r}",
                         args=(r, world, port, cfg, eos, requests, outputs, os.getpid()),
                         daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    client = EngineClient(requests, outputs, engine=procs[0])
    # SIGTERM means what Ctrl-C means (a clean shutdown through `finally` below, exit 0),
    # also while the engine loads and after the server has drained.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        ready = client.wait_ready(timeout=600)
        log.info("engine ready: %s, max_model_len %d, %d rank(s)", ready.model,
                 ready.max_model_len, world)
        app = create_app(client, tokenizer, model_name=ready.model,
                         max_model_len=ready.max_model_len, api_key=cfg.api_key,
                         tool_parser=family, decode_floor=ready.decode_floor)
        # The server's SIGINT/SIGTERM handlers drain it (shutdown.py) and it returns; it
        # then re-raises the signal, which KeyboardInterrupt carries through `finally`.
        DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"),
                       app.state.server, grace_s=cfg.shutdown_grace_s).run()
    finally:
        client.shutdown()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        signal.signal(signal.SIGTERM, previous_sigterm)
    return 0
