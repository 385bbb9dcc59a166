"""Atom-usage statistics: which memories each layer recalls, and from which task they came.

Counting is off by default and costs nothing then (one ``is None`` test per forward).
When on, each ``MoRAMLinear`` adds the bincount of its top-K atom ids (before the
eval-time threshold) to an int64 counter ``[N]``::

    with mk.integrations.record_usage(model) as rec:
        evaluate(model, task_data)
    rec.counts        # {layer: [N] selections per atom}
    rec.by_task       # {layer: [tasks] selections per task that created the atoms}
    mk.integrations.plot_usage(rec, "usage.png")
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._io import atomic_path
from .model import moram_layers

__all__ = ["start_usage", "stop_usage", "usage_counts", "usage_by_task", "atom_tasks",
           "record_usage", "UsageRecord", "plot_usage"]


def _layers(model: nn.Module):
    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; call inject() first")
    return layers


def atom_tasks(layer) -> Tensor:
    """``[N]`` int64: the task (0-based, in ``add_task`` order) that created each atom."""
    ts = layer.task_sizes.cpu()
    return torch.repeat_interleave(torch.arange(ts.shape[0]), ts)


def start_usage(model: nn.Module) -> None:
    """Start counting atom selections in every MoRAM layer (from zero)."""
    for layer in _layers(model).values():
        layer.start_usage()


def stop_usage(model: nn.Module) -> None:
    """Stop counting; the counters are dropped."""
    for layer in _layers(model).values():
        layer.stop_usage()


def _padded(layer) -> Tensor:
    c = layer.usage_counts
    if c is None:
        raise ValueError("usage counting is off; start_usage(model) or record_usage(model) first")
    c = c.detach().cpu()
    n = layer.num_atoms
    return torch.cat([c, c.new_zeros(n - c.shape[0])]) if c.shape[0] < n else c.clone()


def usage_counts(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: [N] int64}``: how often each atom was in a token's top-K so far."""
    return {n: _padded(l) for n, l in _layers(model).items()}


def _by_task(counts: Tensor, tasks: Tensor) -> Tensor:
    n_tasks = int(tasks.max()) + 1 if tasks.numel() else 0
    return torch.zeros(n_tasks, dtype=torch.long).index_add_(0, tasks, counts[:tasks.shape[0]])


def usage_by_task(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: [tasks] int64}``: selections summed over the atoms of each task."""
    return {n: _by_task(_padded(l), atom_tasks(l)) for n, l in _layers(model).items()}


@dataclass
class UsageRecord:
    """Counts gathered by :func:`record_usage`, with the task that created each atom."""

    counts: dict[str, Tensor]         # layer -> [N] int64
    atom_tasks: dict[str, Tensor]     # layer -> [N] int64, creating task of each atom

    @property
    def by_task(self) -> dict[str, Tensor]:
        """layer -> ``[tasks]`` selections summed per creating task."""
        return {n: _by_task(c, self.atom_tasks[n]) for n, c in self.counts.items()}

    def task_fractions(self) -> Tensor:
        """``[tasks]`` fraction of all selections (every layer) that went to each task's atoms."""
        per = list(self.by_task.values())
        t = max((p.shape[0] for p in per), default=0)
        tot = sum((torch.cat([p, p.new_zeros(t - p.shape[0])]) for p in per), torch.zeros(t, dtype=torch.long))
        return tot.double() / max(int(tot.sum()), 1)


@contextlib.contextmanager
def record_usage(model: nn.Module):
    """Count atom selections inside the ``with`` block; yields a :class:`UsageRecord` that is
    filled in when the block ends. Counters already running go on (they include the block)."""
    layers = _layers(model)
    before = {n: l.usage_counts for n, l in layers.items()}
    rec = UsageRecord({}, {})
    for layer in layers.values():
        layer.start_usage()
    try:
        yield rec
    finally:
        for n, layer in layers.items():
            got = _padded(layer)
            rec.counts[n] = got
            rec.atom_tasks[n] = atom_tasks(layer)
            prev = before[n]
            if prev is None:
                layer.stop_usage()
            else:
                prev = torch.cat([prev, prev.new_zeros(max(0, got.shape[0] - prev.shape[0]))])
                prev[:got.shape[0]] += got.to(prev.device)
                layer.usage_counts = prev


def plot_usage(record: UsageRecord | nn.Module, path, *, title: str | None = None,
               max_layers: int = 24) -> None:
    """Write a PNG: one panel per layer, a bar per atom (its share of that layer's
    selections), coloured by the task that created the atom. ``record`` is a
    :class:`UsageRecord` or a model whose counters are running. Needs matplotlib
    (``pip install moram_kernels[plot]``)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("plot_usage needs matplotlib: pip install 'moram_kernels[plot]'") from e
    if isinstance(record, nn.Module):
        model = record
        record = UsageRecord(usage_counts(model),
                             {n: atom_tasks(l) for n, l in _layers(model).items()})
    names = list(record.counts)[:max_layers]
    if not names:
        raise ValueError("the record holds no layers")
    n_tasks = max((int(t.max()) + 1 for t in record.atom_tasks.values() if t.numel()), default=1)
    fig = Figure(figsize=(10, 1.4 * len(names) + 1.0))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(n_tasks)]
    for ax, name in zip(axes, names):
        c = record.counts[name].double()
        share = c / max(float(c.sum()), 1.0)
        tasks = record.atom_tasks[name]
        ax.bar(range(c.shape[0]), share.tolist(), width=1.0,
               color=[colours[int(t)] for t in tasks.tolist()] or None)
        ax.set_ylabel(name if len(name) <= 28 else "…" + name[-27:], rotation=0, ha="right",
                      va="center", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlim(-0.5, max(c.shape[0], 1) - 0.5)
    axes[-1].set_xlabel("atom (in creation order)")
    fig.suptitle(title or "MoRAM atom usage (share of top-K selections per layer)", fontsize=9)
    axes[0].legend(handles=[Patch(color=colours[i], label=f"task {i}") for i in range(n_tasks)],
                   loc="lower left", bbox_to_anchor=(0.0, 1.02), fontsize=7, ncol=min(n_tasks, 10),
                   frameon=False, borderaxespad=0.0)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    if not isinstance(path, (str, os.PathLike)):     # a file object: matplotlib writes to it
        fig.savefig(path, dpi=110, format="png")
        return
    with atomic_path(path) as tmp:      # a killed job leaves the previous plot whole
        fig.savefig(tmp, dpi=110)
