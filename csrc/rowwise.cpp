// Torch-facing glue of the row-wise ops: input checks with messages that name the problem, output allocation,
// and dispatch to the C++ CPU twin (rowwise_cpu.cpp) or the CUDA launcher (rowwise_cuda.cu, when built with
// DUMO_WITH_CUDA). Formulas: rowwise.h and the kernels; reference: dumo_engine/ops/rowwise_ref.py.
#include "rowwise_ops.h"

#include <ATen/ATen.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(DUMO_WITH_CUDA) && !defined(DUMO_CUDA_SIM)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#elif defined(DUMO_CUDA_SIM)  // csrc/sim: the CUDA launchers run on host memory (tests only)
#include <cuda_runtime_api.h>
#endif

#include "rowwise.h"
#include "rowwise_fast.h"

// Error messages are built by msg() below -- plain string concatenation, numbers through std::to_string -- and
// never through an iostream in this library: on the GPU image (torch 2.11) every failing check whose message
// streamed a number (t.sizes(), N, D; TORCH_CHECK, TORCH_CHECK_VALUE and a std::runtime_error alike) crashed the
// process (H200 and H100, 2026-11-27) while the checks whose messages held only strings raised cleanly; under torch
// 2.13 here all of them raise. Shape, layout, device and count problems raise std::runtime_error (Python
// RuntimeError); dtype problems raise c10::TypeError (Python TypeError). bindings.cpp turns both into Python
// exceptions itself.
#define DUMO_CHECK(cond, ...)                                           \
  do {                                                                  \
    if (!(cond)) throw std::runtime_error(::dumo::msg(__VA_ARGS__));    \
  } while (0)
#define DUMO_CHECK_TYPE(cond, ...)                                      \
  do {                                                                  \
    if (!(cond)) C10_THROW_ERROR(TypeError, ::dumo::msg(__VA_ARGS__));  \
  } while (0)

namespace dumo {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... A>
std::string msg(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

namespace {

std::string dims(c10::IntArrayRef a) {  // "[2, 16]"
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      DUMO_CHECK_TYPE(false, "dumo_engine._C.", op, ": ", name, " has dtype ", t.scalar_type(),
                       "; supported: float32, bfloat16, float16");
  }
  return DType::F32;
}

void check_defined(const at::Tensor& t, const char* op, const char* name) {
  DUMO_CHECK(t.defined(), "dumo_engine._C.", op, ": ", name, " is undefined (None)");
}

// ref: the name of x, the tensor the others are checked against ("x", or "x_dot" / "gout" for the gated ops)
void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                       const char* ref = "x") {
  DUMO_CHECK(t.device() == x.device(), "dumo_engine._C.", op, ": ", name, " is on ", t.device().str(),
              " but ", ref, " is on ", x.device().str(), "; all inputs must be on one device");
}

// (N, T, D) row tensor: contiguous, same shape and device as the reference row tensor x.
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name, const char* ref = "x") {
  check_defined(t, op, name);
  check_same_device(t, x, op, name, ref);
  DUMO_CHECK(t.sizes() == x.sizes(), "dumo_engine._C.", op, ": ", name, " has shape ", dims(t.sizes()),
                    " but ", ref, " has shape ", dims(x.sizes()));
  DUMO_CHECK(t.is_contiguous(), "dumo_engine._C.", op, ": ", name, " must be contiguous (strides ",
                    dims(t.strides()), "); call .contiguous() first");
}

// The emulator build (csrc/sim, tests) fills every output and scratch buffer with NaN before the launch, so an
// element a kernel leaves unwritten shows; elsewhere nothing.
template <typename... Ts>
void poison(const Ts&... ts) {
#ifdef DUMO_CUDA_SIM
  (ts.fill_(std::numeric_limits<double>::quiet_NaN()), ...);
#else
  ((void)ts, ...);
#endif
}

// Whether x's op runs the CUDA launchers: CUDA tensors; in the emulator build (csrc/sim, tests) every tensor.
bool on_gpu(const at::Tensor& x) {
#ifdef DUMO_CUDA_SIM
  return x.is_cpu() || x.is_cuda();
#else
  return x.is_cuda();
#endif
}

void check_bwd_grid(const at::Tensor& x, Shape s, const char* op) {
  if (on_gpu(x))
    DUMO_CHECK(s.T <= int64_t(65535) * kBwdTileRows, "dumo_engine._C.", op, ": ", s.T,
                     " rows per sample exceed the CUDA backward grid (", int64_t(65535) * kBwdTileRows, ")");
}

Shape check_x(const at::Tensor& x, const char* op, const char* name = "x") {
  check_defined(x, op, name);
  DUMO_CHECK(x.dim() == 3, "dumo_engine._C.", op, ": ", name, " must be (N, T, D), got ", x.dim(),
                    " dims with shape ", dims(x.sizes()));
  DUMO_CHECK(x.is_contiguous(), "dumo_engine._C.", op, ": ", name, " must be contiguous (strides ",
                    dims(x.strides()), "); call .contiguous() first");
  DUMO_CHECK(x.is_cpu() || x.is_cuda(), "dumo_engine._C.", op, ": unsupported device ", x.device().str());
  const Shape s{x.size(0), x.size(1), x.size(2)};
  DUMO_CHECK(s.D > 0, "dumo_engine._C.", op, ": hidden size D must be positive");
  if (on_gpu(x))
    DUMO_CHECK(s.D <= kMaxHidden, "dumo_engine._C.", op, ": hidden size ", s.D, " exceeds the CUDA kernels' ",
                     kMaxHidden);
  return s;
}

// (N, D) per-sample vector with a unit last stride (row-strided views such as adaLN(c).chunk(6, 1) are fine).
void check_vec(const at::Tensor& t, const at::Tensor& x, Shape s, const char* op, const char* name,
               const char* ref = "x") {
  check_defined(t, op, name);
  check_same_device(t, x, op, name, ref);
  DUMO_CHECK(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.D, "dumo_engine._C.", op, ": ", name,
                    " must have shape (N, D) = (", s.N, ", ", s.D, "), got ", dims(t.sizes()));
  DUMO_CHECK(t.stride(1) == 1 || s.D == 1, "dumo_engine._C.", op, ": ", name,
                    " must have a contiguous last dimension (stride 1), got strides ", dims(t.strides()));
}

void check_stats(const at::Tensor& t, const at::Tensor& x, Shape s, const char* op, const char* name) {
  check_defined(t, op, name);
  check_same_device(t, x, op, name);
  DUMO_CHECK_TYPE(t.scalar_type() == at::kFloat, "dumo_engine._C.", op, ": ", name, " must be float32, got ",
                   t.scalar_type());
  DUMO_CHECK(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.T && t.is_contiguous(), "dumo_engine._C.",
                    op, ": ", name, " must be a contiguous (N, T) = (", s.N, ", ", s.T, ") tensor, got shape ",
                    dims(t.sizes()), " strides ", dims(t.strides()));
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name, const char* why) {
  DUMO_CHECK_TYPE(t.scalar_type() == want, "dumo_engine._C.", op, ": ", name, " has dtype ", t.scalar_type(),
                   " but must be ", want, " (", why, ")");
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }  // one row: never stepped

bool use_cuda(const at::Tensor& x, const char* op) {
  if (!on_gpu(x)) return false;
#ifdef DUMO_WITH_CUDA
  return true;
#else
  DUMO_CHECK(false, "dumo_engine._C.", op, ": got CUDA tensors, but this build of dumo_engine._C has the C++ CPU "
              "twins only (built against a CPU torch or without nvcc); rebuild with `pip install -e .` on a CUDA "
              "machine");
  return false;
#endif
}

#ifdef DUMO_WITH_CUDA
void check_launch(int err, const char* op) {
  DUMO_CHECK(err == 0, "dumo_engine._C.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#ifdef DUMO_CUDA_SIM
#define DUMO_CUDA_CONTEXT(x) void* stream_ = nullptr
#else
#define DUMO_CUDA_CONTEXT(x) \
  const c10::cuda::CUDAGuard guard_((x).device()); \
  void* stream_ = at::cuda::getCurrentCUDAStream().stream()
#endif
#endif

}  // namespace

std::vector<at::Tensor> ln_mod_fwd(const at::Tensor& x, const std::vector<at::Tensor>& shifts,
                                   const std::vector<at::Tensor>& scales, double eps) {
  const char* op = "ln_mod_fwd";
  const Shape s = check_x(x, op);
  const int nmod = int(shifts.size());
  DUMO_CHECK(nmod >= 1 && nmod <= 2 && scales.size() == shifts.size(), "dumo_engine._C.", op,
                    ": needs one or two (shift, scale) pairs, got ", shifts.size(), " shifts and ", scales.size(),
                    " scales");
  const DType tx = dtype_of(x, op, "x");
  const DType tm = dtype_of(shifts[0], op, "shift");
  Mod mods[2];
  std::vector<at::Tensor> out;
  void* ys[2];
  for (int k = 0; k < nmod; ++k) {
    check_vec(shifts[k], x, s, op, k ? "shift_u" : "shift");
    check_vec(scales[k], x, s, op, k ? "scale_u" : "scale");
    check_dtype(shifts[k], shifts[0].scalar_type(), op, k ? "shift_u" : "shift", "one dtype for all modulations");
    check_dtype(scales[k], shifts[0].scalar_type(), op, k ? "scale_u" : "scale", "one dtype for all modulations");
    mods[k] = Mod{shifts[k].data_ptr(), scales[k].data_ptr(), row_stride(shifts[k]), row_stride(scales[k])};
    out.push_back(at::empty(x.sizes(), x.options().dtype(shifts[0].scalar_type())));
    ys[k] = out.back().data_ptr();
  }
  at::Tensor mean = at::empty({s.N, s.T}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({s.N, s.T}, x.options().dtype(at::kFloat));
  for (const auto& t : out) poison(t);
  poison(mean, rstd);
  if (use_cuda(x, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(x);
    check_launch(ln_mod_fwd_cuda(x.data_ptr(), mods, nmod, ys, mean.data_ptr<float>(), rstd.data_ptr<float>(), s,
                                 float(eps), tx, tm, stream_), op);
#endif
  } else {
    ln_mod_fwd_cpu(x.data_ptr(), mods, nmod, ys, mean.data_ptr<float>(), rstd.data_ptr<float>(), s, float(eps), tx,
                   tm);
  }
  out.push_back(mean);
  out.push_back(rstd);
  return out;
}

at::Tensor ln_mod_jvp(const at::Tensor& x, const at::Tensor& x_dot, const at::Tensor& mean, const at::Tensor& rstd,
                      const at::Tensor& scale, const at::Tensor& shift_dot, const at::Tensor& scale_dot,
                      bool y_dot_f32) {
  const char* op = "ln_mod_jvp";
  const Shape s = check_x(x, op);
  check_rows(x_dot, x, op, "x_dot");
  check_dtype(x_dot, at::kFloat, op, "x_dot", "the tangent stream is float32");
  check_stats(mean, x, s, op, "mean");
  check_stats(rstd, x, s, op, "rstd");
  check_vec(scale, x, s, op, "scale");
  check_vec(shift_dot, x, s, op, "shift_dot");
  check_vec(scale_dot, x, s, op, "scale_dot");
  const DType tx = dtype_of(x, op, "x");
  const DType tm = dtype_of(scale, op, "scale");
  check_dtype(shift_dot, scale.scalar_type(), op, "shift_dot", "modulation vectors share scale's dtype");
  check_dtype(scale_dot, scale.scalar_type(), op, "scale_dot", "modulation vectors share scale's dtype");
  at::Tensor y_dot = at::empty(x.sizes(), x.options().dtype(y_dot_f32 ? at::kFloat : scale.scalar_type()));
  poison(y_dot);
  if (use_cuda(x, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(x);
    check_launch(ln_mod_jvp_cuda(x.data_ptr(), x_dot.data_ptr<float>(), mean.data_ptr<float>(),
                                 rstd.data_ptr<float>(), scale.data_ptr(), row_stride(scale), shift_dot.data_ptr(),
                                 row_stride(shift_dot), scale_dot.data_ptr(), row_stride(scale_dot),
                                 y_dot.data_ptr(), y_dot_f32, s, tx, tm, stream_), op);
#endif
  } else {
    ln_mod_jvp_cpu(x.data_ptr(), x_dot.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                   scale.data_ptr(), row_stride(scale), shift_dot.data_ptr(), row_stride(shift_dot),
                   scale_dot.data_ptr(), row_stride(scale_dot), y_dot.data_ptr(), y_dot_f32, s, tx, tm);
  }
  return y_dot;
}

std::vector<at::Tensor> ln_mod_bwd(const std::vector<at::Tensor>& gys, const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& rstd, const std::vector<at::Tensor>& scales) {
  const char* op = "ln_mod_bwd";
  const Shape s = check_x(x, op);
  check_bwd_grid(x, s, op);
  const int nmod = int(gys.size());
  DUMO_CHECK(nmod >= 1 && nmod <= 2 && scales.size() == gys.size(), "dumo_engine._C.", op,
                    ": needs one or two (gy, scale) pairs, got ", gys.size(), " gys and ", scales.size(), " scales");
  check_stats(mean, x, s, op, "mean");
  check_stats(rstd, x, s, op, "rstd");
  const DType tx = dtype_of(x, op, "x");
  const DType tm = dtype_of(scales[0], op, "scale");
  const void* gyp[2];
  const void* scp[2];
  int64_t strides[2];
  std::vector<at::Tensor> out{at::empty_like(x)};
  std::vector<at::Tensor> gsh, gsc;
  void* gshp[2];
  void* gscp[2];
  for (int k = 0; k < nmod; ++k) {
    check_rows(gys[k], x, op, k ? "gy_u" : "gy");
    check_vec(scales[k], x, s, op, k ? "scale_u" : "scale");
    check_dtype(gys[k], scales[0].scalar_type(), op, k ? "gy_u" : "gy", "gradients of y share the scale dtype");
    check_dtype(scales[k], scales[0].scalar_type(), op, k ? "scale_u" : "scale", "one dtype for all modulations");
    gyp[k] = gys[k].data_ptr();
    scp[k] = scales[k].data_ptr();
    strides[k] = row_stride(scales[k]);
    gsh.push_back(at::empty({s.N, s.D}, x.options().dtype(scales[0].scalar_type())));
    gsc.push_back(at::empty({s.N, s.D}, x.options().dtype(scales[0].scalar_type())));
    gshp[k] = gsh.back().data_ptr();
    gscp[k] = gsc.back().data_ptr();
  }
  at::Tensor partial = at::empty({bwd_partial_floats(s, 2 * nmod)}, x.options().dtype(at::kFloat));
  for (const auto& t : out) poison(t);
  for (int k = 0; k < nmod; ++k) poison(gsh[k], gsc[k]);
  poison(partial);
  if (use_cuda(x, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(x);
    check_launch(ln_mod_bwd_cuda(gyp, x.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), scp, strides,
                                 nmod, out[0].data_ptr(), gshp, gscp, partial.data_ptr<float>(), s, tx, tm, stream_),
                 op);
#endif
  } else {
    ln_mod_bwd_cpu(gyp, x.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), scp, strides, nmod,
                   out[0].data_ptr(), gshp, gscp, partial.data_ptr<float>(), s, tx, tm);
  }
  out.insert(out.end(), gsh.begin(), gsh.end());
  out.insert(out.end(), gsc.begin(), gsc.end());
  return out;
}

at::Tensor gated_fwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& h) {
  const char* op = "gated_fwd";
  const Shape s = check_x(x, op);
  check_vec(g, x, s, op, "g");
  check_rows(h, x, op, "h");
  const DType tx = dtype_of(x, op, "x");
  const DType tm = dtype_of(g, op, "g");
  check_dtype(h, g.scalar_type(), op, "h", "the branch output and its gate share a dtype");
  at::Tensor out = at::empty_like(x);
  poison(out);
  if (use_cuda(x, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(x);
    check_launch(gated_fwd_cuda(x.data_ptr(), g.data_ptr(), row_stride(g), h.data_ptr(), out.data_ptr(), s, tx, tm,
                                stream_), op);
#endif
  } else {
    gated_fwd_cpu(x.data_ptr(), g.data_ptr(), row_stride(g), h.data_ptr(), out.data_ptr(), s, tx, tm);
  }
  return out;
}

at::Tensor gated_jvp(const at::Tensor& x_dot, const at::Tensor& g, const at::Tensor& g_dot, const at::Tensor& h,
                     const at::Tensor& h_dot) {
  const char* op = "gated_jvp";
  const Shape s = check_x(x_dot, op, "x_dot");
  check_dtype(x_dot, at::kFloat, op, "x_dot", "the tangent stream is float32");
  check_vec(g, x_dot, s, op, "g", "x_dot");
  check_vec(g_dot, x_dot, s, op, "g_dot", "x_dot");
  check_rows(h, x_dot, op, "h", "x_dot");
  check_rows(h_dot, x_dot, op, "h_dot", "x_dot");
  const DType tm = dtype_of(g, op, "g");
  check_dtype(g_dot, g.scalar_type(), op, "g_dot", "the gate and its tangent share a dtype");
  check_dtype(h, g.scalar_type(), op, "h", "the branch output and its gate share a dtype");
  check_dtype(h_dot, g.scalar_type(), op, "h_dot", "the branch tangent and its gate share a dtype");
  at::Tensor out = at::empty_like(x_dot);
  poison(out);
  if (use_cuda(x_dot, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(x_dot);
    check_launch(gated_jvp_cuda(x_dot.data_ptr<float>(), g.data_ptr(), row_stride(g), g_dot.data_ptr(),
                                row_stride(g_dot), h.data_ptr(), h_dot.data_ptr(), out.data_ptr<float>(), s, tm,
                                stream_), op);
#endif
  } else {
    gated_jvp_cpu(x_dot.data_ptr<float>(), g.data_ptr(), row_stride(g), g_dot.data_ptr(), row_stride(g_dot),
                  h.data_ptr(), h_dot.data_ptr(), out.data_ptr<float>(), s, tm);
  }
  return out;
}

std::vector<at::Tensor> gated_bwd(const at::Tensor& gout, const at::Tensor& g, const at::Tensor& h) {
  const char* op = "gated_bwd";
  const Shape s = check_x(gout, op, "gout");
  check_bwd_grid(gout, s, op);
  check_vec(g, gout, s, op, "g", "gout");
  check_rows(h, gout, op, "h", "gout");
  const DType tx = dtype_of(gout, op, "gout");
  const DType tm = dtype_of(g, op, "g");
  check_dtype(h, g.scalar_type(), op, "h", "the branch output and its gate share a dtype");
  at::Tensor gh = at::empty_like(h);
  at::Tensor gg = at::empty({s.N, s.D}, gout.options().dtype(g.scalar_type()));
  at::Tensor partial = at::empty({bwd_partial_floats(s, 1)}, gout.options().dtype(at::kFloat));
  poison(gh, gg, partial);
  if (use_cuda(gout, op)) {
#ifdef DUMO_WITH_CUDA
    DUMO_CUDA_CONTEXT(gout);
    check_launch(gated_bwd_cuda(gout.data_ptr(), g.data_ptr(), row_stride(g), h.data_ptr(), gh.data_ptr(),
                                gg.data_ptr(), partial.data_ptr<float>(), s, tx, tm, stream_), op);
#endif
  } else {
    gated_bwd_cpu(gout.data_ptr(), g.data_ptr(), row_stride(g), h.data_ptr(), gh.data_ptr(), gg.data_ptr(),
                  partial.data_ptr<float>(), s, tx, tm);
  }
  return {gh, gg};
}

int cuda_fast_path(int variant) {
#ifdef DUMO_WITH_CUDA
  DUMO_CHECK(variant == -1 || fast::valid_variant(variant),
             "dumo_engine._C.cuda_fast_path: variant must be -1 (query) or a base choice 0 (general kernels only), 1 "
             "(fast path, automatic), 2 (fast path, no preload) or 3 (fast path, preload), plus option bits 4 (wide "
             "JVP), 8 (planned backward tiles), 16 (two rows per pass in the LayerNorm backward), 32 (measure the "
             "candidates per shape and run the fastest), 64 (gated residual by rows), 128 (cache-streaming hints "
             "in the gated residual) and 256 (LayerNorm backward with a block of warps per row); got ",
             variant);
  return set_cuda_fast_path(variant);
#else
  DUMO_CHECK(false, "dumo_engine._C.cuda_fast_path: this build of dumo_engine._C has no CUDA kernels");
  return 0;
#endif
}

std::vector<TuneRecord> tuned_variants() {
#ifdef DUMO_WITH_CUDA
  return cuda_tuned();
#else
  DUMO_CHECK(false, "dumo_engine._C.cuda_tuned: this build of dumo_engine._C has no CUDA kernels");
  return {};
#endif
}

int reset_tuned_variants() {
#ifdef DUMO_WITH_CUDA
  return cuda_tune_reset();
#else
  DUMO_CHECK(false, "dumo_engine._C.cuda_tune_reset: this build of dumo_engine._C has no CUDA kernels");
  return 0;
#endif
}

std::vector<int64_t> bwd_tile_plan(int64_t N, int64_t T, int64_t slots) {
  DUMO_CHECK(N >= 0 && T >= 0, "dumo_engine._C.bwd_tile_plan: N and T must be >= 0; got N = ", N, ", T = ", T);
  const fast::TilePlan p = fast::bwd_tile_plan(N, T, slots);
  return {p.rows, p.tiles};
}

bool with_cuda() {
#ifdef DUMO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace dumo
