"""benchmarks/kernels/fp8_gemm.py --smoke under the Triton interpreter: the JSON it writes
has the roofs, the chosen backend and one row per (case, variant) with timings, roof
fractions and, for the Triton rows, the errors against the reference (small: the check
runs before the timing at every shape). On the CPU the roofs are None, so the fractions are
too; the GPU run fills them."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from benchmarks.kernels import fp8_gemm as B  # noqa: E402


def test_smoke_writes_the_json(tmp_path):
    out = tmp_path / "fp8.json"
    res = B.main(["--smoke", "--out", str(out), "--only", "tiny_200x300"])
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(res["rows"]))
    assert data["smoke"] is True
    for key in ("device", "date", "commit", "torch", "triton", "timing", "selected", "kernels"):
        assert key in data
    assert set(data["roofs"]) >= {"copy_GBps", "bf16_mm_TFLOPs", "fp8_mm_TFLOPs"}
    rows = data["rows"]
    seen = {(r["regime"], r["M"], r["variant"]) for r in rows}
    assert seen == {("prefill", 80, v) for v in ("triton", "triton_fused", "act_quant", "bf16")} \
        | {("decode", m, v) for m in B.SMOKE_DECODE_M for v in ("triton", "bf16")}
    for r in rows:
        assert set(B.ROW_KEYS) <= set(r), r
        assert r["error"] is None, r
        assert (r["N"], r["K"]) == (200, 300)
        assert r["us"] > 0 and r["bytes"] > 0 and r["frac_copy_roof"] is None
        if r["variant"] == "triton":
            assert r["max_abs_err"] is not None
            if r["regime"] == "decode":
                assert r["rel_err"] < 1e-2 and r["rel_err_qact"] is None
            else:           # activation rounding vs the unquantized oracle; none vs its own
                assert 1e-3 < r["rel_err"] < 0.05 and r["rel_err_qact"] < 1e-2
    decode = [r for r in rows if r["regime"] == "decode" and r["variant"] == "triton"]
    assert all(r["bytes"] == 200 * 300 + 2 * 3 * 4 + r["M"] * (300 + 200) * 2 for r in decode)
