"""Memory per rank of a MoRAM model sharded with FSDP2 (``fully_shard``), task after task.

The frozen bank is a pair of buffers, which FSDP2 does not shard: every rank holds it in
full (replicated on purpose: each token scores every atom). The trainable atoms are
parameters, sharded like the base weights. This script measures, on each of ``--world``
gloo processes on CPU, the bytes each rank holds of: the base weights, the trainable atoms
(local shards), the frozen bank; after each of ``--tasks`` tasks.

    python -m benchmarks --preset fsdp-bank-memory             # LLaMA-7B-like q/v shapes, 2 ranks
    python -m benchmarks --preset fsdp-bank-memory --layers 2 --tasks 3 --dim 256 --r 4
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
from torch import nn


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _worker(rank, args, port, outdir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import moram_kernels as mk

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world)
    try:
        dtype = getattr(torch, args.dtype)
        model = nn.Sequential(*[nn.ModuleDict({"q_proj": nn.Linear(args.dim, args.dim, bias=False),
                                               "v_proj": nn.Linear(args.dim, args.dim, bias=False)})
                                for _ in range(args.layers)]).to(dtype)
        mk.inject(model, mk.MoRAMConfig(target_modules=["q_proj", "v_proj"], r=args.r))
        mk.add_task(model)
        mesh = init_device_mesh("cpu", (args.world,))
        layers = mk.integrations.moram_layers(model)
        for layer in layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rows = []
        for task in range(1, args.tasks + 1):
            if task > 1:
                mk.add_task(model)
            base = _bytes(_local(m.base_layer.weight) for m in layers.values())
            trainable = _bytes(_local(p) for m in layers.values() for p in (m.keys, m.values))
            frozen = _bytes(t for m in layers.values() for t in (m.frozen_keys, m.frozen_values))
            rows.append((task, base, trainable, frozen))
        torch.save(rows, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=32, help="blocks, each with q_proj and v_proj")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--tasks", type=int, default=15)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args, port, tmp), nprocs=args.world, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.world)]
    mib = 2 ** 20
    print(f"FSDP2, {args.world} ranks, {args.layers} x (q_proj, v_proj) {args.dim}x{args.dim} "
          f"{args.dtype}, r={args.r}: MiB held by each rank")
    print(f"{'task':>4} {'rank':>4} {'base (shard)':>13} {'trainable (shard)':>18} "
          f"{'frozen bank (full)':>19}")
    for i in range(args.tasks):
        for r, rows in enumerate(ranks):
            task, base, trainable, frozen = rows[i]
            if i in (0, 1, args.tasks - 1):
                print(f"{task:>4} {r:>4} {base / mib:>13.2f} {trainable / mib:>18.3f} "
                      f"{frozen / mib:>19.2f}")
    return 0
