// pybind11 bindings (through torch's extension machinery) of dumo_engine._C.
#include <torch/extension.h>

#include <stdexcept>

#include "rowwise_ops.h"

#ifdef DUMO_CUDA_SIM
#include "sim/sim_api.h"  // the emulator build (csrc/sim): its device settings and test hooks
#endif

namespace {

// Each op runs inside this wrapper, which turns the glue's errors into Python exceptions itself (TypeError for
// dtype problems, RuntimeError for the rest; c10 messages without the C++ backtrace) rather than through torch's
// and pybind11's translators (see rowwise.cpp on the crash under torch 2.11 that this and DUMO_CHECK avoid).
template <typename R, typename... A>
auto guarded(R (*f)(A...)) {
  return [f](A... a) -> R {
    try {
      return f(std::forward<A>(a)...);
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    } catch (const std::exception& e) {  // the glue's shape / layout / device checks (rowwise.cpp)
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    throw py::error_already_set();
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dumo-engine C++/CUDA row-wise ops (LayerNorm + adaLN modulate, gated residual, dual final layer) "
            "with JVP and backward; CPU twins always, CUDA kernels when built with nvcc";
  m.def("ln_mod_fwd", guarded(&dumo::ln_mod_fwd), "y_k = LN(x)(1 + scale_k) + shift_k -> [y_1(, y_2), mean, rstd]",
        py::arg("x"), py::arg("shifts"), py::arg("scales"), py::arg("eps"));
  m.def("ln_mod_jvp", guarded(&dumo::ln_mod_jvp), "y_dot from the saved statistics", py::arg("x"), py::arg("x_dot"),
        py::arg("mean"), py::arg("rstd"), py::arg("scale"), py::arg("shift_dot"), py::arg("scale_dot"),
        py::arg("y_dot_f32"));
  m.def("ln_mod_bwd", guarded(&dumo::ln_mod_bwd), "-> [gx, gshift_1(, gshift_2), gscale_1(, gscale_2)]", py::arg("gys"),
        py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("scales"));
  m.def("gated_fwd", guarded(&dumo::gated_fwd), "out = x + g h", py::arg("x"), py::arg("g"), py::arg("h"));
  m.def("gated_jvp", guarded(&dumo::gated_jvp), "out_dot = x_dot + g_dot h + g h_dot (float32)", py::arg("x_dot"),
        py::arg("g"), py::arg("g_dot"), py::arg("h"), py::arg("h_dot"));
  m.def("gated_bwd", guarded(&dumo::gated_bwd), "-> [gh = gout g, gg = sum_t gout h]", py::arg("gout"), py::arg("g"),
        py::arg("h"));
  m.def("cuda_fast_path", guarded(&dumo::cuda_fast_path),
        "Select the CUDA kernels process-wide, returning the previous choice: a base choice 0 general kernels only, "
        "1 fast path, 2 / 3 fast path never / always holding operands ahead of use, plus option bits 4 "
        "(the JVP with four warps per row), 8 (the backward's tiles planned for this GPU) and 16 (two rows per pass "
        "in the LayerNorm backward), 32 (tuned: measure each op's candidate variants on its first call per shape, "
        "dtypes and device, and run the fastest; the default, 1 | 32), 64 (the gated residual's forward and JVP by "
        "rows, the gate held in registers), 128 (their once-read operands with the evict-first cache hint), 256 "
        "(the LayerNorm backward with a block of warps per row, column sums in registers; before 16); -1 only "
        "queries",
        py::arg("variant") = -1);
  m.def("cuda_tuned", guarded(+[]() -> py::list {
    static const char* const kOps[] = {"ln_mod_fwd", "ln_mod_jvp", "ln_mod_bwd", "gated_bwd", "gated_fwd",
                                       "gated_jvp"};
    static const char* const kTypes[] = {"float32", "bfloat16", "float16"};
    py::list out;
    for (const auto& r : dumo::tuned_variants()) {
      py::dict d;
      d["op"] = kOps[int(r.op)], d["nmod"] = r.nmod, d["N"] = r.s.N, d["T"] = r.s.T, d["D"] = r.s.D;
      d["tx"] = kTypes[int(r.tx)], d["tm"] = kTypes[int(r.tm)];
      d["f32_out"] = r.f32_out, d["device"] = r.device, d["variant"] = r.variant;
      d["candidates"] = r.candidates, d["ms"] = r.ms;
      out.append(d);
    }
    return out;
  }), "The tuned variant's measurements (cuda_fast_path bit 32): one dict per (op, shapes, dtypes, device) measured "
     "in this process: the candidates, their median ms (CUDA events) and the variant that key runs");
  m.def("cuda_tune_reset", guarded(&dumo::reset_tuned_variants),
        "Forget the tuned variant's measurements (the next call of each key measures again); returns how many");
  m.def("bwd_tile_plan", guarded(&dumo::bwd_tile_plan),
        "[rows per block, tiles per sample] of the fast CUDA backward with planned tiles, for N samples of T rows on "
        "`slots` concurrently resident blocks (host arithmetic: also in CPU builds, for tests)",
        py::arg("N"), py::arg("T"), py::arg("slots"));
  m.def("with_cuda", &dumo::with_cuda, "True when the CUDA kernels were compiled in");
#ifdef DUMO_CUDA_SIM  // the emulator build (csrc/sim, tests/test_cuda_sim.py): its emulated device
  m.def("sim_configure", guarded(&dumo_sim::configure),
        "Emulated device: multiprocessors, resident blocks per SM, opt-in shared memory per block (bytes), spilled "
        "bytes reported for every kernel",
        py::arg("sms"), py::arg("blocks_per_sm"), py::arg("smem_optin"), py::arg("local_bytes"));
  m.def("sim_selftest", guarded(&dumo_sim::selftest),
        "The emulator's own check: mode 0 a warp-sum kernel with an early-exiting warp (returns 0); 1 a kernel "
        "that deadlocks, 2 one whose thread throws (both raise)", py::arg("mode"));
  m.def("sim_order", guarded(&dumo_sim::set_order),
        "Emulator scheduling order: 0 forward, 1 reverse, 2 greedy low, 3 greedy high", py::arg("order"));
  m.def("sim_kernel_cost", guarded(&dumo_sim::set_kernel_cost),
        "Emulated milliseconds per launch of the kernel named '@offset' (what CUDA events measure; others cost "
        "1 ms); an empty name clears them", py::arg("name"), py::arg("ms"));
  m.def("sim_capturing", guarded(&dumo_sim::set_capturing),
        "Whether cudaStreamIsCapturing reports a CUDA-graph capture in progress", py::arg("on"));
  m.def("sim_event_failure", guarded(&dumo_sim::set_event_failure), "Whether cudaEventCreate fails",
        py::arg("on"));
  m.def("sim_capture_mode", guarded(&dumo_sim::capture_mode),
        "The thread's stream-capture mode as cudaThreadExchangeStreamCaptureMode left it (0 global, 2 relaxed)");
  m.def("sim_launches", [] {
    py::list out;
    for (const auto& r : dumo_sim::take_log())
      out.append(py::make_tuple(dumo_sim::kernel_name(r.kernel), py::make_tuple(r.grid.x, r.grid.y, r.grid.z),
                                py::make_tuple(r.block.x, r.block.y, r.block.z), r.smem));
    return out;
  }, "The launches since the last call: (kernel '@offset' in the module, grid, block, dynamic shared memory)");
#endif
}
