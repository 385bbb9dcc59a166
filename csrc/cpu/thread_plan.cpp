// The thread plan of the CPU kernels: see thread_plan.h.
#include "thread_plan.h"

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

namespace moram_cpu {

namespace {

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

// "512K", "1M", "32768K" -> bytes; 0 if unreadable
int64_t parse_size(const std::string& s) {
  if (s.empty()) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (v <= 0) return 0;
  const char u = end ? *end : '\0';
  return v * (u == 'K' ? 1024LL : u == 'M' ? 1024LL * 1024 : u == 'G' ? 1024LL * 1024 * 1024 : 1LL);
}

// "0-1", "0,64", "3" -> how many CPUs the list names
int count_cpus(const std::string& s) {
  int n = 0;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string part = s.substr(i, j - i);
    const size_t dash = part.find('-');
    if (!part.empty()) n += dash == std::string::npos ? 1 : std::atoi(part.c_str() + dash + 1) - std::atoi(part.c_str()) + 1;
    i = j + 1;
  }
  return std::max(n, 1);
}

Machine read_machine() {
  Machine m{0, static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)))};
  for (int i = 0; i < 8 && m.l2_bytes == 0; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    if (read_line(dir + "level") != "2" || read_line(dir + "type") == "Instruction") continue;
    const int64_t size = parse_size(read_line(dir + "size"));
    if (size > 0) m.l2_bytes = size / count_cpus(read_line(dir + "shared_cpu_list"));
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  if (m.l2_bytes == 0) m.l2_bytes = std::max(0L, sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
  if (m.l2_bytes <= 0) m.l2_bytes = int64_t{1} << 20;
  return m;
}

constexpr double kL2PerThread = 4.0;

int64_t env_grain() {
  const char* v = std::getenv("MORAM_CPU_GRAIN");
  if (v == nullptr || *v == '\0') return 0;
  const long long r = std::atoll(v);
  return r > 0 ? static_cast<int64_t>(r) : 0;
}

}  // namespace

const Machine& machine() {
  static const Machine m = read_machine();
  return m;
}

int plan_threads(double madds, double bytes, int max_threads, int64_t l2_bytes, int64_t grain) {
  const double cap = static_cast<double>(std::max(1, max_threads));
  double want;
  if (grain > 0) {
    want = std::floor(madds / static_cast<double>(grain));
  } else {
    // a thread streams at least kL2PerThread L2s: waking it costs µs on an idle machine and
    // a scheduler slice (ms) on a busy one, which streaming one L2 does not amortise
    want = std::max(std::floor(bytes / (kL2PerThread * static_cast<double>(std::max<int64_t>(l2_bytes, 1)))),
                    std::floor(madds / static_cast<double>(kComputeGrain)));
  }
  if (!(want >= 1.0)) return 1;  // NaN too
  return static_cast<int>(std::min(cap, want));
}

int threads_for(double madds, double bytes) {
  return plan_threads(madds, bytes, at::get_num_threads(), machine().l2_bytes, env_grain());
}

}  // namespace moram_cpu
