// C++ CPU twins of the row-wise CUDA kernels (rowwise_cuda.cu): the same formulas, arguments and backward tiling,
// so CI tests this code path and the CPU engine runs one pass per tensor instead of PyTorch's several.
// Rows are split over at::parallel_for (torch's intra-op threads); each row is one loop over D that the compiler
// vectorises (`omp simd`, float32 math for every storage dtype).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rowwise.h"

namespace dumo {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(Tag<float>{}); break;
    case DType::BF16: f(Tag<c10::BFloat16>{}); break;
    case DType::F16: f(Tag<c10::Half>{}); break;
  }
}

template <typename T>
inline float tof(T v) {
  return static_cast<float>(v);
}

// rows per parallel chunk: about 64 KiB of one row stream
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// ---------------------------------------------------------------------------------------------------------------
// y_k = n (1 + scale_k) + shift_k,  n = (x - mean) rstd,  rstd = 1 / sqrt(var + eps)
// Corrected two-pass, from a row buffer: m = sum(x) / D, c = sum(x - m) / D (the float sum's error in m, measured on
// the centred values), mean = m + c, var = sum((x - m)^2) / D - c^2. Without c, a row with a large common offset
// lost float32 accuracy in the mean (offset 1e3, D 8192: 10x PyTorch's error), and so in y, and in gscale later.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM>
void ln_fwd(const TX* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s, float eps) {
  const int64_t R = s.N * s.T, D = s.D;
  at::parallel_for(0, R, row_grain(D), [&](int64_t b, int64_t e) {
    std::vector<float> buf(D);
    float* nb = buf.data();
    for (int64_t row = b; row < e; ++row) {
      const TX* xr = x + row * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) {
        nb[d] = tof(xr[d]);
        sum += nb[d];
      }
      const float m = sum / D;
      float c = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : c, sq)
      for (int64_t d = 0; d < D; ++d) {
        nb[d] -= m;
        c += nb[d];
        sq += nb[d] * nb[d];
      }
      c /= D;
      const float mu = m + c;
      const float rs = 1.f / std::sqrt(std::max(sq / D - c * c, 0.f) + eps);
      const int64_t n = row / s.T;
      for (int k = 0; k < nmod; ++k) {
        const TM* sft = static_cast<const TM*>(mods[k].shift) + n * mods[k].shift_stride;
        const TM* scl = static_cast<const TM*>(mods[k].scale) + n * mods[k].scale_stride;
        TM* y = static_cast<TM*>(ys[k]) + row * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) y[d] = TM((nb[d] - c) * rs * (1.f + tof(scl[d])) + tof(sft[d]));
      }
      mean[row] = mu;
      rstd[row] = rs;
    }
  });
}

// n_dot = rstd (x_dot - mean_D(x_dot) - n mean_D(n x_dot));  y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
template <typename TX, typename TM, typename TY>
void ln_jvp(const TX* x, const float* x_dot, const float* mean, const float* rstd, const TM* scale, int64_t ssc,
            const TM* shift_dot, int64_t ssd, const TM* scale_dot, int64_t sscd, TY* y_dot, Shape s) {
  const int64_t R = s.N * s.T, D = s.D;
  at::parallel_for(0, R, row_grain(D), [&](int64_t b, int64_t e) {
    std::vector<float> buf(D);
    float* nb = buf.data();
    for (int64_t row = b; row < e; ++row) {
      const TX* xr = x + row * D;
      const float* xd = x_dot + row * D;
      const float mu = mean[row], rs = rstd[row];
      float s0 = 0.f, s1 = 0.f;
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t d = 0; d < D; ++d) {
        nb[d] = (tof(xr[d]) - mu) * rs;
        s0 += xd[d];
        s1 += nb[d] * xd[d];
      }
      const float m0 = s0 / D, m1 = s1 / D;
      const int64_t n = row / s.T;
      const TM* scl = scale + n * ssc;
      const TM* sd = shift_dot + n * ssd;
      const TM* scd = scale_dot + n * sscd;
      TY* yd = y_dot + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        yd[d] = TY(rs * (xd[d] - m0 - nb[d] * m1) * (1.f + tof(scl[d])) + nb[d] * tof(scd[d]) + tof(sd[d]));
    }
  });
}

// out[a][n, d] = sum over tiles of partial[a, n, tile, d], tiles in order (deterministic).
template <typename TM>
void colsum(const float* partial, void* const* outs, int arrays, Shape s, int64_t n_tiles) {
  const int64_t D = s.D;
  at::parallel_for(0, arrays * s.N, 1, [&](int64_t b, int64_t e) {
    std::vector<float> acc(D);
    for (int64_t an = b; an < e; ++an) {
      const int64_t a = an / s.N, n = an % s.N;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t tl = 0; tl < n_tiles; ++tl) {
        const float* p = partial + ((a * s.N + n) * n_tiles + tl) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p[d];
      }
      TM* out = static_cast<TM*>(outs[a]) + n * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] = TM(acc[d]);
    }
  });
}

// g = sum_k gy_k (1 + scale_k);  gx = rstd (g - mean_D(g) - n mean_D(g n));
// gshift_k = sum_t gy_k,  gscale_k = sum_t gy_k n  (per kBwdTileRows-row tile, then colsum)
template <typename TX, typename TM>
void ln_bwd(const void* const* gys, const TX* x, const float* mean, const float* rstd, const void* const* scales,
            const int64_t* scale_strides, int nmod, TX* gx, void* const* gshifts, void* const* gscales,
            float* partial, Shape s) {
  const int64_t D = s.D, n_tiles = (s.T + kBwdTileRows - 1) / kBwdTileRows;
  at::parallel_for(0, s.N * n_tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<float> nbuf(D), gbuf(D), onep(nmod * D);
    float* nb = nbuf.data();
    float* g = gbuf.data();
    for (int64_t nt = b; nt < e; ++nt) {
      const int64_t n = nt / n_tiles, tile = nt % n_tiles;
      float* acc[4];
      for (int a = 0; a < 2 * nmod; ++a) {
        acc[a] = partial + ((a * s.N + n) * n_tiles + tile) * D;
        std::fill(acc[a], acc[a] + D, 0.f);
      }
      for (int k = 0; k < nmod; ++k) {
        const TM* sc = static_cast<const TM*>(scales[k]) + n * scale_strides[k];
        for (int64_t d = 0; d < D; ++d) onep[k * D + d] = 1.f + tof(sc[d]);
      }
      const int64_t t_end = std::min<int64_t>(s.T, (tile + 1) * kBwdTileRows);
      for (int64_t t = tile * kBwdTileRows; t < t_end; ++t) {
        const int64_t row = n * s.T + t;
        const TX* xr = x + row * D;
        const float mu = mean[row], rs = rstd[row];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          nb[d] = (tof(xr[d]) - mu) * rs;
          g[d] = 0.f;
        }
        for (int k = 0; k < nmod; ++k) {
          const TM* gy = static_cast<const TM*>(gys[k]) + row * D;
          const float* op = onep.data() + k * D;
          float* as = acc[k];
          float* ac = acc[nmod + k];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const float v = tof(gy[d]);
            g[d] += v * op[d];
            as[d] += v;
            ac[d] += v * nb[d];
          }
        }
        float s0 = 0.f, s1 = 0.f;
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t d = 0; d < D; ++d) {
          s0 += g[d];
          s1 += g[d] * nb[d];
        }
        const float m0 = s0 / D, m1 = s1 / D;
        TX* gr = gx + row * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) gr[d] = TX(rs * (g[d] - m0 - nb[d] * m1));
      }
    }
  });
  void* outs[4];
  for (int k = 0; k < nmod; ++k) outs[k] = gshifts[k], outs[nmod + k] = gscales[k];
  colsum<TM>(partial, outs, 2 * nmod, s, n_tiles);
}

// out = x + g h
template <typename TX, typename TM>
void gfwd(const TX* x, const TM* g, int64_t gs, const TM* h, TX* out, Shape s) {
  const int64_t D = s.D;
  at::parallel_for(0, s.N * s.T, row_grain(D), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const TM* gr = g + (row / s.T) * gs;
      const TX* xr = x + row * D;
      const TM* hr = h + row * D;
      TX* o = out + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = TX(tof(xr[d]) + tof(gr[d]) * tof(hr[d]));
    }
  });
}

// out_dot = x_dot + g_dot h + g h_dot
template <typename TM>
void gjvp(const float* x_dot, const TM* g, int64_t gs, const TM* g_dot, int64_t gds, const TM* h, const TM* h_dot,
          float* out_dot, Shape s) {
  const int64_t D = s.D;
  at::parallel_for(0, s.N * s.T, row_grain(D), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / s.T;
      const TM* gr = g + n * gs;
      const TM* gdr = g_dot + n * gds;
      const float* xd = x_dot + row * D;
      const TM* hr = h + row * D;
      const TM* hd = h_dot + row * D;
      float* o = out_dot + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = xd[d] + tof(gdr[d]) * tof(hr[d]) + tof(gr[d]) * tof(hd[d]);
    }
  });
}

// gh = gout g;  gg = sum_t gout h  (per kBwdTileRows-row tile, then colsum)
template <typename TX, typename TM>
void gbwd(const TX* gout, const TM* g, int64_t gs, const TM* h, TM* gh, void* gg, float* partial, Shape s) {
  const int64_t D = s.D, n_tiles = (s.T + kBwdTileRows - 1) / kBwdTileRows;
  at::parallel_for(0, s.N * n_tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t nt = b; nt < e; ++nt) {
      const int64_t n = nt / n_tiles, tile = nt % n_tiles;
      float* acc = partial + (n * n_tiles + tile) * D;
      std::fill(acc, acc + D, 0.f);
      const TM* gr = g + n * gs;
      const int64_t t_end = std::min<int64_t>(s.T, (tile + 1) * kBwdTileRows);
      for (int64_t t = tile * kBwdTileRows; t < t_end; ++t) {
        const int64_t row = n * s.T + t;
        const TX* go = gout + row * D;
        const TM* hr = h + row * D;
        TM* o = gh + row * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float v = tof(go[d]);
          o[d] = TM(v * tof(gr[d]));
          acc[d] += v * tof(hr[d]);
        }
      }
    }
  });
  void* outs[1] = {gg};
  colsum<TM>(partial, outs, 1, s, n_tiles);
}

}  // namespace

void ln_mod_fwd_cpu(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
                    float eps, DType tx, DType tm) {
  with_type(tx, [&](auto a) {
    with_type(tm, [&](auto b) {
      using TX = typename decltype(a)::type;
      using TM = typename decltype(b)::type;
      ln_fwd<TX, TM>(static_cast<const TX*>(x), mods, nmod, ys, mean, rstd, s, eps);
    });
  });
}

void ln_mod_jvp_cpu(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
                    int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
                    int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm) {
  with_type(tx, [&](auto a) {
    with_type(tm, [&](auto b) {
      using TX = typename decltype(a)::type;
      using TM = typename decltype(b)::type;
      auto run = [&](auto c) {
        using TY = typename decltype(c)::type;
        ln_jvp<TX, TM, TY>(static_cast<const TX*>(x), x_dot, mean, rstd, static_cast<const TM*>(scale), scale_stride,
                           static_cast<const TM*>(shift_dot), shift_dot_stride, static_cast<const TM*>(scale_dot),
                           scale_dot_stride, static_cast<TY*>(y_dot), s);
      };
      if (y_dot_f32) run(Tag<float>{}); else run(Tag<TM>{});
    });
  });
}

void ln_mod_bwd_cpu(const void* const* gys, const void* x, const float* mean, const float* rstd,
                    const void* const* scales, const int64_t* scale_strides, int nmod, void* gx,
                    void* const* gshifts, void* const* gscales, float* partial, Shape s, DType tx, DType tm) {
  with_type(tx, [&](auto a) {
    with_type(tm, [&](auto b) {
      using TX = typename decltype(a)::type;
      using TM = typename decltype(b)::type;
      ln_bwd<TX, TM>(gys, static_cast<const TX*>(x), mean, rstd, scales, scale_strides, nmod, static_cast<TX*>(gx),
                     gshifts, gscales, partial, s);
    });
  });
}

void gated_fwd_cpu(const void* x, const void* g, int64_t g_stride, const void* h, void* out, Shape s, DType tx,
                   DType tm) {
  with_type(tx, [&](auto a) {
    with_type(tm, [&](auto b) {
      using TX = typename decltype(a)::type;
      using TM = typename decltype(b)::type;
      gfwd<TX, TM>(static_cast<const TX*>(x), static_cast<const TM*>(g), g_stride, static_cast<const TM*>(h),
                   static_cast<TX*>(out), s);
    });
  });
}

void gated_jvp_cpu(const float* x_dot, const void* g, int64_t g_stride, const void* g_dot, int64_t g_dot_stride,
                   const void* h, const void* h_dot, float* out_dot, Shape s, DType tm) {
  with_type(tm, [&](auto b) {
    using TM = typename decltype(b)::type;
    gjvp<TM>(x_dot, static_cast<const TM*>(g), g_stride, static_cast<const TM*>(g_dot), g_dot_stride,
             static_cast<const TM*>(h), static_cast<const TM*>(h_dot), out_dot, s);
  });
}

void gated_bwd_cpu(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, void* gg,
                   float* partial, Shape s, DType tx, DType tm) {
  with_type(tx, [&](auto a) {
    with_type(tm, [&](auto b) {
      using TX = typename decltype(a)::type;
      using TM = typename decltype(b)::type;
      gbwd<TX, TM>(static_cast<const TX*>(gout), static_cast<const TM*>(g), g_stride, static_cast<const TM*>(h),
                   static_cast<TM*>(gh), gg, partial, s);
    });
  });
}

}  // namespace dumo
