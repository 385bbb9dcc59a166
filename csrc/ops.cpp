// Every op schema of the extension, once, and the Python module: its probes and the eager
// entry (csrc/eager.cpp). Kernels register per device in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA). The contract of both ops is the one of
// moram_kernels/backends/reference.py: two atom segments numbered globally, segment 0 first.
#include <torch/extension.h>

#include "eager.h"

TORCH_LIBRARY(moram_kernels_C, m) {
  m.def(
      "moram_fwd(Tensor x, Tensor keys0, Tensor values0, Tensor? scale0, Tensor keys1, "
      "Tensor values1, Tensor? scale1, int k, float tau, float delta, float eps) "
      "-> (Tensor y, Tensor idx, Tensor p_sel, Tensor norm)");
  m.def(
      "moram_bwd(Tensor gy, Tensor x, Tensor keys0, Tensor values0, Tensor? scale0, "
      "Tensor keys1, Tensor values1, Tensor? scale1, Tensor? gram0, Tensor idx, "
      "Tensor p_sel, Tensor norm, float tau, float delta, float eps, bool need_x, "
      "bool need_seg0, bool need_seg1) "
      "-> (Tensor gx, Tensor gkeys0, Tensor gvalues0, Tensor gkeys1, Tensor gvalues1)");
}

namespace {

// Which device kernels this build carries (setup.py defines the macros).
bool has_cpu() {
#ifdef MORAM_WITH_CPU
  return true;
#else
  return false;
#endif
}

bool has_cuda() {
#ifdef MORAM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

#ifdef MORAM_WITH_CPU
namespace moram_cpu {
std::string lowp_road(const std::string& dtype);  // csrc/cpu/moram_cpu.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cpu", &has_cpu, "whether CPU kernels are compiled in");
  m.def("has_cuda", &has_cuda, "whether CUDA kernels are compiled in");
#ifdef MORAM_WITH_CPU
  m.def("cpu_lowp_road", &moram_cpu::lowp_road,
        "the road of the CPU GEMMs for 'bfloat16'/'float16' inputs now: 'native' or 'fp32' (MORAM_CPU_LOWP)");
#endif
  m.def("eager", &moram_eager::eager, "the MoRAM delta with its autograd node, for eager calls on the cpu/cuda backends",
        py::call_guard<py::gil_scoped_release>());
}
