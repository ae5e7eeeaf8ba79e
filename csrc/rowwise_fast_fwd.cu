// Fast path, forward and JVP of LayerNorm (no affine) + adaLN modulate: a warp per row (see rowwise_fast.h for
// when it applies and the geometry). Formulas as in rowwise_cuda.cu's general kernels; reference:
// dumo_engine/ops/rowwise_ref.py. No torch headers.
#include <type_traits>

#include "rowwise_device.cuh"
#include "rowwise_fast.h"

namespace dumo {
namespace fast {
namespace {

using namespace dev;

// The forward's variants (measured on an H100, benchmarks/RESULTS.md): a warp takes kFwdRows consecutive rows and
// issues the next row's 16-byte loads of x before this row's reductions (ROWS = kFwdRows), or a single row (ROWS =
// 1). kAuto takes the first in the kernels that spill at most kSpillSlack bytes; set_cuda_fast_path(kNoPreload /
// kPreload) forces one choice. Holding the modulation operands across the reductions instead (the first design)
// was slower in every measured case (more registers, fewer warps) and is gone; so the JVP has one variant.
constexpr int kFwdRows = 4;

// NC = 16-byte chunks per lane: forward / JVP instantiate 2, 3, 4, 5, 6, 8 (D <= 2048 -> NC <= 8).
template <typename F>
void with_nc(int64_t nc, F&& f) {
  if (nc <= 2) f(std::integral_constant<int, 2>{});
  else if (nc == 3) f(std::integral_constant<int, 3>{});
  else if (nc == 4) f(std::integral_constant<int, 4>{});
  else if (nc == 5) f(std::integral_constant<int, 5>{});
  else if (nc == 6) f(std::integral_constant<int, 6>{});
  else f(std::integral_constant<int, 8>{});
}

__device__ __forceinline__ int warp_col(int k, int lane) { return (k * 32 + lane) * VEC; }

template <typename TX, int NC>
__device__ __forceinline__ void load_x_row(Raw8<TX> (&r)[NC], const TX* __restrict__ xr, int D, int lane) {
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    if (warp_col(k, lane) < D) r[k].load(xr + warp_col(k, lane));
    else r[k].zero();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm (no affine) + adaLN modulate, NMOD modulations of one normalisation (2 = the dual final layer):
//   mean = sum_D x / D,  rstd = 1 / sqrt(sum_D (x - mean)^2 / D + eps),  n = (x - mean) rstd
//   y_k = n (1 + scale_k) + shift_k
// A warp per row, ROWS consecutive rows per warp (the next row's x in flight during this row's work); x stays in
// registers (two-pass variance); the modulation chunks (per sample: L1/L2 hits) are loaded after the statistics.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, int NC, int NMOD, int ROWS>
__global__ void __launch_bounds__(kRowWarps * 32, 4)
    ln_mod_fwd_warp(const TX* __restrict__ x, ModT<TM> m0, ModT<TM> m1, TM* __restrict__ y0, TM* __restrict__ y1,
                    float* __restrict__ mean, float* __restrict__ rstd, int64_t R, int64_t T, int D, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= R) return;  // the whole warp leaves: its shuffles stay complete
  Raw8<TX> cur[NC], nxt[NC];
  load_x_row<TX, NC>(cur, x + row0 * D, D, lane);
#pragma unroll 1
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = row0 + i;
    if (row >= R) break;  // warp-uniform
    if (ROWS > 1 && i + 1 < ROWS && row + 1 < R) load_x_row<TX, NC>(nxt, x + (row + 1) * D, D, lane);
    const int64_t n = row / T;
    float xv[NC][VEC];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NC; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[k][j] = cur[k][j], s += xv[k][j];  // padding chunks are zeros
    const float mu = warp_sum(s) / D;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      const bool ok = warp_col(k, lane) < D;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xv[k][j] = ok ? xv[k][j] - mu : 0.f;  // two-pass variance from registers
        q += xv[k][j] * xv[k][j];
      }
    }
    const float rs = rsqrtf(warp_sum(q) / D + eps);
#pragma unroll
    for (int m = 0; m < NMOD; ++m) {
      const ModT<TM> mm = m == 0 ? m0 : m1;
      TM* yr = (m == 0 ? y0 : y1) + row * D;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = warp_col(k, lane);
        if (c >= D) continue;
        Raw8<TM> sh, sc;
        sh.load(mm.shift + n * mm.ss + c);
        sc.load(mm.scale + n * mm.sc + c);
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = xv[k][j] * rs * (1.f + sc[j]) + sh[j];
        store8(yr + c, o);
      }
    }
    if (lane == 0) mean[row] = mu, rstd[row] = rs;
    if constexpr (ROWS > 1) {
#pragma unroll
      for (int k = 0; k < NC; ++k) cur[k] = nxt[k];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// JVP of y = n (1 + scale) + shift along (x_dot, shift_dot, scale_dot), from the saved mean / rstd:
//   n_dot = rstd (x_dot - sum_D(x_dot) / D - n sum_D(n x_dot) / D)
//   y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
// One warp per row; the two row sums are reduced together; the modulation tangents are loaded after them.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, typename TY, int NC>
__global__ void __launch_bounds__(kRowWarps * 32, 4)
    ln_mod_jvp_warp(const TX* __restrict__ x, const float* __restrict__ x_dot, const float* __restrict__ mean,
                    const float* __restrict__ rstd, const TM* __restrict__ scale, int64_t ssc,
                    const TM* __restrict__ shift_dot, int64_t ssd, const TM* __restrict__ scale_dot, int64_t sscd,
                    TY* __restrict__ y_dot, int64_t R, int64_t T, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= R) return;  // the whole warp leaves
  const int64_t n = row / T;
  const float mu = __ldg(mean + row), rs = __ldg(rstd + row);
  float nv[NC][VEC], xd[NC][VEC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = warp_col(k, lane);
    if (c < D) {
      load8(x + row * D + c, nv[k]);
      load8(x_dot + row * D + c, xd[k]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) nv[k][j] = xd[k][j] = 0.f;
    }
  }
  float s0 = 0.f, s1 = 0.f;  // padding chunks: x_dot = 0 adds nothing to either sum
#pragma unroll
  for (int k = 0; k < NC; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      nv[k][j] = (nv[k][j] - mu) * rs;
      s0 += xd[k][j];
      s1 += nv[k][j] * xd[k][j];
    }
  const float m0 = warp_sum(s0) / D, m1 = warp_sum(s1) / D;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = warp_col(k, lane);
    if (c >= D) continue;
    Raw8<TM> sc, sd, scd;
    sc.load(scale + n * ssc + c);
    sd.load(shift_dot + n * ssd + c);
    scd.load(scale_dot + n * sscd + c);
    float o[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o[j] = rs * (xd[k][j] - m0 - nv[k][j] * m1) * (1.f + sc[j]) + nv[k][j] * scd[j] + sd[j];
    store8(y_dot + row * D + c, o);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The same JVP, kWideJvp layout: kWideWarps warps (128 threads) per row, kWideRows rows per block, NC =
// ceil(D / 1024) chunks per thread (chunk k of thread q at columns (128 k + q) * 8). Every operand of the row,
// the modulation vectors included, is loaded before the reductions and held as loaded (converted on use): with
// at most two chunks per thread that costs few registers, and no load waits behind the reductions. A row's four
// warps combine their sums in shared memory, in a fixed order, after one block barrier.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kWideThreads = kWideWarps * 32;

__device__ __forceinline__ int wide_col(int k, int q) { return (k * kWideThreads + q) * VEC; }

template <typename TX, typename TM, typename TY, int NC>
__global__ void __launch_bounds__(kWideRows * kWideThreads)
    ln_mod_jvp_wide(const TX* __restrict__ x, const float* __restrict__ x_dot, const float* __restrict__ mean,
                    const float* __restrict__ rstd, const TM* __restrict__ scale, int64_t ssc,
                    const TM* __restrict__ shift_dot, int64_t ssd, const TM* __restrict__ scale_dot, int64_t sscd,
                    TY* __restrict__ y_dot, int64_t R, int64_t T, int D) {
  __shared__ float part[kWideRows][kWideWarps][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rw = warp / kWideWarps, wq = warp % kWideWarps, q = wq * 32 + lane;
  const int64_t row = int64_t(blockIdx.x) * kWideRows + rw;
  const bool live = row < R;  // a dead row's threads still reach the barrier
  const int64_t n = live ? row / T : 0;
  const float mu = live ? __ldg(mean + row) : 0.f, rs = live ? __ldg(rstd + row) : 0.f;
  Raw8<TX> xr[NC];
  Raw8<float> xd[NC];
  Raw8<TM> sc[NC], sd[NC], scd[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = wide_col(k, q);
    if (live && c < D) {
      xr[k].load(x + row * D + c);
      xd[k].load(x_dot + row * D + c);
      sc[k].load(scale + n * ssc + c);
      sd[k].load(shift_dot + n * ssd + c);
      scd[k].load(scale_dot + n * sscd + c);
    } else {
      xr[k].zero(), xd[k].zero(), sc[k].zero(), sd[k].zero(), scd[k].zero();
    }
  }
  float s0 = 0.f, s1 = 0.f;  // zeros past the end (x_dot = 0) add nothing to either sum
#pragma unroll
  for (int k = 0; k < NC; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = xd[k][j];
      s0 += d;
      s1 += (xr[k][j] - mu) * rs * d;
    }
  s0 = warp_sum(s0);
  s1 = warp_sum(s1);
  if (lane == 0) part[rw][wq][0] = s0, part[rw][wq][1] = s1;
  __syncthreads();
  if (!live) return;
  float t0 = 0.f, t1 = 0.f;
#pragma unroll
  for (int w = 0; w < kWideWarps; ++w) t0 += part[rw][w][0], t1 += part[rw][w][1];
  const float m0 = t0 / D, m1 = t1 / D;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = wide_col(k, q);
    if (c >= D) continue;
    float o[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float nv = (xr[k][j] - mu) * rs;
      o[j] = rs * (xd[k][j] - m0 - nv * m1) * (1.f + sc[k][j]) + nv * scd[k][j] + sd[k][j];
    }
    store8(y_dot + row * D + c, o);
  }
}

}  // namespace

int ln_mod_fwd(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
               float eps, DType tx, DType tm, int variant, void* stream) {
  const int64_t R = s.N * s.T;
  const dim3 block(kRowWarps * 32);
  auto st = static_cast<cudaStream_t>(stream);
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    const ModT<TM> m0 = mod_t<TM>(mods[0]), m1 = mod_t<TM>(mods[nmod - 1]);  // m1 unused when nmod == 1
    TM* y0 = static_cast<TM*>(ys[0]);
    TM* y1 = static_cast<TM*>(ys[nmod - 1]);
    const TX* xp = static_cast<const TX*>(x);
    with_nc(ceil_div(s.D, 32 * VEC), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      auto launch = [&](auto kernel, int rows) {
        const dim3 grid(unsigned(ceil_div(R, int64_t(kRowWarps) * rows)));
        DUMO_LAUNCH(grid, block, 0, st, kernel)(xp, m0, m1, y0, y1, mean, rstd, R, s.T, int(s.D), eps);
      };
      if (nmod == 2) {
        const bool fits = fits_in_registers(ln_mod_fwd_warp<TX, TM, NC, 2, kFwdRows>);
        if (next_row_in_flight(variant, fits)) launch(ln_mod_fwd_warp<TX, TM, NC, 2, kFwdRows>, kFwdRows);
        else launch(ln_mod_fwd_warp<TX, TM, NC, 2, 1>, 1);
      } else {
        const bool fits = fits_in_registers(ln_mod_fwd_warp<TX, TM, NC, 1, kFwdRows>);
        if (next_row_in_flight(variant, fits)) launch(ln_mod_fwd_warp<TX, TM, NC, 1, kFwdRows>, kFwdRows);
        else launch(ln_mod_fwd_warp<TX, TM, NC, 1, 1>, 1);
      }
    });
  });
  return int(cudaGetLastError());
}

int ln_mod_jvp(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
               int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
               int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm, int variant,
               void* stream) {
  const int64_t R = s.N * s.T;
  const bool wide = (variant & kWideJvp) != 0;
  auto st = static_cast<cudaStream_t>(stream);
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    auto launch = [&](auto tyt) {
      using TY = typename decltype(tyt)::type;
      auto args = [&](auto kernel, dim3 grid, dim3 block) {
        DUMO_LAUNCH(grid, block, 0, st, kernel)(static_cast<const TX*>(x), x_dot, mean, rstd,
                                                static_cast<const TM*>(scale), scale_stride,
                                                static_cast<const TM*>(shift_dot), shift_dot_stride,
                                                static_cast<const TM*>(scale_dot), scale_dot_stride,
                                                static_cast<TY*>(y_dot), R, s.T, int(s.D));
      };
      auto run_wide = [&] {
        const dim3 grid(unsigned(ceil_div(R, kWideRows))), block(kWideRows * kWideThreads);
        if (s.D <= kWideThreads * VEC) args(ln_mod_jvp_wide<TX, TM, TY, 1>, grid, block);
        else args(ln_mod_jvp_wide<TX, TM, TY, 2>, grid, block);  // D <= kFastMaxHidden = 2 * 128 * 8
      };
      if (wide) {
        run_wide();
      } else {
        const dim3 grid(unsigned(ceil_div(R, kRowWarps))), block(kRowWarps * 32);
        with_nc(ceil_div(s.D, 32 * VEC), [&](auto nc) {
          constexpr int NC = decltype(nc)::value;
          // kAuto: the warp-per-row kernel where ptxas fitted it in registers (spills at most kSpillSlack bytes;
          // NC = 8, D > 1536, does not), else the wide JVP; the explicit bases run the warp kernel regardless
          const bool fits = fits_in_registers(ln_mod_jvp_warp<TX, TM, TY, NC>);
          if ((variant & kBaseMask) == kAuto && !fits) run_wide();
          else args(ln_mod_jvp_warp<TX, TM, TY, NC>, grid, block);
        });
      }
    };
    if (y_dot_f32) launch(Tag<float>{}); else launch(Tag<TM>{});
  });
  return int(cudaGetLastError());
}

static_assert(kFastMaxHidden <= 2 * kWideThreads * VEC, "the wide JVP instantiates NC = 1, 2");

}  // namespace fast
}  // namespace dumo
