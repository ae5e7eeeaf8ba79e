// The fast path of the row-wise CUDA ops (rowwise_fast_fwd.cu, rowwise_fast_bwd.cu), called by the launchers in
// rowwise_cuda.cu when it applies; everything else runs the general kernels there. No torch headers.
//
// Applies when: D % 8 == 0, 8 <= D <= kFastMaxHidden, every operand 16-byte aligned with row strides that keep
// it so (the launcher checks), and the residual dtype is float32 or the modulation dtype (5 of the 9 mixes; the
// other 4 are legal but unusual and take the general path).
//
// Forward and JVP: one warp per row, each lane holding NC = ceil(D / 256) chunks of 8 columns, chunk k of lane l
// at columns (32 k + l) * 8: all of a lane's 16-byte loads of the row are issued before the first reduction (the
// forward also the next row's), and the row sums are warp shuffles only (no shared memory, no block barrier).
// (kWideJvp: the JVP with four warps per row instead, see below.)
// Backward: a block per (sample, tile of rows: kBwdTileRows, or bwd_tile_plan's with kPlannedTiles), a pair of
// warps per row (NC = ceil(D / 512) chunks per lane; chunks past D skipped), kBwdSlots rows at a time; the next
// row's loads are issued before this row's reductions; the two warps of a row combine their row sums through
// shared memory under a 64-thread named barrier. Column sums accumulate in shared memory (per slot; registers
// would cost most of the register file) and are reduced over the slots in a fixed order (no atomics): written as
// the result when a sample is one tile, else as per-tile partials summed by the general path's colsum kernel.
// (kWideBwd: the LayerNorm backward with a row per group of warps and the column sums in registers, see below.)
// The pair kernels need up to 144 KiB of shared memory per block (dual layer, D = 2048): on a card with less they
// say kNotApplicable and the launcher runs the general kernel.
#pragma once
#include "rowwise.h"

namespace dumo {
namespace fast {

constexpr int kFastMaxHidden = 2048;
constexpr int kRowWarps = 4;  // forward / JVP: warps (= rows) per block
constexpr int kBwdSlots = 4;  // backward: rows in flight per block, a warp pair each (256 threads)

// Variants of the fast path (set_cuda_fast_path's argument: a base choice in the low two bits, option bits above;
// 0 = the general kernels only). kPreload: the forward and the LayerNorm backward issue the next row's loads before
// this row's reductions (two rows of operands in registers); kNoPreload: one row at a time; kAuto: the
// first where the compiled kernel spills at most kSpillSlack bytes, else the second. The JVP and the gated backward
// have one register layout each (measured: holding more in registers did not pay); kAuto runs the JVP's wide layout
// (kWideJvp) where the warp-per-row kernel spills more than kSpillSlack bytes (NC = 8: D > 1536). Benchmarks and
// tests run every variant.
constexpr int kGeneral = 0, kAuto = 1, kNoPreload = 2, kPreload = 3;
constexpr int kBaseMask = 3;
// Option bits, candidates for the defaults until measured on a GPU (benchmarks/RESULTS.md says which were):
//   kWideJvp: the JVP with kWideWarps warps per row (fewer registers per thread, all operands loaded before the
//     reductions: the layout of the Triton JVP, which measured faster on XL/2 bf16 rows) instead of one warp;
//   kPlannedTiles: the backward's rows per block from bwd_tile_plan (a sample per block where that fills the GPU:
//     its column sums are written directly, no partials and no second kernel) instead of kBwdTileRows;
//   kTwoRows: the LayerNorm backward's warp pairs take two rows per pass (half the shared-memory traffic of the
//     column sums; two rows of operands in registers instead of the next row's, so the base's preload choice does
//     not apply), in the kernels that ptxas fits in registers (spills at most kSpillSlack bytes; else the base).
constexpr int kWideJvp = 4, kPlannedTiles = 8, kTwoRows = 16;
// kTuned: measure instead of guessing. The first call of an op with the fast path for a (shapes, dtypes, device)
// times that op's candidate variants (tune_candidates in rowwise_cuda.cu: the general kernels, the base choices
// and the option bits that change its kernels) with CUDA events on its own stream and its own operands, and every
// later call with that key runs the fastest (cuda_tuned() lists the choices). With base kGeneral, or operands the
// fast path does not take, nothing is measured. The other bits are the choice where it cannot measure: while the
// stream is being captured into a CUDA graph before the key was measured, or once kTuneMaxKeys keys are cached. The
// outputs of the measuring call are those of the chosen variant (it runs last), so every call with a key gives the
// same bits. The events time what the stream waits for, host launch work included where a candidate's kernels are
// shorter than their launches (small keys): the choice is the fastest in eager mode, not necessarily under a graph.
// `vec` of the launchers: whether the operands are 16-byte aligned with strides that keep them so (outputs included).
constexpr int kTuned = 32;
// Gated residual forward and JVP (which otherwise run the flat elementwise kernels on any path but kGeneral):
//   kGatedRows: a thread per 8-column chunk of a row over several rows of one sample, its gate chunk held in
//     registers (the flat kernel reloads it from L2 for every 8 elements and divides a 64-bit index per vector);
//   kStreaming: the once-read operands loaded, and the outputs stored, with the evict-first cache hint.
constexpr int kGatedRows = 64, kStreaming = 128;
// kWideBwd: the LayerNorm backward with a block of ceil(D / 256) warps per row, one 8-column chunk per thread, so
//   that the column sums and (1 + scale) fit in registers (no shared-memory traffic per row but the row sums'
//   exchange; no dynamic shared memory, so it runs where the pair kernels do not fit), one row at a time with the
//   next row's loads in flight whatever the base's preload choice; takes precedence over kTwoRows; in the kernels
//   that ptxas fits in registers (spills at most kSpillSlack bytes; else the pair kernels).
constexpr int kWideBwd = 256;
constexpr int kOptionMask = kWideJvp | kPlannedTiles | kTwoRows | kTuned | kGatedRows | kStreaming | kWideBwd;
// The process-wide default (set_cuda_fast_path changes it): measured per key where possible, else kAuto.
constexpr int kDefaultVariant = kAuto | kTuned;
inline bool valid_variant(int v) { return v >= 0 && (v & ~(kBaseMask | kOptionMask)) == 0; }

// Whether a kernel runs with the next row's loads in flight, given whether that compiled kernel spills at most
// kSpillSlack bytes (`fits`: fits_in_registers, cached per kernel and device).
inline bool next_row_in_flight(int variant, bool fits) {
  const int base = variant & kBaseMask;
  return base == kPreload || (base == kAuto && fits);
}

constexpr int kWideWarps = 4;  // kWideJvp: warps per row
constexpr int kWideRows = 2;   // kWideJvp: rows per block (256 threads)

// The backward's tiling: `rows` per block (a multiple of kBwdSlots), `tiles` = ceil(T / rows) blocks per sample.
struct TilePlan {
  int64_t rows, tiles;
};

// kPlannedTiles: the fewest tiles per sample whose N * tiles blocks fill their waves on `slots` concurrent blocks
// (SMs x resident blocks per SM) to at least kFillTarget, else the best-filling count; at most ceil(T /
// kBwdTileRows) tiles, so the caller's partials (bwd_partial_floats) always suffice. One tile per sample is the
// goal: its column sums need no partials and no second kernel. Blocks of one plan run equally long, so the fill is
// the share of the last wave's slots in use. Host-only, no CUDA: the CPU build exposes it for tests.
constexpr double kFillTarget = 0.9;
inline TilePlan bwd_tile_plan(int64_t N, int64_t T, int64_t slots) {
  const int64_t max_tiles = T > kBwdTileRows ? (T + kBwdTileRows - 1) / kBwdTileRows : 1;
  TilePlan best{T > 0 ? ((T + kBwdSlots - 1) / kBwdSlots) * kBwdSlots : kBwdSlots, 1};
  if (N <= 0 || T <= 0 || slots <= 0) return best;
  double best_fill = -1.0;
  for (int64_t want = 1; want <= max_tiles; ++want) {
    const int64_t per = (T + want - 1) / want;
    const int64_t rows = ((per + kBwdSlots - 1) / kBwdSlots) * kBwdSlots;
    const int64_t tiles = (T + rows - 1) / rows;
    const int64_t blocks = N * tiles, waves = (blocks + slots - 1) / slots;
    const double fill = double(blocks) / double(waves * slots);
    if (fill >= kFillTarget) return {rows, tiles};
    if (fill > best_fill + 1e-12) best = {rows, tiles}, best_fill = fill;
  }
  return best;
}

constexpr int kNotApplicable = -1;  // a fast launcher's answer when this card cannot run it (cudaError_t is >= 0)

inline bool applies(int64_t D, DType tx, DType tm) {
  return D % 8 == 0 && D >= 8 && D <= kFastMaxHidden && (tx == DType::F32 || tx == tm);
}

// The same arguments as the launchers in rowwise.h (alignment already checked); return the cudaError_t as int.
int ln_mod_fwd(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
               float eps, DType tx, DType tm, int variant, void* stream);
int ln_mod_jvp(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
               int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
               int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm, int variant,
               void* stream);
// Backward kernels: one column sum per output array, written to `sums` (2 * nmod arrays: shift_0.., scale_0.., each
// (N, D) contiguous, dtype tm) when a sample is one tile, else per-tile partials that the caller finishes with the
// column-sum kernel; `*tiles` says which (1: done). They return kNotApplicable (and launch nothing) when the
// block's shared memory exceeds the current device's opt-in limit.
int ln_mod_bwd_tiles(const void* const* gys, const void* x, const float* mean, const float* rstd,
                     const void* const* scales, const int64_t* scale_strides, int nmod, void* gx, float* partial,
                     void* const* sums, int64_t* tiles, Shape s, DType tx, DType tm, int variant, void* stream);
int gated_bwd_tiles(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, float* partial,
                    void* gg, int64_t* tiles, Shape s, DType tx, DType tm, int variant, void* stream);

}  // namespace fast
}  // namespace dumo
