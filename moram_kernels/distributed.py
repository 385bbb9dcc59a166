"""Banks larger than one device: the frozen atoms of a MoRAM layer sharded across the ranks
of a ``torch.distributed`` process group, with results equal to one process.

Every rank holds a contiguous slice of the frozen bank (cut as ``torch.chunk`` cuts it,
the layout of a DTensor sharded on dim 0) and the few trainable atoms (replicated).
:func:`shard_bank` turns each ``MoRAMLinear`` into a :class:`ShardedMoRAMLinear` in place
and :func:`unshard_bank` turns it back. Two modes:

* data parallelism (``same_input=False``, the default): each rank passes its own batch
  (any number of tokens, 0 included) and gets its own rows of the output. The T tokens
  below are then every rank's tokens in rank order: one all-gather brings every rank's x
  rows to every rank first, and the output (and, in the backward, the gradient of x) is
  reduce-scattered back to the rows' owners. The trainable atoms of a token are counted
  at the rank it came from, so a rank's trainable gradients are those of its own loss.
* the same x on every rank (``same_input=True``, tensor-parallel style): the output is
  replicated; the trainable atoms are counted on the last rank.

Checkpoints stay sharded: ``state_dict()`` holds DTensors (``torch.distributed.checkpoint``
reshards them), and ``save_moram`` / ``load_moram`` move only each rank's rows (see the
section at the end of this module).
The only coupling across atoms is the per-token norm and the top-K, so one call is:

1. each rank runs the ordinary backend on its slice: local top-K ``(score, global id)`` and
   its local sum of squares (the backend's clamped norm, with the clamp set to the tiniest
   float so it only ever touches an all-zero row);
2. one all-gather exchanges the ``T·K`` candidates and ``T`` sums of squares of every rank;
3. every rank picks the same global top-K from the ``T·K·P`` candidates, ties to the lower
   global id (global ids: the never-sharded bank order, then the trainable atoms), and
   computes the gate ``w`` with the reference backend's helper;
4. each rank adds ``sum w_i p_i b_i`` over the selected atoms it owns; the sum over ranks
   (an all-reduce, or a reduce-scatter to each token's rank) gives y.

The backward mirrors it: ``gc_i = b_i . gy`` at each atom's owner (an all-reduce of
``[T, K]``; with data parallelism every rank's ``gy`` rows are all-gathered first), the
gate's backward on every rank (the reference helper), then the sparse terms at each owner
plus the local dense normalisation term ``-alpha sum_j p_j a_j`` and the trainable atoms'
gradients: with the same x all summed in one all-reduce; with data parallelism the x
gradient is reduce-scattered and the trainable gradients stay on their rank.

A small header all-gather starts every forward: a rank that raised inside the forward (bad
input) makes every rank raise at once instead of leaving the others waiting, and ranks
that disagree on the call (see :data:`HEADER`: mode, x's dtype, grad mode,
hyper-parameters; with ``same_input=True`` also the token count and a position-sensitive
checksum of x, which refuses e.g. unseeded dropout) are refused; with ``same_input=True``
the backward's first all-reduce also checks that every rank has the same upstream
gradient. A rank that fails outside this code leaves the others blocked until the process
group's timeout; the error they get then says so.

Under DDP the slices must not be broadcast from rank 0: :func:`shard_bank` lists them on
the module it is given (DDP reads that list from the module it wraps, when it wraps), and
a sharded layer refuses to run under a DDP that did not leave its slice alone.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._base_road import base_forward
from ._dist import (ACTIVE_DDP, _all_gather, _all_reduce, _all_to_all_rows, _checksum_t, _collective,
                    _is_dtensor, _reduce_scatter, traffic)
from ._precision import acc_dtype, autocast_off
from .backends import Inputs, select
from .backends.reference import _gate, effective_k, gate_backward, gram_apply, segment_grads
from .nn import MoRAMLinear, _keep_frozen_banks_out_of_ddp

__all__ = ["shard_bank", "unshard_bank", "is_sharded", "ShardedMoRAMLinear"]

#: What the sharded ``load_moram`` / ``save_moram`` did in this process: ``read``, bytes of
#: atoms read from files; ``buffer``, the largest buffer of atoms held beside the bank
#: while saving (the writer's receive buffer). Tests and the benchmark read it.
checkpoint_io: dict[str, int] = {"read": 0, "buffer": 0}
#: Largest piece of a slice that crosses to the writer of a sharded ``save_moram``.
SAVE_CHUNK_BYTES = 64 << 20
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}

_FROZEN = tuple(f for f in MoRAMLinear.BANK_FIELDS if f.startswith("frozen_"))   # the sharded ones


def _chunks(n: int, parts: int) -> list[int]:
    """Sizes of the ``parts`` contiguous slices of ``n`` atoms, cut as ``torch.chunk`` and
    DTensor's ``Shard(0)`` cut them: ``ceil(n / parts)`` atoms each, the last slices
    smaller or empty. A rank never holds more than ``ceil(n / parts)`` atoms, and a
    rank's slice is a DTensor's local shard as it is (see ``state_dict``)."""
    c = -(-n // parts)
    return [max(0, min(c, n - r * c)) for r in range(parts)]


def _starts(counts: list[int]) -> list[int]:
    return [sum(counts[:r]) for r in range(len(counts))]


class _Shard:
    """Where one layer's frozen atoms live: rank ``r`` of the group holds the contiguous
    rows ``[lo, lo + counts[r])`` of the whole frozen bank (``_chunks`` sizes); ``gids
    [n_local]`` are those rows' global ids; ``same_input``: every rank passes the same x
    (else each passes its own batch). A copy shares the process group (which cannot be
    copied); a pickled one refers to the default group of the process that loads it, so
    only a layer sharded over the default group pickles."""

    def __init__(self, group, rank: int, world: int, counts: list[int], gids: Tensor,
                 same_input: bool = False):
        self.group, self.rank, self.world = group, rank, world
        self.counts, self.gids = list(counts), gids
        self.same_input = same_input
        self._meshes: dict = {}

    @classmethod
    def chunked(cls, group, rank: int, world: int, n_frozen: int, device,
                same_input: bool = False) -> "_Shard":
        """The layout of ``n_frozen`` atoms over ``world`` ranks (``_chunks``)."""
        counts = _chunks(n_frozen, world)
        lo = sum(counts[:rank])
        return cls(group, rank, world, counts, torch.arange(lo, lo + counts[rank], device=device),
                   same_input)

    @property
    def n_frozen(self) -> int:
        return sum(self.counts)

    @property
    def lo(self) -> int:
        return sum(self.counts[:self.rank])

    def dtensor(self, local: Tensor):
        """``local`` (this rank's rows, not copied) as the rows of a DTensor sharded on dim
        0 over the group: what ``state_dict`` holds, and what ``torch.distributed.checkpoint``
        saves and reshards. Builds no collective."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        kind = local.device.type
        if kind not in self._meshes:
            group = dist.group.WORLD if self.group is None else self.group
            self._meshes[kind] = DeviceMesh.from_group(group, kind)
        shape = (self.n_frozen, *local.shape[1:])
        return DTensor.from_local(local, self._meshes[kind], [Shard(0)], run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())

    @property
    def owns_trainable(self) -> bool:
        """Whether this rank computes the trainable atoms' share: the last rank when every
        rank has the same x; with data parallelism every rank, for its own tokens only."""
        return not self.same_input or self.rank == self.world - 1

    def __deepcopy__(self, memo):
        return _Shard(self.group, self.rank, self.world, self.counts, self.gids.clone(),
                      self.same_input)

    def __reduce__(self):
        if self.group is not None and self.group is not dist.group.WORLD:
            raise TypeError("a layer whose bank is sharded over a process group other than the "
                            "default one cannot be pickled (a process group does not travel); "
                            "call moram_kernels.distributed.unshard_bank(model) first")
        return (_Shard, (None, self.rank, self.world, self.counts, self.gids, self.same_input))


# ---- the sharded layer ---------------------------------------------------------------------

class ShardedMoRAMLinear(MoRAMLinear):
    """A :class:`~moram_kernels.nn.MoRAMLinear` whose frozen bank is sharded over the ranks
    of a process group (see the module docstring).

    ``frozen_keys`` / ``frozen_values`` hold this rank's contiguous slice of the frozen
    atoms (``_bank_shard.gids`` are their ids in the whole bank); the trainable atoms and
    ``task_sizes`` are the whole layer's, so ``num_atoms`` and the bank's invariant count
    the frozen atoms of every rank. ``add_task`` keeps the bank sharded and balanced.

    Not built directly: :func:`shard_bank` turns a ``MoRAMLinear`` into one in place (its
    class changes, its parameters stay the same objects) and :func:`unshard_bank` turns it
    back. Its ``state_dict()`` holds the frozen bank as DTensors sharded on dim 0 over the
    group (``torch.distributed.checkpoint`` saves and reshards them); ``load_state_dict``
    is a collective that takes this rank's rows of a sharded or a whole bank.
    ``copy.deepcopy`` keeps the process group, and pickling works for a layer sharded over
    the default group.
    """

    _bank_shard: _Shard

    def __init__(self, *args, **kwargs):
        raise TypeError("ShardedMoRAMLinear is made by moram_kernels.distributed.shard_bank(model), "
                        "not built directly")

    @property
    def num_atoms(self) -> int:
        return self._bank_shard.n_frozen + self.keys.shape[0]

    def _frozen_count(self, frozen_keys: Tensor) -> int:
        return self._bank_shard.n_frozen

    def _bank_group(self):
        return self._bank_shard.group

    def _check_bank(self, bank: dict[str, Tensor] | None = None, what: str | None = None, *,
                    shard: _Shard | None = None) -> None:
        """:meth:`MoRAMLinear._check_bank` of this rank's part of a bank laid out as
        ``shard`` (default: the current layout)."""
        if shard is None:
            return super()._check_bank(bank, what)
        old = self._bank_shard
        self._bank_shard = shard
        try:
            super()._check_bank(bank, what)
        finally:
            self._bank_shard = old

    @torch.no_grad()
    def _set_bank(self, *, shard: _Shard | None = None, **bank: Tensor) -> None:
        """:meth:`MoRAMLinear._set_bank`, with this rank's slice of the frozen bank and,
        when ``shard`` is given, the new map of the slices (set together, or neither)."""
        st = self._bank_shard if shard is None else shard
        fk = bank.get("frozen_keys")
        n_local = (self.frozen_keys if fk is None else fk).shape[0]
        if n_local != st.counts[st.rank] or st.gids.numel() != n_local:
            raise ValueError(f"sharded MoRAMLinear: rank {st.rank} would hold {n_local} frozen "
                             f"atoms, but its share is {st.counts[st.rank]} ({st.gids.numel()} ids)")
        old = self.__dict__.get("_bank_shard")
        self._bank_shard = st
        try:
            super()._set_bank(**bank)
        except BaseException:
            self._bank_shard = old
            raise

    def _slice_of(self, bank: dict[str, Tensor]) -> tuple[dict[str, Tensor], _Shard]:
        """This rank's part of a whole bank (frozen atoms of every rank, as an unsharded
        layer holds them) and the layout it belongs to; no copy, no communication."""
        st = self._bank_shard
        n_f = bank["frozen_keys"].shape[0]
        new = _Shard.chunked(st.group, st.rank, st.world, n_f, st.gids.device, st.same_input)
        part = dict(bank)
        for f in _FROZEN:
            if bank[f].shape[0] != n_f:
                raise ValueError(f"frozen_keys has {n_f} atoms but {f} {bank[f].shape[0]}")
            part[f] = bank[f][new.lo:new.lo + new.counts[new.rank]]
        return part, new

    @torch.no_grad()
    def _append_frozen(self, keys: Tensor, values: Tensor, **bank: Tensor) -> None:
        # The whole bank stays cut as _chunks cuts it (a DTensor's layout), so the slices
        # move by about the number of new atoms: a collective that carries at most that
        # many rows per rank, never the bank. The new atoms are on every rank already.
        st = self._bank_shard
        new = _Shard.chunked(st.group, st.rank, st.world, st.n_frozen + keys.shape[0],
                             st.gids.device, st.same_input)
        fk = _move_rows(self.frozen_keys, st, new, keys.to(self.frozen_keys))
        fv = _move_rows(self.frozen_values, st, new, values.to(self.frozen_values))
        self._set_bank(frozen_keys=fk, frozen_values=fv, shard=new, **bank)

    def forward(self, x: Tensor) -> Tensor:
        ddp = ACTIVE_DDP._active_ddp_module
        if ddp is not None:
            self._check_ddp(ddp)             # the same on every rank: all raise alike
        if self.num_atoms == 0:
            return base_forward(self.base_layer, x)
        d, gid = _sharded_delta(self, x)     # first: it checks x on every rank together
        y = base_forward(self.base_layer, x)
        if self.usage_counts is not None and gid is not None:
            self._count_usage(gid)
        return y + d.to(y.dtype)

    # ---- state dict: the frozen bank as DTensors sharded on dim 0 --------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for f in _FROZEN:
            destination[prefix + f] = self._bank_shard.dtensor(destination[prefix + f])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A collective: every rank takes its rows of the frozen bank (from a DTensor sharded
        # on dim 0 over this group, or from the whole bank), and the ranks agree that all
        # could before any changes, so the slices never disagree with the cut.
        st = self._bank_shard
        where = prefix[:-1] or "(root)"
        problem = self._hyper_mismatch(local_metadata, prefix)
        given = {f: state_dict.get(prefix + f) for f in _FROZEN}
        bank, new, n_f = {}, None, -1
        if problem is None and any(t is not None for t in given.values()):
            try:
                bank, new = self._rows_from_state(state_dict, prefix, given)
                n_f = new.n_frozen
            except (ValueError, TypeError) as e:
                problem = f"MoRAMLinear {where}: {e} (this layer was left unchanged)"
        problem = _agree(st.group, problem, [n_f], self.frozen_keys.device,
                         f"load_state_dict of the sharded layer {where}")
        if problem:
            error_msgs.append(problem)
            return
        if new is not None:
            self._set_bank(shard=new, **bank)     # checked above: cannot fail here
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            for f in _FROZEN:
                state_dict[prefix + f] = getattr(self, f)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _rows_from_state(self, state_dict, prefix, given) -> tuple[dict[str, Tensor], _Shard]:
        """This rank's bank from a state dict (frozen rows, and the other fields whose shape
        changes), converted and checked, and the layout it belongs to."""
        from torch.distributed.tensor import Shard

        st = self._bank_shard
        ranks = list(range(st.world)) if st.group is None else dist.get_process_group_ranks(st.group)
        whole, rows = {}, {}
        for f, t in given.items():
            if _is_dtensor(t):
                mesh = t.device_mesh.mesh.flatten().tolist()
                if tuple(t.placements) != (Shard(0),) or mesh != ranks:
                    raise ValueError(f"{f} is a DTensor placed {tuple(t.placements)} over ranks "
                                     f"{mesh}; this layer takes Shard(0) over ranks {ranks}")
                rows[f] = t.to_local()
            elif isinstance(t, Tensor) and t.dim() == 2:
                whole[f] = t
            else:
                raise TypeError(f"{f} must be a 2-D tensor or a DTensor, got "
                                f"{type(t).__name__}{'' if t is None else tuple(t.shape)}")
            given[f] = t.shape[0]
        if len(set(given.values())) != 1:
            raise ValueError(f"frozen_keys and frozen_values hold {given['frozen_keys']} and "
                             f"{given['frozen_values']} atoms")
        n_f = given["frozen_keys"]
        new = _Shard.chunked(st.group, st.rank, st.world, n_f, st.gids.device, st.same_input)
        for f, t in whole.items():
            rows[f] = t[new.lo:new.lo + new.counts[new.rank]]
        bank = {}
        for f in MoRAMLinear.BANK_FIELDS:
            t = rows.get(f, state_dict.get(prefix + f))
            cur = getattr(self, f)
            if not isinstance(t, Tensor) or t.dim() != cur.dim():
                continue        # left to the errors of the plain load
            if not isinstance(cur, nn.Parameter) or t.shape != cur.shape:   # as a plain load
                bank[f] = t.detach().to(device=cur.device, dtype=cur.dtype, copy=True)
        self._check_bank({f: bank.get(f, getattr(self, f)) for f in MoRAMLinear.BANK_FIELDS},
                         shard=new)
        return bank, new

    def extra_repr(self) -> str:
        st = self._bank_shard
        mode = "same x on every rank" if st.same_input else "data-parallel: each rank its own x"
        return (super().extra_repr() + f", sharded: rank {st.rank}/{st.world} holds "
                f"{self.frozen_keys.shape[0]} of {st.n_frozen} frozen atoms, {mode}")


def is_sharded(layer: nn.Module) -> bool:
    return isinstance(layer, ShardedMoRAMLinear)


def _agree(group, problem: str | None, facts: list[int], device, what: str) -> str | None:
    """A collective: whether every rank of ``group`` can go on. Returns this rank's
    ``problem``, or a message when another rank has one or the ranks' ``facts`` differ,
    or None: every rank gets a message, or none does."""
    mine = torch.tensor([problem is not None, *facts], dtype=torch.int64, device=device)
    every = _all_gather(mine, group, what).cpu()
    failed = [r for r in range(every.shape[0]) if every[r, 0]]
    if problem is not None:
        return problem
    if failed:
        return f"{what}: rank(s) {failed} could not (see their errors); nothing was changed"
    if not bool((every[:, 1:] == every[0, 1:]).all()):
        return (f"{what}: the ranks were given different banks ({every[:, 1:].tolist()} by "
                "rank); nothing was changed")
    return None


def _move_rows(local: Tensor, old: _Shard, new: _Shard, tail: Tensor) -> Tensor:
    """This rank's rows under layout ``new`` of a bank whose first ``old.n_frozen`` rows are
    laid out as ``old`` (``local``: this rank's) and whose last rows are ``tail`` (the same
    on every rank). One all-to-all moves the rows that change rank; every rank derives the
    same plan from the counts, so a plan that moves nothing moves nothing."""
    n_old, r = old.n_frozen, old.rank
    o_lo, n_lo = _starts(old.counts), _starts(new.counts)

    def overlap(s: int, d: int) -> int:
        return max(0, min(o_lo[s] + old.counts[s], n_lo[d] + new.counts[d]) - max(o_lo[s], n_lo[d]))

    lo, hi = n_lo[r], n_lo[r] + new.counts[r]
    if any(overlap(s, d) for s in range(old.world) for d in range(old.world) if s != d):
        send = [overlap(r, d) for d in range(old.world)]
        recv = [overlap(s, r) for s in range(old.world)]
        kept = _all_to_all_rows(local, send, recv, old.group, "move of the sharded bank's rows")
    else:
        a = max(lo, o_lo[r]) - o_lo[r]
        kept = local[a:a + overlap(r, r)]
    return torch.cat([kept, tail[max(lo, n_old) - n_old:max(hi, n_old) - n_old]])


# ---- one call --------------------------------------------------------------------------------

def _rows(t0: Tensor, t1: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (any shape, ids in ``[0, N0 + N1)``) of two segments, not concatenated."""
    n0 = t0.shape[0]
    if t1.shape[0] == 0:
        return t0[idx]
    if n0 == 0:
        return t1[idx]
    r0 = t0[idx.clamp(max=n0 - 1)]
    r1 = t1[(idx - n0).clamp(min=0)]
    return torch.where((idx < n0)[..., None], r0, r1)


def _checksum(t: Tensor) -> int:
    return int(_checksum_t(t))


def _same_on_every_rank(t: Tensor, world: int, dtype: torch.dtype) -> Tensor:
    """Words to append to a summing all-reduce that tell whether ``t`` is the same on every
    rank, with no collective of their own: 48 bits of ``t``'s hash cut into small digits
    ``c``, then their squares. Summed over the ``P`` ranks, ``P * sum(c^2) == sum(c)^2``
    holds for every digit exactly when every rank has the same digits (Cauchy-Schwarz);
    the digits are small enough that the sums are exact in ``dtype`` (fp32 or fp64)."""
    width = 8 if world <= 256 else 4
    shifts = torch.arange(0, 48, width, device=t.device)
    c = ((_checksum_t(t) >> shifts) & ((1 << width) - 1)).to(dtype)
    return torch.cat([c, c * c])


def _check_same(sums: Tensor, world: int, what: str) -> None:
    """Raise on every rank alike unless the summed words of :func:`_same_on_every_rank`
    say that every rank had the same tensor."""
    n = sums.numel() // 2
    s1, s2 = sums[:n].double(), sums[n:].double()
    if bool((world * s2 != s1 * s1).any()):
        raise RuntimeError(f"MoRAM sharded bank: {what} differs across ranks; with a sharded "
                           "bank every rank must back-propagate the same loss through the "
                           "layer (the output is replicated, so is its gradient)")


def _bits(v: float) -> int:
    """A float's IEEE double bits as an int64, to compare hyper-parameters exactly."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


#: What the header of every sharded forward carries, one int64 each. Every rank must agree
#: on all of them but ``failed`` and ``wants x's gradient`` (OR-ed: every rank then runs the
#: same collectives); ``tokens`` and ``x checksum`` only with ``same_input=True`` (with data
#: parallelism each rank has its own batch, and the checksum is not computed).
HEADER = ("failed", "tokens", "x checksum", "same_input", "x dtype", "training", "records a graph",
          "wants x's gradient", "atoms", "k", "tau", "delta", "eps", "scaling")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)   # codes in the header


def _header(layer, x2: Tensor | None, failed: bool, graph: bool, need_x: bool) -> Tensor:
    """This rank's header (see :data:`HEADER`), built on the bank's device without a host
    sync: the checksum of x stays a device tensor."""
    st: _Shard = layer._bank_shard
    dev = layer.frozen_keys.device
    delta = 0.0 if layer.training else layer.delta     # the threshold is an eval-time rule
    dtype = -1 if x2 is None or x2.dtype not in _DTYPES else _DTYPES.index(x2.dtype)
    fields = [int(failed), -1 if x2 is None else x2.shape[0], 0, int(st.same_input), dtype,
              int(layer.training), int(graph), int(need_x), layer.num_atoms, layer.k,
              _bits(layer.tau), _bits(delta), _bits(layer.eps), _bits(layer.scaling)]
    head = torch.tensor(fields, dtype=torch.int64, device=dev)
    if x2 is not None and st.same_input:
        head[2] = _checksum_t(x2).to(dev)
    return head


def _check_headers(heads: Tensor, err: Exception | None, same_input: bool) -> None:
    """Raise, the same on every rank, unless every rank's header agrees: ``err`` (this
    rank's own) first, then the ranks that raised, then the fields in :data:`HEADER`
    order. One host sync for the whole table."""
    rows = heads.tolist()
    failed = [r for r, h in enumerate(rows) if h[0]]
    if err is not None:
        raise err
    if failed:
        raise RuntimeError(f"MoRAM sharded bank: rank(s) {failed} of the group raised in this "
                           "forward (see their error); every rank stops here so none waits")
    per_rank = ("wants x's gradient",) if same_input else ("tokens", "x checksum", "wants x's gradient")
    for i, name in enumerate(HEADER[1:], start=1):
        seen = [h[i] for h in rows]
        if len(set(seen)) == 1 or name in per_rank:
            continue
        if name == "tokens":
            raise RuntimeError("MoRAM sharded bank: every rank must pass the same x, got token "
                               f"counts {seen} by rank (sharded with same_input=True; the "
                               "default, same_input=False, takes a batch per rank)")
        if name == "x checksum":
            raise RuntimeError("MoRAM sharded bank: x differs across ranks (its checksum, "
                               "which also sees the order of the rows, does); a bank sharded "
                               "with same_input=True needs the same input on every rank, and "
                               "with dropout > 0 the same random seed on every rank")
        if name == "x dtype":   # rows and candidates cross as raw bytes
            names = [str(_DTYPES[c]) if c >= 0 else "other" for c in seen]
            raise RuntimeError(f"MoRAM sharded bank: x has dtype {names} by rank; every rank "
                               "must pass the same dtype (the same autocast setting everywhere)")
        if name in ("tau", "delta", "eps", "scaling"):
            seen = [struct.unpack("<d", struct.pack("<q", v))[0] for v in seen]
        hint = {"same_input": " (shard_bank(..., same_input=) must be the same on every rank)",
                "training": " (call .train() / .eval() alike on every rank)",
                "records a graph": " (a forward under torch.no_grad() on some ranks only would "
                                   "leave the backward's collectives unmatched)",
                "atoms": " (add_task must run on every rank of the group)"}.get(name, "")
        raise RuntimeError(f"MoRAM sharded bank: the ranks disagree on {name}: {seen} by "
                           f"rank{hint}")


def _sharded_delta(layer, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The MoRAM delta of a sharded layer, ``[..., d_in] -> [..., d_out]``, and the ``[T, K]``
    global ids selected for this rank's tokens. Everything that can fail on one rank only
    runs before the header exchange, so that every rank learns of it there."""
    st: _Shard = layer._bank_shard
    err = x2 = local = None
    graph = torch.is_grad_enabled() and (x.requires_grad or layer.keys.requires_grad
                                         or layer.values.requires_grad)
    dev_type = layer.frozen_keys.device.type
    try:
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"x has d_in = {x.shape[-1]}, this layer takes {layer.in_features}")
        x2 = layer.adapter_dropout(x).reshape(-1, layer.in_features)
        with autocast_off(dev_type):     # every rank computes and reduces in the same dtype
            local = _local_candidates(layer, x2, layer.keys, layer.values, st.owns_trainable)
    except Exception as e:  # re-raised below, once every rank has heard of it
        err = e
    need_x = x2 is not None and x2.requires_grad and torch.is_grad_enabled()
    head = _header(layer, x2, err is not None, graph, need_x)
    heads = _all_gather(head, st.group, "header exchange of the sharded forward")
    traffic["forward"] += head.numel() * head.element_size()
    traffic["calls"] += 1
    _check_headers(heads, err, st.same_input)
    counts = None if st.same_input else heads[:, 1].tolist()
    with autocast_off(dev_type):
        d, gid = _ShardedMoRAM.apply(x2, layer.keys, layer.values, layer, local, counts,
                                     bool(heads[:, HEADER.index("wants x's gradient")].any()))
    return d.reshape(*x.shape[:-1], layer.out_features), gid


def _gather_rows(t: Tensor, counts: list[int], group, what: str, phase: str) -> Tensor:
    """Every rank's rows ``[counts[r], ...]`` in rank order, ``[sum(counts), ...]``; each rank
    sends its rows padded to the largest count (an all-gather needs equal sizes)."""
    pad = t.new_zeros(max(counts), *t.shape[1:])
    pad[:t.shape[0]] = t
    every = _all_gather(pad, group, what)
    traffic[phase] += pad.numel() * pad.element_size()
    return torch.cat([every[r, :c] for r, c in enumerate(counts)])


def _own_rows(t: Tensor, counts: list[int], st: _Shard, what: str, phase: str) -> Tensor:
    """This rank's rows of ``t [sum(counts), ...]`` summed over the ranks: a reduce-scatter
    of blocks padded to the largest count, or an all-reduce when the padding would cost
    more (very uneven counts); every rank takes the same branch."""
    lo = sum(counts[:st.rank])
    if st.world * max(counts) > 2 * t.shape[0]:
        _all_reduce(t, st.group, what)
        traffic[phase] += t.numel() * t.element_size()
        return t[lo:lo + counts[st.rank]]
    blocks = t.new_zeros(st.world, max(counts), *t.shape[1:])
    start = 0
    for r, c in enumerate(counts):
        blocks[r, :c] = t[start:start + c]
        start += c
    traffic[phase] += blocks.numel() * blocks.element_size()
    return _reduce_scatter(blocks, st.group, what)[:counts[st.rank]]


class _ShardedMoRAM(torch.autograd.Function):
    """``(x2 [T, d_in], keys1, values1, layer, local, counts, need_x) -> (delta [T, d_out],
    gid [T, K])``: steps 2 to 4 of the module docstring, and their backward. ``counts``:
    every rank's token count (data parallelism; None when every rank has the same x);
    ``need_x``: whether any rank wants the gradient of its x (all then exchange it)."""

    @staticmethod
    def forward(ctx, x2, keys1, values1, layer, local, counts, need_x):
        st: _Shard = layer._bank_shard
        fk, fv = layer.frozen_keys, layer.frozen_values
        d_out, dev = layer.out_features, fk.device
        # own: this rank's rows among the tokens every rank works on
        lo = 0 if counts is None else sum(counts[:st.rank])
        own = slice(lo, lo + x2.shape[0])
        ctx.layer, ctx.counts, ctx.own, ctx.need_x = layer, counts, own, need_x
        ctx.empty = (x2.shape[0] if counts is None else sum(counts)) == 0
        if ctx.empty:   # nothing selected, nothing exchanged
            ctx.x2_like = x2.detach()
            return x2.new_zeros(0, d_out), torch.zeros(0, 0, dtype=torch.int64, device=dev)
        xs = x2.detach()
        if counts is not None:
            # data parallelism: every rank scores every rank's tokens against its slice (the
            # trainable atoms only for its own tokens, so their share is computed once)
            xs = _gather_rows(xs, counts, st.group, "all-gather of every rank's x", "forward")
            rest = _local_candidates(layer, torch.cat([xs[:own.start], xs[own.stop:]]),
                                     keys1, values1, False)
            local = local[:2] + tuple(torch.cat([o[:lo], m, o[lo:]])
                                      for m, o in zip(local[2:], rest[2:]))
        t = xs.shape[0]
        K, acc, cand_scores, cand_gids, cand_lidx, sumsq = local

        # 2. exchange candidates and sums of squares: [P, T, 2K + 1] words
        ibits = torch.int64 if acc == torch.float64 else torch.int32
        packed = torch.cat([cand_scores.view(ibits), cand_gids.to(ibits),
                            sumsq[:, None].view(ibits)], dim=1)
        allp = _all_gather(packed, st.group, "candidate exchange of the sharded forward")
        traffic["forward"] += packed.numel() * packed.element_size()
        scores = allp[:, :, :K].contiguous().view(acc).permute(1, 0, 2).reshape(t, -1)  # [T, P K]
        gids = allp[:, :, K:2 * K].to(torch.int64).permute(1, 0, 2).reshape(t, -1)
        norm = allp[:, :, 2 * K].contiguous().view(acc).sum(0).sqrt().clamp_min(layer.eps)

        # 3. the same global top-K on every rank: by score, ties to the lower global id
        by_gid = gids.argsort(dim=1)
        order = scores.gather(1, by_gid).sort(dim=1, descending=True, stable=True).indices[:, :K]
        pos = by_gid.gather(1, order)                                       # [T, K] in [0, P K)
        p_sel = scores.gather(1, pos)
        gid_sel = gids.gather(1, pos)
        mine = (pos // K) == st.rank
        lidx = torch.where(mine, cand_lidx.gather(1, (pos - st.rank * K).clamp(0, K - 1)),
                           torch.full_like(pos, -1))                        # -1: another rank's
        n0 = fk.shape[0]
        delta = 0.0 if layer.training else layer.delta      # the threshold is an eval-time rule
        w, m = _gate(p_sel, norm, layer.tau, delta)
        sc = torch.where(lidx >= n0, layer.scaling, 1.0).to(acc)
        coef = torch.where(mine, w * m * p_sel * sc, torch.zeros_like(p_sel))  # c_i * scale_i

        # 4. each rank adds its own atoms' contributions; the sum over ranks completes y
        v1 = values1 if st.owns_trainable else values1[:0]
        if n0 + v1.shape[0]:
            y = torch.einsum("tk,tkd->td", coef, _rows(fv, v1.detach(), lidx.clamp(min=0)).to(acc))
        else:
            y = torch.zeros(t, d_out, dtype=acc, device=dev)
        if counts is None:
            _all_reduce(y, st.group, "all-reduce of the sharded forward's output")
            traffic["forward"] += y.numel() * y.element_size()
        else:
            y = _own_rows(y, counts, st, "reduction of the sharded forward's output", "forward")

        ctx.save_for_backward(xs, lidx, p_sel, norm, coef, sc, keys1, values1, fk, fv)
        ctx.delta, ctx.dtype = delta, x2.dtype
        gid_sel = gid_sel[own]
        ctx.mark_non_differentiable(gid_sel)
        return y.to(x2.dtype), gid_sel

    @staticmethod
    def backward(ctx, gy, _ggid):
        with autocast_off(gy.device.type):
            return _ShardedMoRAM._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        layer = ctx.layer
        need_x, need_k1, need_v1 = ctx.needs_input_grad[:3]
        if ctx.empty:   # zero gradients, still part of the graph
            return (torch.zeros_like(ctx.x2_like) if need_x else None,
                    torch.zeros_like(layer.keys) if need_k1 else None,
                    torch.zeros_like(layer.values) if need_v1 else None, None, None, None, None)
        st: _Shard = layer._bank_shard
        xs, lidx, p_sel, norm, coef, sc, keys1, values1, fk, fv = ctx.saved_tensors
        counts, own = ctx.counts, ctx.own
        acc = p_sel.dtype
        owner = st.owns_trainable
        k1 = keys1.detach() if owner else keys1.detach()[:0]
        v1 = values1.detach() if owner else values1.detach()[:0]
        n0, n_loc = fk.shape[0], fk.shape[0] + k1.shape[0]
        xf = xs.to(acc)
        if counts is None:
            gyf = gy.to(acc)
        else:   # the upstream gradient of every rank's rows, in the dtype every rank has
            gyf = _gather_rows(gy.to(ctx.dtype), counts, st.group,
                               "all-gather of every rank's output gradient", "backward").to(acc)
        safe = lidx.clamp(min=0)

        # gc_i = scale_i (b_i . gy) at each atom's owner; the sum over ranks completes it
        if n_loc:
            gc = sc * torch.einsum("tkd,td->tk", _rows(fv, v1, safe).to(acc), gyf)
            gc = torch.where(lidx >= 0, gc, torch.zeros_like(gc))
        else:
            gc = torch.zeros_like(p_sel)
        # with the same x, the same gy on every rank is checked in this same all-reduce (see
        # _same_on_every_rank); with data parallelism each rank's gy is its own
        check = _same_on_every_rank(gy, st.world, acc) if counts is None else gc.new_zeros(0)
        flat = torch.cat([gc.reshape(-1), check])
        _all_reduce(flat, st.group, "all-reduce of the selected atoms' value gradients")
        traffic["backward"] += flat.numel() * flat.element_size()
        gc = flat[:gc.numel()].view_as(gc)
        if counts is None:
            _check_same(flat[gc.numel():], st.world, "the gradient of the output (gy)")
        g_sel, alpha = gate_backward(gc, p_sel, norm, layer.tau, ctx.delta, layer.eps)

        # same x: one all-reduce for the rest, [gx (sparse at the owners + local dense term)
        # | gk1 | gv1]. Data parallelism: gx reduced to each rank's own rows (when any rank
        # wants it); the trainable atoms' gradients stay local: those of this rank's loss
        parts = []
        gx = None
        if (need_x and counts is None) or (counts is not None and ctx.need_x):
            gx = torch.zeros_like(xf)
            if n_loc:
                sel = torch.where(lidx >= 0, g_sel, torch.zeros_like(g_sel))
                gx = torch.einsum("tk,tkd->td", sel, _rows(fk, k1, safe).to(acc))
                gram0 = layer._frozen_gram(acc) if layer.frozen_keys is fk else None
                if counts is None:
                    gx -= alpha[:, None] * gram_apply(xf, ((fk, gram0), (k1, None)))
                else:
                    gx -= alpha[:, None] * gram_apply(xf, ((fk, gram0),))
                    gx[own] -= alpha[own, None] * gram_apply(xf[own], ((k1, None),))
            if counts is None:
                parts.append(gx)
            else:
                gx = _own_rows(gx, counts, st, "reduction of the sharded backward's x gradient",
                               "backward")
        n1 = keys1.shape[0]
        if need_k1 or need_v1:
            if owner and n1:
                r = slice(None) if counts is None else own
                gk1, gv1 = segment_grads(xf[r], gyf[r], k1.to(acc), v1.to(acc), n0, lidx[r],
                                         g_sel[r], alpha[r], coef[r])
            else:
                gk1 = torch.zeros(n1, layer.in_features, dtype=acc, device=xf.device)
                gv1 = torch.zeros(n1, layer.out_features, dtype=acc, device=xf.device)
            if counts is None:
                parts += [gk1, gv1]
        if parts:
            flat = torch.cat([p.reshape(-1) for p in parts])
            _all_reduce(flat, st.group, "all-reduce of the sharded backward's gradients")
            traffic["backward"] += flat.numel() * flat.element_size()
            out = list(flat.split([p.numel() for p in parts]))
            if need_x:
                gx = out.pop(0).view_as(xf)
            if need_k1 or need_v1:
                gk1, gv1 = out[0].view(n1, -1), out[1].view(n1, -1)
        gx = gx.to(ctx.dtype) if need_x else None
        gk1 = gk1.to(keys1.dtype) if need_k1 else None
        gv1 = gv1.to(values1.dtype) if need_v1 else None
        return gx, gk1, gv1, None, None, None, None


def _local_candidates(layer, x2: Tensor, keys1: Tensor, values1: Tensor, trainable: bool):
    """This rank's top-K ``(score, global id, local id)`` per token, padded to the global
    K, and its sum of squares of scores, from the ordinary backend run on its slice (and
    on the trainable atoms when ``trainable``: local ids after the frozen ones)."""
    st: _Shard = layer._bank_shard
    fk, fv = layer.frozen_keys, layer.frozen_values
    t, dev = x2.shape[0], fk.device
    acc = acc_dtype(x2.dtype)
    K = effective_k(layer.k, layer.num_atoms)
    k1 = keys1.detach() if trainable else keys1.detach()[:0]
    v1 = values1.detach() if trainable else values1.detach()[:0]
    n_loc = fk.shape[0] + k1.shape[0]
    kl = min(K, n_loc)
    scores = torch.full((t, K), float("-inf"), dtype=acc, device=dev)
    gids = torch.full((t, K), torch.iinfo(torch.int32).max, dtype=torch.int64, device=dev)
    lidx = torch.zeros(t, K, dtype=torch.int64, device=dev)
    sumsq = torch.zeros(t, dtype=acc, device=dev)
    if kl and t:
        b = select(layer.backend, Inputs(x2.device, x2.dtype, fk.dtype, fv.dtype, layer.in_features,
                                         layer.out_features, n_loc, kl))
        scale1 = None
        if layer.scaling != 1.0 and k1.shape[0]:
            scale1 = torch.full((k1.shape[0],), layer.scaling, dtype=acc, device=dev)
        # eps = the tiniest float: the local norm is then the exact local sqrt(sum p^2)
        # except for an all-zero row, whose square underflows to 0 anyway
        with torch.no_grad():
            _, idx, p_loc, norm_loc = b.impl().moram_fwd(
                x2.detach(), fk, fv, None, k1, v1, scale1, kl, layer.tau, 0.0,
                torch.finfo(acc).tiny)
        gid_of = torch.cat([st.gids.to(dev), torch.arange(st.n_frozen, st.n_frozen + k1.shape[0],
                                                  device=dev)])
        scores[:, :kl] = p_loc.to(acc)
        gids[:, :kl] = gid_of[idx]
        lidx[:, :kl] = idx
        sumsq = norm_loc.to(acc) ** 2
    return K, acc, scores, gids, lidx, sumsq


# ---- the entry points ------------------------------------------------------------------------

def _layers_of(model: nn.Module) -> dict[str, MoRAMLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoRAMLinear)}
    if not layers:
        raise ValueError("model has no MoRAM layers (inject() first, or pass a MoRAMLinear)")
    return layers


def _fingerprint(layer: MoRAMLinear) -> list[int]:
    return [layer.frozen_keys.shape[0], layer.keys.shape[0], layer.task_sizes.shape[0]] + [
        _checksum(getattr(layer, f)) for f in MoRAMLinear.BANK_FIELDS]


@torch.no_grad()
def shard_bank(model: nn.Module, group=None, same_input: bool = False) -> nn.Module:
    """Shard, in place, the frozen bank of every ``MoRAMLinear`` in ``model`` (or of
    ``model`` itself) over the ranks of ``group`` (default: the world). Returns ``model``.

    Every rank must call it, holding the same atoms and passing the same ``same_input``
    (checked: a mismatch raises on every rank). Rank ``r`` keeps a contiguous slice of each
    frozen bank, cut as ``torch.chunk`` and DTensor's ``Shard(0)`` cut it (``ceil(N_f / P)``
    atoms, the last ranks fewer); the trainable atoms stay replicated.

    ``same_input=False`` (data parallelism): each rank passes its own batch (any number of
    tokens, 0 included) and gets, for its x, the output and gradients of one process
    holding the whole bank; the trainable atoms' gradients on a rank are those of its own
    loss (DDP then averages them). ``same_input=True`` (tensor-parallel style): every rank
    passes the same x (checked) and gets the same output. Either way forward and backward
    equal the unsharded layer's, ``num_atoms`` is the global N, and ``add_task`` keeps the
    bank sharded. ``unshard_bank`` undoes it.
    """
    if not isinstance(same_input, bool):
        raise TypeError(f"same_input must be a bool, got {type(same_input).__name__}")
    layers = _layers_of(model)
    already = [n or "<root>" for n, l in layers.items() if is_sharded(l)]
    if already:
        raise ValueError(f"layers {already[:5]} already have a sharded bank")
    other = {n or "<root>": type(l).__name__ for n, l in layers.items() if type(l) is not MoRAMLinear}
    if other:
        raise TypeError(f"shard_bank shards MoRAMLinear layers, not subclasses of it: {other}")
    for n, layer in layers.items():     # the same bank on every rank: all raise alike
        layer._check_bank(what=f"layer {n or '<root>'}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_bank needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    dev = next(iter(layers.values())).frozen_keys.device
    mine = torch.tensor([[same_input] + _fingerprint(l) for l in layers.values()],
                        dtype=torch.int64, device=dev)
    every = _all_gather(mine, group, "check that every rank holds the same bank")
    if not bool((every[:, 0, 0] == every[0, 0, 0]).all()):
        raise ValueError(f"the ranks passed same_input = {[bool(v) for v in every[:, 0, 0].tolist()]}; "
                         "every rank must shard in the same mode")
    differ = [n or "<root>" for i, n in enumerate(layers)
              if not bool((every[:, i] == every[0, i]).all())]
    if differ:
        raise ValueError(f"the ranks hold different atoms in layers {differ[:5]}; shard_bank "
                         "needs the same bank on every rank (e.g. load it on each, then shard)")
    for layer in layers.values():
        st = _Shard.chunked(group, rank, world, layer.frozen_keys.shape[0], layer.frozen_keys.device,
                            same_input)
        lo, hi = st.lo, st.lo + st.counts[rank]
        fk = layer.frozen_keys[lo:hi].clone()        # the rest can be freed
        fv = layer.frozen_values[lo:hi].clone()
        layer.__class__ = ShardedMoRAMLinear
        try:
            layer._set_bank(frozen_keys=fk, frozen_values=fv, shard=st)
        except BaseException:
            layer.__class__ = MoRAMLinear
            raise
    _keep_frozen_banks_out_of_ddp(model)     # each rank's own slice: DDP must not broadcast it
    return model


@torch.no_grad()
def unshard_bank(model: nn.Module) -> nn.Module:
    """Bring the full frozen bank back to every rank (every rank of the group must call it),
    in the order it would have had without sharding. Returns ``model``."""
    layers = {n: l for n, l in _layers_of(model).items() if is_sharded(l)}
    if not layers:
        raise ValueError("model has no sharded bank to unshard")
    for layer in layers.values():
        st = layer._bank_shard
        n_f = st.n_frozen
        keys = layer.frozen_keys.new_empty(n_f, layer.in_features)
        values = layer.frozen_values.new_empty(n_f, layer.out_features)
        width = max(st.counts)
        # an empty frozen bank (every rank knows: the counts are global) has nothing to
        # gather, and empty tensors cannot cross a gloo all-gather
        if width:
            full = []
            for t in (layer.frozen_keys, layer.frozen_values, st.gids.to(layer.frozen_keys.device)):
                pad = t.new_zeros(width, *t.shape[1:])
                pad[:t.shape[0]] = t
                full.append(_all_gather(pad, st.group, "gather of the sharded bank"))
            keys_all, values_all, gids_all = full
            for r, c in enumerate(st.counts):
                keys[gids_all[r, :c]] = keys_all[r, :c]
                values[gids_all[r, :c]] = values_all[r, :c]
        layer.__class__ = MoRAMLinear
        del layer._bank_shard
        layer._set_bank(frozen_keys=keys, frozen_values=values)
    _keep_frozen_banks_out_of_ddp(model)     # the same on every rank again: still left alone
    return model


# ---- single-file checkpoints of a sharded model (save_moram / load_moram) --------------------

_NOT_SHARDED = object()


def _models_bank_group(layers: dict[str, MoRAMLinear]):
    """The process group the sharded layers of a model share, or ``_NOT_SHARDED``."""
    groups = {id(l._bank_shard.group): l._bank_shard.group for l in layers.values() if is_sharded(l)}
    if not groups:
        return _NOT_SHARDED
    if len(groups) > 1:
        raise ValueError("save_moram / load_moram take a model whose sharded layers share one "
                         "process group; this one has several")
    return next(iter(groups.values()))


def _read_part(f, key: str, layer: MoRAMLinear, attr: str) -> tuple[Tensor, _Shard | None]:
    """A tensor of an open safetensors file, as ``layer`` will hold it: for the frozen bank
    of a sharded layer only this rank's rows (the file's other bytes are not read) and the
    layout they belong to."""
    if is_sharded(layer) and attr in _FROZEN:
        sl = f.get_slice(key)
        shape = sl.get_shape()
        st = layer._bank_shard
        new = _Shard.chunked(st.group, st.rank, st.world, shape[0], st.gids.device, st.same_input)
        t = sl[new.lo:new.lo + new.counts[new.rank]]
    else:
        t, new = f.get_tensor(key), None
    # rows taken from the file. safetensors returns them as a view of the tensor's bytes in
    # the file's memory map, so only these rows' pages are read (the benchmark's RSS shows it)
    checkpoint_io["read"] += t.numel() * t.element_size()
    return t, new


def _write_bytes(f, t: Tensor) -> None:
    f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


def _pieces(n: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, SAVE_CHUNK_BYTES // max(1, row_bytes))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _save_sharded(layers: dict[str, MoRAMLinear], fields, path, metadata: dict[str, str], group) -> None:
    """Write the file :func:`~moram_kernels.integrations.save_moram` writes, from a model
    whose layers shard their frozen bank over ``group``: a collective. The group's first
    rank writes (crash-safe, as ``save_moram``); every other rank sends it its rows, in
    pieces of at most ``SAVE_CHUNK_BYTES``, so no rank holds more than its slice and one
    piece. A failure on any rank raises on every rank and leaves ``path`` as it was."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    entries = []      # (key, this rank's tensor, the layer when sharded rows, whole shape)
    for name, layer in layers.items():
        for attr in fields:
            t = getattr(layer, attr).detach()
            if t.dtype not in _ST_DTYPES:
                raise TypeError(f"layer {name}: {attr} is {t.dtype}, which the file format does not take")
            sharded = is_sharded(layer) and attr in _FROZEN
            shape = [layer._bank_shard.n_frozen, *t.shape[1:]] if sharded else list(t.shape)
            entries.append((f"{name}.{attr}", t, layer if sharded else None, shape))
    dev = next(iter(layers.values())).frozen_keys.device
    err = None
    try:
        if rank == 0:
            _write_sharded(entries, path, metadata, group, world)
        else:
            for key, t, layer, _ in entries:
                if layer is None:
                    continue
                raw = t.contiguous().view(torch.uint8)
                for a, b in _pieces(t.shape[0], raw.shape[1]):
                    _collective(f"send of {key} to the writer",
                                lambda: dist.send(raw[a:b].contiguous(), group=group, group_dst=0))
    except Exception as e:  # noqa: BLE001  (re-raised below, once every rank has heard of it)
        err = e
    # after the writer renamed the file: every rank returns with the file in place, or raises
    problem = _agree(group, None if err is None else f"{type(err).__name__}: {err}", [], dev,
                     "save_moram of a sharded model")
    if err is not None:
        raise err
    if problem:
        raise RuntimeError(problem)


def _write_sharded(entries, path, metadata: dict[str, str], group, world: int) -> None:
    """The writer's side of :func:`_save_sharded`: the header, then each tensor, a sharded
    one as this rank's rows followed by every other rank's, received in pieces. An error
    while writing still receives every piece (so no rank waits), then raises; the file
    at ``path`` changes only once complete."""
    import contextlib

    from ._io import atomic_path, safetensors_header

    err = None
    with contextlib.ExitStack() as stack:
        f = None
        try:
            tmp = stack.enter_context(atomic_path(path))
            f = stack.enter_context(open(tmp, "wb"))
            sizes = [math.prod(shape) * t.element_size() for _, t, _, shape in entries]
            f.write(safetensors_header([(k, _ST_DTYPES[t.dtype], shape, n) for (k, t, _, shape), n
                                        in zip(entries, sizes)], metadata))
        except Exception as e:  # noqa: BLE001  (the other ranks still send: drain, then raise)
            err = e

        def write(piece: Tensor) -> None:
            nonlocal err
            if err is None:
                try:
                    _write_bytes(f, piece)
                except Exception as e:  # noqa: BLE001  (drain the other ranks, then raise)
                    err = e

        for key, t, layer, _ in entries:
            raw = t.contiguous().view(torch.uint8) if t.dim() == 2 else t
            for a, b in _pieces(t.shape[0], raw[:1].numel()) if t.dim() == 2 else [(0, None)]:
                write(raw[a:b])                      # this rank's rows (all of a whole tensor)
            if layer is None:
                continue
            st = layer._bank_shard
            for s in range(1, world):                # then every other rank's, in rank order
                todo = _pieces(st.counts[s], raw.shape[1])
                if not todo:
                    continue
                buf = torch.empty(todo[0][1], raw.shape[1], dtype=torch.uint8, device=t.device)
                checkpoint_io["buffer"] = max(checkpoint_io["buffer"], buf.numel())
                for a, b in todo:
                    piece = buf[:b - a]
                    _collective(f"receive of {key} from rank {s}",
                                lambda: dist.recv(piece, group=group, group_src=s))
                    write(piece)
        if err is not None:
            raise err
