// CUDA kernels for the row-wise ops (see rowwise.h for layout and dtypes; dumo_engine/ops/rowwise_ref.py is the
// PyTorch reference), and the launchers. No torch headers: nvcc compile-checks this file alone.
//
// Two paths. The fast path (rowwise_fast_*.cu; rowwise_fast.h says when it applies: 16-byte aligned rows,
// D % 8 == 0, D <= 2048, the common dtype mixes) runs a warp per row. This file's general kernels run everything
// else (odd D, unaligned operands, D up to kMaxHidden, every dtype mix), and the backward's column-sum pass.
//
// General-path geometry. A row of D elements is owned by `tpr` threads (blockDim.x = ceil(D/8) rounded up to a warp), each
// holding 8 columns in registers: on the vector path (D % 8 == 0 and 16-byte aligned operands) 8 consecutive
// columns read with one 16-byte load (bf16/fp16) or two (fp32); on the scalar path (any D) columns lane + j*tpr,
// coalesced across the warp. blockDim.y = rows per block (a power of two, about 256 threads per block). So each
// input is read once and each output written once; row sums go through warp shuffles and one shared-memory step.
// Backward column sums (over the T rows of a sample) are accumulated per kBwdTileRows-row tile in registers, reduced over
// blockDim.y in shared memory, written as fp32 partials and summed in a second small kernel in a fixed order:
// deterministic, no atomics.
#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "rowwise_device.cuh"
#include "rowwise_fast.h"

namespace dumo {
namespace {

using namespace dev;

// set_cuda_fast_path: fast::kGeneral (the general kernels only), kAuto, ...; atomic: launches on other host threads
// may read it while it is set.
std::atomic<int> g_variant{fast::kDefaultVariant};

// Whether a call under `variant` may take the fast path (its base choice is not the general kernels).
inline bool fast_path(int variant) { return (variant & fast::kBaseMask) != fast::kGeneral; }

// The (up to) 8 columns this thread owns in a row of D.
template <bool V>
struct Cols {
  int lane, nthr, D;
  __device__ __forceinline__ int col(int j) const { return V ? lane * VEC + j : lane + j * nthr; }
  __device__ __forceinline__ bool ok(int j) const { return V ? lane * VEC < D : col(j) < D; }
};

template <bool V, typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ row, const Cols<V>& c, float* r) {
  if constexpr (V) {
    if (c.lane * VEC < c.D) {
      load8(row + c.lane * VEC, r);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) r[j] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) r[j] = c.ok(j) ? Conv<T>::to(row[c.col(j)]) : 0.f;
  }
}

template <bool V, typename T>
__device__ __forceinline__ void store_cols(T* __restrict__ row, const Cols<V>& c, const float* r) {
  if constexpr (V) {
    if (c.lane * VEC < c.D) store8(row + c.lane * VEC, r);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (c.ok(j)) row[c.col(j)] = Conv<T>::from(r[j]);
  }
}

// Sum K values over the threads of one row (blockDim.x threads, a multiple of 32). Every thread of the block
// must call it (it may __syncthreads); every thread of the row gets the same totals (fixed order).
template <int K>
__device__ __forceinline__ void row_sum(float* v, float* sh /* shared, K * 32 */) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  const int wpr = blockDim.x >> 5;
  if (wpr == 1) return;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, base = threadIdx.y * wpr;
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k * 32 + base + w] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int i = 0; i < wpr; ++i) s += sh[k * 32 + base + i];
    v[k] = s;
  }
}


// ---------------------------------------------------------------------------------------------------------------
// LayerNorm (no affine) + adaLN modulate, NMOD modulations of one normalisation (2 = the dual final layer):
//   mean = sum_D x / D,  rstd = 1 / sqrt(sum_D (x - mean)^2 / D + eps),  n = (x - mean) rstd
//   y_k = n (1 + scale_k) + shift_k
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, bool V, int NMOD>
__global__ void __launch_bounds__(512) ln_mod_fwd_kernel(const TX* __restrict__ x, ModT<TM> m0, ModT<TM> m1,
                                                          TM* __restrict__ y0, TM* __restrict__ y1,
                                                          float* __restrict__ mean, float* __restrict__ rstd,
                                                          int64_t R, int64_t T, int D, float eps) {
  __shared__ float sh[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < R;
  const Cols<V> c{int(threadIdx.x), int(blockDim.x), D};
  float xv[VEC];
  if (live) {
    load_cols<V>(x + row * D, c, xv);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] = 0.f;
  }
  float s[1] = {0.f};
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[0] += xv[j];
  row_sum<1>(s, sh);
  const float mu = s[0] / D;
  float q[1] = {0.f};
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    xv[j] = c.ok(j) ? xv[j] - mu : 0.f;  // two-pass variance from registers
    q[0] += xv[j] * xv[j];
  }
  row_sum<1>(q, sh);
  const float rs = rsqrtf(q[0] / D + eps);
  if (!live) return;  // after the last block-wide step
  const int64_t n = row / T;
#pragma unroll
  for (int j = 0; j < VEC; ++j) xv[j] *= rs;
#pragma unroll
  for (int k = 0; k < NMOD; ++k) {
    const ModT<TM>& m = k == 0 ? m0 : m1;
    float sft[VEC], scl[VEC], y[VEC];
    load_cols<V>(m.shift + n * m.ss, c, sft);
    load_cols<V>(m.scale + n * m.sc, c, scl);
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = xv[j] * (1.f + scl[j]) + sft[j];
    store_cols<V>((k == 0 ? y0 : y1) + row * D, c, y);
  }
  if (threadIdx.x == 0) mean[row] = mu, rstd[row] = rs;
}

// ---------------------------------------------------------------------------------------------------------------
// JVP of y = n (1 + scale) + shift along (x_dot, shift_dot, scale_dot), from the saved mean / rstd:
//   n_dot = rstd (x_dot - sum_D(x_dot) / D - n sum_D(n x_dot) / D)
//   y_dot = n_dot (1 + scale) + n scale_dot + shift_dot
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, typename TY, bool V>
__global__ void __launch_bounds__(512) ln_mod_jvp_kernel(
    const TX* __restrict__ x, const float* __restrict__ x_dot, const float* __restrict__ mean,
    const float* __restrict__ rstd, const TM* __restrict__ scale, int64_t ssc, const TM* __restrict__ shift_dot,
    int64_t ssd, const TM* __restrict__ scale_dot, int64_t sscd, TY* __restrict__ y_dot, int64_t R, int64_t T,
    int D) {
  __shared__ float sh[64];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < R;
  const Cols<V> c{int(threadIdx.x), int(blockDim.x), D};
  float nv[VEC], xd[VEC];
  float mu = 0.f, rs = 0.f;
  if (live) {
    load_cols<V>(x + row * D, c, nv);
    load_cols<V>(x_dot + row * D, c, xd);
    mu = mean[row], rs = rstd[row];
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) nv[j] = xd[j] = 0.f;
  }
  float s[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    nv[j] = c.ok(j) ? (nv[j] - mu) * rs : 0.f;
    s[0] += xd[j];
    s[1] += nv[j] * xd[j];
  }
  row_sum<2>(s, sh);
  if (!live) return;
  const int64_t n = row / T;
  const float m0 = s[0] / D, m1 = s[1] / D;
  float scl[VEC], sd[VEC], scd[VEC], yd[VEC];
  load_cols<V>(scale + n * ssc, c, scl);
  load_cols<V>(shift_dot + n * ssd, c, sd);
  load_cols<V>(scale_dot + n * sscd, c, scd);
#pragma unroll
  for (int j = 0; j < VEC; ++j) yd[j] = rs * (xd[j] - m0 - nv[j] * m1) * (1.f + scl[j]) + nv[j] * scd[j] + sd[j];
  store_cols<V>(y_dot + row * D, c, yd);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward of y_k = n (1 + scale_k) + shift_k, k < NMOD, for gradients gy_k:
//   g = sum_k gy_k (1 + scale_k)
//   gx = rstd (g - sum_D(g) / D - n sum_D(g n) / D)
//   gshift_k = sum_t gy_k,  gscale_k = sum_t gy_k n            (column sums over the T rows of a sample)
// Grid (N, tiles of kBwdTileRows rows); partial[(a, n, tile, d)], a = shift_0.., scale_0..
// ---------------------------------------------------------------------------------------------------------------
template <bool V, int A>
__device__ __forceinline__ void write_partials(const float (&acc)[A][VEC], const Cols<V>& c, float* red,
                                               float* __restrict__ partial, int64_t N, int64_t n, int64_t tile,
                                               int64_t n_tiles, int D) {
  const int me = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int a = 0; a < A; ++a) {  // unrolled: acc stays in registers
    __syncthreads();
#pragma unroll
    for (int j = 0; j < VEC; ++j) red[me + j] = acc[a][j];
    __syncthreads();
    if (threadIdx.y == 0) {
      float* out = partial + ((a * N + n) * n_tiles + tile) * D;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float sum = 0.f;
        for (int yy = 0; yy < int(blockDim.y); ++yy) sum += red[(yy * blockDim.x + threadIdx.x) * VEC + j];
        if (c.ok(j)) out[c.col(j)] = sum;
      }
    }
  }
}

template <typename TX, typename TM, bool V, int NMOD>
__global__ void __launch_bounds__(512) ln_mod_bwd_kernel(const TM* __restrict__ gy0, const TM* __restrict__ gy1,
                                                          const TX* __restrict__ x, const float* __restrict__ mean,
                                                          const float* __restrict__ rstd,
                                                          const TM* __restrict__ sc0, int64_t s0,
                                                          const TM* __restrict__ sc1, int64_t s1,
                                                          TX* __restrict__ gx, float* __restrict__ partial,
                                                          int64_t N, int64_t T, int D) {
  __shared__ float sh[64];
  DUMO_DYNAMIC_SMEM(float, red);
  const int64_t n = blockIdx.x, tile = blockIdx.y, n_tiles = gridDim.y;  // N on x: no 65535 limit
  const Cols<V> c{int(threadIdx.x), int(blockDim.x), D};
  float onep[NMOD][VEC];
  load_cols<V>(sc0 + n * s0, c, onep[0]);
  if constexpr (NMOD == 2) load_cols<V>(sc1 + n * s1, c, onep[1]);
#pragma unroll
  for (int k = 0; k < NMOD; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) onep[k][j] += 1.f;
  float acc[2 * NMOD][VEC];
#pragma unroll
  for (int a = 0; a < 2 * NMOD; ++a)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[a][j] = 0.f;
  const int iters = kBwdTileRows / blockDim.y;  // blockDim.y is a power of two dividing kBwdTileRows
  for (int it = 0; it < iters; ++it) {
    const int64_t t = tile * kBwdTileRows + it * blockDim.y + threadIdx.y;
    const bool live = t < T;
    const int64_t row = n * T + t;
    float gy[NMOD][VEC], nv[VEC];
    float mu = 0.f, rs = 0.f;
    if (live) {
      load_cols<V>(gy0 + row * D, c, gy[0]);
      if constexpr (NMOD == 2) load_cols<V>(gy1 + row * D, c, gy[1]);
      load_cols<V>(x + row * D, c, nv);
      mu = mean[row], rs = rstd[row];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        nv[j] = 0.f;
#pragma unroll
        for (int k = 0; k < NMOD; ++k) gy[k][j] = 0.f;
      }
    }
    float g[VEC], s[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      nv[j] = (live && c.ok(j)) ? (nv[j] - mu) * rs : 0.f;
      g[j] = 0.f;
#pragma unroll
      for (int k = 0; k < NMOD; ++k) g[j] += gy[k][j] * onep[k][j];
      s[0] += g[j];
      s[1] += g[j] * nv[j];
#pragma unroll
      for (int k = 0; k < NMOD; ++k) {
        acc[k][j] += gy[k][j];
        acc[NMOD + k][j] += gy[k][j] * nv[j];
      }
    }
    row_sum<2>(s, sh);
    if (live) {
      const float m0 = s[0] / D, m1 = s[1] / D;
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = rs * (g[j] - m0 - nv[j] * m1);
      store_cols<V>(gx + row * D, c, g);
    }
  }
  write_partials<V, 2 * NMOD>(acc, c, red, partial, N, n, tile, n_tiles, D);
}

// out[a][n, d] = sum_tile partial[a, n, tile, d] (fixed order), a < arrays; outputs (N, D) contiguous.
struct OutPtrs {
  void* p[4];
};

template <typename TM>
__global__ void colsum_kernel(const float* __restrict__ partial, const __grid_constant__ OutPtrs outs, int arrays, int64_t N,
                              int64_t n_tiles, int D) {
  const int64_t ND = N * D;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= arrays * ND) return;
  const int64_t a = i / ND, nd = i % ND, n = nd / D, d = nd % D;
  const float* p = partial + (a * N + n) * n_tiles * D + d;
  float s = 0.f;
  for (int64_t tl = 0; tl < n_tiles; ++tl) s += p[tl * D];
  static_cast<TM*>(outs.p[a])[nd] = Conv<TM>::from(s);
}

// ---------------------------------------------------------------------------------------------------------------
// Gated residual, elementwise over (N, T, D) with the per-sample gate g[n]:
//   forward  out = x + g h
//   JVP      out_dot = x_dot + g_dot h + g h_dot
// A thread handles 8 consecutive elements on the vector path (never across a row: D % 8 == 0), one otherwise.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, bool V, bool CS = false>
__global__ void gated_fwd_kernel(const TX* __restrict__ x, const TM* __restrict__ g, int64_t gs,
                                 const TM* __restrict__ h, TX* __restrict__ out, int64_t total, int64_t TD, int D) {
  const int64_t per = V ? VEC : 1;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * per; i < total;
       i += int64_t(gridDim.x) * blockDim.x * per) {
    const int64_t gi = (i / TD) * gs + i % D;
    if constexpr (V) {
      float xv[VEC], gv[VEC], hv[VEC];
      load8<TX, CS>(x + i, xv);
      load8(g + gi, gv);
      load8<TM, CS>(h + i, hv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[j] += gv[j] * hv[j];
      store8<TX, CS>(out + i, xv);
    } else {
      out[i] = Conv<TX>::from(Conv<TX>::to(x[i]) + Conv<TM>::to(g[gi]) * Conv<TM>::to(h[i]));
    }
  }
}

template <typename TM, bool V, bool CS = false>
__global__ void gated_jvp_kernel(const float* __restrict__ x_dot, const TM* __restrict__ g, int64_t gs,
                                 const TM* __restrict__ g_dot, int64_t gds, const TM* __restrict__ h,
                                 const TM* __restrict__ h_dot, float* __restrict__ out_dot, int64_t total,
                                 int64_t TD, int D) {
  const int64_t per = V ? VEC : 1;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * per; i < total;
       i += int64_t(gridDim.x) * blockDim.x * per) {
    const int64_t n = i / TD, d = i % D;
    if constexpr (V) {
      float xd[VEC], gv[VEC], gd[VEC], hv[VEC], hd[VEC];
      load8<float, CS>(x_dot + i, xd);
      load8(g + n * gs + d, gv);
      load8(g_dot + n * gds + d, gd);
      load8<TM, CS>(h + i, hv);
      load8<TM, CS>(h_dot + i, hd);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xd[j] += gd[j] * hv[j] + gv[j] * hd[j];
      store8<float, CS>(out_dot + i, xd);
    } else {
      out_dot[i] = x_dot[i] + Conv<TM>::to(g_dot[n * gds + d]) * Conv<TM>::to(h[i]) +
                   Conv<TM>::to(g[n * gs + d]) * Conv<TM>::to(h_dot[i]);
    }
  }
}

// The same two ops, rows layout (fast::kGatedRows): block (D / 8 threads on x, blockDim.y rows at a time), grid
// (groups of rows_per_block rows, N samples). A thread owns columns [8 x, 8 x + 8) of its rows and loads its gate
// chunk(s) once, for all of them. CS: the once-read operands and the outputs with the evict-first cache hint.
template <typename TX, typename TM, bool CS>
__global__ void gated_fwd_rows(const TX* __restrict__ x, const TM* __restrict__ g, int64_t gs,
                               const TM* __restrict__ h, TX* __restrict__ out, int64_t T, int D,
                               int rows_per_block) {
  const int c = int(threadIdx.x) * VEC;
  const int64_t n = blockIdx.y, t0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t t_end = t0 + rows_per_block < T ? t0 + rows_per_block : T;
  float gv[VEC];
  load8(g + n * gs + c, gv);
  for (int64_t t = t0 + threadIdx.y; t < t_end; t += blockDim.y) {
    const int64_t i = (n * T + t) * D + c;
    float xv[VEC], hv[VEC];
    load8<TX, CS>(x + i, xv);
    load8<TM, CS>(h + i, hv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] += gv[j] * hv[j];
    store8<TX, CS>(out + i, xv);
  }
}

template <typename TM, bool CS>
__global__ void gated_jvp_rows(const float* __restrict__ x_dot, const TM* __restrict__ g, int64_t gs,
                               const TM* __restrict__ g_dot, int64_t gds, const TM* __restrict__ h,
                               const TM* __restrict__ h_dot, float* __restrict__ out_dot, int64_t T, int D,
                               int rows_per_block) {
  const int c = int(threadIdx.x) * VEC;
  const int64_t n = blockIdx.y, t0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t t_end = t0 + rows_per_block < T ? t0 + rows_per_block : T;
  float gv[VEC], gd[VEC];
  load8(g + n * gs + c, gv);
  load8(g_dot + n * gds + c, gd);
  for (int64_t t = t0 + threadIdx.y; t < t_end; t += blockDim.y) {
    const int64_t i = (n * T + t) * D + c;
    float xd[VEC], hv[VEC], hd[VEC];
    load8<float, CS>(x_dot + i, xd);
    load8<TM, CS>(h + i, hv);
    load8<TM, CS>(h_dot + i, hd);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xd[j] += gd[j] * hv[j] + gv[j] * hd[j];
    store8<float, CS>(out_dot + i, xd);
  }
}

// Backward of out = x + g h:  gx = gout (no kernel),  gh = gout g,  gg = sum_t gout h  (tiled like ln_mod_bwd)
template <typename TX, typename TM, bool V>
__global__ void __launch_bounds__(512) gated_bwd_kernel(const TX* __restrict__ gout, const TM* __restrict__ g,
                                                         int64_t gs, const TM* __restrict__ h, TM* __restrict__ gh,
                                                         float* __restrict__ partial, int64_t N, int64_t T, int D) {
  DUMO_DYNAMIC_SMEM(float, red);
  const int64_t n = blockIdx.x, tile = blockIdx.y, n_tiles = gridDim.y;  // N on x: no 65535 limit
  const Cols<V> c{int(threadIdx.x), int(blockDim.x), D};
  float gv[VEC], acc[1][VEC];
  load_cols<V>(g + n * gs, c, gv);
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[0][j] = 0.f;
  const int iters = kBwdTileRows / blockDim.y;
  for (int it = 0; it < iters; ++it) {
    const int64_t t = tile * kBwdTileRows + it * blockDim.y + threadIdx.y;
    if (t >= T) break;  // no block-wide step inside this loop
    const int64_t row = n * T + t;
    float go[VEC], hv[VEC], o[VEC];
    load_cols<V>(gout + row * D, c, go);
    load_cols<V>(h + row * D, c, hv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o[j] = go[j] * gv[j];
      acc[0][j] += go[j] * hv[j];
    }
    store_cols<V>(gh + row * D, c, o);
  }
  write_partials<V, 1>(acc, c, red, partial, N, n, tile, n_tiles, D);
}

// ---------------------------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------------------------
struct Geo {
  dim3 block;
  int rpb;
};

// tpr threads per row (8 columns each, a multiple of 32), rpb rows per block (power of two, ~256 threads).
Geo geometry(int64_t D) {
  const int tpr = int(((D + VEC - 1) / VEC + 31) / 32 * 32);
  int rpb = 1;
  while (rpb * 2 * tpr <= 256 && rpb * 2 <= kBwdTileRows) rpb *= 2;
  return {dim3(tpr, rpb), rpb};
}

int finish() { return int(cudaGetLastError()); }


// Grid for the flat elementwise kernels: enough blocks to fill the chip, grid-stride beyond that.
unsigned flat_grid(int64_t total, int per) {
  return unsigned(ceil_div(ceil_div(total, per), 256) < (1 << 20) ? ceil_div(ceil_div(total, per), 256) : (1 << 20));
}

}  // namespace

static int ln_mod_fwd_with(int variant, bool vec, const void* x, const Mod* mods, int nmod, void* const* ys,
                           float* mean, float* rstd, Shape s, float eps, DType tx, DType tm, void* stream) {
  const int64_t R = s.N * s.T;
  if (R == 0) return 0;
  if (vec && fast_path(variant) && fast::applies(s.D, tx, tm))
    return fast::ln_mod_fwd(x, mods, nmod, ys, mean, rstd, s, eps, tx, tm, variant, stream);
  const Geo geo = geometry(s.D);
  const dim3 grid(unsigned(ceil_div(R, geo.rpb)));
  auto st = static_cast<cudaStream_t>(stream);
  with_type(tx, [&](auto txt) {
    with_type(tm, [&](auto tmt) {
      using TX = typename decltype(txt)::type;
      using TM = typename decltype(tmt)::type;
      const ModT<TM> m0 = mod_t<TM>(mods[0]), m1 = mod_t<TM>(mods[nmod - 1]);  // m1 unused when nmod == 1
      TM* y0 = static_cast<TM*>(ys[0]);
      TM* y1 = static_cast<TM*>(ys[nmod - 1]);
      const TX* xp = static_cast<const TX*>(x);
#define DUMO_LN_FWD(V, K)                                                                              \
  DUMO_LAUNCH(grid, geo.block, 0, st, ln_mod_fwd_kernel<TX, TM, V, K>)(xp, m0, m1, y0, y1, mean, rstd, R, s.T, \
                                                                      int(s.D), eps)
      if (nmod == 2) {
        if (vec) DUMO_LN_FWD(true, 2); else DUMO_LN_FWD(false, 2);
      } else {
        if (vec) DUMO_LN_FWD(true, 1); else DUMO_LN_FWD(false, 1);
      }
#undef DUMO_LN_FWD
    });
  });
  return finish();
}

static int ln_mod_jvp_with(int variant, bool vec, const void* x, const float* x_dot, const float* mean,
                           const float* rstd, const void* scale, int64_t scale_stride, const void* shift_dot,
                           int64_t shift_dot_stride, const void* scale_dot, int64_t scale_dot_stride, void* y_dot,
                           bool y_dot_f32, Shape s, DType tx, DType tm, void* stream) {
  const int64_t R = s.N * s.T;
  if (R == 0) return 0;
  if (vec && fast_path(variant) && fast::applies(s.D, tx, tm))
    return fast::ln_mod_jvp(x, x_dot, mean, rstd, scale, scale_stride, shift_dot, shift_dot_stride, scale_dot,
                            scale_dot_stride, y_dot, y_dot_f32, s, tx, tm, variant, stream);
  const Geo geo = geometry(s.D);
  const dim3 grid(unsigned(ceil_div(R, geo.rpb)));
  auto st = static_cast<cudaStream_t>(stream);
  with_type(tx, [&](auto txt) {
    with_type(tm, [&](auto tmt) {
      using TX = typename decltype(txt)::type;
      using TM = typename decltype(tmt)::type;
      auto launch = [&](auto tyt) {
        using TY = typename decltype(tyt)::type;
#define DUMO_LN_JVP(V)                                                                                           \
  DUMO_LAUNCH(grid, geo.block, 0, st, ln_mod_jvp_kernel<TX, TM, TY, V>)(                                         \
      static_cast<const TX*>(x), x_dot, mean, rstd, static_cast<const TM*>(scale), scale_stride,                 \
      static_cast<const TM*>(shift_dot), shift_dot_stride, static_cast<const TM*>(scale_dot), scale_dot_stride, \
      static_cast<TY*>(y_dot), R, s.T, int(s.D))
        if (vec) DUMO_LN_JVP(true); else DUMO_LN_JVP(false);
#undef DUMO_LN_JVP
      };
      if (y_dot_f32) launch(Tag<float>{}); else launch(Tag<TM>{});
    });
  });
  return finish();
}

static int ln_mod_bwd_with(int variant, bool vec, const void* const* gys, const void* x, const float* mean,
                           const float* rstd, const void* const* scales, const int64_t* scale_strides, int nmod,
                           void* gx, void* const* gshifts, void* const* gscales, float* partial, Shape s, DType tx,
                           DType tm, void* stream) {
  if (s.N * s.D == 0) return 0;
  const Geo geo = geometry(s.D);
  const int64_t n_tiles = ceil_div(s.T, kBwdTileRows);
  const dim3 grid(unsigned(s.N), unsigned(n_tiles));
  const size_t smem = size_t(geo.block.x) * geo.block.y * VEC * sizeof(float);
  auto st = static_cast<cudaStream_t>(stream);
  int check = 0;  // a failed fast-path launch (its shared-memory opt-in)
  with_type(tx, [&](auto txt) {
    with_type(tm, [&](auto tmt) {
      using TX = typename decltype(txt)::type;
      using TM = typename decltype(tmt)::type;
      const TM* g0 = static_cast<const TM*>(gys[0]);
      const TM* g1 = static_cast<const TM*>(gys[nmod - 1]);  // the second modulation's operands: unused for nmod 1
      const TM* c0 = static_cast<const TM*>(scales[0]);
      const TM* c1 = static_cast<const TM*>(scales[nmod - 1]);
      const int64_t s1 = scale_strides[nmod - 1];
#define DUMO_LN_BWD(V, K)                                                                                 \
  DUMO_LAUNCH(grid, geo.block, smem, st, ln_mod_bwd_kernel<TX, TM, V, K>)(g0, g1, static_cast<const TX*>(x), mean, \
                                                                 rstd, c0, scale_strides[0], c1, s1,       \
                                                                 static_cast<TX*>(gx), partial, s.N, s.T, int(s.D))
      OutPtrs outs{};
      for (int k = 0; k < nmod; ++k) outs.p[k] = gshifts[k], outs.p[nmod + k] = gscales[k];
      int64_t tiles = n_tiles;  // the fast path's own tiling; there one tile per sample = column sums written
      // no rows: gx is empty; the column sums are zeros (colsum over zero tiles below)
      bool done = s.T == 0, summed = false;
      if (!done && vec && fast_path(variant) && fast::applies(s.D, tx, tm)) {
        const int r = fast::ln_mod_bwd_tiles(gys, x, mean, rstd, scales, scale_strides, nmod, gx, partial, outs.p,
                                             &tiles, s, tx, tm, variant, stream);
        if (r != fast::kNotApplicable) check = r, done = true, summed = tiles == 1;  // else: too little smem
      }
      if (!done) {
        if (nmod == 2) {
          if (vec) DUMO_LN_BWD(true, 2); else DUMO_LN_BWD(false, 2);
        } else {
          if (vec) DUMO_LN_BWD(true, 1); else DUMO_LN_BWD(false, 1);
        }
      }
#undef DUMO_LN_BWD
      const int64_t total = 2 * nmod * s.N * s.D;
      if (check == 0 && !summed)
        DUMO_LAUNCH(unsigned(ceil_div(total, 256)), 256, 0, st, colsum_kernel<TM>)(partial, outs, 2 * nmod, s.N, tiles,
                                                                         int(s.D));
    });
  });
  return check != 0 ? check : finish();
}

namespace {

// The gated ops' rows layout (fast::kGatedRows), where it applies: D / 8 threads per row (D <= 2048), N <= 65535
// samples (grid y); blockDim.y rows at a time, about 256 threads per block, kGatedRowsPerThread rows per thread.
constexpr int kGatedRowsPerThread = 8;
struct RowsGeo {
  dim3 grid, block;
  int rows_per_block;
};
RowsGeo gated_rows_geo(Shape s) {
  const int bx = int(s.D / VEC), by = bx >= 256 ? 1 : 256 / bx, rpb = by * kGatedRowsPerThread;
  return {dim3(unsigned(ceil_div(s.T, rpb)), unsigned(s.N)), dim3(unsigned(bx), unsigned(by)), rpb};
}
bool gated_rows(int variant, bool vec, Shape s) {
  return vec && fast_path(variant) && (variant & fast::kGatedRows) && s.D <= fast::kFastMaxHidden && s.N <= 65535;
}
bool streaming(int variant) { return fast_path(variant) && (variant & fast::kStreaming); }

}  // namespace

static int gated_fwd_with(int variant, bool vec, const void* x, const void* g, int64_t g_stride, const void* h,
                          void* out, Shape s, DType tx, DType tm, void* stream) {
  const int64_t total = s.N * s.T * s.D;
  if (total == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const bool rows = gated_rows(variant, vec, s), cs = streaming(variant);
  with_type(tx, [&](auto txt) {
    with_type(tm, [&](auto tmt) {
      using TX = typename decltype(txt)::type;
      using TM = typename decltype(tmt)::type;
      auto xp = static_cast<const TX*>(x);
      auto gp = static_cast<const TM*>(g);
      auto hp = static_cast<const TM*>(h);
      auto op = static_cast<TX*>(out);
      const int64_t TD = s.T * s.D;
      if (rows) {
        const RowsGeo geo = gated_rows_geo(s);
#define DUMO_GATED_ROWS(CS)                                                                                   \
  DUMO_LAUNCH(geo.grid, geo.block, 0, st, gated_fwd_rows<TX, TM, CS>)(xp, gp, g_stride, hp, op, s.T, int(s.D), \
                                                                        geo.rows_per_block)
        if (cs) DUMO_GATED_ROWS(true); else DUMO_GATED_ROWS(false);
#undef DUMO_GATED_ROWS
      } else if (vec) {
        if (cs)
          DUMO_LAUNCH(flat_grid(total, VEC), 256, 0, st, gated_fwd_kernel<TX, TM, true, true>)(
              xp, gp, g_stride, hp, op, total, TD, int(s.D));
        else
          DUMO_LAUNCH(flat_grid(total, VEC), 256, 0, st, gated_fwd_kernel<TX, TM, true>)(xp, gp, g_stride, hp, op,
                                                                                          total, TD, int(s.D));
      } else {
        DUMO_LAUNCH(flat_grid(total, 1), 256, 0, st, gated_fwd_kernel<TX, TM, false>)(xp, gp, g_stride, hp, op, total,
                                                                                       TD, int(s.D));
      }
    });
  });
  return finish();
}

static int gated_jvp_with(int variant, bool vec, const float* x_dot, const void* g, int64_t g_stride,
                          const void* g_dot, int64_t g_dot_stride, const void* h, const void* h_dot, float* out_dot,
                          Shape s, DType tm, void* stream) {
  const int64_t total = s.N * s.T * s.D;
  if (total == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const bool rows = gated_rows(variant, vec, s), cs = streaming(variant);
  with_type(tm, [&](auto tmt) {
    using TM = typename decltype(tmt)::type;
    auto gp = static_cast<const TM*>(g);
    auto gdp = static_cast<const TM*>(g_dot);
    auto hp = static_cast<const TM*>(h);
    auto hdp = static_cast<const TM*>(h_dot);
    const int64_t TD = s.T * s.D;
    if (rows) {
      const RowsGeo geo = gated_rows_geo(s);
#define DUMO_GATED_ROWS(CS)                                                                                          \
  DUMO_LAUNCH(geo.grid, geo.block, 0, st, gated_jvp_rows<TM, CS>)(x_dot, gp, g_stride, gdp, g_dot_stride, hp, hdp, \
                                                                   out_dot, s.T, int(s.D), geo.rows_per_block)
      if (cs) DUMO_GATED_ROWS(true); else DUMO_GATED_ROWS(false);
#undef DUMO_GATED_ROWS
    } else if (vec) {
      if (cs)
        DUMO_LAUNCH(flat_grid(total, VEC), 256, 0, st, gated_jvp_kernel<TM, true, true>)(
            x_dot, gp, g_stride, gdp, g_dot_stride, hp, hdp, out_dot, total, TD, int(s.D));
      else
        DUMO_LAUNCH(flat_grid(total, VEC), 256, 0, st, gated_jvp_kernel<TM, true>)(
            x_dot, gp, g_stride, gdp, g_dot_stride, hp, hdp, out_dot, total, TD, int(s.D));
    } else {
      DUMO_LAUNCH(flat_grid(total, 1), 256, 0, st, gated_jvp_kernel<TM, false>)(
          x_dot, gp, g_stride, gdp, g_dot_stride, hp, hdp, out_dot, total, TD, int(s.D));
    }
  });
  return finish();
}

static int gated_bwd_with(int variant, bool vec, const void* gout, const void* g, int64_t g_stride, const void* h,
                          void* gh, void* gg, float* partial, Shape s, DType tx, DType tm, void* stream) {
  if (s.N * s.D == 0) return 0;
  const Geo geo = geometry(s.D);
  const int64_t n_tiles = ceil_div(s.T, kBwdTileRows);
  const dim3 grid(unsigned(s.N), unsigned(n_tiles));
  const size_t smem = size_t(geo.block.x) * geo.block.y * VEC * sizeof(float);
  auto st = static_cast<cudaStream_t>(stream);
  int check = 0;  // a failed fast-path launch (its shared-memory opt-in)
  with_type(tx, [&](auto txt) {
    with_type(tm, [&](auto tmt) {
      using TX = typename decltype(txt)::type;
      using TM = typename decltype(tmt)::type;
      auto gop = static_cast<const TX*>(gout);
      auto gp = static_cast<const TM*>(g);
      auto hp = static_cast<const TM*>(h);
      auto ghp = static_cast<TM*>(gh);
      int64_t tiles = n_tiles;  // the fast path's own tiling; there one tile per sample = column sums written
      bool done = s.T == 0, summed = false;  // no rows: gh is empty; gg is zeros (colsum over zero tiles)
      if (!done && vec && fast_path(variant) && fast::applies(s.D, tx, tm)) {
        const int r = fast::gated_bwd_tiles(gout, g, g_stride, h, gh, partial, gg, &tiles, s, tx, tm, variant,
                                            stream);
        if (r != fast::kNotApplicable) check = r, done = true, summed = tiles == 1;  // else: too little smem
      }
      if (!done) {
        if (vec)
          DUMO_LAUNCH(grid, geo.block, smem, st, gated_bwd_kernel<TX, TM, true>)(gop, gp, g_stride, hp, ghp, partial,
                                                                                s.N, s.T, int(s.D));
        else
          DUMO_LAUNCH(grid, geo.block, smem, st, gated_bwd_kernel<TX, TM, false>)(gop, gp, g_stride, hp, ghp, partial,
                                                                                 s.N, s.T, int(s.D));
      }
      OutPtrs outs{};
      outs.p[0] = gg;
      if (check == 0 && !summed)
        DUMO_LAUNCH(unsigned(ceil_div(s.N * s.D, 256)), 256, 0, st, colsum_kernel<TM>)(partial, outs, 1, s.N, tiles,
                                                                             int(s.D));
    });
  });
  return check != 0 ? check : finish();
}

// ---------------------------------------------------------------------------------------------------------------
// kTuned (rowwise_fast.h): measure each key's candidate variants once, run the fastest from then on.
// ---------------------------------------------------------------------------------------------------------------
namespace {

constexpr int kTuneReps = 5;          // timed runs per candidate (interleaved over the candidates), median kept
constexpr float kTuneMargin = 0.02f;  // a later candidate replaces the current best only when this much faster
constexpr size_t kTuneMaxKeys = 4096;  // beyond this many keys, new keys run the fallback unmeasured

// The candidates of each op: the variants that change its kernels (the fallback, i.e. the caller's bits without
// kTuned, goes first; duplicates are dropped). The forward has only the base choices; the JVP the wide layout; the
// LayerNorm backward preload x planned tiles, two rows per pass and a block of warps per row (both ignore the
// preload choice) x planned tiles; the gated backward planned tiles; the gated forward and JVP the rows layout x
// the cache hint. The general kernels are a candidate everywhere (for the gated forward and JVP they are kAuto's
// flat kernels).
std::vector<int> tune_candidates(TunedOp op, int fallback) {
  using namespace fast;
  std::vector<int> c{fallback};
  auto add = [&](std::initializer_list<int> vs) {
    for (int v : vs)
      if (std::find(c.begin(), c.end(), v) == c.end()) c.push_back(v);
  };
  switch (op) {
    case TunedOp::LnModFwd: add({kNoPreload, kPreload, kGeneral}); break;
    case TunedOp::LnModJvp: add({kAuto, kAuto | kWideJvp, kGeneral}); break;
    case TunedOp::LnModBwd:
      add({kNoPreload, kPreload, kNoPreload | kPlannedTiles, kPreload | kPlannedTiles, kAuto | kTwoRows,
           kAuto | kTwoRows | kPlannedTiles, kAuto | kWideBwd, kAuto | kWideBwd | kPlannedTiles, kGeneral});
      break;
    case TunedOp::GatedBwd: add({kAuto, kAuto | kPlannedTiles, kGeneral}); break;
    case TunedOp::GatedFwd:
    case TunedOp::GatedJvp:
      add({kAuto, kAuto | kStreaming, kAuto | kGatedRows, kAuto | kGatedRows | kStreaming});
      break;
  }
  return c;
}

// op, nmod, N, T, D, tx, tm, f32_out, device, fallback (the caller's bits: the candidates depend on them)
using TuneKey = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, bool, int, int>;

std::mutex g_tune_mu;
std::map<TuneKey, TuneRecord> g_tuned;

// Events of one measurement, destroyed on every exit.
struct Events {
  std::vector<cudaEvent_t> ev;
  ~Events() {
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }
};

// The calling thread's stream-capture mode set to relaxed for a scope (restored after): a measurement's event
// synchronisation on a stream that is not being captured must not fail, nor invalidate, another thread's capture
// in global mode (PyTorch's default).
struct RelaxedCapture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  bool ok;
  RelaxedCapture() : ok(cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess) {
    if (!ok) cudaGetLastError();  // measured anyway (unrelaxed); no launch after this may report the failed exchange
  }
  ~RelaxedCapture() {
    if (ok) cudaThreadExchangeStreamCaptureMode(&mode);
  }
};

// A failed runtime call's error, returned once: read back (and so cleared) here, so PyTorch's next launch check does
// not report it again under an unrelated kernel (a sticky error, a broken context, stays whatever is done).
int cleared(cudaError_t r) {
  cudaGetLastError();
  return int(r);
}

// Runs `run(variant)` under the process-wide variant `variant`: directly without kTuned; with kTuned the key's
// measured choice, measuring it first on this call if there is none (see rowwise_fast.h). `fast` says whether the
// fast path applies to these operands (dtypes, D, alignment): where it does not, every variant runs the general
// kernels and nothing is measured. A candidate whose launch fails is dropped from the measurement (its error was
// read, and so cleared, by run); the call fails only when the fallback fails. Returns run's error.
template <typename Run>
int tuned_run(int variant, bool fast, TunedOp op, int nmod, Shape s, DType tx, DType tm, bool f32_out, void* stream,
              Run&& run) {
  if (!(variant & fast::kTuned)) return run(variant);
  const int fallback = variant & ~fast::kTuned;
  if (!fast || s.N * s.T == 0 || !fast_path(fallback)) return run(fallback);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // cleared: the fallback's launch reports only its own error
    return run(fallback);
  }
  const TuneKey key{int(op), nmod, s.N, s.T, s.D, int(tx), int(tm), f32_out, device, fallback};
  int chosen = -1;
  {
    std::lock_guard<std::mutex> lock(g_tune_mu);
    const auto it = g_tuned.find(key);
    if (it != g_tuned.end()) chosen = it->second.variant;
    else if (g_tuned.size() >= kTuneMaxKeys) chosen = fallback;
  }
  if (chosen >= 0) return run(chosen);  // outside the lock: launches from other threads do not wait on it
  auto st = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(st, &capture) != cudaSuccess) {
    cudaGetLastError();  // the failed query's error (not sticky), so the launch below reports only its own
    return run(fallback);
  }
  if (capture != cudaStreamCaptureStatusNone) return run(fallback);  // no synchronisation inside a capture
  const RelaxedCapture relaxed;
  std::vector<int> cand = tune_candidates(op, fallback);
  Events events;
  events.ev.assign(2 * cand.size() * kTuneReps, nullptr);
  for (auto& e : events.ev)
    if (cudaEventCreate(&e) != cudaSuccess) {
      e = nullptr;
      cudaGetLastError();
      return run(fallback);  // cannot time: unmeasured, and measured again next call
    }
  // warm-up (first launches, shared-memory opt-ins, per-kernel attribute reads); a failing candidate is dropped
  std::vector<int> ok;
  for (int v : cand) {
    const int r = run(v);
    if (r == 0) ok.push_back(v);
    else if (v == fallback) return r;
  }
  cand = ok;
  const size_t nc = cand.size();
  for (int rep = 0; rep < kTuneReps; ++rep)
    for (size_t c = 0; c < nc; ++c) {
      cudaEvent_t* e = &events.ev[2 * (rep * nc + c)];
      if (cudaError_t r = cudaEventRecord(e[0], st)) return cleared(r);
      if (const int r = run(cand[c])) return r;
      if (cudaError_t r = cudaEventRecord(e[1], st)) return cleared(r);
    }
  if (cudaError_t r = cudaEventSynchronize(events.ev[2 * (kTuneReps * nc - 1) + 1])) return cleared(r);
  TuneRecord rec{op, nmod, s, tx, tm, f32_out, device, cand[0], cand, std::vector<float>(nc, 0.f)};
  for (size_t c = 0; c < nc; ++c) {
    float t[kTuneReps];
    for (int rep = 0; rep < kTuneReps; ++rep) {
      const cudaEvent_t* e = &events.ev[2 * (rep * nc + c)];
      if (cudaError_t r = cudaEventElapsedTime(&t[rep], e[0], e[1])) return cleared(r);
    }
    std::sort(t, t + kTuneReps);
    rec.ms[c] = t[kTuneReps / 2];
  }
  size_t best = 0;
  for (size_t c = 1; c < nc; ++c)
    if (rec.ms[c] < rec.ms[best] * (1.f - kTuneMargin)) best = c;
  rec.variant = cand[best];
  {
    std::lock_guard<std::mutex> lock(g_tune_mu);
    chosen = g_tuned.emplace(key, rec).first->second.variant;  // a concurrent measurement of this key: first wins
  }
  return run(chosen);  // the outputs of this call: the key's choice, as every later call's
}

}  // namespace

int ln_mod_fwd_cuda(const void* x, const Mod* mods, int nmod, void* const* ys, float* mean, float* rstd, Shape s,
                    float eps, DType tx, DType tm, void* stream) {
  bool vec = s.D % VEC == 0 && aligned16(x);
  for (int k = 0; k < nmod; ++k)
    vec = vec && aligned16(mods[k].shift) && aligned16(mods[k].scale) && aligned16(ys[k]) &&
          mods[k].shift_stride % VEC == 0 && mods[k].scale_stride % VEC == 0;
  const bool fast = vec && fast::applies(s.D, tx, tm);
  return tuned_run(g_variant.load(), fast, TunedOp::LnModFwd, nmod, s, tx, tm, false, stream, [&](int v) {
    return ln_mod_fwd_with(v, vec, x, mods, nmod, ys, mean, rstd, s, eps, tx, tm, stream);
  });
}

int ln_mod_jvp_cuda(const void* x, const float* x_dot, const float* mean, const float* rstd, const void* scale,
                    int64_t scale_stride, const void* shift_dot, int64_t shift_dot_stride, const void* scale_dot,
                    int64_t scale_dot_stride, void* y_dot, bool y_dot_f32, Shape s, DType tx, DType tm,
                    void* stream) {
  const bool vec = s.D % VEC == 0 && aligned16(x) && aligned16(x_dot) && aligned16(scale) && aligned16(shift_dot) &&
                   aligned16(scale_dot) && aligned16(y_dot) && scale_stride % VEC == 0 &&
                   shift_dot_stride % VEC == 0 && scale_dot_stride % VEC == 0;
  const bool fast = vec && fast::applies(s.D, tx, tm);
  return tuned_run(g_variant.load(), fast, TunedOp::LnModJvp, 1, s, tx, tm, y_dot_f32, stream, [&](int v) {
    return ln_mod_jvp_with(v, vec, x, x_dot, mean, rstd, scale, scale_stride, shift_dot, shift_dot_stride, scale_dot,
                           scale_dot_stride, y_dot, y_dot_f32, s, tx, tm, stream);
  });
}

int ln_mod_bwd_cuda(const void* const* gys, const void* x, const float* mean, const float* rstd,
                    const void* const* scales, const int64_t* scale_strides, int nmod, void* gx,
                    void* const* gshifts, void* const* gscales, float* partial, Shape s, DType tx, DType tm,
                    void* stream) {
  // the outputs too: the wide backward writes the column sums and partials with 16-byte stores
  bool vec = s.D % VEC == 0 && aligned16(x) && aligned16(gx) && aligned16(partial);
  for (int k = 0; k < nmod; ++k)
    vec = vec && aligned16(gys[k]) && aligned16(scales[k]) && scale_strides[k] % VEC == 0 && aligned16(gshifts[k]) &&
          aligned16(gscales[k]);
  const bool fast = vec && fast::applies(s.D, tx, tm);
  return tuned_run(g_variant.load(), fast, TunedOp::LnModBwd, nmod, s, tx, tm, false, stream, [&](int v) {
    return ln_mod_bwd_with(v, vec, gys, x, mean, rstd, scales, scale_strides, nmod, gx, gshifts, gscales, partial, s,
                           tx, tm, stream);
  });
}

int gated_bwd_cuda(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, void* gg,
                   float* partial, Shape s, DType tx, DType tm, void* stream) {
  const bool vec = s.D % VEC == 0 && aligned16(gout) && aligned16(g) && aligned16(h) && aligned16(gh) &&
                   g_stride % VEC == 0;
  const bool fast = vec && fast::applies(s.D, tx, tm);
  return tuned_run(g_variant.load(), fast, TunedOp::GatedBwd, 1, s, tx, tm, false, stream, [&](int v) {
    return gated_bwd_with(v, vec, gout, g, g_stride, h, gh, gg, partial, s, tx, tm, stream);
  });
}

int gated_fwd_cuda(const void* x, const void* g, int64_t g_stride, const void* h, void* out, Shape s, DType tx,
                   DType tm, void* stream) {
  const bool vec = s.D % VEC == 0 && aligned16(x) && aligned16(g) && aligned16(h) && aligned16(out) &&
                   g_stride % VEC == 0;
  return tuned_run(g_variant.load(), vec && s.D <= fast::kFastMaxHidden, TunedOp::GatedFwd, 1, s, tx, tm, false,
                   stream, [&](int v) { return gated_fwd_with(v, vec, x, g, g_stride, h, out, s, tx, tm, stream); });
}

int gated_jvp_cuda(const float* x_dot, const void* g, int64_t g_stride, const void* g_dot, int64_t g_dot_stride,
                   const void* h, const void* h_dot, float* out_dot, Shape s, DType tm, void* stream) {
  const bool vec = s.D % VEC == 0 && aligned16(x_dot) && aligned16(g) && aligned16(g_dot) && aligned16(h) &&
                   aligned16(h_dot) && aligned16(out_dot) && g_stride % VEC == 0 && g_dot_stride % VEC == 0;
  return tuned_run(g_variant.load(), vec && s.D <= fast::kFastMaxHidden, TunedOp::GatedJvp, 1, s, DType::F32, tm,
                   true, stream, [&](int v) {
                     return gated_jvp_with(v, vec, x_dot, g, g_stride, g_dot, g_dot_stride, h, h_dot, out_dot, s, tm,
                                           stream);
                   });
}

std::vector<TuneRecord> cuda_tuned() {
  std::lock_guard<std::mutex> lock(g_tune_mu);
  std::vector<TuneRecord> out;
  out.reserve(g_tuned.size());
  for (const auto& kv : g_tuned) out.push_back(kv.second);
  return out;
}

int cuda_tune_reset() {
  std::lock_guard<std::mutex> lock(g_tune_mu);
  const int n = int(g_tuned.size());
  g_tuned.clear();
  return n;
}

int set_cuda_fast_path(int variant) {
  if (fast::valid_variant(variant)) return g_variant.exchange(variant);
  return g_variant.load();
}

}  // namespace dumo
