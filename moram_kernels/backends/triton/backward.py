"""Backward (docs/op.md, "Backward"): a gather-dot kernel for ``gc`` (split over column
chunks), a kernel for the softmax / norm terms, a gather kernel for the sparse part of
``dx`` fused with the dense ``-alpha * (G x)`` term, and a scatter-add kernel for ``dB``
(atomics, or a deterministic sorted reduction). The dense GEMMs (``x G``, ``P_s = x A_s^T``,
``dA_s = gp_s^T x``) are plain torch matmuls, run only for the segments that need them.

Two variants, chosen per call by ``MORAM_TRITON_BWD`` (:func:`bwd_variant`, docs/backends.md):

- ``v1``: the dense term of every segment is a ``[T, d_in]`` fp32 tensor (``x G`` or
  ``P A``) summed in torch and read by the shared gather kernel; a Gram matrix that is not
  given is built in fp32; every dB program reads its whole ``gy`` tile.
- ``v2`` (``auto``): a small segment whose term is ``P A`` (the trainable one, at most
  :data:`FOLD_MAX` atoms) is folded into the dx kernel (``_moram_bwd_dx_kernel``: ``P``
  ``[T, n_s]`` times the segment's keys on tensor cores, no ``[T, d_in]`` tensor for it);
  a Gram matrix is built in the compute dtype (one GEMM, fp32 accumulation); the atomic dB
  kernel reads ``gy`` only for the tokens that selected an atom of its segment (a program
  with no such token reads nothing).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._precision import lowest
from ..._warnings import warn_once
from ._common import (GROUP, INTERPRET, device_ctx, dot_operands, gather_rows, k_bucket, launch_gather, load_scale,
                      small_block, tl_name, token_col_tile)
from .forward import dot_precision

__all__ = ["moram_bwd", "bwd_variant", "BWD_VARIANTS"]

#: allowed values of ``MORAM_TRITON_BWD``
BWD_VARIANTS = ("auto", "v1", "v2")
#: v2 folds a segment's ``P A`` term into the dx kernel up to this many atoms
FOLD_MAX = 128
#: atoms per ``tl.dot`` step of the folded term
FOLD_BR = 16


def bwd_variant() -> str:
    """The backward variant of this call: ``MORAM_TRITON_BWD`` read now (so a benchmark can
    flip it between calls), "auto" or unset meaning "v2"; an unknown value raises."""
    v = os.environ.get("MORAM_TRITON_BWD", "auto").strip().lower() or "auto"
    if v not in BWD_VARIANTS:
        raise ValueError(f"MORAM_TRITON_BWD={v!r}: expected one of {', '.join(BWD_VARIANTS)}")
    return "v2" if v == "auto" else v


@triton.jit(do_not_specialize=["T", "N0", "K"])
def _moram_bwd_gc_kernel(gy_ptr, v0_ptr, v1_ptr, idx_ptr, part_ptr,
                         T, N0, K, DO, sgt, sgd, sv0n, sv0d, sv1n, sv1d,
                         BT: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr, G: tl.constexpr):
    """Gather-dot over one column chunk: ``part[chunk, t, k] = b_{idx[t, k]}[o] . gy[t, o]``.
    Grid (token blocks, column chunks); the chunks are summed in a fixed order later."""
    rows, t_mask, o, om = token_col_tile(T, DO, BT, BO)
    slot = tl.arange(0, KP)
    g = tl.load(gy_ptr + rows[:, None] * sgt + o[None, :] * sgd,
                mask=t_mask[:, None] & om[None, :], other=0.0).to(tl.float32)
    gc = tl.zeros([BT, KP], dtype=tl.float32)
    for k0 in range(0, K, G):
        for j in tl.static_range(G):   # G independent row loads in flight per step
            k = k0 + j
            tm = t_mask & (k < K)
            ik = tl.load(idx_ptr + rows * K + k, mask=tm, other=0)
            in0 = ik < N0
            b0 = tl.load(v0_ptr + ik[:, None] * sv0n + o[None, :] * sv0d,
                         mask=(tm & in0)[:, None] & om[None, :], other=0.0)
            b1 = tl.load(v1_ptr + (ik - N0)[:, None] * sv1n + o[None, :] * sv1d,
                         mask=(tm & (ik >= N0))[:, None] & om[None, :], other=0.0)
            dot = tl.sum((b0.to(tl.float32) + b1.to(tl.float32)) * g, 1)
            gc = tl.where(slot[None, :] == k, dot[:, None], gc)
    at = (tl.program_id(1).to(tl.int64) * T + rows)[:, None] * KP + slot[None, :]
    tl.store(part_ptr + at, gc, mask=t_mask[:, None])


@triton.jit(do_not_specialize=["n_chunks", "T", "N0", "K"])
def _moram_bwd_coef_kernel(part_ptr, n_chunks, sc0_ptr, sc1_ptr, idx_ptr, psel_ptr, norm_ptr,
                           gsel_ptr, alpha_ptr, cb_ptr,
                           T, N0, K, tau, delta, eps, has_s0, has_s1,
                           BT: tl.constexpr, KP: tl.constexpr):
    """Per token: ``gc_k = scale_k * (b_k . gy)`` (sum of the chunk partials), then
    ``g_sel [T, K]`` (the sparse part of gp), ``alpha [T]`` and ``cb = c_k * scale_k [T, K]``
    (the dB coefficient)."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    t_mask = rows < T
    slot = tl.arange(0, KP)
    live = slot < K
    m2 = t_mask[:, None] & live[None, :]
    at = rows[:, None] * K + slot[None, :]
    ids = tl.load(idx_ptr + at, mask=m2, other=0)
    p = tl.load(psel_ptr + at, mask=m2, other=0.0)
    nrm = tl.load(norm_ptr + rows, mask=t_mask, other=1.0)
    gc = tl.zeros([BT, KP], dtype=tl.float32)
    at_c = rows   # int64: chunk c's rows start at c * T
    for _ in range(n_chunks):
        gc += tl.load(part_ptr + at_c[:, None] * KP + slot[None, :], mask=m2, other=0.0)
        at_c += T
    sc = load_scale(sc0_ptr, sc1_ptr, has_s0, has_s1, ids, N0, m2)
    gc = gc * sc
    s = p / nrm[:, None]
    z = tl.where(live[None, :], s / tau, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    w = e / tl.sum(e, 1)[:, None]
    keep = ((s >= delta) | (delta <= 0.0)).to(tl.float32)
    gw = keep * p * gc
    gs = (w / tau) * (gw - tl.sum(w * gw, 1)[:, None])
    g_sel = w * keep * gc + gs / nrm[:, None]
    alpha = tl.sum(gs * p, 1) / (nrm * nrm * nrm)
    # n = max(||p||, eps) is a constant where it was clamped: no norm gradient there
    alpha = tl.where(nrm > eps, alpha, 0.0)
    tl.store(gsel_ptr + at, g_sel, mask=m2)
    tl.store(cb_ptr + at, w * keep * p * sc, mask=m2)
    tl.store(alpha_ptr + rows, alpha, mask=t_mask)


@triton.jit(do_not_specialize=["T", "K", "lo", "hi"])
def _moram_bwd_db_atomic_kernel(idx_ptr, cb_ptr, gy_ptr, gv_ptr, T, K, lo, hi, DO, sgt, sgd,
                                BT: tl.constexpr, BO: tl.constexpr):
    """``gv[idx - lo] += cb * gy`` for the selected atoms in ``[lo, hi)``; gv fp32 ``[hi - lo, d_out]``."""
    rows, t_mask, o, om = token_col_tile(T, DO, BT, BO)
    g = tl.load(gy_ptr + rows[:, None] * sgt + o[None, :] * sgd,
                mask=t_mask[:, None] & om[None, :], other=0.0).to(tl.float32)
    # a runtime loop is enough here: the atomic adds return nothing, so nothing waits on them
    for k in range(K):
        ik = tl.load(idx_ptr + rows * K + k, mask=t_mask, other=0)
        ck = tl.load(cb_ptr + rows * K + k, mask=t_mask, other=0.0)
        inside = t_mask & (ik >= lo) & (ik < hi)
        tl.atomic_add(gv_ptr + (ik - lo)[:, None] * DO + o[None, :], ck[:, None] * g,
                      mask=inside[:, None] & om[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["K"])
def _moram_bwd_db_sorted_kernel(perm_ptr, off_ptr, cb_ptr, gy_ptr, gv_ptr, K, DO, sgt, sgd,
                                svn, svd, BE: tl.constexpr, BO: tl.constexpr):
    """Deterministic dB: program per (atom, column chunk) reduces that atom's entries in
    the fixed order given by ``perm`` (flat ``t * K + k`` positions sorted by atom)."""
    row = tl.program_id(0)
    o = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
    om = o < DO
    start = tl.load(off_ptr + row)
    end = tl.load(off_ptr + row + 1)
    acc = tl.zeros([BO], dtype=tl.float32)
    for e0 in range(start, end, BE):
        e = e0 + tl.arange(0, BE)
        em = e < end
        pos = tl.load(perm_ptr + e, mask=em, other=0)
        c = tl.load(cb_ptr + pos, mask=em, other=0.0)
        t = pos // K
        g = tl.load(gy_ptr + t[:, None] * sgt + o[None, :] * sgd, mask=em[:, None] & om[None, :], other=0.0)
        acc += tl.sum(c[:, None] * g.to(tl.float32), 0)
    tl.store(gv_ptr + row.to(tl.int64) * svn + o * svd, acc.to(gv_ptr.dtype.element_ty), mask=om)


@triton.jit
def _fold_rows(acc, p_ptr, spt, spn, k_ptr, skn, skd, F, rows, t_mask, o, om,
               BR: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc [BT, BO] += P[rows, :F] @ keys[:F, o]``: a folded segment's ``sum_j p_j a_j``.
    P (fp32) is rounded to the keys' dtype, as the torch GEMM of v1 rounds it; tensor-core
    ``tl.dot`` with fp32 accumulation, BR atoms per step."""
    r = tl.arange(0, BR)
    for r0 in range(0, F, BR):
        rr = r0 + r
        rm = rr < F
        pt = tl.load(p_ptr + rows[:, None] * spt + rr[None, :] * spn,
                     mask=t_mask[:, None] & rm[None, :], other=0.0)
        kt = tl.load(k_ptr + rr.to(tl.int64)[:, None] * skn + o[None, :] * skd,
                     mask=rm[:, None] & om[None, :], other=0.0)
        pt, kt = dot_operands(pt.to(kt.dtype), kt, UPCAST, PREC)
        acc = tl.dot(pt, kt, acc, input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["T", "N0", "K", "F0", "F1"])
def _moram_bwd_dx_kernel(idx_ptr, gsel_ptr, alpha_ptr, k0_ptr, k1_ptr, dense_ptr, p0_ptr, p1_ptr,
                         out_ptr, T, N0, K, DO, F0, F1, has_dense,
                         s0n, s0d, s1n, s1d, sdt, sdd, sp0t, sp0n, sp1t, sp1n, sot, sod,
                         BT: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr, G: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr):
    """v2 dx: ``out = sum_k g_sel[t, k] a_{idx[t, k]} - alpha[t] * (dense[t] + P0[t] A0 + P1[t] A1)``
    where ``dense`` (if has_dense) holds the materialised terms and segment s is folded when
    ``Fs`` (its atom count) is nonzero. Grid: (token blocks, column chunks of d_in)."""
    rows, t_mask, o, om = token_col_tile(T, DO, BT, BO)
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    acc = gather_rows(acc, idx_ptr, gsel_ptr, K, rows, t_mask, k0_ptr, k1_ptr, N0,
                      s0n, s0d, s1n, s1d, o, om, G)
    m = t_mask[:, None] & om[None, :]
    dn = tl.zeros([BT, BO], dtype=tl.float32)
    if has_dense != 0:
        dn += tl.load(dense_ptr + rows[:, None] * sdt + o[None, :] * sdd, mask=m, other=0.0).to(tl.float32)
    dn = _fold_rows(dn, p0_ptr, sp0t, sp0n, k0_ptr, s0n, s0d, F0, rows, t_mask, o, om, BR, UPCAST, PREC)
    dn = _fold_rows(dn, p1_ptr, sp1t, sp1n, k1_ptr, s1n, s1d, F1, rows, t_mask, o, om, BR, UPCAST, PREC)
    a = tl.load(alpha_ptr + rows, mask=t_mask, other=0.0)
    acc -= a[:, None] * dn
    tl.store(out_ptr + rows[:, None] * sot + o[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T", "K", "lo", "hi"])
def _moram_bwd_db_hit_kernel(idx_ptr, cb_ptr, gy_ptr, gv_ptr, stats_ptr, T, K, lo, hi, DO, sgt, sgd,
                             BT: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                             STATS: tl.constexpr):
    """v2 atomic dB: ``gv[idx - lo] += cb * gy`` for the selected atoms in ``[lo, hi)``, reading
    ``gy`` only for the tokens of the block that selected such an atom: the block's
    ``[BT, K]`` ids (one small load) give the hit rows; a block with none reads no ``gy``
    and adds nothing. ``STATS`` (tests only): add the number of ``gy`` rows read to
    ``stats_ptr[0]``."""
    rows, t_mask, o, om = token_col_tile(T, DO, BT, BO)
    slot = tl.arange(0, KP)
    m2 = t_mask[:, None] & (slot < K)[None, :]
    ids = tl.load(idx_ptr + rows[:, None] * K + slot[None, :], mask=m2, other=-1)
    inside = m2 & (ids >= lo) & (ids < hi)
    hit = tl.max(inside.to(tl.int32), 1) > 0       # the gy rows this program reads
    n_hit = tl.sum(hit.to(tl.int32), 0)
    if STATS:
        tl.atomic_add(stats_ptr, n_hit)
    if n_hit > 0:
        g = tl.load(gy_ptr + rows[:, None] * sgt + o[None, :] * sgd,
                    mask=hit[:, None] & om[None, :], other=0.0).to(tl.float32)
        for k in range(K):
            ik = tl.load(idx_ptr + rows * K + k, mask=hit, other=0)
            ck = tl.load(cb_ptr + rows * K + k, mask=hit, other=0.0)
            ink = hit & (ik >= lo) & (ik < hi)
            tl.atomic_add(gv_ptr + (ik - lo)[:, None] * DO + o[None, :], ck[:, None] * g,
                          mask=ink[:, None] & om[None, :], sem="relaxed")


# ---- dense parts (torch) -----------------------------------------------------------------------

_MM_FP32_OUT: dict[tuple, bool] = {}


def _mm_fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for 16-bit ``dtype`` operands
    on ``device``: probed once per (device, dtype) on a 16 x 16 product; when it does not,
    one warning says that the dense terms fall back to fp32 GEMMs (correct, slower)."""
    key = (device, dtype)
    if key not in _MM_FP32_OUT:
        a = torch.zeros(16, 16, device=device, dtype=dtype)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            ok = True
        except (RuntimeError, TypeError, NotImplementedError) as e:   # the probe only
            ok = False
            warn_once(f"mm-out-dtype-{device}-{dtype}",
                      f"torch.mm(..., out_dtype=torch.float32) is not available for {dtype} on "
                      f"{device} ({type(e).__name__}: {e}); the triton backward forms its dense "
                      "terms with fp32 GEMMs instead, which is correct but several times slower")
        _MM_FP32_OUT[key] = ok
    return _MM_FP32_OUT[key]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result, computed in the lower of the two dtypes (fp32
    intermediates such as P or gp are rounded to the activations' 16-bit dtype, as the
    GEMMs of an autocast region are). 16-bit operands on CUDA run on tensor cores with
    fp32 accumulation and output (``aten::mm.dtype``); fp32 operands follow torch's TF32
    setting. Errors from the product itself (out of memory, say) propagate."""
    low = lowest(a.dtype, b.dtype)
    a, b = a.to(low), b.to(low)
    if _mm_fp32_out_road(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _mm_fp32_out_road(a: torch.Tensor) -> bool:
    """Whether :func:`_mm` multiplies ``a`` (already in the product's dtype) with
    ``aten::mm.dtype``: 16-bit operands on CUDA where the probe found it."""
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _mm_fp32_out_supported(a.device, a.dtype)


def _dense_plan(t: int, d: int, n: int, have_gram: bool, have_p: bool) -> str:
    """How one segment's ``sum_j p_j a_j`` is formed: 'gram' (``x G``, T d^2, plus N d^2 to
    build G) or 'recompute' (``P A``, T N d, plus T N d for P unless already computed)."""
    gram_cost = t * d * d + (0 if have_gram else n * d * d)
    rec_cost = t * n * d * (1 if have_p else 2)
    return "gram" if gram_cost < rec_cost else "recompute"


def _fold_plan(t: int, d: int, n: int, have_gram: bool, have_p: bool) -> str:
    """v2's plan for one segment's dense term: 'fold' (``P A`` inside the dx kernel) for a
    segment of at most :data:`FOLD_MAX` atoms whose term is ``P A`` anyway, else the v1
    plan ('gram' or 'recompute', materialised)."""
    plan = _dense_plan(t, d, n, have_gram, have_p)
    return "fold" if plan == "recompute" and n <= FOLD_MAX else plan


def moram_bwd(gy, x, keys0, values0, scale0, keys1, values1, scale1, gram0,
              idx, p_sel, norm, tau, delta, eps, need_x, need_seg0, need_seg1):
    """Triton backward (contract in :mod:`moram_kernels.backends.reference`): returns
    ``(gx [T, d_in], gkeys0, gvalues0, gkeys1, gvalues1)``, None where not needed.
    The variant (v1 / v2) is :func:`bwd_variant`'s."""
    variant = bwd_variant()
    T, K = idx.shape
    D = x.shape[1]
    n0, n1 = keys0.shape[0], keys1.shape[0]
    # compute in one dtype (the lowest of the inputs', as the forward); each gradient
    # goes back in its own input's dtype
    x_dtype = x.dtype
    dts = [t.dtype for t in (keys0, values0, keys1, values1)]
    cd = lowest(x.dtype, *dts)
    x, gy, keys0, values0, keys1, values1 = (
        v.to(cd) for v in (x, gy, keys0, values0, keys1, values1))
    segs = [(0, 0, n0, keys0, values0, need_seg0), (1, n0, n0 + n1, keys1, values1, need_seg1)]
    # an empty segment is never read; alias it so every pointer argument is a real tensor
    k0p, v0p, k1p, v1p = keys0, values0, keys1, values1
    if n1 == 0:
        k1p, v1p = keys0, values0
    if n0 == 0:
        k0p, v0p = keys1, values1
    DO = v0p.shape[1]
    dev = x.device
    kp = k_bucket(K)
    bt, bo, _ = small_block(kp)
    idx = idx.contiguous()
    p_sel = p_sel.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)
    g_sel = torch.empty(T, K, **f32)
    cb = torch.empty(T, K, **f32)
    alpha = torch.empty(T, **f32)
    dummy = alpha
    n_chunks = triton.cdiv(DO, bo)
    part = torch.empty(n_chunks, T, kp, **f32)
    with device_ctx(dev):
        _moram_bwd_gc_kernel[(triton.cdiv(T, bt), n_chunks)](
            gy, v0p, v1p, idx, part, T, n0, K, DO, gy.stride(0), gy.stride(1),
            v0p.stride(0), v0p.stride(1), v1p.stride(0), v1p.stride(1),
            BT=bt, BO=bo, KP=kp, G=GROUP, num_warps=4)
        _moram_bwd_coef_kernel[(triton.cdiv(T, bt),)](
            part, n_chunks, scale0 if scale0 is not None else dummy,
            scale1 if scale1 is not None else dummy, idx, p_sel, norm,
            g_sel, alpha, cb,
            T, n0, K, float(tau), float(delta), float(eps),
            int(scale0 is not None), int(scale1 is not None),
            BT=bt, KP=kp, num_warps=4)

    # P_s = x A_s^T only for segments whose keys need a gradient: [T, N_s] of that segment
    p_seg: dict[int, torch.Tensor] = {}
    for seg, lo, hi, kseg, _, need in segs:
        if need and hi > lo:
            p_seg[seg] = _mm(x, kseg.t())

    gx = None
    if need_x:
        dense = None
        fold: dict[int, torch.Tensor] = {}      # v2: segment -> P_s, summed inside the dx kernel
        for seg, lo, hi, kseg, _, _ in segs:
            n_s = hi - lo
            if n_s == 0:
                continue
            given = gram0 if seg == 0 else None
            planner = _fold_plan if variant == "v2" else _dense_plan
            plan = planner(T, D, n_s, given is not None, seg in p_seg)
            if plan == "fold":
                fold[seg] = p_seg[seg] if seg in p_seg else _mm(x, kseg.t())
                continue
            if plan == "gram":
                # a given gram0 in x's dtype (MoRAMLinear caches it so) is used as is; v2
                # builds a missing one in the compute dtype (one GEMM, fp32 accumulation),
                # v1 in fp32
                g = given if given is not None else (
                    torch.mm(kseg.t(), kseg) if variant == "v2" else _mm(kseg.t(), kseg))
                term = _mm(x, g)
            else:
                pk = p_seg[seg] if seg in p_seg else _mm(x, kseg.t())
                term = _mm(pk, kseg)
            dense = term if dense is None else dense + term
        gx = torch.empty(T, D, device=dev, dtype=x.dtype)
        if variant == "v2":
            _launch_dx(idx, g_sel, alpha, k0p, k1p, n0, dense, fold.get(0), fold.get(1), gx, kp)
        else:
            launch_gather(idx, g_sel, k0p, k1p, n0, gx, kp, alpha=alpha, dense=dense)
        gx = gx.to(x_dtype)

    grads = [None, None, None, None]
    for seg, lo, hi, kseg, vseg, need in segs:
        if not need:
            continue
        n_s = hi - lo
        gv = _scatter_db(idx, cb, gy, lo, hi, vseg, bt, bo, variant)
        if n_s:
            inside = (idx >= lo) & (idx < hi)
            local = torch.where(inside, idx - lo, torch.zeros_like(idx))
            gp = p_seg[seg] * (-alpha)[:, None]                       # every atom gets -alpha p_j
            gp.scatter_add_(1, local, torch.where(inside, g_sel, torch.zeros_like(g_sel)))
            gk = _mm(gp.t(), x)
        else:
            gk = torch.zeros_like(kseg)
        grads[2 * seg], grads[2 * seg + 1] = gk.to(dts[2 * seg]), gv.to(dts[2 * seg + 1])
    return (gx, *grads)


def _launch_dx(idx, g_sel, alpha, k0, k1, n0, dense, p0, p1, out, kp):
    """v2: run :func:`_moram_bwd_dx_kernel` into ``out [T, d_in]``; ``p0`` / ``p1`` are the
    folded segments' scores (None: not folded), ``dense`` the materialised terms (or None)."""
    T, D = out.shape
    bt, bo, _ = small_block(kp)
    has = dense is not None
    dense_, p0_, p1_ = (v if v is not None else alpha for v in (dense, p0, p1))   # never read
    st = lambda v: v.stride() if v is not None else (0, 0)  # noqa: E731
    with device_ctx(out.device):
        _moram_bwd_dx_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bo))](
            idx, g_sel, alpha, k0, k1, dense_, p0_, p1_, out,
            T, n0, idx.shape[1], D, 0 if p0 is None else p0.shape[1], 0 if p1 is None else p1.shape[1],
            int(has), k0.stride(0), k0.stride(1), k1.stride(0), k1.stride(1),
            *st(dense), *st(p0), *st(p1), out.stride(0), out.stride(1),
            BT=bt, BO=bo, BR=FOLD_BR, G=GROUP, UPCAST=INTERPRET, PREC=dot_precision(tl_name(k0.dtype)),
            num_warps=4)


def _scatter_db(idx, cb, gy, lo, hi, vseg, bt, bo, variant="v2", stats=None):
    """dB of the atoms ``[lo, hi)``, ``[hi - lo, d_out]`` in the values' dtype. ``stats``
    (v2 atomics, tests only): an int32 ``[1]`` tensor that counts the ``gy`` rows read."""
    T, K = idx.shape
    n_s, DO = hi - lo, vseg.shape[1]
    dev = idx.device
    if n_s == 0:
        return torch.zeros_like(vseg)
    if torch.are_deterministic_algorithms_enabled():
        flat = idx.reshape(-1)
        inside = (flat >= lo) & (flat < hi)
        # entries of other segments go to a last bucket that no program reads
        local = torch.where(inside, flat - lo, torch.full_like(flat, n_s))
        srt, perm = torch.sort(local, stable=True)
        # row r owns perm[off[r]:off[r + 1]]; searchsorted keeps this free of atomics; an
        # atom no token selected has an empty range and its programs read no gy
        off = torch.searchsorted(srt, torch.arange(n_s + 1, device=dev, dtype=srt.dtype))
        gv = torch.empty(n_s, DO, device=dev, dtype=vseg.dtype)
        with device_ctx(dev):
            _moram_bwd_db_sorted_kernel[(n_s, triton.cdiv(DO, bo))](
                perm, off, cb, gy, gv, K, DO, gy.stride(0), gy.stride(1),
                gv.stride(0), gv.stride(1), BE=16, BO=bo, num_warps=4)
        return gv
    gv = torch.zeros(n_s, DO, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(T, bt), triton.cdiv(DO, bo))
    with device_ctx(dev):
        if variant == "v2":
            _moram_bwd_db_hit_kernel[grid](
                idx, cb, gy, gv, stats if stats is not None else idx, T, K, lo, hi, DO,
                gy.stride(0), gy.stride(1), BT=bt, BO=bo, KP=k_bucket(K), STATS=stats is not None,
                num_warps=4)
        else:
            _moram_bwd_db_atomic_kernel[grid](
                idx, cb, gy, gv, T, K, lo, hi, DO, gy.stride(0), gy.stride(1),
                BT=bt, BO=bo, num_warps=4)
    return gv.to(vseg.dtype)
