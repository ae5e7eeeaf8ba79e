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
// Backward: a block per (sample, tile of kBwdTileRows rows), a pair of warps per row (NC = ceil(D / 512) chunks
// per lane), kBwdSlots rows at a time; the next row's loads are issued before this row's reductions; the two
// warps of a row combine their row sums through shared memory under a 64-thread named barrier. Column sums
// accumulate in shared memory (per slot; registers would cost most of the register file), are reduced over the
// slots in a fixed order and written as per-tile partials (no atomics), summed by the general path's colsum kernel.
// The backward needs up to 144 KiB of shared memory per block (dual layer, D = 2048): on a card with less it says
// kNotApplicable and the launcher runs the general kernel.
#pragma once
#include "rowwise.h"

namespace dumo {
namespace fast {

constexpr int kFastMaxHidden = 2048;
constexpr int kRowWarps = 4;  // forward / JVP: warps (= rows) per block
constexpr int kBwdSlots = 4;  // backward: rows in flight per block, a warp pair each (256 threads)

// Variants of the fast path (set_cuda_fast_path's argument; 0 = the general kernels only). kPreload: the forward
// and the LayerNorm backward issue the next row's loads before this row's reductions (two rows of operands in
// registers); kNoPreload: one row at a time; kAuto (the default): the first where the compiled kernel spills at most
// kSpillSlack bytes, else the second. The JVP and the gated backward have one kernel each (measured: holding more
// in registers did not pay). Benchmarks and tests run every variant.
constexpr int kGeneral = 0, kAuto = 1, kNoPreload = 2, kPreload = 3;

// Whether a kernel runs with the next row's loads in flight, given whether that compiled kernel spills at most
// kSpillSlack bytes (`fits`, read once per kernel by the caller).
inline bool next_row_in_flight(int variant, bool fits) { return variant == kPreload || (variant == kAuto && fits); }

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
// Backward kernels only: they write the per-tile partials; the caller runs the column-sum kernel. They return
// kNotApplicable (and launch nothing) when the block's shared memory exceeds the current device's opt-in limit.
int ln_mod_bwd_tiles(const void* const* gys, const void* x, const float* mean, const float* rstd,
                     const void* const* scales, const int64_t* scale_strides, int nmod, void* gx, float* partial,
                     Shape s, DType tx, DType tm, int variant, void* stream);
int gated_bwd_tiles(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, float* partial,
                    Shape s, DType tx, DType tm, int variant, void* stream);

}  // namespace fast
}  // namespace dumo
