"""Issue 17 item 3: a user's model file is found by its HF_MODEL_TYPES as ours are.

`tscompile build FILE --config config.json` checks the file claims config.json's
model_type; `tscompile build --config config.json` finds the one file that claims it among
the built-ins, the `tscompile.models` entry points of installed packages (here a dist-info
folder put on sys.path, as pip would leave it) and the `--model-path` /
TSCOMPILE_MODEL_PATH directories. The user file is tests/passes/gpt_neox_style.py, copied.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.cli import main
from tscompile.models import check_model_type, load_model_file, model_file_for_hf
from tscompile.tsprog import read_tsprog

NEOX_SOURCE = (Path(__file__).parents[1] / "passes" / "gpt_neox_style.py").read_text()
HF_NEOX = {"model_type": "gpt_neox", "vocab_size": 128, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-5,
           "max_position_embeddings": 256, "use_parallel_residual": True}
# A file beside the model files that must never be imported (it has no HF_MODEL_TYPES).
HELPER = 'raise RuntimeError("a helper without HF_MODEL_TYPES was imported")\n'
DENSE = "gpt_neox.layers.0.attention.dense.weight"


@pytest.fixture(autouse=True)
def no_user_model_path(monkeypatch):
    monkeypatch.delenv("TSCOMPILE_MODEL_PATH", raising=False)


def neox(types: tuple[str, ...] = ("gpt_neox",)) -> str:
    assert NEOX_SOURCE.count('HF_MODEL_TYPES = ("gpt_neox",)') == 1
    return NEOX_SOURCE.replace('HF_MODEL_TYPES = ("gpt_neox",)', f"HF_MODEL_TYPES = {types!r}")


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def config(tmp_path: Path, model_type: str = "gpt_neox") -> Path:
    return write(tmp_path / f"ckpt_{model_type}", "config.json",
                 json.dumps({**HF_NEOX, "model_type": model_type})).parent


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(package, {entry point: module}, {module file: source}): a package with
    `tscompile.models` entry points, found by importlib.metadata (no pip)."""
    packages = []

    def make(package: str, entry_points: dict[str, str], files: dict[str, str]) -> None:
        site = tmp_path / f"site_{package}"
        for name, text in {"__init__.py": "", **files}.items():
            write(site / package, name, text)
        info = site / f"{package}-0.1.dist-info"
        write(info, "METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        write(info, "entry_points.txt", "[tscompile.models]\n" +
              "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        monkeypatch.syspath_prepend(str(site))
        packages.append(package)

    yield make
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]


def _build(tmp_path, capsys, *argv: str) -> tuple[int, str]:
    rc = main(["build", *argv, "-o", str(tmp_path / "out.tsprog")])
    return rc, capsys.readouterr().err


def test_build_by_path_at_tp2(tmp_path, capsys):
    path = write(tmp_path / "mine", "neox.py", neox())
    rc, err = _build(tmp_path, capsys, str(path), "--config", str(config(tmp_path)), "--tp", "2")
    assert rc == 0, err
    prog = read_tsprog(tmp_path / "out.tsprog")
    assert prog.manifest["model"]["module"].startswith("tscompile_user_model_neox_")
    assert prog.manifest["tensors"][DENSE]["placement"] == "S(1)"      # row parallel


def test_path_whose_types_disagree_with_config(tmp_path, capsys):
    path = write(tmp_path / "mine", "neox.py", neox())
    rc, err = _build(tmp_path, capsys, str(path), "--config", str(config(tmp_path, "llama")))
    assert rc == 2
    for part in ("config.json has model_type 'llama'", f"model file {path} claims 'gpt_neox'",
                 "drop the model argument"):
        assert part in err, (part, err)
    bare = write(tmp_path / "bare", "neox.py", NEOX_SOURCE.replace(
        'HF_MODEL_TYPES = ("gpt_neox",)', ""))
    with pytest.raises(ValueError, match=r"declares no HF_MODEL_TYPES.*add HF_MODEL_TYPES = "
                                         r"\('gpt_neox',\)"):
        build(bare, config=config(tmp_path), mesh=Mesh.build(1))
    assert build(bare, preset="tiny", mesh=Mesh.build(1))        # presets need no claim


def test_build_by_search_path(tmp_path, capsys, monkeypatch, caplog):
    folder = tmp_path / "mine"
    path = write(folder, "neox.py", neox())
    write(folder, "helpers.py", HELPER)
    ckpt = str(config(tmp_path))
    rc, err = _build(tmp_path, capsys, "--config", ckpt, "--model-path", str(folder))
    assert rc == 0, err
    assert not caplog.records, [r.getMessage() for r in caplog.records]   # helpers.py not run
    assert read_tsprog(tmp_path / "out.tsprog").manifest["model"]["name"] == "neox"
    rc, err = _build(tmp_path, capsys, "--config", ckpt)               # not searched by default
    assert rc == 2 and "model_type 'gpt_neox', which no model file builds" in err
    monkeypatch.setenv("TSCOMPILE_MODEL_PATH", f"{tmp_path / 'empty'}:{folder}")
    (tmp_path / "empty").mkdir()
    built = build(None, config=ckpt, mesh=Mesh.build(1))
    assert built.files["model.py"] == path.read_text()
    rc, err = _build(tmp_path, capsys, "llama", "--preset", "tiny", "--model-path", str(folder))
    assert rc == 2 and "--model-path only finds a model file by --config's model_type" in err


def test_build_by_entry_point(tmp_path, capsys, install):
    install("neox_models", {"gpt_neox": "neox_models.gpt_neox"}, {"gpt_neox.py": neox()})
    rc, err = _build(tmp_path, capsys, "--config", str(config(tmp_path)), "--tp", "2")
    assert rc == 0, err
    manifest = read_tsprog(tmp_path / "out.tsprog").manifest
    assert manifest["model"]["module"] == "neox_models.gpt_neox"
    assert manifest["tensors"][DENSE]["placement"] == "S(1)"
    built = build("gpt_neox", preset="tiny", mesh=Mesh.build(1))      # by entry-point name
    assert built.manifest["model"]["module"] == "neox_models.gpt_neox"


def test_two_files_claiming_a_type_are_both_named(tmp_path, install):
    folder = tmp_path / "mine"
    path = write(folder, "neox.py", neox())
    install("neox_models", {"neox": "neox_models.gpt_neox"}, {"gpt_neox.py": neox()})
    with pytest.raises(ValueError) as e:
        build(None, config=config(tmp_path), mesh=Mesh.build(1), model_path=[folder])
    for part in ("model_type 'gpt_neox' is claimed by 2 model files",
                 "entry point 'neox' (neox_models.gpt_neox, from neox_models 0.1)",
                 f"{path} (on --model-path)", "give the one to use as the model argument"):
        assert part in str(e.value), (part, str(e.value))
    # Given explicitly, either one builds.
    assert build(path, config=config(tmp_path), mesh=Mesh.build(1))
    assert build("neox", config=config(tmp_path), mesh=Mesh.build(1))


def test_entry_point_claiming_a_builtin_type(tmp_path, install):
    install("llama_fork", {"fork": "llama_fork.fork"}, {"fork.py": neox(("llama",))})
    llama_cfg = config(tmp_path, "llama")
    with pytest.raises(ValueError) as e:
        build(None, config=llama_cfg, mesh=Mesh.build(1))
    for part in ("model_type 'llama' is claimed by 2 model files",
                 "built-in llama (tscompile.models.llama)", "entry point 'fork'"):
        assert part in str(e.value), (part, str(e.value))
    # Passed explicitly, the user's file wins over the built-in.
    built = build("fork", config=llama_cfg, mesh=Mesh.build(1))
    assert built.manifest["model"]["module"] == "llama_fork.fork"


def test_unknown_type_lists_known_and_how_to_register(tmp_path, capsys, install):
    folder = tmp_path / "mine"
    write(folder, "neox.py", neox())
    install("broken_models", {"broken": "broken_models.nope", "cls": "broken_models.m:Net"},
            {"m.py": "class Net:\n    pass\n"})
    rc, err = _build(tmp_path, capsys, "--config", str(config(tmp_path, "mamba")),
                     "--model-path", str(folder))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    for part in ("config.json has model_type 'mamba', which no model file builds",
                 "known: deepseek_v2, deepseek_v3, glm4_moe, gpt_neox, gpt_oss, kimi_k2, llama, "
                 "qwen3, qwen3_moe",
                 "give the file as the model argument", "--model-path / TSCOMPILE_MODEL_PATH",
                 "'tscompile.models' entry point", "HF_MODEL_TYPES = ('<model_type>',)",
                 "not loaded: entry point 'broken' (broken_models.nope, from broken_models "
                 "0.1): ModuleNotFoundError",
                 "entry point 'cls' (broken_models.m:Net, from broken_models 0.1) names a type, "
                 "not a module"):
        assert part in err, (part, err)
    rc, err = _build(tmp_path, capsys, "--config", str(config(tmp_path)),
                     "--model-path", str(tmp_path / "missing"))
    assert rc == 2 and f"--model-path entry {tmp_path / 'missing'} is not a directory" in err
    rc, err = _build(tmp_path, capsys, "--preset", "tiny")
    assert rc == 2 and "give a model file or name for preset 'tiny', or --config" in err
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*llama, qwen3, kimi_k25, "
                                         "glm4_moe, gpt_oss, broken"):
        build("gpt5", preset="tiny", mesh=Mesh.build(1))


def test_a_file_reached_twice_counts_once():
    """models/ on the search path reaches the built-in files again: the same modules."""
    models = Path(__file__).parents[2] / "models"
    assert model_file_for_hf({"model_type": "llama"}, [models]) is load_model_file("llama")


def test_same_named_files_in_two_folders_stay_apart(tmp_path):
    """Each file is its own module, so its classes pickle (ranks are spawned processes)."""
    a, b = (load_model_file(write(tmp_path / d, "neox.py", neox())) for d in ("a", "b"))
    assert a.__name__ != b.__name__
    for module in (a, b):
        cfg = module.PRESETS["tiny"]
        assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_a_nested_text_config_is_found_by_its_own_model_type():
    """Kimi K2.5's config.json nests the language model (model_type kimi_k2) in a
    multimodal one (kimi_k25); a dict passed as it is finds and passes the same file."""
    kimi = load_model_file("kimi_k25")
    nested = {"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2"}}
    assert model_file_for_hf(nested) is kimi
    check_model_type(kimi, nested)
