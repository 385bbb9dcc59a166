"""Model-level integration: inject / remove, the task lifecycle, save and load, the authors'
checkpoints, and atom-usage statistics."""

from .checkpoints import import_trace_state_dict, import_xtail_state_dict
from .model import (InjectionSummary, MoRAMConfig, add_task, inject, load_moram, moram_layers,
                    remove, save_moram, trainable_parameters)
from .stats import (UsageRecord, atom_tasks, plot_usage, record_usage, start_usage, stop_usage,
                    usage_by_task, usage_counts)

__all__ = ["MoRAMConfig", "InjectionSummary", "add_task", "inject", "remove", "load_moram",
           "moram_layers", "save_moram", "trainable_parameters", "import_trace_state_dict",
           "import_xtail_state_dict", "UsageRecord", "atom_tasks", "plot_usage", "record_usage",
           "start_usage", "stop_usage", "usage_by_task", "usage_counts"]
