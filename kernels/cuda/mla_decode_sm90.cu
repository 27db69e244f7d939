// Paged MLA decode (absorbed, split-KV), Hopper sm_90a: TMA + mbarriers + wgmma,
// warp-specialised.
//
// The "cuda" backend of `mla_decode` (and of q-length folded decode) for 32 or more query
// rows per sequence (128 heads; 16 heads x q_len 2-4), where the Triton kernel is bound by
// its dots and softmax (kernels/triton/mla.py). Layouts, split rule and partial format are
// the Triton kernel's: q [B, M, 576] (row m = token m / H, head m % H), the latent cache
// [blocks, PS, 576] bf16, partials o [B, M, S, 512] fp32 and lse [B, M, S] in log2 units,
// merged by the Triton reduce kernel.
//
// One CTA = 64 query rows x one split of one sequence; 384 threads in three warpgroups:
//   WG0: S = Q K^T over a tile of TN keys (wgmma m64n{TN}k16, 36 k-steps over 576). Q's
//        first 7 column panels live in WG0's registers as wgmma A fragments (112 registers),
//        the last 2 in shared memory (all 9 in registers spilled). Then masking and the online
//        softmax in fp32 (exp2, scale folded into log2 e); P (bf16) and the per-row rescale
//        alpha go to shared memory for the other two.
//   WG1 / WG2: O[:, 256h : 256h + 256] += P V[:, 256h : ...] (wgmma m64n256k16, A = P from
//        shared memory, V = the K tile's first 512 columns read MN-major), so the PV of tile t
//        runs on the tensor cores while WG0 computes QK of tile t + 1. WG2's first thread is
//        the producer.
// setmaxnreg: WG0 184 registers, WG1/WG2 160 (the launch holds 168 x 384; asking for more
// than that in total never returns).
// K tiles: TN keys x 576 bf16 = 9 column panels of [TN rows x 128 B], 128B-swizzled, in
// STAGES stages; one TMA box per (page part, panel) over the cache viewed as
// [blocks * PS, 576], so any page size that is a multiple of 8 dividing TN, or a multiple of
// TN, works. Rows past the split's end are zeroed in shared memory before use (P is 0 there,
// and 0 * garbage could be NaN).
// Synchronisation: full[s] (TMA bytes landed), empty[s] (12 warps done with stage s), named
// barriers 1 (P and alpha of a tile ready: WG0 arrives, WG1/WG2 sync), 2 (WG1/WG2 done with
// P: they arrive, WG0 syncs before overwriting), 3 (final l and m), 5 (WG0: tail zeroed),
// 6 (WG0 has read Q's register panels out of the K stages, where they were staged).
// Tried on the H100 and dropped (benchmarks/results/kernels/README.md has the times): two
// warpgroups with PV split between them (WG0 also doing QK); Q wholly in shared memory; pairs
// of row groups in 2-CTA clusters sharing each tile by TMA multicast (a stage then waits for
// both CTAs); 32-key tiles with 4-5 stages (a fixed cost per tile dominates); double-buffered
// P and alpha (slower, with 6 or 7 Q panels in registers).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wgmma_gen.cuh"

#define DEV __device__ __forceinline__

namespace {

constexpr int RANK = 512, WIDTH = 576, PANELS = WIDTH / 64;
constexpr int Q_REG_CHUNKS = 28;             // k-chunks (16 columns) of Q held in registers
constexpr int Q_SMEM_PANEL0 = Q_REG_CHUNKS / 4;   // first Q panel kept in shared memory
constexpr int THREADS = 384;
constexpr int ROW_PANEL = 64 * 128;          // a [64 rows x 128 B] panel (Q, P)

template <int TN, int STAGES>
struct Layout {                              // shared-memory byte offsets (1 KB aligned)
  static constexpr int PANEL = TN * 128;
  static constexpr int TILE = PANELS * PANEL;
  static constexpr int Q = 0;                // Q panels Q_SMEM_PANEL0 .. 8
  static constexpr int KV = (PANELS - Q_SMEM_PANEL0) * ROW_PANEL;
  static constexpr int P = KV + STAGES * TILE;
  static constexpr int F = P + ROW_PANEL;    // alpha, l, m: 64 floats each
  static constexpr int BAR = F + 3 * 64 * 4;
  static constexpr int BYTES = BAR + 2 * STAGES * 8 + 1024;   // + slack to align the base
  static_assert(BYTES <= 227 * 1024, "shared memory");
};

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
// MN-major (V read from the K tile): 64-wide column panels `panel` bytes apart (LBO), 8-key
// groups 1024 B apart (SBO).
DEV uint64_t desc_mn(uint32_t addr, uint32_t panel) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(panel >> 4) << 16) |
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
DEV void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
DEV void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

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


// TMA loads of tile `t` of this split into stage t % STAGES (one thread).
template <int TN, int STAGES>
DEV void load_tile(const CUtensorMap* map, const Params& p, const int* bt, int start, int end,
                   int t, uint32_t kv, uint32_t full) {
  using Lay = Layout<TN, STAGES>;
  const int n0 = start + t * TN;
  const int stage = t % STAGES;
  const int parts = TN / p.box_rows;         // boxes per panel: 1 when PS >= TN
  int issued = 0;
  for (int part = 0; part < parts; ++part) issued += (n0 + part * p.box_rows < end);
  mbar_expect_tx(full + 8 * stage, issued * p.box_rows * WIDTH * 2);
  for (int part = 0; part < issued; ++part) {
    const int pos = n0 + part * p.box_rows;
    const int row = bt[pos / p.page_size] * p.page_size + pos % p.page_size;
    const uint32_t dst = kv + stage * Lay::TILE + part * p.box_rows * 128;
#pragma unroll
    for (int pn = 0; pn < PANELS; ++pn)
      tma_2d(dst + pn * Lay::PANEL, map, full + 8 * stage, pn * 64, row);
  }
}

template <int TN, int STAGES>
__global__ void __launch_bounds__(THREADS, 1)
    mla_decode_sm90_kernel(const __grid_constant__ CUtensorMap kv_map, const Params p) {
  static_assert(TN == 64, "QK is wgmma m64n64 (32-key tiles: slower on the H100, dropped)");
  using Lay = Layout<TN, STAGES>;
  constexpr int NS = TN / 2;                 // score registers per thread
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  uint8_t* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  const uint32_t s_q = smem_u32(smem), s_kv = s_q + Lay::KV, s_p = s_q + Lay::P;
  float* s_alpha = reinterpret_cast<float*>(smem + Lay::F);
  float* s_l = s_alpha + 64;
  float* s_m = s_l + 64;
  const uint32_t full = s_q + Lay::BAR, empty = full + 8 * STAGES;

  const int grp = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, quad = lane % 4;
  const int r0 = ((tid % 128) / 32) * 16 + lane / 4, r1 = r0 + 8;   // rows of this thread
  const int g0 = grp * 64 + r0, g1 = grp * 64 + r1;
  const int seq_len = p.seq_lens[b];
  const int chunk = ((seq_len + p.splits - 1) / p.splits + TN - 1) / TN * TN;
  const int start = split * chunk;
  const int end = min(start + chunk, seq_len);
  const int ntiles = end > start ? (end - start + TN - 1) / TN : 0;
  const int* bt = p.block_tables + b * p.stride_btb;
  const __nv_bfloat16* q_base = p.q + b * p.stride_qb;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 12);          // every warp of the three warpgroups
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // Q -> shared memory, 128B-swizzled panels, rows past M zero: panels 7, 8 to their own
  // region, panels 0..6 staged in the (still unused) K stages for WG0's registers.
  for (int i = tid; i < 64 * (WIDTH / 8); i += THREADS) {
    const int r = i / (WIDTH / 8), c = i % (WIDTH / 8), row = grp * 64 + r, pn = c / 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < p.rows) v = __ldg(reinterpret_cast<const uint4*>(q_base + row * p.stride_qm) + c);
    const int dst = pn < Q_SMEM_PANEL0 ? Lay::KV + pn * ROW_PANEL : (pn - Q_SMEM_PANEL0) * ROW_PANEL;
    *reinterpret_cast<uint4*>(smem + dst + r * 128 + (((c % 8) ^ (r & 7)) << 4)) = v;
  }
  fence_async_smem();
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 184;\n" ::: "memory");
    // Q as A fragments: k-chunk kk holds (r0, 16kk + 2q..+1), (r1, same),
    // (r0, 16kk + 8 + 2q..+1), (r1, same).
    uint32_t qa[Q_REG_CHUNKS][4];
#pragma unroll
    for (int kk = 0; kk < Q_REG_CHUNKS; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i % 2 ? r1 : r0, c = 16 * kk + 8 * (i / 2) + 2 * quad;
        qa[kk][i] = *reinterpret_cast<const uint32_t*>(
            smem + Lay::KV + (c / 64) * ROW_PANEL + r * 128 + ((((c % 64) / 8) ^ (r & 7)) << 4) +
            (c % 8) * 2);
      }
    bar_arrive(6, 256);                      // the staging area may now take K tiles
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;   // row max, partial sums
    float sc[NS];
#pragma unroll
    for (int i = 0; i < NS; ++i) sc[i] = 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % STAGES;
      const uint32_t parity = (t / STAGES) & 1;
      const int n0 = start + t * TN;
      const uint32_t kv = s_kv + stage * Lay::TILE;
      mbar_wait(full + 8 * stage, parity);
      if (end - n0 < TN) {                   // the split's last, partial tile: zero its tail
        const int valid = end - n0, n = PANELS * (TN - valid) * 8;
        for (int i = tid; i < n; i += 128) {
          const int pn = i / ((TN - valid) * 8), rem = i % ((TN - valid) * 8);
          *reinterpret_cast<uint4*>(smem + Lay::KV + stage * Lay::TILE + pn * Lay::PANEL +
                                    (valid + rem / 8) * 128 + (rem % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_async_smem();
        bar_sync(5, 128);
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < WIDTH / 16; ++kk) {
        const uint32_t koff = (kk / 4) * Lay::PANEL + (kk % 4) * 32;
        if (kk < Q_REG_CHUNKS)
          wgmma_m64n64k16_rs(sc, qa[kk < Q_REG_CHUNKS ? kk : 0], desc_k(kv + koff), kk > 0);
        else
          wgmma_m64n64k16_ss(sc, desc_k(s_q + (kk / 4 - Q_SMEM_PANEL0) * ROW_PANEL + (kk % 4) * 32),
                          desc_k(kv + koff), 1);
      }
      wg_commit();
      wg_wait0();
      fence_regs(sc);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + 8 * stage);   // WG0 is done reading this stage
      // Keys a row may not see: past the split's end, or (q_len > 1) after its own token.
      if (n0 + TN > end || (p.q_len > 1 && n0 + TN > seq_len - p.q_len + 1)) {
        const int base = seq_len - p.q_len + 1;
        const int lim0 = min(end, base + g0 / p.heads), lim1 = min(end, base + g1 / p.heads);
#pragma unroll
        for (int j = 0; j < TN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int pos = n0 + 8 * j + 2 * quad + e;
            if (pos >= lim0) sc[4 * j + e] = -INFINITY;
            if (pos >= lim1) sc[4 * j + 2 + e] = -INFINITY;
          }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < TN / 8; ++j) {
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
      for (int j = 0; j < TN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          sc[4 * j + e] = exp2f(fmaf(sc[4 * j + e], p.qk_scale, -ms0));
          sc[4 * j + 2 + e] = exp2f(fmaf(sc[4 * j + 2 + e], p.qk_scale, -ms1));
          sum0 += sc[4 * j + e];
          sum1 += sc[4 * j + 2 + e];
        }
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      if (t > 0) bar_sync(2, THREADS);       // WG1 and WG2 are done with P and alpha of t - 1
#pragma unroll
      for (int j = 0; j < TN / 8; ++j) {     // P -> shared, K-major, 128B-swizzled rows
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
      bar_arrive(1, THREADS);
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
    bar_arrive(3, THREADS);
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    const int half = wg - 1;                 // columns [256 * half, 256 * half + 256)
    if (wg == 2) bar_sync(6, 256);           // WG0 has copied Q out of the stages
    if (tid == 256)
      for (int t = 0; t < min(STAGES, ntiles); ++t)
        load_tile<TN, STAGES>(&kv_map, p, bt, start, end, t, s_kv, full);
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % STAGES;
      const uint32_t parity = (t / STAGES) & 1;
      const uint32_t kv = s_kv + stage * Lay::TILE;
      mbar_wait(full + 8 * stage, parity);
      bar_sync(1, THREADS);                  // P and alpha of tile t
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
      for (int kk = 0; kk < TN / 16; ++kk)
        wgmma_m64n256k16_ss_tb(acc, desc_k(s_p + kk * 32),
                               desc_mn(kv + half * 4 * Lay::PANEL + kk * 2048, Lay::PANEL));
      wg_commit();
      wg_wait0();
      fence_regs(acc);
      if (t + 1 < ntiles) bar_arrive(2, THREADS);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + 8 * stage);
      if (tid == 256 && t + STAGES < ntiles) {     // the producer refills this stage
        mbar_wait(empty + 8 * stage, parity);
        load_tile<TN, STAGES>(&kv_map, p, bt, start, end, t + STAGES, s_kv, full);
      }
      __syncwarp();
    }
    bar_sync(3, THREADS);
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
}

using PFN_encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

template <int TN, int STAGES>
int launch(const void* kv, long long kv_rows, const Params& base, dim3 grid, cudaStream_t stream) {
  static bool attr_set = false;
  if (!attr_set) {
    cudaError_t err = cudaFuncSetAttribute(mla_decode_sm90_kernel<TN, STAGES>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Layout<TN, STAGES>::BYTES);
    if (err != cudaSuccess) return err;
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
  Params p = base;
  p.box_rows = p.page_size < TN ? p.page_size : TN;
  CUtensorMap map;
  cuuint64_t dims[2] = {(cuuint64_t)WIDTH, (cuuint64_t)kv_rows};
  cuuint64_t strides[1] = {(cuuint64_t)WIDTH * 2};
  cuuint32_t box[2] = {64, (cuuint32_t)p.box_rows};
  cuuint32_t elem[2] = {1, 1};
  CUresult res = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(kv), dims,
                        strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return 10000 + (int)res;
  mla_decode_sm90_kernel<TN, STAGES><<<grid, THREADS, Layout<TN, STAGES>::BYTES, stream>>>(map, p);
  return cudaGetLastError();
}

}  // namespace

// C entry point (ctypes). `tile` = keys per tile and `stages` pick a compiled configuration
// (64/2 only: 32/4 and 32/5 measured slower). Returns 0, a cudaError_t, 10000 + a CUresult of
// the tensor-map encoder, or 20000 + a cudaDriverEntryPointQueryResult; 30000 for a
// configuration that is not compiled.
extern "C" int tsc_mla_decode_sm90(const void* q, long long stride_qb, long long stride_qm,
                                   const void* kv, long long kv_rows, const int* block_tables,
                                   long long stride_btb, const int* seq_lens, void* out,
                                   long long stride_ob, long long stride_om, float* part_o,
                                   float* part_lse, float qk_scale, int batch, int rows,
                                   int heads, int q_len, int splits, int page_size, int tile,
                                   int stages, void* stream) {
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
  const dim3 grid((rows + 63) / 64, splits, batch);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (tile == 64 && stages == 2) return launch<64, 2>(kv, kv_rows, p, grid, s);
  return 30000;
}
