// Small device helpers shared by the MoRAM CUDA kernels: warp reductions, vector loads
// with fp32 conversion, two-segment row access and the running top-K of one warp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace moram_cuda {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxK = 2 * kWarp;  // the running top-K keeps two slots per lane

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// V contiguous elements read or written as one aligned access (the caller checks alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <int V, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Rows of two row-major segments of width ld, numbered globally, segment 0 first.
template <typename T>
struct Rows2 {
  const T* r0;
  const T* r1;
  int64_t n0;
  int64_t ld;
  __device__ __forceinline__ const T* row(int64_t id) const {
    return id < n0 ? r0 + id * ld : r1 + (id - n0) * ld;
  }
};

// Per-atom value scales of the two segments; a null pointer means 1.
struct Scale2 {
  const float* s0;
  const float* s1;
  int64_t n0;
  __device__ __forceinline__ float operator()(int64_t id) const {
    if (id < n0) return s0 ? s0[id] : 1.f;
    return s1 ? s1[id - n0] : 1.f;
  }
};

// The running top-K (K <= 64) of one warp, in registers: lane l holds slots l and l + 32.
// Every slot < K always holds a real atom id, so a NaN score can never leave an
// uninitialised id behind. Slots >= K hold +inf and are never the minimum of a finite set.
// `thr` (the K-th best score) and `thr_slot` are identical in every lane.
struct WarpTopK {
  float v0, v1;
  int i0, i1;
  float thr;
  int thr_slot;

  __device__ __forceinline__ void refresh(int lane) {
    float v = v0;
    int s = lane;
    if (v1 < v) {
      v = v1;
      s = lane + kWarp;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, v, o);
      const int os = __shfl_xor_sync(kFull, s, o);
      if (ov < v || (ov == v && os < s)) {
        v = ov;
        s = os;
      }
    }
    // NaN breaks the total order above; lane 0's answer keeps the warp uniform anyway.
    thr = __shfl_sync(kFull, v, 0);
    thr_slot = __shfl_sync(kFull, s, 0);
  }

  // Each lane offers one candidate (valid = false: none). Candidates that beat the
  // current K-th best are inserted one at a time; after each insertion the threshold
  // rises and the remaining candidates are tested again. On random data only about
  // K ln(N / K) insertions happen over a whole row, so most chunks cost one ballot.
  __device__ __forceinline__ void offer(float v, int id, bool valid, int lane) {
    unsigned want = __ballot_sync(kFull, valid && v > thr);
    while (want) {
      const int src = __ffs(want) - 1;
      want &= want - 1;
      const float cv = __shfl_sync(kFull, v, src);
      const int ci = __shfl_sync(kFull, id, src);
      if (thr_slot == lane) {
        v0 = cv;
        i0 = ci;
      } else if (thr_slot == lane + kWarp) {
        v1 = cv;
        i1 = ci;
      }
      refresh(lane);
      want &= __ballot_sync(kFull, valid && v > thr);
    }
  }
};

}  // namespace moram_cuda
