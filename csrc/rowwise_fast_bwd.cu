// Fast path, backward of LayerNorm (no affine) + adaLN modulate and of the gated residual: a block per (sample,
// tile of rows), a warp pair per row, kBwdSlots rows at a time, the next row's loads issued before this row's
// reductions (see rowwise_fast.h); with kWideBwd the LayerNorm backward instead runs a block of warps per row with
// its column sums in registers (ln_mod_bwd_wide). A sample that is one tile gets its column sums written here;
// otherwise the kernels write per-tile partials that rowwise_cuda.cu's colsum kernel finishes. Formulas as in
// rowwise_cuda.cu's general kernels. No torch headers.
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "rowwise_device.cuh"
#include "rowwise_fast.h"

namespace dumo {
namespace fast {
namespace {

using namespace dev;

constexpr int kPairThreads = 64;                  // the two warps that share a row
constexpr int kBlock = kBwdSlots * kPairThreads;  // threads per block
static_assert(kBwdTileRows % kBwdSlots == 0, "a tile is a whole number of slot rounds");

// The column-sum outputs of one backward call (the arrays in the partials' order), written directly when a sample
// is one tile.
struct SumPtrs {
  void* p[4];
};

// PF (template flag of the LayerNorm backward): the next row's loads are issued before this row's reductions (two
// rows of operands in registers); chosen per kernel by next_row_in_flight (rowwise_fast.h).

// NC = 16-byte chunks per lane of a warp pair: 1..4 (D <= 2048).
template <typename F>
void with_nc(int64_t nc, F&& f) {
  if (nc <= 1) f(std::integral_constant<int, 1>{});
  else if (nc == 2) f(std::integral_constant<int, 2>{});
  else if (nc == 3) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 4>{});
}

// G = warps per row of the wide backward (8 columns a thread): 1..8 (D <= 2048).
template <typename F>
void with_groups(int64_t g, F&& f) {
  switch (g <= 1 ? 1 : g >= 8 ? 8 : int(g)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// The barrier of slot `slot`'s warp pair (ids 1..kBwdSlots, literal: the switch is warp-uniform).
__device__ __forceinline__ void pair_barrier(int slot) {
  static_assert(kBwdSlots == 4, "one case per slot");
  switch (slot) {
    case 0: named_barrier<1>(kPairThreads); break;
    case 1: named_barrier<2>(kPairThreads); break;
    case 2: named_barrier<3>(kPairThreads); break;
    default: named_barrier<4>(kPairThreads); break;
  }
}

__device__ __forceinline__ int pair_col(int k, int gl) { return (k * kPairThreads + gl) * VEC; }

// Per-thread column data in shared memory. An array covers the pair's column capacity W = NC * 8 * 64 floats;
// this thread's chunk k is two float4 at [(2k + h) * 64 + gl], h = 0, 1: consecutive lanes, consecutive 16 bytes
// (no bank conflicts). The column sums accumulate here rather than in registers: with 2 (dual: 4) sums over up
// to 32 columns per thread, register accumulators cost most of the register file and so most of the occupancy.
template <int NC>
__host__ __device__ constexpr int pair_words() {
  return NC * VEC * kPairThreads;
}

__device__ __forceinline__ void lds8(const float* base, int k, int gl, float* r) {
  const float4* p = reinterpret_cast<const float4*>(base) + 2 * k * kPairThreads + gl;
  DUMO_ALIGNED16(p);
  const float4 a = p[0], b = p[kPairThreads];
  r[0] = a.x, r[1] = a.y, r[2] = a.z, r[3] = a.w, r[4] = b.x, r[5] = b.y, r[6] = b.z, r[7] = b.w;
}

__device__ __forceinline__ void sts8(float* base, int k, int gl, const float* r) {
  float4* p = reinterpret_cast<float4*>(base) + 2 * k * kPairThreads + gl;
  DUMO_ALIGNED16(p);
  p[0] = make_float4(r[0], r[1], r[2], r[3]);
  p[kPairThreads] = make_float4(r[4], r[5], r[6], r[7]);
}

// Column d of a pair array: chunk k = d / 512, lane gl = d % 512 / 8, element j = d % 8.
__device__ __forceinline__ int pair_word(int d) {
  const int k = d / (VEC * kPairThreads), r = d % (VEC * kPairThreads), gl = r / VEC, j = r % VEC;
  return ((2 * k + j / 4) * kPairThreads + gl) * 4 + j % 4;
}

// Column sums of this block's tile: A arrays per slot at acc0 + (slot * A + a) * W, summed over the slots in a
// fixed order; written as the result (dtype TM, sums.p[a][n][:]) when the sample is one tile (n_tiles == 1), else
// to partial[a][n][tile][:]. Call after a __syncthreads that follows the last update.
template <typename TM, int A, int NC>
__device__ __forceinline__ void write_tile_sums(const float* acc0, float* __restrict__ partial, const SumPtrs& sums,
                                                int64_t N, int64_t n, int64_t tile, int64_t n_tiles, int D) {
  constexpr int W = pair_words<NC>();
#pragma unroll
  for (int a = 0; a < A; ++a) {
    float* out = partial + ((a * N + n) * n_tiles + tile) * D;
    TM* res = static_cast<TM*>(sums.p[a]) + n * D;
    for (int d = threadIdx.x; d < D; d += kBlock) {
      const int w = pair_word(d);
      float s = 0.f;
#pragma unroll
      for (int sl = 0; sl < kBwdSlots; ++sl) s += acc0[(sl * A + a) * W + w];
      if (n_tiles == 1) res[d] = Conv<TM>::from(s);
      else out[d] = s;
    }
  }
}

// Dynamic shared memory of a backward kernel: `per_block` shared arrays + kBwdSlots * `per_slot` accumulators.
template <int NC>
constexpr size_t pair_smem(int per_block, int per_slot) {
  return size_t(per_block + kBwdSlots * per_slot) * pair_words<NC>() * sizeof(float);
}

// Launch preparation for `smem` bytes of dynamic shared memory: kNotApplicable when the current device cannot
// give a block that much (with the static row-sum buffer), else the opt-in's error (above 48 KiB a kernel must opt
// in, per device: so on every launch; a failure's sticky error is cleared here, the caller reports it).
template <typename K>
int launch_attr(K kernel, size_t smem) {
  int dev = 0, limit = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess && smem + 1024 > size_t(limit)) return kNotApplicable;
  if (e == cudaSuccess && smem > 48 * 1024)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) cudaGetLastError();  // clear the sticky copy: the caller reports e
  return int(e);
}

// The LayerNorm backward kernels' shared memory before the rows: this slot's 2 NMOD column-sum arrays zeroed, and
// (slot 0) onep[m] = 1 + scale_m of the sample (scale rows at sc0 / sc1; 1 past D). The caller syncs the block.
template <typename TM, int NC, int NMOD>
__device__ __forceinline__ void init_ln_smem(float* onep, float* acc, const TM* __restrict__ sc0,
                                             const TM* __restrict__ sc1, int slot, int gl, int D) {
  constexpr int W = pair_words<NC>();
  float v[VEC];
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = pair_col(k, gl);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = 0.f;
#pragma unroll
    for (int a = 0; a < 2 * NMOD; ++a) sts8(acc + a * W, k, gl, v);
    if (slot == 0) {
#pragma unroll
      for (int m = 0; m < NMOD; ++m) {
        if (c < D) load8((m == 0 ? sc0 : sc1) + c, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = c < D ? v[j] + 1.f : 1.f;
        sts8(onep + m * W, k, gl, v);
      }
    }
  }
}

// One row's operands for one thread, as loaded (converted on use).
template <typename TX, typename TM, int NC, int NMOD>
struct LnRow {
  Raw8<TM> gy[NMOD][NC];
  Raw8<TX> x[NC];
  float mu, rs;
};

// Rows past the sample's end load as zeros with mean = rstd = 0: n = 0 and gy = 0, so they add nothing.
template <typename TX, typename TM, int NC, int NMOD>
__device__ __forceinline__ void load_ln_row(LnRow<TX, TM, NC, NMOD>& r, const TM* __restrict__ gy0,
                                            const TM* __restrict__ gy1, const TX* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ rstd,
                                            int64_t row, bool live, int D, int gl) {
  r.mu = live ? __ldg(mean + row) : 0.f;
  r.rs = live ? __ldg(rstd + row) : 0.f;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = pair_col(k, gl);
    if (live && c < D) {
      r.gy[0][k].load(gy0 + row * D + c);
      if constexpr (NMOD == 2) r.gy[1][k].load(gy1 + row * D + c);
      r.x[k].load(x + row * D + c);
    } else {
#pragma unroll
      for (int m = 0; m < NMOD; ++m) r.gy[m][k].zero();
      r.x[k].zero();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward of y_k = n (1 + scale_k) + shift_k, k < NMOD, for gradients gy_k:
//   g = sum_k gy_k (1 + scale_k)
//   gx = rstd (g - sum_D(g) / D - n sum_D(g n) / D)
//   gshift_k = sum_t gy_k,  gscale_k = sum_t gy_k n            (column sums over the T rows of a sample)
// partial[(a, n, tile, d)], a = shift_0.., scale_0..; g and n are recomputed from the loaded row after the row
// sums (from registers and shared memory) rather than held across the barrier.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, int NC, int NMOD, bool PF>
__global__ void __launch_bounds__(kBlock, 2)
    ln_mod_bwd_pair(const TM* __restrict__ gy0, const TM* __restrict__ gy1, const TX* __restrict__ x,
                    const float* __restrict__ mean, const float* __restrict__ rstd, const TM* __restrict__ sc0,
                    int64_t s0, const TM* __restrict__ sc1, int64_t s1, TX* __restrict__ gx,
                    float* __restrict__ partial, const SumPtrs sums, int64_t N, int64_t T, int D, int tile_rows) {
  constexpr int W = pair_words<NC>();
  __shared__ float rsum[2][kBwdSlots][2][2];  // [iteration parity][slot][warp of the pair][sum g, sum g n]
  DUMO_DYNAMIC_SMEM(float4, smem4);           // onep[NMOD][W], then per slot acc[2 NMOD][W]
  float* const onep = reinterpret_cast<float*>(smem4);
  float* const acc0 = onep + NMOD * W;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, slot = warp >> 1, half = warp & 1;
  const int gl = half * 32 + lane;
  const int64_t n = blockIdx.x, tile = blockIdx.y;  // N on x: no 65535 limit
  float* const acc = acc0 + slot * 2 * NMOD * W;
  init_ln_smem<TM, NC, NMOD>(onep, acc, sc0 + n * s0, sc1 + n * s1, slot, gl, D);
  __syncthreads();

  const int iters = tile_rows / kBwdSlots;  // rows per warp pair
  const int64_t t0 = tile * tile_rows + slot;
  LnRow<TX, TM, NC, NMOD> cur, nxt;
  if constexpr (PF) load_ln_row(cur, gy0, gy1, x, mean, rstd, n * T + t0, t0 < T, D, gl);
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {  // the same trip count on every thread: the pair barrier is uniform
    const int64_t t = t0 + int64_t(it) * kBwdSlots, row = n * T + t;
    if constexpr (PF) {
      if (it + 1 < iters) load_ln_row(nxt, gy0, gy1, x, mean, rstd, row + kBwdSlots, t + kBwdSlots < T, D, gl);
    } else {
      load_ln_row(cur, gy0, gy1, x, mean, rstd, row, t < T, D, gl);
    }
    float a0 = 0.f, a1 = 0.f;  // padding rows: gy = 0 gives g = 0, adding nothing anywhere
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      if (pair_col(k, gl) >= D) continue;  // padding chunk: zeros; skipping it saves its shared-memory traffic
      float nv[VEC], g[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) nv[j] = (cur.x[k][j] - cur.mu) * cur.rs, g[j] = 0.f;
#pragma unroll
      for (int m = 0; m < NMOD; ++m) {
        float op[VEC], as[VEC], an[VEC];
        lds8(onep + m * W, k, gl, op);
        lds8(acc + m * W, k, gl, as);
        lds8(acc + (NMOD + m) * W, k, gl, an);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float gy = cur.gy[m][k][j];
          g[j] += gy * op[j];
          as[j] += gy;
          an[j] += gy * nv[j];
        }
        sts8(acc + m * W, k, gl, as);
        sts8(acc + (NMOD + m) * W, k, gl, an);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) a0 += g[j], a1 += g[j] * nv[j];
    }
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    float(*sp)[2][2] = rsum[it & 1];  // double-buffered: one barrier per row is enough
    if (lane == 0) sp[slot][half][0] = a0, sp[slot][half][1] = a1;
    pair_barrier(slot);
    const float m0 = (sp[slot][0][0] + sp[slot][1][0]) / D, m1 = (sp[slot][0][1] + sp[slot][1][1]) / D;
    if (t < T) {
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = pair_col(k, gl);
        if (c >= D) continue;
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = 0.f;
#pragma unroll
        for (int m = 0; m < NMOD; ++m) {  // g again (registers for g across the barrier cost the prefetch)
          float op[VEC];
          lds8(onep + m * W, k, gl, op);
#pragma unroll
          for (int j = 0; j < VEC; ++j) o[j] += cur.gy[m][k][j] * op[j];
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = cur.rs * (o[j] - m0 - (cur.x[k][j] - cur.mu) * cur.rs * m1);
        store8(gx + row * D + c, o);
      }
    }
    if constexpr (PF) {
      if (it + 1 < iters) cur = nxt;
    }
  }
  __syncthreads();
  write_tile_sums<TM, 2 * NMOD, NC>(acc0, partial, sums, N, n, tile, gridDim.y, D);
}

// ---------------------------------------------------------------------------------------------------------------
// The same backward, kTwoRows layout: a warp pair takes two of its rows per pass (t and t + kBwdSlots; the second
// dead past the tile or the sample), so each shared-memory column-sum update and each (1 + scale) load serves two
// rows: half the shared-memory traffic of ln_mod_bwd_pair (which, for the dual layer in bf16, is of the order of
// the global traffic itself), for two rows of operands in registers (as with PF). Per row the same formulas; the
// row sums add their terms per modulation (sum g = sum_k sum_d gy_k (1 + scale_k)), the column sums add the two
// rows' terms before accumulating.
// ---------------------------------------------------------------------------------------------------------------
template <typename TX, typename TM, int NC, int NMOD>
__global__ void __launch_bounds__(kBlock, 2)
    ln_mod_bwd_pair2(const TM* __restrict__ gy0, const TM* __restrict__ gy1, const TX* __restrict__ x,
                     const float* __restrict__ mean, const float* __restrict__ rstd, const TM* __restrict__ sc0,
                     int64_t s0, const TM* __restrict__ sc1, int64_t s1, TX* __restrict__ gx,
                     float* __restrict__ partial, const SumPtrs sums, int64_t N, int64_t T, int D, int tile_rows) {
  constexpr int W = pair_words<NC>();
  __shared__ float rsum[2][kBwdSlots][2][4];  // [pass parity][slot][warp of the pair][row a: g, g n; row b: g, g n]
  DUMO_DYNAMIC_SMEM(float4, smem4);           // onep[NMOD][W], then per slot acc[2 NMOD][W]
  float* const onep = reinterpret_cast<float*>(smem4);
  float* const acc0 = onep + NMOD * W;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, slot = warp >> 1, half = warp & 1;
  const int gl = half * 32 + lane;
  const int64_t n = blockIdx.x, tile = blockIdx.y;
  float* const acc = acc0 + slot * 2 * NMOD * W;
  init_ln_smem<TM, NC, NMOD>(onep, acc, sc0 + n * s0, sc1 + n * s1, slot, gl, D);
  __syncthreads();

  const int iters = tile_rows / kBwdSlots, passes = (iters + 1) / 2;  // the same on every thread of the block
  const int64_t t0 = tile * tile_rows + slot;
  LnRow<TX, TM, NC, NMOD> ra, rb;
#pragma unroll 1
  for (int p = 0; p < passes; ++p) {
    const int64_t ta = t0 + int64_t(2 * p) * kBwdSlots, tb = ta + kBwdSlots;
    const bool la = ta < T, lb = 2 * p + 1 < iters && tb < T;
    const int64_t rowa = n * T + ta, rowb = rowa + kBwdSlots;
    load_ln_row(ra, gy0, gy1, x, mean, rstd, rowa, la, D, gl);
    load_ln_row(rb, gy0, gy1, x, mean, rstd, rowb, lb, D, gl);
    float sa0 = 0.f, sa1 = 0.f, sb0 = 0.f, sb1 = 0.f;  // dead rows: gy = 0, adding nothing anywhere
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      if (pair_col(k, gl) >= D) continue;  // padding chunk
#pragma unroll
      for (int m = 0; m < NMOD; ++m) {  // n recomputed per modulation and the row sums taken per term: no arrays
        float op[VEC], as[VEC], an[VEC];  // of n and g per chunk live across the modulations (registers)
        lds8(onep + m * W, k, gl, op);
        lds8(acc + m * W, k, gl, as);
        lds8(acc + (NMOD + m) * W, k, gl, an);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float ya = ra.gy[m][k][j], yb = rb.gy[m][k][j];
          const float na = (ra.x[k][j] - ra.mu) * ra.rs, nb = (rb.x[k][j] - rb.mu) * rb.rs;
          const float ta = ya * op[j], tb = yb * op[j];
          sa0 += ta, sa1 += ta * na, sb0 += tb, sb1 += tb * nb;
          as[j] += ya + yb;
          an[j] += ya * na + yb * nb;
        }
        sts8(acc + m * W, k, gl, as);
        sts8(acc + (NMOD + m) * W, k, gl, an);
      }
    }
    sa0 = warp_sum(sa0);
    sa1 = warp_sum(sa1);
    sb0 = warp_sum(sb0);
    sb1 = warp_sum(sb1);
    float(*sp)[4] = rsum[p & 1][slot];  // double-buffered: one barrier per pass is enough
    if (lane == 0) sp[half][0] = sa0, sp[half][1] = sa1, sp[half][2] = sb0, sp[half][3] = sb1;
    pair_barrier(slot);
    const float ma0 = (sp[0][0] + sp[1][0]) / D, ma1 = (sp[0][1] + sp[1][1]) / D;
    const float mb0 = (sp[0][2] + sp[1][2]) / D, mb1 = (sp[0][3] + sp[1][3]) / D;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      const int c = pair_col(k, gl);
      if (c >= D) continue;
      float oa[VEC], ob[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) oa[j] = 0.f, ob[j] = 0.f;
#pragma unroll
      for (int m = 0; m < NMOD; ++m) {
        float op[VEC];
        lds8(onep + m * W, k, gl, op);
#pragma unroll
        for (int j = 0; j < VEC; ++j) oa[j] += ra.gy[m][k][j] * op[j], ob[j] += rb.gy[m][k][j] * op[j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        oa[j] = ra.rs * (oa[j] - ma0 - (ra.x[k][j] - ra.mu) * ra.rs * ma1);
        ob[j] = rb.rs * (ob[j] - mb0 - (rb.x[k][j] - rb.mu) * rb.rs * mb1);
      }
      if (la) store8(gx + rowa * D + c, oa);
      if (lb) store8(gx + rowb * D + c, ob);
    }
  }
  __syncthreads();
  write_tile_sums<TM, 2 * NMOD, NC>(acc0, partial, sums, N, n, tile, gridDim.y, D);
}

// ---------------------------------------------------------------------------------------------------------------
// The same backward, kWideBwd layout: a block of G = ceil(D / 256) warps per row, one 8-column chunk per thread
// (chunks past D idle); the column sums and (1 + scale) live in registers (2 NMOD + NMOD vectors of 8 per thread:
// affordable at one chunk per thread), so the row loop touches shared memory only for the G warps' row sums, and
// concurrency comes from several blocks per SM. The next row's loads are issued before this row's reductions. At
// the end each thread writes its columns' sums: the result (a sample in one tile) or this tile's partials. Per row
// the formulas of ln_mod_bwd_pair:
//   g = sum_k gy_k (1 + scale_k),  gx = rstd (g - sum_D(g) / D - n sum_D(g n) / D),
//   gshift_k = sum_t gy_k,  gscale_k = sum_t gy_k n.
// ---------------------------------------------------------------------------------------------------------------
template <int G>
constexpr int wide_threads() {
  return G * 32;
}

// Blocks per SM that __launch_bounds__ asks room for: about 16 warps per SM, as the pair kernels (16 / G blocks:
// registers capped at 128 for G = 1, 2, 4, 8; about 136 at G = 3 and 5, 15 warps; 144-168 at G = 6, 7).
template <int G>
constexpr int wide_min_blocks() {
  return 16 / G > 1 ? 16 / G : 1;
}

template <typename TX, typename TM, int G, int NMOD>
__global__ void __launch_bounds__(wide_threads<G>(), wide_min_blocks<G>())
    ln_mod_bwd_wide(const TM* __restrict__ gy0, const TM* __restrict__ gy1, const TX* __restrict__ x,
                    const float* __restrict__ mean, const float* __restrict__ rstd, const TM* __restrict__ sc0,
                    int64_t s0, const TM* __restrict__ sc1, int64_t s1, TX* __restrict__ gx,
                    float* __restrict__ partial, const SumPtrs sums, int64_t N, int64_t T, int D, int tile_rows) {
  __shared__ float rsum[2][G][2];  // [row parity][warp][sum g, sum g n]
  const int wg = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = threadIdx.x * VEC;
  const bool live_col = c < D;
  const int64_t n = blockIdx.x, tile = blockIdx.y;  // N on x: no 65535 limit

  float op[NMOD][VEC];  // 1 + scale_k of this thread's columns
#pragma unroll
  for (int m = 0; m < NMOD; ++m) {
    if (live_col) load8((m == 0 ? sc0 + n * s0 : sc1 + n * s1) + c, op[m]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) op[m][j] = live_col ? op[m][j] + 1.f : 1.f;
  }
  float acc[2 * NMOD][VEC];  // shift_0.., scale_0..
#pragma unroll
  for (int a = 0; a < 2 * NMOD; ++a)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[a][j] = 0.f;

  const int64_t t0 = tile * tile_rows;
  const int iters = int(T - t0 < tile_rows ? T - t0 : tile_rows);  // the same on every thread: uniform barriers
  LnRow<TX, TM, 1, NMOD> cur, nxt;  // one chunk: the pair kernels' loader with this thread's index as its lane
  load_ln_row(cur, gy0, gy1, x, mean, rstd, n * T + t0, iters > 0, D, int(threadIdx.x));
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    const int64_t row = n * T + t0 + it;
    if (it + 1 < iters) load_ln_row(nxt, gy0, gy1, x, mean, rstd, row + 1, true, D, int(threadIdx.x));
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float nv = (cur.x[0][j] - cur.mu) * cur.rs;
      float g = 0.f;
#pragma unroll
      for (int m = 0; m < NMOD; ++m) {
        const float gy = cur.gy[m][0][j];
        g += gy * op[m][j];
        acc[m][j] += gy;
        acc[NMOD + m][j] += gy * nv;
      }
      a0 += g, a1 += g * nv;
    }
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    float(*sp)[2] = rsum[it & 1];  // double-buffered: one barrier per row is enough
    if (lane == 0) sp[wg][0] = a0, sp[wg][1] = a1;
    __syncthreads();
    float r0 = 0.f, r1 = 0.f;  // over the warps in a fixed order: the same on every thread
#pragma unroll
    for (int w = 0; w < G; ++w) r0 += sp[w][0], r1 += sp[w][1];
    const float m0 = r0 / D, m1 = r1 / D;
    if (live_col) {  // g and n again from the loaded row: arrays held across the barrier cost registers
      float o[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float g = 0.f;
#pragma unroll
        for (int m = 0; m < NMOD; ++m) g += cur.gy[m][0][j] * op[m][j];
        o[j] = cur.rs * (g - m0 - (cur.x[0][j] - cur.mu) * cur.rs * m1);
      }
      store8(gx + row * D + c, o);
    }
    if (it + 1 < iters) cur = nxt;
  }
  if (!live_col) return;
  const int64_t n_tiles = gridDim.y;  // 16-byte stores: the sums are (N, D) and the partials (.., D) rows, D % 8 == 0
#pragma unroll
  for (int a = 0; a < 2 * NMOD; ++a) {
    if (n_tiles == 1) store8(static_cast<TM*>(sums.p[a]) + n * D + c, acc[a]);
    else store8(partial + ((a * N + n) * n_tiles + tile) * D + c, acc[a]);
  }
}

// Backward of out = x + g h:  gx = gout (no kernel),  gh = gout g,  gg = sum_t gout h  (partials per tile)
template <typename TX, typename TM, int NC>
struct GatedRow {
  Raw8<TX> go[NC];
  Raw8<TM> h[NC];
};

template <typename TX, typename TM, int NC>
__device__ __forceinline__ void load_gated_row(GatedRow<TX, TM, NC>& r, const TX* __restrict__ gout,
                                               const TM* __restrict__ h, int64_t row, bool live, int D, int gl) {
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    const int c = pair_col(k, gl);
    if (live && c < D) {
      r.go[k].load(gout + row * D + c);
      r.h[k].load(h + row * D + c);
    } else {
      r.go[k].zero();
      r.h[k].zero();
    }
  }
}

template <typename TX, typename TM, int NC>
__global__ void __launch_bounds__(kBlock, 2)
    gated_bwd_pair(const TX* __restrict__ gout, const TM* __restrict__ g, int64_t gs, const TM* __restrict__ h,
                   TM* __restrict__ gh, float* __restrict__ partial, const SumPtrs sums, int64_t N, int64_t T, int D,
                   int tile_rows) {
  constexpr int W = pair_words<NC>();
  DUMO_DYNAMIC_SMEM(float4, smem4);  // gate[W], then per slot acc[W]
  float* const gate = reinterpret_cast<float*>(smem4);
  float* const acc0 = gate + W;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, slot = warp >> 1;
  const int gl = (warp & 1) * 32 + lane;
  const int64_t n = blockIdx.x, tile = blockIdx.y;
  float* const acc = acc0 + slot * W;
  {
    float v[VEC];
#pragma unroll
    for (int k = 0; k < NC; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = 0.f;
      sts8(acc, k, gl, v);
      if (slot == 0) {
        if (pair_col(k, gl) < D) load8(g + n * gs + pair_col(k, gl), v);
        sts8(gate, k, gl, v);
      }
    }
  }
  __syncthreads();
  const int iters = tile_rows / kBwdSlots;  // rows per warp pair
  const int64_t t0 = tile * tile_rows + slot;
  GatedRow<TX, TM, NC> cur;
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {  // no barrier in the loop: other warps' loads cover this one's latency
    const int64_t t = t0 + int64_t(it) * kBwdSlots, row = n * T + t;
    load_gated_row(cur, gout, h, row, t < T, D, gl);
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      const int c = pair_col(k, gl);
      if (c >= D) continue;  // padding chunk
      float gv[VEC], as[VEC], o[VEC];
      lds8(gate, k, gl, gv);
      lds8(acc, k, gl, as);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float go = cur.go[k][j];
        o[j] = go * gv[j];
        as[j] += go * cur.h[k][j];  // zeros past the end
      }
      sts8(acc, k, gl, as);
      if (t < T) store8(gh + row * D + c, o);
    }
  }
  __syncthreads();
  write_tile_sums<TM, 1, NC>(acc0, partial, sums, N, n, tile, gridDim.y, D);
}

// Blocks of `kernel` resident at once on the current device (SMs x blocks per SM of `threads` threads at `smem` bytes
// of dynamic shared memory), cached per (kernel, device): every kernel is launched with one block size and one
// shared-memory size; 0 when the query fails (its error cleared). Call after launch_attr (the kernel's shared-memory
// opt-in).
template <typename K>
int64_t resident_blocks(K kernel, size_t smem, int threads) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const int64_t r = int64_t(sms) * per_sm;
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = r;
  return r;
}

// The tiling of one backward launch: kBwdTileRows rows per block, or with kPlannedTiles bwd_tile_plan over the
// blocks of `kernel` (`threads` each) resident at once (kBwdTileRows when that is unknown).
template <typename K>
TilePlan tile_plan(K kernel, size_t smem, Shape s, int variant, int threads = kBlock) {
  const TilePlan fixed{kBwdTileRows, ceil_div(s.T, kBwdTileRows)};
  if (!(variant & kPlannedTiles)) return fixed;
  const int64_t slots = resident_blocks(kernel, smem, threads);
  return slots > 0 ? bwd_tile_plan(s.N, s.T, slots) : fixed;
}

}  // namespace

int ln_mod_bwd_tiles(const void* const* gys, const void* x, const float* mean, const float* rstd,
                     const void* const* scales, const int64_t* scale_strides, int nmod, void* gx, float* partial,
                     void* const* sums, int64_t* tiles, Shape s, DType tx, DType tm, int variant, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  SumPtrs out{};
  for (int a = 0; a < 2 * nmod; ++a) out.p[a] = sums[a];
  int err = 0;
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    const TM* g0 = static_cast<const TM*>(gys[0]);
    const TM* g1 = static_cast<const TM*>(gys[nmod - 1]);  // the second modulation's operands: unused for nmod 1
    const TM* c0 = static_cast<const TM*>(scales[0]);
    const TM* c1 = static_cast<const TM*>(scales[nmod - 1]);
    const int64_t st0 = scale_strides[0], st1 = scale_strides[nmod - 1];
    const TX* xp = static_cast<const TX*>(x);
    TX* gxp = static_cast<TX*>(gx);
    // kWideBwd (taking precedence over kTwoRows) where that kernel fits in registers (spills at most kSpillSlack
    // bytes), else the pair kernels below
    if (variant & kWideBwd) {
      bool done = false;
      with_groups(ceil_div(s.D, 32 * VEC), [&](auto g) {
        constexpr int G = decltype(g)::value;
        auto kernel = nmod == 2 ? ln_mod_bwd_wide<TX, TM, G, 2> : ln_mod_bwd_wide<TX, TM, G, 1>;
        if (!fits_in_registers(kernel)) return;
        const size_t smem = 0;
        done = true;
        err = launch_attr(kernel, smem);
        if (err != 0) return;
        const TilePlan plan = tile_plan(kernel, smem, s, variant, wide_threads<G>());
        *tiles = plan.tiles;
        const dim3 grid(unsigned(s.N), unsigned(plan.tiles));
        DUMO_LAUNCH(grid, wide_threads<G>(), smem, st, kernel)(g0, g1, xp, mean, rstd, c0, st0, c1, st1, gxp,
                                                               partial, out, s.N, s.T, int(s.D), int(plan.rows));
      });
      if (done) return;
    }
    with_nc(ceil_div(s.D, kPairThreads * VEC), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      auto launch = [&](auto kernel, size_t smem) {
        err = launch_attr(kernel, smem);
        if (err != 0) return;
        const TilePlan plan = tile_plan(kernel, smem, s, variant);
        *tiles = plan.tiles;
        const dim3 grid(unsigned(s.N), unsigned(plan.tiles));
        DUMO_LAUNCH(grid, kBlock, smem, st, kernel)(g0, g1, xp, mean, rstd, c0, st0, c1, st1, gxp, partial, out, s.N,
                                                    s.T, int(s.D), int(plan.rows));
      };
      // kTwoRows where that kernel fits in registers (spills at most kSpillSlack bytes), else the base choice
      if ((variant & kTwoRows) &&
          fits_in_registers(nmod == 2 ? ln_mod_bwd_pair2<TX, TM, NC, 2> : ln_mod_bwd_pair2<TX, TM, NC, 1>)) {
        if (nmod == 2) launch(ln_mod_bwd_pair2<TX, TM, NC, 2>, pair_smem<NC>(2, 4));
        else launch(ln_mod_bwd_pair2<TX, TM, NC, 1>, pair_smem<NC>(1, 2));
      } else if (nmod == 2) {
        const bool fits = fits_in_registers(ln_mod_bwd_pair<TX, TM, NC, 2, true>);
        if (next_row_in_flight(variant, fits)) launch(ln_mod_bwd_pair<TX, TM, NC, 2, true>, pair_smem<NC>(2, 4));
        else launch(ln_mod_bwd_pair<TX, TM, NC, 2, false>, pair_smem<NC>(2, 4));
      } else {
        const bool fits = fits_in_registers(ln_mod_bwd_pair<TX, TM, NC, 1, true>);
        if (next_row_in_flight(variant, fits)) launch(ln_mod_bwd_pair<TX, TM, NC, 1, true>, pair_smem<NC>(1, 2));
        else launch(ln_mod_bwd_pair<TX, TM, NC, 1, false>, pair_smem<NC>(1, 2));
      }
    });
  });
  return err != 0 ? err : int(cudaGetLastError());  // err: kNotApplicable or the opt-in's error
}

int gated_bwd_tiles(const void* gout, const void* g, int64_t g_stride, const void* h, void* gh, float* partial,
                    void* gg, int64_t* tiles, Shape s, DType tx, DType tm, int variant, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  SumPtrs out{};
  out.p[0] = gg;
  int err = 0;
  with_fast_types(tx, tm, [&](auto txt, auto tmt) {
    using TX = typename decltype(txt)::type;
    using TM = typename decltype(tmt)::type;
    with_nc(ceil_div(s.D, kPairThreads * VEC), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      const size_t smem = pair_smem<NC>(1, 1);
      auto kernel = gated_bwd_pair<TX, TM, NC>;  // one register layout: prefetching measured no faster (RESULTS.md)
      err = launch_attr(kernel, smem);
      if (err != 0) return;
      const TilePlan plan = tile_plan(kernel, smem, s, variant);
      *tiles = plan.tiles;
      const dim3 grid(unsigned(s.N), unsigned(plan.tiles));
      DUMO_LAUNCH(grid, kBlock, smem, st, kernel)(static_cast<const TX*>(gout), static_cast<const TM*>(g), g_stride,
                                                  static_cast<const TM*>(h), static_cast<TM*>(gh), partial, out, s.N,
                                                  s.T, int(s.D), int(plan.rows));
    });
  });
  return err != 0 ? err : int(cudaGetLastError());  // err: kNotApplicable or the opt-in's error
}

}  // namespace fast
}  // namespace dumo
