// An emulator of the CUDA execution model on the CPU, for tests (tests/test_cuda_sim.py): the row-wise .cu files
// compile as host C++ with -DDUMO_CUDA_SIM and this header force-included, and their kernels and launchers run
// unchanged, so the kernels' index arithmetic, masking, shared-memory use and barrier discipline are checked in CI
// on machines without a GPU. It checks the algorithm, not the hardware: no timing, no memory-model effects, no
// compiled SASS (nvcc compile-checks that separately).
//
// Model: blocks run one after another (in launch order, or last first under two of the orders below); the threads
// of a block are cooperative fibers (ucontext) on the calling OS thread, switched only at __syncthreads, named
// barriers (bar.sync id, count) and warp shuffles, so every run is deterministic; which runnable fiber goes next
// follows set_order() (forward, reverse, greedy low / high: a missing barrier or a single-buffered exchange shows
// under some of them). A barrier releases when its count of threads has arrived (__syncthreads: every thread of the
// block that has not exited); when no thread can run and some are waiting, that is a deadlock and the launch
// throws, naming the barrier. `__shared__` variables are function statics (one block at a time shares them; not
// poisoned: the kernels write them before reading), dynamic shared
// memory is one buffer refilled with NaN bytes per block, with a canary past its end. 16-byte accesses are checked
// for alignment (DUMO_ALIGNED16), launches for their configuration and shared-memory opt-in, and every launch is
// logged (take_log) so tests can check which kernels a call ran. The CUDA runtime calls the launchers make are
// emulated with the device properties set by configure(): multiprocessor count, resident blocks per SM, opt-in
// shared memory, spilled bytes. CUDA events read an emulated clock that each launch advances by its kernel's cost
// (set_kernel_cost; 1 ms by default), so the tuned variant's choice follows costs a test sets;
// cudaStreamIsCapturing reports what set_capturing said. Each configure() presents a new device ordinal, so the
// launchers' per-device caches (resident blocks, spills, the tuned variant's choices) see a different card.
#pragma once
#ifndef DUMO_CUDA_SIM
#error "cuda_sim.h is for builds with -DDUMO_CUDA_SIM"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "sim_api.h"

// Device-code keywords become plain C++ (after the CUDA headers, which define them for host compilers).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __grid_constant__

namespace dumo_sim {

struct Props {
  int sms = 4;                      // multiprocessors
  int blocks_per_sm = 2;            // cudaOccupancyMaxActiveBlocksPerMultiprocessor's answer
  int smem_optin = 227 * 1024;      // cudaDevAttrMaxSharedMemoryPerBlockOptin (an H100's)
  size_t local_bytes = 0;           // cudaFuncGetAttributes' localSizeBytes (spills) of every kernel
};
Props& props();
// The emulator build's glue fills every output and scratch buffer with NaN before a launch (rowwise.cpp), so a
// kernel that leaves an element unwritten shows.
void check_aligned16(const void* p);  // throws unless p is 16-byte aligned (a GPU's 16-byte loads and stores need it)

// Per-thread state of the fiber that runs now.
uint3 thread_idx();
extern dim3 g_block_idx, g_block_dim, g_grid_dim;

void syncthreads();
void named_barrier(int id, int count);
float shfl_xor(float v, int mask);
void* dynamic_smem_raw();
template <typename T>
T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_raw());
}

// Runs body() once per thread of every block of the grid (see the model above); throws std::runtime_error on a
// deadlock, a bad launch configuration, dynamic shared memory over the device limit or above 48 KiB without the
// kernel's opt-in, a write past the dynamic shared memory, or an exception in a thread.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// The sticky error a failed launch leaves for cudaGetLastError (cleared by it), as in CUDA.
void set_error(cudaError_t e);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(std::forward<A>(a)...);  // converted as a launch converts them, copied once
    auto k = kernel;
    try {
      run_grid(reinterpret_cast<const void*>(k), grid, block, smem, [&] { std::apply(k, args); });
    } catch (...) {
      set_error(cudaErrorLaunchFailure);
      throw;
    }
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(P...)) {
  return {kernel, grid, block, smem};
}

}  // namespace dumo_sim

#define threadIdx (::dumo_sim::thread_idx())
#define blockIdx (::dumo_sim::g_block_idx)
#define blockDim (::dumo_sim::g_block_dim)
#define gridDim (::dumo_sim::g_grid_dim)

inline void __syncthreads() { ::dumo_sim::syncthreads(); }
inline float __shfl_xor_sync(unsigned /*mask: the kernels use full warps*/, float v, int lane_mask) {
  return ::dumo_sim::shfl_xor(v, lane_mask);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {  // the evict-first hint has no meaning here
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// The runtime's C++ overloads taking a kernel (cuda_runtime.h declares them for nvcc only).
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int block_size,
                                                          size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                       smem);
}
