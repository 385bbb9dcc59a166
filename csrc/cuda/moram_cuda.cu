// CUDA kernels of the moram_kernels_C ops (schemas in csrc/ops.cpp; contract in
// moram_kernels/reference.py). Two atom segments, numbered globally, segment 0 first.
//
// Forward, per tile of tokens (bounded [tile, N] fp32 scratch, never [T, N]):
//   1. scores p = x_tile @ keys^T in fp32 by cuBLAS (at::mm; fp16/bf16 inputs keep fp32 output),
//   2. select_topk_kernel: one block per token, each warp keeps a running top-K of its stripe
//      of atoms in registers plus the sum of squares, warp 0 merges the stripes and applies
//      norm, softmax / tau and the delta mask, giving the coefficient c = w * m * p * scale,
// then gather_rows_kernel: y[t] = sum_k c[t, k] * values[idx[t, k]] (vector loads, fp32 sums).
//
// Backward (docs/op.md, "Backward", delta mask as in reference.moram_bwd):
//   bwd_token_kernel: one warp per token, gc = scale * (values[idx] . gy), then the softmax and
//     norm terms, giving g_sel [T, K], the dB coefficient c [T, K] and alpha [T];
//   dx = sum_k g_sel * keys[idx] (gather_rows_kernel) - alpha * (x @ G), G = A^T A built in the
//     GEMM dtype (cuBLAS, fp32 accumulation), one GEMM for x @ G;
//   dB: pairs (t, k) sorted by atom id (stable), then one ordered sum per atom row: deterministic;
//   dA = gp^T @ x over token tiles, gp = -alpha * p + g_sel at the selected atoms.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "moram_cuda_kernels.cuh"

// fp16/bf16 x fp16/bf16 -> fp32 GEMMs (aten::mm.dtype) exist since torch 2.8; older torch
// upcasts the operands instead (same numbers, fp32 GEMM speed).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MORAM_HAVE_MM_OUT_DTYPE 1
#else
#define MORAM_HAVE_MM_OUT_DTYPE 0
#endif

namespace moram_cuda {

// Score scratch per tile: 2^26 fp32 = 256 MiB, e.g. 4096 tokens x 16384 atoms.
constexpr int64_t kScoreBudget = int64_t(1) << 26;
// Below this many tokens per tile, more warps per token keep the GPU busy (decode).
constexpr int64_t kFewTokens = 128;

// ---- host helpers -----------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t);
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// Calls f with std::integral_constant<int, kVec> when rows allow vector access, else with 1.
template <typename F>
void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Rows of width d are read kVec at a time when every row start is aligned for it.
template <typename T>
bool rows_vectorisable(const T* base, int64_t d) {
  return d % kVec == 0 && aligned(base, sizeof(T) * kVec);
}

// The dtype both GEMM operands take, the package's policy (moram_kernels/_precision.py):
// the lower precision of the two (fp16/bf16 below fp32; x's on an fp16/bf16 tie), so
// bf16 activations with fp32 atoms stay on tensor cores. fp32 operands follow
// torch.backends.cuda.matmul (TF32 when float32_matmul_precision is "high"). Products
// are accumulated and returned in fp32 (mm.dtype); without it, a torch too old for
// mm.dtype, every GEMM is fp32 (a build-time choice, stated here, not a runtime fallback).
at::ScalarType gemm_dtype(const at::Tensor& x, const at::Tensor& keys) {
  if (!MORAM_HAVE_MM_OUT_DTYPE) return at::kFloat;
  const auto xd = x.scalar_type(), kd = keys.scalar_type();
  if (xd == kd || kd == at::kFloat) return xd;
  if (xd == at::kFloat) return kd;
  return xd;  // fp16 with bf16: x's dtype
}

// p = a @ b^T in fp32, [rows(a), rows(b)]; a and b share a dtype (see gemm_dtype).
at::Tensor scores_fp32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b.t());
#if MORAM_HAVE_MM_OUT_DTYPE
  return at::mm(a, b.t(), at::kFloat);
#else
  return at::mm(a.to(at::kFloat), b.to(at::kFloat).t());
#endif
}

// x @ G in fp32, for the dense term of dx: one GEMM with G in x's dtype (tensor cores with
// fp32 accumulation and output for fp16/bf16; fp32 follows torch's TF32 setting).
at::Tensor x_times_gram(const at::Tensor& x, const at::Tensor& g) {
#if MORAM_HAVE_MM_OUT_DTYPE
  if (x.scalar_type() != at::kFloat) return at::mm(x, g, at::kFloat);
#endif
  return at::mm(x.to(at::kFloat), g.to(at::kFloat));
}

// G = A0^T A0 + A1^T A1 in the GEMM dtype `dt` (docs/op.md, "The dense normalisation term"):
// a given gram0 is cast to it (a no-op when MoRAMLinear cached it so), a missing one is one
// GEMM, and the second segment is one addmm on top (cuBLAS accumulates in fp32 and rounds
// once). Before, a trainable segment beside a bf16 gram0 built G in fp32 and then split it
// into two bf16 GEMMs for x @ G.
at::Tensor gram_in(const at::Tensor& keys0, const at::Tensor& keys1,
                   const std::optional<at::Tensor>& gram0, at::ScalarType dt) {
  at::Tensor g;
  if (gram0.has_value() && gram0->defined()) {
    g = gram0->to(dt);
  } else {
    const at::Tensor k0 = keys0.to(dt);
    g = at::mm(k0.t(), k0);
  }
  if (keys1.size(0)) {
    const at::Tensor k1 = keys1.to(dt);
    g = at::addmm(g, k1.t(), k1);
  }
  return g;
}

void check_cuda_2d(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, " (cuda): ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 2, op, " (cuda): ", name, " must be 2-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, " (cuda): ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

struct Segments {
  at::Tensor keys0, values0, keys1, values1;  // values of both segments in one dtype, contiguous
  at::Tensor scale0, scale1;                  // fp32 contiguous, or undefined (= 1)
  int64_t n0, n1, d_in, d_out;
};

at::Tensor checked_scale(const char* op, const char* name, const std::optional<at::Tensor>& s,
                         int64_t n, const at::Tensor& x) {
  if (!s.has_value() || !s->defined()) return at::Tensor();
  TORCH_CHECK(s->device() == x.device(), op, " (cuda): ", name, " is on ", s->device(),
              " but x is on ", x.device());
  TORCH_CHECK(s->dim() == 1 && s->size(0) == n, op, " (cuda): ", name, " must have shape [", n,
              "], got ", s->sizes());
  return s->to(at::kFloat).contiguous();
}

Segments check_segments(const char* op, const at::Tensor& x, const at::Tensor& keys0,
                        const at::Tensor& values0, const std::optional<at::Tensor>& scale0,
                        const at::Tensor& keys1, const at::Tensor& values1,
                        const std::optional<at::Tensor>& scale1) {
  check_cuda_2d(op, "x", x, x);
  check_cuda_2d(op, "keys0", keys0, x);
  check_cuda_2d(op, "values0", values0, x);
  check_cuda_2d(op, "keys1", keys1, x);
  check_cuda_2d(op, "values1", values1, x);
  Segments s;
  s.n0 = keys0.size(0);
  s.n1 = keys1.size(0);
  s.d_in = x.size(1);
  s.d_out = values0.size(1);
  TORCH_CHECK(keys0.size(1) == s.d_in, op, " (cuda): keys0 has d_in = ", keys0.size(1),
              " but x has d_in = ", s.d_in);
  TORCH_CHECK(keys1.size(1) == s.d_in, op, " (cuda): keys1 has d_in = ", keys1.size(1),
              " but x has d_in = ", s.d_in);
  TORCH_CHECK(values0.size(0) == s.n0, op, " (cuda): values0 has ", values0.size(0),
              " rows but keys0 has ", s.n0);
  TORCH_CHECK(values1.size(0) == s.n1, op, " (cuda): values1 has ", values1.size(0),
              " rows but keys1 has ", s.n1);
  TORCH_CHECK(values1.size(1) == s.d_out, op, " (cuda): values1 has d_out = ", values1.size(1),
              " but values0 has d_out = ", s.d_out);
  TORCH_CHECK(s.n0 + s.n1 >= 1, op, " (cuda): keys0 and keys1 hold no atoms");
  TORCH_CHECK(s.n0 + s.n1 < INT_MAX, op, " (cuda): at most ", INT_MAX - 1, " atoms, got ",
              s.n0 + s.n1);
  // One value dtype for the gathers; a mixed pair (unusual) converts the other segment.
  const auto vdt = s.n0 ? values0.scalar_type() : values1.scalar_type();
  s.keys0 = keys0.contiguous();
  s.keys1 = keys1.contiguous();
  s.values0 = values0.to(vdt).contiguous();
  s.values1 = values1.to(vdt).contiguous();
  s.scale0 = checked_scale(op, "scale0", scale0, s.n0, x);
  s.scale1 = checked_scale(op, "scale1", scale1, s.n1, x);
  return s;
}

Scale2 make_scale(const Segments& s) {
  return Scale2{s.scale0.defined() ? s.scale0.data_ptr<float>() : nullptr,
                s.scale1.defined() ? s.scale1.data_ptr<float>() : nullptr, s.n0};
}

// out[t] = sum_k coef[t, k] * rows(idx[t, k]) over two segments r0, r1 (same dtype).
void launch_gather(const at::Tensor& r0, const at::Tensor& r1, int64_t n0, const at::Tensor& idx,
                   const at::Tensor& coef, at::Tensor& out, cudaStream_t stream) {
  const int64_t T = idx.size(0), K = idx.size(1), d = out.size(1);
  if (T == 0 || d == 0) return;
  dispatch_float(r0.scalar_type(), "values/keys", [&](auto row_tag) {
    using RowT = decltype(row_tag);
    dispatch_float(out.scalar_type(), "output", [&](auto out_tag) {
      using OutT = decltype(out_tag);
      const Rows2<RowT> rows{ptr_or_null<RowT>(r0), ptr_or_null<RowT>(r1), n0, d};
      OutT* o = out.data_ptr<OutT>();
      const bool vec = rows_vectorisable(rows.r0, d) && rows_vectorisable(rows.r1, d) &&
                       rows_vectorisable(o, d);
      const int v = vec ? kVec : 1;
      const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(ceil_div(d, kRowThreads * v)));
      with_vec(vec, [&](auto vt) {
        gather_rows_kernel<RowT, OutT, decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(
            rows, idx.data_ptr<int64_t>(), coef.data_ptr<float>(), static_cast<int>(K), d, o);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---- the ops ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moram_fwd_cuda(
    const at::Tensor& x, const at::Tensor& keys0, const at::Tensor& values0,
    const std::optional<at::Tensor>& scale0, const at::Tensor& keys1, const at::Tensor& values1,
    const std::optional<at::Tensor>& scale1, int64_t k, double tau, double delta, double eps) {
  const char* op = "moram_fwd";
  const Segments s = check_segments(op, x, keys0, values0, scale0, keys1, values1, scale1);
  const int64_t n = s.n0 + s.n1;
  TORCH_CHECK(k >= 1 && k <= kMaxK, op, " (cuda): k must be in [1, ", kMaxK, "], got ", k,
              " (use the triton or reference backend for larger K)");
  TORCH_CHECK(k <= n, op, " (cuda): k = ", k, " exceeds the number of atoms N = ", n);
  TORCH_CHECK(tau > 0, op, " (cuda): tau must be > 0, got ", tau);
  TORCH_CHECK(eps > 0, op, " (cuda): eps must be > 0, got ", eps);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({T, s.d_out}, x.options());
  at::Tensor idx = at::empty({T, k}, x.options().dtype(at::kLong));
  at::Tensor p_sel = at::empty({T, k}, f32);
  at::Tensor norm = at::empty({T}, f32);
  at::Tensor coef = at::empty({T, k}, f32);
  if (T == 0) return {y, idx, p_sel, norm};

  // Keys in their GEMM dtype once per call (a no-op unless x and keys dtypes differ).
  const at::Tensor k0 = s.keys0.to(gemm_dtype(x, s.keys0));
  const at::Tensor k1 = s.keys1.to(gemm_dtype(x, s.keys1));
  const Scale2 scale = make_scale(s);
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(T, kScoreBudget / n));
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t tt = std::min(tile, T - t0);
    const at::Tensor xt = x.narrow(0, t0, tt);
    const at::Tensor p0 = s.n0 ? scores_fp32(xt.to(k0.scalar_type()), k0) : at::Tensor();
    const at::Tensor p1 = s.n1 ? scores_fp32(xt.to(k1.scalar_type()), k1) : at::Tensor();
    const auto launch = [&](auto warps) {
      constexpr int W = decltype(warps)::value;
      select_topk_kernel<W><<<static_cast<unsigned>(tt), W * kWarp, 0, stream>>>(
          s.n0 ? p0.data_ptr<float>() : nullptr, s.n1 ? p1.data_ptr<float>() : nullptr,
          static_cast<int>(s.n0), static_cast<int>(s.n1), static_cast<int>(k),
          static_cast<float>(tau), static_cast<float>(delta), static_cast<float>(eps), scale,
          idx.data_ptr<int64_t>() + t0 * k, p_sel.data_ptr<float>() + t0 * k,
          norm.data_ptr<float>() + t0, coef.data_ptr<float>() + t0 * k);
    };
    if (tt < kFewTokens) {
      launch(std::integral_constant<int, kTopkWarpsFew>{});
    } else {
      launch(std::integral_constant<int, kTopkWarps>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_gather(s.values0, s.values1, s.n0, idx, coef, y, stream);
  return {y, idx, p_sel, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moram_bwd_cuda(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& keys0, const at::Tensor& values0,
    const std::optional<at::Tensor>& scale0, const at::Tensor& keys1, const at::Tensor& values1,
    const std::optional<at::Tensor>& scale1, const std::optional<at::Tensor>& gram0,
    const at::Tensor& idx_in, const at::Tensor& p_sel_in, const at::Tensor& norm_in, double tau,
    double delta, double eps, bool need_x, bool need_seg0, bool need_seg1) {
  const char* op = "moram_bwd";
  const Segments s = check_segments(op, x, keys0, values0, scale0, keys1, values1, scale1);
  const int64_t T = x.size(0);
  check_cuda_2d(op, "gy", gy, x);
  TORCH_CHECK(gy.size(0) == T && gy.size(1) == s.d_out, op, " (cuda): gy must have shape [", T,
              ", ", s.d_out, "], got ", gy.sizes());
  TORCH_CHECK(idx_in.is_cuda() && idx_in.device() == x.device() && idx_in.dim() == 2 &&
                  idx_in.size(0) == T && idx_in.scalar_type() == at::kLong,
              op, " (cuda): idx must be an int64 [T, K] tensor on x's device, got ",
              idx_in.scalar_type(), " ", idx_in.sizes(), " on ", idx_in.device());
  const int64_t K = idx_in.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxK, op, " (cuda): idx must have 1 to ", kMaxK,
              " columns, got ", K);
  TORCH_CHECK(p_sel_in.device() == x.device() && p_sel_in.sizes() == idx_in.sizes(), op,
              " (cuda): p_sel must have shape ", idx_in.sizes(), " on x's device, got ",
              p_sel_in.sizes(), " on ", p_sel_in.device());
  TORCH_CHECK(norm_in.device() == x.device() && norm_in.dim() == 1 && norm_in.size(0) == T, op,
              " (cuda): norm must have shape [", T, "] on x's device, got ", norm_in.sizes(),
              " on ", norm_in.device());
  TORCH_CHECK(tau > 0, op, " (cuda): tau must be > 0, got ", tau);
  if (gram0.has_value() && gram0->defined()) {
    TORCH_CHECK(gram0->device() == x.device() && gram0->dim() == 2 &&
                    gram0->size(0) == s.d_in && gram0->size(1) == s.d_in,
                op, " (cuda): gram0 must have shape [", s.d_in, ", ", s.d_in,
                "] on x's device, got ", gram0->sizes(), " on ", gram0->device());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  // an unneeded gradient is an empty tensor (the schema returns Tensor, not Tensor?)
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = none(), gk0 = none(), gv0 = none(), gk1 = none(), gv1 = none();
  if (T == 0 || !(need_x || need_seg0 || need_seg1)) return {gx, gk0, gv0, gk1, gv1};

  const at::Tensor gyc = gy.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const at::Tensor p_sel = p_sel_in.to(at::kFloat).contiguous();
  const at::Tensor norm = norm_in.to(at::kFloat).contiguous();
  const Scale2 scale = make_scale(s);
  at::Tensor g_sel = at::empty({T, K}, f32);
  at::Tensor coef_b = at::empty({T, K}, f32);
  at::Tensor alpha = at::empty({T}, f32);

  dispatch_float(s.values0.scalar_type(), "values", [&](auto row_tag) {
    using RowT = decltype(row_tag);
    dispatch_float(gyc.scalar_type(), "gy", [&](auto gy_tag) {
      using GyT = decltype(gy_tag);
      const Rows2<RowT> rows{ptr_or_null<RowT>(s.values0), ptr_or_null<RowT>(s.values1), s.n0,
                             s.d_out};
      const GyT* g = gyc.data_ptr<GyT>();
      const bool vec = rows_vectorisable(rows.r0, s.d_out) &&
                       rows_vectorisable(rows.r1, s.d_out) && rows_vectorisable(g, s.d_out);
      const unsigned blocks = static_cast<unsigned>(ceil_div(T, kTokenWarps));
      with_vec(vec, [&](auto vt) {
        bwd_token_kernel<RowT, GyT, decltype(vt)::value><<<blocks, kTokenWarps * kWarp, 0, stream>>>(
            rows, scale, g, T, static_cast<int>(K), s.d_out, idx.data_ptr<int64_t>(),
            p_sel.data_ptr<float>(), norm.data_ptr<float>(), static_cast<float>(tau),
            static_cast<float>(delta), static_cast<float>(eps), g_sel.data_ptr<float>(),
            coef_b.data_ptr<float>(), alpha.data_ptr<float>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  if (need_x) {
    // Sparse part sum_k g_sel a_k, then the dense normalisation term -alpha * (x @ G).
    at::Tensor sparse = at::empty({T, s.d_in}, f32);
    const auto kdt = s.n0 ? s.keys0.scalar_type() : s.keys1.scalar_type();
    launch_gather(s.keys0.to(kdt), s.keys1.to(kdt), s.n0, idx, g_sel, sparse, stream);
    // x and G in the GEMM dtype of the policy (the lower of x's and the keys')
    const at::Tensor xg = x.to(gemm_dtype(x, s.n0 ? s.keys0 : s.keys1));
    const at::Tensor g = gram_in(s.keys0, s.keys1, gram0, xg.scalar_type());
    sparse.sub_(x_times_gram(xg, g).mul_(alpha.unsqueeze(1)));
    gx = sparse.to(x.scalar_type());
  }

  if (need_seg0 || need_seg1) {
    // Pairs (t, k) stably sorted by atom id: each atom's pairs are one run, in token order.
    const auto sorted = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted_ids = std::get<0>(sorted);
    const at::Tensor order = std::get<1>(sorted).contiguous();
    at::Tensor x32;  // fp32 copy of x, made only if an fp32 dA GEMM needs it
    for (int seg = 0; seg < 2; ++seg) {
      if (!(seg == 0 ? need_seg0 : need_seg1)) continue;
      const int64_t lo = seg == 0 ? 0 : s.n0;
      const int64_t n_s = seg == 0 ? s.n0 : s.n1;
      const at::Tensor& keys_s = seg == 0 ? keys0 : keys1;
      const at::Tensor& values_s = seg == 0 ? values0 : values1;

      // dB over the segment's rows, in the values' own dtype.
      at::Tensor gv = at::empty({n_s, s.d_out}, values_s.options());
      if (n_s && s.d_out) {
        const at::Tensor start =
            at::searchsorted(sorted_ids, at::arange(lo, lo + n_s + 1, idx.options()));
        dispatch_float(gyc.scalar_type(), "gy", [&](auto gy_tag) {
          using GyT = decltype(gy_tag);
          dispatch_float(gv.scalar_type(), "values", [&](auto out_tag) {
            using OutT = decltype(out_tag);
            const GyT* g = gyc.data_ptr<GyT>();
            OutT* o = gv.data_ptr<OutT>();
            const bool vec = rows_vectorisable(g, s.d_out) && rows_vectorisable(o, s.d_out);
            const int v = vec ? kVec : 1;
            const dim3 grid(static_cast<unsigned>(n_s),
                            static_cast<unsigned>(ceil_div(s.d_out, kRowThreads * v)));
            with_vec(vec, [&](auto vt) {
              scatter_rows_kernel<GyT, OutT, decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(
                  g, order.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                  coef_b.data_ptr<float>(), static_cast<int>(K), s.d_out, o);
            });
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      }

      // dA = gp^T @ x with gp = -alpha * p + g_sel at the selected atoms: every atom of the
      // segment gets the dense term. Token tiles bound the [tile, n_s] scratch.
      at::Tensor gk32 = at::zeros({n_s, s.d_in}, f32);
      if (n_s) {
        const at::Tensor ks = (seg == 0 ? s.keys0 : s.keys1);
        const at::Tensor kg = ks.to(gemm_dtype(x, ks));
        const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(T, kScoreBudget / n_s));
        for (int64_t t0 = 0; t0 < T; t0 += tile) {
          const int64_t tt = std::min(tile, T - t0);
          at::Tensor gp = scores_fp32(x.narrow(0, t0, tt).to(kg.scalar_type()), kg);
          gp.mul_(alpha.narrow(0, t0, tt).neg().unsqueeze(1));
          const int64_t pairs = tt * K;
          add_selected_kernel<<<static_cast<unsigned>(ceil_div(pairs, 256)), 256, 0, stream>>>(
              gp.data_ptr<float>(), pairs, n_s, idx.data_ptr<int64_t>() + t0 * K,
              g_sel.data_ptr<float>() + t0 * K, static_cast<int>(K), lo);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
#if MORAM_HAVE_MM_OUT_DTYPE
          if (kg.scalar_type() != at::kFloat) {  // 16-bit policy: tensor cores, fp32 out
            const auto low = kg.scalar_type();
            gk32.add_(at::mm(gp.t().to(low), x.narrow(0, t0, tt).to(low), at::kFloat));
            continue;
          }
#endif
          if (!x32.defined()) x32 = x.to(at::kFloat);
          gk32.addmm_(gp.t(), x32.narrow(0, t0, tt));
        }
      }
      at::Tensor gk = gk32.to(keys_s.scalar_type());
      if (seg == 0) {
        gk0 = gk;
        gv0 = gv;
      } else {
        gk1 = gk;
        gv1 = gv;
      }
    }
  }
  return {gx, gk0, gv0, gk1, gv1};
}

}  // namespace moram_cuda

TORCH_LIBRARY_IMPL(moram_kernels_C, CUDA, m) {
  m.impl("moram_fwd", TORCH_FN(moram_cuda::moram_fwd_cuda));
  m.impl("moram_bwd", TORCH_FN(moram_cuda::moram_bwd_cuda));
}
