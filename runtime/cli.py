"""The `tsrun` command: serve a compiled `.tsprog` behind an OpenAI-compatible API.

    tsrun prog.tsprog --weights DIR [--port 8000]        # ranks = the program's world size
    tsrun prog.tsprog --dummy-weights --tokenizer DIR    # deterministic random weights

Defaults come from the dataclasses they configure (`EngineConfig`, `ServeConfig`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from tscompile.runtime.engine import EngineConfig
from tscompile.runtime.serve import ServeConfig
from tscompile.runtime.step_model import StepTimeModel

_E = EngineConfig()
_S = ServeConfig(program="-", dummy_weights=True)


def _step_model(path: str) -> StepTimeModel:
    try:
        return StepTimeModel.load(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _token_buckets(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts or 'none', got {text!r}") from None


def parse(argv: list[str] | None = None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="tsrun", description=__doc__.split("\n")[0])
    p.add_argument("program", help="a .tsprog built by `tscompile build`")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="Hugging Face checkpoint folder (safetensors)")
    w.add_argument("--dummy-weights", action="store_true", help="deterministic random weights")
    p.add_argument("--seed", type=int, default=_S.seed, help="seed of --dummy-weights")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: --weights)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=_S.device)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=_S.dtype)
    p.add_argument("--host", default=_S.host, help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=_S.port)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", help="the model id clients send (default: "
                                               "the program's file name)")
    p.add_argument("--max-num-seqs", type=int, default=_E.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=_E.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=_E.max_model_len)
    p.add_argument("--max-tokens-with-decodes", type=int, default=_E.max_tokens_with_decodes,
                   help="token budget of a step that carries decodes (default: "
                        "--max-num-batched-tokens): smaller bounds the decoders' inter-token "
                        "time while long prompts prefill, at the prompts' expense")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=int, default=_E.kv_cache_tokens)
    kv.add_argument("--kv-memory-fraction", type=float, default=_E.kv_memory_fraction,
                    help="CUDA: fraction of the memory left free by the weights and the "
                         "profiled largest step that the KV pool takes (default 0.9)")
    p.add_argument("--page-size", type=int, default=_E.page_size)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default=_E.kv_cache_dtype,
                   help="auto: the model's dtype; fp8: e4m3 with scale 1, saturated (half "
                        "the KV bytes of bf16: twice the tokens in the pool)")
    p.add_argument("--session-ttl", type=float, default=_E.session_ttl,
                   help="seconds a finished session's prefix stays pinned in the KV cache")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly instead of replaying CUDA graphs")
    p.add_argument("--max-graph-batch", type=int, default=_E.max_graph_batch,
                   help="largest decode batch captured in a CUDA graph (default: "
                        "--max-num-seqs); larger decode batches run eagerly")
    p.add_argument("--graph-prefill-buckets", type=_token_buckets,
                   default=_E.graph_prefill_tokens, metavar="N,N,...|none",
                   help="prefill token counts of the captured mixed (decodes + chunks) and "
                        "prefill step graphs (default: powers of two from 16 up to "
                        "min(--max-num-batched-tokens, 4096)); 'none': decode graphs only")
    p.add_argument("--decode-floor-tps", type=float, default=_E.decode_floor_tps,
                   metavar="TPS",
                   help="decode speed every decoding request keeps (tokens/s): each step's "
                        "prefill tokens are sized from a step-time model (profiled at "
                        "start-up unless --step-time-model) so the step meets 1/TPS; 0: no "
                        "floor. A request's x-decode-floor header sets its own")
    p.add_argument("--step-time-model", type=_step_model, metavar="FILE.json",
                   help="the step-time model (JSON: base, per_decode, per_kv_token, "
                        "prefill_base, per_prefill_token, per_prefill_attn, in seconds) "
                        "instead of the start-up profile; also enables x-decode-floor")
    p.add_argument("--profile-step-time", action="store_true",
                   help="profile the step-time model at start-up even without "
                        "--decode-floor-tps, so requests' x-decode-floor headers are honoured")
    p.add_argument("--speculative", choices=("suffix", "ngram"), default=_E.speculative,
                   help="speculative decoding with a model-free drafter: suffix (suffix "
                        "automaton over the request, its session and recent outputs) or ngram "
                        "(prompt lookup); requests with a grammar or penalties do not "
                        "speculate (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=_E.num_speculative_tokens,
                   metavar="K", help="draft tokens per verify step, at most (each request's "
                                     "draft length adapts to its acceptance, down to 0)")
    p.add_argument("--no-spec-adaptive", action="store_true",
                   help="always draft K tokens when the drafter has them (no per-request "
                        "adaptation)")
    p.add_argument("--threads-per-rank", type=int, help="CPU threads per rank process")
    p.add_argument("--shutdown-grace", type=float, default=_S.shutdown_grace_s,
                   help="seconds in-flight requests get to finish after SIGTERM (a second "
                        "SIGTERM ends them at once, each with an error)")
    p.add_argument("--tool-call-parser", default=_S.tool_call_parser,
                   help="the model family whose tool-call and reasoning format tsrun parses "
                        "(kimi_k2, deepseek_v3, deepseek_v31, qwen3, qwen3_coder, llama3_json, "
                        "or none; default: from the checkpoint's model type)")
    a = p.parse_args(argv)
    engine = EngineConfig(
        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len, max_tokens_with_decodes=a.max_tokens_with_decodes,
        page_size=a.page_size,
        kv_cache_tokens=a.kv_cache_tokens, kv_memory_fraction=a.kv_memory_fraction,
        session_ttl=a.session_ttl, enable_prefix_caching=not a.no_prefix_caching,
        kv_cache_dtype=a.kv_cache_dtype, enforce_eager=a.enforce_eager,
        max_graph_batch=a.max_graph_batch, graph_prefill_tokens=a.graph_prefill_buckets,
        decode_floor_tps=a.decode_floor_tps, step_time_model=a.step_time_model,
        profile_step_time=a.profile_step_time, speculative=a.speculative,
        num_speculative_tokens=a.num_speculative_tokens,
        spec_adaptive=not a.no_spec_adaptive)
    return ServeConfig(program=a.program, weights=a.weights, dummy_weights=a.dummy_weights,
                       seed=a.seed, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype,
                       host=a.host, port=a.port, api_key=a.api_key,
                       served_model_name=a.served_model_name,
                       threads_per_rank=a.threads_per_rank,
                       shutdown_grace_s=a.shutdown_grace,
                       tool_call_parser=a.tool_call_parser, engine=engine)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tsrun %(message)s")
    try:
        cfg = parse(argv)
        from tscompile.runtime.serve import serve
        return serve(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"tsrun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
