"""MoRAM as a stock Hugging Face PEFT method (``peft`` is an optional dependency).

Importing this module registers the method with ``peft``::

    import peft
    import moram_kernels as mk
    from moram_kernels.integrations.peft import MoRAMPeftConfig

    model = peft.get_peft_model(base, MoRAMPeftConfig(target_modules=["query", "value"], r=8))
    # the first task exists: train now, as with LoRA
    mk.add_task(model)                     # after a task, to start the next one
    model.save_pretrained(path)
    # in another process: import moram_kernels.integrations.peft first, then
    model = peft.PeftModel.from_pretrained(base, path)

**Tasks.** A MoRAM adapter is trainable as soon as ``get_peft_model`` (or ``add_adapter``)
returns: creating an adapter starts its first task (``r`` fresh atoms per layer, values
zero, so the model still computes what the base model computes). ``mk.add_task(model)``
ends the current task of the *active* adapter(s) (their atoms are frozen) and starts the
next one in the same parameter objects, so an optimiser built at the start stays attached
(pass it, ``mk.add_task(model, optimizer=opt)``, to drop its stale moments). Loading
(``PeftModel.from_pretrained``, ``load_adapter``) restores the saved tasks exactly and
starts none.

A process that has not imported this module does not know the method: ``peft`` fails with
``KeyError: 'MORAM'`` (a lookup in its table of methods), and there is no way to give a
clearer message without changing ``peft`` itself. Each wrapped layer keeps the original
layer as ``base_layer`` and, per adapter, a :class:`~moram_kernels.MoRAMLinear`
(``moram_bank[adapter]``) that computes only the MoRAM delta: the same layer and kernels as
:func:`moram_kernels.inject`.

The atoms' sizes grow with tasks, and PEFT builds the layers from the config before it
loads the weights, so the config carries ``bank_sizes`` (per layer: atoms per task and
trainable atoms). Every adapter gets its own copy of the config it was created with (one
config object may serve several adapters; the caller's object is never changed), and its
``bank_sizes`` is refreshed from that adapter's layers each time its tensors are collected
for saving (``save_pretrained``, ``peft.get_peft_model_state_dict``). A config that
carries ``bank_sizes`` builds banks of those sizes for the saved atoms to be loaded into;
to start a *new* adapter from a saved config, clear it first (``config.bank_sizes = {}``).

Mixed-adapter batches work as with LoRA: ``model(x, adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])`` take one adapter name per row (``"__base__"``
for the base model), in eval mode; each layer runs each adapter once, on its rows.

MoRAM is non-linear in its atoms, so it cannot be merged into the base weight nor two
adapters into one: ``merge_and_unload()``, ``merge_adapter()``, ``unmerge_adapter()``,
``add_weighted_adapter()`` and ``subtract_mutated_init()`` raise ``ValueError`` saying so;
``unload()`` gives the base model back.
"""

from __future__ import annotations

import contextlib
import copy
import enum
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from .._base_road import base_forward
from ..nn import MoRAMLinear, _is_conv1d, _linear_dims, _NoBase
from .model import MoRAMConfig

try:
    import peft as _peft
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
except ImportError as e:      # pragma: no cover - exercised only without peft
    raise ImportError("moram_kernels.integrations.peft needs the `peft` package "
                      "(pip install 'moram_kernels[peft]')") from e

__all__ = ["MoRAMPeftConfig", "MoRAMPeftLayer", "MoRAMPeftModel", "MORAM", "PREFIX", "BASE"]

PREFIX = "moram_"
#: The name that stands for the base model in ``adapter_names`` (as in PEFT's LoRA).
BASE = "__base__"
_MERGE_ERROR = ("MoRAM cannot be merged into the base weight: its output is a top-k softmax "
                "mixture of its atoms, not a linear map. Keep the adapter (or use unload() to "
                "drop it and get the base model back)")
_WEIGHTED_ERROR = ("MoRAM adapters cannot be combined into one weighted adapter "
                   "(add_weighted_adapter): each is a bank of rank-1 atoms behind a top-k softmax, "
                   "so a weighted sum of two banks does not compute the weighted sum of their "
                   "outputs. Run them side by side instead: model(x, adapter_names=[...]) picks an "
                   "adapter per row")
_MUTATED_INIT_ERROR = ("subtract_mutated_init converts LoRA adapters whose initialisation changed "
                       "the base weights (PiSSA, OLoRA, CorDA); MoRAM never changes the base "
                       "weights, so there is nothing to convert")


class MoRAMPeftType(str, enum.Enum):
    """PEFT keys its tables by ``PeftType`` values; this str-enum member compares and hashes
    as the string ``"MORAM"``, which is what an adapter_config.json stores."""

    MORAM = "MORAM"


MORAM = MoRAMPeftType.MORAM


@dataclass
class MoRAMPeftConfig(PeftConfig, MoRAMConfig):
    """A ``peft.PeftConfig`` with the fields of :class:`~moram_kernels.MoRAMConfig`
    (``target_modules``, ``r``, ``k``, ``tau``, ``delta``, ``dropout``, ``alpha``, ``eps``)
    plus ``bank_sizes``, filled in when saving (leave it empty for a new adapter)."""

    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bank_sizes: dict[str, dict] = field(
        default_factory=dict,
        metadata={"help": "per layer name: {'task_sizes': [...], 'trainable': n}; set by saving"})

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        MoRAMConfig.__post_init__(self)      # validates target_modules
        self.peft_type = MORAM


def _tuned_model(model: nn.Module) -> nn.Module:
    """The model whose module names key ``bank_sizes``: the one PEFT injected into (inside
    a ``PeftModel``, its ``base_model.model``; a transformers model with loaded adapters is
    its own)."""
    if isinstance(model, BaseTuner):
        return model.model
    inner = model._modules.get("base_model")
    return inner.model if isinstance(inner, BaseTuner) else model


def _bank_sizes(model: nn.Module, adapter: str) -> dict[str, dict]:
    return {name: {"task_sizes": m.moram_bank[adapter].task_sizes.tolist(),
                   "trainable": m.moram_bank[adapter].num_trainable_atoms}
            for name, m in _tuned_model(model).named_modules()
            if isinstance(m, MoRAMPeftLayer) and adapter in m.moram_bank}


def _size_bank(bank: MoRAMLinear, sizes: dict, name: str) -> None:
    """Give an empty bank the shapes recorded in the config (values follow at load time)."""
    ts = [int(t) for t in sizes.get("task_sizes", [])]
    n_tr = int(sizes.get("trainable", 0))
    if any(t <= 0 for t in ts) or not 0 <= n_tr <= sum(ts) or (n_tr and ts[-1] != n_tr):
        raise ValueError(f"bank_sizes[{name!r}] = {sizes} is inconsistent")
    n_fr = sum(ts) - n_tr
    bank._set_bank(frozen_keys=bank.frozen_keys.new_zeros(n_fr, bank.in_features),
                   frozen_values=bank.frozen_values.new_zeros(n_fr, bank.out_features),
                   keys=bank.keys.new_zeros(n_tr, bank.in_features),
                   values=bank.values.new_zeros(n_tr, bank.out_features),
                   task_sizes=torch.tensor(ts, dtype=torch.long, device=bank.task_sizes.device))


class _AdapterRows(list):
    """``adapter_names``, one per row, that computes each adapter's row indices once (per
    device) for every layer and decoding step that sees it."""

    def __init__(self, names):
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), one per row, "
                            f"got {names!r}")
        super().__init__(names)
        self._groups: dict[torch.device, list[tuple[str, Tensor]]] = {}

    def groups(self, device: torch.device) -> list[tuple[str, Tensor]]:
        """``[(adapter, row indices)]`` in order of first appearance."""
        if device not in self._groups:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self):
                rows.setdefault(name, []).append(i)
            self._groups[device] = [(a, torch.tensor(r, dtype=torch.long, device=device))
                                    for a, r in rows.items()]
        return self._groups[device]


def _adapter_names_hook(module, args, kwargs, rows):
    kwargs["adapter_names"] = rows
    return args, kwargs


class MoRAMPeftLayer(nn.Module, BaseTunerLayer):
    """``base_layer(x) + sum over active adapters of moram_bank[adapter](x)``."""

    adapter_layer_names = ("moram_bank",)
    other_param_names = ()
    _moram_owns_banks = True     # mk.add_task() calls this layer's add_task, not its banks'

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoRAMPeftConfig,
                 name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.moram_bank = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _linear_dims(base_layer)
        self.update_layer(adapter_name, config, name)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: MoRAMPeftConfig, name: str = "") -> None:
        """Add a bank for ``adapter_name``: sized from ``config.bank_sizes`` when the config
        carries them (PEFT loads the saved atoms into it next), else a new adapter whose
        first task starts now."""
        w = self.get_base_layer().weight
        bank = MoRAMLinear(_NoBase(self.in_features, self.out_features, w.dtype, w.device),
                           **config.layer_kwargs())
        if config.bank_sizes:
            if name not in config.bank_sizes:
                raise ValueError(f"the config's bank_sizes has no entry for layer {name!r}: it was "
                                 "saved from a model whose MoRAM layers differ from this one's")
            _size_bank(bank, config.bank_sizes[name], name)
        else:
            bank.add_task()
        self.moram_bank[adapter_name] = bank
        self.set_adapter(self.active_adapters)

    # ---- what MoRAMLinear reports, for the active adapter(s) -------------------------------

    def _active_banks(self) -> list[MoRAMLinear]:
        return [self.moram_bank[a] for a in self.active_adapters if a in self.moram_bank]

    @property
    def num_atoms(self) -> int:
        return sum(b.num_atoms for b in self._active_banks())

    @property
    def num_trainable_atoms(self) -> int:
        return sum(b.num_trainable_atoms for b in self._active_banks())

    def add_task(self) -> None:
        """``add_task()`` on the bank of every active adapter."""
        banks = self._active_banks()
        if not banks:
            raise ValueError("no active MoRAM adapter on this layer")
        for b in banks:
            b.add_task()

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(_MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(_MERGE_ERROR)

    def forward(self, x: Tensor, *args, adapter_names=None, **kwargs) -> Tensor:
        # a plain frozen nn.Linear base takes the CPU's fp32 road for bf16/fp16 where the CPU
        # has no unit for them (moram_kernels/_base_road.py); anything else is called as is
        y = base_forward(self.base_layer, x) if not args and not kwargs else self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        if adapter_names is not None:
            return self._mixed_batch_forward(x, y, adapter_names)
        for bank in self._active_banks():
            if bank.num_atoms:
                y = y + bank(x).to(y.dtype)
        return y

    def _mixed_batch_forward(self, x: Tensor, y: Tensor, adapter_names) -> Tensor:
        """``y`` (the base output) plus, on each row of ``x``, the delta of the adapter
        named for that row: one call per adapter, on its rows only."""
        rows = adapter_names if isinstance(adapter_names, _AdapterRows) else _AdapterRows(adapter_names)
        if x.dim() < 2 or x.shape[0] != len(rows):
            raise ValueError(f"adapter_names names {len(rows)} rows but this layer's input has "
                             f"{x.shape[0] if x.dim() else 0} (shape {tuple(x.shape)}): give one "
                             "adapter name per row of the batch")
        groups = rows.groups(x.device)
        for adapter, idx in groups:
            bank = self.moram_bank[adapter] if adapter in self.moram_bank else None
            if bank is None or not bank.num_atoms:    # "__base__", or not adapted here
                continue
            if len(groups) == 1:
                return y + bank(x).to(y.dtype)
            y = y.index_add(0, idx, bank(x.index_select(0, idx)).to(y.dtype))
        return y

    def __repr__(self) -> str:
        return "moram." + super().__repr__()


class MoRAMPeftModel(BaseTuner):
    """The PEFT tuner: wraps every matching ``nn.Linear`` / ``Conv1D`` in a
    :class:`MoRAMPeftLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = MoRAMPeftLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Each adapter gets its own config: its bank_sizes are its own (refreshed on save),
        # whoever else holds the object the caller passed.
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, *, parameter_name=None, **kwargs) -> None:
        if parameter_name is not None:
            raise ValueError("MoRAM adapts modules, not parameters (target_parameters)")
        if isinstance(target, MoRAMPeftLayer):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        if not (isinstance(target, nn.Linear) or _is_conv1d(target)):
            raise TypeError(f"MoRAM wraps nn.Linear and transformers' Conv1D; {current_key!r} is "
                            f"a {type(target).__name__}")
        new = MoRAMPeftLayer(target, adapter_name, peft_config, current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names):
        # PEFT and transformers collect an adapter's tensors right before they write its
        # adapter_config.json: the moment to record its current bank sizes.
        if isinstance(config, MoRAMPeftConfig):
            config.bank_sizes = _bank_sizes(model, adapter_name)
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict,
                                               unwanted_adapter_names)

    # ---- mixed-adapter batches ---------------------------------------------------------------

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """While ``forward`` / ``generate`` runs with ``adapter_names=[...]``, hand the names
        to every MoRAM layer (PeftModel enters this around the call)."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names (a mixed-adapter batch) is for inference; call "
                             "model.eval() first")
        rows = _AdapterRows(names)
        layers = [m for m in self.model.modules() if isinstance(m, MoRAMPeftLayer)]
        known = {a for m in layers for a in m.moram_bank}
        unknown = sorted(set(rows) - known - {BASE})
        if unknown:
            raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; this model has "
                             f"{sorted(known)} (and {BASE!r} for the base model)")
        # generate() repeats each row num_beams / num_return_sequences times (decoder side)
        expand = max(int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1))
        expanded = _AdapterRows([n for n in rows for _ in range(expand)]) if expand > 1 else rows
        encoder = set()
        if expand > 1 and getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            encoder = {id(m) for m in self.model.get_encoder().modules()}
        handles = [m.register_forward_pre_hook(
                       partial(_adapter_names_hook, rows=rows if id(m) in encoder else expanded),
                       with_kwargs=True)
                   for m in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---- what MoRAM cannot do ----------------------------------------------------------------

    def _check_merge_allowed(self):
        """PEFT asks this first in merge_and_unload() and merge_adapter() (and each layer's
        merge() / unmerge() refuses too)."""
        raise ValueError(_MERGE_ERROR)

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise ValueError(_WEIGHTED_ERROR)

    def subtract_mutated_init(self, *args, **kwargs):
        raise ValueError(_MUTATED_INIT_ERROR)


def _register() -> None:
    """Write the method into peft's tables, as ``peft.register_peft_method`` does for its own
    ``PeftType`` members (which a third-party method cannot add)."""
    from peft import mapping

    if MORAM in mapping.PEFT_TYPE_TO_TUNER_MAPPING:
        return
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[MORAM] = MoRAMPeftConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[MORAM] = MoRAMPeftModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[MORAM] = PREFIX


_register()
del _peft
