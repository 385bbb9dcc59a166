"""MoRAM under DistributedDataParallel and FSDP2 across tasks: 2 gloo processes on CPU.

Each run trains a tiny injected model for two steps on task 1, calls ``mk.add_task(model,
optimizer=opt)`` with the SAME wrapper and optimiser (each rank seeded differently just
before), and trains two more steps. Every rank saves its gradients and atoms; the parent
replays the same sequence in one process on the concatenated batch (mean loss) and
compares.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from torch import nn

import moram_kernels as mk

WORLD = 2
B, D_IN, D_HID, D_OUT = 6, 8, 12, 5       # B rows per rank
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    # r = 3 does not divide over 2 ranks: FSDP2 pads the shard of one rank
    return mk.inject(m, mk.MoRAMConfig(target_modules=["0", "2"], r=3, k=2, tau=0.5, alpha=6.0))


def _data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(4, WORLD * B, D_IN, generator=g)        # one global batch per step
    y = torch.randn(4, WORLD * B, D_OUT, generator=g)
    return x, y


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model):
    return {f"{n}.{a}": _full(getattr(layer, a)).detach().clone()
            for n, layer in mk.integrations.moram_layers(model).items()
            for a in ("frozen_keys", "frozen_values", "keys", "values")}


def _grads(model):
    return {f"{n}.{a}": _full(getattr(layer, a).grad).detach().clone()
            for n, layer in mk.integrations.moram_layers(model).items() for a in ("keys", "values")}


def _train(model, wrapped, opt, x, y, steps, rows, out):
    for s in steps:
        opt.zero_grad()
        loss = nn.functional.mse_loss(wrapped(x[s, rows]), y[s, rows])
        loss.backward()
        out.append(_grads(model))
        opt.step()


def _sequence(model, wrap, rows, seed_before_task2, barrier=None):
    """The shared script: task 1 (2 steps), in-place add_task, task 2 (2 steps)."""
    x, y = _data()
    mk.add_task(model)                  # first task: creates the parameters; wrap after it
    wrapped = wrap(model)
    opt = torch.optim.AdamW(mk.trainable_parameters(model), lr=0.05)
    grads: list = []
    _train(model, wrapped, opt, x, y, (0, 1), rows, grads)
    params_before = [id(p) for p in mk.trainable_parameters(model)]
    torch.manual_seed(seed_before_task2)
    mk.add_task(model, optimizer=opt)
    atoms = _snapshot(model)
    same = params_before == [id(p) for p in mk.trainable_parameters(model)]
    state_cleared = all(p not in opt.state for p in mk.trainable_parameters(model))
    _train(model, wrapped, opt, x, y, (2, 3), rows, grads)
    return {"grads": grads, "atoms": atoms, "same_params": same, "state_cleared": state_cleared,
            "final": _snapshot(model)}


def _worker(rank, port, mode, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            def wrap(m):
                return nn.parallel.DistributedDataParallel(m)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))

            def wrap(m):
                for layer in mk.integrations.moram_layers(m).values():
                    fully_shard(layer, mesh=mesh)
                fully_shard(m, mesh=mesh)
                return m
        torch.manual_seed(7 + rank)      # ranks disagree on RNG before the first add_task too
        rows = slice(rank * B, (rank + 1) * B)
        # DDP broadcasts buffers with _broadcast_coalesced: count the frozen banks' bytes in it
        real, sent = dist._broadcast_coalesced, []

        def counting(group, tensors, *args, **kwargs):
            bank = {getattr(layer, f).data_ptr() for layer in mk.integrations.moram_layers(model).values()
                    for f in ("frozen_keys", "frozen_values") if getattr(layer, f).numel()}
            sent.append(sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() in bank))
            return real(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting
        try:
            res = _sequence(model, wrap, rows, seed_before_task2=100 + rank)
        finally:
            dist._broadcast_coalesced = real
        res["bank_bytes_broadcast"] = sum(sent)
        res["broadcasts"] = len(sent)
        if mode == "fsdp2":
            res["sharded"] = all(hasattr(p, "device_mesh") for p in mk.trainable_parameters(model))
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(mode, tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode}: the {WORLD} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _reference():
    model = _model()
    torch.manual_seed(7)                  # rank 0's RNG: the one every rank receives
    return _sequence(model, lambda m: m, slice(None), seed_before_task2=100)


def _assert_close_dicts(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_wrapped_training_across_tasks_matches_one_process(mode, tmp_path):
    ranks = _spawn(mode, tmp_path)
    ref = _reference()
    if mode == "fsdp2":
        assert all(r["sharded"] for r in ranks), "fully_shard did not shard the atoms"
    for r, res in enumerate(ranks):
        # the frozen bank is the same on every rank: DDP must never broadcast it
        assert res["bank_bytes_broadcast"] == 0, f"rank {r}: {res['bank_bytes_broadcast']} bank bytes"
        if mode == "ddp":
            assert res["broadcasts"] >= 4, "the count saw no DDP broadcast: the check is hollow"
        assert res["same_params"], f"rank {r}: add_task replaced the trainable parameters"
        assert res["state_cleared"], f"rank {r}: the optimiser kept state for the new atoms"
        # identical atoms on every rank after add_task, although each rank was seeded apart
        _assert_close_dicts(res["atoms"], ranks[0]["atoms"], f"rank {r} vs rank 0 atoms")
        _assert_close_dicts(res["atoms"], ref["atoms"], f"rank {r} atoms after add_task")
        assert len(res["grads"]) == len(ref["grads"]) == 4
        for step, (g, gr) in enumerate(zip(res["grads"], ref["grads"])):
            _assert_close_dicts(g, gr, f"rank {r} step {step} grad")
        _assert_close_dicts(res["final"], ref["final"], f"rank {r} final atoms")
    # the test is not vacuous: task 2's key gradients are non-zero
    assert any(g.abs().max() > 0 for n, g in ref["grads"][3].items() if n.endswith("keys"))


def test_add_task_in_place_single_process_clears_optimizer_state():
    model = _model()
    mk.add_task(model)
    opt = torch.optim.AdamW(mk.trainable_parameters(model), lr=0.05)
    x, y = _data()
    _train(model, model, opt, x, y, (0,), slice(None), [])
    params = mk.trainable_parameters(model)
    assert all(p in opt.state for p in params)
    old = {n: (l.keys.detach().clone(), l.values.detach() * l.scaling)
           for n, l in mk.integrations.moram_layers(model).items()}
    mk.add_task(model, optimizer=opt)
    assert [id(p) for p in mk.trainable_parameters(model)] == [id(p) for p in params]
    assert not any(p in opt.state for p in params)
    for n, layer in mk.integrations.moram_layers(model).items():
        torch.testing.assert_close(layer.frozen_keys, old[n][0])      # scale baked in
        torch.testing.assert_close(layer.frozen_values, old[n][1])
        assert layer.num_atoms == 6 and layer.num_trainable_atoms == 3
        assert layer.task_sizes.tolist() == [3, 3]
        assert layer.values.abs().max() == 0 and layer.keys.abs().max() > 0
    with pytest.raises(TypeError, match="optimizer"):
        mk.add_task(model, optimizer=params)
