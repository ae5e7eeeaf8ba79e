// The CUDA emulator's interface for its test bindings (bindings.cpp in the emulator build) and for cuda_sim.h.
// No macros: safe to include after torch's headers.
#pragma once
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dumo_sim {

// Emulated device: multiprocessors, resident blocks per SM, opt-in shared memory per block (bytes), spilled bytes
// reported for every kernel. Each call presents a new device ordinal. Returns 0.
int configure(int sms, int blocks_per_sm, int smem_optin, int64_t local_bytes);
// The emulator's own check: mode 0 a warp-sum kernel with a warp that exits early (returns 0, else throws); 1 a
// kernel that deadlocks; 2 a kernel whose thread throws (both must raise).
int selftest(int mode);
void set_order(int order);  // scheduling order: 0 forward, 1 reverse, 2 greedy low, 3 greedy high
// The emulated clock that CUDA events read advances by a cost per launch: `ms` for the kernel named `name`
// (kernel_name's "@offset"), kDefaultCostMs for the others; an empty name clears every set cost.
constexpr double kDefaultCostMs = 1.0;
void set_kernel_cost(const std::string& name, double ms);
void set_capturing(bool on);  // whether cudaStreamIsCapturing reports a capture in progress
void set_event_failure(bool on);  // whether cudaEventCreate fails (cudaErrorMemoryAllocation)
int capture_mode();  // the calling thread's stream-capture mode (cudaStreamCaptureMode: 0 global, 2 relaxed)

struct LaunchRecord {  // one launch, for tests that check which kernels a call ran
  const void* kernel;
  dim3 grid, block;
  size_t smem;
};
std::vector<LaunchRecord> take_log();         // the launches since the last call
std::string kernel_name(const void* kernel);  // "@<offset in its shared object>" (tests resolve it with nm)

}  // namespace dumo_sim
