"""Whole-model integration: inject MoRAM layers, undo it, the task lifecycle, save and load."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..distributed import _NOT_SHARDED, _agree, _models_bank_group, _read_part, _save_sharded, is_sharded
from ..nn import MoRAMLinear, _is_conv1d, _keep_frozen_banks_out_of_ddp, _linear_dims, _nonfinite_atoms

__all__ = ["MoRAMConfig", "InjectionSummary", "inject", "remove", "add_task", "save_moram",
           "load_moram", "moram_layers", "trainable_parameters"]

logger = logging.getLogger("moram_kernels")

#: Everything ``inject`` keeps on the model so that ``remove`` can undo it.
_STATE_ATTR = "_moram_injection"
_FORMAT = "moram_kernels"
_FORMAT_VERSION = "1"
# The per-layer tensors a MoRAM file holds, under "<layer name>.<attr>".
_STATE = MoRAMLinear.BANK_FIELDS
# Config fields that change what a layer computes; target_modules is checked through the
# layer set instead (two specs that pick the same layers are the same model).
_HYPER = ("r", "k", "tau", "delta", "dropout", "alpha", "eps")


@dataclass
class MoRAMConfig:
    """Which linear modules get atoms, and the MoRAM hyper-parameters.

    ``target_modules``: a list of names, each matched against a module's full name by
    suffix at a dot boundary (``"query"`` matches ``encoder.layer.0.attention.self.query``,
    ``"self.query"`` too), or one regex string that must match the full name
    (``re.fullmatch``, e.g. ``r".*layer\\.[3-5]\\..*(query|value)"``).
    ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2) are wrapped; other modules whose
    name matches are skipped.
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    r: int = 16
    k: int = 16
    tau: float = 0.01
    delta: float = 0.2
    dropout: float = 0.0
    alpha: float | None = None
    eps: float = 1e-12

    def __post_init__(self):
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(f"target_modules is not a valid regex: {tm!r} ({e})") from None
        elif isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm):
            self.target_modules = list(tm)
        else:
            raise TypeError("target_modules must be a regex string or a non-empty list of "
                            f"module-name suffixes, got {tm!r}")

    def matches(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def layer_kwargs(self) -> dict:
        return dict(r=self.r, k=self.k, tau=self.tau, delta=self.delta, dropout=self.dropout,
                    alpha=self.alpha, eps=self.eps)


@dataclass
class InjectionSummary:
    """What :func:`inject` wrapped: ``layers`` maps module name -> (kind, d_in, d_out)."""

    layers: dict[str, tuple[str, int, int]]
    frozen_parameters: int        # parameters of the model that inject froze or found frozen
    config: MoRAMConfig

    @property
    def atoms_per_task(self) -> int:
        """Trainable numbers added to the model by each ``add_task``: r (d_in + d_out) a layer."""
        return sum(self.config.r * (d_in + d_out) for _, d_in, d_out in self.layers.values())

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for kind, _, _ in self.layers.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return (f"MoRAM: wrapped {len(self.layers)} modules ({what}); "
                f"{self.frozen_parameters:,} base parameters frozen; "
                f"each task adds {self.atoms_per_task:,} trainable parameters "
                f"(r={self.config.r}, k={self.config.k})")


def moram_layers(model: nn.Module) -> dict[str, MoRAMLinear]:
    """Every ``MoRAMLinear`` in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRAMLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _supported(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def inject(model: nn.Module, config: MoRAMConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` / ``Conv1D`` of ``model`` in a ``MoRAMLinear`` (in
    place) and freeze every other parameter. Returns ``model``.

    The layers start with no atoms, so the model computes exactly what it did; call
    :func:`add_task` before training. What was wrapped is logged and kept as
    ``model.moram_summary`` (an :class:`InjectionSummary`). Raises ``ValueError`` when no
    module matched; :func:`remove` undoes everything.
    """
    if not isinstance(config, MoRAMConfig):
        raise TypeError(f"config must be a MoRAMConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if moram_layers(model) or hasattr(model, _STATE_ATTR):
        raise ValueError("model already has MoRAM layers; inject once (remove() undoes it)")
    targets = [(n, m) for n, m in model.named_modules() if n and _supported(m) and config.matches(n)]
    if not targets:
        names = [n for n, m in model.named_modules() if n and _supported(m)]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"no nn.Linear / Conv1D module matched target_modules="
                         f"{config.target_modules!r}; the model's linear modules end in "
                         f"{suffixes[:30]}" + (" ..." if len(suffixes) > 30 else ""))
    # A module reachable under two names (shared weights) would be wrapped at one place only.
    chosen = {id(m) for _, m in targets}
    for n, m in model.named_modules(remove_duplicate=False):
        if id(m) in chosen and n not in dict(targets):
            raise ValueError(f"module {n!r} is the same object as a target module; MoRAM cannot "
                             "wrap a shared module at one place only")

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:    # building the layers validates the hyper-parameters (and freezes each base)
        wrapped = {name: MoRAMLinear(lin, **config.layer_kwargs()) for name, lin in targets}
    except Exception:
        _restore_requires_grad(model, requires_grad)
        raise
    model.requires_grad_(False)
    for name, layer in wrapped.items():
        _set_submodule(model, name, layer)
    summary = InjectionSummary(
        layers={n: ("Conv1D" if _is_conv1d(m) else "Linear", *_linear_dims(m)) for n, m in targets},
        frozen_parameters=sum(p.numel() for p in model.parameters() if not p.requires_grad),
        config=config)
    setattr(model, _STATE_ATTR, {"requires_grad": requires_grad})
    model.moram_config = config
    model.moram_summary = summary
    _keep_frozen_banks_out_of_ddp(model)     # identical on every rank: DDP need not broadcast them
    logger.info("%s", summary)
    return model


def _restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`inject`: put every original module back (the very same objects, so the
    base weights are untouched), restore each parameter's ``requires_grad`` and drop the
    atoms. Returns ``model``."""
    layers = moram_layers(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is None and not layers:
        raise ValueError("model has no MoRAM layers; nothing to remove")
    for name, layer in layers.items():
        _set_submodule(model, name, layer.base_layer)
    if state is not None:
        _restore_requires_grad(model, state["requires_grad"])
        delattr(model, _STATE_ATTR)
    for attr in ("moram_config", "moram_summary"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def _task_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``add_task()`` starts a task: every ``MoRAMLinear``, except those
    that a wrapping layer (the PEFT layer, which adds the task to its active adapters)
    drives itself."""
    owners = [m for m in model.modules() if getattr(m, "_moram_owns_banks", False)]
    owned = {id(b) for m in owners for b in m.modules() if isinstance(b, MoRAMLinear)}
    return owners + [m for m in model.modules() if isinstance(m, MoRAMLinear) and id(m) not in owned]


def add_task(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Start a new task: ``add_task()`` on every MoRAM layer of ``model`` (freeze the
    current atoms, start ``r`` fresh ones with zero values). ``model`` may be wrapped in
    DDP or sharded with FSDP2, or be a PEFT model.

    The first task creates the trainable parameters: build the optimiser (and wrap the model
    in DDP / FSDP2) after it. Later tasks re-initialise the same parameter objects in place,
    so wrappers and the optimiser stay attached; pass ``optimizer`` to drop its stale state
    (e.g. AdamW moments) for those parameters. Under ``torch.distributed`` every rank must
    call this (the new atoms are broadcast from rank 0).
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    layers = _task_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; call inject() first")
    for name, layer in moram_layers(model).items():    # every layer checked before any changes
        layer._check_finite_atoms(name)
    for layer in layers:
        layer.add_task()
    _keep_frozen_banks_out_of_ddp(model)     # identical on every rank: DDP need not broadcast them
    if optimizer is not None:
        for m in moram_layers(model).values():
            for p in (m.keys, m.values):
                optimizer.state.pop(p, None)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The current task's atoms of every MoRAM layer: what the optimiser should get."""
    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; call inject() first")
    return [p for m in layers.values() for p in (m.keys, m.values) if p.numel()]


# ---- save / load ------------------------------------------------------------------------------

def _config_of(model: nn.Module) -> dict | None:
    cfg = getattr(model, "moram_config", None)
    return asdict(cfg) if cfg is not None else None


def _all_ranks(layers: dict[str, MoRAMLinear], what: str, fn):
    """``fn()``; for a model with a sharded bank a collective in which the ranks of its
    group learn whether every one of them succeeded (and was given the same number of
    frozen atoms, ``fn``'s second result), so that all go on or all raise."""
    group = _models_bank_group(layers)
    if group is _NOT_SHARDED:
        return fn()
    err = res = None
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001  (re-raised below, once every rank has heard of it)
        err = e
    dev = next(iter(layers.values())).frozen_keys.device
    problem = _agree(group, None if err is None else f"{type(err).__name__}: {err}",
                     [-1 if err is not None else res[1]], dev, what)
    if err is not None:
        raise err
    if problem:
        raise RuntimeError(problem)
    return res


def save_moram(model: nn.Module, path) -> None:
    """Write only the MoRAM state to a safetensors file: per layer its frozen and
    trainable atoms and its atoms per task, plus metadata (config, package version,
    layer shapes).

    The file is written beside ``path`` under a temporary name and renamed onto it once
    complete and flushed to disk, so a job killed while saving leaves the previous
    checkpoint at ``path`` whole (and at worst a stray ``.<name>.<random>.tmp.safetensors``).

    A model whose bank is sharded (``mk.distributed.shard_bank``) is saved by a collective:
    every rank of the group calls it, the group's first rank writes the same file, and the
    other ranks send it their rows in bounded pieces (the bank is never gathered).
    """
    from safetensors.torch import save_file

    from .._version import __version__
    from .._io import atomic_path

    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers to save")
    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "version": __version__,
        "config": json.dumps(_config_of(model)),
        "layers": json.dumps({n: {"d_in": l.in_features, "d_out": l.out_features,
                                  "atoms": l.num_atoms, "trainable_atoms": l.num_trainable_atoms,
                                  "task_sizes": l.task_sizes.tolist(),
                                  "hyper": {h: getattr(l, h) for h in _HYPER if h != "dropout"}}
                              for n, l in layers.items()}),
    }
    group = _models_bank_group(layers)
    if group is not _NOT_SHARDED:
        _save_sharded(layers, _STATE, path, meta, group)
        return
    tensors = {f"{name}.{attr}": getattr(layer, attr).detach().contiguous().cpu()
               for name, layer in layers.items() for attr in _STATE}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _own_part(layer: MoRAMLinear, st: dict[str, Tensor]):
    """``(st, None)`` for a plain layer; for a sharded one, this rank's part of the whole
    bank ``st`` and the layout it belongs to."""
    return layer._slice_of(st) if is_sharded(layer) else (st, None)


def _check_layer_state(name: str, layer: MoRAMLinear, st: dict[str, Tensor], shard=None) -> None:
    """Raise ``ValueError`` unless ``st`` is a consistent state for ``layer`` (for a
    sharded layer: this rank's part of a bank laid out as ``shard``)."""
    missing = [a for a in _STATE if a not in st]
    if missing:
        raise ValueError(f"layer {name}: the file lacks {missing}")
    if shard is None:
        layer._check_bank(st, f"layer {name}")
    else:
        layer._check_bank(st, f"layer {name}", shard=shard)
    _check_finite(name, layer, st)


def _check_finite(name: str, layer: MoRAMLinear, st: dict[str, Tensor]) -> None:
    fk, fv, k, v, _ = (st[a] for a in _STATE)
    for a, t in (("frozen_keys", fk), ("frozen_values", fv), ("keys", k), ("values", v)):
        # as the layer will hold it: a finite fp32 value may overflow the layer's fp16
        ids = _nonfinite_atoms(t, getattr(layer, a).dtype)
        if ids:
            raise ValueError(f"layer {name}: {a} has non-finite atom(s) {ids[:20]} (in "
                             f"{getattr(layer, a).dtype}); refusing to load (the model is unchanged)")


@torch.no_grad()
def _install(layer: MoRAMLinear, st: dict[str, Tensor], shard=None) -> None:
    """Replace the layer's atoms by ``st`` (already checked), on its device and dtypes."""
    dev = layer.frozen_keys.device
    bank = {a: st[a].to(dev, getattr(layer, a).dtype, copy=True) for a in _STATE}
    if shard is None:
        layer._set_bank(**bank)
    else:
        layer._set_bank(shard=shard, **bank)
    if layer.usage_counts is not None:
        layer.start_usage()


def _layer_set_error(what: str, have: set[str], want: set[str]) -> ValueError:
    return ValueError(f"{what} do not match the model's MoRAM layers: only in the file "
                      f"{sorted(have - want)[:10]}, only in the model {sorted(want - have)[:10]}")


def load_moram(model: nn.Module, path) -> nn.Module:
    """Restore a :func:`save_moram` file into ``model``, which must have the same MoRAM
    layers and config (``inject`` it first; its number of tasks so far does not matter).

    Everything is checked before anything changes: a mismatch raises ``ValueError`` and
    leaves the model untouched. Atoms take the model's device and dtype. Trainable atoms
    of the layer's current shape are copied into its existing Parameters, so an optimiser
    built before loading keeps training them; when the shape changes (the file's r or a
    layer without a task yet) they become new ``nn.Parameter`` objects, and the optimiser
    must be built after loading.

    Into a model whose bank is sharded this is a collective: every rank of the group calls
    it and reads only its own rows of each frozen bank from the file (cut for the file's
    number of atoms); a failure on any rank raises on every rank, and nothing changes.
    """
    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; inject() it before load_moram()")
    states = _all_ranks(layers, "load_moram into a sharded model",
                        lambda: _read_checked(model, layers, path))[0]
    for name, layer in layers.items():
        _install(layer, *states[name])
    return model


def _read_checked(model: nn.Module, layers: dict[str, MoRAMLinear], path):
    """``({layer: (state, layout)}, frozen atoms read)`` from a save_moram file, every check
    of :func:`load_moram` passed; a sharded layer's state holds only this rank's rows."""
    from safetensors import safe_open

    per_layer: dict[str, dict[str, Tensor]] = {}
    shards: dict = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == _FORMAT and meta.get("format_version") == _FORMAT_VERSION:
                for key in f.keys():
                    name, _, attr = key.rpartition(".")
                    if attr not in _STATE:
                        raise ValueError(f"{path}: unexpected tensor {key!r}")
                    if name in layers:
                        t, shard = _read_part(f, key, layers[name], attr)
                        shards[name] = shard or shards.get(name)
                    else:
                        t = f.get_slice(key)[:0]    # a layer the model lacks: raised below
                    per_layer.setdefault(name, {})[attr] = t
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:   # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a moram_kernels file (metadata format="
                         f"{meta.get('format')!r})")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}; this "
                         f"moram_kernels reads version {_FORMAT_VERSION}")
    try:
        saved_cfg = json.loads(meta.get("config", "null"))
        saved_layers = json.loads(meta.get("layers", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata ({e})") from None

    if set(per_layer) != set(layers):
        raise _layer_set_error("the file's layers", set(per_layer), set(layers))
    if set(saved_layers) != set(per_layer):
        raise ValueError(f"{path}: the metadata's layer list does not match its tensors")

    cfg = _config_of(model)
    if saved_cfg is not None and cfg is not None:
        diff = {h: (saved_cfg.get(h), cfg[h]) for h in _HYPER if saved_cfg.get(h) != cfg[h]}
        if diff:
            raise ValueError(f"the file's MoRAM config differs from the model's, as "
                             f"(file, model): {diff}")
    for name, layer in layers.items():
        hyper = saved_layers[name].get("hyper", {})
        diff = {h: (v, getattr(layer, h)) for h, v in hyper.items() if getattr(layer, h) != v}
        if diff:
            raise ValueError(f"layer {name}: hyper-parameters differ, as (file, model): {diff}")
        if is_sharded(layer) and shards.get(name) is None:
            raise ValueError(f"layer {name}: the file lacks its frozen bank")
        _check_layer_state(name, layer, per_layer[name], shards.get(name))
    states = {n: (per_layer[n], shards.get(n)) for n in layers}
    return states, sum(s.n_frozen for s in shards.values() if s is not None)
