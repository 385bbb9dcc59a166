// How many threads a CPU kernel call wakes (csrc/cpu/thread_plan.cpp), from the bytes it
// streams, the multiply-adds it does and the machine; bound to Python as
// moram_kernels._C.cpu_thread_plan / cpu_machine for the tests and the docs.
#pragma once

#include <cstdint>
#include <tuple>

namespace moram_cpu {

// Multiply-adds one more thread must get when the call is bound by compute, not by bytes:
// 2^20, some tens of µs on one AVX2 core, against a wake-up of a few µs on an idle machine.
constexpr int64_t kComputeGrain = int64_t{1} << 20;

// The machine, read once: the L2 bytes one core has to itself (its L2 over the logical
// CPUs sharing it; from sysfs, else sysconf, else 1 MiB) and the usable cores.
struct Machine {
  int64_t l2_bytes;
  int cores;
};
const Machine& machine();

// The plan itself, a pure function: with `grain` > 0 (MORAM_CPU_GRAIN set) one thread per
// `grain` multiply-adds; otherwise one per four `l2_bytes` streamed or per kComputeGrain
// multiply-adds, whichever asks for more. Always in [1, max_threads]: a call that streams
// less than a few L2s and computes for a few µs wakes nobody.
int plan_threads(double madds, double bytes, int max_threads, int64_t l2_bytes, int64_t grain);

// plan_threads with this machine's L2, torch's intra-op thread count and MORAM_CPU_GRAIN
// (read on every call, 0 when unset).
int threads_for(double madds, double bytes);

}  // namespace moram_cpu
