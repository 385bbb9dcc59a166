// Every op schema of the extension, once, and the Python module: its probes and the eager
// entry (csrc/eager.cpp). Kernels register per device in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA). The contract of both ops is the one of
// moram_kernels/backends/reference.py: two atom segments numbered globally, segment 0 first.
#include <torch/extension.h>

#include "eager.h"
#ifdef MORAM_WITH_CPU
#include "cpu/thread_plan.h"
#endif

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
at::Tensor store_rows(const at::Tensor& src, const std::string& dtype);  // csrc/cpu/moram_cpu.cpp
at::Tensor gather_rows(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& coef);  // the same
std::tuple<at::Tensor, at::Tensor> pass_above(const at::Tensor& row, double floor, const std::string& road);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cpu", &has_cpu, "whether CPU kernels are compiled in");
  m.def("has_cuda", &has_cuda, "whether CUDA kernels are compiled in");
#ifdef MORAM_WITH_CPU
  m.def("cpu_lowp_road", &moram_cpu::lowp_road,
        "the road of the CPU GEMMs for 'bfloat16'/'float16' inputs now: 'native' or 'fp32' (MORAM_CPU_LOWP)");
  m.def("cpu_store_rows", &moram_cpu::store_rows,
        "fp32 rows written into a new 'bfloat16'/'float16'/'float32' tensor by the CPU kernels' row store (tests)");
  m.def("cpu_gather_rows", &moram_cpu::gather_rows,
        "sum_i coef[i] * values[ids[i]] in fp32 through the CPU kernels' gather of value rows (tests)");
  m.def("cpu_pass_above", &moram_cpu::pass_above,
        "(scores, places) of a row's scores above floor, packed by the top-K's 'portable' or 'avx2' pass (tests)");
#endif
  m.def("eager", &moram_eager::eager, "the MoRAM delta with its autograd node, for eager calls on the cpu/cuda backends",
        py::call_guard<py::gil_scoped_release>());
#ifdef MORAM_WITH_CPU
  // The CPU kernels' thread plan (csrc/cpu/thread_plan.h), for tests and docs: arguments
  // left at -1 take this machine's value (torch's thread count, L2 per core, MORAM_CPU_GRAIN).
  m.def(
      "cpu_thread_plan",
      [](double madds, double bytes, int max_threads, int64_t l2_bytes, int64_t grain) {
        if (max_threads < 0 && l2_bytes < 0 && grain < 0) return moram_cpu::threads_for(madds, bytes);
        const int mt = max_threads >= 0 ? max_threads : at::get_num_threads();
        const int64_t l2 = l2_bytes >= 0 ? l2_bytes : moram_cpu::machine().l2_bytes;
        return moram_cpu::plan_threads(madds, bytes, mt, l2, std::max<int64_t>(grain, 0));
      },
      "threads a CPU kernel call wakes for (multiply-adds, bytes streamed)", py::arg("madds"), py::arg("bytes"),
      py::arg("max_threads") = -1, py::arg("l2_bytes") = -1, py::arg("grain") = -1);
  m.def(
      "cpu_machine", [] { return std::make_tuple(moram_cpu::machine().l2_bytes, moram_cpu::machine().cores); },
      "(L2 bytes per core, cores) as the CPU kernels' thread plan reads them, once");
#endif
}
