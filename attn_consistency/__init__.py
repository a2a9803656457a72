"""Visual attention consistency (Guo et al., CVPR 2019) for any multi-label classifier.

The pieces: :class:`CAMHook` records class activation maps with gradients,
the transform registry (:func:`get_transform`) moves images and heatmaps alike,
:class:`AttentionConsistencyLoss` compares the two (its strength set by a
``distance``, a weight ``schedule`` such as :class:`Ramp`, and watched by
:class:`ConsistencyDiagnostics`), :meth:`AttentionConsistencyLoss.views` runs the multi-view
step, and :class:`WeightedBCEWithLogitsLoss` is the paper's classification loss.

The models of the two related papers live in :mod:`attn_consistency.models`, imported only when
used: multi-scale attention consistency (:class:`~attn_consistency.models.msac.MultiScaleHeads`, MSAC)
and AAMN (:class:`~attn_consistency.models.aamn.AAMN`), a GAP-FC multi-label head with a categorical
memory and channel and spatial relation modules, to which all of the above applies. Their names
are still found here (``from attn_consistency import AAMN``), through the models package.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .cam import CAMHook
from .classification import WeightedBCEWithLogitsLoss, positive_ratio
from .consistency import (
    AttentionConsistencyLoss,
    ConsistencyOutput,
    StageRecorder,
    attention_consistency,
    attention_inconsistency,
)
from .strength import ConsistencyDiagnostics, ConsistencyWarning, Ramp
from .transforms import (
    Flip,
    Rotate,
    Scale,
    Transform,
    Translate,
    available_transforms,
    get_transform,
    register_transform,
)

if TYPE_CHECKING:  # what type checkers and IDEs see for the names served by __getattr__ below
    from .models import (
        AAMN as AAMN,
    )
    from .models import (
        AAMNHead as AAMNHead,
    )
    from .models import (
        AttentionModule as AttentionModule,
    )
    from .models import (
        CategoricalMemory as CategoricalMemory,
    )
    from .models import (
        ChannelRelation as ChannelRelation,
    )
    from .models import (
        MultiScaleHeads as MultiScaleHeads,
    )
    from .models import (
        SideHead as SideHead,
    )
    from .models import (
        SpatialRelation as SpatialRelation,
    )
    from .models import (
        StageRecord as StageRecord,
    )
    from .models import (
        WithSideHeads as WithSideHeads,
    )
    from .models import (
        multiscale_consistency as multiscale_consistency,
    )

# the models' names, found in attn_consistency.models at their first use (PEP 562); not in
# __all__, so `from attn_consistency import *` gives the core only

_MODELS = frozenset(
    {
        "AAMN",
        "AAMNHead",
        "AttentionModule",
        "CategoricalMemory",
        "ChannelRelation",
        "MultiScaleHeads",
        "SideHead",
        "SpatialRelation",
        "StageRecord",
        "WithSideHeads",
        "multiscale_consistency",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'attn_consistency' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODELS])


try:
    __version__ = version("attn_consistency")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "AttentionConsistencyLoss",
    "CAMHook",
    "ConsistencyDiagnostics",
    "ConsistencyOutput",
    "ConsistencyWarning",
    "Flip",
    "Ramp",
    "Rotate",
    "Scale",
    "StageRecorder",
    "Transform",
    "Translate",
    "WeightedBCEWithLogitsLoss",
    "attention_consistency",
    "attention_inconsistency",
    "available_transforms",
    "get_transform",
    "positive_ratio",
    "register_transform",
]
