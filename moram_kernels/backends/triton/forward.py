"""Forward: a scoring kernel that streams atom tiles and keeps a running top-K per
token, then a select kernel that merges the per-split lists and applies the gate;
the gather kernel sums the K value rows. No ``[T, N]`` tensor is ever written."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..._precision import fp32_uses_tf32, lowest
from ._common import (INTERPRET, device_ctx, gate_epilogue, k_bucket, launch_gather, merge_topk,
                      scan_config, sm_count, small_block, tl_name)
from .split import _slab_scores, gemm_fwd, split_fwd

__all__ = ["moram_fwd", "plan_splits", "fwd_route", "FWD_ROUTES"]


@triton.jit
def _score_tile(x_ptr, sxt, sxd, rows, t_mask, k_ptr, skn, skd, n_loc, n_mask, D,
                BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Raw scores ``x[rows] . keys[n_loc]``, ``[BT, BN]`` fp32 (zero where masked): the
    split road's slab product over all of d_in."""
    return _slab_scores(x_ptr, sxt, sxd, rows, t_mask, k_ptr, skn, skd, n_loc, n_mask, 0, D,
                        BT, BN, BD, UPCAST, PREC)


# sizes that only bound loops and masks are not specialised (== 1, % 16): a new T or bank
# size must not compile again (inside a CUDA-graph capture, say); D and the strides are,
# since their divisibility decides vectorised, pipelined loads
@triton.jit(do_not_specialize=["T", "N0", "N1", "K", "tiles_per_split", "n_split"])
def _moram_scan_kernel(x_ptr, k0_ptr, k1_ptr, pv_ptr, pi_ptr, pss_ptr, pk_ptr,
                       T, D, N0, N1, K, tiles_per_split, n_split,
                       sxt, sxd, s0n, s0d, s1n, s1d,
                       BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Program (token block, split): scores of its tiles (segment 0 tiles first, then
    segment 1), running sum of squares and running top-K; writes the split's partial
    list ``[BT, KP]``, partial sum of squares and its K-th best score (the select
    kernel's pruning bound)."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    t_mask = rows < T
    slot = tl.arange(0, KP)
    pinned = (slot >= K)[None, :]
    run_v = tl.where(pinned, float("inf"), float("-inf")) + tl.zeros([BT, KP], tl.float32)
    # a valid id in every slot, so a NaN token (nothing ever beats -inf) still gathers in bounds
    run_i = slot[None, :] + tl.zeros([BT, KP], tl.int32)
    ss = tl.zeros([BT], dtype=tl.float32)
    cols = tl.arange(0, BN)
    tiles0 = tl.cdiv(N0, BN)
    lo = pid_s * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, tiles0 + tl.cdiv(N1, BN))
    for tile in range(lo, tl.minimum(hi, tiles0)):
        n_loc = tile * BN + cols
        n_mask = n_loc < N0
        p = _score_tile(x_ptr, sxt, sxd, rows, t_mask, k0_ptr, s0n, s0d, n_loc, n_mask, D,
                        BT, BN, BD, UPCAST, PREC)
        ss += tl.sum(p * p, 1)
        cand = tl.where(n_mask[None, :], p, float("-inf"))
        run_v, run_i = merge_topk(run_v, run_i, cand, n_loc[None, :], KP, BN)
    for tile in range(tl.maximum(lo, tiles0), hi):
        n_loc = (tile - tiles0) * BN + cols
        n_mask = n_loc < N1
        p = _score_tile(x_ptr, sxt, sxd, rows, t_mask, k1_ptr, s1n, s1d, n_loc, n_mask, D,
                        BT, BN, BD, UPCAST, PREC)
        ss += tl.sum(p * p, 1)
        cand = tl.where(n_mask[None, :], p, float("-inf"))
        run_v, run_i = merge_topk(run_v, run_i, cand, (N0 + n_loc)[None, :], KP, BN)
    part = rows * n_split + pid_s
    m2 = t_mask[:, None]
    tl.store(pv_ptr + part[:, None] * KP + slot[None, :], run_v, mask=m2)
    tl.store(pi_ptr + part[:, None] * KP + slot[None, :], run_i, mask=m2)
    tl.store(pss_ptr + part, ss, mask=t_mask)
    tl.store(pk_ptr + part, tl.min(run_v, 1), mask=t_mask)   # pinned slots hold +inf


@triton.jit(do_not_specialize=["T", "N0", "K", "n_split"])
def _moram_select_kernel(pv_ptr, pi_ptr, pss_ptr, pk_ptr, sc0_ptr, sc1_ptr,
                         idx_ptr, psel_ptr, norm_ptr, coef_ptr,
                         T, N0, K, n_split, tau, delta, eps, has_s0, has_s1,
                         BT: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr):
    """Program per token block: merge the split lists, then norm, softmax/tau, threshold
    and ``c = w * m * p * scale``; stores idx, p_sel, norm and c ``[T, K]``.

    Pruned merge: each split holds K scores >= its own K-th best, so nothing below the
    largest split K-th (``bound``) can make the global top-K. Candidates under it are
    dropped before the merge. How many survive depends on the splits' length (simulated
    in :mod:`.model`, K = 16): about 50 of 64 at prefill's 4 splits, about 1,600 of 4,096
    at decode's 256 splits of 256 atoms (about 90 merge rounds); the ``split`` route's
    pick avoids this merge."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    t_mask = rows < T
    slot = tl.arange(0, KP)
    live = slot < K
    run_v = tl.where(live[None, :], float("-inf"), float("inf")) + tl.zeros([BT, KP], tl.float32)
    run_i = slot[None, :] + tl.zeros([BT, KP], tl.int32)
    bound = tl.full([BT], float("-inf"), tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, n_split, BC):
        col = c0 + tl.arange(0, BC)
        m = t_mask[:, None] & (col < n_split)[None, :]
        kth = tl.load(pk_ptr + rows[:, None] * n_split + col[None, :], mask=m, other=float("-inf"))
        bound = tl.maximum(bound, tl.max(kth, 1))
        ss += tl.sum(tl.load(pss_ptr + rows[:, None] * n_split + col[None, :], mask=m, other=0.0), 1)
    W = n_split * KP
    for c0 in range(0, W, BC):
        col = c0 + tl.arange(0, BC)
        m = t_mask[:, None] & ((col < W) & ((col % KP) < K))[None, :]
        cv = tl.load(pv_ptr + rows[:, None] * W + col[None, :], mask=m, other=float("-inf"))
        cv = tl.where(cv >= bound[:, None], cv, float("-inf"))
        ci = tl.load(pi_ptr + rows[:, None] * W + col[None, :], mask=m, other=0)
        run_v, run_i = merge_topk(run_v, run_i, cv, ci, KP, BC)
    gate_epilogue(run_v, run_i, ss, rows, t_mask, K, N0, tau, delta, eps, sc0_ptr, sc1_ptr,
                  has_s0, has_s1, idx_ptr, psel_ptr, norm_ptr, coef_ptr, KP)


SPLIT_OVERHEAD_TILES = 1   # a split's fixed cost in tiles: warm-up merges, its partial list, its share of the select


def plan_splits(t: int, n0: int, n1: int, bt: int, bn: int, device: torch.device | None,
                per_sm: int = 1, sms: int | None = None) -> tuple[int, int]:
    """``(n_split, tiles_per_split)``, wave-aware: the split count that minimises
    waves x (tiles per program + :data:`SPLIT_OVERHEAD_TILES`), over ``sms x per_sm``
    program slots (``per_sm`` resident programs per SM, from the variant's registers and
    shared memory). Filling one wave is not enough: 133 token blocks on 132 SMs (T =
    17,000) ran two waves of whole-bank programs, the second one program long; 32 blocks
    x 3 splits on an A100's 108 SMs left 11 % idle. Decode and small T get every SM.
    ``sms`` overrides the device's SM count (the cost model plans for a GPU that is not
    here)."""
    tiles = triton.cdiv(n0, bn) + triton.cdiv(n1, bn)
    per = _best_split(max(tiles, 1), triton.cdiv(t, bt), (sms or sm_count(device)) * per_sm)
    return triton.cdiv(tiles, per), per


@functools.lru_cache(maxsize=4096)
def _best_split(tiles: int, t_blocks: int, slots: int) -> int:
    """Tiles per split minimising ``waves x (per + overhead)`` (fewest splits on a tie)."""
    best, best_cost = tiles, None
    for s in range(1, min(tiles, 4 * slots) + 1):
        per = triton.cdiv(tiles, s)
        cost = triton.cdiv(t_blocks * triton.cdiv(tiles, per), slots) * (per + SPLIT_OVERHEAD_TILES)
        if best_cost is None or cost < best_cost:
            best, best_cost = per, cost
    return best


def dot_precision(compute: str) -> str:
    """``input_precision`` of the scoring ``tl.dot``: TF32 for fp32 operands unless
    ``torch.get_float32_matmul_precision()`` is "highest" (16-bit dots ignore it)."""
    return "tf32" if compute != "fp32" or fp32_uses_tf32() else "ieee"


#: ``auto`` takes ``split`` up to this many tokens (a decode step of up to 16 sequences)
#: without asking the model; above, the model also prices ``split`` against the others
#: (on an H200 it gives way to ``gemm2`` at 48 tokens with N = 16,384)
SPLIT_T = 16

#: values of ``MORAM_TRITON_FWD``: ``auto`` and the five routes
FWD_ROUTES = ("auto", "fused", "split", "gemm", "scan2", "gemm2")


def fwd_route(t: int, n: int, d: int, kp: int = 16, compute: str = "bf16", prec: str = "tf32",
              sms: int = 132) -> str:
    """The forward route of one call, from ``MORAM_TRITON_FWD`` (read on every call):
    ``fused`` (scan + select + gather, no scores in memory), ``split`` (decode: scores
    of every atom block on its own program, then one pick), ``gemm`` (cuBLAS scores,
    then the same pick streaming each token's scores), ``gemm2`` (cuBLAS scores, a groups
    kernel as wide as them, then the pick in group mode), ``scan2`` (the prefill scan
    with 128 x 128 tiles and a packed ``tl.topk`` merge, :mod:`.scan2`), or ``auto``/unset:
    ``split`` up to ``SPLIT_T`` (16) tokens, above that the cheapest of
    ``fused``/``scan2``/``gemm``/``gemm2``/``split`` by the runtime
    model (:func:`.model.prefill_route`, on ``sms`` SMs, for ``t`` rounded up by
    :func:`route_bucket`). ``tests/backends/triton/test_triton_routes.py``
    pins this rule to the model. ``t, n, d``: tokens, atoms, d_in; ``kp, compute, prec``:
    the K bucket, the dot dtype and precision (``scan2`` serves K <= 16 on tensor cores).
    An unknown value raises ``ValueError`` naming the variable."""
    v = os.environ.get("MORAM_TRITON_FWD", "").strip().lower() or "auto"
    if v not in FWD_ROUTES:
        raise ValueError(f"MORAM_TRITON_FWD={v!r}: expected one of {', '.join(FWD_ROUTES)}")
    if v != "auto":
        return v
    if t <= SPLIT_T:
        return "split"
    from .model import prefill_route
    return prefill_route(route_bucket(t), d, n, kp, compute, prec, sms)


def route_bucket(t: int) -> int:
    """``t`` rounded up to two significant bits (65 -> 96, 100 -> 128, 4097 -> 6144, powers
    of two unchanged), under 1.5 t: ``auto`` asks the runtime model once per bucket, two
    per octave, not once per new prompt length (the model's merge simulations cost 30-250
    ms of host time on a first call)."""
    if t < 4:
        return t
    step = 1 << (t.bit_length() - 2)
    return -(-t // step) * step


def moram_fwd(x, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps, *,
              gpu_tiles=False):
    """Triton forward (contract in :mod:`moram_kernels.backends.reference`).

    The road is :func:`fwd_route`'s. ``gpu_tiles``: in the interpreter, use the GPU's
    block shapes for the fused road (64/128-wide tiles) instead of the small ones that
    make tiny test shapes cross many tiles.

    x ``[T, d_in]``; returns ``y [T, d_out]``, ``idx [T, K]`` int64, ``p_sel [T, K]`` fp32,
    ``norm [T]`` fp32.
    """
    T, D = x.shape
    n0, n1 = keys0.shape[0], keys1.shape[0]
    # one dtype for both GEMM operands (the package's policy: the lowest of the inputs'),
    # so the scoring dot always runs on tensor cores; a no-op when called through the op
    cd = lowest(x.dtype, keys0.dtype, keys1.dtype, values0.dtype, values1.dtype)
    out_dtype = x.dtype
    x, keys0, keys1, values0, values1 = (v.to(cd) for v in (x, keys0, keys1, values0, values1))
    if n1 == 0:
        # an empty segment 1 is never read; reuse segment 0 so every pointer has one dtype
        keys1, values1, scale1 = keys0, values0, None
    if n0 == 0:
        keys0, values0, scale0 = keys1, values1, None
    compute = tl_name(cd)
    prec = dot_precision(compute)
    route = fwd_route(T, n0 + n1, D, k_bucket(K), compute, prec, sm_count(x.device))
    if route == "split":
        y, idx, p_sel, norm = split_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1,
                                        K, tau, delta, eps, compute=compute, prec=prec)
    elif route in ("gemm", "gemm2"):
        y, idx, p_sel, norm = gemm_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1,
                                       K, tau, delta, eps, groups=route == "gemm2")
    else:
        y, idx, p_sel, norm = _fused_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1,
                                         K, tau, delta, eps, compute, prec, gpu_tiles, route == "scan2")
    return y.to(out_dtype), idx, p_sel, norm


def _fused_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1, K, tau, delta, eps,
               compute, prec, gpu_tiles, want_scan2):
    """The ``fused`` and ``scan2`` routes: scan, select, gather (inputs already cast). The
    ``scan2`` kernel where asked and it serves this call (:func:`.scan2.serves`), else the
    old scan."""
    T, D = x.shape
    DO = values0.shape[1]
    dev = x.device
    kp = k_bucket(K)
    cd = x.dtype
    from . import scan2
    use_scan2 = want_scan2 and T > 0 and scan2.serves(kp, prec)
    if use_scan2:
        kp = scan2.SCAN2_MAX_KP      # one list width (K <= 8 pins the extra slots): half the variants
        cfg = scan2.scan2_config(kp, compute, gpu_tiles=gpu_tiles)
    else:
        cfg = scan_config(T, kp, compute, prec, gpu_tiles=gpu_tiles)
    n_split, per = plan_splits(T, n0, n1, cfg.BT, cfg.BN, dev, cfg.per_sm)
    f32 = dict(device=dev, dtype=torch.float32)
    pv = torch.empty(T, n_split * kp, **f32)
    pi = torch.empty(T, n_split * kp, device=dev, dtype=torch.int32)
    pss = torch.empty(T, n_split, **f32)
    pk = torch.empty(T, n_split, **f32)
    y = torch.empty(T, DO, device=dev, dtype=cd)
    idx = torch.empty(T, K, device=dev, dtype=torch.int64)
    p_sel = torch.empty(T, K, **f32)
    norm = torch.empty(T, **f32)
    coef = torch.empty(T, K, **f32)
    dummy = p_sel   # pointer for an absent scale vector, never read
    with device_ctx(dev):
        if use_scan2:
            scan2.launch_scan2(x, keys0, keys1, n0, n1, pv, pi, pss, pk, K, kp, cfg, n_split, per, prec)
        else:
            _moram_scan_kernel[(triton.cdiv(T, cfg.BT), n_split)](
                x, keys0, keys1, pv, pi, pss, pk,
                T, D, n0, n1, K, per, n_split,
                x.stride(0), x.stride(1), keys0.stride(0), keys0.stride(1),
                keys1.stride(0), keys1.stride(1),
                BT=cfg.BT, BN=cfg.BN, BD=cfg.BD, KP=kp, UPCAST=INTERPRET, PREC=prec,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        bt, _, bc = small_block(kp)
        _moram_select_kernel[(triton.cdiv(T, bt),)](
            pv, pi, pss, pk, scale0 if scale0 is not None else dummy,
            scale1 if scale1 is not None else dummy,
            idx, p_sel, norm, coef,
            T, n0, K, n_split, float(tau), float(delta), float(eps),
            int(scale0 is not None), int(scale1 is not None),
            BT=bt, BC=bc, KP=kp, num_warps=4)
    launch_gather(idx, coef, values0, values1, n0, y, kp)
    return y, idx, p_sel, norm
