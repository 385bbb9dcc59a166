"""Markdown tables, CSV and plots from the result rows."""

from __future__ import annotations

import csv
import math
import os

from .competitors import AUTHORS, BASE, LORA_N, display_order, lookup

COLUMNS = [
    "timestamp_utc", "mode", "sweep", "d_in", "d_out", "N", "k", "K", "T", "r", "tau", "delta", "dtype",
    "impl", "status", "reason", "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "reps", "compile_s",
    "speedup_vs_authors", "time_vs_floor", "flops", "bytes", "gflops", "gbs", "peak_mem_mb",
    "peak_mem_note", "saved_bwd_mb", "max_rel_err",
    "device", "cpu", "cpu_isa", "torch_cpu_capability", "cpu_lowp_road", "floor_variant", "cpu_cores", "torch_threads", "load_avg_1min", "gpu", "platform", "python", "torch", "cuda", "triton",
    "numpy", "moram_kernels", "git_commit", "backends",
]


_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _display(impl: str) -> str:
    return lookup(impl).label


def _ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _x(v: float) -> str:
    if v >= 10:
        return f"{v:.0f}×"
    return f"{v:.2g}×"


def _mb(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _case_key(r: dict) -> tuple:
    return (r["sweep"], r["d_in"], r["N"], r["k"], r["T"], r["r"], r["tau"], r["dtype"])


def markdown(rows: list[dict], hw: dict, notes: list[str], mem_note: str, elapsed: float, command: str) -> str:
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    backends = [i for i in impls if lookup(i).per_backend]
    order = display_order(impls)
    footnotes: list[str] = []

    def note(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    out = [f"## MoRAM benchmark, {hw['timestamp_utc']}", "",
           f"`{command}` on {hw['cpu']} ({hw['cpu_cores']} cores, {hw['torch_threads']} torch threads; "
           f"ISA: {hw['cpu_isa']}; torch CPU capability {hw['torch_cpu_capability']}; cpu backend's "
           f"low-precision road {hw['cpu_lowp_road']}), "
           f"GPU: {hw['gpu']}; device {hw['device']}, {', '.join(dict.fromkeys(r['dtype'] for r in rows))}; "
           f"torch {hw['torch']}, triton {hw['triton']}, python {hw['python']}, moram_kernels "
           f"{hw['moram_kernels']} ({hw['git_commit']}); backends timed: "
           f"{', '.join(_display(b) for b in backends) or 'none'}; {elapsed:.0f} s in all.", ""]
    try:
        busy = float(hw["load_avg_1min"]) > float(hw["cpu_cores"])
    except ValueError:
        busy = False
    if busy and hw["device"] == "cpu":
        hint = (", and multi-threaded small ops wait for descheduled threads (`--threads 1` avoids that)"
                if hw["torch_threads"] != "1" else "")
        notes = notes + [f"the machine was busy (load average {hw['load_avg_1min']} on {hw['cpu_cores']} cores "
                         f"at the start): timings are noisy{hint}"]
    for n in notes:
        out.append(f"- {n}")
    if notes:
        out.append("")
    titles = {"eval": "Eval forward: the adapter delta alone (`mk.moram` vs `moram_dense`), ms",
              "train": "Train step: the whole layer (frozen base + frozen atoms + r trainable atoms), "
                       "forward + backward incl. gx, ms"}
    for mode in ("eval", "train"):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        cases: dict[tuple, dict[str, dict]] = {}
        for r in mrows:
            cases.setdefault(_case_key(r), {})[r["impl"]] = r
        head = ["sweep", "d", "N", "k", "T", "dtype"] + [_display(i) for i in order] + \
               ["best/floor", "GFLOP/s", "GB/s", "peak MB (authors→best)"]
        if mode == "train":
            head += ["saved MB (authors→best)", "adapter share ms: best / LoRA R=N"]
        out += [f"### {titles[mode]}", "", "| " + " | ".join(head) + " |",
                "|" + "|".join("---" if i < 1 else "---:" for i in range(len(head))) + "|"]
        for key, by in cases.items():
            any_r = next(iter(by.values()))
            cells = [any_r["sweep"], str(any_r["d_in"]), str(any_r["N"]), str(any_r["k"]), str(any_r["T"]),
                     _DTYPE_SHORT.get(any_r["dtype"], any_r["dtype"])]
            for i in order:
                r = by.get(i)
                if r is None:
                    cells.append("-")
                elif r["status"] != "ok":
                    cells.append(f"{r['status']} {note(r['reason'])}")
                else:
                    spread = 100 * (r["q75_ms"] - r["q25_ms"]) / r["median_ms"]
                    cell = f"{_ms(r['median_ms'])} ±{spread:.0f}%"
                    if i != AUTHORS and r.get("speedup_vs_authors"):
                        cell += f" ({_x(r['speedup_vs_authors'])})"
                    cells.append(cell)
            ok_b = [by[b] for b in backends if b in by and by[b]["status"] == "ok"]
            best = min(ok_b, key=lambda r: r["median_ms"]) if ok_b else None
            auth = by.get(AUTHORS)
            if best is not None:
                cells += [_x(best["time_vs_floor"]) if best.get("time_vs_floor") else "-",
                          f"{best['gflops']:.3g}", f"{best['gbs']:.3g}"]
                cells.append(f"{_mb(auth.get('peak_mem_mb') if auth else None)} → {_mb(best.get('peak_mem_mb'))}")
                if mode == "train":
                    cells.append(f"{_mb(auth.get('saved_bwd_mb') if auth else None)} → {_mb(best.get('saved_bwd_mb'))}")
                    cells.append(_share(best, by.get(LORA_N), by.get(BASE)))
            else:
                cells += ["-"] * (6 if mode == "train" else 4)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["Cells: median ms over repeats after warm-up, ± the interquartile range as % of the median, "
            "(speed-up against the authors' layer in the same run). best = the fastest moram backend; "
            "best/floor = its time over the fastest torch GEMM of `x @ keys.T` in the row's dtype (best of "
            "torch's matmul variants, the CSV's floor_variant); GFLOP/s and GB/s are its nominal useful "
            "work (the sparse algorithm's FLOPs, each tensor touched once) over its time. "
            f"Peak memory: {mem_note}. saved MB: bytes autograd keeps for backward, not counting inputs, "
            "parameters, buffers and the cached Gram matrix. LoRA R=N is a dense adapter as wide as the bank, R=r one task's adapter. "
            "Adapter share (train): a layer step minus the base layer's own step (forward + gx), for the best "
            "backend and for LoRA R=N, which does about twice MoRAM's dense work; (ratio) best over LoRA.",
            ""]
    errs = [r["max_rel_err"] for r in rows if r.get("max_rel_err") is not None]
    if errs:
        out += [f"Every moram output was checked against the authors' layer in the same run: max relative "
                f"error {max(errs):.1e}.", ""]
    if footnotes:
        out += ["Not measured:"] + [f"{i + 1}. {t}" for i, t in enumerate(footnotes)] + [""]
    return "\n".join(out)


def _share(best: dict, lora: dict | None, base: dict | None) -> str:
    ok = lambda r: r is not None and r.get("status") == "ok"  # noqa: E731
    if not (ok(lora) and ok(base)):
        return "-"
    b, lo = best["median_ms"] - base["median_ms"], lora["median_ms"] - base["median_ms"]
    ratio = f" ({_x(b / lo)})" if lo > 0 and b > 0 else ""
    return f"{_ms(max(b, 0.0))} / {_ms(max(lo, 0.0))}{ratio}"


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def plots(rows: list[dict], folder: str) -> list[str]:
    """time_vs_N.png and speedup_vs_N.png from the N sweep (none if it was not run)."""
    nrows = [r for r in rows if "N" in r["sweep"].split(",") and r["status"] == "ok"]
    modes = [m for m in ("eval", "train") if any(r["mode"] == m for r in nrows)]
    if not modes:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per implementation, the same in every panel and both figures
    all_impls = display_order(list(dict.fromkeys(r["impl"] for r in nrows)))
    colour = {impl: f"C{i % 10}" for i, impl in enumerate(all_impls)}
    paths = []
    for what, fname, ylabel in (("median_ms", "time_vs_N.png", "median time per call (ms)"),
                                ("speedup_vs_authors", "speedup_vs_N.png", "speed-up vs the authors' layer (×)")):
        fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mr = [r for r in nrows if r["mode"] == mode]
            impls = display_order(list(dict.fromkeys(r["impl"] for r in mr)))
            for impl in impls:
                if what == "speedup_vs_authors" and impl == AUTHORS:
                    continue
                pts = sorted((r["N"], r[what]) for r in mr if r["impl"] == impl and r.get(what))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], lookup(impl).style, marker="o",
                            color=colour[impl], label=_display(impl))
            if what == "speedup_vs_authors":
                ax.axhline(1.0, color="grey", lw=0.8)
            r0 = mr[0]
            ax.set(xscale="log", yscale="log", xlabel="N (atoms)", ylabel=ylabel,
                   title=f"{mode}: d={r0['d_in']}, k={r0['k']}, T={r0['T']}, {r0['dtype']}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(folder, fname)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_all(rows, hw, args, notes, mem_note, elapsed) -> dict:
    stamp = hw["timestamp_utc"].replace("-", "").replace(":", "")
    folder = os.path.join(args.out, f"{stamp}-{args.size}")
    os.makedirs(folder, exist_ok=True)
    text = markdown(rows, hw, notes, mem_note, elapsed, args.command)
    csv_path, md_path = os.path.join(folder, "results.csv"), os.path.join(folder, "results.md")
    write_csv(rows, csv_path)
    with open(md_path, "w") as f:
        f.write(text + "\n")
    pngs, plot_note = [], None
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot_note = ('no plots: matplotlib is not installed (pip install "matplotlib>=3.7", '
                         'or the [plot] extra, then run again)')
        else:
            pngs = plots(rows, folder)
    return dict(folder=folder, csv=csv_path, md=md_path, plots=pngs, plot_note=plot_note, markdown_text=text)
