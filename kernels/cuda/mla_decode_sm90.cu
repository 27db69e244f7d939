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
// Napkin math (the case it was built for, 128 heads x 32 sequences x 32K, bf16): the cache
// read is 32 x 32K x 576 x 2 B = 1.21 GB (~400 us at ~3 TB/s), the dots 2 x 32 x 128 x 32K
// x (576 + 512) = 292 GFLOP (~365 us at ~800 TFLOP/s): ~240 FLOP/byte, just under the H100
// ridge (~270), so HBM and the tensor cores must both run near their peaks at once.
// 16 heads x q_len 4 (M = 64 rows): ~120 FLOP/byte, memory bound.
//
// One CTA = 64 query rows x one split of one sequence; 384 threads in three warpgroups:
//   WG0: S = Q K^T over a tile of 64 keys (wgmma m64n64k16, 36 k-steps over 576). Q's first
//        31 k-chunks (16 columns each) live in WG0's registers as wgmma A fragments (124
//        registers); chunk 31 and the rope chunks are read from shared memory. Then masking
//        and the online softmax in fp32 (exp2, scale folded into log2 e); P (bf16) goes over
//        the tile's rope panel, which QK no longer needs, and the row max after the tile to a
//        per-stage slot.
//   WG1 / WG2: O[:, 256h : 256h + 256] += P V[:, 256h : ...] (wgmma m64n256k16, A = P, V =
//        the K tile's first 512 columns read MN-major), rescaling O by 2^(m_prev - m) first
//        (skipped when no row's max moved). PV of tile t is issued only after WG0 has issued
//        QK of tile t + 1, so QK (WG0's critical path) goes first on the tensor cores and PV
//        runs during WG0's softmax. Their threads also issue the TMA loads.
// Three K stages of 72 KB, so a tile's load is in flight while the two before it are
// computed on. That leaves 11 KB of the 227 KB for Q: hence its registers, P in the rope
// panel, and no shared-memory slack (the dynamic shared memory base is 1 KB aligned;
// checked). setmaxnreg: WG0 184 registers, WG1/WG2 160 (the launch holds 168 x 384; asking
// for more than that in total never returns; m64n256 needs 160).
// K tiles: 9 column panels of [64 rows x 128 B], 128B-swizzled, loaded by TMA through a 3D
// view of the cache ([panel][row][64 columns]). Pages of 64+ rows: 3 boxes of 3 panels x 64
// rows per tile, one each from threads in 3 warps (a TMA issue holds its thread, and one
// whole-tile box held one warp, and the next tile's barriers with it, about twice as long
// as a 24 KB box: the per-tile traces in benchmarks/results/kernels/h100_mla_cuda_v4_steps.json).
// Pages of 8-32 rows: a box per (page part, panel).
// Keys past the split's end are masked in S, and their V rows zeroed by WG0 before P is
// published (P is 0 there; 0 * garbage could be NaN).
// Synchronisation: full[s] (TMA bytes landed), empty[s] (the 8 PV warps done with stage s),
// named barriers P_READY + s (P and row max of the tile in stage s: WG0 arrives, WG1/WG2
// sync), QK_ISSUED + s (WG0 has issued QK of the tile in stage s), FINAL (final l), TAIL
// (WG0's zeroing), Q_READ (WG0 has read Q's register chunks out of the last stage, where
// they were staged; then that stage takes its first tile).
// How it got here, each step timed beside the previous one on an H100 (the times and the
// per-tile traces: benchmarks/results/kernels/README.md and h100_mla_cuda_v4_steps.json):
// from the two-stage version, three stages with one TMA per panel were slower (the producer
// thread's TMA issues held PV); whole-tile boxes, PV after QK, block-table reads away from
// barriers, skipped rescales and boxes split over 3 warps each made it faster. Dropped as
// slower (h100_mla_cuda_variants.json, h100_mla_cuda_v4_steps.json): two warpgroups with PV
// split between them; Q wholly in shared memory; 2-CTA clusters sharing tiles by TMA
// multicast (a stage waits for both CTAs); 32-key tiles with 4-5 stages; double-buffered P
// with two stages; a third of the exponentials on the FMA pipe; L2 prefetch of later tiles
// (no result file holds that one: benchmarks/results/kernels/NOTES_from_docstrings.md).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wgmma_gen.cuh"

#define DEV __device__ __forceinline__

namespace {

constexpr int RANK = 512, WIDTH = 576, PANELS = WIDTH / 64;
constexpr int TN = 64;                       // keys per K tile (the QK wgmma's N)
constexpr int STAGES = 3;                    // K tiles in shared memory
constexpr int Q_REG_CHUNKS = 31;             // k-chunks (16 columns) of Q held in registers
constexpr int ROPE_PANEL = PANELS - 1;       // Q's and K's last panel: the rope columns
constexpr int THREADS = 384;
constexpr int PANEL = TN * 128;              // a [64 rows x 128 B] panel (Q, K, P)

// Shared-memory byte offsets: Q's rope panel, the K stages, Q's k-chunk 31 (32B-swizzled
// [64 x 32 B]; the final row sums l after the last QK), the row max after the tile in each
// stage ([STAGES][64] fp32), the split's end and first masked position, the mbarriers.
struct Layout {
  static constexpr int TILE = PANELS * PANEL;
  static constexpr int Q = 0;
  static constexpr int KV = PANEL;
  static constexpr int QC = KV + STAGES * TILE;
  static constexpr int M = QC + 64 * 32;
  static constexpr int SCAL = M + STAGES * 64 * 4;
  static constexpr int BAR = SCAL + 16;       // SCAL: end, first masked token base, start
  static constexpr int BYTES = BAR + 2 * STAGES * 8;
  static_assert(BYTES <= 227 * 1024, "shared memory");
  static_assert(8 * PANEL <= TILE, "Q's register panels stage in one K stage");
};

// Named barriers (0 is __syncthreads).
constexpr int P_READY = 1, FINAL = P_READY + STAGES, TAIL = FINAL + 1, Q_READ = TAIL + 1;
constexpr int QK_ISSUED = Q_READ + 1;        // + stage: 3 more
constexpr int Q_STAGING = Layout::KV + (STAGES - 1) * Layout::TILE;   // Q panels 0..7 at start

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
// K-major, 32-byte swizzle (mode 3; Q's k-chunk 31): rows 32 B apart, 8-row groups 256 B.
DEV uint64_t desc_k32(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
         ((uint64_t)(256 >> 4) << 32) | ((uint64_t)3 << 62);
}
// K-major without swizzle (P): 8x8 core matrices 128 B apart along K (LBO), 1024 B apart
// along M (SBO).
DEV uint64_t desc_p(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(128 >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32);
}
// MN-major (V read from the K tile): 64-wide column panels `panel` bytes apart (LBO), 8-key
// groups 1024 B apart (SBO).
DEV uint64_t desc_mn(uint32_t addr, uint32_t panel) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(panel >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// Shared-memory accesses by 32-bit address (a generic pointer would hold two registers).
DEV void sts(uint32_t addr, float v) { asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory"); }
DEV void sts(uint32_t addr, int v) { asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory"); }
DEV void sts_zero16(uint32_t addr) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
}
DEV float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
DEV int lds_s32(uint32_t addr) {
  int v;
  asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
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
DEV void tma_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int x, int y, int z) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)),
      "r"(x), "r"(y), "r"(z), "r"(bar) : "memory");
}
DEV float ex2(float x) {                      // 2^x (MUFU.EX2; -inf -> 0)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// Four 8x8 bf16 matrices from shared memory into MMA-fragment registers, one row address per
// thread (thread i gives row i % 8 of matrix i / 8).
DEV void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
// stmatrix_x4 of 8 fp32 values (4 bf16 pairs, the matrices' fragments in order).
DEV void st_p_x4(uint32_t addr, const float* v) {
  asm volatile(
      "{\n.reg .b32 a, b, c, d;\n"
      "cvt.rn.bf16x2.f32 a, %2, %1;\ncvt.rn.bf16x2.f32 b, %4, %3;\n"
      "cvt.rn.bf16x2.f32 c, %6, %5;\ncvt.rn.bf16x2.f32 d, %8, %7;\n"
      "stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {a, b, c, d};\n}\n"
      ::"r"(addr), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]), "f"(v[4]), "f"(v[5]), "f"(v[6]),
      "f"(v[7]) : "memory");
}
DEV uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}



// Special registers read afresh (volatile), so the roles below recompute what they need after
// their loops instead of keeping it live through them (WG0 has no register to spare).
DEV int sreg_tid() { int v; asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v)); return v; }
DEV int sreg_grp() { int v; asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v)); return v; }
DEV int sreg_split() { int v; asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(v)); return v; }
DEV int sreg_batch() { int v; asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(v)); return v; }

DEV const int* block_table(const Params& p) {
  return p.block_tables + sreg_batch() * p.stride_btb;
}
// The block holding tile `t` of a split starting at key `start` (pages of 64+ rows).
DEV int tile_block(const Params& p, int start, int t) {
  return block_table(p)[(start + t * TN) / p.page_size];
}
// TMA box of 3 panels x 64 rows, panels pc..pc + 2 of the tile at key n0 in block `page`,
// into the stage at `dst` (pages of 64+ rows).
DEV void tma_box3(const CUtensorMap* map, const Params& p, uint32_t dst, uint32_t full, int page,
                  int n0, int pc) {
  tma_3d(dst + pc * PANEL, map, full, 0, page * p.page_size + n0 % p.page_size, pc);
}

// TMA loads of tile `t` of this split into stage t % STAGES by one thread (the first
// tiles; every refill with pages under 64 rows); `page` is the block holding the tile when
// pages hold whole tiles.
DEV void load_tile(const CUtensorMap* map, const Params& p, int start, int end, int t,
                   uint32_t kv, uint32_t full, int page) {
  const int* bt = block_table(p);
  const int n0 = start + t * TN;
  const int stage = t % STAGES;
  // boxes per panel (1 when PS >= TN), none wholly past the split's end
  const int issued = min(TN / p.box_rows, (end - n0 + p.box_rows - 1) / p.box_rows);
  mbar_expect_tx(full + 8 * stage, issued * p.box_rows * WIDTH * 2);
  const uint32_t dst = kv + stage * Layout::TILE;
  if (p.box_rows == TN) {                    // whole tiles: boxes of 3 panels x 64 rows
#pragma unroll
    for (int pc = 0; pc < PANELS; pc += 3) tma_box3(map, p, dst, full + 8 * stage, page, n0, pc);
    return;
  }
#pragma unroll 1
  for (int part = 0; part < issued; ++part) {
    const int pos = n0 + part * p.box_rows;
    const int row = bt[pos / p.page_size] * p.page_size + pos % p.page_size;
#pragma unroll
    for (int pn = 0; pn < PANELS; ++pn)
      tma_3d(dst + part * p.box_rows * 128 + pn * PANEL, map, full + 8 * stage, 0, row, pn);
  }
}

// This CTA's keys [start, end) of its sequence, in `tiles` tiles of TN.
struct Range {
  int seq_len, start, end, tiles;
};
DEV Range key_range(const Params& p) {
  Range r;
  r.seq_len = p.seq_lens[sreg_batch()];
  const int chunk = ((r.seq_len + p.splits - 1) / p.splits + TN - 1) / TN * TN;
  r.start = sreg_split() * chunk;
  r.end = min(r.start + chunk, r.seq_len);
  r.tiles = r.end > r.start ? (r.end - r.start + TN - 1) / TN : 0;
  return r;
}

// Index of row `g` of this CTA's batch entry and split in the partials ([B, M, S]).
DEV long long part_index(const Params& p, int g) {
  return ((long long)sreg_batch() * p.rows + g) * p.splits + sreg_split();
}

// The rows and key columns thread `tid` of a warpgroup holds in a wgmma m64 accumulator:
// rows r0 and r0 + 8, columns 8j + 2 quad (+1).
DEV int acc_row(int tid) { return ((tid % 128) / 32) * 16 + (tid % 32) / 4; }

// WG0: S = Q K^T per tile, masking, online softmax; P and the row max to the stage.
DEV void qk_softmax(const Params& p, uint8_t* smem) {
  using Lay = Layout;
  constexpr int NS = TN / 2;                 // score registers per thread
  const uint32_t s_q = smem_u32(smem), s_kv = s_q + Lay::KV, full = s_q + Lay::BAR;
  const uint32_t s_m = s_q + Lay::M, s_scal = s_q + Lay::SCAL;
  const Range kr = key_range(p);
  // Keys a row may see: before the split's end and (q_len > 1) up to its own token. Tiles
  // from `mask_from` on need masking.
  const int base = kr.seq_len - p.q_len + 1;
  const int mask_from = min(kr.end, base + sreg_grp() * 64 / p.heads);
  sts(s_scal, kr.end);                       // every thread writes the same values
  sts(s_scal + 4, base);
  sts(s_scal + 8, kr.start);
  // Q as A fragments: k-chunk kk holds (r0, 16kk + 2q..+1), (r1, same),
  // (r0, 16kk + 8 + 2q..+1), (r1, same): one ldmatrix.x4 each, thread i giving row i % 8 of
  // matrix i / 8 = (rows r0 / r1 block, columns 16kk / 16kk + 8).
  uint32_t qa[Q_REG_CHUNKS][4];
  {
    const int tid = sreg_tid(), lane = tid % 32;
    const int row = (tid / 32) * 16 + ((lane / 8) % 2) * 8 + lane % 8;
    const uint32_t rp = s_q + Q_STAGING + row * 128, x = (lane / 16) ^ (lane % 8);
#pragma unroll
    for (int kk = 0; kk < Q_REG_CHUNKS; ++kk)
      ldmatrix_x4(qa[kk], rp + (kk / 4) * PANEL + (((2 * (kk % 4)) ^ x) << 4));
  }
  bar_arrive(Q_READ, 256);                   // the staging stage may now take a K tile
  float l0 = 0.f, l1 = 0.f;                  // this thread's part of the row sums
  float sc[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) sc[i] = 0.f;
  for (int t = 0; t < kr.tiles; ++t) {
    const int stage = t % STAGES;
    const uint32_t parity = (t / STAGES) & 1;
    const int n0 = kr.start + t * TN;
    const uint32_t kv = s_kv + stage * Lay::TILE;
    mbar_wait(full + 8 * stage, parity);
    if (kr.end - n0 < TN) {   // the split's last, partial tile: zero V past the end (P is 0
      const int valid = kr.end - n0, n = 8 * (TN - valid) * 8;   // there, 0 x garbage NaN)
      for (int i = sreg_tid(); i < n; i += 128) {
        const int pn = i / ((TN - valid) * 8), rem = i % ((TN - valid) * 8);
        sts_zero16(kv + pn * PANEL + (valid + rem / 8) * 128 + (rem % 8) * 16);
      }
      fence_async_smem();
      bar_sync(TAIL, 128);
    }
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < WIDTH / 16; ++kk) {
      const uint64_t kd = desc_k(kv + (kk / 4) * PANEL + (kk % 4) * 32);
      if (kk < Q_REG_CHUNKS)
        wgmma_m64n64k16_rs(sc, qa[kk < Q_REG_CHUNKS ? kk : 0], kd, kk > 0);
      else if (kk < 4 * ROPE_PANEL)
        wgmma_m64n64k16_ss(sc, desc_k32(s_q + Lay::QC), kd, 1);
      else
        wgmma_m64n64k16_ss(sc, desc_k(s_q + Lay::Q + (kk % 4) * 32), kd, 1);
    }
    wg_commit();
    // PV of the previous tile goes to the tensor cores after this QK, not before it: QK is on
    // WG0's critical path, PV then runs during this tile's softmax.
    if (t > 0) bar_arrive(QK_ISSUED + stage, THREADS);
    wg_wait0();
    fence_regs(sc);
    // This thread's rows and key pairs, re-derived here rather than held through the loop.
    const int tt = sreg_tid(), quad = tt % 4, r0 = acc_row(tt), r1 = r0 + 8;
    // the row max after the last tile, from its slot (written by quad 0 before the
    // __syncwarp that ends the last iteration)
    const uint32_t prev = s_m + (t > 0 ? (stage + STAGES - 1) % STAGES : stage) * 256;
    const float m0 = t > 0 ? lds_f32(prev + 4 * r0) : -INFINITY;
    const float m1 = t > 0 ? lds_f32(prev + 4 * r1) : -INFINITY;
    if (n0 + TN > mask_from) {
      const int end = lds_s32(s_scal), first = lds_s32(s_scal + 4);
      const int lim0 = min(end, first + (sreg_grp() * 64 + r0) / p.heads);
      const int lim1 = min(end, first + (sreg_grp() * 64 + r1) / p.heads);
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
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < TN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[4 * j + e] = ex2(fmaf(sc[4 * j + e], p.qk_scale, -ms0));
        sc[4 * j + 2 + e] = ex2(fmaf(sc[4 * j + 2 + e], p.qk_scale, -ms1));
        sum0 += sc[4 * j + e];
        sum1 += sc[4 * j + 2 + e];
      }
    l0 = l0 * ex2(m0 - ms0) + sum0;
    l1 = l1 * ex2(m1 - ms1) + sum1;
    // P -> this stage's rope panel (QK is done with it; PV reads V from panels 0..7) in the
    // unswizzled K-major layout of 8x8 core matrices (rows 8g.., keys 8h..) at g * 1024 +
    // h * 128: st_p_x4 j / 2 stores the core matrices (rows r0 / r1 block, keys 8j / 8j + 8),
    // each conflict-free, all from one address register.
    {
      const int lane = tt % 32, mi = lane / 8;
      const uint32_t rp = kv + ROPE_PANEL * PANEL + ((tt / 32) * 2 + mi % 2) * 1024 +
                          (mi / 2) * 128 + (lane % 8) * 16;
#pragma unroll
      for (int j = 0; j < TN / 8; j += 2) st_p_x4(rp + j * 128, &sc[4 * j]);
    }
    __syncwarp();                            // the row's threads have read the last max
    if (quad == 0) {
      sts(s_m + stage * 256 + 4 * r0, mn0);
      sts(s_m + stage * 256 + 4 * r1, mn1);
    }
    __syncwarp();
    fence_async_smem();
    bar_arrive(P_READY + stage, THREADS);
  }
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffff, l0, o);
    l1 += __shfl_xor_sync(0xffffffff, l1, o);
  }
  const int tid = sreg_tid(), r0 = acc_row(tid), r1 = r0 + 8;
  if (tid % 4 == 0) {
    sts(s_q + Lay::QC + 4 * r0, l0);         // Q's chunk 31 is no longer read
    sts(s_q + Lay::QC + 4 * r1, l1);
    const int g0 = sreg_grp() * 64 + r0, g1 = g0 + 8;
    if (p.splits > 1) {
      const uint32_t last = s_m + (kr.tiles + STAGES - 1) % STAGES * 256;
      const float m0 = kr.tiles > 0 ? lds_f32(last + 4 * r0) : -INFINITY;
      const float m1 = kr.tiles > 0 ? lds_f32(last + 4 * r1) : -INFINITY;
      if (g0 < p.rows) p.part_lse[part_index(p, g0)] = l0 > 0.f ? m0 + log2f(l0) : -INFINITY;
      if (g1 < p.rows) p.part_lse[part_index(p, g1)] = l1 > 0.f ? m1 + log2f(l1) : -INFINITY;
    }
  }
  bar_arrive(FINAL, THREADS);
}

// WG1 / WG2: O[:, 256 half : +256] += P V per tile; three of their threads load the tiles.
DEV void pv(const Params& p, const CUtensorMap* kv_map, uint8_t* smem) {
  using Lay = Layout;
  const uint32_t s_kv = smem_u32(smem) + Lay::KV, full = smem_u32(smem) + Lay::BAR;
  const uint32_t empty = full + 8 * STAGES, s_m = smem_u32(smem) + Lay::M;
  const int tid = sreg_tid(), half = tid / 128 - 1;
  int tiles;
  {
    const Range kr = key_range(p);
    tiles = kr.tiles;
    if (half == 1) {
      if (tid == 256)
        for (int t = 0; t < min(STAGES - 1, kr.tiles); ++t)
          load_tile(kv_map, p, kr.start, kr.end, t, s_kv, full, tile_block(p, kr.start, t));
      bar_sync(Q_READ, 256);                 // WG0 has copied Q out of the last stage
      if (tid == 256 && kr.tiles >= STAGES)
        load_tile(kv_map, p, kr.start, kr.end, STAGES - 1, s_kv, full,
                  tile_block(p, kr.start, STAGES - 1));
    }
  }
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;      // row max before this tile
  for (int t = 0; t < tiles; ++t) {
    const int stage = t % STAGES;
    const uint32_t parity = (t / STAGES) & 1;
    const uint32_t kv = s_kv + stage * Lay::TILE;
    mbar_wait(full + 8 * stage, parity);
    bar_sync(P_READY + stage, THREADS);      // P and the row max of tile t
    const int tt = sreg_tid(), r0 = acc_row(tt), r1 = r0 + 8;
    const float mn0 = lds_f32(s_m + stage * 256 + 4 * r0), mn1 = lds_f32(s_m + stage * 256 + 4 * r1);
    const float a0 = ex2(m0 - (mn0 == -INFINITY ? 0.f : mn0));   // WG0's rescale, bit for bit
    const float a1 = ex2(m1 - (mn1 == -INFINITY ? 0.f : mn1));
    m0 = mn0;
    m1 = mn1;
    if (__any_sync(0xffffffff, a0 != 1.f || a1 != 1.f)) {   // rarely, once the max settles
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j] *= a0;
        acc[4 * j + 1] *= a0;
        acc[4 * j + 2] *= a1;
        acc[4 * j + 3] *= a1;
      }
    }
    if (t + 1 < tiles) bar_sync(QK_ISSUED + (t + 1) % STAGES, THREADS);   // QK of t + 1 issued
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < TN / 16; ++kk)
      wgmma_m64n256k16_ss_tb(acc, desc_p(kv + ROPE_PANEL * PANEL + kk * 256),
                             desc_mn(kv + (tt / 128 - 1) * 4 * PANEL + kk * 2048, PANEL));
    wg_commit();
    // Refill this stage with tile t + STAGES once every PV warp is done with it: pages of 64+
    // rows as 3 boxes of 3 panels from threads 128, 160, 256 (3 warps), smaller pages from
    // thread 256 alone. The block is read while the wgmma runs (a load still in flight at a
    // bar.sync would hold the barrier for its latency).
    const int piece = tt == 128 ? 0 : tt == 160 ? 1 : tt == 256 ? 2 : -1;
    const bool split = p.box_rows == TN && piece >= 0;
    int page = 0;
    if (split && t + STAGES < tiles)
      page = tile_block(p, lds_s32(smem_u32(smem) + Lay::SCAL + 8), t + STAGES);
    wg_wait0();
    fence_regs(acc);
    __syncwarp();
    if (tt % 32 == 0) mbar_arrive(empty + 8 * stage);
    if (split && t + STAGES < tiles) {
      mbar_wait(empty + 8 * stage, parity);
      const int n0 = lds_s32(smem_u32(smem) + Lay::SCAL + 8) + (t + STAGES) * TN;
      if (piece == 0) mbar_expect_tx(full + 8 * stage, TN * WIDTH * 2);
      tma_box3(kv_map, p, kv, full + 8 * stage, page, n0, 3 * piece);
    } else if (tt == 256 && p.box_rows < TN && t + STAGES < tiles) {
      mbar_wait(empty + 8 * stage, parity);
      const uint32_t s_scal = smem_u32(smem) + Lay::SCAL;
      load_tile(kv_map, p, lds_s32(s_scal + 8), lds_s32(s_scal), t + STAGES, s_kv, full, page);
    }
    __syncwarp();
  }
  bar_sync(FINAL, THREADS);
  const int t2 = sreg_tid(), row0 = acc_row(t2), row1 = row0 + 8;
  const uint32_t s_l = smem_u32(smem) + Lay::QC;
  const float l0 = lds_f32(s_l + 4 * row0), l1 = lds_f32(s_l + 4 * row1);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 1.f, inv1 = l1 > 0.f ? 1.f / l1 : 1.f;
  const int col0 = (t2 / 128 - 1) * 256 + 2 * (t2 % 4);
  const int g0 = sreg_grp() * 64 + row0, g1 = g0 + 8;
  if (p.splits == 1) {
    const long long ob = sreg_batch() * p.stride_ob;
    __nv_bfloat16* o0 = p.out + ob + (long long)g0 * p.stride_om + col0;
    __nv_bfloat16* o1 = p.out + ob + (long long)g1 * p.stride_om + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (g0 < p.rows)
        *reinterpret_cast<uint32_t*>(o0 + 8 * j) = pack_bf16(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
      if (g1 < p.rows)
        *reinterpret_cast<uint32_t*>(o1 + 8 * j) = pack_bf16(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
    }
  } else {
    float* o0 = p.part_o + part_index(p, g0) * RANK + col0;
    float* o1 = p.part_o + part_index(p, g1) * RANK + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (g0 < p.rows)
        *reinterpret_cast<float2*>(o0 + 8 * j) = make_float2(acc[4 * j] * inv0, acc[4 * j + 1] * inv0);
      if (g1 < p.rows)
        *reinterpret_cast<float2*>(o1 + 8 * j) = make_float2(acc[4 * j + 2] * inv1, acc[4 * j + 3] * inv1);
    }
  }
}

__global__ void __launch_bounds__(THREADS, 1)
    mla_decode_sm90_kernel(const __grid_constant__ CUtensorMap kv_map, const Params p) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int tid = threadIdx.x;
  // The layout uses all 227 KB, with no slack to align the base: the swizzled panels need a
  // 1 KB aligned base, which dynamic shared memory without static shared memory has.
  if (smem_u32(smem) % 1024) __trap();
  if (tid == 0) {
    const uint32_t full = smem_u32(smem) + Layout::BAR, empty = full + 8 * STAGES;
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 8);           // the warps of WG1 and WG2 (after PV)
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // Q -> shared memory, rows past M zero: panels 0..7 staged in the last (still unused) K
  // stage for WG0's registers (128B-swizzled), except k-chunk 31 (16-byte units 62, 63) to
  // its own 32B-swizzled region; the rope panel to its own region (128B-swizzled).
  const __nv_bfloat16* q_base = p.q + blockIdx.z * p.stride_qb;
  for (int i = tid; i < 64 * (WIDTH / 8); i += THREADS) {
    const int r = i / (WIDTH / 8), c = i % (WIDTH / 8), row = blockIdx.x * 64 + r, pn = c / 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < p.rows) v = __ldg(reinterpret_cast<const uint4*>(q_base + row * p.stride_qm) + c);
    int dst;
    if (c / 2 == Q_REG_CHUNKS)
      dst = Layout::QC + r * 32 + (((c % 2) ^ ((r / 4) % 2)) << 4);
    else
      dst = (pn < ROPE_PANEL ? Q_STAGING + pn * PANEL : Layout::Q) + r * 128 +
            (((c % 8) ^ (r & 7)) << 4);
    *reinterpret_cast<uint4*>(smem + dst) = v;
  }
  fence_async_smem();
  __syncthreads();
  if (tid < 128) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 184;\n" ::: "memory");
    qk_softmax(p, smem);
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    pv(p, &kv_map, smem);
  }
}

using PFN_encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

int launch(const void* kv, long long kv_rows, const Params& base, dim3 grid, cudaStream_t stream) {
  static bool attr_set = false;
  if (!attr_set) {
    cudaError_t err = cudaFuncSetAttribute(mla_decode_sm90_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Layout::BYTES);
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
  // The cache as [panel 9][row][64 columns] (strides 128 B, 576 x 2 B): a box of all 9
  // panels x 64 rows lands as one K tile (9 [64 x 128 B] panels); pages under 64 rows take
  // one box per (page part, panel).
  Params p = base;
  p.box_rows = p.page_size < TN ? p.page_size : TN;
  CUtensorMap map;
  cuuint64_t dims[3] = {64, (cuuint64_t)kv_rows, (cuuint64_t)PANELS};
  cuuint64_t strides[2] = {(cuuint64_t)WIDTH * 2, 128};
  cuuint32_t box[3] = {64, (cuuint32_t)p.box_rows, p.box_rows == TN ? 3u : 1u};
  cuuint32_t elem[3] = {1, 1, 1};
  CUresult res = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(kv), dims,
                        strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return 10000 + (int)res;
  mla_decode_sm90_kernel<<<grid, THREADS, Layout::BYTES, stream>>>(map, p);
  return cudaGetLastError();
}

}  // namespace

// C entry point (ctypes). Returns 0, a cudaError_t, 10000 + a CUresult of the tensor-map
// encoder, or 20000 + a cudaDriverEntryPointQueryResult.
extern "C" int tsc_mla_decode_sm90(const void* q, long long stride_qb, long long stride_qm,
                                   const void* kv, long long kv_rows, const int* block_tables,
                                   long long stride_btb, const int* seq_lens, void* out,
                                   long long stride_ob, long long stride_om, float* part_o,
                                   float* part_lse, float qk_scale, int batch, int rows,
                                   int heads, int q_len, int splits, int page_size,
                                   void* stream) {
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
  return launch(kv, kv_rows, p, grid, s);
}
