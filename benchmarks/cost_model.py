"""The FLOP / byte cost model of one MoRAM call, its floors per hardware, and the GPU
check's predicted times. Every benchmark figure of useful work comes from here: the main
job's GFLOP/s and GB/s columns (:func:`work`), the ``gpu-check`` preset's floors and
predictions (:func:`plan`, :func:`predict_ms`) and the ``triton-variants`` preset's waves
(:data:`GPU_CHECK`).

Symbols: ``T`` tokens, ``d_in`` / ``d_out`` widths, ``N`` atoms, ``K`` the effective top-K
(``min(max(k, 2), N)``, or 1 when ``N == 1``), ``r`` trainable atoms, ``R`` a LoRA rank,
``e`` bytes per element. Bytes count each tensor read or written once.

MoRAM forward (every MoRAM implementation, the authors' dense one included, is credited
the sparse algorithm's useful work, so GFLOP/s ranks them exactly as time does)::

    FLOPs = 2 T N d_in                  scores x A^T
          + 2 T K d_out                 gather of K value rows per token
    bytes = e (T d_in + N d_in + min(N, T K) d_out + T d_out)
                                        x, keys, the value rows that can be drawn, y

MoRAM backward, training layout (a frozen bank with its Gram matrix cached, r trainable
atoms)::

    FLOPs = 2 T K (d_in + d_out)        gather-dot of the coefficients and the sparse gx
          + 2 T min(N, d_in) d_in       the normalisation term: x G through the Gram
                                        matrix, or P A when N < d_in is cheaper
          + 2 T r d_in + 2 T min(K, r) d_out   gradients of the trainable keys and values
    bytes = forward bytes + e r (d_in + d_out)   (the trainable atoms' gradients)

The train step of a whole layer adds the frozen base ``nn.Linear``: forward and ``gx``,
``2 T d_in d_out`` FLOPs and ``e d_in d_out`` bytes each. LoRA of rank ``R``: forward
``2 T R (d_in + d_out)`` FLOPs, ``e (T d_in + R (d_in + d_out) + T d_out)`` bytes; its
train step three times those FLOPs, twice those bytes plus the gradients
``e R (d_in + d_out)``, plus the base layer. The floor ``x @ keys.T``: ``2 T N d_in``
FLOPs, ``e (T d_in + N d_in + T N)`` bytes. The authors' dense layer, used only to predict
a slow run before starting it: ``2 T N (d_in + d_out)`` FLOPs forward, three times that
plus ``4 T d_in d_out`` for a train step.

Floor of a call on hardware ``hw`` (:data:`HARDWARE`)::

    floor_s = max(FLOPs / hw["tc_blas"], bytes / hw["hbm"])

``tc_blas`` is the bf16 GEMM rate cuBLAS reaches, ``hbm`` the memory bandwidth measured
with a device copy. :func:`predict_ms` refines the floor per implementation for the
``gpu-check`` preset: the Triton scan at ``SCAN_EFF`` of the tensor-core peak plus
``MERGE_FRAC`` for its running top-K merge, over the SMs its grid keeps busy; the authors'
path as two GEMMs plus ten passes over ``[T, N]`` fp32; ``launch_s`` per eager launch.
The GPU check prints each prediction beside the measured time, so the model is checked on
every GPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["forward_flops", "forward_bytes", "backward_flops", "backward_bytes", "work", "dense_flops",
           "floor_s", "HARDWARE", "H200", "GPU_CHECK", "plan", "predict_ms", "route_ms", "split_ms",
           "gemm_route_ms", "fused_ms", "simulate_pick", "simulate_fused_rounds", "decode_floor_ms"]


# ---- one call ---------------------------------------------------------------------------------

def forward_flops(t: int, d_in: int, d_out: int, n: int, kk: int) -> float:
    """Scoring GEMM ``2 T N d_in`` plus the K-row gather ``2 T K d_out``."""
    return 2 * t * n * d_in + 2 * t * kk * d_out


def forward_bytes(t: int, d_in: int, d_out: int, n: int, kk: int, elt: int) -> float:
    """Compulsory traffic: x in, the keys once, the distinct value rows (at most N), y out."""
    return elt * (t * d_in + n * d_in + min(n, t * kk) * d_out + t * d_out)


def backward_flops(t: int, d_in: int, d_out: int, n: int, kk: int, r: int) -> float:
    """Gather-dot and sparse gx, the dense normalisation term, the trainable atoms' gradients."""
    return 2 * t * kk * (d_in + d_out) + 2 * t * min(n, d_in) * d_in + 2 * t * r * d_in \
        + 2 * t * min(kk, r) * d_out


def backward_bytes(t: int, d_in: int, d_out: int, n: int, kk: int, r: int, elt: int) -> float:
    """The forward's tensors again, plus the trainable atoms' gradients."""
    return forward_bytes(t, d_in, d_out, n, kk, elt) + elt * r * (d_in + d_out)


def _linear(t: int, d_in: int, d_out: int, elt: int) -> tuple[float, float]:
    return 2 * t * d_in * d_out, elt * d_in * d_out


def _lora(t: int, d_in: int, d_out: int, rank: int, elt: int) -> tuple[float, float]:
    return 2 * t * rank * (d_in + d_out), elt * (t * d_in + rank * (d_in + d_out) + t * d_out)


def work(case, mode: str, kind: str, elt: int, rank: int = 0) -> tuple[float, float]:
    """Nominal ``(FLOPs, bytes)`` of one call of a competitor of ``kind`` ("moram", "lora",
    "floor" or "base", see ``benchmarks/competitors.py``) on ``case`` (a
    ``benchmarks.grid.Case``), in ``mode`` "eval" (forward of the adapter) or "train" (step
    of the whole layer)."""
    t, n, di, do, kk, r = case.t, case.n, case.d_in, case.d_out, case.kk, case.r
    base_f, base_b = _linear(t, di, do, elt)
    if kind == "floor":
        return 2 * t * n * di, elt * (t * di + n * di + t * n)
    if kind == "base":
        return 2 * base_f, 2 * base_b
    if kind == "lora":
        f, b = _lora(t, di, do, rank, elt)
        if mode == "eval":
            return f, b
        return 3 * f + 2 * base_f, 2 * b + 2 * base_b + elt * rank * (di + do)
    if kind != "moram":
        raise ValueError(f"no cost model for competitor kind {kind!r} (moram, lora, floor, base)")
    f, b = forward_flops(t, di, do, n, kk), forward_bytes(t, di, do, n, kk, elt)
    if mode == "eval":
        return f, b
    return (f + backward_flops(t, di, do, n, kk, r) + 2 * base_f,
            b + backward_bytes(t, di, do, n, kk, r, elt) + 2 * base_b)


def dense_flops(case, mode: str) -> float:
    """FLOPs of the authors' dense layer, to predict a slow run before starting it."""
    f = 2 * case.t * case.n * (case.d_in + case.d_out)
    return f if mode == "eval" else 3 * f + 4 * case.t * case.d_in * case.d_out


# ---- hardware and floors ----------------------------------------------------------------------

#: Per hardware: SMs, dense bf16 tensor-core peak and the rate cuBLAS reaches (FLOP/s), HBM
#: bandwidth measured with a device copy (bytes/s), and the cost of one eager launch (s).
HARDWARE: dict[str, dict[str, float]] = {
    "H200": dict(sms=132, tc_peak=990e12, tc_blas=790e12, hbm=4.3e12, launch_s=4e-6),
}
H200 = HARDWARE["H200"]
SCAN_EFF = 0.70      # assumed share of the tensor-core peak a Triton scan tile sustains
MERGE_FRAC = 0.15    # assumed running top-K merge cost on top of a scan tile's MMA time


def floor_s(flops: float, nbytes: float, hw: dict = H200) -> float:
    """Seconds no implementation can beat: the GEMM rate or the memory bandwidth."""
    return max(flops / hw["tc_blas"], nbytes / hw["hbm"])


# ---- the GPU check's shape, plan and predictions ----------------------------------------------

@dataclass(frozen=True)
class GpuCheckShape:
    """The shape the ``gpu-check`` preset times (and ``triton-variants`` counts waves for)."""

    d_in: int = 4096
    d_out: int = 4096
    n: int = 16384          # atoms, of which ``r`` trainable in the forward + backward rows
    r: int = 16
    k: int = 16
    tau: float = 0.03
    t_prefill: int = 4096
    t_decode: tuple[int, ...] = (1, 16, 64)
    elt: int = 2            # bf16


GPU_CHECK = GpuCheckShape()


def plan(s: GpuCheckShape = GPU_CHECK) -> list[tuple[str, int, float, float]]:
    """The GPU check's rows: ``(case, T, FLOPs, bytes)``."""
    def fwd(t):
        return forward_flops(t, s.d_in, s.d_out, s.n, s.k), forward_bytes(t, s.d_in, s.d_out, s.n, s.k, s.elt)

    t = s.t_prefill
    f, b = fwd(t)
    rows = [("prefill fwd", t, f, b),
            ("prefill fwd+bwd", t, f + backward_flops(t, s.d_in, s.d_out, s.n, s.k, s.r),
             b + backward_bytes(t, s.d_in, s.d_out, s.n, s.k, s.r, s.elt))]
    rows += [(f"decode T={t} fwd", t, *fwd(t)) for t in s.t_decode]
    return rows


def _triton_fwd_s(t, d, d_out, n, k, hw=H200):
    """Scan (one wave: time = FLOPs / (busy SMs x per-SM peak x SCAN_EFF), at least the
    keys read once from HBM), select (partial lists) and gather (K value rows), plus
    three launches."""
    from moram_kernels.backends.triton._common import k_bucket, scan_configs
    from moram_kernels.backends.triton.forward import plan_splits
    kp = k_bucket(k)
    cfgs = scan_configs("bf16", kp)
    cfg = cfgs["decode16"] if t <= 16 else cfgs["decode64"] if t <= 64 else cfgs["prefill"]
    splits, per = plan_splits(t, n, 0, cfg.BT, cfg.BN, None, cfg.per_sm, sms=hw["sms"])
    t_blocks = -(-t // cfg.BT)
    busy = min(1.0, t_blocks * splits / (hw["sms"] * cfg.per_sm)) if t > 64 else 1.0
    mma = 2 * (t_blocks * cfg.BT) * n * d / (hw["tc_peak"] * SCAN_EFF * busy) * (1 + MERGE_FRAC)
    scan = max(mma, 2 * n * d / hw["hbm"])
    select = (t * splits * kp * 12 + t * k * 24) / hw["hbm"]
    gather = 2 * (min(t * k, n) * d_out + t * d_out) / hw["hbm"]
    return scan + select + gather + 3 * hw["launch_s"]


def predict_ms(case: str, impl: str, t: int, hw: dict = H200, s: GpuCheckShape = GPU_CHECK) -> float | None:
    """Predicted milliseconds of one GPU check row (eager launches), or None if not modelled.
    ``impl`` "triton" is the forward road ``MORAM_TRITON_FWD`` selects now, "triton:split"
    (or fused, gemm) one road."""
    d, d_out, n, k = s.d_in, s.d_out, s.n, s.k
    gemm = max(2 * t * n * d / hw["tc_blas"], 2 * (n * d + t * d + t * n) / hw["hbm"])
    if impl.startswith("cuBLAS"):
        return 1e3 * gemm
    fwd_only = "bwd" not in case
    if impl.startswith("authors"):
        # score GEMM, dense value GEMM, ~10 passes over [T, N] fp32 (norm, s, topk, scatter,
        # softmax, threshold, c), reading all of B
        value = max(2 * t * n * d_out / hw["tc_blas"], 2 * n * d_out / hw["hbm"])
        tn = 10 * 4 * t * n / hw["hbm"]
        f = gemm + value + tn + 12 * hw["launch_s"]
        return 1e3 * (f if fwd_only else 3 * f)   # autograd: two more [T, N] GEMMs and passes
    if impl == "triton" or impl.startswith("triton:"):
        # "triton:<road>" is one forward road (MORAM_TRITON_FWD); "triton" the one fwd_route takes now
        from moram_kernels.backends.triton.forward import fwd_route
        road = impl.partition(":")[2] or fwd_route(t, n, d)
        f = 1e-3 * route_ms(road, t, d, d_out, n, k, hw)
    elif impl == "cuda":
        # cuBLAS scores in fp32 chunks written and read back, a select kernel, the gather
        f = gemm + 2 * 4 * t * n / hw["hbm"] + 2 * min(t * k, n) * d_out / hw["hbm"] + 4 * hw["launch_s"]
    else:
        return None
    if fwd_only:
        return 1e3 * f
    # backward: x G (2 T d^2) on tensor cores, P and dA of the r trainable atoms, the
    # gathers (K rows of A and B per token, mostly L2) and about ten launches
    b = (2 * t * d * d + 4 * t * s.r * d) / hw["tc_blas"] + 3 * 2 * t * d / hw["hbm"] \
        + 2 * 2 * t * k * d / hw["hbm"] + 10 * hw["launch_s"]
    return 1e3 * (f + b)


# ---- forward roads: decode (split), cuBLAS scores + select (gemm), the fused scan -------------
#
# The Triton forward has three roads (``MORAM_TRITON_FWD``, docs/backends.md), and ``auto``
# takes the one :func:`route_ms` predicts fastest. Memory and tensor-core terms as above;
# the select kernels' serial work comes from simulations of the kernels' own algorithms
# (:func:`simulate_pick`, :func:`simulate_fused_rounds`), priced per dependent step:

#: one compare-exchange stage of a bitonic network (``tl.topk``) over up to 1,024 int64
#: keys in a 4-warp program: 8 keys per thread, ~5 instructions each plus one shuffle or
#: shared-memory exchange, ~40 cycles; a wider stage costs proportionally more
TOPK_STAGE_S = 20e-9
#: one dependent chunk load of a select program (one program per token): an L2 round trip
#: plus the issue of 1,024 words
CHUNK_S = 0.7e-6
#: one round of the fused road's ``merge_topk`` (max, argmax, min, argmin, sums: ~15
#: block-wide reductions, each a barrier); the 8-warp 128-row prefill round is ~650
#: instructions per thread (read from its TTGIR), about twice a 4-warp decode round
ROUND_S = {"decode": 0.3e-6, "prefill": 0.66e-6}
#: launch of one kernel node inside a CUDA graph (eager launches: ``launch_s``)
GRAPH_NODE_S = 1.0e-6
#: resident select programs per SM (4 warps, few registers)
PICK_PER_SM = 4

HARDWARE["A100"] = dict(sms=108, tc_peak=312e12, tc_blas=280e12, hbm=1.9e12, launch_s=4e-6)
#: L2 read bandwidth (bytes/s), for operands re-read by many programs (published
#: microbenchmarks: about 7 TB/s on H100/H200, 4.5 TB/s on A100)
L2_BW = {108: 4.5e12, 132: 7.0e12}


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


def simulate_pick(n: int, k: int, mode: str, *, parts: int = 1, nb: int = 0, bc: int = 1024, gs: int = 16,
                  tokens: int = 8, seed: int = 0) -> dict:
    """The work of one program of the split/gemm select kernel (``_moram_pick_kernel``),
    averaged over ``tokens`` tokens of Gaussian scores: dependent chunk loads, bitonic
    stage-equivalents, merges and the candidates of the final top-K.

    ``mode`` "groups": the pss chunks (``nb`` blocks), the group maxima in chunks of
    ``bc`` (first chunk: one top-K; each further one merged: two), then ``KP x gs``
    candidates in one top-K; no data dependence. "stream" (``parts`` d_in slices, or the
    gemm road with 1): ``n / bc`` chunks, the first one's top-K, then a merge only where a
    chunk's best beats the running K-th (counted on the scores)."""
    import torch

    from moram_kernels.backends.triton._common import k_bucket
    kp = k_bucket(k)
    chunks = -(-n // bc)
    if mode == "groups":
        ng = -(-n // gs)
        g_chunks = -(-ng // bc)
        stages = bitonic_stages(bc, kp) + (g_chunks - 1) * (bitonic_stages(bc, kp) + bitonic_stages(2 * kp, kp)) \
            + bitonic_stages(kp * gs, kp)
        return dict(loads=-(-max(nb, 1) // bc) + g_chunks + 1, stages=stages, merges=g_chunks - 1,
                    candidates=kp * gs)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(tokens, n, generator=g)
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


def _pick_program_s(sim: dict) -> float:
    return sim["loads"] * CHUNK_S + sim["stages"] * TOPK_STAGE_S


def split_ms(t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *, elt: int = 2,
             graph: bool = False) -> dict:
    """The ``split`` road, term by term (ms): ``scores`` (the longest of: keys once from
    HBM, the padded MMA at ``SCAN_EFF``, the L2 re-reads of x per atom block and of the
    keys per token block; plus the fp32 scores written), ``pick`` (the simulated program,
    waves of ``PICK_PER_SM`` per SM), ``gather`` (K value rows per token, one dependent
    load), ``launch`` (three kernels, eager or graph nodes) and ``total``."""
    from moram_kernels.backends.triton.split import SPLIT_BN, split_config, split_plan
    cfg = split_config(t, 64, "bf16" if elt == 2 else "fp32", interpret=False)
    bn, nb, parts, _ = split_plan(t, n, 0, d_in, cfg.BD, hw["sms"], SPLIT_BN)
    t_blocks = -(-t // cfg.BT)
    # every program re-reads its tokens' x, every token block the keys: L2 traffic
    l2 = elt * d_in * (nb * t + (t_blocks - 1) * n) / L2_BW[hw["sms"]]
    scores = max(elt * n * d_in / hw["hbm"], 2 * t_blocks * cfg.BT * n * d_in / (hw["tc_peak"] * SCAN_EFF), l2) \
        + 4 * t * n * parts / hw["hbm"]
    sim = simulate_pick(n, k, "groups" if parts == 1 else "stream", parts=parts, nb=nb,
                        bc=1024 if parts == 1 else 512)
    waves = -(-t // (hw["sms"] * PICK_PER_SM))
    pick = waves * _pick_program_s(sim) + 4 * t * (parts * n if parts > 1 else 0) / hw["hbm"]
    return _road(scores, pick, t, n, k, d_out, elt, 3, hw, graph)


def _road(scores, pick, t, n, k, d_out, elt, launches, hw, graph) -> dict:
    """A score-writing road's terms in ms, with the gather (K value rows per token, one
    dependent load), the launches and the total."""
    gather = elt * (min(t * min(k, n), n) * d_out + t * d_out) / hw["hbm"] + CHUNK_S
    out = dict(scores=scores, pick=pick, gather=gather,
               launch=launches * (GRAPH_NODE_S if graph else hw["launch_s"]))
    out["total"] = sum(out.values())
    return {key: 1e3 * v for key, v in out.items()}


def gemm_route_ms(t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *, elt: int = 2,
                  graph: bool = False) -> dict:
    """The ``gemm`` road (ms): cuBLAS ``x A^T`` writing fp32 scores, the select reading
    them (stream mode: HBM bytes or the simulated programs' waves, whichever is longer),
    the gather, four launches."""
    gemm = max(2 * t * n * d_in / hw["tc_blas"], (elt * (n * d_in + t * d_in) + 4 * t * n) / hw["hbm"])
    sim = simulate_pick(n, k, "stream", bc=512)
    waves = -(-t // (hw["sms"] * PICK_PER_SM))
    pick = max(4 * t * n / hw["hbm"], waves * _pick_program_s(sim))
    return _road(gemm, pick, t, n, k, d_out, elt, 4, hw, graph)


def simulate_fused_rounds(t: int, n: int, k: int, hw: dict = H200, seed: int = 0) -> dict:
    """``merge_topk`` rounds of the fused road, on Gaussian scores: ``scan``, the rounds
    of one scan program (its token block against its split's tiles: per tile, the most
    candidates above the running K-th over the block's rows, at most KP; padded rows score
    0), and ``select``, those of one select program (the split lists pruned below the
    largest split K-th, in chunks of 64 candidates, 16 rows a program) and the
    ``survivors`` per token."""
    import torch

    from moram_kernels.backends.triton._common import k_bucket, scan_configs
    from moram_kernels.backends.triton.forward import plan_splits
    kp = k_bucket(k)
    cfg = scan_configs("bf16", kp)["decode16" if t <= 16 else "decode64" if t <= 64 else "prefill"]
    splits, per = plan_splits(t, n, 0, cfg.BT, cfg.BN, None, cfg.per_sm, sms=hw["sms"])
    g = torch.Generator().manual_seed(seed)
    rows = min(t, cfg.BT)
    p = torch.zeros(cfg.BT, min(per * cfg.BN, n))
    p[:rows] = torch.randn(rows, p.shape[1], generator=g)
    run = torch.full((cfg.BT, k), float("-inf"))
    scan = 0
    for c0 in range(0, p.shape[1], cfg.BN):
        tile = p[:, c0:c0 + cfg.BN]
        scan += min(kp, int((tile > run.min(1, keepdim=True).values).sum(1).max()))
        run = torch.cat([run, tile], 1).topk(k, 1).values
    # the select: one token's split lists from Gaussian scores of the whole bank
    sc = torch.randn(min(t, 16), n, generator=g)
    lists = [sc[:, s * per * cfg.BN:(s + 1) * per * cfg.BN].topk(min(k, per * cfg.BN), 1).values
             for s in range(splits)]
    bound = torch.stack([v[:, -1] for v in lists], 1).max(1).values
    cand = torch.cat([torch.nn.functional.pad(v, (0, kp - v.shape[1]), value=float("-inf")) for v in lists], 1)
    alive = cand >= bound[:, None]
    select = sum(min(kp, int(alive[:, c0:c0 + 64].sum(1).max())) for c0 in range(0, cand.shape[1], 64))
    return dict(scan=scan, select=select, survivors=float(alive.sum(1).float().mean()), splits=splits)


def fused_ms(t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *, graph: bool = False) -> dict:
    """The ``fused`` road (ms): :func:`_triton_fwd_s` (bytes, MMAs, launches) plus its
    serial merge rounds (:func:`simulate_fused_rounds`) at ``ROUND_S``."""
    sim = simulate_fused_rounds(t, n, k, hw)
    regime = "prefill" if t > 64 else "decode"
    merges = sim["scan"] * ROUND_S[regime] + sim["select"] * ROUND_S["decode"] * -(-t // (16 * hw["sms"] * 4))
    base = _triton_fwd_s(t, d_in, d_out, n, k, hw)
    if graph:
        base -= 3 * (hw["launch_s"] - GRAPH_NODE_S)
    return dict(base=1e3 * base, merges=1e3 * merges, total=1e3 * (base + merges))


def route_ms(route: str, t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, *,
             graph: bool = False) -> float:
    """Predicted milliseconds of one forward on ``route`` ("fused", "split", "gemm"),
    bf16; ``fwd_route``'s ``auto`` takes the smallest (a test pins the two together)."""
    if route == "split":
        return split_ms(t, d_in, d_out, n, k, hw, graph=graph)["total"]
    if route == "gemm":
        return gemm_route_ms(t, d_in, d_out, n, k, hw, graph=graph)["total"]
    if route == "fused":
        return fused_ms(t, d_in, d_out, n, k, hw, graph=graph)["total"]
    raise ValueError(f"no model for the forward road {route!r} (fused, split, gemm)")


def decode_floor_ms(t: int, d_in: int, d_out: int, n: int, k: int, hw: dict = H200, elt: int = 2) -> float:
    """HBM floor of a decode step: keys once, the K value rows, x and y."""
    return 1e3 * forward_bytes(t, d_in, d_out, n, min(k, n), elt) / hw["hbm"]
