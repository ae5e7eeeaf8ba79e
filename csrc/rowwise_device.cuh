// Device helpers shared by the row-wise CUDA kernels (rowwise_cuda.cu: the general path and the launchers;
// rowwise_fast_fwd.cu / rowwise_fast_bwd.cu: the warp-per-row fast path). No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "rowwise.h"

// Kernel launches and dynamic shared memory go through these two macros, so that csrc/sim (an emulator of the CUDA
// execution model on the CPU, for tests: tests/test_cuda_sim.py) runs these same kernels and launchers.
// DUMO_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(args...).
// DUMO_ALIGNED16(p): the emulator checks that a 16-byte access is aligned (x86 would not fault); nothing on a GPU.
#ifdef DUMO_CUDA_SIM
#define DUMO_LAUNCH(grid, block, smem, stream, ...) ::dumo_sim::launch(grid, block, smem, __VA_ARGS__)
#define DUMO_DYNAMIC_SMEM(T, name) T* const name = ::dumo_sim::dynamic_smem<T>()
#define DUMO_ALIGNED16(p) ::dumo_sim::check_aligned16(p)
#else
#define DUMO_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define DUMO_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define DUMO_ALIGNED16(p) ((void)0)
#endif

namespace dumo {
namespace dev {

constexpr int VEC = 8;  // elements per 16-byte chunk of a 2-byte type (a float chunk of 8 is two 16-byte loads)

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};

// A 16-byte load through the read-only path, or (CS) with the evict-first hint (ld.global.cs: data read once
// should not displace what is read again from L2); and the matching store (CS: st.global.cs).
template <bool CS, typename V>
__device__ __forceinline__ V ld16(const V* p) {
  if constexpr (CS) return __ldcs(p);
  else return __ldg(p);
}
template <bool CS, typename V>
__device__ __forceinline__ void st16(V* p, const V& v) {
  if constexpr (CS) __stcs(p, v);
  else *p = v;
}

// 8 consecutive elements at a 16-byte aligned p: one 16-byte load for 2-byte types, two for float.
template <typename T, bool CS = false>
__device__ __forceinline__ void load8(const T* __restrict__ p, float* r) {
  DUMO_ALIGNED16(p);
  if constexpr (sizeof(T) == 4) {
    const float4 a = ld16<CS>(reinterpret_cast<const float4*>(p));
    const float4 b = ld16<CS>(reinterpret_cast<const float4*>(p) + 1);
    r[0] = a.x, r[1] = a.y, r[2] = a.z, r[3] = a.w, r[4] = b.x, r[5] = b.y, r[6] = b.z, r[7] = b.w;
  } else {
    const uint4 u = ld16<CS>(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) r[j] = Conv<T>::to(e[j]);
  }
}

template <typename T, bool CS = false>
__device__ __forceinline__ void store8(T* __restrict__ p, const float* r) {
  DUMO_ALIGNED16(p);
  if constexpr (sizeof(T) == 4) {
    st16<CS>(reinterpret_cast<float4*>(p), make_float4(r[0], r[1], r[2], r[3]));
    st16<CS>(reinterpret_cast<float4*>(p) + 1, make_float4(r[4], r[5], r[6], r[7]));
  } else {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = Conv<T>::from(r[j]);
    st16<CS>(reinterpret_cast<uint4*>(p), u);
  }
}

// 8 elements of T exactly as loaded (16 or 32 bytes of registers), converted on use: keeps the operands that are
// only needed after a reduction in half the registers for 2-byte types.
template <typename T>
struct Raw8 {
  static constexpr int kU = int(sizeof(T)) / 2;  // uint4 per 8 elements: 1 (bf16/fp16) or 2 (float)
  uint4 u[kU];
  __device__ __forceinline__ void load(const T* __restrict__ p) {
    DUMO_ALIGNED16(p);
#pragma unroll
    for (int i = 0; i < kU; ++i) u[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kU; ++i) u[i] = make_uint4(0u, 0u, 0u, 0u);  // 0.0 in every storage type
  }
  __device__ __forceinline__ float operator[](int j) const { return Conv<T>::to(reinterpret_cast<const T*>(u)[j]); }
};

// Sum over the 32 lanes of a warp, same order on every lane (butterfly): every lane gets the same total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Barrier over `threads` threads (a multiple of 32) that use the same id ID (1..15; 0 is __syncthreads). Orders
// their shared-memory accesses like __syncthreads. ID is a literal so ptxas reserves only the ids in use.
template <int ID>
__device__ __forceinline__ void named_barrier(int threads) {
#ifdef DUMO_CUDA_SIM
  ::dumo_sim::named_barrier(ID, threads);
#else
  asm volatile("bar.sync %0, %1;" ::"n"(ID), "r"(threads) : "memory");
#endif
}

template <typename T>
struct ModT {
  const T* shift;
  const T* scale;
  int64_t ss, sc;  // row strides (elements)
};

// The ModT view of one (shift, scale) pair of the launchers' arguments.
template <typename T>
ModT<T> mod_t(const Mod& m) {
  return {static_cast<const T*>(m.shift), static_cast<const T*>(m.scale), m.shift_stride, m.scale_stride};
}

template <typename T>
struct Tag {
  using type = T;
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dev
}  // namespace dumo

namespace dumo {
namespace dev {

// Host-side dtype dispatch: f(Tag<T>{}) for the storage type of t.
template <typename F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(Tag<float>{}); break;
    case DType::BF16: f(Tag<__nv_bfloat16>{}); break;
    case DType::F16: f(Tag<__half>{}); break;
  }
}

// The fast path's (residual, modulation) mixes: (float, any) and (T, T). f(Tag<TX>{}, Tag<TM>{}).
template <typename F>
void with_fast_types(DType tx, DType tm, F&& f) {
  with_type(tm, [&](auto tmt) {
    using TM = typename decltype(tmt)::type;
    if (tx == DType::F32)
      f(Tag<float>{}, tmt);
    else
      f(Tag<TM>{}, tmt);  // tx == tm (fast::applies)
  });
}

// Whether a compiled kernel's local-memory spill is at most `bytes` per thread: the fast path's kAuto variant holds
// operands ahead of use only in kernels that ptxas fitted (nearly) in registers. The answer is a property of the
// compiled code, so callers cache it per kernel. kSpillSlack: the few bytes measured harmless (an H100, 2026-11-27:
// the dual backward with 8-16 spilled bytes and prefetch beat it without; at 136 bytes it lost by a quarter).
constexpr size_t kSpillSlack = 16;

// Whether `kernel` as compiled for the current device spills at most kSpillSlack bytes per thread. Cached per
// (kernel, device): the answer is a property of the code the device runs (a process with an sm_80 and an sm_90 card
// runs two compilations). False when the query fails (its error cleared, so no later launch reports it; not cached).
template <typename K>
bool fits_in_registers(K kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool fits = a.localSizeBytes <= kSpillSlack;
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = fits;
  return fits;
}

}  // namespace dev
}  // namespace dumo
