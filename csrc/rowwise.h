// Row-wise ops of a DiT block (LayerNorm + adaLN modulate, gated residual, the dual final layer's
// normalisation), each with its forward-mode tangent (JVP) and backward.
//
// This header is free of torch headers: rowwise_cuda.cu includes it and compiles with plain nvcc (CI
// compile-checks it for sm_80 and sm_90a). The torch-facing glue and input checks live in rowwise.cpp; the C++
// CPU twins in rowwise_cpu.cpp; the PyTorch reference in dumo_engine/ops/rowwise_ref.py.
//
// Layout: x is (N, T, D) contiguous, rows r = n * T + t. Per-sample vectors (shift, scale, gate and their
// tangents) are (N, D) with unit column stride and a row stride `*_stride` (elements), so the chunks of one
// adaLN output are read in place. mean / rstd are (N, T) float32. Tangent streams (x_dot, out_dot) are float32.
// Storage dtypes: TX for the residual stream (x, gx, out), TM for everything per-branch (shift, scale, gates,
// h, y, gy, gshift, ...); each of float32 / bfloat16 / float16. All math is float32.
#pragma once
#include <cstdint>
#include <vector>

namespace dumo {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Shape {
  int64_t N, T, D;  // samples, rows per sample, hidden size
};

// One modulation (shift, scale) of the normalised rows; the dual final layer passes two.
struct Mod {
  const void* shift;
  const void* scale;
  int64_t shift_stride, scale_stride;
};

constexpr int kMaxHidden = 4096;  // 8 elements per thread, at most 512 threads per row (128 registers each)
constexpr int kBwdTileRows = 64;  // rows of one sample per backward block (partial column sums per tile)

// C++ CPU twins (rowwise_cpu.cpp): the same ops and arguments as the CUDA launchers below, run on the host with
// at::parallel_for over rows (forward, JVP) or over (sample, kBwdTileRows-row tile) (backward: fixed-order partial
// sums, the CUDA kernels' default tiling). `partial` is float scratch of bwd_partial_floats(s, arrays).
void ln_mod_fwd_cpu(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
                    float eps, DType tx, DType tm);
void ln_mod_jvp_cpu(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
                    int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
                    int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm);
void ln_mod_bwd_cpu(const void* const* gys, const void* x, const float* mean, const float* rstd,
                    const void* const* scales, const int64_t* scale_strides, int nmod, void* gx,
                    void* const* gshifts, void* const* gscales, float* partial, Shape s, DType tx, DType tm);
void gated_fwd_cpu(const void* x, const void* g, int64_t g_stride, const void* h, void* out, Shape s, DType tx,
                   DType tm);
void gated_jvp_cpu(const float* x_dot, const void* g, int64_t g_stride, const void* g_dot, int64_t g_dot_stride,
                   const void* h, const void* h_dot, float* out_dot, Shape s, DType tm);
void gated_bwd_cpu(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, void* gg,
                   float* partial, Shape s, DType tx, DType tm);

#ifdef DUMO_WITH_CUDA
// Launchers: enqueue on `stream` (a cudaStream_t) and return the launch's cudaError_t as int (0 = success).
// Scratch buffers (`partial`) are allocated by the caller; sizes come from the *_partial_floats helpers.
int ln_mod_fwd_cuda(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd,
                    Shape s, float eps, DType tx, DType tm, void* stream);
int ln_mod_jvp_cuda(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
                    int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
                    int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm,
                    void* stream);
int ln_mod_bwd_cuda(const void* const* gys, const void* x, const float* mean, const float* rstd,
                    const void* const* scales, const int64_t* scale_strides, int nmod, void* gx,
                    void* const* gshifts, void* const* gscales, float* partial, Shape s, DType tx, DType tm,
                    void* stream);
int gated_fwd_cuda(const void* x, const void* g, int64_t g_stride, const void* h, void* out, Shape s, DType tx,
                   DType tm, void* stream);
int gated_jvp_cuda(const float* x_dot, const void* g, int64_t g_stride, const void* g_dot, int64_t g_dot_stride,
                   const void* h, const void* h_dot, float* out_dot, Shape s, DType tm, void* stream);
int gated_bwd_cuda(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, void* gg,
                   float* partial, Shape s, DType tx, DType tm, void* stream);
// Process-wide choice of CUDA kernels (rowwise_fast.h): a base choice 0 = the general kernels only, 1 = the fast
// path where it applies with its own register heuristics, 2 / 3 = the fast path never / always holding operands
// ahead of use, plus option bits (4 wide JVP, 8 planned backward tiles, 16 two rows per pass, 32 tuned: measure the
// candidates per key and run the fastest; the default is 1 | 32; 64 / 128 the gated residual's rows layout / cache
// hints; 256 the LayerNorm backward with a block of warps per row). Returns the previous setting; invalid values
// only read it.
int set_cuda_fast_path(int variant);
#endif

// The measurements of kTuned (rowwise_fast.h): one record per (op, shapes, dtypes, device) key measured in this
// process, with the variant each later call of that key runs (cuda_tuned() in CUDA builds).
enum class TunedOp : int { LnModFwd = 0, LnModJvp = 1, LnModBwd = 2, GatedBwd = 3, GatedFwd = 4, GatedJvp = 5 };
struct TuneRecord {
  TunedOp op;
  int nmod;           // modulations (1, or 2 for the dual final layer); 1 for the gated op
  Shape s;
  DType tx, tm;
  bool f32_out;       // ln_mod_jvp: y_dot in float32 (the gated JVP's is always: tx float32)
  int device;         // CUDA device ordinal
  int variant;        // the choice
  std::vector<int> candidates;
  std::vector<float> ms;  // median time of each candidate (CUDA events), same order
};
#ifdef DUMO_WITH_CUDA
std::vector<TuneRecord> cuda_tuned();
int cuda_tune_reset();  // forgets every measurement (the next call of each key measures again); returns how many
#endif

// Float scratch the backward needs for `arrays` column-sum outputs (per-tile partial sums, reduced in a second
// pass in a fixed order: deterministic, no atomics): arrays * N * ceil(T / kBwdTileRows) * D.
inline int64_t bwd_partial_floats(Shape s, int arrays) {
  return int64_t(arrays) * s.N * ((s.T + kBwdTileRows - 1) / kBwdTileRows) * s.D;
}

}  // namespace dumo
