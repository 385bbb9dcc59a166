"""``scan2``: the prefill scoring kernel with GEMM-class tiles, one tile loop the compiler
can pipeline and a top-K merge with no data-dependent loop.

It writes the same partial lists as ``_moram_scan_kernel`` (``[T, splits, KP]`` values
and ids, sums of squares, each split's K-th best), so the select, gather and backward
kernels are shared. The differences:

- **Tiles.** 128 x 128 score tiles on a GPU (the old kernel's 128 x 64 reloads the x
  block for every 64 atoms).
- **One loop.** Segment 0 and segment 1 tiles run in one ``tl.range(..., flatten=True)``
  loop: the segment's base pointer, row stride and size are picked per tile by a scalar
  select, so the loop body has no branch and no inner loop whose trip count depends on
  the data. Both key segments and x need a unit inner stride (the launcher copies a view
  that has none; a copy of x or of a key segment is small next to the scan).
- **Merge.** Each score is packed with its atom id into one int64 whose order is the
  selection order: the high 32 bits are the fp32 score's bits made order-preserving (the
  low 31 bits flipped for negatives), the low 32 bits ``2^31 - 1 - id`` (so at an exact
  tie the lower id is the larger key). A tile is merged by ``tl.topk`` of its ``[BT, BN]``
  keys to ``KP`` per row (a bitonic network), the elementwise max of that list reversed
  with the running list (the top ``KP`` of both, as a bitonic sequence: the bitonic top-K
  lemma) and ``tl.bitonic_merge`` to sort it again. Every tile is merged: the old kernel's
  "skip when nothing beats the K-th" gate almost never fires at 128 rows (see
  :mod:`.model`), and a fixed network costs the same for every tile, so the compiler can
  schedule it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET, ScanConfig, device_ctx, dot_xkt

__all__ = ["launch_scan2", "scan2_config", "scan2_configs"]

_LOW = 0x7FFFFFFF          # ids are < 2^31; the low word holds _LOW - id


@triton.jit
def pack_keys(p, ids):
    """fp32 scores ``p`` and int32 global ``ids`` -> int64 keys, larger = selected first
    (higher score; at an exact tie, the lower id)."""
    bits = p.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def unpack_keys(keys):
    """Inverse of :func:`pack_keys`: ``(fp32 scores, int32 ids)``."""
    hi = (keys >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    ids = 0x7FFFFFFF - (keys & 0xFFFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), ids


@triton.jit
def merge_packed(run, keys, KP: tl.constexpr):
    """Running list ``run [BT, KP]`` (sorted, largest first) and a tile's keys
    ``[BT, BN]`` -> the top ``KP`` of both, sorted. No data-dependent control flow."""
    top = tl.topk(keys, KP, dim=1)                     # [BT, KP], largest first
    return tl.bitonic_merge(tl.maximum(run, tl.flip(top, 1)), 1, descending=True)


@triton.jit(do_not_specialize=["T", "N0", "N1", "K", "tiles_per_split", "n_split"])
def _moram_scan2_kernel(x_ptr, k0_ptr, k1_ptr, pv_ptr, pi_ptr, pss_ptr, pk_ptr,
                        T, D, N0, N1, K, tiles_per_split, n_split,
                        sxt, s0n, s1n,
                        BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Program (token block, split): the split's tiles (segment 0 then segment 1, global
    ids) in one flattened loop; writes the same partial list, sums of squares and K-th
    best as ``_moram_scan_kernel``. x and keys have unit inner strides."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    t_mask = rows < T
    slot = tl.arange(0, KP)
    cols = tl.arange(0, BN)
    dk = tl.arange(0, BD)
    # initial list: -inf with ids 0..KP-1 (in bounds for a gather, as in the old kernel);
    # a masked column packs below every real score and every initial entry
    run = pack_keys(tl.full([BT, KP], float("-inf"), tl.float32), slot[None, :] + tl.zeros([BT, KP], tl.int32))
    floor = tl.full([BT, BN // 2], -9223372036854775807 - 1, tl.int64)
    ss = tl.zeros([BT], dtype=tl.float32)
    tiles0 = tl.cdiv(N0, BN)
    lo = pid_s * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, tiles0 + tl.cdiv(N1, BN))
    xb = x_ptr + rows[:, None] * sxt
    for tile in tl.range(lo, hi, flatten=True):
        in1 = tile >= tiles0
        kbase = tl.where(in1, k1_ptr, k0_ptr)
        skn = tl.where(in1, s1n, s0n)
        n_loc = tl.where(in1, tile - tiles0, tile) * BN + cols
        n_mask = n_loc < tl.where(in1, N1, N0)
        kb = kbase + n_loc.to(tl.int64)[:, None] * skn
        acc = tl.zeros([BT, BN], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + dk
            dm = dd < D
            xa = tl.load(xb + dd[None, :], mask=t_mask[:, None] & dm[None, :], other=0.0)
            ka = tl.load(kb + dd[None, :], mask=n_mask[:, None] & dm[None, :], other=0.0)
            acc = dot_xkt(xa, ka, acc, UPCAST, PREC)
        ss += tl.sum(acc * acc, 1)
        gid = (n_loc + tl.where(in1, N0, 0)).to(tl.int32)
        # the two column halves one after the other: half the int64 keys are live at once
        # (the whole tile's keys took 255 registers and spilled on sm_90)
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, [BT, 2, BN // 2]), [0, 2, 1]))
        g0, g1 = tl.split(tl.permute(tl.reshape(gid, [2, BN // 2]), [1, 0]))
        m0, m1 = tl.split(tl.permute(tl.reshape(n_mask, [2, BN // 2]), [1, 0]))
        run = merge_packed(run, tl.where(m0[None, :], pack_keys(a0, g0[None, :]), floor), KP)
        run = merge_packed(run, tl.where(m1[None, :], pack_keys(a1, g1[None, :]), floor), KP)
    v, ids = unpack_keys(run)
    pinned = (slot >= K)[None, :]
    v = tl.where(pinned, float("inf"), v)            # the old kernel's layout: slots >= K hold +inf
    part = rows * n_split + pid_s
    m2 = t_mask[:, None]
    tl.store(pv_ptr + part[:, None] * KP + slot[None, :], v, mask=m2)
    tl.store(pi_ptr + part[:, None] * KP + slot[None, :], ids, mask=m2)
    tl.store(pss_ptr + part, ss, mask=t_mask)
    tl.store(pk_ptr + part, tl.min(v, 1), mask=t_mask)


SCAN2_MAX_KP = 16   # larger lists (K > 16) or IEEE fp32 dots run the old kernel


def serves(kp: int, prec: str) -> bool:
    """Whether ``scan2`` takes this K bucket and dot precision (tensor cores, K <= 16: a
    128 x 128 tile with a longer int64 list would not fit the registers)."""
    return kp <= SCAN2_MAX_KP and prec != "ieee"


def scan2_configs(compute: str, kp: int) -> dict[str, ScanConfig]:
    """GPU block shapes of ``scan2`` (prefill; decode keeps its own kernels): 128 x 128
    tiles, two warpgroups, 3 stages (sm_90: 255 registers, no spills, 96 KB shared in
    16-bit; ``.ci/triton_compile_check.py`` checks it)."""
    bd = 32 if compute == "fp32" else 64
    return {"prefill": ScanConfig("scan2", 128, 128, bd, 8, 3, per_sm=1)}


def scan2_config(kp: int, compute: str, *, gpu_tiles: bool = False) -> ScanConfig:
    if INTERPRET and not gpu_tiles:
        # small tiles so tiny shapes cross tiles, splits and d_in chunks (BN / 2 >= KP)
        return ScanConfig("interp", 16, 32, 32, 1, 1)
    return scan2_configs(compute, kp)["prefill"]


def _unit_inner(v):
    return v if v.stride(1) == 1 or v.shape[0] == 0 else v.contiguous()


def launch_scan2(x, keys0, keys1, n0, n1, pv, pi, pss, pk, K, kp, cfg, n_split, per, prec):
    """Run :func:`_moram_scan2_kernel` into the partial lists (same layout as the old
    scan). x and the keys get a unit inner stride first if they lack one."""
    x, keys0, keys1 = _unit_inner(x), _unit_inner(keys0), _unit_inner(keys1)
    T, D = x.shape
    with device_ctx(x.device):
        _moram_scan2_kernel[(triton.cdiv(T, cfg.BT), n_split)](
            x, keys0, keys1, pv, pi, pss, pk,
            T, D, n0, n1, K, per, n_split,
            x.stride(0), keys0.stride(0), keys1.stride(0),
            BT=cfg.BT, BN=cfg.BN, BD=cfg.BD, KP=kp, UPCAST=INTERPRET, PREC=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
