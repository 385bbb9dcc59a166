"""``python -m benchmarks --preset sharded-checkpoint``: ``load_moram`` and ``save_moram``
of a model whose frozen banks are sharded over P gloo processes on CPU, with each rank's
peak memory growth (``VmHWM``) against its share of the file.

The parent writes one file of ``--layers`` layers of ``--atoms`` frozen atoms
(``d_in = d_out = --dim``, fp32) the one-process way, then starts P ranks. Each builds the
injected model with an empty bank, shards it, and measures: ``load_moram`` (each rank reads
its rows) and ``save_moram`` to a second file (rank 0 writes; the others send their rows in
pieces of ``--chunk-mb``). The parent then checks that the second file holds the same
tensors as the first, one tensor at a time. A rank's growth near its share, far under the
file, shows that no rank ever held the whole bank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

WRITE_FIELDS = ("frozen_keys", "frozen_values", "keys", "values", "task_sizes")


def _model(layers: int, dim: int):
    import torch
    from torch import nn

    import moram_kernels as mk

    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)])
    return mk.inject(m, mk.MoRAMConfig(target_modules=[str(i) for i in range(layers)], r=16, k=16))


def _write_file(path: str, layers: int, atoms: int, dim: int) -> int:
    """The file a one-process save_moram writes for the bank (built a layer at a time)."""
    import torch
    from safetensors.torch import save_file

    import moram_kernels as mk

    model = _model(layers, dim)
    g = torch.Generator().manual_seed(1)
    for layer in mk.integrations.moram_layers(model).values():
        layer._set_bank(frozen_keys=torch.randn(atoms, dim, generator=g),
                        frozen_values=torch.randn(atoms, dim, generator=g) * 0.01,
                        task_sizes=torch.tensor([atoms]))
    mk.save_moram(model, path)
    del model, save_file
    return os.path.getsize(path)


def _rank(rank: int, world: int, store: str, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    import moram_kernels as mk
    from benchmarks.timing import PeakMemory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    model = mk.distributed.shard_bank(_model(args["layers"], args["dim"]))
    mk.distributed.SAVE_CHUNK_BYTES = int(args["chunk_mb"] * (1 << 20))
    meter = PeakMemory(torch.device("cpu"))
    meter.prepare_cpu()
    io = mk.distributed.checkpoint_io
    dist.barrier()
    load = meter.measure(lambda: mk.load_moram(model, args["path"]))
    read = io["read"]
    share = sum(l.frozen_keys.numel() * 4 + l.frozen_values.numel() * 4
                for l in mk.integrations.moram_layers(model).values())
    dist.barrier()
    save = meter.measure(lambda: mk.save_moram(model, args["path2"]))
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"rank": rank, "share": share, "read": read, "load_peak": load,
                   "save_peak": save, "buffer": io["buffer"], "why_not": meter.why_not}, f)
    dist.destroy_process_group()


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=8)
    p.add_argument("--atoms", type=int, default=32768, help="frozen atoms per layer")
    p.add_argument("--dim", type=int, default=256, help="d_in = d_out")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--chunk-mb", type=float, default=4.0, help="largest piece sent to the writer")
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    args = p.parse_args(argv)

    import torch.multiprocessing as mp
    from safetensors import safe_open
    import torch

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, path2 = os.path.join(tmp, "bank.safetensors"), os.path.join(tmp, "saved.safetensors")
        size = _write_file(path, args.layers, args.atoms, args.dim)
        conf = dict(vars(args), path=path, path2=path2)
        mp.spawn(_rank, args=(args.procs, os.path.join(tmp, "store"), conf, tmp), nprocs=args.procs)
        rows = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(args.procs)]
        with safe_open(path, "pt") as a, safe_open(path2, "pt") as b:
            same = set(a.keys()) == set(b.keys()) and all(
                torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    mb = 1 / (1 << 20)
    print(f"file: {size * mb:.1f} MiB ({args.layers} layers x {args.atoms} atoms x d={args.dim}, fp32), "
          f"{args.procs} gloo ranks, pieces of {args.chunk_mb} MiB; saved file identical: {same}")
    print("| rank | share MiB | read MiB | load peak MiB | save peak MiB | save buffer MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rank']} | {r['share'] * mb:.1f} | {r['read'] * mb:.1f} | {r['load_peak'] * mb:.1f} "
              f"| {r['save_peak'] * mb:.1f} | {r['buffer'] * mb:.1f} |")
    if rows[0]["why_not"]:
        print(f"(peak RSS not measured: {rows[0]['why_not']})")
    return 0 if same else 1
