"""Forward roads that write the scores, then pick: ``split`` (decode) and ``gemm``
(cuBLAS scores, for prefill). Both end in one select kernel and the gather kernel; no
host synchronisation anywhere, so a call can be captured in a CUDA graph.

``split``: ``_moram_split_scores_kernel``, grid (atom blocks, d_in slices, token blocks),
every program streams one block of BN keys once for all its tokens (BGMV-style) and
writes fp32 scores ``[T, N]`` at the atoms' global ids: one ``[T, N]`` partial per d_in
slice. The plan (:func:`split_plan`) gives at least two programs per SM: the largest BN
whose block count reaches that, else BN = 16 and d_in cut into slices. With one slice the
kernel also writes each block's sums of squares and the maximum of every GS consecutive
atoms ("groups").

``_moram_pick_kernel``, one program per token, selects the top K with ties to the lower
id: scores are packed with their ids into int64 keys (order-preserving score bits, then
the bitwise-inverted id) and reduced with ``tl.topk`` bitonic networks, no data-dependent
loop counts. Group mode (one d slice): the top KP groups by maximum (ties to the lower
group) hold the top K atoms, since any other atom is beaten by the maxima of KP >= K
selected groups; so the kernel reads the ``N / GS`` group maxima and ``KP x GS`` scores,
not the N scores. Stream mode (several slices, or cuBLAS scores): the scores are read in
chunks of BC (slices summed in a fixed order), and a chunk is merged only when its best
key beats the current K-th. Then the gate of :func:`~._common.gate_epilogue`, the same as
the fused road's select kernel (idx, p_sel, norm saved for the backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, device_ctx, dot_xkt, gate_epilogue, k_bucket, launch_gather,
                      sm_count)

__all__ = ["split_fwd", "gemm_fwd", "split_plan", "SplitConfig", "split_config", "pick_config", "groups_config",
           "ONE_CHUNK_N"]


# ---- jit ----------------------------------------------------------------------------------------

@triton.jit
def pack_keys(v, ids):
    """fp32 scores and int32 ids -> int64 keys ordered as (score, then lower id): the high
    word holds the score's bits made order-preserving as a signed int, the low word the
    id's bitwise complement, zero-extended."""
    b = v.to(tl.int32, bitcast=True)
    sk = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    low = (~ids.to(tl.int32)).to(tl.uint32, bitcast=True).to(tl.int64)
    return (sk.to(tl.int64) << 32) | low


@triton.jit
def unpack_keys(key):
    """Inverse of :func:`pack_keys`: (fp32 score, int32 id)."""
    sk = (key >> 32).to(tl.int32)
    b = tl.where(sk >= 0, sk, sk ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True), ~(key.to(tl.int32))


@triton.jit
def merge_keys(run, key, KP: tl.constexpr):
    """The KP largest of the running keys ``run [1, KP]`` (sorted, largest first) and a
    chunk ``key [1, BC]``: a bitonic top-KP of the chunk, then of the two lists joined."""
    ck = tl.topk(key, KP)
    return tl.topk(tl.reshape(tl.join(run, ck), [1, 2 * KP]), KP)


@triton.jit
def group_span(g, N0, N1, BN, GS: tl.constexpr):
    """Global ids ``[start, end)`` of group ``g``: GS consecutive atoms of one BN block;
    blocks of segment 0 first, then segment 1 (as the scores kernel lays them out)."""
    gpb = BN // GS
    blk = g // gpb
    tiles0 = tl.cdiv(N0, BN)
    in0 = blk < tiles0
    start = tl.where(in0, blk * BN, N0 + (blk - tiles0) * BN) + (g % gpb) * GS
    end = tl.minimum(start + GS, tl.where(in0, N0, N0 + N1))
    return start, end


@triton.jit
def load_scores(p0_ptr, p1_ptr, row0, row1, ids, N0, N, mask):
    """fp32 scores of global ``ids`` from the segment 0 / segment 1 rows (0 where masked)."""
    v0 = tl.load(p0_ptr + row0 + ids, mask=mask & (ids < N0), other=0.0)
    v1 = tl.load(p1_ptr + row1 + (ids - N0), mask=mask & (ids >= N0) & (ids < N), other=0.0)
    return v0 + v1


@triton.jit
def group_keys(gm_ptr, c0, NG, N0, N1, BN, BC: tl.constexpr, GS: tl.constexpr):
    """Packed keys ``[1, BC]`` of groups ``c0 ..`` from one token's maxima ``gm_ptr``;
    padding groups (no atom) and those past NG get the smallest int64."""
    g = c0 + tl.arange(0, BC)[None, :]
    start, end = group_span(g, N0, N1, BN, GS)
    ok = (g < NG) & (start < end)
    gm = tl.load(gm_ptr + g, mask=ok, other=0.0)
    return tl.where(ok, pack_keys(gm, g), -9223372036854775808)


@triton.jit
def score_keys(p0_ptr, p1_ptr, row0, row1, sps, n_part, c0, N0, N, ss, BC: tl.constexpr):
    """Packed keys ``[1, BC]`` of atoms ``c0 ..`` of one token (the ``n_part`` d_in slices
    summed, always in this order; the smallest int64 past N) and ``ss`` plus their
    squares."""
    ids = c0 + tl.arange(0, BC)[None, :]
    v = tl.zeros([1, BC], dtype=tl.float32)
    for s in range(n_part):
        v += load_scores(p0_ptr + s * sps, p1_ptr + s * sps, row0, row1, ids, N0, N, ids < N)
    return tl.where(ids < N, pack_keys(v, ids), -9223372036854775808), ss + tl.sum(v * v, 1)


@triton.jit
def store_groups(acc, m2, rows, t_mask, pid_n, pss_ptr, gmax_ptr, NB, NG,
                 BT: tl.constexpr, BN: tl.constexpr, GS: tl.constexpr):
    """What the pick's group mode reads of atom block ``pid_n``'s fp32 scores ``acc [BT, BN]``
    (``m2``: the live tokens x atoms, masked scores 0): its sums of squares into
    ``pss [T, NB]`` and the maximum of every GS atoms into ``gmax [T, NG]``."""
    tl.store(pss_ptr + rows * NB + pid_n, tl.sum(acc * acc, 1), mask=t_mask)   # masked atoms are 0
    g = tl.max(tl.reshape(tl.where(m2, acc, float("-inf")), [BT, BN // GS, GS]), 2)
    gcol = pid_n * (BN // GS) + tl.arange(0, BN // GS)
    tl.store(gmax_ptr + rows[:, None] * NG + gcol[None, :], g, mask=t_mask[:, None])


@triton.jit
def _slab_scores(x_ptr, sxt, sxd, rows, t_mask, k_ptr, skn, skd, n_loc, n_mask, d_lo, d_hi,
                 BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr):
    """fp32 ``[BT, BN]`` scores of tokens ``rows`` against keys ``n_loc`` over d_in
    ``[d_lo, d_hi)`` (zero where masked)."""
    xb = x_ptr + rows[:, None] * sxt
    kb = k_ptr + n_loc.to(tl.int64)[:, None] * skn
    dk = tl.arange(0, BD).to(tl.int64)      # int64: a transposed view's column x stride passes 2^31
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        dd = d0 + dk
        dm = dd < d_hi
        xa = tl.load(xb + dd[None, :] * sxd, mask=t_mask[:, None] & dm[None, :], other=0.0)
        ka = tl.load(kb + dd[None, :] * skd, mask=n_mask[:, None] & dm[None, :], other=0.0)
        acc = dot_xkt(xa, ka, acc, UPCAST, PREC)
    return acc


# sizes that only bound loops and masks, and the score rows' strides (N, T N), are not
# specialised: a new T or bank size must not compile again (inside a CUDA-graph capture, say)
@triton.jit(do_not_specialize=["T", "N0", "N1", "d_chunks", "NB", "NG", "sct", "scs"])
def _moram_split_scores_kernel(x_ptr, k0_ptr, k1_ptr, sc_ptr, pss_ptr, gmax_ptr,
                               T, D, N0, N1, d_chunks, NB, NG,
                               sxt, sxd, s0n, s0d, s1n, s1d, sct, scs,
                               BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                               GS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                               GROUPS: tl.constexpr):
    """Program (atom block, d_in slice, token block): fp32 scores of BT tokens against BN
    keys over d_in ``[pid_d s, (pid_d + 1) s)``, ``s = d_chunks BD``, stored at the atoms' global ids
    in the slice's partial ``sc [T, N]`` (``+ pid_d scs``). GROUPS (one slice): also the
    block's sums of squares ``pss [T, NB]`` and its group maxima ``gmax [T, NG]``."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = tl.program_id(2).to(tl.int64) * BT + tl.arange(0, BT)
    t_mask = rows < T
    tiles0 = tl.cdiv(N0, BN)
    in0 = pid_n < tiles0
    n_loc = tl.where(in0, pid_n, pid_n - tiles0) * BN + tl.arange(0, BN)
    n_mask = n_loc < tl.where(in0, N0, N1)
    # a whole number of BD chunks per slice: the compiler sees d_lo % BD == 0, which keeps
    # the loads vectorised and the cp.async pipeline (an unknown offset gave neither: 255
    # registers, spills, no shared-memory stages)
    d_lo = pid_d * d_chunks * BD
    d_hi = tl.minimum(d_lo + d_chunks * BD, D)
    # one call per segment, not a select of pointers and strides: each keeps its constant
    # unit stride (vectorised loads) and its own address arithmetic
    if in0:
        acc = _slab_scores(x_ptr, sxt, sxd, rows, t_mask, k0_ptr, s0n, s0d, n_loc, n_mask, d_lo, d_hi,
                           BT, BN, BD, UPCAST, PREC)
    else:
        acc = _slab_scores(x_ptr, sxt, sxd, rows, t_mask, k1_ptr, s1n, s1d, n_loc, n_mask, d_lo, d_hi,
                           BT, BN, BD, UPCAST, PREC)
    gid = tl.where(in0, 0, N0) + n_loc
    m2 = t_mask[:, None] & n_mask[None, :]
    tl.store(sc_ptr + pid_d.to(tl.int64) * scs + rows[:, None] * sct + gid[None, :], acc, mask=m2)
    if GROUPS:
        store_groups(acc, m2, rows, t_mask, pid_n, pss_ptr, gmax_ptr, NB, NG, BT, BN, GS)


@triton.jit(do_not_specialize=["T", "N0", "N1", "K", "n_part", "NB", "NG", "BN", "sp0t", "sp1t", "sps"])
def _moram_pick_kernel(p0_ptr, p1_ptr, pss_ptr, gmax_ptr, sc0_ptr, sc1_ptr,
                       idx_ptr, psel_ptr, norm_ptr, coef_ptr,
                       T, N0, N1, K, n_part, NB, NG, BN, sp0t, sp1t, sps,
                       tau, delta, eps, has_s0, has_s1,
                       KP: tl.constexpr, BC: tl.constexpr, GS: tl.constexpr, GROUPS: tl.constexpr):
    """Program per token: top K of its scores (rows ``p0 + t sp0t`` for segment 0, ``p1 +
    t sp1t`` for segment 1; ``n_part`` partials ``sps`` apart are summed), then the gate.
    GROUPS: from the group maxima ``gmax [T, NG]`` and block sums of squares
    ``pss [T, NB]`` of the scores kernel (groups of GS atoms in blocks of BN)."""
    row = tl.program_id(0).to(tl.int64)
    rows = row + tl.arange(0, 1)
    t_mask = rows < T
    N = N0 + N1
    slot = tl.arange(0, KP)[None, :]
    live = slot < K
    ss = tl.zeros([1], dtype=tl.float32)
    if GROUPS:
        for c0 in range(0, NB, BC):
            col = c0 + tl.arange(0, BC)[None, :]
            ss += tl.sum(tl.load(pss_ptr + row * NB + col, mask=col < NB, other=0.0), 1)
        # top KP groups by maximum; the first chunk alone needs no merge
        run = tl.topk(group_keys(gmax_ptr + row * NG, 0, NG, N0, N1, BN, BC, GS), KP)
        for c0 in range(BC, NG, BC):
            run = merge_keys(run, group_keys(gmax_ptr + row * NG, c0, NG, N0, N1, BN, BC, GS), KP)
        # the atoms of the selected groups: KP x GS candidates
        gsel = tl.reshape(run, [KP, 1])
        _, gid = unpack_keys(gsel)
        start, end = group_span(gid, N0, N1, BN, GS)
        ids = start + tl.arange(0, GS)[None, :]
        m = (gsel > -9223372036854775808) & (ids < end)
        v = load_scores(p0_ptr, p1_ptr, row * sp0t, row * sp1t, ids, N0, N, m)
        ck = tl.where(m, pack_keys(v, ids), -9223372036854775808)
        run = tl.topk(tl.reshape(ck, [1, KP * GS]), KP)
    else:
        ck, ss = score_keys(p0_ptr, p1_ptr, row * sp0t, row * sp1t, sps, n_part, 0, N0, N, ss, BC)
        run = tl.topk(ck, KP)               # N >= K: the first chunk fills the list
        for c0 in range(BC, N, BC):
            ck, ss = score_keys(p0_ptr, p1_ptr, row * sp0t, row * sp1t, sps, n_part, c0, N0, N, ss, BC)
            kth = tl.min(tl.where(live, run, 9223372036854775807))
            if tl.max(ck) > kth:      # warm lists: most chunks cost this compare
                run = merge_keys(run, ck, KP)
    run_v, run_i = unpack_keys(run)
    gate_epilogue(run_v, run_i, ss, rows, t_mask, K, N0, tau, delta, eps, sc0_ptr, sc1_ptr,
                  has_s0, has_s1, idx_ptr, psel_ptr, norm_ptr, coef_ptr, KP)


# sizes that only bound masks and the score rows' strides are not specialised (see above)
@triton.jit(do_not_specialize=["T", "N0", "N1", "NB", "NG", "sp0t", "sp1t"])
def _moram_groups_kernel(p0_ptr, p1_ptr, pss_ptr, gmax_ptr, T, N0, N1, NB, NG, sp0t, sp1t,
                         BT: tl.constexpr, BN: tl.constexpr, GS: tl.constexpr):
    """Program (atom block, token block) of the ``gemm2`` road: one ``BT x BN`` tile of
    the written fp32 scores (rows ``p0 + t sp0t`` for segment 0's blocks, which come first,
    ``p1 + t sp1t`` for segment 1's, as the split scores kernel numbers them), reduced to
    what the pick's group mode reads: the block's sums of squares ``pss [T, NB]`` and the
    maximum of every GS atoms ``gmax [T, NG]``. One read of the scores, at HBM speed, by a
    grid as wide as the scores; nothing depends on the data."""
    pid_n = tl.program_id(0)
    # int32 offsets: one call's scores are at most GEMM_SCORE_BYTES (2^27 floats) from p0/p1
    rows = tl.program_id(1) * BT + tl.arange(0, BT)
    t_mask = rows < T
    tiles0 = tl.cdiv(N0, BN)
    in0 = pid_n < tiles0
    n_loc = tl.where(in0, pid_n, pid_n - tiles0) * BN + tl.arange(0, BN)
    n_mask = n_loc < tl.where(in0, N0, N1)
    m2 = t_mask[:, None] & n_mask[None, :]
    if in0:
        acc = tl.load(p0_ptr + rows[:, None] * sp0t + n_loc[None, :], mask=m2, other=0.0)
    else:
        acc = tl.load(p1_ptr + rows[:, None] * sp1t + n_loc[None, :], mask=m2, other=0.0)
    store_groups(acc, m2, rows, t_mask, pid_n, pss_ptr, gmax_ptr, NB, NG, BT, BN, GS)


# ---- plans and configs --------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitConfig:
    """Block shape of the scores kernel: BT tokens x BN atoms, d_in in chunks of BD."""

    BT: int
    BN: int
    BD: int
    num_warps: int
    num_stages: int


SPLIT_BN = (64, 32, 16)   # atoms per program, largest first
GS_GPU = 16                             # GS: atoms per group maximum (divides every BN)
GROUP_ATOMS = 8 if INTERPRET else GS_GPU   # the interpreter's tiny banks still get many groups


def split_variants() -> list[tuple[int, int, bool]]:
    """Every (BT, BN, GROUPS) of the scores kernel :func:`split_fwd` can launch on a GPU:
    BT 16 takes any BN, BT 64 (T > 16) BN >= 32; d_in slices (no groups) come with the
    smallest BN a T allows."""
    out = [(16, bn, True) for bn in SPLIT_BN] + [(16, 16, False)]
    out += [(64, bn, True) for bn in (64, 32)] + [(64, bn, False) for bn in (64, 32)]
    return out


def split_config(t: int, bn: int, compute: str, prec: str = "tf32", interpret: bool = INTERPRET) -> SplitConfig:
    """Scores-kernel config for T tokens (BT 16 up to 16 tokens, else 64), BN atoms per
    program, dot dtype ``compute`` and fp32 dot precision ``prec`` (``interpret``: the
    interpreter's small tiles)."""
    if interpret:
        return SplitConfig(16, bn, 32, 1, 1)
    bt = 16 if t <= 16 else 64
    if compute == "fp32" and prec == "ieee":
        # CUDA-core FMAs: 64 x 64 on 4 warps took 128 registers and spilled on sm_80, on
        # 8 warps with BD 32 still 8 B
        return SplitConfig(bt, bn, 16 if bt == 64 else 32, 8 if bt == 64 else 4, 2)
    # 3 stages of x and key tiles in shared memory: BD 128 at 16 tokens (80 KB), 64 at 64
    # tokens (BD 128 took 192 KB, one program per SM)
    bd = (64 if compute == "fp32" else 128) // (2 if bt == 64 else 1)
    return SplitConfig(bt, bn, bd, 4, 3)


#: the stream-mode pick reads a bank of at most this many scores in one chunk (K16 lists)
ONE_CHUNK_N = 1024


def pick_config(kp: int, groups: bool = True, interpret: bool = INTERPRET, n: int | None = None) -> tuple[int, int]:
    """(BC scores or groups per chunk, num_warps) of the pick kernel. Chunks of 1,024
    keys on 8 warps, 512 for K64 lists and in stream mode (1,024 capped sm_80 at 128
    registers with 8 B of spills for K8 and K32), except that a stream over ``n`` <=
    :data:`ONE_CHUNK_N` scores with a K16 list reads them in one chunk of 1,024: one dependent
    load and one ``tl.topk`` instead of two loads and a merge (a decode step at N = 1,024;
    150 registers on sm_90, one program per SM, which a decode's few tokens do not miss)."""
    if interpret:
        return max(64, kp), 1
    if not groups and n is not None and n <= ONE_CHUNK_N and kp == 16:
        return ONE_CHUNK_N, 8
    return (1024 if kp <= 32 and groups else 512), 8


def groups_config(interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """(BT tokens, BN atoms, num_warps) of the ``gemm2`` road's groups kernel: 16 x 256
    fp32 scores (16 KB, 32 a thread on 4 warps) per program, a grid of T/16 x N/256
    programs. 32 x 256 with int64 offsets took 194 registers on sm_90 (two programs per
    SM); this takes 80 (six). The interpreter's 4 x 16 make tiny banks cross many blocks."""
    return (4, 16, 1) if interpret else (16, 256, 4)


def split_plan(t: int, n0: int, n1: int, d: int, bd: int, sms: int, bns=None) -> tuple[int, int, int, int]:
    """``(BN, atom blocks, d_in slices, d_in per slice: whole BD chunks)``: at least two programs per SM
    (``sms``) before d_in is cut; the largest BN of ``bns`` that reaches that, else the
    smallest BN with d_in cut into slices of whole BD chunks. Each program streams its
    BN x d_per keys once, and re-reads its T tokens' x from L2: BN is at least
    ``min(T, 64)``, so those re-reads stay below the keys' bytes."""
    bns = bns or ((16,) if INTERPRET else SPLIT_BN)
    bns = [b for b in bns if b >= min(t, max(bns))]
    want = 2 * sms
    for bn in bns:
        nb = triton.cdiv(n0, bn) + triton.cdiv(n1, bn)
        if nb >= want:
            return bn, nb, 1, triton.cdiv(d, bd) * bd
    # whole BD chunks per slice, rounded down so the slices still reach the target
    per = max(1, triton.cdiv(d, bd) // triton.cdiv(want, max(nb, 1))) * bd
    return bn, nb, triton.cdiv(d, per), per


# ---- launchers ----------------------------------------------------------------------------------

def _outputs(x, K, DO, cd):
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    T = x.shape[0]
    return (torch.empty(T, DO, device=dev, dtype=cd), torch.empty(T, K, device=dev, dtype=torch.int64),
            torch.empty(T, K, **f32), torch.empty(T, **f32), torch.empty(T, K, **f32))


def _pick(p0, p1, row0, row1, part_stride, n_part, pss, gmax, nb, ng, bn, n0, n1, scale0, scale1,
          idx, p_sel, norm, coef, K, tau, delta, eps, groups):
    T = idx.shape[0]
    kp = k_bucket(K)
    bc, warps = pick_config(kp, groups, n=n0 + n1)
    with device_ctx(idx.device):
        _moram_pick_kernel[(T,)](
            p0, p1, pss, gmax, scale0 if scale0 is not None else p_sel,
            scale1 if scale1 is not None else p_sel,    # an absent scale vector is never read
            idx, p_sel, norm, coef,
            T, n0, n1, K, n_part, nb, ng, bn, row0, row1, part_stride,
            float(tau), float(delta), float(eps), int(scale0 is not None), int(scale1 is not None),
            KP=kp, BC=bc, GS=GROUP_ATOMS, GROUPS=groups, num_warps=warps)


def split_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1, K, tau, delta, eps, *,
              compute, prec, sms=None):
    """The ``split`` road (decode): scores kernel, pick kernel, gather kernel; three
    launches whose grids depend on shapes only. Inputs as :func:`~.forward.moram_fwd`
    passes them after its casts (one dtype; an empty segment's tensors replaced by the
    other's, so ``n0``/``n1`` give the sizes); ``sms`` overrides the SM count."""
    T, D = x.shape
    DO = values0.shape[1]
    y, idx, p_sel, norm, coef = _outputs(x, K, DO, x.dtype)
    if T == 0:
        return y, idx, p_sel, norm
    sms = sms or sm_count(x.device)
    bd = split_config(T, 16, compute, prec).BD
    bn, nb, parts, per = split_plan(T, n0, n1, D, bd, sms)
    cfg = split_config(T, bn, compute, prec)
    n = n0 + n1
    groups = parts == 1
    ng = nb * (bn // GROUP_ATOMS)
    f32 = dict(device=x.device, dtype=torch.float32)
    sc = torch.empty(parts, T, n, **f32)
    pss = torch.empty(T, nb if groups else 1, **f32)
    gmax = torch.empty(T, ng if groups else 1, **f32)
    with device_ctx(x.device):
        _moram_split_scores_kernel[(nb, parts, triton.cdiv(T, cfg.BT))](
            x, keys0, keys1, sc, pss, gmax,
            T, D, n0, n1, per // cfg.BD, nb, ng,
            x.stride(0), x.stride(1), keys0.stride(0), keys0.stride(1), keys1.stride(0), keys1.stride(1),
            n, T * n,
            BT=cfg.BT, BN=bn, BD=cfg.BD, GS=GROUP_ATOMS, UPCAST=INTERPRET, PREC=prec, GROUPS=groups,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # segment 1's scores start at column n0 of the same rows
    _pick(sc, sc[:, :, n0:], n, n, T * n, parts, pss, gmax, nb, ng, bn, n0, n1, scale0, scale1,
          idx, p_sel, norm, coef, K, tau, delta, eps, groups)
    launch_gather(idx, coef, values0, values1, n0, y, k_bucket(K))
    return y, idx, p_sel, norm


GEMM_SCORE_BYTES = 1 << 29   # at most this much fp32 score memory at once (512 MiB): tokens are chunked


def gemm_fwd(x, keys0, values0, scale0, keys1, values1, scale1, n0, n1, K, tau, delta, eps, groups=False):
    """The ``gemm`` and ``gemm2`` roads (prefill): fp32 scores from torch GEMMs (cuBLAS;
    16-bit operands with an fp32 output, fp32 following torch's TF32 setting), then the
    pick kernel and the gather kernel. ``gemm`` picks in stream mode: one program per
    token reads its N scores chunk after dependent chunk. ``gemm2`` (``groups``) first runs
    the groups kernel over the scores, a grid as wide as them, so the pick reads the
    group maxima and ``KP x GS`` scores per token (group mode, as the split road's).
    Tokens go in chunks whose ``[T_c, N]`` fp32 scores fit :data:`GEMM_SCORE_BYTES`."""
    from .backward import _mm   # the backward's GEMM with an fp32 output; it imports this package's forward
    T = x.shape[0]
    DO = values0.shape[1]
    y, idx, p_sel, norm, coef = _outputs(x, K, DO, x.dtype)
    n = n0 + n1
    step = max(1, GEMM_SCORE_BYTES // (4 * max(n, 1)))
    # gemm2's blocks and groups; stream mode reads neither (p_sel stands in, never read)
    bt, bn, warps = groups_config()
    nb = triton.cdiv(n0, bn) + triton.cdiv(n1, bn) if groups else 0
    ng = nb * (bn // GROUP_ATOMS)
    pss = gmax = p_sel
    for t0 in range(0, T, step):
        xs = x[t0:t0 + step]
        tc = xs.shape[0]
        s0 = _mm(xs, keys0.t()) if n0 else None
        s1 = _mm(xs, keys1.t()) if n1 else None
        s0 = s0 if s0 is not None else s1     # an empty segment's pointer is never read
        s1 = s1 if s1 is not None else s0
        if groups:
            pss = torch.empty(tc, nb, device=x.device, dtype=torch.float32)
            gmax = torch.empty(tc, ng, device=x.device, dtype=torch.float32)
            with device_ctx(x.device):
                _moram_groups_kernel[(nb, triton.cdiv(tc, bt))](
                    s0, s1, pss, gmax, tc, n0, n1, nb, ng, s0.stride(0), s1.stride(0),
                    BT=bt, BN=bn, GS=GROUP_ATOMS, num_warps=warps)
        rows = slice(t0, t0 + tc)
        _pick(s0, s1, s0.stride(0), s1.stride(0), 0, 1, pss, gmax, nb, ng, bn, n0, n1, scale0, scale1,
              idx[rows], p_sel[rows], norm[rows], coef[rows], K, tau, delta, eps, groups)
    if T:
        launch_gather(idx, coef, values0, values1, n0, y, k_bucket(K))
    return y, idx, p_sel, norm
