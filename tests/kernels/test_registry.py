"""Kernel selection: priority, requirements, overrides, explain()."""
from __future__ import annotations

import pytest
import torch

from tscompile.kernels import REGISTRY, rms_norm
from tscompile.kernels.registry import Query, Registry, Requirements


def _q(dtype=torch.float32, device="cpu", **shape):
    return Query(torch.device(device), dtype, tuple(sorted(shape.items())))


def make():
    r = Registry()
    r.register("op", "reference")(lambda: "ref")
    r.register("op", "fast", priority=10, requires=Requirements(
        dtypes=frozenset({torch.bfloat16}),
        shape_check=lambda q: None if q.get("head_dim") in (64, 128) else "head_dim not 64/128",
    ))(lambda: "fast")
    r.register("op", "gpu", priority=20, requires=Requirements(devices=frozenset({"cuda"}),
                                                                min_arch=(9, 0)))(lambda: "gpu")
    return r


def test_highest_priority_eligible_wins():
    r = make()
    assert r.select("op", _q(torch.bfloat16, head_dim=128)).backend == "fast"
    assert r.select("op", _q(torch.bfloat16, head_dim=96)).backend == "reference"
    assert r.select("op", _q(torch.float32, head_dim=128)).backend == "reference"
    assert r.selections() == {"op@cpu/bfloat16": "reference", "op@cpu/float32": "reference"}


def test_explain_gives_each_reason():
    text = make().explain("op", _q(torch.bfloat16, head_dim=96))
    assert "op/gpu (priority 20): refused, device cpu not in ['cuda']" in text
    assert "op/fast (priority 10): refused, head_dim not 64/128" in text
    assert "op/reference (priority 0): taken" in text


def test_override(monkeypatch):
    r = make()
    monkeypatch.setenv("TSCOMPILE_KERNELS", "op=reference")
    assert r.select("op", _q(torch.bfloat16, head_dim=128)).backend == "reference"
    monkeypatch.setenv("TSCOMPILE_KERNELS", "op=gpu")
    with pytest.raises(RuntimeError, match="forces op=gpu, which cannot run here: device cpu"):
        r.select("op", _q())
    monkeypatch.setenv("TSCOMPILE_KERNELS", "*=triton")
    with pytest.raises(RuntimeError, match="has no 'triton' backend"):
        r.select("op", _q())
    monkeypatch.setenv("TSCOMPILE_KERNELS", "op")
    with pytest.raises(ValueError, match="TSCOMPILE_KERNELS='op' is invalid"):
        r.select("op", _q())


def test_selection_is_cached_per_query_and_override(monkeypatch):
    """select() decides once per (op, query, TSCOMPILE_KERNELS); a changed override, a new
    registration or another shape decides again."""
    r = make()
    calls = []
    check = lambda q: calls.append(q) or (None if q.get("head_dim") == 128 else "no")  # noqa: E731
    r.register("op", "counted", priority=15, requires=Requirements(shape_check=check))(
        lambda: "counted")
    q = _q(torch.bfloat16, head_dim=128)
    assert [r.select("op", q).backend for _ in range(3)] == ["counted"] * 3
    assert len(calls) == 1
    assert r.select("op", _q(torch.bfloat16, head_dim=64)).backend == "fast"
    assert len(calls) == 2
    monkeypatch.setenv("TSCOMPILE_KERNELS", "op=reference")
    assert r.select("op", q).backend == "reference"
    monkeypatch.delenv("TSCOMPILE_KERNELS")
    r.register("op", "newest", priority=30)(lambda: "newest")
    assert r.select("op", q).backend == "newest"
    assert r.selections()["op@cpu/bfloat16"] == "newest"


def test_duplicate_and_unknown():
    r = make()
    with pytest.raises(ValueError, match="already has a 'fast'"):
        r.register("op", "fast")(lambda: None)
    with pytest.raises(KeyError, match="unknown kernel op 'nope'"):
        r.select("nope", _q())


def test_every_public_op_has_a_reference():
    for op in REGISTRY.ops():
        assert "reference" in {i.backend for i in REGISTRY.impls(op)}, op
    rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert REGISTRY.selections()["rms_norm@cpu/float32"] == "reference"


def test_ops_trace_on_meta():
    # Fake implementations let the compiler trace on the meta device.
    x = torch.empty(3, 8, device="meta")
    assert rms_norm(x, torch.empty(8, device="meta"), 1e-6).shape == (3, 8)


def _cuda_registry():
    """Implementations a CUDA query can be asked about on a machine without a GPU (no arch
    requirement, which would query the device)."""
    r = Registry()
    r.register("op", "reference")(lambda: "ref")
    r.register("op", "triton", priority=10, requires=Requirements(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16})))(lambda: "triton")
    r.register("only_ref", "reference")(lambda: "ref")      # e.g. a collective
    return r


def test_a_cuda_fallback_to_reference_warns_once_per_op_naming_why(monkeypatch, caplog):
    r = _cuda_registry()
    with caplog.at_level("WARNING", logger="tscompile.kernels"):
        assert r.select("op", _q(torch.bfloat16, "cuda")).backend == "triton"
        assert r.select("op", _q(torch.float32, "cuda")).backend == "reference"
        r.select("op", _q(torch.float16, "cuda"))             # same op: no second warning
        r.select("only_ref", _q(torch.float32, "cuda"))       # no other backend: no fallback
        r.select("op", _q(torch.float32))                     # CPU: no fallback
    warned = [m.getMessage() for m in caplog.records if m.levelname == "WARNING"]
    assert warned == ["kernel op on cuda/float32 runs the reference implementation (slow): "
                      "triton refused: dtype torch.float32 not in ['torch.bfloat16']"]


def test_forcing_reference_on_cuda_warns_with_the_override(monkeypatch, caplog):
    r = _cuda_registry()
    monkeypatch.setenv("TSCOMPILE_KERNELS", "*=reference")
    with caplog.at_level("WARNING", logger="tscompile.kernels"):
        assert r.select("op", _q(torch.bfloat16, "cuda")).backend == "reference"
    assert "forced by TSCOMPILE_KERNELS='*=reference'" in caplog.text
