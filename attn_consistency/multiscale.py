"""The former path of :mod:`attn_consistency.models.msac` (multi-scale attention consistency), kept for existing imports."""

from .models.msac import *  # noqa: F403
from .models.msac import OUTPUT, __all__  # noqa: F401
