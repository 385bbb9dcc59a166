"""Time model of the Triton forward, with the top-K merges counted by simulation.

A bytes-and-FLOPs model misses what decides the scan's speed: how many merge rounds each
program runs, which depends on the data. This module simulates them on Gaussian scores
(the running K-th best per row, tile by tile, exactly as the kernels test it) and turns
the counts into time with per-round instruction counts taken from the compiled sm_90
code. ``MORAM_TRITON_FWD=auto`` sends prefill to the variant this model prices lowest
(:func:`prefill_route`); ``benchmarks/cost_model.py`` prints the same terms beside the
floors.

Terms (seconds, one GPU of :data:`H200`'s kind, ``sms`` SMs):

- ``mma``: a ``BT x BN`` score tile over ``d`` is ``2 BT BN d`` FLOPs at the SM's share of
  the tensor-core peak times ``SCAN_EFF`` (fp32 operands: TF32, half the rate).
- old scan (``fused``, ``_moram_scan_kernel``): per tile ``mma + DRAIN_CYCLES`` (its d_in
  loop sits inside the tile loop, so the copy pipeline drains and refills at every tile:
  ``.ci/ttgir_facts.py`` shows the ``wait 0``), plus ``rounds x`` one merge round
  (``OLD_ROUND_SASS`` instructions per warp, issued by 4 schedulers per SM), where
  ``rounds`` comes from :func:`simulate_scan`.
- ``scan2``: per tile ``mma + SCAN2_EPI_SASS`` instructions per warp (the packed
  ``tl.topk`` merge of both column halves, every tile; one program per SM, so nothing
  hides it behind the next tile's MMAs).
- select: the partial lists' bytes at HBM speed or its merge rounds
  (:func:`simulate_select`, ``SELECT_ROUND_SASS`` per round, programs sharing an SM
  sharing its issue slots), whichever is longer.
- gather: the K value rows per token and y at HBM speed.
- ``gemm`` (cuBLAS scores + a select kernel, built on another branch: :data:`GEMM_AVAILABLE`
  says whether this tree has it): the GEMM at the cuBLAS rate, the fp32 scores written and
  read back once, the gather.
- launches: ``launch_s`` each (eager).

Instruction counts are SASS lines of the compiled sm_90 kernels (``cuobjdump -sass``,
counted between the loop labels of the merge; see the constants). The clock and the
issue rate are assumptions; the first GPU run corrects them (``gpu_check`` prints the
model beside each measurement).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["Gpu", "H200", "simulate_scan", "simulate_select", "scan_old_s", "scan2_s",
           "select_s", "gather_s", "gemm_route_s", "forward_s", "prefill_route", "GEMM_AVAILABLE"]


@dataclass(frozen=True)
class Gpu:
    """What the model needs of a GPU. ``clock``: SM clock under tensor-core load (Hz);
    ``issue``: warp instructions issued per clock per SM (4 schedulers)."""

    name: str
    sms: int
    tc_peak: float       # dense bf16 tensor-core FLOP/s
    tc_blas: float       # the rate cuBLAS reaches
    hbm: float           # bytes/s, device copy
    clock: float
    issue: int = 4
    launch_s: float = 4e-6


H200 = Gpu("H200", sms=132, tc_peak=990e12, tc_blas=790e12, hbm=4.3e12, clock=1.75e9)

SCAN_EFF = 0.70          # share of the tensor-core peak a Triton scan tile's MMAs sustain (assumed)
DRAIN_CYCLES = 2000      # old scan: pipeline drain + prologue refill per tile (2 stages from L2, assumed)
# SASS instructions per warp, sm_90, bf16, K bucket 16: the loop sizes that
# `.ci/ttgir_facts.py` prints (`sass_loops`) for scan-bf16xbf16-K16-prefill, select-K16 and
# scan2-bf16-K16-prefill; recount when the kernels change
OLD_ROUND_SASS = 550     # one trip of the old scan's merge_topk loop (128 x 64 tile, 8 warps)
SCAN2_EPI_SASS = 6348    # scan2's per-tile merge (pack, two tl.topk halves, two bitonic merges)
SELECT_ROUND_SASS = 247  # one trip of the select kernel's merge_topk loop (16 x 64, 4 warps)

#: whether this tree has the ``gemm`` forward (cuBLAS scores + select); the branch that
#: builds it sets this and replaces :func:`gemm_route_s` with its kernel's model
GEMM_AVAILABLE = False


# ---- simulation of the merges -----------------------------------------------------------------

def _gen(seed):
    import torch
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=64)
def simulate_scan(rows: int, bt: int, bn: int, tiles: int, k: int, kp: int, programs: int = 2,
                  seed: int = 0) -> dict:
    """Merges of one scan program on Gaussian scores, averaged over ``programs`` token
    blocks: ``bt`` rows (those past ``rows`` masked: x loads zeros, so their scores are 0,
    as in the kernel), ``tiles`` tiles of ``bn`` atoms, top-``k`` kept in ``kp`` slots.

    Returns per program: ``tiles``; ``rounds``, the old merge's loop trips (per tile the
    most candidates above its row's running K-th over the block's rows, capped at ``kp``);
    ``gated``, tiles where no row had a candidate (the old "warm tiles cost one compare"
    case); ``inserts``, top-K entries that changed per row (about ``k ln(N / k)``)."""
    import torch
    g = _gen(seed)
    rounds = gated = inserts = 0
    for _ in range(programs):
        run = torch.full((bt, k), float("-inf"))
        for _ in range(tiles):
            s = torch.randn(bt, bn, generator=g)
            s[rows:] = 0.0
            thr = run.min(1).values
            above = s > thr[:, None]
            n = int(min(int(above.sum(1).max()), kp))
            rounds += n
            gated += n == 0
            new = torch.cat([run, s], 1).topk(k, 1).values
            # tile scores that entered the list (Gaussian scores: no ties)
            inserts += int((s[:rows] >= new[:rows, -1:]).sum())
            run = new
    rows_eff = max(1, min(rows, bt))
    return dict(tiles=tiles, rounds=rounds / programs, gated=gated / programs,
                inserts=inserts / programs / rows_eff)


@functools.lru_cache(maxsize=64)
def simulate_select(rows: int, n_split: int, per_split: int, k: int, kp: int, bt: int = 16,
                    bc: int = 64, seed: int = 1) -> dict:
    """The select kernel's merge of ``n_split`` partial top-``k`` lists (each from
    ``per_split`` Gaussian scores) for ``rows`` tokens (at most ``bt``: one program):
    ``survivors`` per row (candidates at or above the largest split K-th, the pruning
    bound) and ``rounds`` (loop trips of the merge over chunks of ``bc`` candidates)."""
    import torch
    g = _gen(seed)
    rows = min(rows, bt)
    s = torch.randn(rows, n_split, per_split, generator=g)
    lists = s.topk(k, 2).values                       # [rows, splits, k], each split's best
    bound = lists[:, :, -1].max(1).values
    cand = lists.reshape(rows, n_split * k)
    cand = torch.where(cand >= bound[:, None], cand, torch.tensor(float("-inf")))
    survivors = float((cand > float("-inf")).sum(1).float().mean())
    run = torch.full((rows, k), float("-inf"))
    rounds = 0
    for c0 in range(0, n_split * k, bc):
        chunk = cand[:, c0:c0 + bc]
        thr = run.min(1).values
        rounds += min(int((chunk > thr[:, None]).sum(1).max()), kp)
        run = torch.cat([run, chunk], 1).topk(k, 1).values
    return dict(survivors=survivors, rounds=rounds, candidates=n_split * k)


# ---- time terms --------------------------------------------------------------------------------

def _tc(compute: str, gpu: Gpu) -> float:
    return gpu.tc_peak / (2 if compute == "fp32" else 1)


def _mma_tile_s(bt, bn, d, compute, gpu):
    return 2 * bt * bn * d / (_tc(compute, gpu) / gpu.sms) / SCAN_EFF


def _instr_s(sass, warps, gpu):
    return sass * warps / (gpu.issue * gpu.clock)


def _grid(t, n, cfg, sms):
    from .forward import plan_splits
    splits, per = plan_splits(t, n, 0, cfg.BT, cfg.BN, None, cfg.per_sm, sms=sms)
    blocks = -(-t // cfg.BT)
    waves = -(-blocks * splits // (sms * cfg.per_sm))
    return splits, per, waves


def scan_old_s(t, d, n, k, kp, compute="bf16", gpu: Gpu = H200, sms=None) -> dict:
    """The old scan (``fused``): ``{"s", "splits", "tiles", "rounds", "gated", "waves"}``
    (per-program counts from :func:`simulate_scan`)."""
    from ._common import DECODE_T, scan_configs
    sms = sms or gpu.sms
    cfgs = scan_configs(compute, kp)
    cfg = cfgs["decode16"] if t <= 16 else cfgs.get("decode64", cfgs["prefill"]) if t <= DECODE_T else cfgs["prefill"]
    splits, per, waves = _grid(t, n, cfg, sms)
    sim = simulate_scan(min(t, cfg.BT), cfg.BT, cfg.BN, per, k, kp)
    prog = per * (_mma_tile_s(cfg.BT, cfg.BN, d, compute, gpu) + DRAIN_CYCLES / gpu.clock) \
        + sim["rounds"] * _instr_s(OLD_ROUND_SASS, cfg.num_warps, gpu)
    # a decode program is bounded by its keys' bytes (its SM's share of HBM at most twice
    # the even share) rather than its MMAs
    active = min(-(-t // cfg.BT) * splits, sms)
    mem = 2 * n * d / min(gpu.hbm, 2 * gpu.hbm * active / sms)
    return dict(s=max(waves * prog, mem), splits=splits, tiles=per, rounds=sim["rounds"],
                gated=sim["gated"], waves=waves, cfg=cfg)


def scan2_s(t, d, n, k, kp, compute="bf16", gpu: Gpu = H200, sms=None) -> dict:
    """``scan2``: same keys as :func:`scan_old_s`; every tile is merged (``rounds`` =
    tiles), ``gated`` says how often the old gate would have skipped a 128 x 128 tile."""
    from .scan2 import SCAN2_MAX_KP, scan2_configs
    sms = sms or gpu.sms
    kp = SCAN2_MAX_KP                 # the launcher's list width for scan2
    cfg = scan2_configs(compute, kp)["prefill"]
    splits, per, waves = _grid(t, n, cfg, sms)
    sim = simulate_scan(min(t, cfg.BT), cfg.BT, cfg.BN, per, k, kp)
    prog = per * (_mma_tile_s(cfg.BT, cfg.BN, d, compute, gpu)
                  + _instr_s(SCAN2_EPI_SASS, cfg.num_warps, gpu))
    mem = 2 * n * d / gpu.hbm
    return dict(s=max(waves * prog, mem), splits=splits, tiles=per, rounds=per,
                gated=sim["gated"], waves=waves, cfg=cfg)


def select_s(t, n_split, per_split, k, kp, gpu: Gpu = H200, sms=None) -> dict:
    """The select kernel: partial lists read at HBM speed, or its merge rounds, whichever
    is longer. Its 16-token programs spread over the SMs; those sharing an SM share its
    issue slots, so the rounds cost ``ceil(programs / SMs)`` times one program's."""
    sms = sms or gpu.sms
    sim = simulate_select(min(t, 16), n_split, per_split, k, kp)
    programs = -(-t // 16)
    rounds_s = -(-programs // sms) * sim["rounds"] * _instr_s(SELECT_ROUND_SASS, 4, gpu)
    nbytes = t * n_split * (kp * 8 + 8) + t * k * 24
    return dict(s=max(nbytes / gpu.hbm, rounds_s), **sim)


def gather_s(t, n, k, d_out, gpu: Gpu = H200, elt=2) -> float:
    return elt * (min(t * k, n) * d_out + t * d_out) / gpu.hbm


def gemm_route_s(t, d, n, k, d_out, gpu: Gpu = H200, elt=2) -> float:
    """``gemm``: cuBLAS x A^T, the fp32 scores written and read back by a select kernel,
    the gather, three launches. The branch that builds the route owns this estimate."""
    gemm = max(2 * t * n * d / gpu.tc_blas, elt * (n * d + t * d) / gpu.hbm)
    return gemm + 2 * 4 * t * n / gpu.hbm + gather_s(t, n, k, d_out, gpu, elt) + 3 * gpu.launch_s


def forward_s(variant, t, d, n, k, d_out, compute="bf16", gpu: Gpu = H200, sms=None) -> float:
    """Predicted forward seconds of ``variant`` ("fused", "scan2" or "gemm")."""
    from ._common import k_bucket
    kp = k_bucket(k)
    if variant == "gemm":
        return gemm_route_s(t, d, n, k, d_out, gpu)
    if variant == "scan2":
        from .scan2 import SCAN2_MAX_KP
        kp = SCAN2_MAX_KP
    scan = (scan2_s if variant == "scan2" else scan_old_s)(t, d, n, k, kp, compute, gpu, sms)
    sel = select_s(t, scan["splits"], scan["tiles"] * scan["cfg"].BN, k, kp, gpu, sms)
    return scan["s"] + sel["s"] + gather_s(t, n, k, d_out, gpu) + 3 * gpu.launch_s


@functools.lru_cache(maxsize=256)
def prefill_route(t, d, n, kp, compute, prec, sms) -> str:
    """``MORAM_TRITON_FWD=auto``: the cheapest prefill forward by :func:`forward_s` among
    those this tree has and this call can take (``scan2`` serves tensor-core dots with
    K <= 16; ``gemm`` when :data:`GEMM_AVAILABLE`). Decode (``t <= DECODE_T``) and empty
    calls keep the old scan."""
    from . import scan2
    from ._common import DECODE_T
    if t <= DECODE_T or n == 0 or d == 0:
        return "fused"
    k = kp
    options = ["fused"] + (["scan2"] if scan2.serves(kp, prec) else []) + (["gemm"] if GEMM_AVAILABLE else [])
    cost = {v: forward_s(v, t, d, n, k, d, compute, H200, max(int(sms), 1)) for v in options}
    return min(options, key=lambda v: (cost[v], options.index(v)))
