// The eager entry of the extension (csrc/eager.cpp), bound to Python in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace moram_eager {

// (y [..., d_out], idx [T, K]): checks the arguments, runs moram_kernels_C::moram_fwd and
// records one autograd node whose backward runs moram_kernels_C::moram_bwd. The caller
// (moram_kernels/eager.py) has checked that N >= 1 and T >= 1, that every tensor has x's
// dtype, and that the cpu or cuda backend takes them. keys1/values1 None: no second segment.
std::tuple<at::Tensor, at::Tensor> eager(const at::Tensor& x, const at::Tensor& keys0, const at::Tensor& values0,
                                         const c10::optional<at::Tensor>& scale0,
                                         const c10::optional<at::Tensor>& keys1,
                                         const c10::optional<at::Tensor>& values1,
                                         const c10::optional<at::Tensor>& scale1,
                                         const c10::optional<at::Tensor>& gram0, int64_t k, double tau, double delta,
                                         double eps);

}  // namespace moram_eager
