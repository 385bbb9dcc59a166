"""``MoRAMLinear``: a frozen ``nn.Linear`` plus a growing bank of rank-1 atoms."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ._cache import DerivedCaches
from ._base_road import base_forward_owned
from ._checks import check_delta as _check_delta
from ._checks import check_real as _check_real
from ._dist import (ACTIVE_DDP, _all_gather, _assign_full, _broadcast_from_rank0, _checksum_t, _ddp_class,
                    _ddp_ignore, _full, _is_dtensor, _local)
from ._precision import acc_dtype, call_dtypes
from .functional import _scale_vector, moram_segments

__all__ = ["MoRAMLinear"]


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[d_in, d_out]``.
    Recognised by name so that transformers stays an optional dependency."""
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2)


class _NoBase(nn.Module):
    """Base layer of a ``MoRAMLinear`` that computes only the MoRAM delta, for wrappers that
    keep the real base layer themselves (the PEFT layer): its output is a 0-d zero, which
    broadcasts. It holds no state that would be saved (``weight`` only carries the device
    and dtype, as a non-persistent buffer)."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(())


def _linear_dims(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a supported base layer; ``TypeError`` for anything else."""
    if isinstance(base, (nn.Linear, _NoBase)):
        return base.in_features, base.out_features
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"base must be an nn.Linear or transformers' Conv1D, got {type(base).__name__}")


# ---- builders of the values MoRAMLinear caches (see MoRAMLinear._caches) ---------------------

# The cached values below (and functional._scale_vector) are built outside inference mode
# even when the first call that needs them runs under torch.inference_mode(): an inference
# tensor cannot be saved for backward, so a cache filled during an evaluation made the next
# training step raise.

def _gram(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """``keys^T keys``, accumulated in fp32 (fp64 for fp64 keys), stored in ``dtype``."""
    with torch.inference_mode(False):
        a = keys.detach().to(acc_dtype(keys.dtype))
        return (a.t() @ a).to(dtype)


def _cast_pair(keys: Tensor, values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):
        return keys.detach().to(dtype), values.detach().to(dtype)


class MoRAMLinear(nn.Module):
    """``y = base_layer(x) + moram(dropout(x), atoms)``, ``[..., d_in] -> [..., d_out]``.

    The bank is kept as two segments so that a forward pass never concatenates it:

    * ``frozen_keys [N_f, d_in]`` / ``frozen_values [N_f, d_out]``: buffers, atoms of
      past tasks. Their values already carry the ``alpha / r`` scale they were trained
      with (baked in by :meth:`add_task`), so a frozen atom's scale is 1.
    * ``keys [r, d_in]`` / ``values [r, d_out]``: parameters, the current task's atoms,
      whose values are scaled by ``alpha / r`` at run time.

    The first ``add_task()`` creates the two parameters; later ones re-initialise them in
    place (see :meth:`add_task`), so wrap the model in DDP / FSDP2 and build the optimiser
    after the first task.

    ``base`` may also be transformers' ``Conv1D`` (GPT-2, weight ``[d_in, d_out]``): it is
    kept as is and called as is, so nothing is transposed or copied.

    Atom-usage counting (off by default): set ``usage_counts`` to a zero int64 tensor
    (``start_usage()``) and every forward adds the bincount of its top-K atom ids to it.

    Contract at the edges: ``add_task()`` refuses to freeze a non-finite atom
    (``ValueError`` naming the atom ids and the tensor; the layer is left as it was). The
    state dict holds the atoms, not ``r``, ``k``, ``tau``, ``alpha``, ``eps``: those are
    recorded in the state dict's metadata, and ``load_state_dict`` raises (leaving this
    layer untouched) when they differ from the layer's. A state dict without that metadata
    (older files, or one that went through safetensors) cannot be checked. ``delta`` and
    ``dropout`` may differ on purpose (evaluation and training knobs) and are not checked.
    """

    def __init__(self, base: nn.Linear, r: int = 16, k: int = 16, tau: float = 0.01,
                 delta: float = 0.2, dropout: float = 0.0, alpha: float | None = None,
                 eps: float = 1e-12, backend: str | None = None):
        super().__init__()
        d_in, d_out = _linear_dims(base)
        for name, v in (("r", r), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.tau = _check_real("tau", tau, positive=True)
        self.delta = _check_delta(delta)
        self.eps = _check_real("eps", eps, positive=True)
        dropout = _check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if alpha is not None:
            alpha = _check_real("alpha", alpha, positive=True)
        self.r, self.k, self.alpha, self.backend = r, k, alpha, backend

        self.base_layer = base
        base.requires_grad_(False)
        w = base.weight
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("frozen_keys", w.new_empty(0, self.in_features))
        self.register_buffer("frozen_values", w.new_empty(0, self.out_features))
        self.keys = nn.Parameter(w.new_empty(0, self.in_features))
        self.values = nn.Parameter(w.new_empty(0, self.out_features))
        self.register_buffer("task_sizes", torch.zeros(0, dtype=torch.long, device=w.device))
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # values derived from the bank (see _frozen_gram, _frozen_bank, _trainable_scale);
        # _set_bank clears them all
        self._caches = DerivedCaches("gram", "bank", "scale")
        # [N] int64 while usage counting is on (not a buffer: never saved); None = off
        self.usage_counts: Tensor | None = None
        _keep_frozen_banks_out_of_ddp(self)      # for DDP wrapping this layer alone

    # ---- sizes ---------------------------------------------------------------------------

    @property
    def num_atoms(self) -> int:
        return self.frozen_keys.shape[0] + self.keys.shape[0]

    @property
    def num_trainable_atoms(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.task_sizes.shape[0]

    @property
    def scaling(self) -> float:
        """Scale of the trainable atoms' values: ``alpha / r``, or 1 when alpha is None."""
        return 1.0 if self.alpha is None else self.alpha / self.r

    # ---- the bank: one writer ---------------------------------------------------------------

    #: The tensors that make up the bank, in the order files and checks list them.
    BANK_FIELDS = ("frozen_keys", "frozen_values", "keys", "values", "task_sizes")

    def _frozen_count(self, frozen_keys: Tensor) -> int:
        """Frozen atoms of the whole bank when this layer holds ``frozen_keys``; a sharded
        layer (which holds a slice) counts those of every rank."""
        return frozen_keys.shape[0]

    def _check_bank(self, bank: dict[str, Tensor] | None = None, what: str | None = None) -> None:
        """Raise ``ValueError`` (prefixed by ``what``) unless ``bank``, a value for each of
        :attr:`BANK_FIELDS` (default: the layer's own), is a consistent bank for this
        layer: 2-D float atoms ``[*, d_in]`` / ``[*, d_out]`` with as many keys as values
        in each segment, and positive integer task sizes that add up to every atom, the
        last task being the trainable atoms when there are any."""
        what = what or f"MoRAMLinear({self.in_features} -> {self.out_features})"
        fk, fv, k, v, ts = (getattr(self, f) if bank is None else bank[f] for f in self.BANK_FIELDS)
        for name, t in (("frozen_keys", fk), ("frozen_values", fv), ("keys", k), ("values", v)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{what}: {name} must be a 2-D float tensor, got {desc}")
        if fk.shape[1] != self.in_features or k.shape[1] != self.in_features:
            raise ValueError(f"{what}: keys have d_in {fk.shape[1]} / {k.shape[1]}, the layer "
                             f"takes {self.in_features}")
        if fv.shape[1] != self.out_features or v.shape[1] != self.out_features:
            raise ValueError(f"{what}: values have d_out {fv.shape[1]} / {v.shape[1]}, the "
                             f"layer has {self.out_features}")
        if fk.shape[0] != fv.shape[0] or k.shape[0] != v.shape[0]:
            raise ValueError(f"{what}: keys and values hold different numbers of atoms "
                             f"(frozen {fk.shape[0]} / {fv.shape[0]}, trainable "
                             f"{k.shape[0]} / {v.shape[0]})")
        if (not isinstance(ts, Tensor) or ts.dim() != 1 or ts.is_floating_point()
                or ts.is_complex() or ts.dtype == torch.bool):
            raise ValueError(f"{what}: task_sizes must be a 1-D tensor of positive ints")
        if ts.device.type == "meta":
            return          # no values to check (a model built on the meta device)
        if bool((ts <= 0).any()):
            raise ValueError(f"{what}: task_sizes must be a 1-D tensor of positive ints")
        n = self._frozen_count(fk) + k.shape[0]
        if int(ts.sum()) != n:
            raise ValueError(f"{what}: task sizes {ts.tolist()} do not add up to the {n} atoms")
        if k.shape[0] and int(ts[-1]) != k.shape[0]:
            raise ValueError(f"{what}: the last task has {int(ts[-1])} atoms but "
                             f"{k.shape[0]} are trainable")

    @torch.no_grad()
    def _set_bank(self, *, frozen_keys: Tensor | None = None, frozen_values: Tensor | None = None,
                  keys: Tensor | None = None, values: Tensor | None = None,
                  task_sizes: Tensor | None = None) -> None:
        """Replace the given bank tensors (None: keep), the only writer of the bank.

        The new bank (given tensors plus the kept ones) is checked first (see
        :meth:`_check_bank`): a ``ValueError`` leaves the layer unchanged. Tensors are
        taken as they are (no copy, no cast), except ``keys`` / ``values`` of the current
        parameter's shape, dtype and device, which are copied into it: the Parameter object
        stays, so an optimiser built before a checkpoint is loaded still trains the layer
        (it stepped orphaned tensors when they were replaced). Others become new
        ``nn.Parameter`` objects with the current ``requires_grad``. Every value derived
        from the bank (cast copies, Gram matrix, scales) is dropped.
        """
        given = {"frozen_keys": frozen_keys, "frozen_values": frozen_values, "keys": keys,
                 "values": values, "task_sizes": task_sizes}
        bank = {f: getattr(self, f) if t is None else t for f, t in given.items()}
        self._check_bank(bank)
        for f in self.BANK_FIELDS:
            t, cur = given[f], getattr(self, f)
            if t is None or t is cur:
                continue
            if f in ("keys", "values"):
                if (not _is_dtensor(cur) and t.shape == cur.shape and t.dtype == cur.dtype
                        and t.device == cur.device):
                    with torch.no_grad():
                        cur.copy_(t)     # the same Parameter: an optimiser built before keeps it
                else:
                    setattr(self, f, nn.Parameter(t.detach(), requires_grad=cur.requires_grad))
            else:
                setattr(self, f, t.detach())
        self._caches.clear()

    # ---- the task lifecycle --------------------------------------------------------------

    @torch.no_grad()
    def _check_finite_atoms(self, name: str | None = None) -> tuple[Tensor, Tensor] | None:
        """Raise ``ValueError`` if a trainable atom about to be frozen is not finite (its key,
        or its value with the scale baked in). One inf/NaN atom would make every token's
        norm non-finite, so it never enters the bank; the check runs before any change.
        Returns the trainable ``(keys, values)`` whole (gathered once when sharded), or
        None when there are none."""
        what = name or f"MoRAMLinear({self.in_features} -> {self.out_features})"
        if not self.keys.shape[0]:
            return None
        keys, values = _full(self.keys).detach(), _full(self.values).detach()
        for tensor, t in (("keys", keys), ("values", values * self.scaling)):
            ids = _nonfinite_atoms(t)
            if ids:
                raise ValueError(
                    f"layer {what}: trainable atom(s) {ids[:20]}{' ...' if len(ids) > 20 else ''} "
                    f"have non-finite {tensor}{' (scale alpha/r baked in)' if tensor == 'values' else ''}; "
                    "they would poison every token's norm, so add_task() refuses to freeze them "
                    "(the layer is unchanged)")
        return keys, values

    @torch.no_grad()
    def add_task(self) -> None:
        """Freeze every atom (baking in its scale) and start ``r`` fresh trainable atoms:
        keys Kaiming-uniform (as ``nn.Linear`` initialises weights), values zero.

        From the second task on, ``keys`` / ``values`` keep their shape ``[r, ...]``: they
        are copied into the frozen bank and then re-initialised *in place*, so the very same
        ``nn.Parameter`` objects stay registered and a DDP / FSDP2 wrapper or an optimiser
        built around them stays attached (clear the optimiser's state for them:
        ``mk.add_task(model, optimizer=...)``). The first task (0 -> r atoms) creates them.

        Under an initialised ``torch.distributed`` process group this is a collective call
        (every rank must make it): the new keys are broadcast from rank 0 (from the first
        rank of the bank's group when it is sharded over one), so every rank holds the same
        atoms whatever its RNG state. FSDP2-sharded parameters (DTensors) are
        gathered in full for the frozen bank and written back shard by shard.

        A non-finite trainable atom raises ``ValueError`` and changes nothing. Atoms whose
        values are all still zero (never trained: a second ``add_task`` before any optimiser
        step) are frozen as asked, with a ``UserWarning``: such atoms add nothing to the
        output but take top-K places and softmax weight from trained ones.
        """
        old = self._check_finite_atoms()    # the current task's (keys, values), whole
        if old is not None and not bool(old[1].any()):
            warnings.warn(
                f"MoRAMLinear.add_task: the current task's {self.keys.shape[0]} trainable atoms "
                "were never trained (their values are all still zero); freezing them adds atoms "
                "that contribute nothing but take top-K places and softmax weight from the "
                "trained ones. Train the task before add_task() (ignore this if intended).",
                UserWarning, stacklevel=3)  # past torch.no_grad's wrapper, to the caller
        keys = torch.empty(self.r, self.in_features, dtype=self.keys.dtype,
                           device=_local(self.keys).device)
        nn.init.kaiming_uniform_(keys, a=math.sqrt(5))
        _broadcast_from_rank0(keys, self._bank_group())
        in_place = self.keys.shape[0] == self.r and self.values.shape[0] == self.r
        bank = {"task_sizes": torch.cat([self.task_sizes, self.task_sizes.new_tensor([self.r])])}
        if not in_place:
            bank["keys"] = keys
            bank["values"] = torch.zeros(self.r, self.out_features, dtype=self.values.dtype,
                                         device=keys.device)
        if old is not None:
            self._append_frozen(old[0], old[1] * self.scaling, **bank)
        else:
            self._set_bank(**bank)
        if in_place:    # after the frozen bank took the old values
            _assign_full(self.keys, keys)
            _assign_full(self.values, torch.zeros_like(keys[:, :1]).expand(-1, self.out_features))

    def _bank_group(self):
        """The process group whose ranks hold this bank (None: the world); ``add_task``
        broadcasts the new keys within it."""
        return None

    @torch.no_grad()
    def _append_frozen(self, keys: Tensor, values: Tensor, **bank: Tensor) -> None:
        """Append atoms to the frozen bank (``values`` already scaled), together with the
        other changes ``bank`` (``_set_bank`` arguments, e.g. the task sizes), in one
        :meth:`_set_bank` call: the bank is never seen half-changed."""
        fk, fv = self.frozen_keys, self.frozen_values
        self._set_bank(frozen_keys=torch.cat([fk, keys.to(fk)]),
                       frozen_values=torch.cat([fv, values.to(fv)]), **bank)

    # ---- values derived from the bank, cached ----------------------------------------------

    def _frozen_bank(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(frozen_keys, frozen_values)`` in ``dtype``, cast once and cached.

        Under autocast or with low-precision activations the bank is read in the compute
        dtype on every call; without this cache each call would first cast the whole bank
        (134 MB of fp32 keys at d_in = 4096, N = 8192). The cache holds one dtype and is
        rebuilt when either buffer is replaced or modified in place (tensor version).
        """
        fk, fv = self.frozen_keys, self.frozen_values
        if fk.dtype == dtype and fv.dtype == dtype:
            return fk, fv
        if torch.compiler.is_compiling() or fk.is_inference() or fv.is_inference():
            return fk.to(dtype), fv.to(dtype)   # no version counter to key a cache on
        return self._caches.bank.get((fk, fv), dtype, _cast_pair, fk, fv, dtype)

    def _frozen_gram(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """``frozen_keys^T frozen_keys`` (accumulated in fp32, stored in ``dtype``, the
        compute dtype, so the backward never re-casts it), cached, when it pays to use it.

        The backward's dense normalisation term over the frozen atoms is either
        ``-alpha * P0 A0`` (recompute ``P0 = x A0^T``: 2·T·N_f·d_in) or ``-alpha * x G0``
        (T·d_in^2 with ``G0`` cached). ``G0`` is worth its d_in^2 floats of memory only
        when the frozen bank is at least as big (N_f >= d_in); below that, backends
        recompute.
        """
        fk = self.frozen_keys
        if fk.shape[0] < self.in_features or torch.compiler.is_compiling():
            return None

        return self._caches.gram.get((fk,), dtype, _gram, fk, dtype)

    def _trainable_scale(self, n1: int, x: Tensor) -> Tensor | None:
        """The ``[r]`` scale of the trainable values (``alpha / r``), or None when it is 1;
        made once per (size, value, device, dtype), not on every call."""
        scaling = self.scaling
        if scaling == 1.0 or not n1:
            return None
        dtype = acc_dtype(x.dtype)
        if torch.compiler.is_compiling():
            return torch.full((n1,), scaling, device=x.device, dtype=dtype)
        return self._caches.scale.get((), (n1, scaling, x.device, dtype), _scale_vector,
                                      n1, scaling, x.device, dtype)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:      # before the base layer's own, less clear error
            raise ValueError(f"x has d_in = {x.shape[-1]}, this layer takes {self.in_features}")
        ddp = ACTIVE_DDP._active_ddp_module
        if ddp is not None:
            self._check_ddp(ddp)
        y, owned = base_forward_owned(self.base_layer, x)   # base(x), or its fp32 road (_base_road)
        # each module attribute read once: nn.Module's lookups cost about a µs apiece
        fk, fv, keys, values = self.frozen_keys, self.frozen_values, self.keys, self.values
        if fk.shape[0] + keys.shape[0] == 0:
            return y
        scale1 = self._trainable_scale(keys.shape[0], x)
        need_grad = torch.is_grad_enabled() and keys.requires_grad
        training = self.training
        delta = 0.0 if training else self.delta      # the threshold is an eval-time rule
        xd = self.adapter_dropout(x) if training else x   # dropout is the identity in eval
        # autocast-aware like nn.Linear: the adapter computes in the autocast dtype (or the
        # lowest of x's and the atoms'), reading a cached copy of the frozen bank
        cd, _ = call_dtypes(x, (fk.dtype, keys.dtype, fv.dtype, values.dtype))
        if fk.dtype is not cd or fv.dtype is not cd:
            fk, fv = self._frozen_bank(cd)
        d, idx = moram_segments(
            xd, fk, fv, None,
            keys, values, scale1, k=self.k, tau=self.tau, delta=delta, eps=self.eps,
            gram0=self._frozen_gram(cd) if need_grad else None, backend=self.backend)
        if self.usage_counts is not None and idx is not None:
            self._count_usage(idx)
        # into the base layer's fresh output when nothing else holds it (one [T, d_out] less)
        return y.add_(d.to(y.dtype)) if owned else y + d.to(y.dtype)

    def _check_ddp(self, ddp) -> None:
        """At this layer's first forward under the DDP wrapper ``ddp``: every frozen bank
        of the wrapped model goes on DDP's list of what it leaves alone (a model built by
        hand, or a layer injected after wrapping, was not on it: the bank was broadcast
        once, identical, and is not again). A sharded bank that was not on it has just been
        overwritten by rank 0's slice: refused (see :func:`_keep_frozen_banks_out_of_ddp`)."""
        if self.__dict__.get("_ddp_seen") == id(ddp):
            return
        names = _frozen_bank_names(ddp.module)
        lost = sorted({n.rpartition(".")[0] or "<root>" for n, layer in names.items()
                       if n not in ddp.parameters_to_ignore
                       and getattr(layer, "_bank_shard", None) is not None})
        if lost:
            raise RuntimeError(
                f"DistributedDataParallel broadcast rank 0's slice of the sharded bank of layers "
                f"{lost[:5]} over the other ranks' (DDP reads the names to leave alone from the "
                "module it wraps, once, when it is built, and they were not there). The slices "
                "of ranks > 0 are lost: rebuild the bank, then call "
                "moram_kernels.distributed.shard_bank on the module DDP wraps (or on the DDP "
                "wrapper itself), not only on a submodule")
        _ddp_ignore(ddp, list(names))
        if getattr(self, "_bank_shard", None) is None:
            self._check_ranks_hold_one_bank(ddp)
        self.__dict__["_ddp_seen"] = id(ddp)

    def _check_ranks_hold_one_bank(self, ddp) -> None:
        """DDP leaves a replicated frozen bank alone (it never copies rank 0's, see
        :meth:`_check_ddp`), so the ranks must already hold the same one: a checkpoint loaded
        on rank 0 only would otherwise train a different model on every rank, silently. One
        all-gather, at this layer's first forward under ``ddp``, of the bank's sizes and a
        hash of its bits; where the ranks differ every rank raises, naming the layer."""
        group = getattr(ddp, "process_group", None)
        fields = [_local(getattr(self, f)) for f in self.BANK_FIELDS]
        dev = fields[0].device
        facts = torch.stack([torch.tensor(self.frozen_keys.shape[0], device=dev),
                             torch.tensor(self.keys.shape[0], device=dev)]
                            + [_checksum_t(t).to(dev) for t in fields])
        every = _all_gather(facts, group, "MoRAMLinear: the ranks' banks under DDP").cpu()
        if bool((every == every[0]).all()):
            return
        name = next((n for n, m in ddp.module.named_modules() if m is self), "") or "<root>"
        differ = [r for r in range(every.shape[0]) if not bool((every[r] == every[0]).all())]
        raise RuntimeError(
            f"MoRAMLinear {name!r}: rank(s) {differ} hold another bank than rank 0 (atoms frozen / "
            f"trainable by rank: {every[:, :2].tolist()}; equal sizes mean other values). Under "
            "DistributedDataParallel the frozen bank is never copied from rank 0, so every rank "
            "must load the same checkpoint (or build the same bank) before the first forward")

    # ---- atom-usage statistics -------------------------------------------------------------

    def start_usage(self) -> None:
        """Start (or restart from zero) counting how often each atom is in a token's top-K."""
        self.usage_counts = torch.zeros(self.num_atoms, dtype=torch.long,
                                        device=self.frozen_keys.device)

    def stop_usage(self) -> None:
        self.usage_counts = None

    @torch.no_grad()
    def _count_usage(self, idx: Tensor) -> None:
        # top-K selections, before the eval-time threshold; the counter grows with the bank.
        # Sizes come from the bank, never from the data, so this traces under torch.compile.
        n = self.num_atoms
        if self.usage_counts.shape[0] < n:
            self.usage_counts = torch.cat([self.usage_counts, self.usage_counts.new_zeros(
                n - self.usage_counts.shape[0])])
        flat = idx.reshape(-1).to(self.usage_counts.device)
        self.usage_counts.index_add_(0, flat, torch.ones_like(flat))

    # ---- state_dict: shapes grow with tasks, so loading resizes first ----------------------

    _HYPER = ("r", "k", "tau", "alpha", "eps")   # what the atoms mean; checked on load

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if meta is not None:
            meta.setdefault(prefix[:-1], {})["moram"] = {h: getattr(self, h) for h in self._HYPER}

    def _hyper_mismatch(self, local_metadata, prefix: str) -> str | None:
        """Why a state dict saved with this metadata cannot be loaded (other
        hyper-parameters), or None."""
        saved = (local_metadata or {}).get("moram")
        if saved is None:
            return None
        diff = {h: (saved[h], getattr(self, h)) for h in self._HYPER
                if h in saved and saved[h] != getattr(self, h)}
        if not diff:
            return None
        return (f"MoRAMLinear {prefix[:-1] or '(root)'}: the state dict was saved with other "
                f"hyper-parameters, as (saved, this layer): {diff}; build the layer with the "
                "saved ones (this layer was left unchanged)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        problem = self._hyper_mismatch(local_metadata, prefix)
        if problem:
            error_msgs.append(problem)
            return
        # A sharded layer's state dict holds its frozen bank as DTensors (each rank's
        # rows): gathered whole here, which works while every rank of its group loads
        gathered = {}
        for name in self.BANK_FIELDS:
            t = state_dict.get(prefix + name)
            if _is_dtensor(t):
                try:
                    gathered[prefix + name] = _full(t)
                except Exception as e:  # noqa: BLE001  (no process group, a missing rank, ...)
                    error_msgs.append(
                        f"MoRAMLinear {prefix[:-1] or '(root)'}: {name} is a sharded bank (a "
                        f"DTensor) that could not be gathered here ({type(e).__name__}: {e}); "
                        "load it on every rank of its group, or through "
                        "torch.distributed.checkpoint (this layer was left unchanged)")
                    return
        if gathered:
            state_dict = {k: gathered.get(k, v) for k, v in state_dict.items() if k.startswith(prefix)}
        # atoms must be finite as this layer will hold them (an fp32 value may overflow its
        # fp16): one inf/NaN atom makes every token's output non-finite, as add_task and
        # load_moram refuse too
        for name in ("frozen_keys", "frozen_values", "keys", "values"):
            t, cur = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(t, Tensor) and t.dim() == 2 and t.is_floating_point():
                ids = _nonfinite_atoms(t, cur.dtype)
                if ids:
                    error_msgs.append(
                        f"MoRAMLinear {prefix[:-1] or '(root)'}: {name} has non-finite atom(s) "
                        f"{ids[:20]} (in {cur.dtype}); refusing to load (this layer was left unchanged)")
                    return
        # the bank takes the state dict's shapes (and task sizes) first, checked as a whole;
        # a tensor that is missing or of another kind is left to the errors of super()
        bank = {}
        for name in self.BANK_FIELDS:
            t, cur = state_dict.get(prefix + name), getattr(self, name)
            if not (isinstance(t, Tensor) and t.dim() == cur.dim() and t.shape[1:] == cur.shape[1:]):
                continue
            if isinstance(cur, nn.Parameter) and t.shape == cur.shape:
                continue    # copied in place below: the same parameter object stays
            bank[name] = t.detach().to(device=cur.device, dtype=cur.dtype, copy=True)
        if bank:
            try:
                self._set_bank(**bank)
            except ValueError as e:
                error_msgs.append(f"MoRAMLinear {prefix[:-1] or '(root)'}: {e} (this layer was "
                                  "left unchanged)")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"N={self.num_atoms}, trainable={self.num_trainable_atoms}, r={self.r}, k={self.k}, "
                f"tau={self.tau}, delta={self.delta}, alpha={self.alpha}")


def _nonfinite_atoms(t: Tensor, dtype: torch.dtype | None = None) -> list[int]:
    """Rows of the atoms ``t`` with an inf/NaN element, once cast to ``dtype`` (a layer's
    own dtype: a finite fp32 value may overflow its fp16); [] when every atom is finite."""
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return (~torch.isfinite(t).all(dim=1)).nonzero().flatten().tolist()


# ---- DistributedDataParallel leaves the frozen banks alone --------------------------------------

_FROZEN_FIELDS = ("frozen_keys", "frozen_values")


def _frozen_bank_names(model: nn.Module) -> dict[str, MoRAMLinear]:
    """``{"<layer>.frozen_keys": layer, "<layer>.frozen_values": layer, ...}`` for every
    ``MoRAMLinear`` of ``model``, names relative to ``model``."""
    return {f"{n}.{f}" if n else f: m for n, m in model.named_modules()
            if isinstance(m, MoRAMLinear) for f in _FROZEN_FIELDS}


def _keep_frozen_banks_out_of_ddp(model: nn.Module) -> None:
    """Put the frozen bank of every ``MoRAMLinear`` of ``model`` on DistributedDataParallel's
    list of what it neither broadcasts nor all-reduces. ``model`` is the module DDP wraps
    (or will wrap), or a DDP wrapper (whose live list is updated too).

    Replicated, the bank is the same on every rank by construction (``add_task`` broadcasts
    the new keys, DDP keeps the trainable atoms in step, ``load_moram`` reads one file), so
    DDP's buffer broadcast from rank 0 before every training forward would move the whole
    bank for nothing; sharded, each rank holds its own slice, which must not be
    overwritten. ``mk.inject``, ``mk.add_task``, ``shard_bank`` and a ``MoRAMLinear`` itself
    (for DDP wrapping the layer alone) call this on the module they are given."""
    inner = model.module if isinstance(model, _ddp_class()) else model
    _ddp_ignore(model, list(_frozen_bank_names(inner)))
