// Torch-facing declarations of the row-wise ops (implemented in rowwise.cpp, bound in bindings.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "rowwise.h"

namespace dumo {
std::vector<at::Tensor> ln_mod_fwd(const at::Tensor& x, const std::vector<at::Tensor>& shifts,
                                   const std::vector<at::Tensor>& scales, double eps);
at::Tensor ln_mod_jvp(const at::Tensor& x, const at::Tensor& x_dot, const at::Tensor& mean, const at::Tensor& rstd,
                      const at::Tensor& scale, const at::Tensor& shift_dot, const at::Tensor& scale_dot,
                      bool y_dot_f32);
std::vector<at::Tensor> ln_mod_bwd(const std::vector<at::Tensor>& gys, const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& rstd, const std::vector<at::Tensor>& scales);
at::Tensor gated_fwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& h);
at::Tensor gated_jvp(const at::Tensor& x_dot, const at::Tensor& g, const at::Tensor& g_dot, const at::Tensor& h,
                     const at::Tensor& h_dot);
std::vector<at::Tensor> gated_bwd(const at::Tensor& gout, const at::Tensor& g, const at::Tensor& h);
bool with_cuda();
int cuda_fast_path(int variant);
// The measurements of the tuned CUDA variant (csrc/rowwise_fast.h kTuned), one per key.
std::vector<TuneRecord> tuned_variants();
int reset_tuned_variants();
std::vector<int64_t> bwd_tile_plan(int64_t N, int64_t T, int64_t slots);
}  // namespace dumo
