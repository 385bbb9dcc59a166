"""Time model of the Triton forward routes, with the serial work of the top-K merges
counted by simulation. The one model of the package: ``MORAM_TRITON_FWD=auto``
(:func:`forward.fwd_route`) takes its prefill choice from :func:`prefill_route`, and
``benchmarks/cost_model.py`` (``route_ms``, ``predict_ms``, ``issue_rows``) prints its
terms beside the floors and the GPU check beside each measurement.

A bytes-and-FLOPs model misses what decides a scan's speed: how many merge rounds each
program runs, which depends on the data. The fused scan's and its select's rounds are
simulated on Gaussian scores (:func:`simulate_scan`, :func:`simulate_select`: the running
K-th best per row, tile by tile, exactly as the kernels test it) and priced with
per-round instruction counts of the compiled sm_90 code; the ``split``/``gemm`` select
(``_moram_pick_kernel``, bitonic ``tl.topk`` passes) is counted by :func:`simulate_pick`
and priced per bitonic stage and dependent chunk load.

Terms (seconds, on a :class:`Gpu`; :data:`H200` unless told):

- ``mma``: a ``BT x BN`` score tile over ``d`` is ``2 BT BN d`` FLOPs at the SM's share of
  the tensor-core peak times ``SCAN_EFF`` (fp32 operands: TF32, half the rate).
- ``fused`` (``_moram_scan_kernel``): per tile ``mma + DRAIN_CYCLES`` (its d_in loop sits
  inside the tile loop, so the copy pipeline drains and refills at every tile:
  ``.ci/ttgir_facts.py`` shows the ``wait 0``), plus ``rounds x`` one merge round
  (``OLD_ROUND_SASS`` instructions per warp, issued by 4 schedulers per SM).
- ``scan2``: per tile ``mma + SCAN2_EPI_SASS`` instructions per warp (the packed
  ``tl.topk`` merge of both column halves, every tile; one program per SM, so nothing
  hides it behind the next tile's MMAs).
- the fused select: the partial lists' bytes at HBM speed or its merge rounds
  (``SELECT_ROUND_SASS`` per round, programs sharing an SM sharing its issue slots),
  whichever is longer.
- ``split`` (decode): the scores kernel (keys once from HBM, the padded MMA, the L2
  re-reads of x per atom block and of the keys per token block, the fp32 scores
  written), then the pick program (:func:`simulate_pick`, waves of :func:`pick_per_sm`).
- ``gemm``: cuBLAS ``x A^T`` writing fp32 scores, the pick reading them (bytes or the
  simulated programs, whichever is longer).
- ``gemm2``: the same GEMM, then the groups kernel reading the scores once at HBM speed
  (a grid of ``T/16 x N/256`` programs, nothing data-dependent) and writing block sums of
  squares and group maxima, then the pick in group mode (simulated as ``split``'s).
- gather: the K value rows per token and y at HBM speed, plus one dependent load.
- launches: ``launch_s`` each (eager; a CUDA graph node costs ``GRAPH_NODE_S``).

Instruction counts are SASS lines of the compiled sm_90 kernels (``cuobjdump -sass``,
counted between the loop labels of the merge; see the constants). The clock, the issue
rate and the per-stage times are assumptions; the first GPU run corrects them
(``gpu_check`` prints the model beside each measurement).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

__all__ = ["Gpu", "H200", "A100", "GPUS", "SCAN_EFF", "GRAPH_NODE_S", "simulate_scan", "simulate_select",
           "simulate_pick", "bitonic_stages", "scan_old_s", "scan2_s", "select_s", "gather_s", "forward_terms",
           "forward_s", "prefill_route", "pick_per_sm", "ROUTES"]


@dataclass(frozen=True)
class Gpu:
    """What the model needs of a GPU. ``clock``: SM clock under tensor-core load (Hz);
    ``issue``: warp instructions issued per clock per SM (4 schedulers); ``l2``: L2 read
    bandwidth (bytes/s), for operands re-read by many programs."""

    name: str
    sms: int
    tc_peak: float       # dense bf16 tensor-core FLOP/s
    tc_blas: float       # the rate cuBLAS reaches
    hbm: float           # bytes/s, device copy
    clock: float
    issue: int = 4
    launch_s: float = 4e-6
    l2: float = 7.0e12


# L2: published microbenchmarks, about 7 TB/s on H100/H200, 4.5 TB/s on A100
H200 = Gpu("H200", sms=132, tc_peak=990e12, tc_blas=790e12, hbm=4.3e12, clock=1.75e9, l2=7.0e12)
A100 = Gpu("A100", sms=108, tc_peak=312e12, tc_blas=280e12, hbm=1.9e12, clock=1.41e9, l2=4.5e12)
GPUS = {g.name: g for g in (H200, A100)}

#: the forward routes this model prices (``MORAM_TRITON_FWD`` less ``auto``)
ROUTES = ("fused", "split", "gemm", "scan2", "gemm2")

SCAN_EFF = 0.70          # share of the tensor-core peak a Triton scan tile's MMAs sustain (assumed)
DRAIN_CYCLES = 2000      # old scan: pipeline drain + prologue refill per tile (2 stages from L2, assumed)
# SASS instructions per warp, sm_90, bf16, K bucket 16: the loop sizes that
# `.ci/ttgir_facts.py` prints (`sass_loops`) for scan-bf16xbf16-K16-prefill, select-K16 and
# scan2-bf16-K16-prefill; recount when the kernels change
OLD_ROUND_SASS = 550     # one trip of the old scan's merge_topk loop (128 x 64 tile, 8 warps)
SCAN2_EPI_SASS = 6348    # scan2's per-tile merge (pack, two tl.topk halves, two bitonic merges)
SELECT_ROUND_SASS = 247  # one trip of the select kernel's merge_topk loop (16 x 64, 4 warps)
#: one compare-exchange stage of a bitonic network (``tl.topk``) over up to 1,024 int64
#: keys in a 4-warp program: 8 keys per thread, ~5 instructions each plus one shuffle or
#: shared-memory exchange, ~40 cycles; a wider stage costs proportionally more (assumed)
TOPK_STAGE_S = 20e-9
#: one dependent chunk load of a pick program (one program per token): an L2 round trip
#: plus the issue of 1,024 words (assumed)
CHUNK_S = 0.7e-6
#: launch of one kernel node inside a CUDA graph (eager launches: ``Gpu.launch_s``)
GRAPH_NODE_S = 1.0e-6
#: resident pick programs per SM: 8 warps of at most 128 registers (the compile check's
#: /SM column on sm_90: K8/K16 lists in either mode, K32/K64 streams); one for the K32/K64
#: group-mode and the one-chunk stream variants (149-177 registers)
PICK_PER_SM = 2


def pick_per_sm(kp: int, groups: bool, bc: int) -> int:
    """Resident pick programs per SM for a K bucket, mode and chunk (see :data:`PICK_PER_SM`)."""
    from .split import ONE_CHUNK_N
    one_chunk = not groups and bc == ONE_CHUNK_N      # pick_config gives stream mode 512 otherwise
    return 1 if (groups and kp >= 32) or one_chunk else PICK_PER_SM


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


def scan2_s(t, d, n, k, kp, compute="bf16", gpu: Gpu = H200, sms=None, stats=True) -> dict:
    """``scan2``: same keys as :func:`scan_old_s`; every tile is merged (``rounds`` =
    tiles), ``gated`` says how often the old gate would have skipped a 128 x 128 tile (a
    statistic for reports, simulated only with ``stats``: the time does not use it)."""
    from .scan2 import SCAN2_MAX_KP, scan2_configs
    sms = sms or gpu.sms
    kp = SCAN2_MAX_KP                 # the launcher's list width for scan2
    cfg = scan2_configs(compute, kp)["prefill"]
    splits, per, waves = _grid(t, n, cfg, sms)
    prog = per * (_mma_tile_s(cfg.BT, cfg.BN, d, compute, gpu)
                  + _instr_s(SCAN2_EPI_SASS, cfg.num_warps, gpu))
    mem = 2 * n * d / gpu.hbm
    gated = simulate_scan(min(t, cfg.BT), cfg.BT, cfg.BN, per, k, kp)["gated"] if stats else None
    return dict(s=max(waves * prog, mem), splits=splits, tiles=per, rounds=per,
                gated=gated, waves=waves, cfg=cfg)


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
    """The gather kernel (every route's last): K value rows per token and y, one dependent load."""
    return elt * (min(t * min(k, n), n) * d_out + t * d_out) / gpu.hbm + CHUNK_S


# ---- the split / gemm select (the pick kernel) ----------------------------------------------------

def bitonic_stages(n: int, kp: int) -> float:
    """Stage-equivalents of ``tl.topk`` of ``n`` keys to ``kp`` (both powers of two, as
    Triton's ``sort_impl`` runs it): ``log kp`` merges of 1..log kp stages at full width,
    then per halving one max and ``log kp`` stages; a stage counts ``max(1, width / 1024)``."""
    log_n, log_k = n.bit_length() - 1, kp.bit_length() - 1
    width, total = n, 0.0
    for i in range(1, log_k + 1):
        total += i * max(1.0, width / 1024)
    for _ in range(log_k + 1, log_n + 1):
        width //= 2
        total += (1 + log_k) * max(1.0, width / 1024)
    return total


@functools.lru_cache(maxsize=256)
def simulate_pick(n: int, k: int, mode: str, *, parts: int = 1, nb: int = 0, bc: int = 1024, gs: int = 16,
                  tokens: int = 8, seed: int = 0) -> dict:
    """The work of one program of the split/gemm select kernel (``_moram_pick_kernel``),
    averaged over ``tokens`` tokens of Gaussian scores: dependent chunk loads, bitonic
    stage-equivalents, merges and the candidates of the final top-K.

    ``mode`` "groups": the pss chunks (``nb`` blocks), the group maxima in chunks of
    ``bc`` (the kernel's ``pick_config``; first chunk: one top-K; each further one merged:
    two), then ``KP x gs`` candidates in one top-K; no data dependence. "stream"
    (``parts`` d_in slices, or the gemm route with 1): ``n / bc`` chunks, the first one's top-K, then a merge only where a
    chunk's best beats the running K-th (counted on the scores)."""
    import torch

    from ._common import k_bucket
    kp = k_bucket(k)
    chunks = -(-n // bc)
    if mode == "groups":
        ng = -(-n // gs)
        g_chunks = -(-ng // bc)
        stages = bitonic_stages(bc, kp) + (g_chunks - 1) * (bitonic_stages(bc, kp) + bitonic_stages(2 * kp, kp)) \
            + bitonic_stages(kp * gs, kp)
        return dict(loads=-(-max(nb, 1) // bc) + g_chunks + 1, stages=stages, merges=g_chunks - 1,
                    candidates=kp * gs)
    p = torch.randn(tokens, n, generator=_gen(seed))
    merges = 0
    for row in p:
        run = row[:bc].topk(min(k, row[:bc].numel())).values
        for c0 in range(bc, n, bc):
            c = row[c0:c0 + bc]
            if c.max() > run[-1]:
                merges += 1
                run = torch.cat([run, c]).topk(k).values
    m = merges / tokens
    stages = bitonic_stages(bc, kp) + m * (bitonic_stages(bc, kp) + bitonic_stages(2 * kp, kp))
    return dict(loads=chunks, stages=stages, merges=m, candidates=n)


def _pick_waves_s(t: int, sim: dict, gpu: Gpu, per_sm: int = PICK_PER_SM) -> float:
    """Pick programs (one per token) in waves of ``per_sm`` per SM."""
    return -(-t // (gpu.sms * per_sm)) * (sim["loads"] * CHUNK_S + sim["stages"] * TOPK_STAGE_S)


# ---- the routes ---------------------------------------------------------------------------------

def _fused_terms(route, t, d, n, k, compute, gpu):
    from ._common import k_bucket
    kp = k_bucket(k)
    if route == "scan2":
        from .scan2 import SCAN2_MAX_KP
        kp = SCAN2_MAX_KP
    scan = scan2_s(t, d, n, k, kp, compute, gpu, stats=False) if route == "scan2" else \
        scan_old_s(t, d, n, k, kp, compute, gpu)
    sel = select_s(t, scan["splits"], scan["tiles"] * scan["cfg"].BN, k, kp, gpu)
    return dict(scores=scan["s"], select=sel["s"]), 3


def _split_terms(t, d, n, k, compute, gpu, elt):
    from ._common import k_bucket
    from .split import SPLIT_BN, pick_config, split_config, split_plan
    cfg = split_config(t, 64, compute, interpret=False)
    bn, nb, parts, _ = split_plan(t, n, 0, d, cfg.BD, gpu.sms, SPLIT_BN)
    t_blocks = -(-t // cfg.BT)
    # every program re-reads its tokens' x, every token block the keys: L2 traffic
    l2 = elt * d * (nb * t + (t_blocks - 1) * n) / gpu.l2
    mma = 2 * t_blocks * cfg.BT * n * d / (_tc(compute, gpu) * SCAN_EFF)
    scores = max(elt * n * d / gpu.hbm, mma, l2) + 4 * t * n * parts / gpu.hbm
    groups = parts == 1
    kp = k_bucket(k)
    bc = pick_config(kp, groups, interpret=False, n=n)[0]
    sim = simulate_pick(n, k, "groups" if groups else "stream", parts=parts, nb=nb, bc=bc)
    pick = _pick_waves_s(t, sim, gpu, pick_per_sm(kp, groups, bc)) + 4 * t * (parts * n if parts > 1 else 0) / gpu.hbm
    return dict(scores=scores, select=pick), 3


def _gemm_terms(t, d, n, k, compute, gpu, elt, groups=False):
    gemm = max(2 * t * n * d / (gpu.tc_blas / (2 if compute == "fp32" else 1)),
               (elt * (n * d + t * d) + 4 * t * n) / gpu.hbm)
    from ._common import k_bucket
    from .split import GS_GPU, groups_config, pick_config
    kp = k_bucket(k)
    if not groups:
        bc = pick_config(kp, False, interpret=False, n=n)[0]
        sim = simulate_pick(n, k, "stream", bc=bc)
        pick = max(4 * t * n / gpu.hbm, _pick_waves_s(t, sim, gpu, pick_per_sm(kp, False, bc)))
        # four launches: the GEMM (cuBLAS runs a thin, long-d_in one split-K: two kernels), pick, gather
        return dict(scores=gemm, select=pick), 4
    # gemm2: the groups kernel reads the scores once and writes the block sums of squares
    # and group maxima (HBM speed: a grid of T/16 x N/256 programs, no data dependence);
    # the pick in group mode reads those and KP x GS scores a token
    _, bn, _ = groups_config(interpret=False)
    nb = -(-n // bn)
    ng = nb * (bn // GS_GPU)
    groups_pass = 4 * t * (n + nb + ng) / gpu.hbm
    bc = pick_config(kp, True, interpret=False)[0]
    sim = simulate_pick(n, k, "groups", nb=nb, bc=bc)
    pick = max(4 * t * (nb + ng + kp * GS_GPU) / gpu.hbm, _pick_waves_s(t, sim, gpu, pick_per_sm(kp, True, bc)))
    return dict(scores=gemm, select=groups_pass + pick), 5


def forward_terms(route, t, d, n, k, d_out, compute="bf16", gpu: Gpu = H200, graph=False) -> dict:
    """Predicted seconds of one forward on ``route`` (one of :data:`ROUTES`), term by term:
    ``scores`` (scan, scores kernel or cuBLAS GEMM), ``select`` (the fused select or the
    pick kernel), ``gather``, ``launch`` (eager, or CUDA graph nodes with ``graph``) and
    ``total``."""
    elt = 4 if compute == "fp32" else 2
    if route in ("fused", "scan2"):
        out, launches = _fused_terms(route, t, d, n, k, compute, gpu)
    elif route == "split":
        out, launches = _split_terms(t, d, n, k, compute, gpu, elt)
    elif route in ("gemm", "gemm2"):
        out, launches = _gemm_terms(t, d, n, k, compute, gpu, elt, groups=route == "gemm2")
    else:
        raise ValueError(f"no model for the forward route {route!r} ({', '.join(ROUTES)})")
    out["gather"] = gather_s(t, n, k, d_out, gpu, elt)
    out["launch"] = launches * (GRAPH_NODE_S if graph else gpu.launch_s)
    out["total"] = sum(out.values())
    return out


def forward_s(route, t, d, n, k, d_out, compute="bf16", gpu: Gpu = H200, graph=False) -> float:
    """Predicted forward seconds of ``route`` (:func:`forward_terms`' total)."""
    return forward_terms(route, t, d, n, k, d_out, compute, gpu, graph)["total"]


@functools.lru_cache(maxsize=256)
def prefill_route(t, d, n, kp, compute, prec, sms) -> str:
    """``MORAM_TRITON_FWD=auto`` above decode: the cheapest of ``fused``, ``scan2`` (when it
    serves: tensor-core dots with K <= 16), ``gemm``, ``gemm2`` and ``split`` by
    :func:`forward_s`, on the GPU of :data:`GPUS` with ``sms`` SMs (another count: an
    :data:`H200` with that many SMs; the first route on a tie). ``split`` still wins some
    medium T with large banks (an A100 at T = 17-128, N >= 16,384). Empty calls keep
    ``fused``."""
    from . import scan2
    if n == 0 or d == 0 or t == 0:
        return "fused"
    options = ["fused"] + (["scan2"] if scan2.serves(kp, prec) else []) + ["gemm", "gemm2", "split"]
    gpu = next((g for g in GPUS.values() if g.sms == sms), None) or replace(H200, sms=max(int(sms), 1))
    cost = {v: forward_s(v, t, d, n, kp, d, compute, gpu) for v in options}
    return min(options, key=lambda v: (cost[v], options.index(v)))
