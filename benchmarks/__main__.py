import sys

from .presets import run as run_preset, split_preset

# a preset is dispatched before the main job imports torch (gpu-check --smoke sets
# TRITON_INTERPRET before anything loads Triton)
name, rest = split_preset(sys.argv[1:])
if name is not None:
    sys.exit(run_preset(name, rest))

from .run import main  # noqa: E402

sys.exit(main())
