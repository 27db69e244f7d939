"""Issue 17, items 1 and 2: architectures with biases where their checkpoints put them, and
errors that point at the cause.

* GPT-NeoX-, GPT-2- and Phi-3-style files (test-only model files beside this one, plain
  torch + two @placement lines) compile at tp 2 and 4 and match the single-device run
  within 1e-4 over a prefill step, a mixed step and 8 decode steps (gloo CPU ranks, one
  launch per world size); GPT-NeoX's single-device file matches transformers'
  `GPTNeoXForCausalLM` (random biases and LayerNorm parameters, so they count), and so does
  its compiled program, position by position.
* A row-parallel linear keeps its bias whole and adds it on rank 0 (`rank0` R -> P right
  before it), so the one all-reduce per partial sum is unchanged and the all-reduce + add +
  RMSNorm fusion still fires (Phi-3 with and without biases fuses alike); any P + R
  (`add`, `sub`) does the same.
* Each error names the op (fx node, module path), the parameter, the reason and a hint that
  works (the hint applied compiles); a region left with nothing sharded warns.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.passes.propagate import PlacementError
from tscompile.runtime import load_model
from tscompile.runtime.distributed import StepsJob, run_steps
from tscompile.runtime.offline import PagedRunner

from ..models.parity import check_parity
from . import toys

HERE = Path(__file__).parent
NEOX, GPT2, PHI3 = (str(HERE / f"{n}_style.py") for n in ("gpt_neox", "gpt2", "phi3"))
ATOL = 1e-4
SEED = 7

# P + R inside an annotated module: a replicated parameter added to the row-parallel
# output, and the module's replicated input subtracted from it; both counted on rank 0.
MIXED_ADD = toys.source('''
@placement(inputs=Replicate(), outputs=Partial())
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        self.shift = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.shift - x
''', "self.mlp = Mlp()", "x = x + self.mlp(x)")


def mlp(forward: str, annotation: str = "inputs=Replicate(), outputs=Partial()",
        body: str = "x = x + self.mlp(x)") -> str:
    """The toys' MLP (up column parallel, down row parallel, both biased) with another
    forward or annotation."""
    return toys.source(f'''
@placement({annotation})
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return {forward}
''', "self.mlp = Mlp()", body)


DOWN = "self.down(torch.relu(self.up(x)))"


# ---- transformers' GPT-NeoX on tiny random weights ------------------------------------

@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_act="gelu", max_position_embeddings=256,
        layer_norm_eps=1e-5, use_parallel_residual=True, attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25})
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():                # HF starts biases at 0 and norms at 1: vary them
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1) if name.endswith("bias") else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("neox")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("page_size", [4, 16])
def test_gpt_neox_style_matches_transformers(neox, page_size):
    model, path = neox
    prompt = torch.randint(0, 128, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    check_parity(model, path, NEOX, prompt, page_size=page_size, steps=9)   # prefill + 8


# ---- compiled at tp 2 and 4 against the single-device run ------------------------------

def feeds(vocab: int) -> list[list[tuple[int, list[int]]]]:
    """Two sequences: prefills across a page boundary (page 4), a mixed step (one decode +
    one 5-token prefill chunk), then 8 decode steps (tests/runtime/test_tp_parity.py)."""
    ids = [(7 * i + 3) % vocab for i in range(40)]
    steps = [[(0, ids[:13]), (1, ids[13:19])], [(0, [ids[19]]), (1, ids[20:25])]]
    return steps + [[(0, [ids[25 + i]]), (1, [ids[33 - i]])] for i in range(8)]


HF_IDS = [(5 * i + 1) % 128 for i in range(21)]      # one sequence: 13-token prefill + 8
HF_FEEDS = [[(0, HF_IDS[:13])]] + [[(0, [t])] for t in HF_IDS[13:]]

# case -> (model file, preset or None for the GPT-NeoX checkpoint)
MODELS = {"gpt_neox": (NEOX, None), "gpt2": (GPT2, "tiny"), "phi3": (PHI3, "tiny"),
          "phi3-bias": (PHI3, "tiny-bias")}
TOYS = {"mixed_add": MIXED_ADD}


def _eager(model: str, preset: str | None, weights, steps) -> list[torch.Tensor]:
    kw = {"weights": weights} if preset is None else {"preset": preset, "dummy_weights": True,
                                                      "seed": SEED}
    net, _ = load_model(model, **kw)
    runner = PagedRunner(net, page_size=4, num_blocks=64)
    for _ in sorted({sid for step in steps for sid, _ in step}):
        runner.add()
    return [runner.step(s, all_logits=True) for s in steps]


@pytest.fixture(scope="module")
def results(neox, tmp_path_factory):
    """world -> {case: worst max-abs logit difference from its oracle}; one launch each."""
    cache: dict[int, dict[str, float]] = {}
    hf_model, ckpt = neox

    def get(world: int) -> dict[str, float]:
        if world in cache:
            return cache[world]
        root = tmp_path_factory.mktemp(f"bias_w{world}")
        jobs, refs = {}, {}
        for case, (model, preset) in MODELS.items():
            kw = {"config": ckpt} if preset is None else {"preset": preset}
            prog = str(build(model, mesh=Mesh.build(world), **kw).save(root / f"{case}.tsprog"))
            steps = feeds(128)
            jobs[case] = StepsJob(prog, steps, weights=None if preset else str(ckpt),
                                  dummy_seed=SEED if preset else None)
            refs[case] = _eager(model, preset, ckpt, steps)
            if preset is None:          # and against transformers itself, position by position
                jobs["gpt_neox_hf"] = StepsJob(prog, HF_FEEDS, weights=str(ckpt))
                with torch.no_grad():
                    hf = hf_model(torch.tensor([HF_IDS])).logits[0].float()
                refs["gpt_neox_hf"] = [hf[:13]] + [hf[13 + i:14 + i] for i in range(8)]
        for case, text in TOYS.items():
            prog = toys.compile_toy(root, case, text, world).save(root / f"{case}.tsprog")
            jobs[case] = StepsJob(str(prog), [[(0, toys.TOKENS)]], dummy_seed=toys.SEED,
                                  num_blocks=8)
            refs[case] = [toys._eager(str(root / f"{case}.py"))]
        got = run_steps(list(jobs.values()))
        cache[world] = {case: max(float((a - b).abs().max()) for a, b in zip(refs[case], out))
                        for case, out in zip(jobs, got)}
        return cache[world]
    return get


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [*MODELS, "gpt_neox_hf"])
def test_compiled_matches_single_device(results, case, world):
    worst = results(world)[case]
    assert worst < ATOL, f"{case} at tp {world}: logits differ by {worst}"


@pytest.mark.parametrize("world", [2, 4])
def test_partial_plus_replicate_matches_single_device(results, world):
    assert results(world)["mixed_add"] < toys.ATOL


# ---- structure: where the bias goes, what is sharded, what fuses ---------------------

def _schedule(built) -> dict[str, list[str]]:
    return {k: [e.split(" @ ")[0] for e in v]
            for k, v in built.manifest["collectives_per_layer"].items()}


@pytest.mark.parametrize("world", [2, 4])
def test_gpt_neox_biases_stay_out_of_the_partial_sums(world):
    built = build(NEOX, preset="tiny", mesh=Mesh.build(world))
    plan = {k: v["placement"] for k, v in built.manifest["tensors"].items()}
    layer = "gpt_neox.layers.0."
    assert {k[len(layer):]: v for k, v in plan.items() if k.startswith(layer) and
            "layernorm" not in k} == {
        "attention.query_key_value.weight": "S(0)", "attention.query_key_value.bias": "S(0)",
        "attention.dense.weight": "S(1)", "attention.dense.bias": "R",
        "attention.cos": "R", "attention.sin": "R", "attention.kv_cache": "S(3)",
        "mlp.dense_h_to_4h.weight": "S(0)", "mlp.dense_h_to_4h.bias": "S(0)",
        "mlp.dense_4h_to_h.weight": "S(1)", "mlp.dense_4h_to_h.bias": "R"}
    # Per layer: both output biases masked to rank 0, then one all-reduce of the parallel
    # residual's (attention + MLP) partial sum, fused with the residual add and the next
    # layer's input LayerNorm (the last layer's meets the logits index instead).
    assert _schedule(built) == {
        "0": ["rank0 R->P", "rank0 R->P", "all_reduce_add_layer_norm P->R"],
        "1": ["rank0 R->P", "rank0 R->P", "all_reduce P->R"]}
    assert built.manifest["warnings"] == []
    program = built.files["program.py"]
    assert 'dense_bias_rank0 = t["gpt_neox.layers.0.attention.dense.bias"] * on_rank0' \
        in program
    assert program.count("on_rank0 = operator.eq(rank, 0)") == 1


@pytest.mark.parametrize("world", [2, 4])
def test_fused_qkv_splits_as_three_chunks(world):
    for model, weight, bias in ((GPT2, "transformer.h.0.attn.c_attn.weight", "S(0)x3"),
                                (PHI3, "layers.0.self_attn.qkv_proj.weight", None)):
        plan = build(model, preset="tiny", mesh=Mesh.build(world)).manifest["tensors"]
        assert plan[weight]["placement"] == ("S(1)x3" if model == GPT2 else "S(0)x3")
        if bias:
            assert plan[weight.replace("weight", "bias")]["placement"] == bias


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_add_layer_norm_fuses_gpt2_layer_norms(world):
    """GPT-2's sequential residual: every all-reduce but the last meets `x + a` and an
    nn.LayerNorm (weight and bias) over the hidden dim, and becomes one fused op; the
    program calls it with the norm's own parameters (parity: test_compiled_matches_...)."""
    built = build(GPT2, preset="tiny", mesh=Mesh.build(world))
    assert built.manifest["fused_all_reduce_norm"] == 3
    kinds = [c["kind"] for c in built.manifest["schedule"] if c["kind"] != "rank0"]
    assert kinds == ["all_reduce_add_layer_norm"] * 3 + ["all_reduce"]
    program = built.files["program.py"]
    assert program.count("ops.all_reduce_add_layer_norm(") == 3
    assert 't["transformer.h.1.ln_1.bias"]' in program.split("all_reduce_add_layer_norm(")[2]


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_add_rms_norm_still_fuses_with_biases(world):
    plain, biased = (build(PHI3, preset=p, mesh=Mesh.build(world)).manifest
                     for p in ("tiny", "tiny-bias"))
    # 2 layers: attention -> post norm, MLP -> next layer's input norm, attention -> post
    # norm; the last MLP's all-reduce meets the logits index, not a norm.
    assert plain["fused_all_reduce_norm"] == biased["fused_all_reduce_norm"] == 3
    kinds = [c["kind"] for c in biased["schedule"]]
    assert [k for k in kinds if k != "rank0"] == [c["kind"] for c in plain["schedule"]]
    assert kinds.count("rank0") == 4               # o_proj and down_proj biases, 2 layers


# ---- errors and the warning ------------------------------------------------------------

def _error(tmp_path, text: str, world: int = 2) -> str:
    with pytest.raises(PlacementError) as e:
        toys.compile_toy(tmp_path, "toy", text, world)
    return str(e.value)


def test_bias_pinned_replicate_compiles(tmp_path):
    """The old error's hint, pinning the bias R, was no help; now R is what it takes."""
    text = mlp(DOWN, 'inputs=Replicate(), outputs=Partial(), params={"down.bias": Replicate()}')
    built = toys.compile_toy(tmp_path, "toy", text, 2)
    assert built.manifest["tensors"]["mlp.down.bias"]["placement"] == "R"
    assert [c["kind"] for c in built.manifest["schedule"]] == ["rank0", "all_reduce"]


def test_bias_pinned_partial_names_the_parameter(tmp_path):
    msg = _error(tmp_path, mlp(DOWN, 'inputs=Replicate(), outputs=Partial(), '
                                     'params={"down.bias": Partial()}'))
    for part in ("parameter mlp.down.bias is pinned Partial() in mlp",
                 "never as per-rank summands", "hint: pin it Replicate() or drop the pin"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("world", [2, 4])
def test_bias_pinned_shard_on_a_partial_output(tmp_path, world):
    msg = _error(tmp_path, mlp(DOWN, 'inputs=Replicate(), outputs=Partial(), '
                                     'params={"down.bias": Shard(0)}'), world)
    for part in (f"cannot split mlp over group dense ({world} ranks)",
                 "linear (linear_1) in mlp.down", "mlp.down.bias",
                 "bias on a Partial output", "hint: pin mlp.down.bias Replicate() or drop the pin"):
        assert part in msg, (part, msg)


def test_nonlinear_op_on_a_partial_sum(tmp_path):
    msg = _error(tmp_path, mlp(f"torch.relu({DOWN})"))
    for part in ("relu (relu_1) in mlp", "cannot take a partial sum (P)",
                 "made by linear (linear_1) in mlp.down from mlp.down.weight S(1)",
                 "hint: move relu out of mlp, after its output"):
        assert part in msg, (part, msg)
    # The hint works: the same relu after the module compiles (on the reduced value).
    fixed = mlp(DOWN, body="x = x + torch.relu(self.mlp(x))")
    built = toys.compile_toy(tmp_path, "fixed", fixed, 2)
    assert [c["kind"] for c in built.manifest["schedule"]][0] == "rank0"


def test_constant_added_to_a_partial_sum(tmp_path):
    """x + 1.0 on a partial sum would add 1.0 once per rank: refused, not miscompiled."""
    msg = _error(tmp_path, mlp(f"{DOWN} + 1.0"))
    for part in ("add (add) in mlp", "cannot take a partial sum (P)",
                 "adding the constant 1.0 to a partial sum (P) would add it once per rank",
                 "hint: move add out of mlp"):
        assert part in msg, (part, msg)


def test_pinned_weight_that_forces_communication(tmp_path):
    msg = _error(tmp_path, mlp(DOWN, 'inputs=Replicate(), outputs=Partial(), '
                                     'params={"down.weight": Shard(0)}'))
    for part in ("linear (linear_1) in mlp.down", "parameter mlp.down.weight is pinned S(0) "
                 "in mlp", "hint: pin mlp.down.weight Shard(1) or drop the pin"):
        assert part in msg, (part, msg)


def test_region_with_nothing_sharded_warns(tmp_path, caplog):
    text = mlp(DOWN, "inputs=Replicate(), outputs=Replicate()")
    with caplog.at_level(logging.WARNING, logger="tscompile.passes.propagate"):
        built = toys.compile_toy(tmp_path, "toy", text, 2)
    assert built.manifest["schedule"] == []
    [msg] = built.manifest["warnings"]
    for part in ("annotated module mlp (group dense, 2 ranks) has nothing sharded",
                 "every parameter and value is replicated", "outputs=Partial()"):
        assert part in msg, (part, msg)
    assert [r.getMessage() for r in caplog.records] == [msg]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tscompile.passes.propagate"):
        assert toys.compile_toy(tmp_path, "tp1", text, 1).manifest["warnings"] == []
        assert toys.compile_toy(tmp_path, "ok", mlp(DOWN), 2).manifest["warnings"] == []
    assert caplog.records == []


def test_rank0_mask_exports_as_standard_onnx(tmp_path):
    """`rank == 0` becomes Equal on the rank input, cast for the bias's Mul; no fallback."""
    from tscompile.onnx import to_onnx

    prog = build(PHI3, preset="tiny-bias", mesh=Mesh.build(2)).save(tmp_path / "p.tsprog")
    exported = to_onnx(prog, rank=1)
    assert exported.num_fallbacks == 0, exported.fallbacks
    ops = {n.output[0]: n for n in exported.model.graph.node}
    assert ops["on_rank0"].op_type == "Equal" and ops["on_rank0"].input[0] == "rank"
    mask = ops["o_proj_bias_rank0"]
    assert mask.op_type == "Mul" and ops[mask.input[1]].op_type == "Cast"
