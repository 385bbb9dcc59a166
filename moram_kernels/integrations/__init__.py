"""Model-level integration: inject, the task lifecycle, save and load."""

from .model import (MoRAMConfig, add_task, inject, load_moram, moram_layers, save_moram,
                    trainable_parameters)

__all__ = ["MoRAMConfig", "add_task", "inject", "load_moram", "moram_layers", "save_moram",
           "trainable_parameters"]
