// CPU kernels of moram_kernels_C::moram_fwd / moram_bwd (schemas in csrc/ops.cpp).
//
// Contract: moram_kernels/backends/reference.py and docs/op.md (two atom segments, global ids, segment 0 first).
// Scores, norms, softmax and every accumulation are fp32 whatever the input dtypes.
// bf16/fp16 inputs take one of two roads for their GEMMs (see "low-precision GEMMs" below).
//
// Forward, per (block of tokens x group of atom tiles):
//   S = x_blk @ keys_tileᵀ     BLAS (at::mm_out into a per-item [BT, BN] buffer; no [T, N])
//   per row: sum of squares (vectorised), then a threshold test against the K-th best
//            score so far and a min-heap insertion for the few that pass
//   epilogue on K values: norm, softmax/tau, threshold mask, c = w·m·p·scale
//   y_t = Σ_k c_k · values[idx_k]   (contiguous rows, fp32 accumulator)
// Backward: docs/op.md, "Backward", the dense normalisation term included.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <omp.h>

#include "thread_plan.h"

// x86 kernels written with intrinsics, compiled for their own ISA and picked at run time
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MORAM_NO_CLONES)
#define MORAM_X86_SIMD 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;

// ---- tuning --------------------------------------------------------------------------------

// BT x BN fp32 scores per work item: 512 x 1024 is 2 MiB, about one core's L2, between the
// GEMM that writes it and the scan that reads it. Tiles this big keep MKL near its
// whole-matrix GFLOP/s (small ones lose to packing); several items per thread keep the
// dynamic schedule balanced on a shared machine. Read per call, to tune without rebuilding.
int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  const long long r = std::atoll(v);
  return r > 0 ? static_cast<int64_t>(r) : dflt;
}
int64_t block_tokens() { return env_int("MORAM_CPU_BT", 512); }
int64_t tile_atoms() { return env_int("MORAM_CPU_BN", 1024); }

// Threads worth waking for a call: moram_cpu::threads_for(multiply-adds, bytes streamed)
// (csrc/cpu/thread_plan.h), from the machine's L2 per core and torch's intra-op count, or
// MORAM_CPU_GRAIN. Waking a thread costs µs on an idle machine and a whole scheduler slice
// on a busy one, so a call that streams less than a few L2s stays on the calling thread.
// Parallel loops below pass `if (nth > 1)`: with one thread the region is inactive and runs
// inline. A loop whose body calls BLAS/ATen must not sit in such a region when it runs on one
// thread (see the forward's items): libgomp then gives those calls a nested team of fresh
// threads instead of the pool's.
using moram_cpu::threads_for;
// A loop that reads about one fp32 per multiply-add (gathers, row scans): its bytes.
inline int threads_for_stream(double madds) { return threads_for(madds, 4.0 * madds); }

// Exceptions must not cross an OpenMP region boundary: keep the first, rethrow after.
struct FirstError {
  std::exception_ptr err;
  std::once_flag once;
  void capture() {
    auto e = std::current_exception();
    std::call_once(once, [&] { err = e; });
  }
  void rethrow() {
    if (err) std::rethrow_exception(err);
  }
};

// ---- validation ----------------------------------------------------------------------------

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "moram cpu: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "moram cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float_type(t.scalar_type()), "moram cpu: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// ---- low-precision GEMMs (bf16 / fp16 inputs) ----------------------------------------------
//
// Two roads for the GEMMs of a call whose x and keys are all bf16 (or all fp16):
//   native: the products run in that dtype with fp32 accumulation and an fp32 result, through
//           MKL's mixed GEMMs (cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, shipped inside
//           torch's CPU library), which use AMX tiles or AVX512-BF16/FP16 where the CPU has
//           them. Score tiles come out fp32 and feed the same fused top-K and sum of squares.
//           A computed fp32 operand of a backward GEMM (score gradients, the Gram matrix) is
//           scaled by a power of two and rounded to the input dtype; alpha undoes the scale.
//   fp32:   the operands are converted to fp32 (a block of tokens at a time, the keys once per
//           call) and every GEMM is an fp32 GEMM, the road of fp32 inputs.
// MORAM_CPU_LOWP picks: "auto" (default) takes native where the CPU multiplies that dtype
// natively (AMX or AVX512-BF16 for bf16; AMX-FP16 or AVX512-FP16 for fp16) and fp32
// elsewhere; "native" and "fp32" force a road (native still needs the MKL symbol: without it
// the fp32 road runs). The CPU is read once, the variable on every call. One token (T = 1)
// reads fp32 key rows in its own loop on either road.

// Weak: absent from torch builds without MKL (e.g. aarch64), then null and the fp32 road runs.
// Layout/transpose enums are CBLAS's ints; MKL_INT is int (LP64); MKL_BF16/MKL_F16 are 16-bit.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                          int ldc) __attribute__((weak));
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool mixed_gemm_linked(at::ScalarType dt) {
  return dt == at::kBFloat16 ? cblas_gemm_bf16bf16f32 != nullptr : cblas_gemm_f16f16f32 != nullptr;
}

bool cpu_has(const std::unordered_map<std::string, c10::IValue>& caps, const char* key) {
  const auto it = caps.find(key);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Whether this CPU multiplies dt natively (read once, through torch's cpuinfo).
bool cpu_has_native(at::ScalarType dt) {
  static const bool bf16 = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    return cpu_has(caps, "amx_bf16") || cpu_has(caps, "avx512_bf16");
  }();
  static const bool fp16 = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    return cpu_has(caps, "amx_fp16") || cpu_has(caps, "avx512_fp16");
  }();
  return dt == at::kBFloat16 ? bf16 : fp16;
}

// Whether a call computing in dt runs its GEMMs in dt (false for every dtype but bf16/fp16).
bool lowp_gemm_road(at::ScalarType dt) {
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  const char* v = std::getenv("MORAM_CPU_LOWP");
  const std::string mode = v == nullptr ? "" : v;
  TORCH_CHECK(mode.empty() || mode == "auto" || mode == "native" || mode == "fp32",
              "moram cpu: MORAM_CPU_LOWP must be auto, native or fp32, got '", mode, "'");
  if (mode == "fp32" || !mixed_gemm_linked(dt)) return false;
  return mode == "native" || cpu_has_native(dt);
}

// A 2-D operand as row-major CBLAS reads it: its transpose flag and leading dimension, or a
// contiguous copy when neither its rows nor its columns are unit-stride.
struct GemmOperand {
  Tensor t;
  int trans, ld;
};
GemmOperand gemm_operand(const Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, c))
    return {t, kNoTrans, static_cast<int>(t.stride(0))};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, r)) return {t, kTrans, static_cast<int>(t.stride(1))};
  return {t.contiguous(), kNoTrans, static_cast<int>(std::max<int64_t>(1, c))};
}

// out (fp32 [m, n], unit column stride) = alpha · a @ b (+ out when accumulate), a [m, k] and
// b [k, n] both bf16 or both fp16, any strides; fp32 accumulation.
void lowp_mm(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate, float alpha = 1.f) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && b.size(0) == k && out.scalar_type() == at::kFloat &&
                  out.size(0) == m && out.size(1) == n && (n <= 1 || out.stride(1) == 1),
              "moram cpu: lowp_mm got mismatched operands");
  TORCH_CHECK(std::max({m, n, k, out.stride(0)}) <= INT32_MAX, "moram cpu: a GEMM too large for 32-bit BLAS");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const GemmOperand A = gemm_operand(a), B = gemm_operand(b);
  const int ldc = static_cast<int>(std::max<int64_t>(out.stride(0), n));
  auto* fn = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  fn(kRowMajor, A.trans, B.trans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha,
     static_cast<const uint16_t*>(A.t.data_ptr()), A.ld, static_cast<const uint16_t*>(B.t.data_ptr()), B.ld,
     accumulate ? 1.f : 0.f, out.data_ptr<float>(), ldc);
}

// A computed fp32 operand rounded to dt after a power-of-two scale that puts its largest
// magnitude near 2^14 (inside fp16's range; exact, so harmless for bf16); *unscale is the
// inverse, passed to lowp_mm as alpha.
Tensor to_lowp_scaled(const Tensor& f, at::ScalarType dt, float* unscale) {
  const float amax = f.numel() ? f.abs().max().item<float>() : 0.f;
  int e = 0;
  if (amax > 0.f && std::isfinite(amax)) e = 14 - std::ilogb(amax);
  *unscale = std::ldexp(1.f, -e);
  return (e == 0 ? f : f.mul(std::ldexp(1.0, e))).to(dt);
}

// The atoms as the kernels read them: fp32 keys for BLAS, value rows contiguous in their own
// dtype (converted on the fly in the gather), fp32 scales or none.
struct Atoms {
  int64_t n[2] = {0, 0};
  int64_t lo[2] = {0, 0};  // global id of the first atom of each segment
  int64_t n_total = 0, d_in = 0, d_out = 0;
  Tensor keys_f[2];        // [N_s, d_in] fp32 contiguous (undefined on the low-precision road)
  Tensor keys[2];          // as given (dtype of the key gradient)
  at::ScalarType lowp = at::kFloat;  // bf16/fp16: every GEMM runs in this dtype (lowp_gemm_road)
  Tensor values[2];        // [N_s, d_out] contiguous, any float dtype
  Tensor scale[2];         // [N_s] fp32 contiguous, or undefined (= 1)

  int seg_of(int64_t id) const { return id >= lo[1] ? 1 : 0; }
  float scale_of(int64_t id) const {
    const int s = seg_of(id);
    return scale[s].defined() ? scale[s].data_ptr<float>()[id - lo[s]] : 1.0f;
  }
};

Atoms make_atoms(const Tensor& x, const Tensor& keys0, const Tensor& values0,
                 const c10::optional<Tensor>& scale0, const Tensor& keys1, const Tensor& values1,
                 const c10::optional<Tensor>& scale1) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "moram cpu: x must be 2-D [T, d_in], got ", x.sizes());
  Atoms a;
  a.d_in = x.size(1);
  const Tensor* ks[2] = {&keys0, &keys1};
  const Tensor* vs[2] = {&values0, &values1};
  const c10::optional<Tensor>* ss[2] = {&scale0, &scale1};
  const char* kn[2] = {"keys0", "keys1"};
  const char* vn[2] = {"values0", "values1"};
  const char* sn[2] = {"scale0", "scale1"};
  for (int s = 0; s < 2; ++s) {
    const Tensor& k = *ks[s];
    const Tensor& v = *vs[s];
    check_float(k, kn[s]);
    check_float(v, vn[s]);
    TORCH_CHECK(k.dim() == 2 && k.size(1) == a.d_in, "moram cpu: ", kn[s],
                " must be [N, d_in] with d_in = ", a.d_in, " (from x), got ", k.sizes());
    TORCH_CHECK(v.dim() == 2 && v.size(0) == k.size(0), "moram cpu: ", vn[s], " must be [N, d_out] with N = ",
                k.size(0), " (from ", kn[s], "), got ", v.sizes());
    a.n[s] = k.size(0);
    // detached: ATen calls on OpenMP worker threads do not see this thread's below-autograd guard
    a.keys[s] = k.requires_grad() ? k.detach() : k;
    a.values[s] = v.is_contiguous() ? v : v.contiguous();
    if (ss[s]->has_value() && (*ss[s])->defined()) {
      const Tensor& sc = **ss[s];
      TORCH_CHECK(sc.device().is_cpu(), "moram cpu: ", sn[s], " must be a CPU tensor, got ", sc.device());
      TORCH_CHECK(sc.scalar_type() == at::kFloat, "moram cpu: ", sn[s], " must be float32, got ",
                  sc.scalar_type());
      TORCH_CHECK(sc.dim() == 1 && sc.size(0) == a.n[s], "moram cpu: ", sn[s], " must be [N] = [", a.n[s],
                  "], got ", sc.sizes());
      a.scale[s] = sc.detach().contiguous();
    }
  }
  TORCH_CHECK(values0.size(1) == values1.size(1), "moram cpu: values0 and values1 must have the same d_out, got ",
              values0.size(1), " and ", values1.size(1));
  a.d_out = values0.size(1);
  a.lo[0] = 0;
  a.lo[1] = a.n[0];
  a.n_total = a.n[0] + a.n[1];
  TORCH_CHECK(a.n_total >= 1, "moram cpu: the two segments hold no atom (N = 0)");
  // One token reads fp32 key rows in its own loop, whatever the road.
  const at::ScalarType xt = x.scalar_type();
  if (x.size(0) > 1 && keys0.scalar_type() == xt && keys1.scalar_type() == xt && lowp_gemm_road(xt))
    a.lowp = xt;
  for (int s = 0; s < 2; ++s) {
    if (a.lowp != at::kFloat) {
      if (!a.keys[s].is_contiguous()) a.keys[s] = a.keys[s].contiguous();
      continue;
    }
    a.keys_f[s] = a.keys[s].scalar_type() == at::kFloat ? a.keys[s] : a.keys[s].to(at::kFloat);
    if (!a.keys_f[s].is_contiguous()) a.keys_f[s] = a.keys_f[s].contiguous();
  }
  return a;
}

// ---- per-row helpers ----------------------------------------------------------------------

// The hot loops are compiled for AVX-512 and AVX2+FMA as well as the baseline, picked at
// load time (GCC function multiversioning), so one binary runs everywhere and vectorises
// wide where it can. The bodies are the portable `omp simd` loops below.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12 && \
    !defined(MORAM_NO_CLONES)
#define MORAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MORAM_CLONES
#endif

// A value row's element as fp32. fp16 by integer steps and one fp32 subtraction, without
// branches, so that the row loops below vectorise (c10::Half's conversion does not: the fp16
// gather took half of an fp16 forward at d_out = 1024 on an AVX2 EPYC). Exact for every
// finite value, subnormals included; infinities and NaN keep their bits.
inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }  // a shift: vectorises
inline float to_f32(at::Half v) {
  const uint32_t h = v.x;
  const uint32_t em = (h & 0x7FFFu) << 13;  // exponent and mantissa, in fp32's places
  const uint32_t e = em & (0x7C00u << 13);
  // all-ones masks, not branches or selects of floats (GCC then leaves the loop scalar)
  const uint32_t inf_nan = 0u - static_cast<uint32_t>(e == (0x7C00u << 13));
  const uint32_t small = 0u - static_cast<uint32_t>(e == 0);
  // rebias the exponent (to 255 for inf / NaN)
  const uint32_t o = em + ((127u - 15u) << 23) + (inf_nan & ((128u - 16u) << 23));
  // zero / subnormal: m * 2^-24 = (2^-14 * (1 + m / 1024)) - 2^-14, exact in fp32
  const uint32_t os = o + (1u << 23);
  float fs;
  std::memcpy(&fs, &os, sizeof fs);
  fs -= 6.103515625e-05f;
  uint32_t sb;
  std::memcpy(&sb, &fs, sizeof sb);
  const uint32_t r = ((sb & small) | (o & ~small)) | ((h & 0x8000u) << 16);
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

template <typename V>
inline void axpy_body(float c, const V* __restrict__ src, float* __restrict__ acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += c * to_f32(src[j]);
}

// Four quarters summed side by side: four independent accumulators, so that the FMA
// latency does not bound the loop as one reduction chain does.
template <typename V>
inline float dot_body(const V* __restrict__ a, const float* __restrict__ b, int64_t n) {
  const int64_t q = n / 4;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < q; ++j) {
    s0 += to_f32(a[j]) * b[j];
    s1 += to_f32(a[j + q]) * b[j + q];
    s2 += to_f32(a[j + 2 * q]) * b[j + 2 * q];
    s3 += to_f32(a[j + 3 * q]) * b[j + 3 * q];
  }
  for (int64_t j = 4 * q; j < n; ++j) s0 += to_f32(a[j]) * b[j];
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
inline void store_body(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// fp32 -> bf16 as c10::BFloat16(float) rounds (to nearest even; every NaN becomes 0x7FC0),
// written without its NaN branch so that the loop vectorises: the scalar conversion took
// 8 % of a bf16 forward at d_out = 1024 on an AVX2 EPYC.
inline void store_body(const float* __restrict__ src, at::BFloat16* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t b;
    std::memcpy(&b, src + j, sizeof b);
    const uint32_t rounded = (b + (((b >> 16) & 1u) + 0x7FFFu)) >> 16;
    dst[j].x = static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

MORAM_CLONES void axpy_row(float c, const float* src, float* acc, int64_t n) { axpy_body(c, src, acc, n); }
MORAM_CLONES void axpy_row(float c, const at::Half* src, float* acc, int64_t n) { axpy_body(c, src, acc, n); }
MORAM_CLONES void axpy_row(float c, const at::BFloat16* src, float* acc, int64_t n) { axpy_body(c, src, acc, n); }
MORAM_CLONES float dot_row(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
MORAM_CLONES float dot_row(const at::Half* a, const float* b, int64_t n) { return dot_body(a, b, n); }
MORAM_CLONES float dot_row(const at::BFloat16* a, const float* b, int64_t n) { return dot_body(a, b, n); }
MORAM_CLONES void store_row(const float* src, float* dst, int64_t n) { store_body(src, dst, n); }
// fp32 -> fp16: the F16C instruction where the CPU has it (IEEE round to nearest even, as
// c10::Half rounds; its software conversion does not vectorise), else the portable loop.
MORAM_CLONES void store_row_half_portable(const float* src, at::Half* dst, int64_t n) { store_body(src, dst, n); }
#ifdef MORAM_X86_SIMD
__attribute__((target("avx,f16c"))) void store_row_half_f16c(const float* src, at::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  if (j < n) {  // the tail through one zero-padded vector
    alignas(32) float in[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    alignas(16) at::Half out[8];
    std::copy(src + j, src + n, in);
    _mm_store_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(_mm256_load_ps(in), _MM_FROUND_TO_NEAREST_INT));
    std::copy(out, out + (n - j), dst + j);
  }
}
#endif
void store_row(const float* src, at::Half* dst, int64_t n) {
#ifdef MORAM_X86_SIMD
  static const bool f16c = (__builtin_cpu_init(), __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx"));
  if (f16c) return store_row_half_f16c(src, dst, n);
#endif
  store_row_half_portable(src, dst, n);
}
MORAM_CLONES void store_row(const float* src, at::BFloat16* dst, int64_t n) { store_body(src, dst, n); }

// Four value rows at once: acc += c0 v0 + c1 v1 + c2 v2 + c3 v3 reads and writes acc once
// for four rows instead of four times (the gather of K = 16 rows of 768 was L1-bound on acc:
// 3 of the 9 ms of a CLIP-layer forward on a 2-core AVX2 EPYC).
template <typename V>
inline void axpy4_body(const float* c, const V* __restrict__ v0, const V* __restrict__ v1,
                       const V* __restrict__ v2, const V* __restrict__ v3, float* __restrict__ acc, int64_t n) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    acc[j] += c0 * to_f32(v0[j]) + c1 * to_f32(v1[j]) + c2 * to_f32(v2[j]) +
              c3 * to_f32(v3[j]);
}

// Four rows against one vector (value rows against a gradient row, key rows against a
// token): four independent accumulators hide the FMA latency that bounds a single
// reduction, and each load of g serves four rows.
template <typename V>
inline void dot4_body(const V* __restrict__ v0, const V* __restrict__ v1, const V* __restrict__ v2,
                      const V* __restrict__ v3, const float* __restrict__ g, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j];
    s0 += to_f32(v0[j]) * gj;
    s1 += to_f32(v1[j]) * gj;
    s2 += to_f32(v2[j]) * gj;
    s3 += to_f32(v3[j]) * gj;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// Eight fp32 value rows at once, `set` writing acc instead of adding to it (the first eight
// rows of a gather: no zeroing pass). The gather is bound by reading value rows from L2/L3;
// eight streams a pass and acc read and written once per eight rows made the fp32 d_in = 16
// forward (T = 2048, N = 4096, k = 16, d_out = 1024) 3-9 % faster than four on a 2-core
// AVX2 EPYC.
MORAM_CLONES void axpy8_row(const float* c, const float* const* v, float* __restrict__ acc, int64_t n, bool set) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7];
  const float *__restrict__ v0 = v[0], *__restrict__ v1 = v[1], *__restrict__ v2 = v[2], *__restrict__ v3 = v[3];
  const float *__restrict__ v4 = v[4], *__restrict__ v5 = v[5], *__restrict__ v6 = v[6], *__restrict__ v7 = v[7];
  if (set) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      acc[j] = ((c0 * v0[j] + c1 * v1[j]) + (c2 * v2[j] + c3 * v3[j])) +
               ((c4 * v4[j] + c5 * v5[j]) + (c6 * v6[j] + c7 * v7[j]));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      acc[j] += ((c0 * v0[j] + c1 * v1[j]) + (c2 * v2[j] + c3 * v3[j])) +
                ((c4 * v4[j] + c5 * v5[j]) + (c6 * v6[j] + c7 * v7[j]));
  }
}

#define DEFINE_ROW4(V)                                                                                    \
  MORAM_CLONES void axpy4_row(const float* c, const V* v0, const V* v1, const V* v2, const V* v3, float* acc, \
                              int64_t n) {                                                               \
    axpy4_body(c, v0, v1, v2, v3, acc, n);                                                               \
  }                                                                                                      \
  MORAM_CLONES void dot4_row(const V* v0, const V* v1, const V* v2, const V* v3, const float* g, int64_t n,  \
                             float* out) {                                                               \
    dot4_body(v0, v1, v2, v3, g, n, out);                                                                \
  }
DEFINE_ROW4(float)
DEFINE_ROW4(at::Half)
DEFINE_ROW4(at::BFloat16)
#undef DEFINE_ROW4

// The value rows of the K ids of one token: acc = Σ c_i values[ids_i] (gather: eight rows at
// a time, then four, then one) or out_i = values[ids_i] · g (dots, four at a time), for
// values of one dtype V in both segments.
template <typename V>
struct ValueRows {
  const V* base[2];
  int64_t lo1, d_out;
  explicit ValueRows(const Atoms& a);
  ValueRows(const V* rows, int64_t d) : base{rows, nullptr}, lo1(std::numeric_limits<int64_t>::max()), d_out(d) {}
  const V* row(int64_t id) const { return id >= lo1 ? base[1] + (id - lo1) * d_out : base[0] + id * d_out; }
};

template <typename V>
void gather_values(const ValueRows<V>& vr, const int64_t* ids, const float* c, int64_t k, float* acc) {
  const int64_t n = vr.d_out;
  int64_t i = 0;
  // fp32 rows only: converting eight bf16/fp16 rows at once ran out of AVX2's 16 registers
  // (fp16 1.45x, bf16 1.04x slower than four at once)
  if constexpr (std::is_same<V, float>::value) {
    const float* rows[8];
    for (; i + 8 <= k; i += 8) {
      for (int q = 0; q < 8; ++q) rows[q] = vr.row(ids[i + q]);
      axpy8_row(c + i, rows, acc, n, /*set=*/i == 0);
    }
  }
  if (i == 0) std::fill(acc, acc + n, 0.f);
  for (; i + 4 <= k; i += 4)
    axpy4_row(c + i, vr.row(ids[i]), vr.row(ids[i + 1]), vr.row(ids[i + 2]), vr.row(ids[i + 3]), acc, n);
  for (; i < k; ++i) axpy_row(c[i], vr.row(ids[i]), acc, n);
}

template <typename V>
void dot_values(const ValueRows<V>& vr, const int64_t* ids, const float* g, int64_t k, float* out) {
  const int64_t n = vr.d_out;
  int64_t i = 0;
  for (; i + 4 <= k; i += 4)
    dot4_row(vr.row(ids[i]), vr.row(ids[i + 1]), vr.row(ids[i + 2]), vr.row(ids[i + 3]), g, n, out + i);
  for (; i < k; ++i) out[i] = dot_row(vr.row(ids[i]), g, n);
}

// acc += c * values[id] for any value dtype.
inline void axpy_value(const Atoms& a, int64_t id, float c, float* acc) {
  const int s = a.seg_of(id);
  const int64_t r = (id - a.lo[s]) * a.d_out;
  switch (a.values[s].scalar_type()) {
    case at::kFloat: axpy_row(c, a.values[s].data_ptr<float>() + r, acc, a.d_out); break;
    case at::kHalf: axpy_row(c, a.values[s].data_ptr<at::Half>() + r, acc, a.d_out); break;
    default: axpy_row(c, a.values[s].data_ptr<at::BFloat16>() + r, acc, a.d_out); break;
  }
}

inline float dot_value(const Atoms& a, int64_t id, const float* g) {
  const int s = a.seg_of(id);
  const int64_t r = (id - a.lo[s]) * a.d_out;
  switch (a.values[s].scalar_type()) {
    case at::kFloat: return dot_row(a.values[s].data_ptr<float>() + r, g, a.d_out);
    case at::kHalf: return dot_row(a.values[s].data_ptr<at::Half>() + r, g, a.d_out);
    default: return dot_row(a.values[s].data_ptr<at::BFloat16>() + r, g, a.d_out);
  }
}

template <typename V>
ValueRows<V>::ValueRows(const Atoms& a) : lo1(a.lo[1]), d_out(a.d_out) {
  for (int s = 0; s < 2; ++s) base[s] = a.n[s] > 0 ? a.values[s].data_ptr<V>() : nullptr;
}

// The one dtype of every value row of the bank (an empty segment's does not count), or
// Undefined when the two segments differ.
at::ScalarType values_dtype(const Atoms& a) {
  if (a.n[0] == 0) return a.values[1].scalar_type();
  if (a.n[1] == 0) return a.values[0].scalar_type();
  const at::ScalarType t = a.values[0].scalar_type();
  return a.values[1].scalar_type() == t ? t : at::ScalarType::Undefined;
}

// f(ValueRows<V>(a)) for the bank's one value dtype V; false (f not called) when the two
// segments' value dtypes differ.
template <typename F>
bool with_value_rows(const Atoms& a, F&& f) {
  switch (values_dtype(a)) {
    case at::kFloat: f(ValueRows<float>(a)); return true;
    case at::kHalf: f(ValueRows<at::Half>(a)); return true;
    case at::kBFloat16: f(ValueRows<at::BFloat16>(a)); return true;
    default: return false;
  }
}

// acc = Σ_i c_i values[ids_i] (K rows), four rows at a time where the bank has one value dtype.
void gather_any(const Atoms& a, const int64_t* ids, const float* c, int64_t k, float* acc) {
  if (with_value_rows(a, [&](const auto& vr) { gather_values(vr, ids, c, k, acc); })) return;
  std::fill(acc, acc + a.d_out, 0.f);
  for (int64_t i = 0; i < k; ++i) axpy_value(a, ids[i], c[i], acc);
}

// out_i = values[ids_i] · g (K rows), four rows at a time where the bank has one value dtype.
void dots_any(const Atoms& a, const int64_t* ids, const float* g, int64_t k, float* out) {
  if (with_value_rows(a, [&](const auto& vr) { dot_values(vr, ids, g, k, out); })) return;
  for (int64_t i = 0; i < k; ++i) out[i] = dot_value(a, ids[i], g);
}

void store_row_any(const float* src, const Tensor& out, int64_t row) {
  const int64_t n = out.size(1);
  switch (out.scalar_type()) {
    case at::kFloat: store_row(src, out.data_ptr<float>() + row * n, n); break;
    case at::kHalf: store_row(src, out.data_ptr<at::Half>() + row * n, n); break;
    default: store_row(src, out.data_ptr<at::BFloat16>() + row * n, n); break;
  }
}

// ---- running top-K: a min-heap of (score, id); its root is the threshold -------------------

// NaN never passes `v > root`, so a NaN row keeps its initial, valid ids.
inline void heap_init(float* v, int64_t* id, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    v[i] = -std::numeric_limits<float>::infinity();
    id[i] = i;  // valid global ids (K <= N)
  }
}

inline void heap_replace_root(float* v, int64_t* id, int64_t k, float nv, int64_t nid) {
  int64_t i = 0;
  for (;;) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t r = l + 1;
    const int64_t m = (r < k && v[r] < v[l]) ? r : l;
    if (!(v[m] < nv)) break;
    v[i] = v[m];
    id[i] = id[m];
    i = m;
  }
  v[i] = nv;
  id[i] = nid;
}

// One row of a score tile: add its squares to *ss and offer every score to the heap.
// After the first tile almost every score loses against the K-th best, so the test is
// one vector compare per 16 (8) scores, and only the lanes that win reach the heap.
inline void scan_row_scalar(const float* __restrict__ row, int64_t bn, int64_t id0, float* hv,
                            int64_t* hid, int64_t k, float* ss, float floor) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < bn; ++j) acc += row[j] * row[j];
  *ss += acc;
  float thr = std::max(hv[0], floor);
  for (int64_t j = 0; j < bn; ++j) {
    if (row[j] > thr) {
      heap_replace_root(hv, hid, k, row[j], id0 + j);
      thr = std::max(hv[0], floor);
    }
  }
}

#ifdef MORAM_X86_SIMD

__attribute__((target("avx512f"))) void scan_row_avx512(const float* __restrict__ row, int64_t bn,
                                                        int64_t id0, float* hv, int64_t* hid, int64_t k,
                                                        float* ss, float floor) {
  __m512 acc = _mm512_setzero_ps();
  float thr = std::max(hv[0], floor);
  int64_t j = 0;
  for (; j + 16 <= bn; j += 16) {
    const __m512 v = _mm512_loadu_ps(row + j);
    acc = _mm512_fmadd_ps(v, v, acc);
    __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ);
    while (m) {
      const int b = __builtin_ctz(static_cast<unsigned>(m));
      m = static_cast<__mmask16>(m & (m - 1));
      const float s = row[j + b];
      if (s > thr) {  // thr may have risen since the compare
        heap_replace_root(hv, hid, k, s, id0 + j + b);
        thr = std::max(hv[0], floor);
      }
    }
  }
  float tail = 0.f;
  for (; j < bn; ++j) {
    tail += row[j] * row[j];
    if (row[j] > thr) {
      heap_replace_root(hv, hid, k, row[j], id0 + j);
      thr = std::max(hv[0], floor);
    }
  }
  *ss += _mm512_reduce_add_ps(acc) + tail;
}

__attribute__((target("avx2,fma"))) void scan_row_avx2(const float* __restrict__ row, int64_t bn, int64_t id0,
                                                       float* hv, int64_t* hid, int64_t k, float* ss, float floor) {
  __m256 acc = _mm256_setzero_ps();
  float thr = std::max(hv[0], floor);
  int64_t j = 0;
  for (; j + 8 <= bn; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    acc = _mm256_fmadd_ps(v, v, acc);
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thr), _CMP_GT_OQ)));
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      const float s = row[j + b];
      if (s > thr) {
        heap_replace_root(hv, hid, k, s, id0 + j + b);
        thr = std::max(hv[0], floor);
      }
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float tail = 0.f;
  for (; j < bn; ++j) {
    tail += row[j] * row[j];
    if (row[j] > thr) {
      heap_replace_root(hv, hid, k, row[j], id0 + j);
      thr = std::max(hv[0], floor);
    }
  }
  *ss += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}
#endif

using ScanFn = void (*)(const float*, int64_t, int64_t, float*, int64_t*, int64_t, float*, float);

// The K-th largest of v[0, g) (no NaN; v may be reordered). For g <= 64 by counting, for
// each value in turn, the values above it and those at least it (vector compares, one
// predictable branch a value) until one has fewer than K above and at least K at least it;
// std::nth_element's partitions branch unpredictably (on 32 group maxima they took 7 % of a
// d_in = 16 forward at N = 1024).
float kth_largest(float* v, int64_t g, int64_t k) {
  if (g <= 64) {
    for (int64_t i = 0; i < g; ++i) {
      const float x = v[i];
      int gt = 0, ge = 0;
#pragma omp simd reduction(+ : gt, ge)
      for (int64_t j = 0; j < g; ++j) {
        gt += v[j] > x;
        ge += v[j] >= x;
      }
      if (gt < k && ge >= k) return x;
    }
  }
  std::nth_element(v, v + (k - 1), v + g, std::greater<float>());
  return v[k - 1];
}

// A lower bound on the K-th largest of a row's n scores: the K-th largest of G group maxima
// (group i: the scores j with j mod G == i; G = 2K rounded up to 8 lanes, or n itself when
// shorter). Those K maxima are K distinct scores, so the K-th largest score is at least their
// smallest; nothing below can be selected. With G = 2K about 1.25 K scores of a random row
// pass (G = K let 2.8 K through), and the strided groups vectorise. Returned just below the
// bound (the selections test `>`); -inf when the row holds fewer than K groups. gm: G floats.
// The tiled road filters its first tile with it: at K = 64 the forward ran 7-10 % faster than
// with K contiguous groups (T = 2048, N = 4096, d_in = 16; docs/benchmarks.md).
float group_floor(const float* __restrict__ row, int64_t n, int64_t k, std::vector<float>& gm_buf) {
  const int64_t G = std::min<int64_t>(n, (2 * k + 7) / 8 * 8);
  if (G < k) return -std::numeric_limits<float>::infinity();
  if (gm_buf.size() < static_cast<size_t>(G)) gm_buf.resize(G);
  float* gm = gm_buf.data();
  std::fill(gm, gm + G, -std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + G <= n; c += G) {
#pragma omp simd
    for (int64_t i = 0; i < G; ++i) gm[i] = std::max(gm[i], row[c + i]);  // NaN never wins
  }
  for (int64_t i = 0; c + i < n; ++i) gm[i] = std::max(gm[i], row[c + i]);
  return std::nextafter(kth_largest(gm, G, k), -std::numeric_limits<float>::infinity());  // -inf stays
}

ScanFn pick_scan() {
#ifdef MORAM_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return scan_row_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return scan_row_avx2;
#endif
  return scan_row_scalar;
}

// ---- top-K of a whole row, for banks that fit in one tile ------------------------------------

// When every score of a token is in one row (the bank fits in one tile, or one decoded
// token), the top-K needs no running heap. A threshold that at least K scores reach keeps a
// few candidates, and a sort of those finds the K best: linear in the row, no per-score heap
// upkeep. The threshold is the K-th largest of G group maxima (group i: the scores j with
// j mod G == i; G = 2K rounded up to 8 lanes, or the row itself when shorter): those K maxima
// are K distinct scores, so the K-th largest score is at least it. With G = 2K about 1.25 K
// scores pass on random rows (G = K let 2.8 K through), and the strided groups vectorise.
// The candidates are packed without a branch (an unpredictable one, about a third taken,
// cost more than the rest of the row): eight scores a step on AVX2 (pass_avx2), which with
// the counting kth_largest made the d_in = 16 forward 20-27 % faster at N = 160 and 1,024
// (T = 2048, k = 16 and 64, one thread, 2-core AVX2 EPYC) than one 16-byte candidate
// written per score. Ties go to the lower id, and the K come out by score
// descending, then id. NaN scores never pass the threshold; if fewer than K scores are
// candidates (a row of NaN or -inf), the rest are filled with -inf at the lowest unused ids,
// as heap_init would.
struct Cand {
  float v;
  int64_t id;
};

inline bool cand_before(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

// select_row's buffers, sized by its first call and reused for the caller's next rows
struct SelectScratch {
  std::vector<Cand> cand;    // the candidates, to sort
  std::vector<float> pv;     // n + 8 slots: the scores that pass the threshold...
  std::vector<int32_t> pi;   // ...and their places in the row
  std::vector<float> gm;     // the G group maxima
};

// The scores of a row above `floor`, in row order, packed at the front of pv with their
// places in pi (n + 8 slots each: the vector loop stores whole vectors); returns how many.
// Without a branch per score: about 1.25 K of n pass, at places no predictor can follow.
// (pass_from: from place j of the row on, the first m slots already packed; returns the new m)
inline int64_t pass_from(const float* __restrict__ row, int64_t j, int64_t n, float floor, float* __restrict__ pv,
                         int32_t* __restrict__ pi, int64_t m) {
  for (; j < n; ++j) {
    pv[m] = row[j];
    pi[m] = static_cast<int32_t>(j);
    m += row[j] > floor;
  }
  return m;
}
int64_t pass_portable(const float* row, int64_t n, float floor, float* pv, int32_t* pi) {
  return pass_from(row, 0, n, floor, pv, pi, 0);
}

#ifdef MORAM_X86_SIMD
// For each 8-bit mask, the lane order that brings its set lanes to the front.
struct PackTable {
  alignas(32) int32_t perm[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int w = 0;
      for (int b = 0; b < 8; ++b)
        if (mask >> b & 1) perm[mask][w++] = b;
      while (w < 8) perm[mask][w++] = 0;
    }
  }
};

// pass_portable eight scores a step: one compare, then the passing lanes (and their places)
// moved to the front of a vector by a table permutation and stored; the count advances by
// the mask's popcount.
__attribute__((target("avx2,popcnt"))) int64_t pass_avx2(const float* __restrict__ row, int64_t n, float floor,
                                                       float* __restrict__ pv, int32_t* __restrict__ pi) {
  static const PackTable table;
  const __m256 f = _mm256_set1_ps(floor);
  __m256i place = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, f, _CMP_GT_OQ));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.perm[mask]));
    _mm256_storeu_ps(pv + m, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pi + m), _mm256_permutevar8x32_epi32(place, perm));
    m += _mm_popcnt_u32(static_cast<unsigned>(mask));
    place = _mm256_add_epi32(place, eight);
  }
  return pass_from(row, j, n, floor, pv, pi, m);  // the last n mod 8 scores
}
#endif

using PassFn = int64_t (*)(const float*, int64_t, float, float*, int32_t*);
PassFn pick_pass() {
#ifdef MORAM_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return pass_avx2;
#endif
  return pass_portable;
}

void select_row(const float* __restrict__ row, int64_t n, int64_t k, float* out_v, int64_t* out_id, float* ss,
                SelectScratch& scratch) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += row[j] * row[j];
  *ss += acc;
  static const PassFn pass = pick_pass();
  TORCH_CHECK(n <= INT32_MAX, "moram cpu: more than 2^31 atoms in one row");
  const float floor = group_floor(row, n, k, scratch.gm);
  if (scratch.pv.size() < static_cast<size_t>(n + 8)) {
    scratch.pv.resize(n + 8);
    scratch.pi.resize(n + 8);
  }
  const int64_t m = pass(row, n, floor, scratch.pv.data(), scratch.pi.data());
  if (scratch.cand.size() < static_cast<size_t>(m)) scratch.cand.resize(m);
  Cand* cd = scratch.cand.data();
  for (int64_t i = 0; i < m; ++i) cd[i] = Cand{scratch.pv[i], scratch.pi[i]};
  if (m > 3 * k) {
    std::nth_element(cd, cd + (k - 1), cd + m, cand_before);
    std::sort(cd, cd + k, cand_before);
  } else {
    std::sort(cd, cd + m, cand_before);
  }
  const int64_t got = std::min(m, k);
  for (int64_t i = 0; i < got; ++i) {
    out_v[i] = cd[i].v;
    out_id[i] = cd[i].id;
  }
  for (int64_t i = got, next = 0; i < k; ++i, ++next) {
    while (std::find(out_id, out_id + got, next) != out_id + got) ++next;
    out_v[i] = -std::numeric_limits<float>::infinity();
    out_id[i] = next;
  }
}

// The epilogue of token t: y[t] = Σ c_k values[idx_k], summed in fp32 in y's own row when y
// is fp32 (nothing copied afterwards), else in `scratch` (d_out floats), then rounded into y.
inline void epilogue(const Atoms& a, const float* p, const int64_t* ids, int64_t k, float ss, float tau,
                     float delta, float eps, float* c, const Tensor& y, int64_t t, float* scratch,
                     float* norm_out) {
  const float norm = std::max(std::sqrt(ss), eps);  // NaN stays NaN
  *norm_out = norm;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) mx = std::max(mx, p[i] / norm / tau);
  float den = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    c[i] = std::exp(p[i] / norm / tau - mx);
    den += c[i];
  }
  for (int64_t i = 0; i < k; ++i) {
    const float s = p[i] / norm;
    const float m = (delta > 0.f && !(s >= delta)) ? 0.f : 1.f;
    c[i] = c[i] / den * m * p[i] * a.scale_of(ids[i]);
  }
  const bool f32 = y.scalar_type() == at::kFloat;
  float* acc = f32 ? y.data_ptr<float>() + t * y.size(1) : scratch;
  gather_any(a, ids, c, k, acc);
  if (!f32) store_row_any(acc, y, t);
}

struct Tile {
  int seg;
  int64_t lo, n;  // local first atom and count within the segment
};

// One score tile on the call's road: s (fp32 [bt, n]) = xb @ keys_tileᵀ, xb in the road's dtype.
void score_tile(Tensor& s, const Tensor& xb, const Atoms& a, const Tile& tl) {
  if (a.lowp != at::kFloat) lowp_mm(s, xb, a.keys[tl.seg].narrow(0, tl.lo, tl.n).t(), false);
  else at::mm_out(s, xb, a.keys_f[tl.seg].narrow(0, tl.lo, tl.n).t());
}

// out (fp32) = lhs @ rhs (+ out when accumulate) on the call's road: fp32 BLAS, or the
// low-precision GEMM, with an fp32 (computed) operand rounded by to_lowp_scaled.
void road_mm(const Atoms& a, Tensor out, const Tensor& lhs, const Tensor& rhs, bool accumulate) {
  if (a.lowp == at::kFloat) {
    if (accumulate) out.addmm_(lhs, rhs);
    else at::mm_out(out, lhs, rhs);
    return;
  }
  float ul = 1.f, ur = 1.f;
  const Tensor l = lhs.scalar_type() == a.lowp ? lhs : to_lowp_scaled(lhs, a.lowp, &ul);
  const Tensor r = rhs.scalar_type() == a.lowp ? rhs : to_lowp_scaled(rhs, a.lowp, &ur);
  lowp_mm(out, l, r, accumulate, ul * ur);
}

// The keys of segment s as the road's GEMMs read them.
const Tensor& road_keys(const Atoms& a, int s) { return a.lowp != at::kFloat ? a.keys[s] : a.keys_f[s]; }

// acc += c * keys[id] for the road's key dtype.
inline void axpy_key(const Atoms& a, int64_t id, float c, float* acc) {
  const int s = a.seg_of(id);
  const Tensor& k = road_keys(a, s);
  const int64_t r = (id - a.lo[s]) * a.d_in;
  switch (k.scalar_type()) {
    case at::kFloat: axpy_row(c, k.data_ptr<float>() + r, acc, a.d_in); break;
    case at::kHalf: axpy_row(c, k.data_ptr<at::Half>() + r, acc, a.d_in); break;
    default: axpy_row(c, k.data_ptr<at::BFloat16>() + r, acc, a.d_in); break;
  }
}

// The whole bank against a block of tokens xb [bt, d_in] (in the road's dtype): each
// segment's GEMM (score_tile, either road) writes its columns of one [bt, N] score row per
// token (BLAS takes the row stride), then select_row picks each token's top-K into (hv, hid)
// and adds its squares to ss.
void score_rows_and_select(const Atoms& a, const Tensor& xb, const Tensor& buf, int64_t K, float* hv, int64_t* hid,
                           float* ss) {
  const int64_t bt = xb.size(0), N = a.n_total;
  Tensor s = buf.narrow(0, 0, bt * N).view({bt, N});
  for (int sg = 0; sg < 2; ++sg)
    if (a.n[sg] > 0) {
      Tensor cols = s.narrow(1, a.lo[sg], a.n[sg]);
      score_tile(cols, xb, a, Tile{sg, 0, a.n[sg]});
    }
  const float* sp = s.data_ptr<float>();
  SelectScratch scratch;
  for (int64_t r = 0; r < bt; ++r) select_row(sp + r * N, N, K, hv + r * K, hid + r * K, ss + r, scratch);
}

// ---- forward -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> moram_fwd_cpu(const Tensor& x_in, const Tensor& keys0,
                                                         const Tensor& values0,
                                                         const c10::optional<Tensor>& scale0,
                                                         const Tensor& keys1, const Tensor& values1,
                                                         const c10::optional<Tensor>& scale1, int64_t k,
                                                         double tau, double delta, double eps) {
  // The kernel is a leaf for autograd (ops.py registers the backward); detached inputs keep
  // the ATen calls inside, including those on OpenMP threads, out of autograd's way.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor x = x_in.detach();
  const Atoms a = make_atoms(x, keys0, values0, scale0, keys1, values1, scale1);
  TORCH_CHECK(k >= 1 && k <= a.n_total, "moram cpu: k must be in [1, N] = [1, ", a.n_total, "], got ", k);
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "moram cpu: tau must be finite and > 0, got ", tau);
  TORCH_CHECK(eps > 0, "moram cpu: eps must be > 0, got ", eps);
  TORCH_CHECK(!std::isnan(delta), "moram cpu: delta must not be NaN");
  const int64_t T = x.size(0), K = k, d_out = a.d_out;

  Tensor y = at::empty({T, d_out}, x.options());
  Tensor idx = at::empty({T, K}, x.options().dtype(at::kLong));
  Tensor p_sel = at::empty({T, K}, x.options().dtype(at::kFloat));
  Tensor norm = at::empty({T}, x.options().dtype(at::kFloat));
  if (T == 0) return {y, idx, p_sel, norm};
  static const ScanFn scan = pick_scan();
  const float ftau = static_cast<float>(tau), fdelta = static_cast<float>(delta),
              feps = static_cast<float>(eps);

  if (T == 1) {
    // One token (decoding): the scores are N dot products, which one loop over the key rows
    // computes without the GEMM's buffers and views; threads only for a bank large enough.
    const int64_t d_in = a.d_in, N = a.n_total;
    std::vector<float> xr(d_in), sc(N), c(K), yrow(d_out);
    {
      const Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
      const float* xp = xf.data_ptr<float>();
      const int64_t st = xf.stride(1);
      for (int64_t i = 0; i < d_in; ++i) xr[i] = xp[i * st];
    }
    // threads only for a bank of several L2s (thread_plan.h)
    const double nd = static_cast<double>(N) * static_cast<double>(d_in);
    const int nth = threads_for(nd, 4.0 * nd);
    for (int sg = 0; sg < 2; ++sg) {
      const float* kp = a.keys_f[sg].data_ptr<float>();
      float* out = sc.data() + a.lo[sg];
      const int64_t n_s = a.n[sg], n4 = n_s / 4;
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
      for (int64_t q = 0; q < n4; ++q) {
        const float* r = kp + 4 * q * d_in;
        dot4_row(r, r + d_in, r + 2 * d_in, r + 3 * d_in, xr.data(), d_in, out + 4 * q);
      }
      for (int64_t j = 4 * n4; j < n_s; ++j) out[j] = dot_row(kp + j * d_in, xr.data(), d_in);
    }
    float* hv = p_sel.data_ptr<float>();
    int64_t* hid = idx.data_ptr<int64_t>();
    float ss = 0.f;
    SelectScratch scratch;
    select_row(sc.data(), N, K, hv, hid, &ss, scratch);
    epilogue(a, hv, hid, K, ss, ftau, fdelta, feps, c.data(), y, 0, yrow.data(), norm.data_ptr<float>());
    return {y, idx, p_sel, norm};
  }

  const int nth = threads_for(static_cast<double>(T) * static_cast<double>(a.n_total) *
                                  static_cast<double>(a.d_in + K),
                              4.0 * (static_cast<double>(a.n_total) * static_cast<double>(a.d_in) +
                                     static_cast<double>(T) * static_cast<double>(a.d_in + K * d_out)));
  std::vector<Tile> tiles;
  const int64_t BN = tile_atoms();
  for (int s = 0; s < 2; ++s)
    for (int64_t lo = 0; lo < a.n[s]; lo += BN) tiles.push_back({s, lo, std::min(BN, a.n[s] - lo)});
  // A bank that fits in one tile is scored as one row per token (both segments side by
  // side, seg = -1) and selected by select_row, with no running heap.
  if (a.n_total <= BN) tiles.assign(1, Tile{-1, 0, a.n_total});
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());

  // Few tokens (decode): the scoring streams the keys and is memory-bound, so the threads
  // share one token block and split the atoms instead of each reading every key. Each split
  // keeps its own partial top-K and sum of squares, merged afterwards in split order.
  int64_t BT, n_blocks, n_splits;
  if (T < 64 * nth && T <= block_tokens()) {
    BT = T;
    n_blocks = 1;
    n_splits = std::min<int64_t>(nth, n_tiles);
  } else {
    // whole rounds of nth blocks of one size: blocks cut at block_tokens() left a short last
    // block and a thread idle (T = 1576 on 2 threads ran blocks of 512, 512, 512, 40 as
    // 1024 + 552 rows, 1.2x the balanced time)
    const int64_t rounds = (T + nth * block_tokens() - 1) / (nth * block_tokens());
    BT = std::max<int64_t>(1, (T + rounds * nth - 1) / (rounds * nth));
    n_blocks = (T + BT - 1) / BT;
    n_splits = n_blocks >= nth ? 1 : std::min<int64_t>(n_tiles, (nth + n_blocks - 1) / n_blocks);
  }

  Tensor part_v, part_i, part_ss;  // [splits, T, K], [splits, T, K], [splits, T] when split
  if (n_splits > 1) {
    part_v = at::empty({n_splits, T, K}, p_sel.options());
    part_i = at::empty({n_splits, T, K}, idx.options());
    part_ss = at::empty({n_splits, T}, p_sel.options());
  }
  const bool x_f32 = x.scalar_type() == at::kFloat;

  FirstError fe;
  const int64_t n_items = n_blocks * n_splits;
  auto run_item = [&](int64_t item) {
    try {
      const int64_t b = item / n_splits, sp = item % n_splits;
      const int64_t t0 = b * BT, bt = std::min(BT, T - t0);
      int64_t g0 = n_tiles * sp / n_splits;
      const int64_t g1 = n_tiles * (sp + 1) / n_splits;
      Tensor xb = x.narrow(0, t0, bt);
      if (!x_f32 && a.lowp == at::kFloat) xb = xb.to(at::kFloat);  // strided blocks go to BLAS as they are
      Tensor buf = at::empty({bt * std::min(BN, a.n_total)}, p_sel.options());
      float* hv;
      int64_t* hid;
      std::vector<float> ss(bt, 0.f);
      if (n_splits > 1) {
        hv = part_v[sp].data_ptr<float>() + t0 * K;
        hid = part_i[sp].data_ptr<int64_t>() + t0 * K;
      } else {
        hv = p_sel.data_ptr<float>() + t0 * K;
        hid = idx.data_ptr<int64_t>() + t0 * K;
      }
      if (tiles[0].seg < 0) {
        score_rows_and_select(a, xb, buf, K, hv, hid, ss.data());
        g0 = g1;  // no tile left
      } else {
        for (int64_t r = 0; r < bt; ++r) heap_init(hv + r * K, hid + r * K, K);
      }
      std::vector<float> gm;  // group_floor's scratch
      for (int64_t g = g0; g < g1; ++g) {
        const Tile& tl = tiles[g];
        Tensor s = buf.narrow(0, 0, bt * tl.n).view({bt, tl.n});
        score_tile(s, xb, a, tl);
        const float* sp_ = s.data_ptr<float>();
        const int64_t id0 = a.lo[tl.seg] + tl.lo;
        const bool first = g == g0;  // the heaps are still empty
        for (int64_t r = 0; r < bt; ++r) {
          const float* row = sp_ + r * tl.n;
          const float floor = first ? group_floor(row, tl.n, K, gm) : -std::numeric_limits<float>::infinity();
          scan(row, tl.n, id0, hv + r * K, hid + r * K, K, &ss[r], floor);
        }
      }
      if (n_splits > 1) {
        float* pss = part_ss[sp].data_ptr<float>() + t0;
        std::copy(ss.begin(), ss.end(), pss);
      } else {
        std::vector<float> c(K), yrow(d_out);
        for (int64_t r = 0; r < bt; ++r) {
          const int64_t t = t0 + r;
          epilogue(a, hv + r * K, hid + r * K, K, ss[r], ftau, fdelta, feps, c.data(), y, t, yrow.data(),
                   norm.data_ptr<float>() + t);
        }
      }
    } catch (...) {
      fe.capture();
    }
  };
  // One item (a decoded token, a small bank) runs outside any OpenMP construct, so its GEMM
  // threads itself from the top-level pool. Inside even an inactive `parallel if (false)`
  // region, libgomp gives MKL a nested team of fresh threads that compete with the pool's
  // still-spinning workers: a T = 50, N = 40 call took 7-13 ms instead of 0.2 ms right after
  // any multi-threaded torch op on a 2-core machine.
  if (nth > 1 && n_items > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
    for (int64_t item = 0; item < n_items; ++item) run_item(item);
  } else {
    for (int64_t item = 0; item < n_items; ++item) run_item(item);
  }
  fe.rethrow();

  if (n_splits > 1) {
    // merge the partial top-Ks in split order (deterministic), then the epilogue
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* hv = p_sel.data_ptr<float>() + t * K;
      int64_t* hid = idx.data_ptr<int64_t>() + t * K;
      heap_init(hv, hid, K);
      float ss = 0.f;
      for (int64_t sp = 0; sp < n_splits; ++sp) {
        const float* pv = part_v.data_ptr<float>() + (sp * T + t) * K;
        const int64_t* pi = part_i.data_ptr<int64_t>() + (sp * T + t) * K;
        ss += part_ss.data_ptr<float>()[sp * T + t];
        for (int64_t i = 0; i < K; ++i)
          if (pv[i] > hv[0]) heap_replace_root(hv, hid, K, pv[i], pi[i]);
      }
      std::vector<float> c(K), yrow(d_out);
      epilogue(a, hv, hid, K, ss, ftau, fdelta, feps, c.data(), y, t, yrow.data(), norm.data_ptr<float>() + t);
    }
  }
  return {y, idx, p_sel, norm};
}

// ---- backward of a small bank: fewer, larger GEMMs --------------------------------------------

// With gp = -alpha∘P + the selected g_sel (P = x Aᵀ over all N atoms, [T, N]):
//   gx  = gp A            (the dense term and the sparse one in one GEMM)
//   dA_s = gp[:, s]ᵀ x    (each needed segment, its columns of gp; BLAS takes the stride)
// so a step costs three GEMMs over the whole bank (P, gx, dA) where the tiled road issues
// two per segment and token block for the dense term plus two per segment for dA, with a
// separate scaling pass each. Taken when the recompute road is the cheaper one (no Gram)
// and the bank is small enough that [BT, N] for a useful BT stays in a bounded buffer.
// The gradient of a block of scores, in place: row r of GP [bt, n] (token t0 + r, columns
// the atoms col0 .. col0 + n - 1) becomes -alpha_t · P + the selected g_sel that fall in it.
void gp_rows(float* GP, int64_t bt, int64_t n, int64_t t0, int64_t col0, const float* AL, const float* GS,
             const int64_t* I, int64_t K) {
  const int nth = threads_for_stream(static_cast<double>(bt) * static_cast<double>(n + K));
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
  for (int64_t r = 0; r < bt; ++r) {
    const int64_t t = t0 + r;
    const float na = -AL[t];
    float* row = GP + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= na;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t j = I[t * K + i] - col0;
      if (j >= 0 && j < n) row[j] += GS[t * K + i];
    }
  }
}

bool small_bank_fused(const Atoms& a, int64_t T, bool gram_cached) {
  if (a.n_total > 4096) return false;
  const double dT = static_cast<double>(T), dd = static_cast<double>(a.d_in);
  const double build = 2.0 * dd * dd * static_cast<double>((gram_cached ? 0 : a.n[0]) + a.n[1]);
  return 4.0 * dT * static_cast<double>(a.n_total) * dd <= 2.0 * dT * dd * dd + build;
}

void small_bank_grads(const Atoms& a, const Tensor& xf, const Tensor& g_sel, const Tensor& idx, const Tensor& alpha,
                      const bool need_seg[2], Tensor& gx, Tensor gkf[2]) {
  const int64_t T = xf.size(0), d_in = a.d_in, N = a.n_total, K = idx.size(1);
  const auto f32 = xf.options().dtype(at::kFloat);
  // both segments' keys as the road reads them, one [N, d_in] matrix (a copy of N·d_in, small
  // next to T·N·d_in); xf is the road's x too. Every GEMM below is a road_mm, so on the
  // low-precision road gp is rounded to the input dtype (scaled) for the gx and dA products.
  const Tensor A = a.n[0] == 0   ? road_keys(a, 1)
                   : a.n[1] == 0 ? road_keys(a, 0)
                                 : at::cat({road_keys(a, 0), road_keys(a, 1)});
  const bool x_f32 = gx.defined() ? gx.scalar_type() == at::kFloat : true;
  Tensor gxf = x_f32 ? gx : at::empty({T, d_in}, f32);
  const int64_t BT = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t{16} << 20) / (4 * N)));  // <= 16 MiB
  Tensor gp_buf = at::empty({std::min(BT, T) * N}, f32);
  const float* GS = g_sel.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* AL = alpha.data_ptr<float>();
  for (int s = 0; s < 2; ++s)
    if (need_seg[s] && a.n[s] > 0) gkf[s] = at::empty({a.n[s], d_in}, f32);
  for (int64_t t0 = 0; t0 < T; t0 += BT) {
    const int64_t bt = std::min(BT, T - t0);
    const Tensor xb = xf.narrow(0, t0, bt);
    Tensor gp = gp_buf.narrow(0, 0, bt * N).view({bt, N});
    road_mm(a, gp, xb, A.t(), false);
    gp_rows(gp.data_ptr<float>(), bt, N, t0, 0, AL, GS, I, K);
    Tensor gxb = gxf.narrow(0, t0, bt);
    road_mm(a, gxb, gp, A, false);
    for (int s = 0; s < 2; ++s) {
      if (!gkf[s].defined()) continue;
      const Tensor cols = gp.narrow(1, a.lo[s], a.n[s]);
      road_mm(a, gkf[s], cols.t(), xb, t0 != 0);
    }
  }
  if (!x_f32) gx.copy_(gxf);
}

// ---- backward ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moram_bwd_cpu(
    const Tensor& gy_in, const Tensor& x_in, const Tensor& keys0, const Tensor& values0,
    const c10::optional<Tensor>& scale0, const Tensor& keys1, const Tensor& values1,
    const c10::optional<Tensor>& scale1, const c10::optional<Tensor>& gram0_opt, const Tensor& idx_in,
    const Tensor& p_sel_in, const Tensor& norm_in, double tau, double delta, double eps, bool need_x,
    bool need_seg0, bool need_seg1) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor x = x_in.detach(), gy = gy_in.detach();
  const Atoms a = make_atoms(x, keys0, values0, scale0, keys1, values1, scale1);
  const int64_t T = x.size(0), d_in = a.d_in, d_out = a.d_out;
  check_float(gy, "gy");
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == T && gy.size(1) == d_out, "moram cpu: gy must be [T, d_out] = [", T,
              ", ", d_out, "], got ", gy.sizes());
  TORCH_CHECK(idx_in.device().is_cpu() && idx_in.scalar_type() == at::kLong && idx_in.dim() == 2 &&
                  idx_in.size(0) == T,
              "moram cpu: idx must be an int64 CPU tensor [T, K] with T = ", T, ", got ", idx_in.scalar_type(),
              " ", idx_in.sizes());
  const int64_t K = idx_in.size(1);
  TORCH_CHECK(K >= 1 && K <= a.n_total, "moram cpu: idx has K = ", K, " columns, must be in [1, N = ", a.n_total,
              "]");
  TORCH_CHECK(p_sel_in.device().is_cpu() && p_sel_in.scalar_type() == at::kFloat &&
                  p_sel_in.sizes() == idx_in.sizes(),
              "moram cpu: p_sel must be a float32 CPU tensor shaped like idx ", idx_in.sizes(), ", got ",
              p_sel_in.scalar_type(), " ", p_sel_in.sizes());
  TORCH_CHECK(norm_in.device().is_cpu() && norm_in.scalar_type() == at::kFloat && norm_in.dim() == 1 &&
                  norm_in.size(0) == T,
              "moram cpu: norm must be a float32 CPU tensor [T] = [", T, "], got ", norm_in.scalar_type(), " ",
              norm_in.sizes());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "moram cpu: tau must be finite and > 0, got ", tau);
  Tensor gram0;
  if (gram0_opt.has_value() && gram0_opt->defined()) {
    gram0 = *gram0_opt;
    TORCH_CHECK(gram0.device().is_cpu() && gram0.dim() == 2 && gram0.size(0) == d_in && gram0.size(1) == d_in,
                "moram cpu: gram0 must be a CPU tensor [d_in, d_in] = [", d_in, ", ", d_in, "], got ",
                gram0.device(), " ", gram0.sizes());
    gram0 = gram0.detach().to(at::kFloat);
  }
  const Tensor idx = idx_in.detach().contiguous(), p_sel = p_sel_in.detach().contiguous(),
               norm = norm_in.detach().contiguous();
  Tensor gx, gk[2], gv[2];
  const bool need_seg[2] = {need_seg0, need_seg1};
  if (T == 0 || !(need_x || need_seg0 || need_seg1)) {
    auto empty = [&](bool need, const Tensor& like) { return need ? at::zeros_like(like) : x.new_empty({0}); };
    return {empty(need_x, x), empty(need_seg0, keys0), empty(need_seg0, values0), empty(need_seg1, keys1),
            empty(need_seg1, values1)};
  }
  {  // no index set may send a gather or a scatter out of bounds
    const int64_t* I = idx.data_ptr<int64_t>();
    int64_t lo = 0, hi = 0;
    if (T * K > 0) lo = hi = I[0];
    for (int64_t e = 1; e < T * K; ++e) {
      lo = std::min(lo, I[e]);
      hi = std::max(hi, I[e]);
    }
    TORCH_CHECK(lo >= 0 && hi < a.n_total, "moram cpu: idx holds atom ids in [", lo, ", ", hi,
                "], outside [0, N = ", a.n_total, ")");
  }

  const Tensor gyf = gy.to(at::kFloat).contiguous();
  // the road's x (any strides: BLAS takes it as it is)
  const Tensor xf = a.lowp != at::kFloat ? x : x.to(at::kFloat);
  const double dT = static_cast<double>(T), dK = static_cast<double>(K);
  const float ftau = static_cast<float>(tau), fdelta = static_cast<float>(delta), feps = static_cast<float>(eps);

  // Per token, on the K selected atoms only: g_sel = w·m·gc + gs/n, alpha, and the value
  // coefficient c·scale for dB.
  Tensor g_sel = at::empty({T, K}, p_sel.options());
  Tensor coef_v = at::empty({T, K}, p_sel.options());
  Tensor alpha = at::empty({T}, p_sel.options());
  {
    const float* P = p_sel.data_ptr<float>();
    const int64_t* I = idx.data_ptr<int64_t>();
    const float* Nn = norm.data_ptr<float>();
    const float* G = gyf.data_ptr<float>();
    float* GS = g_sel.data_ptr<float>();
    float* CV = coef_v.data_ptr<float>();
    float* AL = alpha.data_ptr<float>();
    const int nth = threads_for_stream(dT * dK * static_cast<double>(d_out));
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
    std::vector<float> w(K), gw(K), gc(K);  // per thread
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* p = P + t * K;
      const int64_t* ids = I + t * K;
      const float n = Nn[t];
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < K; ++i) mx = std::max(mx, p[i] / n / ftau);
      float den = 0.f;
      for (int64_t i = 0; i < K; ++i) {
        w[i] = std::exp(p[i] / n / ftau - mx);
        den += w[i];
      }
      float wgw = 0.f;
      dots_any(a, ids, G + t * d_out, K, gc.data());   // values[id] · gy, four rows at a time
      for (int64_t i = 0; i < K; ++i) {
        w[i] /= den;
        const float m = (fdelta > 0.f && !(p[i] / n >= fdelta)) ? 0.f : 1.f;
        const float sc = a.scale_of(ids[i]);
        gc[i] *= sc;
        gw[i] = m * p[i] * gc[i];
        wgw += w[i] * gw[i];
        CV[t * K + i] = w[i] * m * p[i] * sc;
        GS[t * K + i] = w[i] * m * gc[i];  // gs / n added below
      }
      float al = 0.f;
      for (int64_t i = 0; i < K; ++i) {
        const float gs = (w[i] / ftau) * (gw[i] - wgw);
        GS[t * K + i] += gs / n;
        al += gs * p[i];
      }
      // n = max(||p||, eps) is constant where it was clamped: no gradient through the norm there
      AL[t] = n > feps ? al / (n * n * n) : 0.f;
    }
    }
  }

  // A small bank on the recompute road: gx and the needed key gradients from one fused
  // [T, N] gp in three GEMMs (small_bank_grads) instead of the tiled road below.
  Tensor gk_fused[2];
  const bool fused = need_x && small_bank_fused(a, T, gram0.defined());
  if (fused) {
    gx = at::empty({T, d_in}, x.options());
    small_bank_grads(a, xf, g_sel, idx, alpha, need_seg, gx, gk_fused);
  }
  if (need_x && !fused) {
    // Dense term -alpha · Σ_j p_j a_j = -alpha · (G x) with G = Aᵀ A. Two ways, by FLOPs:
    //   Gram:      2·T·d_in² (x G), plus 2·N_s·d_in² to build G for a segment without a cache
    //   recompute: 4·T·N·d_in (P = x Aᵀ, then (alpha∘P) A), tiled, no [T, N] buffer
    // With G0 cached (MoRAMLinear, N_frozen >= d_in) Gram is ~2N/d_in times cheaper; for a
    // small bank (N < d_in/2) recomputing the scores is cheaper than even x G.
    const double dT = static_cast<double>(T), dd = static_cast<double>(d_in);
    const double build = 2.0 * dd * dd * static_cast<double>((gram0.defined() ? 0 : a.n[0]) + a.n[1]);
    const double cost_gram = 2.0 * dT * dd * dd + build;
    const double cost_rec = 4.0 * dT * static_cast<double>(a.n_total) * dd;  // small_bank_fused too
    Tensor dense;  // [T, d_in] fp32, already multiplied by -alpha
    const Tensor neg_alpha = alpha.neg().unsqueeze(1);
    if (cost_gram < cost_rec) {
      Tensor G = !gram0.defined() ? at::zeros({d_in, d_in}, x.options().dtype(at::kFloat))
                 : a.n[1] > 0      ? gram0.clone()  // the caller's cache is read-only
                                   : gram0;
      for (int s = 0; s < 2; ++s) {
        if (a.n[s] == 0 || (s == 0 && gram0.defined())) continue;
        road_mm(a, G, road_keys(a, s).t(), road_keys(a, s), true);
      }
      dense = at::empty({T, d_in}, x.options().dtype(at::kFloat));
      road_mm(a, dense, xf, G, false);
      dense.mul_(neg_alpha);
    } else {
      dense = at::empty({T, d_in}, x.options().dtype(at::kFloat));  // the first product writes it
      const int64_t BT = 1024, BN = 4096;  // bounds the [BT, BN] score buffer to 16 MiB
      for (int64_t t0 = 0; t0 < T; t0 += BT) {
        const int64_t bt = std::min(BT, T - t0);
        Tensor xb = xf.narrow(0, t0, bt), db = dense.narrow(0, t0, bt), nab = neg_alpha.narrow(0, t0, bt);
        bool first = true;
        for (int s = 0; s < 2; ++s)
          for (int64_t lo = 0; lo < a.n[s]; lo += BN) {
            Tensor ak = road_keys(a, s).narrow(0, lo, std::min(BN, a.n[s] - lo));
            Tensor sc = at::empty({bt, ak.size(0)}, x.options().dtype(at::kFloat));
            road_mm(a, sc, xb, ak.t(), false);
            sc.mul_(nab);
            road_mm(a, db, sc, ak, !first);
            first = false;
          }
      }
    }
    // sparse part, then one write in x's dtype
    gx = at::empty({T, d_in}, x.options());
    const float* GS = g_sel.data_ptr<float>();
    const int64_t* I = idx.data_ptr<int64_t>();
    float* D = dense.data_ptr<float>();
    const int nth = threads_for_stream(dT * dK * static_cast<double>(d_in));
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
    for (int64_t t = 0; t < T; ++t) {
      float* row = D + t * d_in;
      for (int64_t i = 0; i < K; ++i) {
        axpy_key(a, I[t * K + i], GS[t * K + i], row);
      }
      store_row_any(row, gx, t);
    }
  }

  for (int s = 0; s < 2; ++s) {
    if (!need_seg[s]) continue;
    const int64_t ns = a.n[s], lo_s = a.lo[s];
    if (ns == 0) {
      gk[s] = at::zeros_like(a.keys[s]);
      gv[s] = at::zeros_like(a.values[s]);
      continue;
    }
    // dA_s = gp_sᵀ x with gp_s = -alpha∘(x A_sᵀ) + the selected g_sel: dense over this
    // segment's atoms only, in [BT, BN] tiles; the addmm_ chain runs in a fixed order.
    if (fused) {
      gk[s] = gk_fused[s].to(a.keys[s].scalar_type());
    } else {
    Tensor gkf = at::empty({ns, d_in}, x.options().dtype(at::kFloat));  // the first block writes it
    const int64_t BT = 1024, BN = 4096;
    const float* GS = g_sel.data_ptr<float>();
    const int64_t* I = idx.data_ptr<int64_t>();
    const float* AL = alpha.data_ptr<float>();
    for (int64_t t0 = 0; t0 < T; t0 += BT) {
      const int64_t bt = std::min(BT, T - t0);
      Tensor xb = xf.narrow(0, t0, bt);
      for (int64_t lo = 0; lo < ns; lo += BN) {
        const int64_t bn = std::min(BN, ns - lo);
        Tensor ak = road_keys(a, s).narrow(0, lo, bn);
        Tensor gp = at::empty({bt, bn}, x.options().dtype(at::kFloat));
        road_mm(a, gp, xb, ak.t(), false);
        gp_rows(gp.data_ptr<float>(), bt, bn, t0, lo_s + lo, AL, GS, I, K);
        Tensor gkb = gkf.narrow(0, lo, bn);
        road_mm(a, gkb, gp.t(), xb, t0 != 0);
      }
    }
    gk[s] = gkf.to(a.keys[s].scalar_type());
    }
    const int64_t* I = idx.data_ptr<int64_t>();

    // dB_s: scatter of coef_v · gy over the selected rows of this segment, made
    // deterministic by a counting sort of the (token, slot) pairs by atom, then one
    // owner thread per atom summing its pairs in token order.
    std::vector<int64_t> start(ns + 1, 0);
    for (int64_t e = 0; e < T * K; ++e) {
      const int64_t j = I[e] - lo_s;
      if (j >= 0 && j < ns) ++start[j + 1];
    }
    for (int64_t j = 0; j < ns; ++j) start[j + 1] += start[j];
    std::vector<int64_t> order(start[ns]);
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t e = 0; e < T * K; ++e) {
        const int64_t j = I[e] - lo_s;
        if (j >= 0 && j < ns) order[fill[j]++] = e;
      }
    }
    gv[s] = at::empty({ns, d_out}, a.values[s].options());
    const float* CV = coef_v.data_ptr<float>();
    const float* G = gyf.data_ptr<float>();
    const int nth = threads_for_stream(static_cast<double>(start[ns]) * static_cast<double>(d_out));
    // about four chunks a thread: a fixed chunk of 16 gave one task's 16 trainable atoms to
    // a single thread
    const int64_t chunk = std::max<int64_t>(1, ns / (4 * static_cast<int64_t>(nth)));
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nth) if (nth > 1)
    for (int64_t j = 0; j < ns; ++j) {
      std::vector<float> acc(d_out, 0.f);
      for (int64_t q = start[j]; q < start[j + 1]; ++q) {
        const int64_t e = order[q];
        axpy_row(CV[e], G + (e / K) * d_out, acc.data(), d_out);
      }
      store_row_any(acc.data(), gv[s], j);
    }
  }

  auto or_empty = [&](const Tensor& t) { return t.defined() ? t : x.new_empty({0}); };
  return {or_empty(gx), or_empty(gk[0]), or_empty(gv[0]), or_empty(gk[1]), or_empty(gv[1])};
}

}  // namespace

namespace moram_cpu {
// The road lowp_gemm_road takes now for a call in dtype ("bfloat16" or "float16"), for
// tests and benchmarks (bound as _C.cpu_lowp_road in csrc/ops.cpp).
std::string lowp_road(const std::string& dtype) {
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "cpu_lowp_road: dtype must be 'bfloat16' or 'float16', got '",
              dtype, "'");
  return lowp_gemm_road(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf) ? "native" : "fp32";
}

// src (fp32 [rows, n]) written row by row into a new tensor of dtype through the kernels' own
// row store (store_row_any: the forward's output rows, the backward's gradient rows), for
// the tests that pin its rounding to torch's (bound as _C.cpu_store_rows in csrc/ops.cpp).
at::Tensor store_rows(const at::Tensor& src, const std::string& dtype) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 2,
              "cpu_store_rows: src must be a float32 CPU tensor [rows, n], got ", src.scalar_type(), " ",
              src.sizes());
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16" || dtype == "float32",
              "cpu_store_rows: dtype must be 'bfloat16', 'float16' or 'float32', got '", dtype, "'");
  const at::ScalarType dt = dtype == "bfloat16" ? at::kBFloat16 : dtype == "float16" ? at::kHalf : at::kFloat;
  const at::Tensor s = src.contiguous();
  at::Tensor out = at::empty(s.sizes(), s.options().dtype(dt));
  for (int64_t r = 0; r < s.size(0); ++r) store_row_any(s.data_ptr<float>() + r * s.size(1), out, r);
  return out;
}

// acc (fp32 [d]) = Σ_i coef_i values[ids_i] through the kernels' gather (gather_values: eight
// fp32 rows at a time, then four, then one), values [N, d] fp32/bf16/fp16, for the tests that
// pin its loops and conversions (bound as _C.cpu_gather_rows in csrc/ops.cpp).
at::Tensor gather_rows(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& coef) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 2 && is_float_type(values.scalar_type()),
              "cpu_gather_rows: values must be a float CPU tensor [N, d], got ", values.scalar_type(), " ",
              values.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && coef.scalar_type() == at::kFloat &&
                  coef.sizes() == ids.sizes(),
              "cpu_gather_rows: ids must be int64 [K] and coef float32 [K]");
  const at::Tensor v = values.contiguous(), i = ids.contiguous(), c = coef.contiguous();
  const int64_t N = v.size(0), d = v.size(1), K = i.size(0);
  const int64_t* I = i.data_ptr<int64_t>();
  for (int64_t e = 0; e < K; ++e) TORCH_CHECK(I[e] >= 0 && I[e] < N, "cpu_gather_rows: id ", I[e], " out of [0, ", N, ")");
  // NaN to start: a gather that read acc before its first write would show
  at::Tensor acc = at::full({d}, std::numeric_limits<float>::quiet_NaN(), v.options().dtype(at::kFloat));
  switch (v.scalar_type()) {
    case at::kFloat: gather_values(ValueRows<float>(v.data_ptr<float>(), d), I, c.data_ptr<float>(), K, acc.data_ptr<float>()); break;
    case at::kHalf: gather_values(ValueRows<at::Half>(v.data_ptr<at::Half>(), d), I, c.data_ptr<float>(), K, acc.data_ptr<float>()); break;
    default: gather_values(ValueRows<at::BFloat16>(v.data_ptr<at::BFloat16>(), d), I, c.data_ptr<float>(), K, acc.data_ptr<float>()); break;
  }
  return acc;
}

// The scores of a 1-D fp32 row above `floor` as select_row's pass packs them, through the
// pass of `road` ("portable", or "avx2" where this CPU has it): (scores, places), for tests.
std::tuple<at::Tensor, at::Tensor> pass_above(const at::Tensor& row, double floor, const std::string& road) {
  TORCH_CHECK(row.device().is_cpu() && row.dim() == 1 && row.scalar_type() == at::kFloat,
              "cpu_pass_above: row must be a 1-D float32 CPU tensor");
  TORCH_CHECK(row.size(0) <= INT32_MAX, "cpu_pass_above: row too long");
  PassFn fn = pass_portable;
  if (road == "avx2") {
#ifdef MORAM_X86_SIMD
    TORCH_CHECK(pick_pass() == pass_avx2, "cpu_pass_above: this CPU (or build) has no avx2 pass");
    fn = pass_avx2;
#else
    TORCH_CHECK(false, "cpu_pass_above: this build has no avx2 pass");
#endif
  } else {
    TORCH_CHECK(road == "portable", "cpu_pass_above: road must be 'portable' or 'avx2', got '", road, "'");
  }
  const at::Tensor r = row.contiguous();
  const int64_t n = r.size(0);
  // NaN beyond the count: a pass that claimed more than it packed would show
  at::Tensor v = at::full({n + 8}, std::numeric_limits<float>::quiet_NaN(), r.options());
  at::Tensor p = at::full({n + 8}, -1, r.options().dtype(at::kInt));
  const int64_t m = fn(r.data_ptr<float>(), n, static_cast<float>(floor), v.data_ptr<float>(), p.data_ptr<int32_t>());
  return {v.narrow(0, 0, m), p.narrow(0, 0, m).to(at::kLong)};
}

}  // namespace moram_cpu

TORCH_LIBRARY_IMPL(moram_kernels_C, CPU, m) {
  m.impl("moram_fwd", &moram_fwd_cpu);
  m.impl("moram_bwd", &moram_bwd_cpu);
}
