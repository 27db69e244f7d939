"""The sm_90a CUDA MLA decode (`kernels/cuda/mla.py`) against the reference in kernels/mla.py.

On any machine with nvcc: the kernel builds for sm_90a with no spills and its wgmma/TMA
instructions in the machine code (ptxas and cuobjdump reports), and the registry refuses it
with a reason off Hopper. On an H100/H200 (`-m gpu`): Kimi-sized bf16 shapes against the
fp32 reference on upcast inputs (relative Frobenius error < 1e-2), with NaN in every cache
row the kernel may load but must not use (page tails past the context, unreferenced pages),
page sizes 16 / 64 / 128, split counts that leave splits empty, a 0-token context, the
q-length-folded causal rows, and the registry choosing it for 128 heads only.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from tscompile.kernels import mla_decode
from tscompile.kernels.cuda import build, nvcc, wgmma_header
from tscompile.kernels.cuda import mla as cmla
from tscompile.kernels.mla import mla_decode_reference
from tscompile.kernels.registry import REGISTRY, Query

R, L = 576, 512
SCALE = 192 ** -0.5
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
gpu = pytest.mark.skipif(not HOPPER or nvcc() is None, reason="needs an sm_90 GPU and nvcc")
needs_nvcc = pytest.mark.skipif(nvcc() is None, reason="needs nvcc")


def _query(device="cpu", **shape):
    full = dict(kv_lora_rank=512, rope_dim=64, heads=128, page_size=64, cache_itemsize=2)
    full.update(shape)
    return Query(torch.device(device), torch.bfloat16, tuple(sorted(full.items())))


# ---- any machine ---------------------------------------------------------------------------

def test_shape_check_names_what_it_refuses():
    check = cmla._shape_check
    assert check(_query()) is None
    assert check(_query(heads=32, page_size=16)) is None
    assert "16 heads" in check(_query(heads=16))
    assert "page size 24" in check(_query(page_size=24))
    assert "1-byte" in check(_query(cache_itemsize=1))
    assert "kv_lora_rank/rope_dim 256/64" in check(_query(kv_lora_rank=256))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_registry_refuses_cuda_off_gpu_with_a_reason():
    text = REGISTRY.explain("mla_decode", _query())
    assert "mla_decode/cuda (priority 20): refused, no CUDA device" in text


def test_wgmma_header_spells_every_accumulator():
    h = wgmma_header()
    assert h.count("wgmma.mma_async") == 3
    assert '"+f"(d[127])' in h and '"+f"(d[128])' not in h        # m64n256: 128 per thread
    # A from registers: 4 bf16x2 registers after the accumulators, B K-major (trans-b 0)
    assert re.search(r"m64n64k16.*\{%32, %33, %34, %35\}, %36, p, 1, 1, 0;", h)
    # PV: B (V) read MN-major from the K tile (trans-b 1)
    assert re.search(r"m64n256k16.*, %128, %129, p, 1, 1, 0, 1;", h)


@needs_nvcc
def test_kernel_builds_for_sm90a_without_spills(tmp_path):
    lib = build("mla_decode_sm90", out_dir=tmp_path)
    assert lib.exists() and lib.stat().st_size > 0
    src = Path(cmla.__file__).with_name("mla_decode_sm90.cu")
    (tmp_path / "wgmma_gen.cuh").write_text(wgmma_header())
    cubin = tmp_path / "k.cubin"
    proc = subprocess.run(
        [nvcc(), "-O3", "-std=c++17", "-cubin", "-Xptxas", "-v", "-I", str(tmp_path),
         "-gencode=arch=compute_90a,code=sm_90a", "-o", str(cubin), str(src)],
        capture_output=True, text=True, check=True)
    report = proc.stderr
    assert report.count("Function properties for") == 1, report
    # no spills, setmaxnreg honoured (C7507 = ignored) and wgmma not serialised (C7511/C7512)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    assert not re.search(r"C75(07|11|12)", report), report
    cuobjdump = Path(nvcc()).resolve().parent / "cuobjdump"
    if not cuobjdump.exists():
        import triton
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    # QK: 36 k-steps over the 576 columns, 31 of them with Q (A) from registers; PV: 4
    # k-steps over the 64 keys of a tile
    assert sass.count("HGMMA.64x64x16.F32.BF16") == 36
    assert len(re.findall(r"HGMMA\.64x64x16\.F32\.BF16 R\d+, R\d+,", sass)) == 31
    assert sass.count("HGMMA.64x256x16.F32.BF16") == 4
    assert "UTMALDG.3D" in sass                             # tiles arrive by TMA
    assert "LDSM" in sass and "STSM" in sass                # Q fragments in, P out
    assert "USETMAXREG.TRY_ALLOC" in sass and "USETMAXREG.DEALLOC" in sass   # setmaxnreg


# ---- on an sm_90 GPU -----------------------------------------------------------------------

def _paged(lengths, page, seed):
    """bf16 cache with NaN in every row outside the contexts, shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // page)) for n in lengths]
    nb = sum(need) + 2
    cache = torch.full((nb, page, R), float("nan"))
    perm = torch.randperm(nb, generator=g).tolist()
    tables = []
    for n, k in zip(lengths, need):
        blocks, perm = perm[:k], perm[k:]
        rows = torch.randn(k * page, R, generator=g)
        rows[n:] = float("nan")                  # the page tail past the context
        cache[blocks] = rows.view(k, page, R)
        tables.append(blocks)
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache.to("cuda", torch.bfloat16), bt.cuda()


def _rel(out, ref):
    assert not out.isnan().any(), "NaN in the kernel's output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _reference(q, cache, bt, lens):
    clean = torch.nan_to_num(cache.float(), nan=0.0)
    return mla_decode_reference(q.float(), clean, bt, lens, SCALE, L)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("page", [8, 16, 64, 128, 192])   # boxes per (page part, panel) / 3 per tile
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
def test_decode_128_heads_matches_reference(page, splits):
    lengths = [1, 63, 64, 65, 700, 3001]
    cache, bt = _paged(lengths, page, seed=page + (splits or 0))
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), 128, R, device="cuda").to(torch.bfloat16)
    out = torch.full((len(lengths), 128, L), float("nan"), device="cuda", dtype=torch.bfloat16)
    out[:] = cmla.decode_rows(q, cache, bt, lens, SCALE, L, splits=splits)
    assert _rel(out, _reference(q, cache, bt, lens)) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("q_len,heads", [(2, 16), (4, 16), (3, 32)])
def test_decode_folded_rows_are_causal(q_len, heads):
    lengths = [q_len, 70, 1000, 4100]
    cache, bt = _paged(lengths, 64, seed=q_len)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), q_len, heads, R, device="cuda").to(torch.bfloat16)
    for splits in (None, 1, 5):
        out = cmla.mla_decode_folded(q, cache, bt, lens, SCALE, L, splits=splits)
        ref = torch.stack([_reference(q[:, i], cache, bt, lens - (q_len - 1 - i))
                           for i in range(q_len)], dim=1)
        assert _rel(out, ref) < 1e-2


@gpu
@pytest.mark.gpu
def test_empty_context_gives_zeros_and_leaves_others_alone():
    lengths = [0, 300]
    cache, bt = _paged(lengths, 64, seed=9)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(2, 64, R, device="cuda").to(torch.bfloat16)
    for splits in (1, 4):
        out = cmla.decode_rows(q, cache, bt, lens, SCALE, L, splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert _rel(out[1:], _reference(q[1:], cache, bt[1:], lens[1:])) < 1e-2


@gpu
@pytest.mark.gpu
def test_public_op_selects_cuda_for_128_heads_only():
    lengths = [500, 2000]
    cache, bt = _paged(lengths, 64, seed=11)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    dev = torch.device("cuda")
    assert REGISTRY.select("mla_decode", _query(dev)).backend == "cuda"
    assert REGISTRY.select("mla_decode", _query(dev, heads=16)).backend == "triton"
    q = torch.randn(2, 128, R, device="cuda").to(torch.bfloat16)
    out = mla_decode(q, cache, bt, lens, SCALE, L)
    assert _rel(out, _reference(q, cache, bt, lens)) < 1e-2
