// The CUDA emulator's scheduler and runtime calls (see cuda_sim.h for the model).
#include "cuda_sim.h"

#include <ucontext.h>

#include <dlfcn.h>

#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <stdexcept>
#include <vector>

struct CUevent_st {  // the runtime's opaque event, emulated: the clock reading of its last record (-1: none)
  double ms;
};

namespace dumo_sim {

Props& props() {
  static Props p;
  return p;
}

dim3 g_block_idx, g_block_dim, g_grid_dim;
int g_device = 0;  // a new ordinal per configure(): the launchers' per-device caches see a different card

int configure(int sms, int blocks_per_sm, int smem_optin, int64_t local_bytes) {
  if (sms < 1 || blocks_per_sm < 1 || smem_optin < 1024 || local_bytes < 0)
    throw std::runtime_error("dumo_sim.configure: sms and blocks_per_sm must be >= 1, smem_optin >= 1024 bytes, "
                             "local_bytes >= 0");
  props() = Props{sms, blocks_per_sm, smem_optin, size_t(local_bytes)};
  ++g_device;
  return 0;
}

namespace {

constexpr size_t kStack = 256 * 1024;  // per thread: the kernels keep small register arrays on it

struct Barrier {  // arrivals of the current generation; waiters wait for the generation to change
  int count = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid;
  bool done = false;
  Barrier* waiting = nullptr;  // the barrier this thread waits at, and the generation it arrived in
  uint64_t wait_gen = 0;
  std::string wait_name;
};

struct BlockRun {
  std::vector<Thread> threads;
  ucontext_t sched;
  int cur = -1;
  int live = 0;                         // threads not yet exited
  Barrier block_bar;                    // __syncthreads: count = live threads
  std::map<int, Barrier> named;         // bar.sync id, count
  std::vector<Barrier> warp_bar;        // shuffles: all 32 lanes
  std::vector<float> warp_buf;          // one value per lane
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

BlockRun* g_run = nullptr;
std::vector<char> g_smem;
cudaError_t g_error = cudaSuccess;
std::map<const void*, int> g_optin;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel
std::vector<LaunchRecord> g_log;
std::map<std::string, double> g_cost;  // kernel_name -> emulated milliseconds per launch (set_kernel_cost)
double g_clock_ms = 0.0;               // advanced by each launch: what cudaEventRecord reads
bool g_capturing = false;              // what cudaStreamIsCapturing says (set_capturing)
bool g_fail_events = false;            // cudaEventCreate fails (set_event_failure)
cudaStreamCaptureMode g_capture_mode = cudaStreamCaptureModeGlobal;  // this (only) thread's, as in CUDA
constexpr size_t kCanary = 64;      // bytes past the dynamic shared memory that must stay untouched
constexpr char kPoison = char(0xff);  // every float / half / bf16 made of these bytes is a NaN

Thread& me() { return g_run->threads[g_run->cur]; }

// Arrive at b (count already set) and switch away until the barrier's generation moves on.
void arrive(Barrier& b, const std::string& name) {
  if (++b.arrived >= b.count) {
    b.arrived = 0;
    ++b.generation;
    return;  // the last arrival releases everyone and goes on
  }
  Thread& t = me();
  t.waiting = &b;
  t.wait_gen = b.generation;
  t.wait_name = name;
  swapcontext(&t.ctx, &g_run->sched);
}

void thread_main() {
  BlockRun& r = *g_run;
  try {
    (*r.body)();
  } catch (...) {
    if (!r.error) r.error = std::current_exception();
  }
  me().done = true;
  --r.live;
  // a __syncthreads waits for the threads still alive: this exit may complete it
  if (r.block_bar.arrived > 0 && r.block_bar.arrived >= r.live) {
    r.block_bar.arrived = 0;
    ++r.block_bar.generation;
  }
  swapcontext(&me().ctx, &r.sched);
}

// Scheduling order (set_order): fibers switch only at barriers and shuffles, so which runnable fiber goes next
// decides which unsynchronised shared-memory orderings a run sees. kForward / kReverse: round-robin from the lowest
// / highest thread; kGreedyLow / kGreedyHigh: always the lowest / highest runnable thread. A kernel with a missing
// barrier or a single-buffered exchange gives different results under some of them (tests run several). kReverse and
// kGreedyHigh also run the grid's blocks last first (run_grid).
int g_order = 0;
enum { kForward = 0, kReverse = 1, kGreedyLow = 2, kGreedyHigh = 3 };

bool runnable(const Thread& t) { return !t.done && !(t.waiting && t.waiting->generation == t.wait_gen); }

void run_block(BlockRun& r) {
  const int n = int(r.threads.size());
  for (;;) {
    bool ran = false, pending = false;  // pending: some thread has not exited (scanned after the round)
    for (int k = 0; k < n; ++k) {
      int i = k;
      if (g_order == kReverse) {
        i = n - 1 - k;
      } else if (g_order == kGreedyLow || g_order == kGreedyHigh) {
        i = -1;  // the first runnable thread from the chosen end; rescanned after every switch
        for (int j = 0; j < n && i < 0; ++j) {
          const int c = g_order == kGreedyLow ? j : n - 1 - j;
          if (runnable(r.threads[c])) i = c;
        }
        if (i < 0) break;
      }
      Thread& t = r.threads[i];
      if (!runnable(t)) continue;  // exited or still blocked
      t.waiting = nullptr;
      r.cur = i;
      swapcontext(&r.sched, &t.ctx);
      ran = true;
      if (r.error) return;
    }
    for (const Thread& t : r.threads) pending = pending || !t.done;
    if (!pending) return;
    if (!ran) {
      std::string what = "dumo_sim: deadlock in block (" + std::to_string(g_block_idx.x) + ", " +
                         std::to_string(g_block_idx.y) + "):";
      int shown = 0;
      for (int i = 0; i < n && shown < 4; ++i) {
        const Thread& t = r.threads[i];
        if (t.done) continue;
        what += " thread " + std::to_string(i) + " waits at " + t.wait_name + ";";
        ++shown;
      }
      throw std::runtime_error(what);
    }
  }
}

}  // namespace

uint3 thread_idx() { return me().tid; }

void syncthreads() {
  BlockRun& r = *g_run;
  r.block_bar.count = r.live;
  arrive(r.block_bar, "__syncthreads");
}

void named_barrier(int id, int count) {
  BlockRun& r = *g_run;
  if (count <= 0 || count % 32 != 0 || count > int(r.threads.size()))
    throw std::runtime_error("dumo_sim: bar.sync " + std::to_string(id) + " with thread count " +
                             std::to_string(count) + " (must be a positive multiple of 32, at most the block)");
  Barrier& b = r.named[id];
  if (b.arrived > 0 && b.count != count)
    throw std::runtime_error("dumo_sim: bar.sync " + std::to_string(id) + ": threads disagree on the count (" +
                             std::to_string(b.count) + " and " + std::to_string(count) + ")");
  b.count = count;
  arrive(b, "bar.sync " + std::to_string(id) + ", " + std::to_string(count));
}

float shfl_xor(float v, int mask) {
  BlockRun& r = *g_run;
  const int i = r.cur, warp = i / 32, lane = i % 32;
  if ((warp + 1) * 32 > int(r.threads.size()))
    throw std::runtime_error("dumo_sim: warp shuffle in a partial warp (blockDim not a multiple of 32)");
  Barrier& b = r.warp_bar[warp];
  b.count = 32;
  r.warp_buf[i] = v;
  arrive(b, "a shuffle of warp " + std::to_string(warp));  // every lane has written
  const float out = r.warp_buf[warp * 32 + (lane ^ mask)];
  arrive(b, "a shuffle of warp " + std::to_string(warp));  // every lane has read
  return out;
}

void* dynamic_smem_raw() { return g_smem.data(); }

void set_error(cudaError_t e) { g_error = e; }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (g_run) throw std::runtime_error("dumo_sim: a launch from inside a kernel (or from two host threads)");
  const int nthreads = int(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("dumo_sim: block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                             std::to_string(block.z) + "): 1..1024 threads, z <= 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("dumo_sim: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + "): every dimension >= 1, y and z <= 65535");
  if (smem > size_t(props().smem_optin))
    throw std::runtime_error("dumo_sim: " + std::to_string(smem) + " bytes of dynamic shared memory, over the " +
                             std::to_string(props().smem_optin) + "-byte opt-in limit");
  if (smem > 48 * 1024) {
    const auto it = g_optin.find(kernel);
    if (it == g_optin.end() || size_t(it->second) < smem)
      throw std::runtime_error("dumo_sim: " + std::to_string(smem) + " bytes of dynamic shared memory without the "
                               "kernel's cudaFuncAttributeMaxDynamicSharedMemorySize opt-in");
  }
  g_log.push_back({kernel, grid, block, smem});
  if (kernel) {  // the emulated clock that events read: a set cost per kernel, else kDefaultCostMs per launch
    const auto it = g_cost.empty() ? g_cost.end() : g_cost.find(kernel_name(kernel));
    g_clock_ms += it != g_cost.end() ? it->second : kDefaultCostMs;
  }
  g_grid_dim = grid;
  g_block_dim = block;
  BlockRun r;
  r.threads.resize(nthreads);
  for (auto& t : r.threads) t.stack.reset(new char[kStack]);
  r.warp_bar.resize((nthreads + 31) / 32);
  r.warp_buf.assign(nthreads, 0.f);
  r.body = &body;
  g_run = &r;
  struct Reset {
    ~Reset() { g_run = nullptr; }
  } reset;
  // blocks in launch order, or under kReverse / kGreedyHigh the last block first: a block that writes another
  // block's elements shows under one of them (the rightful writer runs after it), as block order is free on a GPU
  const bool backwards = g_order == kReverse || g_order == kGreedyHigh;
  for (unsigned iz = 0; iz < grid.z; ++iz)
    for (unsigned iy = 0; iy < grid.y; ++iy)
      for (unsigned ix = 0; ix < grid.x; ++ix) {
        const unsigned bx = backwards ? grid.x - 1 - ix : ix, by = backwards ? grid.y - 1 - iy : iy,
                       bz = backwards ? grid.z - 1 - iz : iz;
        g_block_idx = dim3(bx, by, bz);
        r.live = nthreads;
        r.block_bar = Barrier{};
        r.named.clear();
        for (auto& b : r.warp_bar) b = Barrier{};
        // poisoned per block (NaN in every float type), as shared memory holds garbage on a GPU: a kernel that
        // reads before it writes shows as NaN; the canary past the end catches overruns
        g_smem.assign(smem + kCanary, kPoison);
        for (int i = 0; i < nthreads; ++i) {
          Thread& t = r.threads[i];
          t.done = false;
          t.waiting = nullptr;
          t.tid = make_uint3(unsigned(i) % block.x, unsigned(i) / block.x % block.y, unsigned(i) / (block.x * block.y));
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack.get();
          t.ctx.uc_stack.ss_size = kStack;
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, thread_main, 0);
        }
        run_block(r);
        if (r.error) std::rethrow_exception(r.error);
        for (size_t i = smem; i < smem + kCanary; ++i)
          if (g_smem[i] != kPoison)
            throw std::runtime_error("dumo_sim: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                     ") wrote past its " + std::to_string(smem) + " bytes of dynamic shared memory");
      }
}

void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw std::runtime_error("dumo_sim: a 16-byte access at an address that is not 16-byte aligned");
}

void set_order(int order) {
  if (order < kForward || order > kGreedyHigh)
    throw std::runtime_error("dumo_sim: scheduling order must be 0 (forward), 1 (reverse), 2 (greedy low) or 3 "
                             "(greedy high)");
  g_order = order;
}

std::vector<LaunchRecord> take_log() {
  std::vector<LaunchRecord> out;
  out.swap(g_log);
  return out;
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (!dladdr(kernel, &info) || !info.dli_fbase) return "?";
  return "@" + std::to_string(reinterpret_cast<uintptr_t>(kernel) - reinterpret_cast<uintptr_t>(info.dli_fbase));
}

void set_kernel_cost(const std::string& name, double ms) {
  if (!(ms >= 0.0)) throw std::runtime_error("dumo_sim.set_kernel_cost: ms must be >= 0");
  if (name.empty()) g_cost.clear();
  else g_cost[name] = ms;
}

void set_capturing(bool on) { g_capturing = on; }

void set_event_failure(bool on) { g_fail_events = on; }

int capture_mode() { return int(g_capture_mode); }

int selftest(int mode) {
  std::vector<float> out(128, -1.f);
  float* o = out.data();
  run_grid(nullptr, dim3(2), dim3(64), 0, [&] {
    const int t = int(thread_idx().x);
    if (mode == 1) {  // half the block at __syncthreads, half at a 64-thread named barrier: neither can complete
      if (t < 32) syncthreads();
      else named_barrier(1, 64);
      return;
    }
    if (mode == 2 && t == 40) throw std::runtime_error("dumo_sim.selftest: thrown by thread 40");
    if (g_block_idx.x == 1 && t >= 32) return;  // a warp that exits: the block's __syncthreads must not wait for it
    float v = float(t);
    for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);  // a butterfly warp sum, as the kernels do
    syncthreads();
    o[g_block_idx.x * 64 + t] = v;
  });
  for (int i = 0; i < 128; ++i) {
    if (i >= 96) {
      if (out[i] != -1.f) throw std::runtime_error("dumo_sim.selftest: an exited thread wrote");
      continue;
    }
    const int w = (i % 64) / 32;
    const float want = float(32 * 32 * w + 31 * 32 / 2);  // sum of 32 w .. 32 w + 31
    if (out[i] != want)
      throw std::runtime_error("dumo_sim.selftest: thread " + std::to_string(i) + " got " + std::to_string(out[i]) +
                               ", want " + std::to_string(want));
  }
  return 0;
}

}  // namespace dumo_sim

// ------------------------------------------------------------------------------------------------------------------
// The runtime calls of the launchers, against the emulated device (props()).
// ------------------------------------------------------------------------------------------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = dumo_sim::g_error;
  dumo_sim::g_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return dumo_sim::g_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated)";
    default: return "error (emulated)";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = dumo_sim::g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != dumo_sim::g_device) return dumo_sim::g_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = dumo_sim::props().sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = dumo_sim::props().smem_optin; return cudaSuccess;
    default: return dumo_sim::g_error = cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > dumo_sim::props().smem_optin) return dumo_sim::g_error = cudaErrorInvalidValue;
    dumo_sim::g_optin[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* /*func*/) {
  std::memset(attr, 0, sizeof(*attr));
  attr->localSizeBytes = dumo_sim::props().local_bytes;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* /*func*/, int /*block*/,
                                                          size_t /*smem*/) {
  *num_blocks = dumo_sim::props().blocks_per_sm;
  return cudaSuccess;
}

// Events read the emulated clock (launch costs, see run_grid): elapsed time between two records is the sum of the
// costs of the launches between them.
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  if (dumo_sim::g_fail_events) return dumo_sim::g_error = cudaErrorMemoryAllocation;
  *event = new CUevent_st{-1.0};
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t /*stream*/) {
  if (!event) return dumo_sim::g_error = cudaErrorInvalidResourceHandle;
  event->ms = dumo_sim::g_clock_ms;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event ? cudaSuccess : (dumo_sim::g_error = cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!start || !end) return dumo_sim::g_error = cudaErrorInvalidResourceHandle;
  if (start->ms < 0 || end->ms < 0) return dumo_sim::g_error = cudaErrorInvalidResourceHandle;  // never recorded
  *ms = float(end->ms - start->ms);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event) return dumo_sim::g_error = cudaErrorInvalidResourceHandle;
  delete event;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode* mode) {
  std::swap(*mode, dumo_sim::g_capture_mode);
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t /*stream*/, enum cudaStreamCaptureStatus* status) {
  *status = dumo_sim::g_capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

}  // extern "C"
