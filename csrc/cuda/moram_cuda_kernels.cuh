// The device kernels of the MoRAM CUDA backend (host side in moram_cuda.cu). They depend
// only on c10's Half/BFloat16, so they can be compiled and inspected on their own.
#pragma once

#include "moram_cuda_utils.cuh"

namespace moram_cuda {

// select_topk_kernel runs kTopkWarps warps per token, or kTopkWarpsFew when the tile has
// few tokens (decode), so that one token's atoms spread over more of the GPU.
constexpr int kTopkWarps = 8;
constexpr int kTopkWarpsFew = 32;
constexpr int kTopkUnroll = 4;    // score chunks in flight per lane
constexpr int kRowThreads = 128;  // threads per block of the row kernels
constexpr int kTokenWarps = 4;    // tokens per block of bwd_token_kernel
constexpr int kVec = 8;           // elements per vector access when rows allow it

// ---- kernels ----------------------------------------------------------------------------

__device__ __forceinline__ float score_at(const float* q0, const float* q1, int n0, int j) {
  return j < n0 ? q0[j] : q1[j - n0];
}

// One block of W warps per token of the tile. Scores p0 [tile, n0] and p1 [tile, n1] (fp32,
// row-major); outputs are already offset to the tile's first token.
template <int W>
__global__ void __launch_bounds__(W * kWarp)
select_topk_kernel(const float* __restrict__ p0, const float* __restrict__ p1, int n0, int n1,
                   int K, float tau, float delta, float eps, Scale2 scale,
                   int64_t* __restrict__ idx_out, float* __restrict__ psel_out,
                   float* __restrict__ norm_out, float* __restrict__ coef_out) {
  __shared__ float cand_v[W][kMaxK];
  __shared__ int cand_i[W][kMaxK];
  __shared__ float part_ss[W];

  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int n = n0 + n1;
  const float* q0 = n0 ? p0 + t * n0 : nullptr;
  const float* q1 = n1 ? p1 + t * n1 : nullptr;
  // Every active warp gets a stripe of at least K atoms, so its K slots fill with real ids.
  const int n_warps = min(W, n / K);

  float ss = 0.f;
  WarpTopK top;
  if (warp < n_warps) {
    const int lo = static_cast<int>(static_cast<int64_t>(n) * warp / n_warps);
    const int hi = static_cast<int>(static_cast<int64_t>(n) * (warp + 1) / n_warps);
    top.v0 = top.v1 = INFINITY;
    top.i0 = top.i1 = lo;
    if (lane < K) {
      top.v0 = score_at(q0, q1, n0, lo + lane);
      top.i0 = lo + lane;
      ss += top.v0 * top.v0;
    }
    if (lane + kWarp < K) {
      top.v1 = score_at(q0, q1, n0, lo + lane + kWarp);
      top.i1 = lo + lane + kWarp;
      ss += top.v1 * top.v1;
    }
    top.refresh(lane);
    for (int j0 = lo + K; j0 < hi; j0 += kWarp * kTopkUnroll) {
      float v[kTopkUnroll];
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const int j = j0 + u * kWarp + lane;
        v[u] = j < hi ? score_at(q0, q1, n0, j) : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const int j = j0 + u * kWarp + lane;
        const bool ok = j < hi;
        if (ok) ss += v[u] * v[u];
        top.offer(v[u], j, ok, lane);
      }
    }
    cand_v[warp][lane] = top.v0;
    cand_i[warp][lane] = top.i0;
    cand_v[warp][lane + kWarp] = top.v1;
    cand_i[warp][lane + kWarp] = top.i1;
  }
  ss = warp_sum(ss);
  if (lane == 0) part_ss[warp] = ss;
  __syncthreads();
  if (warp != 0) return;

  for (int w = 1; w < n_warps; ++w) {
    for (int base = 0; base < K; base += kWarp) {
      const int s = base + lane;
      const bool ok = s < K;
      top.offer(ok ? cand_v[w][s] : -INFINITY, ok ? cand_i[w][s] : 0, ok, lane);
    }
  }
  float total = 0.f;
  for (int w = 0; w < W; ++w) total += part_ss[w];

  // Epilogue on the K kept scores: n = max(||p||, eps) (NaN stays NaN, as in torch),
  // s = p / n, w = softmax(s / tau) over the K, mask s >= delta when delta > 0.
  float nrm = sqrtf(total);
  nrm = nrm < eps ? eps : nrm;
  const bool ok0 = lane < K, ok1 = lane + kWarp < K;
  const float s0 = top.v0 / nrm, s1 = top.v1 / nrm;
  const float smax = warp_max(fmaxf(ok0 ? s0 : -INFINITY, ok1 ? s1 : -INFINITY));
  const float e0 = ok0 ? expf((s0 - smax) / tau) : 0.f;
  const float e1 = ok1 ? expf((s1 - smax) / tau) : 0.f;
  const float z = warp_sum(e0 + e1);
  const int64_t row = t * K;
  if (ok0) {
    const float m = (delta > 0.f && !(s0 >= delta)) ? 0.f : 1.f;
    idx_out[row + lane] = top.i0;
    psel_out[row + lane] = top.v0;
    coef_out[row + lane] = (e0 / z) * m * top.v0 * scale(top.i0);
  }
  if (ok1) {
    const float m = (delta > 0.f && !(s1 >= delta)) ? 0.f : 1.f;
    idx_out[row + lane + kWarp] = top.i1;
    psel_out[row + lane + kWarp] = top.v1;
    coef_out[row + lane + kWarp] = (e1 / z) * m * top.v1 * scale(top.i1);
  }
  if (lane == 0) norm_out[t] = nrm;
}

// out[t, :] = sum_k coef[t, k] * rows(idx[t, k])[:], fp32 sums. blockIdx.x is the token,
// blockIdx.y a chunk of kRowThreads * V columns; each thread owns V contiguous columns.
template <typename RowT, typename OutT, int V>
__global__ void __launch_bounds__(kRowThreads)
gather_rows_kernel(Rows2<RowT> rows, const int64_t* __restrict__ idx,
                   const float* __restrict__ coef, int K, int64_t d, OutT* __restrict__ out) {
  __shared__ float s_coef[kMaxK];
  __shared__ int64_t s_idx[kMaxK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < K) {
    s_coef[threadIdx.x] = coef[t * K + threadIdx.x];
    s_idx[threadIdx.x] = idx[t * K + threadIdx.x];
  }
  __syncthreads();
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kRowThreads + threadIdx.x) * V;
  if (col >= d) return;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  for (int k = 0; k < K; ++k) {
    const float c = s_coef[k];
    if (c == 0.f) continue;  // masked by delta (or a zero score): the row adds nothing
    float r[V];
    load_f32<V>(rows.row(s_idx[k]) + col, r);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += c * r[i];
  }
  store_f32<V>(out + t * d + col, acc);
}

// One warp per token: gc_k = scale_k * (values[idx_k] . gy) for its K atoms, then
//   gw = m p gc,  gs = (w / tau) (gw - sum_l w_l gw_l),  g_sel = w m gc + gs / n,
//   alpha = (sum gs p) / n^3 (0 where n was clamped),  c_B = w m p scale.
template <typename RowT, typename GyT, int V>
__global__ void __launch_bounds__(kTokenWarps * kWarp)
bwd_token_kernel(Rows2<RowT> values, Scale2 scale, const GyT* __restrict__ gy, int64_t T, int K,
                 int64_t d_out, const int64_t* __restrict__ idx, const float* __restrict__ p_sel,
                 const float* __restrict__ norm, float tau, float delta, float eps,
                 float* __restrict__ g_sel, float* __restrict__ coef_b, float* __restrict__ alpha) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokenWarps + threadIdx.x / kWarp;
  if (t >= T) return;  // the whole warp leaves together
  const int64_t row = t * K;
  const GyT* g = gy + t * d_out;

  float dot0 = 0.f, dot1 = 0.f;
  for (int k = 0; k < K; ++k) {
    const RowT* b = values.row(idx[row + k]);
    float part = 0.f;
    for (int64_t col = static_cast<int64_t>(lane) * V; col < d_out; col += kWarp * V) {
      float rb[V], rg[V];
      load_f32<V>(b + col, rb);
      load_f32<V>(g + col, rg);
#pragma unroll
      for (int i = 0; i < V; ++i) part += rb[i] * rg[i];
    }
    part = warp_sum(part);
    if (k == lane) dot0 = part;
    if (k == lane + kWarp) dot1 = part;
  }

  const bool ok0 = lane < K, ok1 = lane + kWarp < K;
  const float n = norm[t];
  // Reciprocals instead of one IEEE division per use: each division is a call to a
  // slow-path subroutine, and the calls made ptxas spill on sm_80.
  const float inv_n = 1.f / n, inv_tau = 1.f / tau;
  const float p0 = ok0 ? p_sel[row + lane] : 0.f;
  const float p1 = ok1 ? p_sel[row + lane + kWarp] : 0.f;
  const int64_t id0 = ok0 ? idx[row + lane] : 0;
  const int64_t id1 = ok1 ? idx[row + lane + kWarp] : 0;
  const float sc0 = ok0 ? scale(id0) : 0.f, sc1 = ok1 ? scale(id1) : 0.f;
  const float s0 = p0 * inv_n, s1 = p1 * inv_n;
  const float smax = warp_max(fmaxf(ok0 ? s0 : -INFINITY, ok1 ? s1 : -INFINITY));
  const float e0 = ok0 ? expf((s0 - smax) * inv_tau) : 0.f;
  const float e1 = ok1 ? expf((s1 - smax) * inv_tau) : 0.f;
  const float inv_z = 1.f / warp_sum(e0 + e1);
  const float w0 = e0 * inv_z, w1 = e1 * inv_z;
  const float m0 = (delta > 0.f && !(s0 >= delta)) ? 0.f : 1.f;
  const float m1 = (delta > 0.f && !(s1 >= delta)) ? 0.f : 1.f;
  const float gc0 = sc0 * dot0, gc1 = sc1 * dot1;
  const float gw0 = m0 * p0 * gc0, gw1 = m1 * p1 * gc1;
  const float wgw = warp_sum(w0 * gw0 + w1 * gw1);
  const float gs0 = w0 * inv_tau * (gw0 - wgw), gs1 = w1 * inv_tau * (gw1 - wgw);
  float a = warp_sum(gs0 * p0 + gs1 * p1) * (inv_n * inv_n * inv_n);
  // n = max(||p||, eps) is constant where it was clamped: no norm gradient there.
  if (!(n > eps)) a = 0.f;
  if (ok0) {
    g_sel[row + lane] = w0 * m0 * gc0 + gs0 * inv_n;
    coef_b[row + lane] = w0 * m0 * p0 * sc0;
  }
  if (ok1) {
    g_sel[row + lane + kWarp] = w1 * m1 * gc1 + gs1 * inv_n;
    coef_b[row + lane + kWarp] = w1 * m1 * p1 * sc1;
  }
  if (lane == 0) alpha[t] = a;
}

// gB[j, :] = sum of coef_b[q] * gy[q / K, :] over the pairs q = t * K + k that selected
// atom j, taken in the order of `order` (pairs stably sorted by atom id, segment rows
// start[j] .. start[j + 1]): a fixed summation order, so the result is deterministic.
template <typename GyT, typename OutT, int V>
__global__ void __launch_bounds__(kRowThreads)
scatter_rows_kernel(const GyT* __restrict__ gy, const int64_t* __restrict__ order,
                    const int64_t* __restrict__ start, const float* __restrict__ coef_b, int K,
                    int64_t d, OutT* __restrict__ out) {
  const int64_t j = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kRowThreads + threadIdx.x) * V;
  if (col >= d) return;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  const int64_t q_end = start[j + 1];
  for (int64_t q = start[j]; q < q_end; ++q) {
    const int64_t pair = order[q];
    const float c = coef_b[pair];
    if (c == 0.f) continue;
    float r[V];
    load_f32<V>(gy + (pair / K) * d + col, r);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += c * r[i];
  }
  store_f32<V>(out + j * d + col, acc);
}

// gp[t, idx[t, k] - lo] += g_sel[t, k] for the selected atoms inside the segment
// [lo, lo + n_s). The K ids of a token are distinct, so no two threads share an element.
__global__ void add_selected_kernel(float* __restrict__ gp, int64_t pairs, int64_t n_s,
                                    const int64_t* __restrict__ idx,
                                    const float* __restrict__ g_sel, int K, int64_t lo) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= pairs) return;
  const int64_t j = idx[q] - lo;
  if (j >= 0 && j < n_s) gp[(q / K) * n_s + j] += g_sel[q];
}

}  // namespace moram_cuda
