"""``torch.distributed`` helpers shared by the layer and the sharded bank: DTensor (FSDP2)
access, rank-0 broadcast, and collectives whose errors say what was going on.

A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

#: Payload bytes this process put into the sharded bank's collectives by phase, forward
#: calls, and seconds spent inside collectives (``moram_kernels.distributed.traffic``; the
#: benchmark reads it).
traffic: dict[str, float] = {"forward": 0, "backward": 0, "calls": 0, "comm_s": 0.0}


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


def _broadcast_from_rank0(t: Tensor) -> None:
    """In place: every rank of the default process group gets rank 0's ``t`` (no-op when
    no process group is initialised)."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(t, src=0)


def _collective(what: str, fn):
    """``fn()``, timed into ``traffic["comm_s"]``; a failure is re-raised as a
    ``RuntimeError`` that names ``what`` and the likely cause."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # gloo / NCCL raise their own types (DistBackendError, RuntimeError)
        raise RuntimeError(
            f"MoRAM sharded bank: the {what} across ranks failed ({type(e).__name__}: {e}). "
            "Another rank probably raised or stopped before reaching this collective; the "
            "process group's timeout bounds this wait.") from e
    finally:
        traffic["comm_s"] += time.perf_counter() - start


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


def _all_to_all_rows(t: Tensor, send: list[int], recv: list[int], group, what: str) -> Tensor:
    """Rank ``r`` sends ``send[r']`` rows of ``t [n, d]`` (consecutive, in rank order) to
    each rank ``r'`` and receives ``recv[s]`` rows from each rank ``s``; the received rows,
    in rank order. Exchanged as raw bytes, so any dtype travels bit-exactly."""
    raw = t.contiguous().view(torch.uint8)
    out = raw.new_empty(sum(recv), raw.shape[1])
    _collective(what, lambda: torch.distributed.all_to_all_single(out, raw, recv, send, group=group))
    return out.view(t.dtype)
