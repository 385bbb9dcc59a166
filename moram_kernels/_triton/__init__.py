from .forward import moram_fwd
from .backward import moram_bwd
