"""MoRAM as a stock Hugging Face PEFT method (``peft`` is an optional dependency).

Importing this module registers the method with ``peft``::

    import peft
    import moram_kernels as mk
    from moram_kernels.integrations.peft import MoRAMPeftConfig

    model = peft.get_peft_model(base, MoRAMPeftConfig(target_modules=["query", "value"], r=8))
    mk.add_task(model)                     # before training each task
    ...
    model.save_pretrained(path)
    # in another process: import moram_kernels.integrations.peft first, then
    model = peft.PeftModel.from_pretrained(base, path)

A process that has not imported this module does not know the method (``peft`` raises
``Unknown PEFT type``). Each wrapped layer keeps the original layer as ``base_layer`` and,
per adapter, a :class:`~moram_kernels.MoRAMLinear` (``moram_bank[adapter]``) that computes
only the MoRAM delta: the same layer and kernels as :func:`moram_kernels.inject`.

The atoms' sizes grow with tasks, and PEFT builds the layers from the config before it
loads the weights, so the config carries ``bank_sizes`` (per layer: atoms per task and
trainable atoms). It is refreshed from the live layers whenever the config is serialised
(``save_pretrained``), and injection sizes every bank from it.

MoRAM is non-linear in its atoms, so it cannot be merged into the base weight:
``merge_and_unload()`` / ``merge_adapter()`` raise; ``unload()`` gives the base model back.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn import MoRAMLinear, _is_conv1d, _linear_dims, _NoBase
from .model import MoRAMConfig

try:
    import peft as _peft
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
except ImportError as e:      # pragma: no cover - exercised only without peft
    raise ImportError("moram_kernels.integrations.peft needs the `peft` package "
                      "(pip install 'moram_kernels[peft]')") from e

__all__ = ["MoRAMPeftConfig", "MoRAMPeftLayer", "MoRAMPeftModel", "MORAM", "PREFIX"]

PREFIX = "moram_"
_MERGE_ERROR = ("MoRAM cannot be merged into the base weight: its output is a top-k softmax "
                "mixture of its atoms, not a linear map. Keep the adapter (or use unload() to "
                "drop it and get the base model back)")


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

    def to_dict(self) -> dict:
        link = self.__dict__.get("_moram_link")
        if link is not None:
            model, adapter = link[0](), link[1]
            if model is not None:
                self.bank_sizes = _bank_sizes(model, adapter)
        d = super().to_dict()
        d.pop("_moram_link", None)
        return d


def _bank_sizes(model: nn.Module, adapter: str) -> dict[str, dict]:
    return {name: {"task_sizes": m.moram_bank[adapter].task_sizes.tolist(),
                   "trainable": m.moram_bank[adapter].num_trainable_atoms}
            for name, m in model.named_modules()
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
        w = self.get_base_layer().weight
        bank = MoRAMLinear(_NoBase(self.in_features, self.out_features, w.dtype, w.device),
                           **config.layer_kwargs())
        sizes = config.bank_sizes.get(name)
        if sizes:
            _size_bank(bank, sizes, name)
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

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for bank in self._active_banks():
            if bank.num_atoms:
                y = y + bank(x).to(y.dtype)
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

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, *, parameter_name=None, **kwargs) -> None:
        if parameter_name is not None:
            raise ValueError("MoRAM adapts modules, not parameters (target_parameters)")
        # the config reads its bank sizes from this model when it is saved
        object.__setattr__(peft_config, "_moram_link", (weakref.ref(self.model), adapter_name))
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

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(_MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(_MERGE_ERROR)


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
