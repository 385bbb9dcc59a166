"""Whole-model integration: inject MoRAM layers, the task lifecycle, save and load."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..nn import MoRAMLinear

__all__ = ["MoRAMConfig", "inject", "add_task", "save_moram", "load_moram", "moram_layers",
           "trainable_parameters"]


@dataclass
class MoRAMConfig:
    """Which ``nn.Linear`` modules get atoms, and the MoRAM hyper-parameters.

    ``target_modules``: names matched against each module's full name, by suffix
    (``"query"`` matches ``encoder.layer.0.attention.self.query``), or a regex string
    matched in full with ``re.fullmatch``.
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    r: int = 16
    k: int = 16
    tau: float = 0.01
    delta: float = 0.2
    dropout: float = 0.0
    alpha: float | None = None
    eps: float = 1e-12

    def matches(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def layer_kwargs(self) -> dict:
        return dict(r=self.r, k=self.k, tau=self.tau, delta=self.delta, dropout=self.dropout,
                    alpha=self.alpha, eps=self.eps)


def moram_layers(model: nn.Module) -> dict[str, MoRAMLinear]:
    """Every ``MoRAMLinear`` in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRAMLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: MoRAMConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in a ``MoRAMLinear`` (in place) and
    freeze every other parameter. Raises if nothing matched. Returns ``model``."""
    if not isinstance(config, MoRAMConfig):
        raise TypeError(f"config must be a MoRAMConfig, got {type(config).__name__}")
    if moram_layers(model):
        raise ValueError("model already has MoRAM layers; inject once")
    targets = [(n, m) for n, m in model.named_modules()
               if n and isinstance(m, nn.Linear) and config.matches(n)]
    if not targets:
        raise ValueError(f"no nn.Linear module matched target_modules={config.target_modules!r}")
    model.requires_grad_(False)
    for name, lin in targets:
        _set_submodule(model, name, MoRAMLinear(lin, **config.layer_kwargs()))
    model.moram_config = config
    return model


def add_task(model: nn.Module) -> None:
    """Start a new task: ``add_task()`` on every ``MoRAMLinear`` of ``model``."""
    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; call inject() first")
    for layer in layers.values():
        layer.add_task()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The current task's atoms of every MoRAM layer: what the optimiser should get."""
    return [p for m in moram_layers(model).values() for p in (m.keys, m.values)]


_STATE = ("frozen_keys", "frozen_values", "keys", "values", "task_sizes")


def save_moram(model: nn.Module, path) -> None:
    """Write only the MoRAM state (atoms of every layer, per-task sizes) and the config to a
    safetensors file."""
    from safetensors.torch import save_file

    from .. import __version__

    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers to save")
    tensors = {f"{name}.{attr}": getattr(layer, attr).detach().contiguous().cpu()
               for name, layer in layers.items() for attr in _STATE}
    cfg = getattr(model, "moram_config", None)
    meta = {
        "format": "moram_kernels",
        "version": __version__,
        "config": json.dumps(asdict(cfg) if cfg is not None else None),
        "layers": json.dumps({n: {"d_in": l.in_features, "d_out": l.out_features,
                                  "atoms": l.num_atoms, "task_sizes": l.task_sizes.tolist()}
                              for n, l in layers.items()}),
    }
    save_file(tensors, str(path), metadata=meta)


def load_moram(model: nn.Module, path) -> nn.Module:
    """Restore a :func:`save_moram` file into ``model``, which must have the same MoRAM
    layers. Everything is checked before anything changes: a mismatch raises
    ``ValueError`` and leaves the model untouched."""
    from safetensors import safe_open

    layers = moram_layers(model)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "moram_kernels":
        raise ValueError(f"{path} is not a moram_kernels file (metadata format={meta.get('format')!r})")
    saved_names = {k.rsplit(".", 1)[0] for k in tensors}
    if saved_names != set(layers):
        raise ValueError(f"the file's MoRAM layers do not match the model's: only in the file "
                         f"{sorted(saved_names - set(layers))}, only in the model "
                         f"{sorted(set(layers) - saved_names)}")
    saved_cfg = json.loads(meta.get("config", "null"))
    cfg = getattr(model, "moram_config", None)
    if saved_cfg is not None and cfg is not None and saved_cfg != asdict(cfg):
        diff = {k: (saved_cfg.get(k), v) for k, v in asdict(cfg).items() if saved_cfg.get(k) != v}
        raise ValueError(f"the file's MoRAM config differs from the model's (file, model): {diff}")
    for name, layer in layers.items():
        fk, fv, k, v, ts = (tensors.get(f"{name}.{a}") for a in _STATE)
        if any(t is None for t in (fk, fv, k, v, ts)):
            raise ValueError(f"layer {name}: the file lacks part of its state")
        if fk.shape[1:] != (layer.in_features,) or k.shape[1:] != (layer.in_features,):
            raise ValueError(f"layer {name}: keys have d_in {fk.shape[1:]}, the layer takes {layer.in_features}")
        if fv.shape[1:] != (layer.out_features,) or v.shape[1:] != (layer.out_features,):
            raise ValueError(f"layer {name}: values have d_out {fv.shape[1:]}, the layer has {layer.out_features}")
        if fk.shape[0] != fv.shape[0] or k.shape[0] != v.shape[0]:
            raise ValueError(f"layer {name}: keys and values hold different numbers of atoms")
        if int(ts.sum()) != fk.shape[0] + k.shape[0]:
            raise ValueError(f"layer {name}: task sizes {ts.tolist()} do not add up to the atoms")
    for name, layer in layers.items():
        layer.load_state_dict({a: tensors[f"{name}.{a}"] for a in _STATE}, strict=False)
    return model
