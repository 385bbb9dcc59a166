"""A frozen bank sharded over P processes (``mk.distributed``): measured per-rank time and
bytes per call, and a model of the communication time against all-gathering the bank.

``python -m benchmarks --preset bank-parallel`` runs P = 1, 2, 4 gloo processes on this machine. On a
2-core machine P processes share the cores, so wall time per rank is contended; the table
reports each rank's time outside collectives (its compute) and the payload bytes it put into
collectives per call, measured by ``mk.distributed``'s counters.

Beside the measurements, a bandwidth model predicts the communication time per call:

* sharded (this package): an all-gather of ``T (2K + 1)`` 4-byte words per rank (scores,
  global ids, sums of squares) and an all-reduce of ``y`` (``T d_out`` fp32); the backward
  all-reduces ``gc`` (``T K``) and ``[gx | trainable grads]``;
* all-gather the bank (the FSDP way): every rank receives the ``(P - 1) / P`` of
  ``N (d_in + d_out)`` bank elements it lacks, in every forward (and again in the backward
  when the bank is resharded after the forward, as FSDP does by default).

A ring all-gather of ``s`` bytes per rank moves ``(P - 1) s`` bytes into each rank; a ring
all-reduce of ``S`` bytes moves ``2 (P - 1) / P · S``. Time = bytes / bandwidth + per-step
latency, for NVLink (450 GB/s, 5 µs) and 100 Gb/s Ethernet (12.5 GB/s, 20 µs).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import torch

LINKS = {"NVLink": (450e9, 5e-6), "100GbE": (12.5e9, 20e-6)}   # bytes/s, latency per ring step
INPUTS = ("same x", "data-parallel")    # shard_bank(same_input=True) and the default


# ---- the model ------------------------------------------------------------------------------

def _ring_gather(per_rank: float, p: int) -> tuple[float, int]:
    return (p - 1) * per_rank, p - 1


def _ring_reduce(size: float, p: int) -> tuple[float, int]:
    return 2 * (p - 1) / p * size, 2 * (p - 1)


def _ring_scatter(size: float, p: int) -> tuple[float, int]:
    """A reduce-scatter of ``size`` bytes in all (every rank keeps ``size / p``)."""
    return (p - 1) / p * size, p - 1


RING = {"all_gather": _ring_gather, "all_reduce": _ring_reduce, "reduce_scatter": _ring_scatter}
HEADER_BYTES = 14 * 8      # the header all-gather: one int64 per field of distributed.HEADER
GY_CHECK_WORDS = 12        # same input: words checking gy ride on the gc all-reduce


def collectives(counts, d_in, d_out, k, r, train, *, need_x=True, same_input=False, elt=4, acc=4):
    """``{"forward": [(kind, bytes)], "backward": [...]}``: the collectives of one sharded
    call and the payload bytes each rank puts into each (what ``mk.distributed.traffic``
    counts). ``counts``: tokens per rank (all equal when ``same_input``); ``k``: the
    effective K; ``elt``: bytes per element of x, ``acc``: of the accumulation dtype;
    ``need_x``: whether x's gradient is wanted (on any rank)."""
    p, tmax, t = len(counts), max(counts), sum(counts)
    fwd, bwd = [("all_gather", HEADER_BYTES)], []
    if same_input:
        t = counts[0]
        if t:
            fwd += [("all_gather", t * (2 * k + 1) * acc), ("all_reduce", t * d_out * acc)]
            bwd += [("all_reduce", (t * k + GY_CHECK_WORDS) * acc),
                    ("all_reduce", (need_x * t * d_in + r * (d_in + d_out)) * acc)]
    elif t:
        def own_rows(width):   # reduce-scatter of padded blocks unless the padding costs more
            if p * tmax > 2 * t:
                return "all_reduce", t * width * acc
            return "reduce_scatter", p * tmax * width * acc
        fwd += [("all_gather", tmax * d_in * elt), ("all_gather", t * (2 * k + 1) * acc),
                own_rows(d_out)]
        bwd += [("all_gather", tmax * d_out * elt), ("all_reduce", t * k * acc)]
        bwd += [own_rows(d_in)] if need_x else []
    return {"forward": fwd, "backward": bwd if train else []}


def _ring_total(calls, p) -> tuple[float, int]:
    parts = [RING[kind](size, p) for kind, size in calls]
    return sum(b for b, _ in parts), sum(s for _, s in parts)


def sharded_traffic(t, d_in, d_out, k, r, p, train) -> tuple[float, int]:
    """(bytes into each rank, latency steps) for one sharded call, every rank passing the
    same ``t`` tokens (``same_input=True``)."""
    c = collectives([t] * p, d_in, d_out, k, r, train, same_input=True)
    return _ring_total(c["forward"] + c["backward"], p) if p > 1 else (0, 0)


def data_parallel_traffic(t, d_in, d_out, k, p, train, elt=4) -> tuple[float, int]:
    """(bytes into each rank, latency steps) for one data-parallel sharded call, each rank
    passing its own ``t`` tokens (the trainable atoms' gradients stay local: DDP's)."""
    c = collectives([t] * p, d_in, d_out, k, 0, train, elt=elt)
    return _ring_total(c["forward"] + c["backward"], p) if p > 1 else (0, 0)


def gather_bank_traffic(n, d_in, d_out, elt, p, train) -> tuple[float, int]:
    b, s = _ring_gather(n * (d_in + d_out) * elt / p, p)
    return (2 * b, 2 * s) if train else (b, s)


def predict_s(traffic: tuple[float, int], link: str) -> float:
    bw, lat = LINKS[link]
    return traffic[0] / bw + traffic[1] * lat


# ---- one measured group ---------------------------------------------------------------------

def _rank_main(rank, world, store, out, cfg):
    import torch.distributed as dist
    from torch import nn

    import moram_kernels as mk
    from moram_kernels import distributed as mkd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    d, n, r, k, t = cfg["d"], cfg["N"], cfg["r"], cfg["k"], cfg["T"]
    layer = mk.MoRAMLinear(nn.Linear(d, d), r=r, k=k, tau=0.05)
    layer.add_task()
    with torch.no_grad():
        layer._set_bank(frozen_keys=torch.randn(n, d) / d ** 0.5, frozen_values=torch.randn(n, d),
                        task_sizes=torch.tensor([n, r]))
        layer.values.normal_()
    res = {}
    for inputs in INPUTS:
        same = inputs == "same x"
        # data parallelism: each rank its own T tokens (a different draw per rank)
        x = torch.randn(t, d, generator=torch.Generator().manual_seed(0 if same else 1 + rank))
        res[inputs] = _measure(mkd.shard_bank(copy.deepcopy(layer), same_input=same), x, cfg)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _measure(layer, x, cfg) -> dict:
    from moram_kernels import distributed as mkd

    res = {}
    for mode in ("eval", "train"):
        layer.train(mode == "train")
        times, comm, cpu = [], [], []
        for i in range(cfg["warmup"] + cfg["reps"]):
            before = dict(mkd.traffic)
            start, cpu0 = time.perf_counter(), time.thread_time()
            if mode == "train":
                xr = x.clone().requires_grad_(True)
                layer(xr).sum().backward()
            else:
                with torch.no_grad():
                    layer(x)
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                cpu.append(time.thread_time() - cpu0)
                comm.append(mkd.traffic["comm_s"] - before["comm_s"])
                sent = (mkd.traffic["forward"] - before["forward"]
                        + mkd.traffic["backward"] - before["backward"])
        res[mode] = {"wall_ms": 1e3 * statistics.median(times),
                     "compute_ms": 1e3 * statistics.median(a - b for a, b in zip(times, comm)),
                     "cpu_ms": 1e3 * statistics.median(cpu),
                     "payload_bytes": sent}
    return res


def measure(world: int, cfg: dict) -> list[dict]:
    """Per-rank results of one group of ``world`` processes."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "store"), tmp, cfg))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(cfg["timeout"])
        if any(p.is_alive() or p.exitcode for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"the group of {world} processes failed or timed out "
                               f"(exit codes {[p.exitcode for p in procs]})")
        return [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]


# ---- report ---------------------------------------------------------------------------------

def _fmt_bytes(b: float) -> str:
    for unit, v in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= v:
            return f"{b / v:.3g} {unit}"
    return f"{b:.0f} B"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def parse_args(argv=None, prog: str = "python -m benchmarks --preset bank-parallel"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4", help="process counts, comma list (default 1,2,4)")
    p.add_argument("--d", type=int, default=512, help="d_in = d_out (default 512)")
    p.add_argument("--N", type=int, default=16384, help="frozen atoms (default 16384)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--T", type=int, default=256, help="tokens per call (default 256)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-d", type=int, default=4096, help="width for the model's N sweep")
    p.add_argument("--model-T", type=int, default=4096, help="tokens for the model's N sweep")
    p.add_argument("--out", default="benchmarks/results/bank_parallel", help="folder for CSV and plot")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, checks the harness runs")
    p.add_argument("--timeout", type=float, default=600, help="seconds per process group")
    return p.parse_args(argv)


def main(argv=None, prog: str = "python -m benchmarks --preset bank-parallel") -> int:
    args = parse_args(argv, prog)
    if args.smoke:
        args.d, args.N, args.T, args.reps, args.warmup = 32, 200, 8, 2, 1
    procs = [int(v) for v in args.procs.split(",") if v.strip()]
    cfg = dict(d=args.d, N=args.N, k=args.k, r=args.r, T=args.T, reps=args.reps,
               warmup=args.warmup, timeout=args.timeout)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = "python -m benchmarks --preset bank-parallel " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"## Sharded bank, {stamp}\n\n`{command.strip()}`: d_in = d_out = {args.d}, N = {args.N} "
          f"frozen + {args.r} trainable atoms, k = {args.k}, T = {args.T}, fp32, gloo on "
          f"{os.cpu_count()} CPU cores (torch {torch.__version__}), 1 thread per rank. Per rank, slowest "
          "rank, medians: CPU ms = the rank's own CPU time per call (not inflated by sharing cores), "
          "compute ms = wall time outside collectives, payload = bytes it put into collectives; "
          "predicted = the model's communication time per call.\n")
    rows = []
    print("| P | inputs | mode | CPU ms / rank | compute ms / rank | wall ms | payload / rank | "
          "sharded: bytes in / rank | sharded: NVLink | sharded: 100GbE | gather bank: bytes in / rank | "
          "gather bank: NVLink | gather bank: 100GbE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world in procs:
        per_rank = measure(world, cfg)
        for inputs in INPUTS:
            for mode in ("eval", "train"):
                train = mode == "train"
                if inputs == "same x":
                    sh = sharded_traffic(args.T, args.d, args.d, args.k, args.r, world, train)
                else:
                    sh = data_parallel_traffic(args.T, args.d, args.d, args.k, world, train)
                fs = gather_bank_traffic(args.N, args.d, args.d, 4, world, train)
                got = [p[inputs][mode] for p in per_rank]
                row = dict(timestamp_utc=stamp, P=world, inputs=inputs, mode=mode, d=args.d, N=args.N,
                           k=args.k, r=args.r, T=args.T,
                           compute_ms=max(g["compute_ms"] for g in got),
                           cpu_ms=max(g["cpu_ms"] for g in got),
                           wall_ms=max(g["wall_ms"] for g in got),
                           payload_bytes=max(g["payload_bytes"] for g in got),
                           sharded_bytes_in=sh[0], gather_bank_bytes_in=fs[0],
                           **{f"sharded_{l}_s": predict_s(sh, l) for l in LINKS},
                           **{f"gather_bank_{l}_s": predict_s(fs, l) for l in LINKS},
                           torch=torch.__version__, cpu_cores=os.cpu_count())
                rows.append(row)
                print(f"| {world} | {inputs} | {mode} | {row['cpu_ms']:.1f} | {row['compute_ms']:.1f} | "
                      f"{row['wall_ms']:.1f} | {_fmt_bytes(row['payload_bytes'])} | {_fmt_bytes(sh[0])} | "
                      f"{_fmt_s(row['sharded_NVLink_s'])} | {_fmt_s(row['sharded_100GbE_s'])} | "
                      f"{_fmt_bytes(fs[0])} | {_fmt_s(row['gather_bank_NVLink_s'])} | "
                      f"{_fmt_s(row['gather_bank_100GbE_s'])} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bank_parallel.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nCSV: {path}")
    _model_table(args)
    if not args.no_plots:
        _plot(args)
    return 0


def _sweep_n():
    return [2 ** e for e in range(10, 21)]


def _model_table(args) -> None:
    d, t, k, r, p = args.model_d, args.model_T, args.k, args.r, 4
    print(f"\nModel, one forward, P = {p}, d_in = d_out = {d}, k = {k}, bf16 bank and x: same x = "
          f"T = {t} tokens on every rank; data-parallel = T = {t} tokens per rank ({p * t} in "
          "all); a replicated bank moves nothing:\n")
    print("| N | same x: bytes in / rank | NVLink | 100GbE | data-parallel: bytes in / rank | NVLink | "
          "100GbE | gather bank: bytes in / rank | NVLink | 100GbE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    sh = sharded_traffic(t, d, d, k, r, p, False)
    dp = data_parallel_traffic(t, d, d, k, p, False, elt=2)
    for n in (4096, 16384, 65536, 262144):
        fs = gather_bank_traffic(n, d, d, 2, p, False)
        print(f"| {n:,} | " + " | ".join(
            f"{_fmt_bytes(c[0])} | {_fmt_s(predict_s(c, 'NVLink'))} | {_fmt_s(predict_s(c, '100GbE'))}"
            for c in (sh, dp, fs)) + " |")
    # where they cross: the bank's bytes equal the sharded call's
    per_atom = (p - 1) / p * (d + d) * 2
    print(f"\nAll-gathering the bank moves as many bytes as the sharded call at N ≈ "
          f"{sh[0] / per_atom:,.0f} (same x) and N ≈ {dp[0] / per_atom:,.0f} (data-parallel); "
          "above that, sharding wins (its bytes do not grow with N).")


def _plot(args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    d, t, k, r, p = args.model_d, args.model_T, args.k, args.r, 4
    ns = _sweep_n()
    sh = [sharded_traffic(t, d, d, k, r, p, False) for _ in ns]
    fs = [gather_bank_traffic(n, d, d, 2, p, False) for n in ns]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.loglog(ns, [b for b, _ in sh], "o-", label="sharded (candidates + y)")
    a1.loglog(ns, [b for b, _ in fs], "s-", label="all-gather the bank")
    a1.set(xlabel="N (atoms per layer)", ylabel="bytes into each rank per forward",
           title=f"P = {p}, d = {d}, T = {t}, k = {k}, bf16")
    for link, style in (("NVLink", "-"), ("100GbE", "--")):
        a2.loglog(ns, [predict_s(s, link) * 1e3 for s in sh], "o" + style, label=f"sharded, {link}")
        a2.loglog(ns, [predict_s(s, link) * 1e3 for s in fs], "s" + style, label=f"gather bank, {link}")
    a2.set(xlabel="N (atoms per layer)", ylabel="predicted communication ms per forward")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "bank_parallel.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
