"""Per-rank loading (`runtime/shards.py`): every rank's local tensor equals the matching
slices of the single-device tensor, from a checkpoint (one file or an index over two) or from
dummy weights, reading only the rank's own bytes; errors name what is wrong."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tscompile.models.checkpoint import loadable_tensors, plan_pieces, resolve
from tscompile.plan import CheckpointPiece, ParamPlan
from tscompile.runtime import dummy_weights, load_model, shards
from tscompile.runtime.weights import Checkpoint

MODELS = {"llama": "tiny", "qwen3": "tiny-moe"}  # dense + fused gate_up; stacked experts


def choose(name: str, layout: str) -> tuple[int | None, int]:
    """(dim, chunks) by hand: 'tp' splits experts on their width, 'ep' on dim 0."""
    if "norm" in name or name.endswith("mlp.gate.weight"):
        return None, 1
    if "gate_up_proj" in name:
        return 0, 2
    if name.endswith("w13"):
        return (1, 2) if layout == "tp" else (0, 1)
    if name.endswith("w2"):
        return (2, 1) if layout == "tp" else (0, 1)
    if "o_proj" in name or "down_proj" in name:
        return 1, 1
    return 0, 1  # q/k/v, embeddings, lm_head


def save(folder, tensors: dict[str, torch.Tensor], files: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    if files == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, folder / "model.safetensors")
        return folder
    weight_map = {}
    for f in range(files):
        name = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        part = keys[f::files]
        save_file({k: tensors[k].contiguous() for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (full tensors, plan pieces, HF-named checkpoint tensors, folders by files)."""
    out = {}
    for family, preset in MODELS.items():
        model, _ = load_model(family, preset=preset, dummy_weights=True, seed=1)
        full = {k: v.detach().clone() for k, v in loadable_tensors(model).items()}
        pieces = resolve(model, type(model).CHECKPOINT_MAP)
        hf = {p.ckpt: full[p.param][p.index].clone() for p in pieces}
        root = tmp_path_factory.mktemp(family)
        folders = {n: save(root / f"files{n}", hf, n) for n in (1, 2)}
        # The inverted map is right: the single-device loader gets the same model back.
        again, _ = load_model(family, preset=preset, weights=folders[2])
        assert all(torch.equal(v, full[k]) for k, v in loadable_tensors(again).items())
        out[family] = (full, plan_pieces(pieces, {k: v.shape for k, v in full.items()}), hf,
                       folders)
    return out


def make_plans(full, pieces, layout: str) -> dict[str, ParamPlan]:
    plans = {}
    for name, t in full.items():
        dim, chunks = choose(name, layout)
        plans[name] = ParamPlan(name, tuple(t.shape), "float32", "param", dim, chunks,
                                pieces.get(name, ()))
    return plans


def expected(plan: ParamPlan, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if plan.dim is None:
        return full
    return torch.cat([full.narrow(plan.dim, a, b - a) for a, b in plan.ranges(rank, world)],
                     plan.dim)


class Recorder:
    """Wraps a safe_open handle: records every get_slice box, forbids whole-tensor reads."""

    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        raise AssertionError(f"whole tensor {key} read")

    def get_slice(self, key):
        inner, log = self.handle.get_slice(key), self.log

        class Slice:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, index):
                log.append((key, tuple((s.start, s.stop) for s in index)))
                return inner[index]
        return Slice()


def test_plan_pieces_regions(setups):
    _, pieces, _, _ = setups["qwen3"]
    assert pieces["layers.1.mlp.w13"][:2] == (
        CheckpointPiece("model.layers.1.mlp.experts.0.gate_proj.weight",
                        ((0, 1), (0, 32), (0, 64)), (0,)),
        CheckpointPiece("model.layers.1.mlp.experts.1.gate_proj.weight",
                        ((1, 2), (0, 32), (0, 64)), (0,)))
    assert pieces["layers.1.mlp.w13"][8].region == ((0, 1), (32, 64), (0, 64))
    assert [p.region for p in pieces["layers.0.mlp.gate_up_proj.weight"]] == [
        ((0, 128), (0, 64)), ((128, 256), (0, 64))]
    assert pieces["norm.weight"] == (CheckpointPiece("model.norm.weight", ((0, 64),)),)
    with pytest.raises(KeyError, match="no shape given for parameter embed_tokens.weight"):
        plan_pieces(resolve(*_model("qwen3")), {})


def _model(family):
    model, _ = load_model(family, preset=MODELS[family], dummy_weights=True)
    return model, type(model).CHECKPOINT_MAP


@pytest.mark.parametrize("files", [1, 2])
@pytest.mark.parametrize("layout", ["tp", "ep"])
@pytest.mark.parametrize("family", MODELS)
def test_rank_tensors_are_slices_and_read_only_their_bytes(setups, monkeypatch, family,
                                                          layout, files):
    full, pieces, _, folders = setups[family]
    plans = make_plans(full, pieces, layout)
    log: list = []
    real_open = Checkpoint._open
    monkeypatch.setattr(Checkpoint, "_open", lambda self, n: Recorder(real_open(self, n), log))
    by_key = {p.key: (plan, p) for plan in plans.values() for p in plan.pieces}
    for world in (1, 2, 4):
        for rank in range(world):
            log.clear()
            got = shards.load_rank_tensors(plans, rank, world, weights=folders[files],
                                           dtype=torch.float32, device="cpu")
            assert got.keys() == plans.keys()
            for name, plan in plans.items():
                assert got[name].shape == plan.local_shape(world), name
                assert torch.equal(got[name], expected(plan, full[name], rank, world)), \
                    (name, rank, world)
            # Bytes: every element read once in all (no over-read) ...
            read = sum(torch.Size([b - a for a, b in box]).numel() for _, box in log)
            assert read == sum(t.numel() for t in got.values())
            # ... and never a row of the sharded dim outside this rank's ranges.
            for key, box in log:
                plan, piece = by_key[key]
                if plan.dim is None or plan.dim in piece.squeeze:
                    continue
                cdim = plan.dim - sum(d < plan.dim for d in piece.squeeze)
                lo = piece.region[plan.dim][0] + box[cdim][0]
                hi = piece.region[plan.dim][0] + box[cdim][1]
                assert any(a <= lo and hi <= b for a, b in plan.ranges(rank, world)), \
                    (key, box, rank, world)
            # Expert parallel: a rank opens only its own experts' tensors.
            if layout == "ep" and family == "qwen3":
                experts = {int(k.split(".experts.")[1].split(".")[0])
                           for k, _ in log if ".experts." in k}
                assert experts == set(range(rank * 8 // world, (rank + 1) * 8 // world))


def test_dtype_device_and_skipped_kinds(setups):
    full, pieces, _, folders = setups["llama"]
    plans = make_plans(full, pieces, "tp")
    plans["cos_sin"] = ParamPlan("cos_sin", (8, 4), "float32", "derived")
    plans["kv"] = ParamPlan("kv", (2, 4, 4), "float32", "kv_cache", 0)
    got = shards.load_rank_tensors(plans, 1, 2, weights=folders[1], dtype=torch.bfloat16,
                                   device=torch.device("cpu"))
    assert "cos_sin" not in got and "kv" not in got
    name = "layers.0.mlp.gate_up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], expected(plans[name], full[name], 1, 2).bfloat16())


@pytest.mark.parametrize("layout", ["tp", "ep"])
@pytest.mark.parametrize("family", MODELS)
def test_dummy_ranks_equal_slices_of_init_dummy_weights(setups, monkeypatch, family, layout):
    model, _ = load_model(family, preset=MODELS[family], dummy_weights=True, seed=5)
    full = {k: v.detach() for k, v in loadable_tensors(model).items()}
    plans = make_plans(full, setups[family][1], layout)
    drawn: list = []
    real_slab = dummy_weights._slab
    monkeypatch.setattr(dummy_weights, "_slab", lambda n, s, seed, i: drawn.append((n, i))
                        or real_slab(n, s, seed, i))
    for world in (1, 2, 4):
        for rank in range(world):
            drawn.clear()
            got = shards.load_rank_tensors(plans, rank, world, dummy_seed=5,
                                           dtype=torch.float32, device="cpu")
            for name, plan in plans.items():
                assert torch.equal(got[name], expected(plan, full[name], rank, world)), \
                    (name, rank, world)
            for name, plan in plans.items():
                if plan.dim == 0 and len(plan.shape) >= 3:  # only this rank's slabs drawn
                    mine = [i for a, b in plan.ranges(rank, world) for i in range(a, b)]
                    assert [i for n, i in drawn if n == name] == mine
    if family == "qwen3":  # slabs come from different generators
        assert not torch.equal(full["layers.1.mlp.w13"][0], full["layers.1.mlp.w13"][1])


def test_errors_name_the_tensor(setups, tmp_path):
    full, pieces, hf, folders = setups["llama"]
    plans = make_plans(full, pieces, "tp")
    kw = dict(dtype=torch.float32, device="cpu")
    key = "model.layers.1.mlp.up_proj.weight"

    missing = save(tmp_path / "missing", {k: v for k, v in hf.items() if k != key})
    where = re.escape(str(missing))
    with pytest.raises(KeyError, match=rf"{where}.*'{key}'.*layers.1.mlp.gate_up_proj"):
        shards.load_rank_tensors(plans, 0, 2, weights=missing, **kw)

    wrong = save(tmp_path / "wrong", {**hf, key: torch.zeros(127, 64)})
    with pytest.raises(ValueError, match=rf"'{key}' has shape \[127, 64\].*expects \[128, 64\]"):
        shards.load_rank_tensors(plans, 0, 2, weights=wrong, **kw)

    with pytest.raises(ValueError, match=r"cannot shard embed_tokens.weight dim 0 \(size 256\) "
                                         r"into 3 ranks"):
        shards.load_rank_tensors(plans, 0, 3, weights=folders[1], **kw)

    name = "layers.0.mlp.gate_up_proj.weight"
    for bad, msg in (((), "has no checkpoint pieces"),
                     (pieces[name][:1], "write 4096 of the 8192 elements"),
                     (pieces[name][:1] * 2, "write the same elements")):
        broken = {**plans, name: ParamPlan(name, (256, 64), "float32", "param", 0, 2, bad)}
        with pytest.raises(ValueError, match=rf"{name}.*{msg}"):
            shards.load_rank_tensors(broken, 1, 2, weights=folders[1], **kw)

    with pytest.raises(ValueError, match="exactly one of"):
        shards.load_rank_tensors(plans, 0, 2, **kw)
    with pytest.raises(ValueError, match="rank 2 is outside a group of 2"):
        shards.load_rank_tensors(plans, 2, 2, dummy_seed=0, **kw)
