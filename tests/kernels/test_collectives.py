"""Collectives on real CPU process groups (gloo) against a single-process computation of the
same math on the full tensors; the fused all-reduce + add + RMSNorm bitwise against the
unfused sequence, and the same for all_reduce + add + LayerNorm (with its Triton backend
too, under the interpreter); identity behaviour without torch.distributed; shape (fake)
impls.

One spawn serves every world size: WORLD_SIZES[0] processes run the checks at that size,
tear the group down, and the first WORLD_SIZES[1] of them form a new group, and so on.
Each rank saves what it computed; the tests here rebuild every rank's inputs from the same
seeds and compare. This file is also the worker: `python test_collectives.py RANK DIR`.

Legend: W world size, r rank.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tscompile.kernels import (
    all_gather, all_reduce, all_reduce_add_layer_norm, all_reduce_add_rms_norm, all_to_all,
    fused_add_layer_norm, fused_add_rms_norm, reduce_scatter,
)

WORLD_SIZES = (4, 2)             # descending: each later group is a prefix of the ranks
EPS = 1e-6
GATHER_DIMS = (0, 1, -1)         # all_gather of a [3, 4, 5] part
SCATTER_DIMS = (0, -1)           # reduce_scatter of an [8, 12] partial sum
A2A_DIMS = ((0, 2), (2, 1), (0, 0), (-1, 0))  # (split_dim, concat_dim) on an [8, 4, 12]


# ---------------------------------------------------------------------------------------
# Inputs: a pure function of (W, r), rebuilt identically by the workers and by the tests

def rank_inputs(world: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * world + rank)
    return {
        "partial": torch.randn(8, 12, generator=g),      # P: this rank's summand
        "part": torch.randn(3, 4, 5, generator=g),       # S(d): this rank's part
        "a2a": torch.randn(8, 4, 12, generator=g),
        "x": torch.randn(6, 16, generator=g) * 2,        # the fused op's partial input
    }


def shared_inputs(world: int) -> dict[str, torch.Tensor]:
    """R values: the same on every rank."""
    g = torch.Generator().manual_seed(7 + world)
    return {
        "residual": torch.randn(6, 16, generator=g),
        "weight": torch.rand(16, generator=g) + 0.5,
        "full": torch.randn(8, 12, generator=g),         # for the S(0) → S(1) row
        "bias": torch.randn(16, generator=g),            # LayerNorm's
    }


# ---------------------------------------------------------------------------------------
# Worker

def run_checks(world: int, rank: int) -> dict:
    """Everything a rank computes inside a group of `world` ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inp, shared = rank_inputs(world, rank), shared_inputs(world)
    out: dict = {"world_size": dist.get_world_size(), "rank": dist.get_rank()}
    out["all_reduce"] = all_reduce(inp["partial"])
    out["all_gather"] = {d: all_gather(inp["part"], d) for d in GATHER_DIMS}
    out["reduce_scatter"] = {d: reduce_scatter(inp["partial"], d) for d in SCATTER_DIMS}
    out["all_to_all"] = {sc: all_to_all(inp["a2a"], *sc) for sc in A2A_DIMS}
    # S(0) → S(1): hold rows r of `full`, receive columns r.
    out["s0_to_s1"] = all_to_all(shared["full"].chunk(world, 0)[rank], 1, 0)

    residual, weight = shared["residual"], shared["weight"]
    out["fused"] = all_reduce_add_rms_norm(inp["x"], residual, weight, EPS)
    out["unfused"] = fused_add_rms_norm(all_reduce(inp["x"]), residual, weight, EPS)
    out["input_untouched"] = torch.equal(inp["x"], rank_inputs(world, rank)["x"])
    bias = shared["bias"]
    out["fused_ln"] = all_reduce_add_layer_norm(inp["x"], residual, weight, bias, EPS)
    out["unfused_ln"] = fused_add_layer_norm(all_reduce(inp["x"]), residual, weight, bias, EPS)
    try:       # the triton backend (interpreter here): the reference all-reduce, then its kernel
        from tscompile.kernels.triton.norm import all_reduce_add_layer_norm_triton
        out["triton_ln"] = all_reduce_add_layer_norm_triton(inp["x"], residual, weight, bias, EPS)
    except ImportError:
        out["triton_ln"] = None

    errors = {}
    for name, call in [("reduce_scatter", lambda: reduce_scatter(torch.zeros(4, 5), 1)),
                       ("all_to_all", lambda: all_to_all(torch.zeros(4, 5), -1, 0))]:
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors

    with FakeTensorMode():
        x = torch.empty(8, 4, 12)
        out["fake_shapes"] = {
            "all_reduce": tuple(all_reduce(x).shape),
            "all_gather": tuple(all_gather(x, 1).shape),
            "reduce_scatter": tuple(reduce_scatter(x, 0).shape),
            "all_to_all": tuple(all_to_all(x, 2, 0).shape),
            "fused": tuple(all_reduce_add_rms_norm(x, x, torch.empty(12), EPS)[0].shape),
        }
    return out


def worker_main(rank: int, outdir: Path) -> None:
    torch.set_num_threads(1)
    for world in WORLD_SIZES:
        if rank >= world:
            break
        dist.init_process_group("gloo", init_method=f"file://{outdir}/store_w{world}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
        try:
            torch.save(run_checks(world, rank), outdir / f"w{world}_r{rank}.pt")
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# The one spawn

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    """{W: [rank 0's results, ..., rank W-1's]} from one spawn of max(W) processes."""
    outdir = tmp_path_factory.mktemp("collectives")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(WORLD_SIZES[0]):
        log = open(outdir / f"log_r{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, str(rank), str(outdir)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
    # A rank that fails leaves the others blocked in a collective: stop them at once.
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c for c in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n"
                         + (outdir / f"log_r{r}.txt").read_text() for r, p in enumerate(procs))
        pytest.fail(f"collective workers failed:\n{logs[-6000:]}")
    return {w: [torch.load(outdir / f"w{w}_r{r}.pt", weights_only=False) for r in range(w)]
            for w in WORLD_SIZES}


# ---------------------------------------------------------------------------------------
# Distributed checks, against the math on the full tensors

world_sizes = pytest.mark.parametrize("world", WORLD_SIZES)


@world_sizes
def test_group_is_the_world(results, world):
    assert [(o["world_size"], o["rank"]) for o in results[world]] == [(world, r)
                                                                      for r in range(world)]


@world_sizes
def test_all_reduce_sums_and_replicates(results, world):
    total = sum(rank_inputs(world, r)["partial"] for r in range(world))
    got = [o["all_reduce"] for o in results[world]]
    torch.testing.assert_close(got[0], total, rtol=1e-6, atol=1e-6)
    for g in got[1:]:   # R: every rank holds exactly the same values
        assert torch.equal(g, got[0])


@world_sizes
def test_all_gather_concatenates_in_rank_order(results, world):
    parts = [rank_inputs(world, r)["part"] for r in range(world)]
    for d in GATHER_DIMS:
        want = torch.cat(parts, dim=d)
        for o in results[world]:
            assert torch.equal(o["all_gather"][d], want), f"dim {d}"


@world_sizes
def test_reduce_scatter_keeps_own_part_of_sum(results, world):
    total = sum(rank_inputs(world, r)["partial"] for r in range(world))
    for d in SCATTER_DIMS:
        for r, o in enumerate(results[world]):
            torch.testing.assert_close(o["reduce_scatter"][d], total.chunk(world, d)[r],
                                       rtol=1e-6, atol=1e-6, msg=f"dim {d} rank {r}")


@world_sizes
def test_all_to_all_sends_part_j_to_rank_j(results, world):
    xs = [rank_inputs(world, r)["a2a"] for r in range(world)]
    for split, concat in A2A_DIMS:
        for r, o in enumerate(results[world]):
            want = torch.cat([x.chunk(world, split)[r] for x in xs], dim=concat)
            assert torch.equal(o["all_to_all"][(split, concat)], want), (split, concat, r)


@world_sizes
def test_all_to_all_redistributes_s0_to_s1(results, world):
    full = shared_inputs(world)["full"]
    for r, o in enumerate(results[world]):
        assert torch.equal(o["s0_to_s1"], full.chunk(world, 1)[r])


@world_sizes
def test_fused_all_reduce_add_rms_norm(results, world):
    shared = shared_inputs(world)
    total = sum(rank_inputs(world, r)["x"] for r in range(world))
    want_y, want_s = fused_add_rms_norm(total, shared["residual"], shared["weight"], EPS)
    for r, o in enumerate(results[world]):
        (y, s), (uy, us) = o["fused"], o["unfused"]
        assert torch.equal(y, uy) and torch.equal(s, us), f"rank {r}: fused != unfused"
        torch.testing.assert_close(s, want_s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        assert o["input_untouched"]


@world_sizes
def test_fused_all_reduce_add_layer_norm(results, world):
    shared = shared_inputs(world)
    total = sum(rank_inputs(world, r)["x"] for r in range(world))
    want_y, want_s = fused_add_layer_norm(total, shared["residual"], shared["weight"],
                                          shared["bias"], EPS)
    for r, o in enumerate(results[world]):
        (y, s), (uy, us) = o["fused_ln"], o["unfused_ln"]
        assert torch.equal(y, uy) and torch.equal(s, us), f"rank {r}: fused != unfused"
        torch.testing.assert_close(s, want_s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        if o["triton_ln"] is not None:
            ty, ts = o["triton_ln"]
            assert torch.equal(ts, s)
            torch.testing.assert_close(ty, y, rtol=1e-5, atol=1e-5)


@world_sizes
def test_indivisible_dims_name_dim_size_and_world(results, world):
    for o in results[world]:
        errors = o["errors"]
        assert errors["reduce_scatter"] is not None and errors["all_to_all"] is not None
        assert "reduce_scatter: dim 1" in errors["reduce_scatter"]
        assert "all_to_all: split_dim 1" in errors["all_to_all"]
        for msg in errors.values():
            assert f"size 5, which does not split over world size {world}" in msg


@world_sizes
def test_fake_shapes_follow_world_size(results, world):
    for o in results[world]:
        assert o["fake_shapes"] == {
            "all_reduce": (8, 4, 12),
            "all_gather": (8, 4 * world, 12),
            "reduce_scatter": (8 // world, 4, 12),
            "all_to_all": (8 * world, 4, 12 // world),
            "fused": (8, 4, 12),
        }


# ---------------------------------------------------------------------------------------
# Without torch.distributed: every op is the identity

def test_identity_without_process_group():
    assert not (dist.is_available() and dist.is_initialized())
    x = torch.randn(4, 6, 8)
    for y in [all_reduce(x), all_gather(x, 1), all_gather(x, -1), reduce_scatter(x, 0),
              reduce_scatter(x, 2), all_to_all(x, 0, 2), all_to_all(x, 1, 1)]:
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()   # a copy, not an alias
    strided = x.transpose(0, 2)
    assert torch.equal(all_reduce(strided), strided) and all_reduce(strided).is_contiguous()

    residual, weight = torch.randn(4, 6, 8), torch.rand(8) + 0.5
    y, s = all_reduce_add_rms_norm(x, residual, weight, EPS)
    want_y, want_s = fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)


def test_fake_shapes_without_process_group():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5)
        assert all_gather(x, 1).shape == reduce_scatter(x, 1).shape == (3, 5)
        assert all_to_all(x, 0, 1).shape == (3, 5)


def test_bad_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"all_gather: dim=2 is out of range .*\[2, 4\]"):
        all_gather(x, 2)
    with pytest.raises(ValueError, match=r"all_to_all: concat_dim=-3 is out of range"):
        all_to_all(x, 0, -3)
    with pytest.raises(ValueError, match=r"all_reduce_add_rms_norm: .*disagree"):
        all_reduce_add_rms_norm(x, torch.randn(2, 4), torch.ones(3), EPS)


def test_collectives_dispatch_through_registry(monkeypatch):
    monkeypatch.setenv("TSCOMPILE_KERNELS", "all_reduce=nonexistent")
    with pytest.raises(RuntimeError, match=r"all_reduce=nonexistent.*available: reference"):
        all_reduce(torch.randn(3))


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), Path(sys.argv[2]))
