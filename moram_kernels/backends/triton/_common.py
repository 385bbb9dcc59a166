"""Shared Triton helpers: interpreter switch, K buckets, block configs, the two
``@triton.jit`` building blocks (running top-K merge, K-row gather) and the gather
kernel used by both the forward (y) and the backward (dx)."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read once, like @triton.jit does: flipping the variable later changes nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

K_BUCKETS = (8, 16, 32, 64)   # running top-K widths; a K that is not a bucket pins the extra slots
MAX_K = K_BUCKETS[-1]
DECODE_T = 64                 # at most this many tokens: decode tiles (small token blocks)

_TORCH_TO_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tl_name(dtype: torch.dtype) -> str:
    return _TORCH_TO_TL[dtype]


def k_bucket(k: int) -> int:
    for b in K_BUCKETS:
        if k <= b:
            return b
    raise ValueError(f"the triton backend keeps at most {MAX_K} atoms per token, asked for K = {k}")


@dataclass(frozen=True)
class ScanConfig:
    """Block shape of the scoring kernel: BT tokens x BN atoms, d_in in chunks of BD.
    ``per_sm``: programs resident per SM on sm_90, which sizes the grid to one wave
    (``.ci/triton_compile_check.py`` derives it from the compiled registers and
    shared memory and flags a config whose value is wrong)."""

    name: str
    BT: int
    BN: int
    BD: int
    num_warps: int
    num_stages: int
    per_sm: int = 1


def scan_config(t: int, kp: int, compute: str, prec: str = "tf32", *, gpu_tiles: bool = False) -> ScanConfig:
    """Config for T tokens, K bucket kp, dot dtype ``compute`` ("bf16"/"fp16"/"fp32") and
    fp32 dot precision ``prec`` ("tf32"/"ieee"). ``gpu_tiles`` makes the interpreter use
    the GPU's shapes too."""
    if INTERPRET and not gpu_tiles:
        # small tiles so that tiny test shapes still cross tiles, splits and d_in chunks
        return ScanConfig("interp", 16, 32, 32, 1, 1)
    cfgs = scan_configs(compute, kp, prec)
    if t <= 16:
        return cfgs["decode16"]
    if t <= DECODE_T and "decode64" in cfgs:
        return cfgs["decode64"]
    return cfgs["prefill"]


def scan_configs(compute: str, kp: int, prec: str = "tf32") -> dict[str, ScanConfig]:
    """Every GPU config the launcher can pick for one (dtype, K bucket, fp32 precision)."""
    if compute == "fp32" and prec == "ieee":
        # exact fp32 dot products (float32_matmul_precision "highest") run on CUDA cores:
        # small tiles, two regimes
        return {
            # 4 warps were capped at 128 registers and spilled; 2 warps take ~200, no spills
            "decode16": ScanConfig("decode16", 16, 64, 32, 2, 3, per_sm=4),
            "prefill": ScanConfig("prefill", 32, 64, 32, 4, 2, per_sm=2),   # 64 rows spill registers
        }
    # tensor cores; fp32 operands (TF32) take twice the shared memory per element: BD halves.
    # Prefill tiles are sized by the registers the compiler reports (.ci/triton_compile_check.py):
    # 128 x 128 used 255 per thread and spilled at K16; 128 x 64 holds the score tile, its
    # masked copy for the merge and the running lists in ~190, no spills; K >= 32 lists
    # take 64 x 64 tiles (<= ~240 registers, two 4-warp programs per SM).
    bd = 32 if compute == "fp32" else 64
    prefill = (ScanConfig("prefill", 128, 64, bd, 8, 3, per_sm=1) if kp <= 16
               else ScanConfig("prefill", 64, 64, bd, 4, 3, per_sm=2))
    return {
        # K64 lists with 4 stages were capped at 128 registers and spilled 40 B
        "decode16": ScanConfig("decode16", 16, 64, 2 * bd, 4, 4 if kp <= 32 else 3, per_sm=2),
        "decode64": ScanConfig("decode64", 64, 64, 2 * bd, 4, 3, per_sm=2),
        "prefill": prefill,
    }


# epilogue / backward kernels: token block, output chunk, candidate chunk
def small_block(kp: int, interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """(BT tokens, BO output columns, BC candidates) for the select and backward kernels."""
    if interpret:
        return 8, 32, 32 if kp <= 32 else kp
    return 16, 128, max(64, kp)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4            # interpreter: a pretend GPU small enough to force N splits in tests
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_ctx(device: torch.device):
    """Launch on the tensors' GPU (Triton uses the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---- jit building blocks --------------------------------------------------------------------

@triton.jit
def round_tf32(v):
    """fp32 -> the nearest TF32 value (ties away from zero, as ``cvt.rna.tf32.f32``), kept
    in fp32: what a GPU's TF32 ``tl.dot`` does to its operands. NaN stays NaN."""
    b = v.to(tl.uint32, bitcast=True)
    r = ((b + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(v == v, r, v)


@triton.jit
def dot_operands(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """The two operands of a ``tl.dot``, as a GPU's tensor cores see them. With ``UPCAST``
    (the interpreter only: its 16-bit dot multiplies raw bits) 16-bit operands are upcast
    exactly and fp32 ones rounded as a GPU's TF32 dot rounds them; otherwise unchanged."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if PREC == "tf32":
            a = round_tf32(a)
            b = round_tf32(b)
    return a, b


@triton.jit
def dot_xkt(xa, ka, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc + xa . ka^T`` with :func:`dot_operands`' interpreter upcast."""
    xa, ka = dot_operands(xa, ka, UPCAST, PREC)
    return tl.dot(xa, tl.trans(ka), acc, input_precision=PREC)


@triton.jit
def load_scale(sc0_ptr, sc1_ptr, has_s0, has_s1, ids, N0, mask):
    """Per-atom value scale of global ``ids`` (1 for a segment without a scale vector)."""
    in0 = ids < N0
    s0 = tl.load(sc0_ptr + ids, mask=mask & in0 & (has_s0 != 0), other=1.0)
    s1 = tl.load(sc1_ptr + (ids - N0), mask=mask & (ids >= N0) & (has_s1 != 0), other=1.0)
    return tl.where(in0, s0, s1)


@triton.jit
def gate_epilogue(run_v, run_i, ss, rows, t_mask, K, N0, tau, delta, eps, sc0_ptr, sc1_ptr,
                  has_s0, has_s1, idx_ptr, psel_ptr, norm_ptr, coef_ptr, KP: tl.constexpr):
    """The gate on a token block's selected lists ``run_v/run_i [BT, KP]`` (slots ``>= K``
    ignored) and sums of squares ``ss [BT]``: norm, ``s = p / norm``, softmax at tau, the
    threshold, ``c = w * m * p * scale``; stores idx, p_sel, c ``[T, K]`` and norm ``[T]``
    (what the backward reads). Shared by every select kernel."""
    slot = tl.arange(0, KP)
    live = slot < K
    norm = tl.maximum(tl.sqrt(ss), eps, propagate_nan=tl.PropagateNan.ALL)
    m2 = t_mask[:, None] & live[None, :]
    # zero the pinned slots and the rows past T so no inf - inf appears below
    p = tl.where(m2, run_v, 0.0)
    s = p / norm[:, None]
    z = tl.where(live[None, :], s / tau, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    w = e / tl.sum(e, 1)[:, None]
    keep = ((s >= delta) | (delta <= 0.0)).to(tl.float32)
    ids = run_i.to(tl.int64)
    sc = load_scale(sc0_ptr, sc1_ptr, has_s0, has_s1, ids, N0, m2)
    c = w * keep * p * sc
    out = rows[:, None] * K + slot[None, :]
    tl.store(idx_ptr + out, ids, mask=m2)
    tl.store(psel_ptr + out, run_v, mask=m2)
    tl.store(coef_ptr + out, c, mask=m2)
    tl.store(norm_ptr + rows, norm, mask=t_mask)


@triton.jit
def merge_topk(run_v, run_i, cand_v, cand_i, KP: tl.constexpr, BC: tl.constexpr):
    """Merge candidates ``cand_v/cand_i [BT, BC]`` (-inf where invalid) into the running
    lists ``run_v/run_i [BT, KP]`` (slots beyond K hold +inf and are never replaced).

    Only candidates above the current K-th best are considered, and the loop runs as
    many times as the row with the most such candidates needs (at most KP). A tile costs
    one compare and one reduction only when no row has such a candidate: common with one
    real row (decode), never at 128 rows (about 280 rounds over a prefill program's 64
    tiles; :mod:`.model` simulates it).
    """
    ninf = float("-inf")
    thr = tl.min(run_v, 1)
    cand_v = tl.where(cand_v > thr[:, None], cand_v, ninf)
    cnt = tl.sum((cand_v > ninf).to(tl.int32), 1)
    n_iter = tl.minimum(tl.max(cnt, 0), KP)
    slot = tl.arange(0, KP)
    col = tl.arange(0, BC)
    for _ in range(n_iter):
        best = tl.max(cand_v, 1)
        at = tl.argmax(cand_v, 1)
        worst = tl.min(run_v, 1)
        pos = tl.argmin(run_v, 1)
        pick = col[None, :] == at[:, None]
        best_i = tl.sum(tl.where(pick, cand_i, 0), 1)
        hit = (slot[None, :] == pos[:, None]) & (best > worst)[:, None]
        run_v = tl.where(hit, best[:, None], run_v)
        run_i = tl.where(hit, best_i[:, None], run_i)
        cand_v = tl.where(pick, ninf, cand_v)
    return run_v, run_i


GROUP = 8   # K rows loaded back to back per step of the gathers (unrolled; compile time grows fast)


@triton.jit
def gather_rows(acc, idx_ptr, coef_ptr, K, rows, t_mask,
                r0_ptr, r1_ptr, N0, s0n, s0d, s1n, s1d, o, o_mask, G: tl.constexpr):
    """``acc [BT, BO] += sum_k coef[t, k] * row(idx[t, k])[o]`` with the rows taken from
    segment 0 (ids < N0) or segment 1 (ids - N0); idx/coef are [T, K] in memory.

    Steps of G unrolled slots (those >= K masked, so they move no bytes): G independent
    row loads in flight at once, which decode needs."""
    for k0 in range(0, K, G):
        for j in tl.static_range(G):
            k = k0 + j
            tm = t_mask & (k < K)
            ik = tl.load(idx_ptr + rows * K + k, mask=tm, other=0).to(tl.int64)
            ck = tl.load(coef_ptr + rows * K + k, mask=tm, other=0.0)
            in0 = ik < N0
            m0 = (tm & in0)[:, None] & o_mask[None, :]
            m1 = (tm & (ik >= N0))[:, None] & o_mask[None, :]
            b0 = tl.load(r0_ptr + ik[:, None] * s0n + o[None, :] * s0d, mask=m0, other=0.0)
            b1 = tl.load(r1_ptr + (ik - N0)[:, None] * s1n + o[None, :] * s1d, mask=m1, other=0.0)
            acc += ck[:, None] * (b0.to(tl.float32) + b1.to(tl.float32))
    return acc


@triton.jit
def token_col_tile(T, DO, BT: tl.constexpr, BO: tl.constexpr):
    """This program's tile of a (token blocks, column chunks) grid: token ids and column
    ids, both int64 (``t * stride`` and ``o * stride`` pass 2^31 for transposed views),
    and their masks."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    o = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
    return rows, rows < T, o, o < DO


@triton.jit(do_not_specialize=["T", "N0", "K"])
def _moram_gather_kernel(idx_ptr, coef_ptr, alpha_ptr, r0_ptr, r1_ptr, dense_ptr, out_ptr,
                         T, N0, K, DO, has_dense,
                         s0n, s0d, s1n, s1d, sdt, sdd, sot, sod,
                         BT: tl.constexpr, BO: tl.constexpr, G: tl.constexpr):
    """``out[t] = sum_k coef[t, k] * row(idx[t, k]) - alpha[t] * dense[t]`` (the dense term
    only if has_dense), ``[T, DO]``. Forward: y from the value rows. Backward: dx from the
    key rows plus the ``-alpha * (G x)`` term. Grid: (token blocks, column chunks)."""
    rows, t_mask, o, om = token_col_tile(T, DO, BT, BO)
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    acc = gather_rows(acc, idx_ptr, coef_ptr, K, rows, t_mask, r0_ptr, r1_ptr, N0,
                      s0n, s0d, s1n, s1d, o, om, G)
    m = t_mask[:, None] & om[None, :]
    if has_dense != 0:
        a = tl.load(alpha_ptr + rows, mask=t_mask, other=0.0)
        dn = tl.load(dense_ptr + rows[:, None] * sdt + o[None, :] * sdd, mask=m, other=0.0)
        acc -= a[:, None] * dn.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * sot + o[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=m)


def launch_gather(idx, coef, rows0, rows1, n0, out, kp, alpha=None, dense=None):
    """Run :func:`_moram_gather_kernel` into ``out [T, DO]``."""
    T, DO = out.shape
    bt, bo, _ = small_block(kp)
    has = dense is not None
    with device_ctx(out.device):
        _moram_gather_kernel[(triton.cdiv(T, bt), triton.cdiv(DO, bo))](
            # absent alpha/dense: pass coef (fp32, never read) so both uses share one variant
            idx, coef, alpha if has else coef, rows0, rows1, dense if has else coef, out,
            T, n0, idx.shape[1], DO, int(has),
            rows0.stride(0), rows0.stride(1), rows1.stride(0), rows1.stride(1),
            *(dense.stride() if has else (0, 0)), out.stride(0), out.stride(1),
            BT=bt, BO=bo, G=GROUP, num_warps=4)
