// Paged MLA decode (absorbed, split-KV), Hopper sm_90a: TMA + mbarriers + wgmma.
//
// The "cuda" backend of `mla_decode` (and of q-length folded decode) for 32 or more query
// rows per sequence (128 heads; 16 heads x q_len 2-4), where the Triton kernel is bound by
// its dots and softmax (kernels/triton/mla.py). Layouts, split rule and partial format are
// the Triton kernel's: q [B, M, 576] (row m = token m / H, head m % H), the latent cache
// [blocks, PS, 576] bf16, partials o [B, M, S, 512] fp32 and lse [B, M, S] in log2 units,
// merged by the Triton reduce kernel.
//
// One CTA = 64 query rows x one split of one sequence, 256 threads in two warpgroups:
//   WG0: S = Q K^T (wgmma m64n64k16, Q and K from shared memory, 36 k-steps over 576),
//        masking, online softmax in fp32 (exp2, scale folded into log2 e), P -> bf16 in
//        registers and a copy to shared memory, then O[:, 0:256] += P V[:, 0:256]
//        (wgmma m64n256k16, A from registers, V = the same K tile read MN-major).
//   WG1: O[:, 256:512] += P V[:, 256:512] (A = P from shared memory), rescaled by WG0's
//        per-row alpha; its first thread is the producer: TMA loads of the next tiles.
// K tiles: 64 keys x 576 bf16 = 9 column panels of [64 rows x 128 B], 128B-swizzled, two
// stages (with Q: 3 x 72 KB + P 8 KB of shared memory, one CTA per SM). A tile is loaded
// with one TMA box per (page part, panel) over the cache viewed as [blocks * PS, 576], so
// any page size that is a multiple of 8 (<= 64) or of 64 works; rows past the split's end
// are zeroed in shared memory before use (P is 0 there, and 0 * garbage could be NaN).
// Synchronisation: full[s] (TMA bytes landed), empty[s] (8 warps done with stage s), named
// barriers 1 (P and alpha of a tile ready: WG0 arrives, WG1 syncs), 2 (WG1 done reading P:
// WG1 arrives, WG0 syncs before overwriting), 3 (final l and m), 4 (tail zeroing).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wgmma_gen.cuh"

#define DEV __device__ __forceinline__

namespace {

constexpr int BN = 64;                       // keys per tile
constexpr int RANK = 512, WIDTH = 576, PANELS = WIDTH / 64;
constexpr int PANEL = 64 * 128;              // bytes: 64 rows x 128 B
constexpr int TILE = PANELS * PANEL;         // 73728 B
constexpr int THREADS = 256;
constexpr int OFF_KV = TILE, OFF_P = 3 * TILE, OFF_F = OFF_P + PANEL;
constexpr int OFF_BAR = OFF_F + 3 * 64 * 4;  // alpha, l, m: 64 floats each
constexpr int SMEM_BYTES = OFF_BAR + 4 * 8 + 1024;   // + slack to align the base to 1 KB

struct Params {
  const __nv_bfloat16* q;
  long long stride_qb, stride_qm;
  const int* block_tables;
  long long stride_btb;
  const int* seq_lens;
  __nv_bfloat16* out;
  long long stride_ob, stride_om;
  float* part_o;
  float* part_lse;
  float qk_scale;                            // softmax scale * log2(e)
  int rows, heads, q_len, splits, page_size, box_rows;
};

DEV uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// wgmma shared-memory matrix descriptors, 128-byte swizzle (mode 1 in bits 62-63).
// K-major panel: rows 128 B apart, 8-row groups 1024 B apart (SBO); LBO unused (1).
DEV uint64_t desc_k(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
         ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// MN-major (V read from the K tile): 64-wide column panels 8 KB apart (LBO), 8-key groups
// 1024 B apart (SBO).
DEV uint64_t desc_mn(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(PANEL >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
DEV void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <int N> DEV void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
DEV void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
DEV void bar_sync(int id) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory"); }
DEV void bar_arrive(int id) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory"); }

DEV void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
DEV void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
DEV void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
DEV void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
DEV void tma_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)),
      "r"(x), "r"(y), "r"(bar) : "memory");
}
DEV uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Issue the TMA loads of tile `t` of this split into stage t % 2 (one thread).
DEV void load_tile(const CUtensorMap* map, const Params& p, const int* bt, int start, int end,
                   int t, uint32_t kv, uint32_t full) {
  const int n0 = start + t * BN;
  const int stage = t & 1;
  const int parts = BN / p.box_rows;         // boxes per panel: 1 when PS >= 64
  int issued = 0;
  for (int part = 0; part < parts; ++part) issued += (n0 + part * p.box_rows < end);
  mbar_expect_tx(full + 8 * stage, issued * p.box_rows * WIDTH * 2);
  for (int part = 0; part < issued; ++part) {
    const int pos = n0 + part * p.box_rows;
    const int row = bt[pos / p.page_size] * p.page_size + pos % p.page_size;
    const uint32_t dst = kv + stage * TILE + part * p.box_rows * 128;
#pragma unroll
    for (int pn = 0; pn < PANELS; ++pn) tma_2d(dst + pn * PANEL, map, full + 8 * stage, pn * 64, row);
  }
}

// Rows [valid, 64) of a stage: zero in every panel (the generic-proxy writes are fenced
// for the tensor cores by the caller).
DEV void zero_tail(uint8_t* tile, int valid, int tid) {
  const int n = PANELS * (BN - valid) * 8;   // 16-byte chunks
  for (int i = tid; i < n; i += THREADS) {
    const int pn = i / ((BN - valid) * 8), rem = i % ((BN - valid) * 8);
    *reinterpret_cast<uint4*>(tile + pn * PANEL + (valid + rem / 8) * 128 + (rem % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

// Q rows of row group `grp` -> shared memory, 128B-swizzled panels; rows past M are zero.
DEV void load_q(uint8_t* smem, const Params& p, int grp, int b, int tid, int nthreads) {
  for (int i = tid; i < 64 * (WIDTH / 8); i += nthreads) {
    const int r = i / (WIDTH / 8), c = i % (WIDTH / 8), row = grp * 64 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < p.rows)
      v = __ldg(reinterpret_cast<const uint4*>(p.q + b * p.stride_qb + row * p.stride_qm) + c);
    *reinterpret_cast<uint4*>(smem + (c / 8) * PANEL + r * 128 + (((c % 8) ^ (r & 7)) << 4)) = v;
  }
}

__global__ void __launch_bounds__(THREADS, 1)
    mla_decode_sm90_kernel(const __grid_constant__ CUtensorMap kv_map, const Params p) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  uint8_t* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  const uint32_t s_q = smem_u32(smem), s_kv = s_q + OFF_KV, s_p = s_q + OFF_P;
  float* s_alpha = reinterpret_cast<float*>(smem + OFF_F);
  float* s_l = s_alpha + 64;
  float* s_m = s_l + 64;
  const uint32_t full = s_q + OFF_BAR, empty = full + 16;

  const int grp = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, quad = lane % 4;
  const int r0 = ((tid % 128) / 32) * 16 + lane / 4, r1 = r0 + 8;   // rows of this thread
  const int seq_len = p.seq_lens[b];
  const int chunk = ((seq_len + p.splits - 1) / p.splits + BN - 1) / BN * BN;
  const int start = split * chunk;
  const int end = min(start + chunk, seq_len);
  const int ntiles = end > start ? (end - start + BN - 1) / BN : 0;
  const int* bt = p.block_tables + b * p.stride_btb;

  if (tid == 0) {
    mbar_init(full, 1);
    mbar_init(full + 8, 1);
    mbar_init(empty, 8);
    mbar_init(empty + 8, 8);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (tid == 128)
    for (int t = 0; t < min(2, ntiles); ++t) load_tile(&kv_map, p, bt, start, end, t, s_kv, full);

  load_q(smem, p, grp, b, tid, THREADS);
  fence_async_smem();
  __syncthreads();

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;   // WG0: row max, partial sums

  for (int t = 0; t < ntiles; ++t) {
    const int stage = t & 1;
    const uint32_t parity = (t >> 1) & 1;
    const int n0 = start + t * BN;
    const uint32_t kv = s_kv + stage * TILE;
    mbar_wait(full + 8 * stage, parity);
    if (end - n0 < BN) {                     // the split's last, partial tile
      zero_tail(smem + OFF_KV + stage * TILE, end - n0, tid);
      fence_async_smem();
      bar_sync(4);
    }
    if (wg == 0) {
      float sc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) sc[i] = 0.f;
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < WIDTH / 16; ++kk) {
        const uint32_t off = (kk / 4) * PANEL + (kk % 4) * 32;
        wgmma_m64n64k16_ss(sc, desc_k(s_q + off), desc_k(kv + off), kk > 0);
      }
      wg_commit();
      wg_wait0();
      fence_regs(sc);
      // Keys a row may not see: past the split's end, or (q_len > 1) after its own token.
      if (n0 + BN > end || (p.q_len > 1 && n0 + BN > seq_len - p.q_len + 1)) {
        const int base = seq_len - p.q_len + 1;
        const int lim0 = min(end, base + (grp * 64 + r0) / p.heads);
        const int lim1 = min(end, base + (grp * 64 + r1) / p.heads);
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int pos = n0 + 8 * j + 2 * quad + e;
            if (pos >= lim0) sc[4 * j + e] = -INFINITY;
            if (pos >= lim1) sc[4 * j + 2 + e] = -INFINITY;
          }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
      }
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, o));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, o));
      }
      const float mn0 = fmaxf(m0, mx0 * p.qk_scale), mn1 = fmaxf(m1, mx1 * p.qk_scale);
      const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
      const float a0 = exp2f(m0 - ms0), a1 = exp2f(m1 - ms1);
      m0 = mn0;
      m1 = mn1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          sc[4 * j + e] = exp2f(fmaf(sc[4 * j + e], p.qk_scale, -ms0));
          sc[4 * j + 2 + e] = exp2f(fmaf(sc[4 * j + 2 + e], p.qk_scale, -ms1));
          sum0 += sc[4 * j + e];
          sum1 += sc[4 * j + 2 + e];
        }
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      uint32_t pa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[kk][i] = pack_bf16(sc[8 * kk + 2 * i], sc[8 * kk + 2 * i + 1]);
      if (t > 0) bar_sync(2);                // WG1 has finished with P and alpha of t - 1
#pragma unroll
      for (int j = 0; j < 8; ++j) {          // P -> shared, K-major, 128B-swizzled
        const uint32_t col = (((j ^ (r0 & 7)) << 4) + 4 * quad);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(s_p + r0 * 128 + col),
                     "r"(pa[j / 2][(j % 2) * 2]) : "memory");
        const uint32_t col1 = (((j ^ (r1 & 7)) << 4) + 4 * quad);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(s_p + r1 * 128 + col1),
                     "r"(pa[j / 2][(j % 2) * 2 + 1]) : "memory");
      }
      if (quad == 0) {
        s_alpha[r0] = a0;
        s_alpha[r1] = a1;
      }
      fence_async_smem();
      bar_arrive(1);
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j] *= a0;
        acc[4 * j + 1] *= a0;
        acc[4 * j + 2] *= a1;
        acc[4 * j + 3] *= a1;
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs_tb(acc, pa[kk], desc_mn(kv + kk * 2048));
      wg_commit();
      wg_wait0();
      fence_regs(acc);
    } else {
      bar_sync(1);                           // P and alpha of tile t
      const float a0 = s_alpha[r0], a1 = s_alpha[r1];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j] *= a0;
        acc[4 * j + 1] *= a0;
        acc[4 * j + 2] *= a1;
        acc[4 * j + 3] *= a1;
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss_tb(acc, desc_k(s_p + kk * 32), desc_mn(kv + 4 * PANEL + kk * 2048));
      wg_commit();
      wg_wait0();
      fence_regs(acc);
      if (t + 1 < ntiles) bar_arrive(2);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * stage);
    if (tid == 128 && t + 2 < ntiles) {      // the producer refills this stage
      mbar_wait(empty + 8 * stage, parity);
      load_tile(&kv_map, p, bt, start, end, t + 2, s_kv, full);
    }
  }

  if (wg == 0) {
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      l0 += __shfl_xor_sync(0xffffffff, l0, o);
      l1 += __shfl_xor_sync(0xffffffff, l1, o);
    }
    if (quad == 0) {
      s_l[r0] = l0;
      s_l[r1] = l1;
      s_m[r0] = m0;
      s_m[r1] = m1;
    }
    bar_arrive(3);
  } else {
    bar_sync(3);
    l0 = s_l[r0];
    l1 = s_l[r1];
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 1.f, inv1 = l1 > 0.f ? 1.f / l1 : 1.f;
  const int g0 = grp * 64 + r0, g1 = grp * 64 + r1, col0 = wg * 256 + 2 * quad;
  if (p.splits == 1) {
    __nv_bfloat16* o0 = p.out + b * p.stride_ob + (long long)g0 * p.stride_om + col0;
    __nv_bfloat16* o1 = p.out + b * p.stride_ob + (long long)g1 * p.stride_om + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (g0 < p.rows)
        *reinterpret_cast<uint32_t*>(o0 + 8 * j) = pack_bf16(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
      if (g1 < p.rows)
        *reinterpret_cast<uint32_t*>(o1 + 8 * j) = pack_bf16(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
    }
  } else {
    const long long i0 = ((long long)b * p.rows + g0) * p.splits + split;
    const long long i1 = ((long long)b * p.rows + g1) * p.splits + split;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (g0 < p.rows)
        *reinterpret_cast<float2*>(p.part_o + i0 * RANK + col0 + 8 * j) =
            make_float2(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
      if (g1 < p.rows)
        *reinterpret_cast<float2*>(p.part_o + i1 * RANK + col0 + 8 * j) =
            make_float2(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
    }
    if (wg == 0 && quad == 0) {
      if (g0 < p.rows) p.part_lse[i0] = l0 > 0.f ? m0 + log2f(l0) : -INFINITY;
      if (g1 < p.rows) p.part_lse[i1] = l1 > 0.f ? m1 + log2f(l1) : -INFINITY;
    }
  }
}


// ---- v2: three warpgroups ----------------------------------------------------------------
// WG0 only computes QK and the softmax; WG1 / WG2 each own one 256-column half of O (A = P
// from shared memory), so PV of tile t overlaps QK of tile t + 1 on the tensor cores; WG2's
// first thread is the producer. Shared memory as in v1 (Q, two K stages, P).
// (Tried and dropped: Q held in WG0's registers as wgmma A fragments with a third K stage in
// the freed 72 KB; 144 Q + 32 score registers left WG0 spilling under setmaxnreg 192/160,
// ptxas serialised its wgmma, and the kernel hung on the H100.)
constexpr int THREADS3 = 384;
constexpr int OFF3_P = 3 * TILE, OFF3_F = OFF3_P + PANEL, OFF3_BAR = OFF3_F + 3 * 64 * 4;
constexpr int SMEM3_BYTES = OFF3_BAR + 2 * 3 * 8 + 1024;

DEV void bar_sync_n(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
DEV void bar_arrive_n(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

DEV uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
DEV void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Arrive on the mbarrier at the same shared-memory offset in CTA `cta` of the cluster.
DEV void mbar_arrive_cta(uint32_t bar, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(cta));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
// TMA into the same offsets of every CTA in `mask`, completing bytes on each one's `bar`.
DEV void tma_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int x, int y,
                          uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar), "h"(mask) : "memory");
}

constexpr int STAGES3 = 2;
// MCAST: this CTA issues panels [pn0, pn1) to both CTAs of its pair; its own barrier still
// expects the whole tile (the peer's half completes on it too).
template <bool MCAST>
DEV void load_tile3(const CUtensorMap* map, const Params& p, const int* bt, int start, int end,
                    int t, uint32_t kv, uint32_t full, int pn0 = 0, int pn1 = PANELS) {
  const int n0 = start + t * BN;
  const int stage = t % STAGES3;
  const int parts = BN / p.box_rows;
  int issued = 0;
  for (int part = 0; part < parts; ++part) issued += (n0 + part * p.box_rows < end);
  mbar_expect_tx(full + 8 * stage, issued * p.box_rows * WIDTH * 2);
  for (int part = 0; part < issued; ++part) {
    const int pos = n0 + part * p.box_rows;
    const int row = bt[pos / p.page_size] * p.page_size + pos % p.page_size;
    const uint32_t dst = kv + stage * TILE + part * p.box_rows * 128;
    for (int pn = pn0; pn < pn1; ++pn) {
      if constexpr (MCAST)
        tma_2d_multicast(dst + pn * PANEL, map, full + 8 * stage, pn * 64, row, 0x3);
      else
        tma_2d(dst + pn * PANEL, map, full + 8 * stage, pn * 64, row);
    }
  }
}

template <bool QREG, bool MCAST>
__global__ void __launch_bounds__(THREADS3, 1)
    mla_decode_sm90_ws3_kernel(const __grid_constant__ CUtensorMap kv_map, const Params p) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  uint8_t* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  uint8_t* kv_smem = smem + TILE;
  const uint32_t s_q = smem_u32(smem), s_kv = smem_u32(kv_smem), s_p = s_q + OFF3_P;
  float* s_alpha = reinterpret_cast<float*>(smem + OFF3_F);
  float* s_l = s_alpha + 64;
  float* s_m = s_l + 64;
  const uint32_t full = s_q + OFF3_BAR, empty = full + 8 * STAGES3;

  const int grp = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, quad = lane % 4;
  const int r0 = ((tid % 128) / 32) * 16 + lane / 4, r1 = r0 + 8;
  const int seq_len = p.seq_lens[b];
  const int chunk = ((seq_len + p.splits - 1) / p.splits + BN - 1) / BN * BN;
  const int start = split * chunk;
  const int end = min(start + chunk, seq_len);
  const int ntiles = end > start ? (end - start + BN - 1) / BN : 0;
  const int* bt = p.block_tables + b * p.stride_btb;
  const int g0 = grp * 64 + r0, g1 = grp * 64 + r1;
  // MCAST: the CTAs of a cluster are row groups 2k and 2k + 1 of one split; a stage is free
  // once every warp of BOTH has released it (each warp arrives on both CTAs' barrier).
  const uint32_t peer = MCAST ? cluster_rank() ^ 1u : 0u;
  const auto release = [&](int stage) {
    mbar_arrive(empty + 8 * stage);
    if constexpr (MCAST) mbar_arrive_cta(empty + 8 * stage, peer);
  };
  const int pn0 = MCAST ? (peer ? 0 : 5) : 0, pn1 = MCAST ? (peer ? 5 : PANELS) : PANELS;

  if (tid == 0) {
    for (int s = 0; s < STAGES3; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, MCAST ? 24 : 12);   // every warp of the three warpgroups
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  load_q(smem, p, grp, b, tid, THREADS3);
  fence_async_smem();
  if constexpr (MCAST)
    cluster_sync();                          // both CTAs' barriers exist before any TMA
  else
    __syncthreads();

  if (wg == 0) {
    // QREG: Q's first 7 panels (k-chunks 0..27) as wgmma A fragments: chunk kk holds
    // (r0, 16kk + 2q..+1), (r1, same), (r0, 16kk + 8 + 2q..+1), (r1, same); the last two
    // panels are read from shared memory (8 in registers spilled and serialised the wgmma). The launch holds 168 x 384 registers: WG0 takes 184, WG1/WG2
    // 160 (184 + 2 x 160 = 3 x 168; asking for more than the launch holds never returns).
    constexpr int QK_REG = QREG ? 28 : 0;   // 7 of 9 panels (8 spill)
    uint32_t qa[QREG ? QK_REG : 1][4];
    if constexpr (QREG) {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 184;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < QK_REG; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i % 2 ? r1 : r0, c = 16 * kk + 8 * (i / 2) + 2 * quad;
          qa[kk][i] = *reinterpret_cast<const uint32_t*>(
              smem + (c / 64) * PANEL + r * 128 + ((((c % 64) / 8) ^ (r & 7)) << 4) + (c % 8) * 2);
        }
    }
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    float sc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) sc[i] = 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % STAGES3;
      const uint32_t parity = (t / STAGES3) & 1;
      const int n0 = start + t * BN;
      const uint32_t kv = s_kv + stage * TILE;
      mbar_wait(full + 8 * stage, parity);
      if (end - n0 < BN) {                   // the split's last, partial tile: WG0 zeroes it
        const int valid = end - n0, n = PANELS * (BN - valid) * 8;
        for (int i = tid; i < n; i += 128) {
          const int pn = i / ((BN - valid) * 8), rem = i % ((BN - valid) * 8);
          *reinterpret_cast<uint4*>(kv_smem + stage * TILE + pn * PANEL + (valid + rem / 8) * 128 +
                                    (rem % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_async_smem();
        bar_sync_n(5, 128);
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < WIDTH / 16; ++kk) {
        const uint32_t off = (kk / 4) * PANEL + (kk % 4) * 32;
        if (kk < QK_REG)
          wgmma_m64n64k16_rs(sc, qa[kk < QK_REG ? kk : 0], desc_k(kv + off), kk > 0);
        else
          wgmma_m64n64k16_ss(sc, desc_k(s_q + off), desc_k(kv + off), kk > 0);
      }
      wg_commit();
      wg_wait0();
      fence_regs(sc);
      __syncwarp();
      if (lane == 0) release(stage);         // WG0 is done reading this stage
      if (n0 + BN > end || (p.q_len > 1 && n0 + BN > seq_len - p.q_len + 1)) {
        const int base = seq_len - p.q_len + 1;
        const int lim0 = min(end, base + g0 / p.heads), lim1 = min(end, base + g1 / p.heads);
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int pos = n0 + 8 * j + 2 * quad + e;
            if (pos >= lim0) sc[4 * j + e] = -INFINITY;
            if (pos >= lim1) sc[4 * j + 2 + e] = -INFINITY;
          }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
      }
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, o));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, o));
      }
      const float mn0 = fmaxf(m0, mx0 * p.qk_scale), mn1 = fmaxf(m1, mx1 * p.qk_scale);
      const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
      const float a0 = exp2f(m0 - ms0), a1 = exp2f(m1 - ms1);
      m0 = mn0;
      m1 = mn1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          sc[4 * j + e] = exp2f(fmaf(sc[4 * j + e], p.qk_scale, -ms0));
          sc[4 * j + 2 + e] = exp2f(fmaf(sc[4 * j + 2 + e], p.qk_scale, -ms1));
          sum0 += sc[4 * j + e];
          sum1 += sc[4 * j + 2 + e];
        }
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      if (t > 0) bar_sync_n(2, THREADS3);    // WG1 and WG2 are done with P and alpha of t - 1
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(s_p + r0 * 128 + ((j ^ (r0 & 7)) << 4) + 4 * quad),
                     "r"(pack_bf16(sc[4 * j], sc[4 * j + 1])) : "memory");
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(s_p + r1 * 128 + ((j ^ (r1 & 7)) << 4) + 4 * quad),
                     "r"(pack_bf16(sc[4 * j + 2], sc[4 * j + 3])) : "memory");
      }
      if (quad == 0) {
        s_alpha[r0] = a0;
        s_alpha[r1] = a1;
      }
      fence_async_smem();
      bar_arrive_n(1, THREADS3);
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      l0 += __shfl_xor_sync(0xffffffff, l0, o);
      l1 += __shfl_xor_sync(0xffffffff, l1, o);
    }
    if (quad == 0) {
      s_l[r0] = l0;
      s_l[r1] = l1;
      s_m[r0] = m0;
      s_m[r1] = m1;
      if (p.splits > 1) {
        const long long i0 = ((long long)b * p.rows + g0) * p.splits + split;
        const long long i1 = ((long long)b * p.rows + g1) * p.splits + split;
        if (g0 < p.rows) p.part_lse[i0] = l0 > 0.f ? m0 + log2f(l0) : -INFINITY;
        if (g1 < p.rows) p.part_lse[i1] = l1 > 0.f ? m1 + log2f(l1) : -INFINITY;
      }
    }
    bar_arrive_n(3, THREADS3);
  } else {
    if constexpr (QREG) asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    const int half = wg - 1;                 // columns [256 * half, 256 * half + 256)
    if (tid == 256)
      for (int t = 0; t < min(STAGES3, ntiles); ++t)
        load_tile3<MCAST>(&kv_map, p, bt, start, end, t, s_kv, full, pn0, pn1);
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % STAGES3;
      const uint32_t parity = (t / STAGES3) & 1;
      const uint32_t kv = s_kv + stage * TILE;
      mbar_wait(full + 8 * stage, parity);
      bar_sync_n(1, THREADS3);               // P and alpha of tile t
      const float a0 = s_alpha[r0], a1 = s_alpha[r1];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j] *= a0;
        acc[4 * j + 1] *= a0;
        acc[4 * j + 2] *= a1;
        acc[4 * j + 3] *= a1;
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss_tb(acc, desc_k(s_p + kk * 32),
                               desc_mn(kv + half * 4 * PANEL + kk * 2048));
      wg_commit();
      wg_wait0();
      fence_regs(acc);
      if (t + 1 < ntiles) bar_arrive_n(2, THREADS3);
      __syncwarp();
      if (lane == 0) release(stage);
      if (tid == 256 && t + STAGES3 < ntiles) {   // the producer refills this stage
        mbar_wait(empty + 8 * stage, parity);
        load_tile3<MCAST>(&kv_map, p, bt, start, end, t + STAGES3, s_kv, full, pn0, pn1);
      }
      __syncwarp();
    }
    bar_sync_n(3, THREADS3);
    const float l0 = s_l[r0], l1 = s_l[r1];
    const float inv0 = l0 > 0.f ? 1.f / l0 : 1.f, inv1 = l1 > 0.f ? 1.f / l1 : 1.f;
    const int col0 = half * 256 + 2 * quad;
    if (p.splits == 1) {
      __nv_bfloat16* o0 = p.out + b * p.stride_ob + (long long)g0 * p.stride_om + col0;
      __nv_bfloat16* o1 = p.out + b * p.stride_ob + (long long)g1 * p.stride_om + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if (g0 < p.rows)
          *reinterpret_cast<uint32_t*>(o0 + 8 * j) = pack_bf16(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
        if (g1 < p.rows)
          *reinterpret_cast<uint32_t*>(o1 + 8 * j) = pack_bf16(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
      }
    } else {
      const long long i0 = ((long long)b * p.rows + g0) * p.splits + split;
      const long long i1 = ((long long)b * p.rows + g1) * p.splits + split;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if (g0 < p.rows)
          *reinterpret_cast<float2*>(p.part_o + i0 * RANK + col0 + 8 * j) =
              make_float2(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
        if (g1 < p.rows)
          *reinterpret_cast<float2*>(p.part_o + i1 * RANK + col0 + 8 * j) =
              make_float2(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
      }
    }
  }
  if constexpr (MCAST) cluster_sync();      // the peer may still arrive on our barriers
}

}  // namespace

using PFN_encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// C entry points (ctypes). Return 0, a cudaError_t, 10000 + a CUresult of the tensor-map
// encoder, or 20000 + a cudaDriverEntryPointQueryResult.
extern "C" int tsc_mla_decode_sm90_smem_bytes() { return SMEM_BYTES; }

extern "C" int tsc_mla_decode_sm90(const void* q, long long stride_qb, long long stride_qm,
                                   const void* kv, long long kv_rows, const int* block_tables,
                                   long long stride_btb, const int* seq_lens, void* out,
                                   long long stride_ob, long long stride_om, float* part_o,
                                   float* part_lse, float qk_scale, int batch, int rows,
                                   int heads, int q_len, int splits, int page_size,
                                   int variant, void* stream) {
  static bool attr_set = false;
  if (!attr_set) {
    cudaError_t err = cudaFuncSetAttribute(mla_decode_sm90_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    if (err != cudaSuccess) return err;
    for (auto fn : {mla_decode_sm90_ws3_kernel<false, false>, mla_decode_sm90_ws3_kernel<true, false>,
                    mla_decode_sm90_ws3_kernel<true, true>}) {
      err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM3_BYTES);
      if (err != cudaSuccess) return err;
    }
    attr_set = true;
  }
  // The driver's tensor-map encoder through the runtime (no link against libcuda).
  static PFN_encode encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    cudaError_t err = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000, cudaEnableDefault,
        &found);
    if (err != cudaSuccess) return err;
    if (found != cudaDriverEntryPointSuccess || encode == nullptr) return 20000 + (int)found;
  }
  const int box_rows = page_size < BN ? page_size : BN;
  CUtensorMap map;
  cuuint64_t dims[2] = {(cuuint64_t)WIDTH, (cuuint64_t)kv_rows};
  cuuint64_t strides[1] = {(cuuint64_t)WIDTH * 2};
  cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  cuuint32_t elem[2] = {1, 1};
  CUresult res = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                                        const_cast<void*>(kv), dims, strides, box, elem,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return 10000 + (int)res;
  Params p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.stride_qb = stride_qb;
  p.stride_qm = stride_qm;
  p.block_tables = block_tables;
  p.stride_btb = stride_btb;
  p.seq_lens = seq_lens;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.stride_ob = stride_ob;
  p.stride_om = stride_om;
  p.part_o = part_o;
  p.part_lse = part_lse;
  p.qk_scale = qk_scale;
  p.rows = rows;
  p.heads = heads;
  p.q_len = q_len;
  p.splits = splits;
  p.page_size = page_size;
  p.box_rows = box_rows;
  dim3 grid((rows + 63) / 64, splits, batch);
  if (variant == 4) {                        // pairs of row groups in 2-CTA clusters
    if (grid.x % 2) return cudaErrorInvalidValue;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(THREADS3);
    cfg.dynamicSmemBytes = SMEM3_BYTES;
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaError_t err = cudaLaunchKernelEx(&cfg, mla_decode_sm90_ws3_kernel<true, true>, map, p);
    if (err != cudaSuccess) return err;
  } else if (variant == 3)
    mla_decode_sm90_ws3_kernel<true, false><<<grid, THREADS3, SMEM3_BYTES, static_cast<cudaStream_t>(stream)>>>(map, p);
  else if (variant == 2)
    mla_decode_sm90_ws3_kernel<false, false><<<grid, THREADS3, SMEM3_BYTES, static_cast<cudaStream_t>(stream)>>>(map, p);
  else
    mla_decode_sm90_kernel<<<grid, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(map, p);
  return cudaGetLastError();
}
