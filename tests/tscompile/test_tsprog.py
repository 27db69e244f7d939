"""The .tsprog format and the build/inspect/generate commands around it."""
from __future__ import annotations

import json
import zipfile

import pytest

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.cli import main
from tscompile.runtime import load_model
from tscompile.runtime.offline import PagedRunner, generate
from tscompile.runtime.protocol import SamplingParams
from tscompile.tsprog import FORMAT_VERSION, TsprogError, read_tsprog


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    return build("qwen3", preset="tiny-moe", mesh=Mesh.build(2, moe_ep=2)).save(
        tmp_path_factory.mktemp("p") / "q.tsprog")


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist()}
    change(files)
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return dst


def test_manifest_contents(prog):
    p = read_tsprog(prog)
    m = p.manifest
    assert m["format_version"] == FORMAT_VERSION and p.world_size == 2
    assert m["mesh"]["moe_ep"] == 2 and "MoE EP2" in m["mesh"]["description"]
    w13 = m["tensors"]["layers.1.mlp.w13"]
    assert (w13["placement"], w13["dim"], w13["shape"]) == ("S(0)", 0, [8, 64, 64])
    # Checkpoint keys per expert, each covering one slab of the stacked parameter.
    keys = {piece[0] for piece in w13["pieces"]}
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys and len(w13["pieces"]) == 16
    assert m["kv_cache"]["bytes_per_token_per_rank"]["bfloat16"] == 3 * 2 * 2 * 16 * 2
    assert {"program.py", "model.py", "graph.json", "dumps/01_propagate.txt"} <= set(p.files)
    assert set(m["hashes"]) == set(p.files)


def test_wrong_version_and_bad_hash_are_refused(prog, tmp_path):
    def bump(files):
        m = json.loads(files["manifest.json"])
        m["format_version"] = 99
        files["manifest.json"] = json.dumps(m).encode()
    with pytest.raises(TsprogError, match="format version 99; this tscompile reads version 1"):
        read_tsprog(_rewrite(prog, tmp_path / "v.tsprog", bump))

    def edit(files):
        files["program.py"] = files["program.py"].replace(b"WORLD_SIZE = 2", b"WORLD_SIZE = 1")
    with pytest.raises(TsprogError, match="program.py does not match its manifest hash"):
        read_tsprog(_rewrite(prog, tmp_path / "h.tsprog", edit))

    def extra(files):
        files["evil.py"] = b"print('hi')"
    with pytest.raises(TsprogError, match="not covered by the manifest hashes"):
        read_tsprog(_rewrite(prog, tmp_path / "e.tsprog", extra))
    (tmp_path / "junk.tsprog").write_text("not a zip")
    with pytest.raises(TsprogError, match="not a .tsprog"):
        read_tsprog(tmp_path / "junk.tsprog")


def test_inspect_text_and_json(prog, capsys):
    assert main(["inspect", str(prog)]) == 0
    text = capsys.readouterr().out
    assert "Attention TP2 + Dense TP2 + MoE EP2" in text
    assert "layers 0-1: all_reduce_add_rms_norm P->R @ layers.N" in text
    assert main(["inspect", str(prog), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["collectives"] == {"all_reduce_add_rms_norm": 5, "all_reduce": 1}
    assert s["kv_bytes_per_token_per_rank"]["float32"] == 3 * 2 * 2 * 16 * 4


def test_generate_with_compiled_program_equals_single_device(prog, capsys):
    """`tscompile generate prog.tsprog` runs 2 gloo processes; greedy ids equal the eager
    model's with the same dummy weights."""
    ids = [3, 14, 15, 92, 65, 35]
    assert main(["generate", str(prog), "--dummy-weights", "--seed", "4", "--prompt-ids",
                 ",".join(map(str, ids)), "--max-tokens", "6", "--ignore-eos", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["output_ids"]
    model, _ = load_model("qwen3", preset="tiny-moe", dummy_weights=True, seed=4)
    runner = PagedRunner(model, page_size=16, num_blocks=4)
    assert ours == generate(runner, ids, SamplingParams(max_tokens=6, temperature=0.0))
