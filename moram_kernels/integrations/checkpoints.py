"""Import the MoRAM authors' checkpoints (docs/training.md, "Importing the authors' checkpoints") into injected models.

Two layouts exist, both storing keys as rows ``[N, d_in]`` and values transposed
``[d_out, N]``:

* TRACE (LLMs, a PEFT fork): ``<module>.lora_A[.<adapter>][.weight]`` frozen keys
  ``[N_old, d_in]``, ``loranew_A`` trainable keys ``[r, d_in]``, ``lora_B`` frozen values
  ``[d_out, N_old]``, ``loranew_B`` trainable values ``[d_out, r]``. Their forward scales
  ``loranew_B`` by ``lora_alpha / r`` and the frozen bank by 1.
* X-TAIL (CLIP): ``old_lora_A``, ``lora_A``, ``old_lora_B``, ``lora_B``, all at scale 1.

The frozen bank goes to ``frozen_keys`` / ``frozen_values`` as stored (scale 1) and the
trainable atoms to ``keys`` / ``values``, where the layer applies its ``alpha / r``, so
the imported model computes what the authors' layer computed. One documented
difference remains for *further* training: their end-of-task step appends ``loranew_B``
to the frozen bank without its scaling, whereas :meth:`MoRAMLinear.add_task` bakes the
scaling in, so a frozen atom keeps contributing what it contributed while trained.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from ..nn import MoRAMLinear
from .model import _all_ranks, _check_finite, _check_layer_state, _install, _own_part, moram_layers

__all__ = ["import_trace_state_dict", "import_xtail_state_dict"]

# part name in the checkpoint -> (segment, matrix)
_TRACE = {"lora_A": ("frozen", "A"), "loranew_A": ("new", "A"),
          "lora_B": ("frozen", "B"), "loranew_B": ("new", "B")}
_XTAIL = {"old_lora_A": ("frozen", "A"), "lora_A": ("new", "A"),
          "old_lora_B": ("frozen", "B"), "lora_B": ("new", "B")}


def _parse(state_dict: Mapping[str, Tensor], parts: dict, adapter_name: str | None):
    """Group the adapter tensors by module prefix: ``{prefix: {(segment, matrix): tensor}}``.
    Keys that are not adapter parts (base weights, other adapters) are ignored."""
    alt = "|".join(sorted(parts, key=len, reverse=True))
    pat = re.compile(rf"^(?P<mod>.+)\.(?P<part>{alt})(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
    found: dict[str, dict] = {}
    adapters = set()
    for key, t in state_dict.items():
        m = pat.match(key)
        if m is None:
            continue
        adapter = m["adapter"] if m["adapter"] not in (None, "weight") else None
        adapters.add(adapter)
        if adapter_name is not None and adapter != adapter_name:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        role = parts[m["part"]]
        slot = found.setdefault(m["mod"], {})
        if role in slot:
            raise ValueError(f"{key}: module {m['mod']!r} has this part twice (several adapters? "
                             f"pass adapter_name=; found {sorted(map(str, adapters))})")
        slot[role] = t
    if adapter_name is None and len(adapters) > 1:
        raise ValueError(f"the state dict holds several adapters {sorted(map(str, adapters))}; "
                         "choose one with adapter_name=")
    if not found:
        raise ValueError(f"no tensor of the expected layout ({', '.join(parts)}) in the state "
                         f"dict" + (f" for adapter {adapter_name!r}" if adapter_name else ""))
    return found


def _match_layers(prefixes, layers: dict[str, MoRAMLinear], strict: bool) -> dict[str, str]:
    """Checkpoint module prefix -> model layer name, by equality or suffix at a dot boundary
    either way (checkpoints carry wrappers such as ``base_model.model.``)."""
    mapping: dict[str, str] = {}
    for pre in prefixes:
        cands = [n for n in layers
                 if n == pre or pre.endswith("." + n) or n.endswith("." + pre)]
        if len(cands) != 1:
            raise ValueError(f"checkpoint module {pre!r} matches "
                             f"{'no' if not cands else 'several'} MoRAM layers of the model"
                             + (f": {cands}" if cands else
                                " (inject the same target_modules the authors adapted)"))
        mapping[pre] = cands[0]
    taken = list(mapping.values())
    dup = {n for n in taken if taken.count(n) > 1}
    if dup:
        raise ValueError(f"several checkpoint modules map to the same layer(s) {sorted(dup)}")
    if strict and set(taken) != set(layers):
        raise ValueError(f"the checkpoint has no atoms for the model's layers "
                         f"{sorted(set(layers) - set(taken))[:10]} (strict=False imports the rest)")
    return mapping


def _to_state(pre: str, slot: dict, layer: MoRAMLinear, task_sizes, new_scaling: float | None):
    """Convert one module's tensors to a MoRAMLinear state dict (values as rows)."""
    def pair(seg):
        a, b = slot.get((seg, "A")), slot.get((seg, "B"))
        if (a is None) != (b is None):
            raise ValueError(f"{pre}: the {seg} atoms have only their "
                             f"{'keys (A)' if b is None else 'values (B)'}")
        if a is None:
            return layer.frozen_keys.new_zeros(0, layer.in_features), \
                layer.frozen_values.new_zeros(0, layer.out_features)
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{pre}: {seg} A and B must be 2-D, got {tuple(a.shape)}, {tuple(b.shape)}")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ValueError(f"{pre}: {seg} atoms have A {tuple(a.shape)} and B {tuple(b.shape)}; "
                             f"the layer needs A [N, {layer.in_features}] and "
                             f"B [{layer.out_features}, N]")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{pre}: {seg} A has {a.shape[0]} atoms but B has {b.shape[1]}")
        return a.detach(), b.detach().t()

    fk, fv = pair("frozen")
    k, v = pair("new")
    n_old, n_new = fk.shape[0], k.shape[0]
    if n_new and n_new != layer.r:
        raise ValueError(f"{pre}: the checkpoint trains {n_new} atoms per task but the layer has "
                         f"r = {layer.r}; inject with MoRAMConfig(r={n_new}, ...)")
    if new_scaling is not None and n_new and abs(layer.scaling - new_scaling) > 1e-12 * abs(new_scaling):
        raise ValueError(f"{pre}: the checkpoint scales its trainable values by {new_scaling:g} "
                         f"but the layer by alpha / r = {layer.scaling:g}; inject with "
                         f"MoRAMConfig(alpha={new_scaling * layer.r:g}, r={layer.r}, ...)")
    if task_sizes is None:
        # The checkpoints do not record task boundaries: guess r atoms per past task.
        sizes = [layer.r] * (n_old // layer.r) if n_old % layer.r == 0 else [n_old]
    else:
        sizes = [int(s) for s in task_sizes]
        if sum(sizes) != n_old:
            raise ValueError(f"{pre}: task_sizes {sizes} add up to {sum(sizes)}, but the frozen "
                             f"bank has {n_old} atoms")
    if n_new:
        sizes.append(n_new)
    return {"frozen_keys": fk, "frozen_values": fv, "keys": k, "values": v,
            "task_sizes": torch.tensor(sizes, dtype=torch.long)}


def _import(model, state_dict, parts, *, adapter_name, task_sizes, new_scaling, strict):
    layers = moram_layers(model)
    if not layers:
        raise ValueError("model has no MoRAM layers; inject() it first with the targets the "
                         "checkpoint adapted")

    def checked():
        found = _parse(state_dict, parts, adapter_name)
        mapping = _match_layers(found, layers, strict)
        states = {}
        for pre, slot in found.items():
            name = mapping[pre]
            whole = _to_state(pre, slot, layers[name], task_sizes, new_scaling)
            # a sharded layer keeps this rank's rows, cut for the checkpoint's atoms (every
            # rank checks every atom: each holds the whole checkpoint, and all raise alike)
            st, shard = _own_part(layers[name], whole)
            _check_layer_state(name, layers[name], st, shard)
            if shard is not None:
                _check_finite(name, layers[name], whole)
            states[name] = (st, shard)
        n_frozen = sum(s.n_frozen for _, s in states.values() if s is not None)
        return (found, mapping, states), n_frozen

    # into a sharded model a collective: every rank imports, or none does
    found, mapping, states = _all_ranks(layers, "checkpoint import into a sharded model", checked)[0]
    for name, (st, shard) in states.items():   # only now, with everything checked, change the model
        _install(layers[name], st, shard)
    return {mapping[pre]: pre for pre in found}


def import_trace_state_dict(model, state_dict: Mapping[str, Tensor], *,
                            lora_alpha: float | None = None, adapter_name: str | None = None,
                            task_sizes: list[int] | None = None, strict: bool = True
                            ) -> dict[str, str]:
    """Load a TRACE / PEFT-fork MoRAM state dict (``lora_A``, ``loranew_A``, ``lora_B``,
    ``loranew_B``) into ``model``, already injected with the same targets and with
    ``MoRAMConfig(r=<their r>, alpha=<their lora_alpha>)``.

    ``lora_alpha``: the checkpoint's ``lora_alpha`` (from its adapter config); when given,
    a layer whose ``alpha / r`` differs raises. Without it nothing can check that scale (the
    tensors do not record it), so the import assumes the model's and warns.
    ``task_sizes``: atoms of each past task (the checkpoint does not record them; default r
    per task). ``strict``: every MoRAM
    layer of the model must receive atoms. All checks run before the model changes.
    Returns ``{model layer name: checkpoint module name}``.
    """
    scaling = None
    if lora_alpha is None:
        scales = sorted({layer.scaling for layer in moram_layers(model).values()})
        warnings.warn(
            "import_trace_state_dict: lora_alpha not given, so the checkpoint's scale of its "
            f"trainable values (lora_alpha / r, from its adapter_config.json) is taken to be "
            f"this model's alpha / r = {', '.join(f'{v:g}' for v in scales)}; with another scale "
            "the imported model computes other outputs and nothing can tell. Pass lora_alpha= "
            "to check it.", UserWarning, stacklevel=2)
    else:
        r = {layer.r for layer in moram_layers(model).values()}
        scaling = float(lora_alpha) / r.pop() if len(r) == 1 else None
        if scaling is None:
            raise ValueError("lora_alpha= needs every MoRAM layer to share one r")
    return _import(model, state_dict, _TRACE, adapter_name=adapter_name, task_sizes=task_sizes,
                   new_scaling=scaling, strict=strict)


def import_xtail_state_dict(model, state_dict: Mapping[str, Tensor], *,
                            adapter_name: str | None = None, task_sizes: list[int] | None = None,
                            strict: bool = True) -> dict[str, str]:
    """Load an X-TAIL (CLIP) MoRAM state dict (``old_lora_A``, ``lora_A``, ``old_lora_B``,
    ``lora_B``; every value at scale 1) into ``model``, injected with ``alpha=None`` (or
    ``alpha = r``) and the checkpoint's ``r``. Arguments as :func:`import_trace_state_dict`.
    """
    return _import(model, state_dict, _XTAIL, adapter_name=adapter_name, task_sizes=task_sizes,
                   new_scaling=1.0, strict=strict)
