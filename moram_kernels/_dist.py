"""``torch.distributed`` helpers shared by the layer and the sharded bank: DTensor (FSDP2)
access, rank-0 broadcast, DDP's list of what it must not broadcast, and collectives whose
errors say what was going on.

A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as _DDP

#: Payload bytes this process put into the sharded bank's collectives by phase, forward
#: calls, collectives launched, and seconds spent inside collectives
#: (``moram_kernels.distributed.traffic``; the benchmark reads it).
traffic: dict[str, float] = {"forward": 0, "backward": 0, "calls": 0, "collectives": 0,
                             "comm_s": 0.0}


# ---- DTensors (FSDP2-sharded parameters) ------------------------------------------------------

def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor (an FSDP2-sharded parameter) is gathered, anything else
    is returned as is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _assign_full(param: Tensor, full: Tensor) -> None:
    """Write the whole value ``full`` into ``param`` in place, keeping the object; for a
    DTensor parameter each rank writes its own shard."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


# ---- process groups and collectives --------------------------------------------------------------

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _broadcast_from_rank0(t: Tensor, group=None) -> None:
    """In place: every rank of ``group`` (default: the world) gets the ``t`` of the group's
    first rank (no-op when no process group is initialised or the group has one rank)."""
    if _dist_ready() and torch.distributed.get_world_size(group) > 1:
        src = 0 if group is None else torch.distributed.get_global_rank(group, 0)
        torch.distributed.broadcast(t, src=src, group=group)


# ---- DistributedDataParallel's list of what it leaves alone ------------------------------------

#: DDP reads this attribute of the module it wraps (its root, never a submodule) once, when
#: it is built: the names listed there are neither broadcast from rank 0 (at wrap time and,
#: for buffers, before every forward) nor all-reduced.
DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def _ddp_class():
    return _DDP


class _NoActiveDDP:
    _active_ddp_module = None


#: ``ACTIVE_DDP._active_ddp_module`` is the ``DistributedDataParallel`` whose forward is
#: running now, or None (DDP records it for TorchDynamo); read as a class attribute, it
#: costs a layer's forward tens of nanoseconds. A torch without it never reports one.
ACTIVE_DDP = _DDP if hasattr(_DDP, "_active_ddp_module") else _NoActiveDDP


def _ddp_ignore(model, names: list[str]) -> list[str]:
    """Add ``names`` (relative to the module DDP wraps) to what DDP leaves alone: on
    ``model``'s own list when ``model`` is what DDP wraps or will wrap; when ``model`` is a
    DDP wrapper, on its wrapped module's list and on the wrapper's live set (the one it
    read when built). Returns the names that were not on the list that counts before."""
    if isinstance(model, _DDP):
        live = model.parameters_to_ignore
        new = [n for n in names if n not in live]
        live.update(new)
        model = model.module
    else:
        new = None
    cur = list(getattr(model, DDP_IGNORE_ATTR, []))
    have = set(cur)
    added = [n for n in names if n not in have]
    if added:
        setattr(model, DDP_IGNORE_ATTR, cur + added)
    return added if new is None else new


def _collective(what: str, fn):
    """``fn()``, timed into ``traffic["comm_s"]``; a failure is re-raised as a
    ``RuntimeError`` that names ``what`` and the likely cause."""
    start = time.perf_counter()
    traffic["collectives"] += 1
    try:
        return fn()
    except Exception as e:  # gloo / NCCL raise their own types (DistBackendError, RuntimeError)
        raise RuntimeError(
            f"MoRAM sharded bank: the {what} across ranks failed ({type(e).__name__}: {e}). "
            "Another rank probably raised or stopped before reaching this collective; the "
            "process group's timeout bounds this wait.") from e
    finally:
        traffic["comm_s"] += time.perf_counter() - start


def _checksum_t(t: Tensor) -> Tensor:
    """A 0-d int64 hash of the bits of ``t`` (on its device, no host sync): equal on ranks
    that hold equal tensors, and sensitive to position: each element is weighted by its
    row's and its column's place (``t`` seen as ``[rows, last dim]``), so permuted rows
    or columns hash differently. Integer overflow wraps, the same way on every rank."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    b = t.detach().contiguous().view(bits)
    if b.numel() == 0:     # nothing to hash (an empty bank or task list): equal everywhere
        return torch.zeros((), dtype=torch.int64, device=b.device)
    b = b.reshape(-1, b.shape[-1]) if b.dim() else b.reshape(1, 1)
    w_col = torch.arange(1, b.shape[1] + 1, dtype=torch.int64, device=b.device) * 2654435761 + 1
    w_row = torch.arange(1, b.shape[0] + 1, dtype=torch.int64, device=b.device) * 40503 + 7
    return ((b.to(torch.int64) * w_col).sum(1) * w_row).sum()


def _all_gather(t: Tensor, group, what: str) -> Tensor:
    """``[P, *t.shape]``; exchanged as raw bytes, so any dtype travels bit-exactly."""
    t = t.contiguous()
    world = torch.distributed.get_world_size(group)
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    outs = [torch.empty_like(raw) for _ in range(world)]
    _collective(what, lambda: torch.distributed.all_gather(outs, raw, group=group))
    return torch.stack(outs).view(t.dtype).reshape(world, *t.shape)


def _all_reduce(t: Tensor, group, what: str) -> Tensor:
    _collective(what, lambda: torch.distributed.all_reduce(t, group=group))
    return t


def _reduce_scatter(t: Tensor, group, what: str) -> Tensor:
    """``t [P, *shape]`` summed over the ranks; rank ``r`` gets block ``r`` (``[*shape]``)."""
    flat = t.contiguous().reshape(-1, *t.shape[2:])      # the blocks stacked on dim 0
    out = t.new_empty(t.shape[1:])
    _collective(what, lambda: torch.distributed.reduce_scatter_tensor(out, flat, group=group))
    return out


def _all_to_all_rows(t: Tensor, send: list[int], recv: list[int], group, what: str) -> Tensor:
    """Rank ``r`` sends ``send[r']`` rows of ``t [n, d]`` (consecutive, in rank order) to
    each rank ``r'`` and receives ``recv[s]`` rows from each rank ``s``; the received rows,
    in rank order. Exchanged as raw bytes, so any dtype travels bit-exactly."""
    raw = t.contiguous().view(torch.uint8)
    out = raw.new_empty(sum(recv), raw.shape[1])
    _collective(what, lambda: torch.distributed.all_to_all_single(out, raw, recv, send, group=group))
    return out.view(t.dtype)
