// Fast path, forward and JVP of LayerNorm (no affine) + adaLN modulate: one warp per row (see rowwise_fast.h for
// when it applies and the geometry). Formulas as in rowwise_cuda.cu's general kernels; reference:
// dumo_engine/ops/rowwise_ref.py. No torch headers.
#include <type_traits>

#include "rowwise_device.cuh"
#include "rowwise_fast.h"

namespace dumo {
namespace fast {
namespace {

using namespace dev;

// Whether a lane loads the modulation operands together with the row (PRE: in flight during the reductions, held
// in registers across them) or after the statistics (fewer registers, so more warps per SM). kAuto preloads in the
// kernels that ptxas compiled without spilling; set_cuda_fast_path(kNoPreload / kPreload) forces one choice
// (benchmarks measure both).
inline bool preload(int variant, bool fits) { return variant == kPreload || (variant == kAuto && fits); }

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

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm (no affine) + adaLN modulate, NMOD modulations of one normalisation (2 = the dual final layer):
//   mean = sum_D x / D,  rstd = 1 / sqrt(sum_D (x - mean)^2 / D + eps),  n = (x - mean) rstd
//   y_k = n (1 + scale_k) + shift_k
// One warp per row; x stays in registers (two-pass variance), the modulation chunks are loaded with x.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, int NC, int NMOD, bool PRE>
__global__ void __launch_bounds__(kRowWarps * 32, 4)
    ln_mod_fwd_warp(const TX* __restrict__ x, ModT<TM> m0, ModT<TM> m1, TM* __restrict__ y0, TM* __restrict__ y1,
                    float* __restrict__ mean, float* __restrict__ rstd, int64_t R, int64_t T, int D, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= R) return;  // the whole warp leaves: its shuffles stay complete
  const int64_t n = row / T;
  const TX* xr = x + row * D;
  float xv[NC][VEC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = (k * 32 + lane) * VEC;
    if (c < D) {
      load8(xr + c, xv[k]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[k][j] = 0.f;
    }
  }
  Raw8<TM> pre[PRE ? 2 * NMOD : 1][PRE ? NC : 1];
  if constexpr (PRE) {
#pragma unroll
    for (int m = 0; m < NMOD; ++m) {
      const ModT<TM> mm = m == 0 ? m0 : m1;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = (k * 32 + lane) * VEC;
        if (c < D) {
          pre[2 * m][k].load(mm.shift + n * mm.ss + c);
          pre[2 * m + 1][k].load(mm.scale + n * mm.sc + c);
        } else {
          pre[2 * m][k].zero();
          pre[2 * m + 1][k].zero();
        }
      }
    }
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < NC; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += xv[k][j];
  const float mu = warp_sum(s) / D;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const bool ok = (k * 32 + lane) * VEC < D;
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
      const int c = (k * 32 + lane) * VEC;
      if (c >= D) continue;
      Raw8<TM> sh, sc;
      if constexpr (PRE) {
        sh = pre[2 * m][k];
        sc = pre[2 * m + 1][k];
      } else {
        sh.load(mm.shift + n * mm.ss + c);
        sc.load(mm.scale + n * mm.sc + c);
      }
      float o[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] = xv[k][j] * rs * (1.f + sc[j]) + sh[j];
      store8(yr + c, o);
    }
  }
  if (lane == 0) mean[row] = mu, rstd[row] = rs;
}

// ---------------------------------------------------------------------------------------------------------------
// JVP of y = n (1 + scale) + shift along (x_dot, shift_dot, scale_dot), from the saved mean / rstd:
//   n_dot = rstd (x_dot - sum_D(x_dot) / D - n sum_D(n x_dot) / D)
//   y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
// One warp per row; the two row sums are reduced together.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, typename TY, int NC, bool PRE>
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
    const int c = (k * 32 + lane) * VEC;
    if (c < D) {
      load8(x + row * D + c, nv[k]);
      load8(x_dot + row * D + c, xd[k]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) nv[k][j] = xd[k][j] = 0.f;
    }
  }
  Raw8<TM> pre[PRE ? 3 : 1][PRE ? NC : 1];
  if constexpr (PRE) {
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      const int c = (k * 32 + lane) * VEC;
      if (c < D) {
        pre[0][k].load(scale + n * ssc + c);
        pre[1][k].load(shift_dot + n * ssd + c);
        pre[2][k].load(scale_dot + n * sscd + c);
      } else {
        pre[0][k].zero(), pre[1][k].zero(), pre[2][k].zero();
      }
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
    const int c = (k * 32 + lane) * VEC;
    if (c >= D) continue;
    Raw8<TM> sc, sd, scd;
    if constexpr (PRE) {
      sc = pre[0][k], sd = pre[1][k], scd = pre[2][k];
    } else {
      sc.load(scale + n * ssc + c);
      sd.load(shift_dot + n * ssd + c);
      scd.load(scale_dot + n * sscd + c);
    }
    float o[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o[j] = rs * (xd[k][j] - m0 - nv[k][j] * m1) * (1.f + sc[j]) + nv[k][j] * scd[j] + sd[j];
    store8(y_dot + row * D + c, o);
  }
}

}  // namespace

int ln_mod_fwd(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
               float eps, DType tx, DType tm, int variant, void* stream) {
  const int64_t R = s.N * s.T;
  const dim3 grid(unsigned(ceil_div(R, kRowWarps))), block(kRowWarps * 32);
  auto st = static_cast<cudaStream_t>(stream);
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    const ModT<TM> m0{static_cast<const TM*>(mods[0].shift), static_cast<const TM*>(mods[0].scale),
                      mods[0].shift_stride, mods[0].scale_stride};
    const ModT<TM> m1 = nmod == 2 ? ModT<TM>{static_cast<const TM*>(mods[1].shift),
                                              static_cast<const TM*>(mods[1].scale), mods[1].shift_stride,
                                              mods[1].scale_stride}
                                   : m0;
    TM* y0 = static_cast<TM*>(ys[0]);
    TM* y1 = nmod == 2 ? static_cast<TM*>(ys[1]) : y0;
    const TX* xp = static_cast<const TX*>(x);
    with_nc(ceil_div(s.D, 32 * VEC), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, st>>>(xp, m0, m1, y0, y1, mean, rstd, R, s.T, int(s.D), eps);
      };
      if (nmod == 2) {
        static const bool fits = spill_free(ln_mod_fwd_warp<TX, TM, NC, 2, true>);
        if (preload(variant, fits)) launch(ln_mod_fwd_warp<TX, TM, NC, 2, true>);
        else launch(ln_mod_fwd_warp<TX, TM, NC, 2, false>);
      } else {
        static const bool fits = spill_free(ln_mod_fwd_warp<TX, TM, NC, 1, true>);
        if (preload(variant, fits)) launch(ln_mod_fwd_warp<TX, TM, NC, 1, true>);
        else launch(ln_mod_fwd_warp<TX, TM, NC, 1, false>);
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
  const dim3 grid(unsigned(ceil_div(R, kRowWarps))), block(kRowWarps * 32);
  auto st = static_cast<cudaStream_t>(stream);
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    with_nc(ceil_div(s.D, 32 * VEC), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      auto launch = [&](auto tyt) {
        using TY = typename decltype(tyt)::type;
        static const bool fits = spill_free(ln_mod_jvp_warp<TX, TM, TY, NC, true>);
        auto kernel = preload(variant, fits) ? ln_mod_jvp_warp<TX, TM, TY, NC, true>
                                             : ln_mod_jvp_warp<TX, TM, TY, NC, false>;
        kernel<<<grid, block, 0, st>>>(
            static_cast<const TX*>(x), x_dot, mean, rstd, static_cast<const TM*>(scale), scale_stride,
            static_cast<const TM*>(shift_dot), shift_dot_stride, static_cast<const TM*>(scale_dot),
            scale_dot_stride, static_cast<TY*>(y_dot), R, s.T, int(s.D));
      };
      if (y_dot_f32) launch(Tag<float>{}); else launch(Tag<TM>{});
    });
  });
  return int(cudaGetLastError());
}

}  // namespace fast
}  // namespace dumo
