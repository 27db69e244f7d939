"""The package layout of DESIGN.md: one import root, root folders mapped into `tscompile.*`."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tscompile

ROOT = Path(__file__).resolve().parents[2]


def test_root_folders_are_subpackages():
    import tscompile.annotations, tscompile.codegen, tscompile.kernels, tscompile.models  # noqa
    import tscompile.passes, tscompile.passes.rules, tscompile.runtime  # noqa: E401

    for name in ("annotations", "codegen", "kernels", "models", "passes", "runtime"):
        mod = sys.modules[f"tscompile.{name}"]
        assert Path(mod.__file__).resolve() == ROOT / name / "__init__.py"
    assert Path(tscompile.__file__).resolve() == ROOT / "tscompile" / "__init__.py"


def test_repo_root_on_sys_path_is_harmless():
    """transformers probes `import kernels`; run from the repository root, that finds our
    kernels/ folder. It must alias the canonical ops, not re-register them (which once
    invalidated the registered ops and crashed the process)."""
    code = (
        "import torch, transformers, sys\n"
        "from tscompile.kernels import rms_norm\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "transformers.LlamaForCausalLM(cfg)\n"
        "assert sys.modules.get('kernels') is None or sys.modules['kernels'].rms_norm is rms_norm\n"
        "for _ in range(50): rms_norm(torch.randn(4, 16), torch.ones(16), 1e-6)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_model_files_are_single_device_code():
    banned = re.compile(r"\b(rank|world_size|torch\.distributed|dist\.|register_\w*hook)\b")
    for path in sorted((ROOT / "models").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not banned.search(code), f"{path.name}:{i}: {line.strip()}"


def test_every_tscompile_environment_variable_lives_in_envs():
    """STYLE.md §9: each TSCOMPILE_* name the tree uses is declared in tscompile/envs.py, and
    only envs.py reads the environment for one."""
    from tscompile import envs
    declared = {v.name for v in envs.ALL}
    used: dict[str, str] = {}
    for folder in ("annotations", "codegen", "kernels", "models", "passes", "runtime",
                   "tscompile", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for name in re.findall(r"\bTSCOMPILE_[A-Z_]+\b", text):
                used.setdefault(name, str(path.relative_to(ROOT)))
            if path.name != "envs.py":
                reads = re.findall(r"(?:environ(?:\.\w+)?|getenv)\(\s*[\"'](TSCOMPILE_\w+)", text)
                reads += re.findall(r"environ\[\s*[\"'](TSCOMPILE_\w+)", text)
                assert not reads, f"{path.relative_to(ROOT)} reads {reads} outside envs.py"
    undeclared = {n: p for n, p in used.items() if n not in declared}
    assert not undeclared, f"TSCOMPILE_* names not declared in tscompile/envs.py: {undeclared}"
