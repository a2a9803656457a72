"""The former path of :mod:`attn_consistency.models.aamn` (AAMN), kept for existing imports."""

from .models.aamn import *  # noqa: F403
from .models.aamn import __all__  # noqa: F401
