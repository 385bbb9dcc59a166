"""A frozen bank sharded across processes (``mk.distributed``), gloo on CPU, against the same
layer in one process.

Every scenario runs inside each rank of a process group of 2 and of 3 ranks (uneven
slices); each rank builds the same layer from the same seed, shards one copy and keeps the
other whole, and compares. One group per size runs all scenarios, so the suite pays the
process start-up once per size. Every wait is bounded: the process group's timeout inside,
a join deadline outside, after which the processes are killed and the test fails.
"""

from __future__ import annotations

import copy
import datetime
import json
import multiprocessing as mp
import os
import pickle
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moram_kernels as mk
from moram_kernels.backends.reference import _gate

from helpers import REL_ATOL, make_inputs

PG_TIMEOUT_S = 60          # a collective waits at most this long
GROUP_DEADLINE_S = 420     # a whole group (start-up included, on a loaded 2-core machine)
HANG_PG_TIMEOUT_S = 4


# ---- building blocks, run inside a rank -----------------------------------------------------

def _layer(d_in, d_out, n_frozen, r, *, k, tau=0.5, delta=0.2, alpha=None, seed=0,
           t=7, dtype=torch.float32):
    """A MoRAMLinear with ``n_frozen`` frozen atoms and ``r`` trainable ones (nonzero values),
    and an input ``x [t, d_in]`` whose tokens have a clear top-K gap. Same on every rank."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    layer = mk.MoRAMLinear(base, r=r, k=k, tau=tau, delta=delta, alpha=alpha)
    x, keys, values = make_inputs(t, d_in, d_out, n_frozen + r, k=k, seed=seed)
    layer._set_bank(frozen_keys=keys[:n_frozen].clone(), frozen_values=values[:n_frozen].clone(),
                    keys=keys[n_frozen:].clone(), values=values[n_frozen:].clone(),
                    task_sizes=torch.tensor([n for n in (n_frozen, r) if n]))
    return layer.to(dtype), x.to(dtype)


def _run(model, x, g):
    """Output, and gradients of ``(y * g).sum()`` for x, keys and values."""
    layer = getattr(model, "module", model)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad, layer.keys.grad, layer.values.grad


def _close(out, ref, what, dtype=torch.float32, factor=1.0):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = ref.double().abs().max().clamp_min(1e-12)
    err = ((out.double() - ref.double()).abs().max() / scale).item()
    bound = factor * REL_ATOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def _split(t, world):
    """Uneven token counts per rank adding up to ``t``; at 3 ranks the middle one has none."""
    return [3, t - 3] if world == 2 else [t - 3, 0, 3]


def _compare(layer, x, dtype=torch.float32, factor=1.0, train=True):
    """Shard copies of ``layer`` in both modes and check forward and gradients against the
    original: every rank passing ``x`` (``same_input=True``; returned), and each rank
    passing its own uneven share of ``x``'s rows (data parallelism, :func:`_compare_dp`)."""
    _compare_dp(layer, x, _split(x.shape[0], dist.get_world_size()), dtype, factor, train)
    ref = copy.deepcopy(layer)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer), same_input=True)
    ref.train(train)
    sharded.train(train)
    world, rank = dist.get_world_size(), dist.get_rank()
    n_f = layer.frozen_keys.shape[0]
    assert sharded.num_atoms == layer.num_atoms, (sharded.num_atoms, layer.num_atoms)
    mine = sharded.frozen_keys.shape[0]
    c = -(-n_f // world)                        # torch.chunk's cut
    assert mine == max(0, min(c, n_f - rank * c)), f"rank {rank} holds {mine} of {n_f}"
    g = torch.randn(x.shape[0], layer.out_features, generator=torch.Generator().manual_seed(1))
    if not train:
        with torch.no_grad():
            return ref(x), sharded(x)
    want, got = _run(ref, x, g), _run(sharded, x, g)
    for name, a, b in zip(("y", "grad x", "grad keys", "grad values"), got, want):
        _close(a, b, name, dtype, factor)
    return want, got


def _compare_dp(layer, x, sizes, dtype=torch.float32, factor=1.0, train=True, autocast=False):
    """Data parallelism: rank r passes rows ``[sum(sizes[:r]), +sizes[r])`` of ``x``. Its
    output and x gradient must be those rows of one process on all of ``x``, and the sum
    over ranks of the trainable atoms' gradients (each of its own loss) the gradient of the
    summed loss."""
    rank = dist.get_rank()
    lo = sum(sizes[:rank])
    own = slice(lo, lo + sizes[rank])
    ref = copy.deepcopy(layer).train(train)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer)).train(train)
    g = torch.randn(x.shape[0], layer.out_features, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if not train:
            with torch.no_grad():
                _close(sharded(x[own]), ref(x)[own], "data-parallel eval output", dtype, factor)
            return
        want, got = _run(ref, x, g), _run(sharded, x[own], g[own])
    _close(got[0], want[0][own], "data-parallel y", dtype, factor)
    _close(got[1], want[1][own], "data-parallel grad x", dtype, factor)
    for name, a, b in zip(("grad keys", "grad values"), got[2:], want[2:]):
        a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)   # gloo: no bf16 sum
        dist.all_reduce(a)
        _close(a, b, f"data-parallel {name}, summed over ranks", dtype, factor)


# ---- the scenarios --------------------------------------------------------------------------

def sc_forward_backward(rank, world):
    layer, x = _layer(13, 11, 23, 4, k=4, alpha=8.0)     # alpha / r = 2 scales the trainable
    _compare(layer, x)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
    x3 = x.reshape(7, 1, 13).transpose(0, 1)               # leading dims, not contiguous
    with torch.no_grad():
        _close(sharded(x3), layer(x3), "output for [1, 7, d_in] x")
        assert sharded(x3[:, :0]).shape == (1, 0, 11)      # T = 0
    # a named class: repr, deepcopy and pickle work, and a copy computes the same
    assert type(sharded).__name__ == "ShardedMoRAMLinear", type(sharded)
    assert "sharded: rank" in repr(sharded)
    for how, twin in (("deepcopy", copy.deepcopy(sharded)),
                      ("pickle", pickle.loads(pickle.dumps(sharded)))):
        assert mk.distributed.is_sharded(twin) and twin.num_atoms == layer.num_atoms, how
        with torch.no_grad():
            _close(twin(x), layer(x), f"output of a {how} copy")
    # sharding and unsharding replace the bank: the values derived from it are dropped
    layer._frozen_bank(torch.bfloat16)
    assert layer._caches.bank.value is not None
    mk.distributed.shard_bank(layer)
    assert layer._caches.bank.value is None, "shard_bank kept a cast of the whole bank"
    layer._frozen_bank(torch.bfloat16)
    mk.distributed.unshard_bank(layer)
    assert type(layer) is mk.MoRAMLinear
    assert layer._caches.bank.value is None, "unshard_bank kept a cast of the slice"


def sc_dropout_same_seed(rank, world):
    """Dropout on the adapter path: equal to one process when every rank seeds alike, and
    refused (not silently wrong) when the ranks' masks differ."""
    layer, x = _layer(12, 6, 15, 3, k=3)
    layer.adapter_dropout = nn.Dropout(0.3)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer), same_input=True)
    torch.manual_seed(11)
    want = layer(x)
    torch.manual_seed(11)
    _close(sharded(x).detach(), want.detach(), "output with dropout")
    torch.manual_seed(100 + rank)
    with pytest.raises(RuntimeError, match="x differs across ranks"):
        sharded(x)


def sc_fewer_atoms_than_candidates(rank, world):
    layer, x = _layer(9, 5, 3, 2, k=4)                   # N = 5 < P K
    _compare(layer, x)


def sc_empty_slice(rank, world):
    layer, x = _layer(9, 5, 1, 3, k=2)                   # frozen: 1 atom, ranks >= 1 hold none
    _compare(layer, x)
    layer, x = _layer(9, 5, 0, 3, k=2)                   # no frozen atoms at all
    _compare(layer, x)
    # and back: unsharding an empty frozen bank gives the layer it was
    back = mk.distributed.unshard_bank(mk.distributed.shard_bank(copy.deepcopy(layer)))
    assert type(back) is mk.MoRAMLinear and tuple(back.frozen_keys.shape) == (0, 9)
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)


def sc_eval_threshold(rank, world):
    layer, x = _layer(12, 6, 20, 4, k=5, delta=0.3)
    ref, got = _compare(layer, x, train=False)
    _close(got, ref, "eval output")
    layer.delta = 0.0
    ref_no_threshold, _ = _compare(layer, x, train=False)
    assert not torch.allclose(ref, ref_no_threshold), "delta masked nothing: the case is hollow"


def sc_rules_the_audit_found_unpinned(rank, world):
    """Four rules of the op that a planted bug in the sharded path once slipped past: the
    eval-time threshold in the backward, the eps clamp of the global norm (an all-zero
    token), the K rule max(k, 2) at k = 1, and global atom ids (trainable atoms included)
    in usage counts."""
    g = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    # eval mode with grad: the threshold also masks the backward
    layer, x = _layer(12, 6, 20, 4, k=5, delta=0.3)
    ref, sharded = copy.deepcopy(layer).eval(), mk.distributed.shard_bank(copy.deepcopy(layer)).eval()
    for name, a, b in zip(("y", "grad x", "grad keys", "grad values"), _run(sharded, x, g), _run(ref, x, g)):
        _close(a, b, f"eval-mode {name}")
    ref.delta = 0.0
    assert not torch.allclose(_run(ref, x, g)[1], _run(sharded, x, g)[1]), "delta masked no gradient"
    # an all-zero token: the clamped norm gives it a finite zero delta, and its row gradient
    x0 = x.clone()
    x0[3] = 0
    _compare(layer, x0)
    with torch.no_grad():
        y0 = mk.distributed.shard_bank(copy.deepcopy(layer))(x0)
    assert torch.isfinite(y0).all()
    # k = 1 keeps two atoms (K = min(max(k, 2), N))
    layer1, x1 = _layer(12, 6, 20, 4, k=1)
    _compare(layer1, x1)
    # usage counts by global id, the trainable atoms numbered after every frozen one
    ref, sharded = copy.deepcopy(layer), mk.distributed.shard_bank(copy.deepcopy(layer))
    for m in (ref, sharded):
        m.start_usage()
        with torch.no_grad():
            m(x)
    assert torch.equal(sharded.usage_counts, ref.usage_counts), (sharded.usage_counts, ref.usage_counts)
    assert ref.usage_counts[20:].sum() > 0, "no trainable atom selected: the id check is hollow"


def sc_bf16(rank, world):
    layer, x = _layer(16, 8, 21, 4, k=4, dtype=torch.bfloat16)
    # bf16 scores: the sharded norm sums rounded per-rank squares; allow 2x the table
    _compare(layer, x, torch.bfloat16, factor=2.0)


def _stable_oracle(x, keys, values, scale, k, tau):
    """MoRAM delta in float64 with ties at the K-th place broken to the lower atom id."""
    p = x.double() @ keys.double().t()
    norm = p.norm(dim=-1).clamp_min(1e-12)
    idx = p.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    p_sel = p.gather(1, idx)
    w, _ = _gate(p_sel, norm, tau, 0.0)
    return torch.einsum("tk,tkd->td", w * p_sel * scale[idx], values.double()[idx]), idx


def sc_ties_across_ranks(rank, world):
    """Exact ties (integer scores) at the K-th place between atoms on different ranks, after
    a task appended while sharded moved rows between ranks (4P atoms cut 4 a rank, then 6P
    cut 6 a rank: rank r holds [6r, 6r + 6)). Token 0: atom 1 (rank 0) ties with the last,
    appended atom (last rank). Token 1: atom 5, which moved from rank 1 to rank 0, ties
    with atom 6 (rank 1). Both go to the lower global id."""
    d_in, d_out, n_f, m = 6, 5, 4 * world, 2 * world
    v0 = torch.tensor([1.0, 1, 1, 0, 0, 0])
    v1 = torch.tensor([0.0, 0, 0, 1, 1, 1])
    gen = torch.Generator().manual_seed(3)
    keys = torch.randint(-1, 2, (n_f + m, d_in), generator=gen).float() * 0.5
    values = torch.randn(n_f + m, d_out, generator=gen)
    keys[0], keys[1], keys[n_f + m - 1] = 3 * v0, 2 * v0, 2 * v0   # token 0: {0, 1}
    keys[2], keys[5], keys[6] = 3 * v1, 2 * v1, 2 * v1             # token 1: {2, 5}
    x = torch.stack([v0, v1, v0])
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(d_in, d_out), r=2, k=2, tau=1.0)
    layer._set_bank(frozen_keys=keys[:n_f].clone(), frozen_values=values[:n_f].clone(),
                    task_sizes=torch.tensor([n_f]))
    mk.distributed.shard_bank(layer)
    assert layer._bank_shard.gids.tolist() == list(range(4 * rank, 4 * rank + 4))
    # the hook add_task uses: the slices move to the new cut
    layer._append_frozen(keys[n_f:], values[n_f:], task_sizes=torch.tensor([n_f, m]))
    assert layer.num_atoms == n_f + m
    mine = list(range(6 * rank, 6 * rank + 6))
    assert layer._bank_shard.gids.tolist() == mine, layer._bank_shard.gids
    assert torch.equal(layer.frozen_keys, keys[mine]) and torch.equal(layer.frozen_values, values[mine])
    want, want_idx = _stable_oracle(x, keys, values, torch.ones(n_f + m), 2, 1.0)
    assert [sorted(r) for r in want_idx.tolist()] == [[0, 1], [2, 5], [0, 1]]
    layer.start_usage()
    got = layer(x) - layer.base_layer(x)
    _close(got.detach(), want, "tied output")
    picked = sorted(torch.nonzero(layer.usage_counts).flatten().tolist())
    assert picked == [0, 1, 2, 5], f"selected {picked}"
    mk.distributed.unshard_bank(layer)
    assert torch.equal(layer.frozen_keys, keys) and torch.equal(layer.frozen_values, values)


def sc_add_task_while_sharded(rank, world):
    """Tasks added while sharded, then unshard: the same layer as one that never sharded."""
    torch.manual_seed(5)
    base = nn.Linear(10, 7)
    plain = mk.MoRAMLinear(base, r=3, k=3, tau=0.5, alpha=6.0)
    plain.add_task()
    with torch.no_grad():
        plain.values.normal_(generator=torch.Generator().manual_seed(6))
    sharded = copy.deepcopy(plain)
    mk.distributed.shard_bank(sharded)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(7))
    for task in range(4):
        state = torch.get_rng_state()
        plain.add_task()
        torch.set_rng_state(state)               # the same fresh atoms for both
        mk.add_task(sharded)
        with torch.no_grad():
            for m in (plain, sharded):
                m.values.normal_(generator=torch.Generator().manual_seed(10 + task))
        n = sharded.num_atoms
        assert n == plain.num_atoms == 3 * (task + 2), (n, plain.num_atoms)
        held = sharded.frozen_keys.shape[0]
        n_f, c = n - 3, -(-(n - 3) // world)
        assert held == max(0, min(c, n_f - rank * c)), f"rank {rank} holds {held} of {n_f}"
        _close(sharded(x).detach(), plain(x).detach(), f"output after task {task}")
    mk.distributed.unshard_bank(sharded)
    assert type(sharded) is mk.MoRAMLinear
    for name in ("frozen_keys", "frozen_values", "keys", "values", "task_sizes"):
        a, b = getattr(sharded, name), getattr(plain, name)
        assert torch.equal(a, b), f"{name} differs after unshard_bank"


def sc_bad_input_on_one_rank(rank, world):
    """A rank that raises inside the forward makes every rank raise, at once, clearly; the
    group stays usable."""
    layer, x = _layer(8, 4, 9, 2, k=2)
    mk.distributed.shard_bank(layer, same_input=True)
    bad = world - 1
    xin = torch.randn(3, 5) if rank == bad else x
    with pytest.raises((ValueError, RuntimeError)) as info:
        layer(xin)
    if rank == bad:
        assert info.type is ValueError and "d_in" in str(info.value), info.value
    else:
        assert f"rank(s) [{bad}]" in str(info.value), info.value
    xin = x + 1 if rank == 0 else x
    with pytest.raises(RuntimeError, match="x differs across ranks"):
        layer(xin)
    layer(x)                                     # the group still works


def sc_ddp_wrapped(rank, world):
    """Under DistributedDataParallel (which broadcasts buffers from rank 0 unless told not
    to): the per-rank slices survive, and the gradients equal one process's."""
    layer, x = _layer(10, 6, 17, 3, k=3)
    ref = copy.deepcopy(layer)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer), same_input=True)
    slice_before = sharded.frozen_keys.clone()
    ddp = nn.parallel.DistributedDataParallel(sharded)
    g = torch.randn(x.shape[0], 6, generator=torch.Generator().manual_seed(2))
    want = _run(ref, x, g)
    got = _run(ddp, x, g)
    assert torch.equal(sharded.frozen_keys, slice_before), "DDP overwrote this rank's slice"
    for name, a, b in zip(("y", "grad x"), got[:2], want[:2]):
        _close(a, b, name)
    _close(sharded.keys.grad, ref.keys.grad, "grad keys")
    _close(sharded.values.grad, ref.values.grad, "grad values")


# ---- data parallelism (the default mode): each rank its own batch -----------------------------

def sc_dp_uneven_batches(rank, world):
    """Token counts that differ by rank: all on one rank (the others pass none), nearly all
    on the last (at 3 ranks y is then all-reduced, not reduce-scattered), none anywhere;
    leading dims that differ by rank. The mode is on the layer: its repr says it, and
    deepcopy and pickle keep it."""
    layer, x = _layer(13, 11, 23, 4, k=4, alpha=8.0)
    for sizes in ([7] + [0] * (world - 1), [1] + [0] * (world - 2) + [6]):
        _compare_dp(layer, x, sizes)
    _compare_dp(layer, x, _split(7, world), train=False)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
    g = torch.randn(7, 11, generator=torch.Generator().manual_seed(1))
    y, gx, gk, gv = _run(sharded, x[:0], g[:0])                  # no tokens on any rank
    assert y.shape == (0, 11) and gx.shape == (0, 13) and gk.abs().sum() == 0 == gv.abs().sum()
    # rank r passes [r + 1, 2, d_in] rows (non-contiguous): its rows of one process on all
    sizes = [2 * (r + 1) for r in range(world)]
    lo = sum(sizes[:rank])
    xs = torch.randn(sum(sizes), 13, generator=torch.Generator().manual_seed(5))
    mine = xs[lo:lo + sizes[rank]].reshape(2, rank + 1, 13).transpose(0, 1)
    with torch.no_grad():
        want = layer(xs)[lo:lo + sizes[rank]].reshape(2, rank + 1, 11).transpose(0, 1)
        _close(sharded(mine), want, "output for [r + 1, 2, d_in] x")
    assert "data-parallel" in repr(sharded), repr(sharded)
    assert "same x on every rank" in repr(mk.distributed.shard_bank(copy.deepcopy(layer), same_input=True))
    for how, twin in (("deepcopy", copy.deepcopy(sharded)),
                      ("pickle", pickle.loads(pickle.dumps(sharded)))):
        assert twin._bank_shard.same_input is False, how
        with torch.no_grad():
            _close(twin(mine), want, f"output of a {how} copy")
    same = mk.distributed.shard_bank(copy.deepcopy(layer), same_input=True)
    assert pickle.loads(pickle.dumps(same))._bank_shard.same_input is True
    assert copy.deepcopy(same)._bank_shard.same_input is True


def sc_dp_dropout_and_autocast(rank, world):
    """bf16 autocast with uneven batches (one rank empty at 3 ranks); dropout on the
    adapter path draws each rank's own mask, so ranks seeded apart are not refused, and
    ranks seeded alike with the same x equal one process."""
    layer, x = _layer(16, 8, 21, 4, k=4)
    _compare_dp(layer, x, _split(7, world), torch.bfloat16, factor=2.0, autocast=True)
    _compare_dp(layer, x, _split(7, world), torch.bfloat16, factor=2.0, autocast=True, train=False)
    layer.adapter_dropout = nn.Dropout(0.3)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
    torch.manual_seed(100 + rank)
    sharded(x)
    torch.manual_seed(11)
    want = layer(x)
    torch.manual_seed(11)
    _close(sharded(x).detach(), want.detach(), "output with dropout")


def sc_dp_ranks_must_agree(rank, world):
    """The mode, and the dtype of x (rows travel as raw bytes), must agree across ranks."""
    layer, x = _layer(8, 4, 9, 2, k=2)
    with pytest.raises(ValueError, match="same mode"):
        mk.distributed.shard_bank(copy.deepcopy(layer), same_input=rank == 0)
    with pytest.raises(TypeError, match="same_input must be a bool"):
        mk.distributed.shard_bank(copy.deepcopy(layer), same_input=1)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
    with pytest.raises(RuntimeError, match="dtype"):
        sharded(x.bfloat16() if rank == 0 else x)
    sharded(x)                                   # the group still works


def _dp_model(world):
    """Linear -> Tanh -> MoRAM-injected Linear with 14 frozen and 3 trainable atoms; the
    first Linear is trained too (it gets its gradient through the sharded layer's gx)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5))
    mk.inject(m, mk.MoRAMConfig(target_modules=["2"], r=3, k=3, tau=0.5, alpha=6.0))
    mk.add_task(m)
    _, keys, values = make_inputs(1, 10, 5, 17, k=3, seed=4)
    m[2]._set_bank(frozen_keys=keys[:14].clone(), frozen_values=values[:14].clone(),
                   keys=keys[14:].clone(), values=values[14:].clone(), task_sizes=torch.tensor([14, 3]))
    m[0].requires_grad_(True)
    return m


def sc_dp_ddp_and_fsdp2_step(rank, world):
    """A training step under DDP, then under FSDP2 (the rest of the model sharded by it),
    each rank with its own batch (uneven, one empty at 3 ranks): the gradients and the
    parameters after the step equal one process on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t   # noqa: E731
    sizes = _split(7, world)
    lo = sum(sizes[:rank])
    own = slice(lo, lo + sizes[rank])
    gen = torch.Generator().manual_seed(9)
    xb, yb = torch.randn(7, 6, generator=gen), torch.randn(7, 5, generator=gen)

    def step(model, wrapped, rows, scale):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss = scale * ((wrapped(xb[rows]) - yb[rows]) ** 2).sum() / 7   # DDP averages: x world
        loss.backward()
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        return grads, {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = _dp_model(world)
    want = step(ref, ref, slice(None), 1.0)
    assert want[0]["2.keys"].abs().max() > 0 and want[0]["0.weight"].abs().max() > 0
    for how in ("ddp", "fsdp2"):
        model = mk.distributed.shard_bank(_dp_model(world))
        if how == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        got = step(model, wrapped, own, float(world))
        for i, what in enumerate(("grad", "parameter after the step")):
            assert got[i].keys() == want[i].keys()
            for n in want[i]:
                _close(got[i][n], want[i][n], f"{how}: {what} {n}")


def sc_dp_bytes_match_the_model(rank, world):
    """The benchmark's model of the bytes per call equals what the collectives carried
    (``mk.distributed.traffic``), in both modes, forward and backward."""
    from benchmarks.presets import bank_parallel as bp

    layer, x = _layer(12, 6, 20, 4, k=5)
    k_eff = 5
    # at 3 ranks, all tokens on one rank: padded blocks would cost more, y is all-reduced
    for same, sizes in ((False, _split(7, world)), (False, [7] + [0] * (world - 1)),
                        (True, [7] * world)):
        sharded = mk.distributed.shard_bank(copy.deepcopy(layer), same_input=same)
        lo = 0 if same else sum(sizes[:rank])
        xr = x[lo:lo + sizes[rank]]
        for train, need_x in ((False, False), (True, True), (True, False)):
            before = dict(mk.distributed.traffic)
            xin = xr.clone().requires_grad_(need_x)
            if train:
                sharded(xin).sum().backward()
            else:
                with torch.no_grad():
                    sharded(xin)
            got = [mk.distributed.traffic[ph] - before[ph] for ph in ("forward", "backward")]
            model = bp.collectives(sizes, 12, 6, k_eff, 4, train, need_x=need_x, same_input=same)
            want = [sum(b for _, b in model[ph]) for ph in ("forward", "backward")]
            assert got == want, (same, train, need_x, got, want)


def _tiny_model(world, *, inject=True):
    """``Sequential(MoRAMLinear(8 -> 6), Tanh, Linear(6 -> 4))`` with ``2 * world``
    frozen atoms (even slices: DDP's broadcast of unequal slices aborts the process) and 2
    trainable ones with nonzero values; by :func:`mk.inject` or built by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    if inject:
        mk.inject(model, mk.MoRAMConfig(target_modules=["0"], r=2, k=2, tau=0.5))
        add = mk.add_task
    else:
        model[0] = mk.MoRAMLinear(model[0], r=2, k=2, tau=0.5)
        add = type(model[0]).add_task
    for _ in range(world + 1):
        add(model if inject else model[0])
        with torch.no_grad():
            model[0].values.normal_()
    assert model[0].frozen_keys.shape[0] == 2 * world
    return model


def _counting_broadcasts():
    """Count the bytes DDP broadcasts (it calls ``torch.distributed._broadcast_coalesced``
    for parameters and buffers) and the ids of the tensors broadcast; returns ``(log,
    undo)``."""
    real = dist._broadcast_coalesced
    log = {"bytes": 0, "tensors": set()}

    def counting(group, tensors, *args, **kwargs):
        for t in tensors:
            log["bytes"] += t.numel() * t.element_size()
            log["tensors"].add(t.data_ptr())
        return real(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting

    def undo():
        dist._broadcast_coalesced = real
    return log, undo


def _ddp_step(model, ddp, x, g):
    """One forward and backward through ``ddp`` (every rank the same x): the output and
    the trainable atoms' gradients."""
    model.zero_grad(set_to_none=True)
    y = ddp(x)
    (y * g).sum().backward()
    return [y.detach()] + [p.grad.clone() for p in mk.trainable_parameters(model)]


def sc_plain_ddp_leaves_the_bank_alone(rank, world):
    """Plain DDP, bank replicated: no forward broadcasts the frozen bank (nor does the
    wrap), for an injected model and for one built by hand (whose layers are found at the
    first forward), and the results are those of one process."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    for inject in (True, False):
        model = _tiny_model(world, inject=inject)
        ref = copy.deepcopy(model)
        bank = {model[0].frozen_keys.data_ptr(), model[0].frozen_values.data_ptr()}
        log, undo = _counting_broadcasts()
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            if inject:
                assert not bank & log["tensors"], "DDP broadcast the frozen bank when wrapping"
            got = [_ddp_step(model, ddp, x, g) for _ in range(3)]
            log["tensors"].clear()
            log["bytes"] = 0
            got.append(_ddp_step(model, ddp, x, g))
        finally:
            undo()
        assert not bank & log["tensors"], f"inject={inject}: DDP broadcast the frozen bank"
        assert "0.frozen_keys" not in ddp.named_module_buffers, ddp.named_module_buffers.keys()
        # what one forward still broadcasts: the task sizes, a few int64 (no other buffer)
        assert log["bytes"] == model[0].task_sizes.numel() * 8, log["bytes"]
        want = _ddp_step(ref, ref, x, g)
        for step in got:
            for a, b in zip(step, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def sc_plain_ddp_refuses_ranks_with_other_banks(rank, world):
    """DDP leaves the frozen bank of an injected model alone, so a checkpoint loaded on one
    rank only would train a different model on each rank: the first forward under DDP
    refuses that on every rank, naming the layer, and the same banks pass with one check
    in three forwards. A model built by hand is wrapped before its layers are known, so DDP
    copies rank 0's bank when it wraps it: no error, every rank then holds rank 0's. (A bank
    of another size on one rank aborts inside DDP's broadcast of the task sizes, in torch,
    before any forward.)"""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    for inject in (True, False):
        model = _tiny_model(world, inject=inject)
        first = model[0].frozen_values.clone()
        if rank == world - 1:
            with torch.no_grad():
                model[0].frozen_values.mul_(2)              # as if another checkpoint
        ddp = nn.parallel.DistributedDataParallel(model)
        if inject:
            with pytest.raises(RuntimeError, match=rf"MoRAMLinear '0': rank\(s\) \[{world - 1}\] hold another bank"):
                ddp(x)
        else:
            ddp(x)
            assert torch.equal(model[0].frozen_values, first)
    model = _tiny_model(world)
    ddp = nn.parallel.DistributedDataParallel(model)
    from moram_kernels import nn as mk_nn
    real, calls = mk_nn._all_gather, []

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    mk_nn._all_gather = spy
    try:
        for _ in range(3):
            ddp(x)
    finally:
        mk_nn._all_gather = real
    assert len(calls) == 1, f"{len(calls)} bank checks in 3 forwards (one is enough)"


def sc_ddp_and_shard_bank_in_either_order(rank, world):
    """``shard_bank`` before or after DDP wraps the model, on the wrapped module, a child
    of it or the wrapper: correct, or refused with a clear error before any result."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    want = _ddp_step(*(2 * [_tiny_model(world)]), x, g)

    def check(model, ddp, how):
        mine = model[0].frozen_keys.clone()
        for _ in range(2):
            got = _ddp_step(model, ddp, x, g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{how}: {m}")
        assert torch.equal(model[0].frozen_keys, mine), f"{how}: DDP overwrote this rank's slice"
    # injected model: its root lists the banks, so every order is correct
    model = _tiny_model(world)
    mk.distributed.shard_bank(model[0])                      # a child, then DDP on the root
    check(model, nn.parallel.DistributedDataParallel(model), "child sharded, then DDP")
    model = _tiny_model(world)
    ddp = nn.parallel.DistributedDataParallel(model)
    mk.distributed.shard_bank(model)                         # DDP first
    check(model, ddp, "DDP, then shard_bank")
    # built by hand: sharding the wrapper (or after a first forward) is correct ...
    model = _tiny_model(world, inject=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    mk.distributed.shard_bank(ddp)
    check(model, ddp, "DDP, then shard_bank(ddp)")
    # ... a child sharded before DDP wraps the root, or the inner module sharded before the
    # wrapper's first forward, is refused at that forward on every rank
    for order in ("child first", "DDP first"):
        model = _tiny_model(world, inject=False)
        if order == "child first":
            mk.distributed.shard_bank(model[0])
        ddp = nn.parallel.DistributedDataParallel(model)
        if order == "DDP first":
            mk.distributed.shard_bank(model)
        with pytest.raises(RuntimeError, match="broadcast rank 0's slice of the sharded bank of layers \\['0'\\]"):
            ddp(x)


def _spy_all_reduce():
    """Record the dtype of every tensor the sharded bank all-reduces; returns ``(seen, undo)``."""
    real, seen = mk.distributed._all_reduce, []

    def spy(t, group, what):
        seen.append(t.dtype)
        return real(t, group, what)

    mk.distributed._all_reduce = spy

    def undo():
        mk.distributed._all_reduce = real
    return seen, undo


def sc_autocast(rank, world):
    """Under CPU autocast (bf16): with ranks that hold no atom (right after the first task)
    and without, every rank reduces in fp32, and the result is the one-process layer's."""
    g = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    for n_frozen in (0, 20):       # 0: every rank but the last holds nothing
        layer, x = _layer(12, 6, n_frozen, 4, k=3)
        sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
        seen, undo = _spy_all_reduce()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = _run(sharded, x, g)
                want = _run(layer, x, g)
        finally:
            undo()
        assert seen and set(seen) == {torch.float32}, f"N_f = {n_frozen}: all-reduced {seen}"
        assert got[0].dtype == want[0].dtype == torch.bfloat16
        for name, a, b in zip(("y", "grad x", "grad keys", "grad values"), got, want):
            _close(a, b, f"N_f = {n_frozen} autocast {name}", torch.bfloat16, factor=2.0)


def sc_ranks_must_agree(rank, world):
    """What the header compares across ranks: each disagreement is refused on every rank,
    before any other collective, and the group stays usable; a different upstream
    gradient is refused in the backward."""
    layer, x = _layer(8, 4, 9, 2, k=2, delta=0.1)
    mk.distributed.shard_bank(layer, same_input=True)     # x and gy are compared in this mode
    odd = rank == world - 1
    for attr, value, what in (("k", 3, "k"), ("tau", 0.25, "tau"), ("eps", 1e-6, "eps"),
                              ("alpha", 4.0, "scaling")):
        old = getattr(layer, attr)
        if odd:
            setattr(layer, attr, value)
        with pytest.raises(RuntimeError, match=f"disagree on {what}:"):
            layer(x)
        setattr(layer, attr, old)
    layer.eval()
    if odd:
        layer.delta = 0.3
    with pytest.raises(RuntimeError, match="disagree on delta:"):
        layer(x)
    layer.delta = 0.1
    layer.train(odd)
    with pytest.raises(RuntimeError, match="disagree on training:"):
        layer(x)
    layer.train()
    perm = torch.arange(x.shape[0]).roll(1) if odd else torch.arange(x.shape[0])
    with pytest.raises(RuntimeError, match="x differs across ranks"):
        layer(x[perm])                                          # the same rows, another order
    with pytest.raises(RuntimeError, match="disagree on records a graph:"):
        with torch.set_grad_enabled(not odd):
            layer(x)
    y = layer(x)
    g = torch.ones_like(y) * (2.0 if odd else 1.0)
    with pytest.raises(RuntimeError, match="gradient of the output \\(gy\\) differs"):
        y.backward(g)
    layer(x).sum().backward()                                   # the group still works


def sc_fp64_backward(rank, world):
    """fp64 with a slice at least as large as d_in (the backward then uses the cached Gram
    of the slice): as exact as the package's fp64 tolerance."""
    layer, x = _layer(6, 5, 8 * world, 3, k=3, dtype=torch.float64)
    _compare(layer, x, torch.float64)


def sc_add_task_in_a_subgroup(rank, world):
    """A bank sharded over a subgroup: add_task broadcasts the new keys within that group,
    from its first rank, not over the world from global rank 0."""
    groups = [[0], [1]] if world == 2 else [[0], [1, 2]]
    handles = [dist.new_group(gr) for gr in groups]
    mine = next(i for i, gr in enumerate(groups) if rank in gr)
    layer, _ = _layer(8, 4, 6, 2, k=2)
    mk.distributed.shard_bank(layer, group=handles[mine])
    torch.manual_seed(100 + rank)
    mk.add_task(layer)
    every = [torch.empty_like(layer.keys) for _ in range(world)]
    dist.all_gather(every, layer.keys.detach().contiguous())
    for i, gr in enumerate(groups):
        for r in gr:
            assert torch.equal(every[r], every[gr[0]]), f"ranks {gr} got different keys"
    assert not torch.equal(every[0], every[1]), "rank 0 sent its keys outside its group"


def sc_collectives_per_call(rank, world):
    """The collectives of one call: three in the forward (header, candidates, output),
    two in the backward (same input; data parallelism adds the x and gy rows' gathers)."""
    layer, x = _layer(8, 4, 9, 2, k=2)
    mk.distributed.shard_bank(layer, same_input=True)
    traffic = mk.distributed.traffic
    before = traffic["collectives"]
    y = layer(x.requires_grad_(True))
    assert traffic["collectives"] - before == 3, traffic["collectives"] - before
    y.sum().backward()
    assert traffic["collectives"] - before == 5, traffic["collectives"] - before


# ---- checkpoints of a sharded bank ---------------------------------------------------------

OUT_DIR = None      # a folder every rank of the group sees (set by _worker)
_FROZEN = ("frozen_keys", "frozen_values")


def _cut(n, world):
    """The rows [lo, hi) of every rank: torch.chunk's cut, which DTensor's Shard(0) uses."""
    c = -(-n // world)
    sizes = [max(0, min(c, n - r * c)) for r in range(world)]
    return [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world)]


def _model(tasks, seed):
    """Two injected layers (d 6 -> 5 -> 4, r = 4) after ``tasks`` tasks whose atoms depend on
    ``seed``; the base weights do not."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    mk.inject(m, mk.MoRAMConfig(target_modules=["0", "2"], r=4, k=3, tau=0.5))
    torch.manual_seed(seed)
    for _ in range(tasks):
        mk.add_task(m)
        with torch.no_grad():
            for layer in mk.integrations.moram_layers(m).values():
                layer.values.normal_()
    return m


def _x():
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(4))


def _same_output(model, ref, what):
    with torch.no_grad():
        _close(model(_x()), ref(_x()), what)


def sc_state_dict_holds_dtensors(rank, world):
    """state_dict(): the frozen bank as DTensors sharded on dim 0 (this rank's rows, not
    copied, at the offsets DCP will use); load_state_dict takes each rank's rows of a
    sharded or a whole bank of any size, and a plain layer gathers a sharded one whole."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    layer, x = _layer(7, 5, 11, 3, k=3)
    sharded = mk.distributed.shard_bank(copy.deepcopy(layer))
    sd = sharded.state_dict()
    lo, hi = _cut(11, world)[rank]
    for f in _FROZEN:
        t = sd[f]
        assert isinstance(t, DTensor) and tuple(t.placements) == (Shard(0),), (f, type(t))
        assert t.shape == getattr(layer, f).shape, (f, t.shape)
        assert t.to_local().data_ptr() == getattr(sharded, f).data_ptr(), "the rows were copied"
        size, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        assert (off[0], off[0] + size[0]) == (lo, hi), (off, size)
        assert torch.equal(t.to_local(), getattr(layer, f)[lo:hi])
    # a plain layer gets the whole bank, gathered (every rank loads), never one slice
    plain = _layer(7, 5, 2, 3, k=3, seed=1)[0]
    plain.load_state_dict(sd)
    for f in mk.MoRAMLinear.BANK_FIELDS:
        assert torch.equal(getattr(plain, f), getattr(layer, f)), f
    # into sharded layers of other sizes: a whole state dict and a sharded one
    for what, src in (("whole", layer.state_dict()), ("sharded", sd)):
        for n in (2, 30):
            other = mk.distributed.shard_bank(_layer(7, 5, n, 3, k=3, seed=2)[0])
            other.load_state_dict(src)
            assert other._bank_shard.gids.tolist() == list(range(lo, hi)), (what, n)
            assert torch.equal(other.frozen_keys, layer.frozen_keys[lo:hi]), (what, n)
            with torch.no_grad():
                _close(other(x), layer(x), f"output after loading a {what} state dict")
    # refused on every rank, every layer unchanged: other hyper-parameters; banks that
    # differ by rank
    wrong = mk.distributed.shard_bank(_layer(7, 5, 2, 3, k=4, seed=1)[0])
    with pytest.raises(RuntimeError, match="hyper-parameters"):
        wrong.load_state_dict(sd)
    assert wrong.num_atoms == 5 and wrong.frozen_keys.shape[0] == _cut(2, world)[rank][1] - _cut(2, world)[rank][0]
    target = mk.distributed.shard_bank(_layer(7, 5, 2, 3, k=3, seed=1)[0])
    mine = _layer(7, 5, 11 + rank, 3, k=3)[0].state_dict()
    with pytest.raises(RuntimeError, match="different banks"):
        target.load_state_dict(mine)
    assert target.num_atoms == 5


def sc_save_load_moram_sharded(rank, world):
    """save_moram of a sharded model writes the one-process file, no rank holding more than
    its rows and one bounded piece; load_moram reads only each rank's rows, for a file of
    any bank size; failures raise on every rank and change nothing."""
    from safetensors import safe_open

    io = mk.distributed.checkpoint_io
    plain = _model(5, seed=1)                        # 16 frozen atoms a layer
    sharded = mk.distributed.shard_bank(copy.deepcopy(plain))
    path = os.path.join(OUT_DIR, "sharded.safetensors")
    mk.distributed.SAVE_CHUNK_BYTES = 3 * 6 * 4      # 3 keys of layer 0 a piece: several pieces
    try:
        io.update(read=0, buffer=0)
        mk.save_moram(sharded, path)
        held = io["buffer"]
    finally:
        mk.distributed.SAVE_CHUNK_BYTES = 64 << 20
    assert 0 < held <= 3 * 6 * 4 if rank == 0 else held == 0, held
    want = {f"{n}.{a}": getattr(l, a) for n, l in mk.integrations.moram_layers(plain).items()
            for a in mk.MoRAMLinear.BANK_FIELDS}
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(want)
        for k in want:
            assert torch.equal(f.get_tensor(k), want[k]), k
    # one process reads it as its own file
    single = _model(1, seed=2)
    mk.load_moram(single, path)
    _same_output(single, plain, "a plain model loading the sharded save")
    # a sharded model of another size reads its rows, and nothing else of the banks
    target = mk.distributed.shard_bank(_model(2, seed=3))
    io["read"] = 0
    mk.load_moram(target, path)
    lo, hi = _cut(16, world)[rank]
    share = sum((hi - lo) * (l.in_features + l.out_features) * 4 + 4 * (l.in_features + l.out_features) * 4
                + 5 * 8 for l in mk.integrations.moram_layers(plain).values())
    assert io["read"] == share, (io["read"], share)
    for n, l in mk.integrations.moram_layers(target).items():
        assert l._bank_shard.gids.tolist() == list(range(lo, hi)), n
    _same_output(target, plain, "a sharded model loading the sharded save")
    # a save that cannot write: every rank raises, the old file stays
    before = open(path, "rb").read()
    bad = os.path.join(OUT_DIR, "no-such-dir", "x.safetensors")
    with pytest.raises((FileNotFoundError, RuntimeError)) as info:
        mk.save_moram(target, bad)
    if rank:
        assert "rank(s) [0]" in str(info.value), info.value
    real = mk.distributed._write_bytes
    calls = []

    def failing(f, piece):      # the disk fills up after the first piece
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(f, piece)
    mk.distributed._write_bytes = failing
    try:
        with pytest.raises((OSError, RuntimeError), match=r"No space left|rank\(s\) \[0\]"):
            mk.save_moram(target, path)
    finally:
        mk.distributed._write_bytes = real
    assert open(path, "rb").read() == before, "a failed save changed the file"
    assert not [p for p in os.listdir(OUT_DIR) if p.endswith(".tmp.safetensors")], "a temp file was left"
    # ranks given different files: every rank raises, nothing changes
    other = os.path.join(OUT_DIR, "plain.safetensors")
    smaller = _model(3, seed=5)                     # 8 frozen atoms a layer
    if rank == 0:
        mk.save_moram(smaller, other)               # a plain model: no collective
    dist.barrier()
    with pytest.raises(RuntimeError, match="different banks"):
        mk.load_moram(target, other if rank == 0 else path)
    _same_output(target, plain, "a sharded model after a refused load")


def sc_import_into_sharded(rank, world):
    """The authors' checkpoints imported into a sharded model: each rank keeps its rows of
    the imported bank (any size); a refused import changes no rank."""
    g = torch.Generator().manual_seed(1)
    sd = {"0.lora_A.weight": torch.randn(9, 6, generator=g), "0.lora_B.weight": torch.randn(5, 9, generator=g),
          "0.loranew_A.weight": torch.randn(4, 6, generator=g),
          "0.loranew_B.weight": torch.randn(5, 4, generator=g)}
    plain, sharded = _model(2, seed=1), mk.distributed.shard_bank(_model(2, seed=1))
    for m in (plain, sharded):
        mk.integrations.import_trace_state_dict(m, sd, strict=False, task_sizes=[9])
    lo, hi = _cut(9, world)[rank]
    assert sharded[0]._bank_shard.gids.tolist() == list(range(lo, hi))
    assert torch.equal(sharded[0].frozen_keys, sd["0.lora_A.weight"][lo:hi])
    _same_output(sharded, plain, "imported")
    bad = dict(sd)
    bad["0.lora_A.weight"] = sd["0.lora_A.weight"].clone()
    bad["0.lora_A.weight"][8, 0] = float("nan")     # on the last rank's rows only
    with pytest.raises(ValueError, match="non-finite"):
        mk.integrations.import_trace_state_dict(sharded, bad, strict=False, task_sizes=[9])
    _same_output(sharded, plain, "after a refused import")


def sc_empty_bank_lifecycle(rank, world):
    """A bank with no atom at all shards, grows task by task while sharded, saves, loads
    and unshards as the same layers that never sharded."""
    plain, sharded = _model(0, seed=1), mk.distributed.shard_bank(_model(0, seed=1))
    path = os.path.join(OUT_DIR, "empty.safetensors")
    mk.save_moram(sharded, path)
    mk.load_moram(sharded, path)
    for task in range(3):
        for m in (plain, sharded):
            torch.manual_seed(10 + task)
            mk.add_task(m)
        _same_output(sharded, plain, f"after task {task}")
    mk.save_moram(sharded, path)
    fresh = mk.distributed.shard_bank(_model(0, seed=2))
    mk.load_moram(fresh, path)
    _same_output(fresh, plain, "loaded")
    mk.distributed.unshard_bank(fresh)
    for n, l in mk.integrations.moram_layers(fresh).items():
        assert torch.equal(l.frozen_keys, mk.integrations.moram_layers(plain)[n].frozen_keys), n


def sc_shard_bank_frees_the_whole_bank(rank, world):
    """After shard_bank nothing holds the whole bank (nor a cast of it): it is freed now,
    not at the next task."""
    import gc
    import weakref

    layer, x = _layer(8, 6, 40, 3, k=3)
    layer._frozen_bank(torch.bfloat16)       # a cached cast of the whole bank
    refs = [weakref.ref(layer.frozen_keys), weakref.ref(layer.frozen_values)]
    cast = layer._caches.bank.value
    assert cast is not None
    refs += [weakref.ref(t) for t in cast]
    del cast
    mk.distributed.shard_bank(layer)
    gc.collect()
    assert all(r() is None for r in refs), "the whole bank is still referenced after shard_bank"
    for f in _FROZEN:           # and no slice is a view that keeps the whole storage alive
        t = getattr(layer, f)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f


def sc_dcp_reshards(rank, world):
    """torch.distributed.checkpoint: a model sharded over ranks [0, P - 1) saves; the model
    sharded over all P ranks loads it, resharded (at P = 3: 8 + 8 rows, then 6 + 6 + 4);
    rank 0 alone loads it into plain models, with dcp.load in place (no_dist) and through
    dcp_to_torch_save into a model of another size: the saved model's outputs each time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = os.path.join(OUT_DIR, "dcp")
    ref, src, target = _model(5, seed=1), _model(5, seed=1), _model(5, seed=2)  # 16 frozen a layer
    plain, fresh = _model(5, seed=3), _model(1, seed=3)
    savers = dist.new_group(list(range(world - 1)))
    if rank < world - 1:
        mk.distributed.shard_bank(src, group=savers)
        dcp.save(src.state_dict(), checkpoint_id=path, process_group=savers)
    dist.barrier()
    mk.distributed.shard_bank(target)
    with torch.no_grad():
        assert not torch.allclose(target(_x()), ref(_x())), "the case is hollow"
    sd = target.state_dict()
    dcp.load(sd, checkpoint_id=path)
    target.load_state_dict(sd)
    lo, hi = _cut(16, world)[rank]
    for n, layer in mk.integrations.moram_layers(target).items():
        assert layer._bank_shard.gids.tolist() == list(range(lo, hi)), n
        assert torch.equal(layer.frozen_keys, mk.integrations.moram_layers(ref)[n].frozen_keys[lo:hi]), n
    _same_output(target, ref, f"saved at P={world - 1}, loaded at P={world}")
    if rank == 0:
        sd = plain.state_dict()
        dcp.load(sd, checkpoint_id=path, no_dist=True)
        plain.load_state_dict(sd)
        _same_output(plain, ref, "loaded by one process")
        dcp_to_torch_save(path, os.path.join(OUT_DIR, "whole.pt"))
        fresh.load_state_dict(torch.load(os.path.join(OUT_DIR, "whole.pt")))
        _same_output(fresh, ref, "through dcp_to_torch_save")
    dist.barrier()


SCENARIOS = {f.__name__[3:]: f for f in (
    sc_forward_backward, sc_fewer_atoms_than_candidates, sc_empty_slice, sc_eval_threshold,
    sc_bf16, sc_dropout_same_seed, sc_ties_across_ranks, sc_add_task_while_sharded, sc_bad_input_on_one_rank,
    sc_ddp_wrapped, sc_rules_the_audit_found_unpinned, sc_dp_uneven_batches,
    sc_dp_dropout_and_autocast, sc_dp_ranks_must_agree, sc_dp_ddp_and_fsdp2_step,
    sc_dp_bytes_match_the_model, sc_plain_ddp_leaves_the_bank_alone, sc_plain_ddp_refuses_ranks_with_other_banks,
    sc_ddp_and_shard_bank_in_either_order, sc_autocast, sc_ranks_must_agree, sc_fp64_backward,
    sc_add_task_in_a_subgroup, sc_collectives_per_call, sc_state_dict_holds_dtensors,
    sc_save_load_moram_sharded, sc_import_into_sharded, sc_empty_bank_lifecycle,
    sc_shard_bank_frees_the_whole_bank, sc_dcp_reshards)}


def sc_hang_rank_raises(rank, world):
    """The last rank raises before the forward and stays alive: the others must not wait
    forever, and must say why."""
    layer, x = _layer(8, 4, 9, 2, k=2)
    mk.distributed.shard_bank(layer)
    if rank == world - 1:
        try:
            raise KeyError("this rank's data loader failed")
        except KeyError:
            time.sleep(GROUP_DEADLINE_S)       # alive, never reaches the collective
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Another rank probably raised") as info:
        layer(x)
    waited = time.monotonic() - start
    assert waited < 10 * HANG_PG_TIMEOUT_S, f"waited {waited:.0f} s"
    raise _Expected(f"raised after {waited:.1f} s: {str(info.value)[:80]}")


class _Expected(Exception):
    pass


# ---- running a group ------------------------------------------------------------------------

def _worker(rank, world, store, out_dir, names, pg_timeout):
    global OUT_DIR
    OUT_DIR = out_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    table = dict(SCENARIOS, hang_rank_raises=sc_hang_rank_raises)
    results = {}
    for name in names:
        try:
            table[name](rank, world)
            results[name] = "ok"
        except _Expected as e:
            results[name] = f"ok: {e}"
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
            results[name] = traceback.format_exc()
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run_group(world, names, tmp, *, pg_timeout=PG_TIMEOUT_S, wait_for=None):
    """Run ``names`` in a fresh gloo group of ``world`` processes; ``{rank: {name: result}}``.
    ``wait_for``: ranks whose results are enough (the others are then killed)."""
    ctx = mp.get_context("spawn")
    store = os.path.join(tmp, "store")
    procs = [ctx.Process(target=_worker, args=(r, world, store, tmp, names, pg_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    wait_for = range(world) if wait_for is None else wait_for
    deadline = time.monotonic() + GROUP_DEADLINE_S
    while time.monotonic() < deadline and any(procs[r].is_alive() for r in wait_for):
        time.sleep(0.2)
    hung = [r for r in wait_for if procs[r].is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    results = {}
    for r in range(world):
        path = os.path.join(tmp, f"{r}.json")
        results[r] = json.load(open(path)) if os.path.exists(path) else {}
    if hung:
        results["hung"] = hung
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def group_results(request, tmp_path_factory):
    world = request.param
    res = run_group(world, list(SCENARIOS), str(tmp_path_factory.mktemp(f"group{world}")))
    return world, res


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_bank(group_results, name):
    world, res = group_results
    assert "hung" not in res, f"ranks {res.get('hung')} did not finish within {GROUP_DEADLINE_S} s"
    for r in range(world):
        got = res[r].get(name, "never ran (an earlier scenario hung or the process died)")
        assert got.startswith("ok"), f"rank {r} of {world}:\n{got}"


def test_a_rank_that_raises_does_not_hang_the_others(tmp_path):
    res = run_group(2, ["hang_rank_raises"], str(tmp_path), pg_timeout=HANG_PG_TIMEOUT_S,
                    wait_for=[0])
    assert "hung" not in res, "rank 0 waited past the deadline"
    got = res[0].get("hang_rank_raises", "no result")
    assert got.startswith("ok"), got


def test_shard_bank_needs_a_process_group():
    layer = mk.MoRAMLinear(nn.Linear(4, 3), r=2, k=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mk.distributed.shard_bank(layer)
    with pytest.raises(ValueError, match="no sharded bank"):
        mk.distributed.unshard_bank(layer)
    with pytest.raises(ValueError, match="no MoRAM layers"):
        mk.distributed.shard_bank(nn.Linear(4, 3))


def test_shard_bank_refuses_before_any_collective():
    """Checked on each rank before any exchange: subclasses (the sharded layer is its own
    named class), and a bank that breaks its invariant. The class is not built by hand."""
    class Mine(mk.MoRAMLinear):
        pass
    with pytest.raises(TypeError, match="not subclasses of it: {'<root>': 'Mine'}"):
        mk.distributed.shard_bank(Mine(nn.Linear(4, 3), r=2, k=2))
    layer = mk.MoRAMLinear(nn.Linear(4, 3), r=2, k=2)
    layer._buffers["task_sizes"] = torch.tensor([3])       # behind _set_bank's back
    with pytest.raises(ValueError, match="layer <root>: task sizes \\[3\\] do not add up to the 0"):
        mk.distributed.shard_bank(layer)
    assert type(layer) is mk.MoRAMLinear
    with pytest.raises(TypeError, match="made by moram_kernels.distributed.shard_bank"):
        mk.distributed.ShardedMoRAMLinear(nn.Linear(4, 3))


def test_benchmark_model_of_bytes():
    """The benchmark's model: the sharded call's bytes do not grow with N, the all-gathered
    bank's grow linearly, and one process moves nothing."""
    from benchmarks.presets import bank_parallel as bp

    a = bp.sharded_traffic(64, 256, 128, 16, 8, 4, train=False)
    assert a[0] == 3 * (8 * len(mk.distributed.HEADER) + 64 * 33 * 4) + 2 * 3 / 4 * 64 * 128 * 4
    assert bp.sharded_traffic(64, 256, 128, 16, 8, 1, train=True)[0] == 0
    b1 = bp.gather_bank_traffic(1000, 256, 128, 2, 4, train=False)[0]
    b2 = bp.gather_bank_traffic(2000, 256, 128, 2, 4, train=False)[0]
    assert b2 == 2 * b1 == 2 * 3 / 4 * 1000 * 384 * 2
    assert bp.predict_s((12.5e9, 0), "100GbE") == 1.0
    # data parallelism, 64 tokens per rank: x rows gathered, every rank's candidates, y's
    # rows reduce-scattered; the backward adds gy rows, gc and x's gradient
    dp = bp.data_parallel_traffic(64, 256, 128, 16, 4, train=False)
    assert dp[0] == 3 * (8 * len(mk.distributed.HEADER) + 64 * 256 * 4 + 4 * 64 * 33 * 4) + 3 / 4 * 4 * 64 * 128 * 4
    dp_train = bp.data_parallel_traffic(64, 256, 128, 16, 4, train=True)
    assert dp_train[0] - dp[0] == 3 * 64 * 128 * 4 + 2 * 3 / 4 * 4 * 64 * 16 * 4 + 3 / 4 * 4 * 64 * 256 * 4
    assert bp.data_parallel_traffic(64, 256, 128, 16, 1, train=True) == (0, 0)


def test_benchmark_smoke_runs(tmp_path, capsys):
    """``python -m benchmarks --preset bank-parallel`` end to end at tiny sizes, two processes."""
    from benchmarks.presets import bank_parallel as bp

    assert bp.main(["--smoke", "--procs", "2", "--no-plots", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for inputs in ("same x", "data-parallel"):
        assert f"| 2 | {inputs} | eval |" in out and f"| 2 | {inputs} | train |" in out, out
    rows = (tmp_path / "bank_parallel.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("timestamp_utc,P,inputs,mode"), rows
