"""`tscompile export --onnx`: the per-rank graph as an ONNX model (tscompile/onnx/)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from tscompile.annotations import Mesh  # noqa: E402
from tscompile.build import build  # noqa: E402
from tscompile.onnx import (COLLECTIVES, DOMAIN, FALLBACK_DOMAIN, export_onnx,  # noqa: E402
                            to_onnx)
from tscompile.tsprog import Tsprog, read_tsprog  # noqa: E402

CONFIGS = {
    "llama": ("llama", "tiny", lambda: Mesh.build(2), "gqa_attention"),
    "qwen3_moe": ("qwen3", "tiny-moe", lambda: Mesh.build(2, moe_ep=2), "gqa_attention"),
    "kimi_k25": ("kimi_k25", "tiny", lambda: Mesh.build(4), "mla_attention"),
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("progs")
    out = {}
    for key, (model, preset, mesh, _) in CONFIGS.items():
        out[key] = build(model, preset=preset, mesh=mesh()).save(root / f"{key}.tsprog")
    return out


def _graph(path: Path) -> dict:
    return json.loads(read_tsprog(path).files["graph.json"])


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _check_standard_shapes(model) -> None:
    """ONNX's own shape inference over the standard nodes must give the per-rank shapes the
    exporter wrote down: drop the value_info of standard-node outputs (keep the custom nodes'
    as given, inference cannot see through them), infer, and compare dim by dim."""
    written = {v.name: v for v in model.graph.value_info}
    custom_out = {o for n in model.graph.node if n.domain for o in n.output}
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    bare.graph.value_info.extend(v for k, v in written.items() if k in custom_out)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(
        bare, check_type=True, strict_mode=True, data_prop=True).graph.value_info}
    compared = 0
    for name, want in written.items():
        if name in custom_out or name not in inferred:
            continue
        got = inferred[name].type.tensor_type
        assert got.elem_type == want.type.tensor_type.elem_type, name
        if not got.HasField("shape"):
            continue
        gd, wd = got.shape.dim, want.type.tensor_type.shape.dim
        assert len(gd) == len(wd), name
        for g_, w_ in zip(gd, wd):
            if g_.HasField("dim_value") and w_.HasField("dim_value"):
                assert g_.dim_value == w_.dim_value, (name, _dims(inferred[name]), _dims(want))
            elif g_.HasField("dim_param") and w_.HasField("dim_param") \
                    and not g_.dim_param.startswith("unk__"):
                assert g_.dim_param == w_.dim_param, (name, _dims(inferred[name]), _dims(want))
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("key", list(CONFIGS))
def test_export_checks_and_maps_the_program(programs, tmp_path, key):
    path = programs[key]
    prog = read_tsprog(path)
    g = _graph(path)
    ex = to_onnx(prog)
    assert ex.num_fallbacks == 0, ex.fallbacks
    out = export_onnx(path, tmp_path / f"{key}.onnx")
    assert out == tmp_path / f"{key}.onnx"
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    _check_standard_shapes(model)
    assert {(o.domain, o.version) for o in model.opset_import} == {
        ("", 18), (DOMAIN, 1), (FALLBACK_DOMAIN, 1)}
    assert json.loads({p.key: p.value for p in model.metadata_props}["tscompile.fallbacks"]) == {}
    graph = model.graph
    nodes = list(graph.node)
    assert not graph.initializer                      # weights are never inside
    assert not [n for n in nodes if n.domain == FALLBACK_DOMAIN]

    # Inputs: the program inputs, meta fields it reads, then every tensor it reads.
    inputs = {i.name: i for i in graph.input}
    assert {"input_ids", "positions", "meta.slot_mapping", "meta.block_tables",
            "meta.query_start_loc", "meta.seq_lens", "meta.num_decodes",
            "meta.logits_indices"} <= set(inputs)
    assert _dims(inputs["input_ids"]) == ["T"] and _dims(inputs["meta.logits_indices"]) == ["S"]
    assert _dims(inputs["meta.block_tables"]) == ["B", "MB"]
    assert _dims(inputs["meta.num_decodes"]) == []
    assert ("rank" in inputs) == any(n["args"] and n["args"][0] == {"node": "rank"}
                                     for n in g["nodes"])
    for name, spec in g["tensors"].items():
        assert name in inputs, name
        dims = _dims(inputs[name])
        assert len(dims) == len(spec["shape"])
        assert all(d == s for d, s in zip(dims, spec["shape"]) if isinstance(d, int)), name

    # Collectives: exactly the program's schedule, as tscompile-domain nodes.
    schedule = prog.manifest["schedule"]
    colls = [n for n in nodes if n.domain == DOMAIN and n.op_type in COLLECTIVES]
    assert Counter(n.op_type for n in colls) == Counter(s["kind"] for s in schedule)
    assert sorted(n.name for n in colls) == sorted(s["node"] for s in schedule)
    by_node = {s["node"]: s for s in schedule}
    for n in colls:
        s = by_node[n.name]
        assert _attr(n, "collective_kind").decode() == n.op_type == s["kind"]
        assert _attr(n, "collective_from").decode() == s["from"]
        assert _attr(n, "collective_to").decode() == s["to"]
        assert f"scope: {s['scope']}" in n.doc_string
    assert not [n for n in nodes if n.domain == "" and _attr(n, "collective_kind")]

    # Attention: one kernel node per layer, in that layer's scope, writing its KV cache.
    attn = CONFIGS[key][3]
    layers = prog.manifest["model"]["config"]["num_layers"]
    att_nodes = [n for n in nodes if n.domain == DOMAIN and n.op_type == attn]
    assert len(att_nodes) == layers
    for i in range(layers):
        [n] = [a for a in att_nodes if f"scope: layers.{i}.self_attn\n" in a.doc_string + "\n"]
        assert f"layers.{i}.self_attn.kv_cache" in n.input
        assert [s.decode() for s in _attr(n, "mutates")] == ["kv_cache"]
        assert "meta.slot_mapping" in n.input and "meta.num_decodes" in n.input

    # linear -> Transpose(weight) + MatMul, named after the program's node.
    produced = {o: n for n in nodes for o in n.output}
    onnx_by_name = {n.name: n for n in nodes}
    linears = [n for n in g["nodes"] if n["op"] == "linear"]
    assert linears and sum(n.op_type == "MatMul" for n in nodes) == len(linears)
    for lin in linears:
        n = onnx_by_name[lin["name"]]
        assert n.op_type == "MatMul"
        t = produced[n.input[1]]
        assert t.op_type == "Transpose" and list(_attr(t, "perm")) == [1, 0]
        w = lin["args"][1]
        assert t.input[0] == (w["tensor"] if "tensor" in w else w["node"])
    # Other standard ops stay standard.
    std = Counter(n["op"] for n in g["nodes"])
    ops = Counter(n.op_type for n in nodes if n.domain == "")
    assert ops["Reshape"] == std["method:view"] + std["method:reshape"]
    assert ops["Split"] == std["method:split"]
    assert ops["Gather"] == std["embedding"] + 1          # + the logits rows
    assert ops["Cast"] == std["method:float"]

    # Every node says where it runs; tscompile nodes are typed from the per-rank values.
    for n in nodes:
        assert "placement: " in n.doc_string and "scope: " in n.doc_string, n.name
    typed = {v.name for v in graph.value_info} | {o.name for o in graph.output}
    for n in g["nodes"]:
        if n["op"].startswith("tscompile::") and isinstance(n["value"], dict):
            assert n["name"] in typed, n["name"]
    assert [o.name for o in graph.output] == [g["output"]["node"]]


def test_plain_torch_architecture_exports_without_fallbacks(tmp_path):
    """A user model file written in plain torch (RMSNorm, rotate-half RoPE with x[..., :h],
    top-k routing with ==, sum, pow, mean...) exports with standard ops only."""
    arch = Path(__file__).parents[1] / "passes" / "mixtral_style.py"
    if not arch.is_file():
        pytest.skip("tests/passes/mixtral_style.py is not in this checkout")
    path = build(str(arch), preset="tiny", mesh=Mesh.build(2)).save(tmp_path / "m.tsprog")
    ex = to_onnx(path)
    assert ex.num_fallbacks == 0, ex.fallbacks
    onnx.checker.check_model(ex.model, full_check=True)
    _check_standard_shapes(ex.model)
    ops = {n.op_type for n in ex.model.graph.node}
    assert {"TopK", "Equal", "ReduceMean", "Slice", "Softmax", "MatMul"} <= ops


def test_rank_and_cli(programs, tmp_path):
    path = programs["llama"]
    r0, r1 = to_onnx(path, rank=0).model, to_onnx(path, rank=1).model
    doc = lambda m: {i.name: i.doc_string for i in m.graph.input}
    name = "layers.0.self_attn.q_proj.weight"
    assert "rank 0 holds dim 0 [0:32]" in doc(r0)[name]
    assert "rank 1 holds dim 0 [32:64]" in doc(r1)[name]
    assert {p.key: p.value for p in r1.metadata_props}["tscompile.rank"] == "1"
    with pytest.raises(ValueError, match="rank 2"):
        to_onnx(path, rank=2)

    from tscompile.cli import main
    out = tmp_path / "cli.onnx"
    assert main(["export", str(path), "--onnx", str(out), "--rank", "1"]) == 0
    onnx.checker.check_model(onnx.load(str(out)))


# ---------------------------------------------------------------------------------------
# Standard-op semantics on a hand-written graph, run with ONNX's reference evaluator.

def _t(shape, dtype="float32"):
    return {"shape": shape, "dtype": dtype}


def _n(name, op, args, value, kwargs=None):
    return {"name": name, "op": op, "args": args, "kwargs": kwargs or {}, "value": value,
            "placement": "R", "scope": "toy", "collective": None}


def _prog(nodes, output, tensors, inputs=None, world=1) -> Tsprog:
    g = {"world_size": world,
         "inputs": inputs or [{"name": "input_ids", "value": _t(["T"], "int64")},
                              {"name": "meta", "value": None}],
         "tensors": tensors, "nodes": nodes, "output": output}
    manifest = {"model": {"name": "toy"}, "mesh": {"world_size": world}, "tensors": {}}
    return Tsprog(Path("toy.tsprog"), manifest, {"graph.json": json.dumps(g)})


N = lambda name: {"node": name}   # noqa: E731


def test_standard_ops_compute_what_torch_does():
    from onnx.reference import ReferenceEvaluator
    torch = pytest.importorskip("torch")

    nodes = [
        _n("emb", "embedding", [N("input_ids"), {"tensor": "E"}], _t(["T", 4])),
        _n("lin", "linear", [N("emb"), {"tensor": "W"}, {"tensor": "b"}], _t(["T", 8])),
        _n("sh", "getattr", [N("lin"), "shape"], None),
        _n("t", "getitem", [N("sh"), 0], None),
        _n("v", "method:view", [N("lin"), N("t"), 2, 4], _t(["T", 2, 4])),
        _n("tr", "method:transpose", [N("v"), 1, 2], _t(["T", 4, 2])),
        _n("r", "method:reshape", [N("tr"), N("t"), -1], _t(["T", 8])),
        _n("sp", "method:split", [N("lin"), {"list": [3, 5]}], [_t(["T", 3]), _t(["T", 5])],
           {"dim": -1}),
        _n("a", "getitem", [N("sp"), 0], _t(["T", 3])),
        _n("b2", "getitem", [N("sp"), 1], _t(["T", 5])),
        _n("c", "cat", [{"list": [N("b2"), N("a")]}, 1], _t(["T", 8])),
        _n("m", "mul", [N("c"), 2.0], _t(["T", 8])),
        _n("s", "sub", [N("m"), N("r")], _t(["T", 8])),
        _n("d", "truediv", [N("s"), 4], _t(["T", 8])),
        _n("sm", "softmax", [N("d")], _t(["T", 8]), {"dim": -1, "_stacklevel": 3,
                                                    "dtype": None}),
        _n("sl", "getitem", [N("sm"), {"list": [{"slice": [None, None, None]},
                                                {"slice": [1, 7, 2]}]}], _t(["T", 3])),
        _n("f", "method:float", [N("sl")], _t(["T", 3])),
        _n("li", "getattr", [N("meta"), "logits_indices"], _t(["S"], "int64")),
        _n("g", "getitem", [N("r"), N("li")], _t(["S", 8])),
        _n("gt", "method:permute", [N("g"), 1, 0], _t([8, "S"])),
        _n("mm", "matmul", [N("r"), N("gt")], _t(["T", "S"])),
        _n("v2", "method:view", [N("mm"), N("t"), -1], _t(["T", "S"])),   # two symbolic dims
        _n("row", "getitem", [N("v2"), -1], _t(["S"])),
        _n("u", "method:unsqueeze", [N("row"), 0], _t([1, "S"])),
        _n("act", "silu", [N("g")], _t(["S", 8])),
        _n("ad", "add", [N("act"), 1], _t(["S", 8])),
        # RMSNorm and rotate-half in plain torch: x[..., :h] with h = x.shape[-1] // 2
        _n("p2", "method:pow", [N("v"), 2], _t(["T", 2, 4])),
        _n("ms", "method:mean", [N("p2"), -1], _t(["T", 2, 1]), {"keepdim": True}),
        _n("ep", "add", [N("ms"), 1e-5], _t(["T", 2, 1])),
        _n("rs", "rsqrt", [N("ep")], _t(["T", 2, 1])),
        _n("nv", "mul", [N("v"), N("rs")], _t(["T", 2, 4])),
        _n("vs", "getattr", [N("nv"), "shape"], None),
        _n("last", "getitem", [N("vs"), -1], None),
        _n("half", "floordiv", [N("last"), 2], None),
        _n("x1", "getitem", [N("nv"), {"list": [{"ellipsis": True},
                                                {"slice": [None, N("half"), None]}]}],
           _t(["T", 2, 2])),
        _n("x2", "method:__getitem__", [N("nv"), {"list": [{"ellipsis": True},
                                                           {"slice": [N("half"), None, None]}]}],
           _t(["T", 2, 2])),
        _n("nx2", "neg", [N("x2")], _t(["T", 2, 2])),
        _n("rot", "cat", [{"list": [N("nx2"), N("x1")]}], _t(["T", 2, 4]), {"dim": -1}),
        # top-k routing: weights * (ids == e), summed
        _n("tk", "method:topk", [N("sm"), 2], [_t(["T", 2]), _t(["T", 2], "int64")],
           {"dim": -1}),
        _n("tw", "getitem", [N("tk"), 0], _t(["T", 2])),
        _n("ti", "getitem", [N("tk"), 1], _t(["T", 2], "int64")),
        _n("hit", "eq", [N("ti"), 3], _t(["T", 2], "bool")),
        _n("wh", "mul", [N("tw"), N("hit")], _t(["T", 2])),
        _n("we", "method:sum", [N("wh")], _t(["T", 1]), {"dim": -1, "keepdim": True}),
        # a slice bound that is only known at run time: r[: T // 2]
        _n("ht", "floordiv", [N("t"), 2], None),
        _n("top", "getitem", [N("r"), {"slice": [None, N("ht"), None]}], _t(["T//2", 8])),
    ]
    tensors = {"E": _t([16, 4]), "W": _t([8, 4]), "b": _t([8])}
    prog = _prog(nodes, {"list": [N("ad"), N("f"), N("u"), N("v2"), N("rot"), N("we"),
                                N("top")]},
                 tensors)
    ex = to_onnx(prog)
    assert ex.num_fallbacks == 0, ex.fallbacks
    model = ex.model
    onnx.checker.check_model(model, full_check=True)   # no custom ops here: full check
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Shape"] == 1 and ops["Concat"] == 3   # only v2 needs a built shape (+ cats)

    rng = np.random.default_rng(0)
    ids = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    rows = np.array([4, 0], dtype=np.int64)
    E, W, b = (rng.standard_normal(s).astype(np.float32) for s in ((16, 4), (8, 4), (8,)))
    feeds = {"input_ids": ids, "meta.logits_indices": rows, "E": E, "W": W, "b": b}
    got = ReferenceEvaluator(model).run(None, feeds)

    Et, Wt, bt = (torch.from_numpy(x) for x in (E, W, b))
    lin = torch.nn.functional.linear(Et[torch.from_numpy(ids)], Wt, bt)
    t = lin.shape[0]
    r = lin.view(t, 2, 4).transpose(1, 2).reshape(t, -1)
    a, b2 = lin.split([3, 5], dim=-1)
    d = (torch.cat([b2, a], 1) * 2.0 - r) / 4
    f = torch.softmax(d, dim=-1)[:, 1:7:2].float()
    g = r[torch.from_numpy(rows)]
    v2 = (r @ g.permute(1, 0)).view(t, -1)
    v = lin.view(t, 2, 4)
    nv = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
    h = nv.shape[-1] // 2
    rot = torch.cat([-nv[..., h:], nv[..., :h]], dim=-1)
    tw, ti = torch.softmax(d, dim=-1).topk(2, dim=-1)
    we = (tw * (ti == 3)).sum(dim=-1, keepdim=True)
    want = [torch.nn.functional.silu(g) + 1, f, v2[-1].unsqueeze(0), v2, rot, we, r[:t // 2]]
    assert len(got) == len(want)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y.numpy(), rtol=1e-5, atol=1e-5)


def test_unmapped_ops_fall_back_and_are_counted(capsys, tmp_path):
    nodes = [
        _n("emb", "embedding", [N("input_ids"), {"tensor": "E"}], _t(["T", 4])),
        _n("fz", "method:frobnicate", [N("emb"), 3, "mode"], _t(["T", 4]), {"k": [1, 2]}),
        _n("k", "tscompile::brand_new_kernel", [N("fz"), 0.5], [_t(["T", 4]), _t(["T"])]),
        _n("k0", "getitem", [N("k"), 0], _t(["T", 4])),
        _n("fz2", "method:frobnicate", [N("k0")], _t(["T", 4])),
    ]
    prog = _prog(nodes, N("fz2"), {"E": _t([16, 4])})
    ex = to_onnx(prog)
    assert ex.fallbacks == Counter({"method:frobnicate": 2})
    onnx.checker.check_model(ex.model)
    fz = [n for n in ex.model.graph.node if n.domain == FALLBACK_DOMAIN]
    assert [n.op_type for n in fz] == ["method_frobnicate"] * 2
    assert list(fz[0].input) == ["emb"] and _attr(fz[0], "arg1") == 3
    assert list(_attr(fz[0], "k")) == [1, 2]
    [k] = [n for n in ex.model.graph.node if n.domain == DOMAIN]
    assert k.op_type == "brand_new_kernel" and list(k.output)[0] == "k0"
    assert abs(_attr(k, "arg1") - 0.5) < 1e-7

    out = export_onnx(prog, tmp_path / "fb.onnx")
    assert "2 node(s) without an ONNX mapping" in capsys.readouterr().err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["tscompile.fallbacks"]) == {"method:frobnicate": 2}


def test_more_standard_ops_compute_what_torch_does():
    """The less common mappings (stack, where, exact gelu, ne, casts, (un)squeeze, size,
    chunk, bool masks, alpha, python ints on `rank`), run with ONNX's reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    torch = pytest.importorskip("torch")

    nodes = [
        _n("emb", "embedding", [N("input_ids"), {"tensor": "E"}], _t(["T", 4])),
        _n("ae", "aten::embedding", [{"tensor": "E"}, N("input_ids")], _t(["T", 4])),
        _n("st", "stack", [{"list": [N("emb"), N("ae")]}], _t(["T", 4, 2]), {"dim": -1}),
        _n("pos", "ne", [N("emb"), 0.0], _t(["T", 4], "bool")),
        _n("big", "method:gt", [N("emb"), 0.5], _t(["T", 4], "bool")),
        _n("wh", "where", [N("big"), N("emb"), 0.0], _t(["T", 4])),
        _n("ge", "gelu", [N("wh")], _t(["T", 4])),
        _n("us", "method:unsqueeze", [N("ge"), 1], _t(["T", 1, 4])),
        _n("sq", "squeeze", [N("us"), 1], _t(["T", 4])),
        _n("n", "method:size", [N("sq"), 0], None),
        _n("h", "method:to", [N("sq"), {"dtype": "float16"}], _t(["T", 4], "float16")),
        _n("sm", "softmax", [N("h"), -1, {"dtype": "float32"}], _t(["T", 4])),
        _n("tot", "method:sum", [N("sm")], _t([])),
        _n("al", "add", [N("sm"), N("ge")], _t(["T", 4]), {"alpha": 2}),
        _n("rk", "mul", [N("rank"), 3], None),
        _n("off", "add", [N("al"), N("rk")], _t(["T", 4])),
        _n("ex", "method:exp", [N("off")], _t(["T", 4])),
        _n("pw", "pow", [N("ex"), 0.5], _t(["T", 4])),
        _n("tt", "method:t", [N("pw")], _t([4, "T"])),
        _n("ch", "method:chunk", [N("tt"), 2], [_t([2, "T"]), _t([2, "T"])]),
        _n("c0", "getitem", [N("ch"), 0], _t([2, "T"])),
        _n("c1", "getitem", [N("ch"), 1], _t([2, "T"])),
        _n("d", "sub", [N("c0"), N("c1")], _t([2, "T"])),
        _n("row", "getitem", [N("emb"), 0], _t([4])),
        _n("m", "gt", [N("row"), 0.0], _t([4], "bool")),
        _n("kept", "getitem", [N("row"), N("m")], _t(["K"])),
        _n("n1", "sub", [N("n"), 1], None),
        _n("last", "getitem", [N("st"), {"list": [N("n1"), None]}], _t([1, 4, 2])),
    ]
    prog = _prog(nodes, {"list": [N("st"), N("pos"), N("tot"), N("d"), N("kept"), N("last")]},
                 {"E": _t([16, 4])},
                 inputs=[{"name": "input_ids", "value": _t(["T"], "int64")},
                         {"name": "meta", "value": None}, {"name": "rank", "value": None}],
                 world=2)
    ex = to_onnx(prog, rank=1)
    assert ex.num_fallbacks == 0, ex.fallbacks
    onnx.checker.check_model(ex.model, full_check=True)
    assert "rank" in {i.name for i in ex.model.graph.input}

    rng = np.random.default_rng(1)
    ids = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    E = rng.standard_normal((16, 4)).astype(np.float32)
    got = ReferenceEvaluator(ex.model).run(None, {"input_ids": ids, "E": E,
                                                  "rank": np.array(1, dtype=np.int64)})

    F = torch.nn.functional
    emb = torch.from_numpy(E)[torch.from_numpy(ids)]
    ge = F.gelu(torch.where(emb > 0.5, emb, 0.0)).unsqueeze(1).squeeze(1)
    sm = torch.softmax(ge.to(torch.float16), -1, dtype=torch.float32)
    pw = (torch.add(sm, ge, alpha=2) + 1 * 3).exp().pow(0.5)
    c0, c1 = pw.t().chunk(2)
    row = emb[0]
    st = torch.stack([emb, emb], dim=-1)
    want = [st, emb != 0, sm.sum(), c0 - c1, row[row > 0], st[emb.shape[0] - 1, None]]
    assert len(got) == len(want)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y.numpy(), rtol=1e-3, atol=1e-3)


def test_a_refused_mapping_leaves_no_nodes_behind():
    """A handler that emits nodes and then gives up falls back cleanly: linear with a bias
    that is not a tensor has already emitted W's Transpose; that node goes, and the next
    linear on W makes its own instead of reading the dropped one."""
    nodes = [
        _n("emb", "embedding", [N("input_ids"), {"tensor": "E"}], _t(["T", 4])),
        _n("bad", "linear", [N("emb"), {"tensor": "W"}, 3], _t(["T", 8])),
        _n("lin", "linear", [N("emb"), {"tensor": "W"}], _t(["T", 8])),
    ]
    ex = to_onnx(_prog(nodes, {"list": [N("bad"), N("lin")]},
                       {"E": _t([16, 4]), "W": _t([8, 4])}))
    assert ex.fallbacks == Counter({"linear": 1})
    onnx.checker.check_model(ex.model)
    graph = ex.model.graph.node
    assert [n.op_type for n in graph] == ["Gather", "linear", "Transpose", "MatMul"]
    assert graph[3].input[1] == graph[2].output[0]


def test_op_tables_are_disjoint():
    """Each op family's table owns its ops (a clash would silently shadow a handler)."""
    from tscompile.onnx import indexing, shapes, standard
    from tscompile.onnx.exporter import HANDLERS
    tables = [standard.OPS, shapes.OPS, indexing.OPS]
    assert sum(map(len, tables)) == len(HANDLERS)
    assert {"linear", "add", "method:view", "getitem", "cat", "stack"} <= set(HANDLERS)
