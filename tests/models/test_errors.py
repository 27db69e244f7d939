"""Bad input fails with an exception that names the problem."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tscompile.cli import main as tscompile_main
from tscompile.models import build_config, load_model_file
from tscompile.models.llama import LlamaConfig
from tscompile.runtime import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    path = tmp_path_factory.mktemp("ckpt")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad",
                lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(KeyError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj"
                                       r"\.weight'.*layers\.1\.self_attn\.k_proj\.weight"):
        load_model("llama", weights=bad)


def test_shape_mismatch_names_tensor_and_shapes(ckpt, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:40]

    bad = _copy(ckpt, tmp_path / "bad", shrink)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                         r"\[40, 32\] but parameter layers\.0\.mlp\.gate_up_proj"
                                         r"\.weight\[48:96, :\] expects \[48, 32\]"):
        load_model("llama", weights=bad)


def test_sharded_checkpoint_with_index(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, _ = load_model("llama", weights=ckpt)
    b, _ = load_model("llama", weights=out)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError,
                       match="model-00002-of-00002.safetensors named by the index"):
        load_model("llama", weights=out)


def test_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        LlamaConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1,
                    num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="hidden_size=50 does not divide into num_heads=4"):
        LlamaConfig(vocab_size=8, hidden_size=50, intermediate_size=8, num_layers=1,
                    num_heads=4, num_kv_heads=2)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match=r"unknown preset 'smollm3'.*known presets: .*"
                                         r"smollm2-135m.*tiny"):
        build_config(load_model_file("llama"), preset="smollm3")


def test_unknown_model_and_model_type(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*llama, qwen3, kimi_k25"):
        load_model_file("gpt5")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'mamba'.*known: .*llama"):
        load_model(weights=tmp_path)


def test_cli_reports_errors_in_one_line(capsys):
    rc = tscompile_main(["generate", "llama", "--preset", "nope", "--dummy-weights",
                         "--prompt-ids", "1,2"])
    assert rc == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    rc = tscompile_main(["generate", "llama", "--preset", "tiny", "--dummy-weights",
                         "--prompt-ids", "1,999"])
    assert rc != 0


def test_cli_dummy_weights_json(capsys):
    argv = ["generate", "llama", "--preset", "tiny", "--dummy-weights", "--prompt-ids",
            "1,2,3,4,5", "--max-tokens", "6", "--page-size", "2", "--json"]
    assert tscompile_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["prompt_ids"] == [1, 2, 3, 4, 5] and len(first["output_ids"]) == 6
    assert tscompile_main(argv[:-1] + ["--page-size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_ids"] == first["output_ids"]
    sampled = argv + ["--temperature", "1.0", "--seed", "5"]
    assert tscompile_main(sampled) == 0
    a = json.loads(capsys.readouterr().out)["output_ids"]
    assert tscompile_main(sampled) == 0
    assert json.loads(capsys.readouterr().out)["output_ids"] == a  # same seed, same tokens
