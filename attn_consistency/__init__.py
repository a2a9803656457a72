"""Visual attention consistency (Guo et al., CVPR 2019) for any multi-label classifier.

The pieces: :class:`CAMHook` records class activation maps with gradients,
the transform registry (:func:`get_transform`) moves images and heatmaps alike,
:class:`AttentionConsistencyLoss` compares the two (its strength set by a
``distance``, a weight ``schedule`` such as :class:`Ramp`, and watched by
:class:`ConsistencyDiagnostics`), and
:class:`WeightedBCEWithLogitsLoss` is the paper's classification loss.
:class:`AAMN` (:mod:`attn_consistency.aamn`) is a GAP-FC multi-label head with a categorical
memory and channel and spatial relation modules, to which all of the above applies.
"""

from importlib.metadata import PackageNotFoundError, version

from .aamn import AAMN, AAMNHead, CategoricalMemory, ChannelRelation, SpatialRelation
from .cam import CAMHook
from .classification import WeightedBCEWithLogitsLoss, positive_ratio
from .consistency import AttentionConsistencyLoss, ConsistencyOutput, StageRecorder, attention_consistency
from .multiscale import AttentionModule, MultiScaleHeads, SideHead, StageRecord, WithSideHeads, multiscale_consistency
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

try:
    __version__ = version("attn_consistency")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "AAMN",
    "AAMNHead",
    "AttentionConsistencyLoss",
    "AttentionModule",
    "CAMHook",
    "CategoricalMemory",
    "ChannelRelation",
    "ConsistencyDiagnostics",
    "ConsistencyOutput",
    "ConsistencyWarning",
    "Flip",
    "MultiScaleHeads",
    "Ramp",
    "Rotate",
    "Scale",
    "SideHead",
    "SpatialRelation",
    "StageRecord",
    "StageRecorder",
    "Transform",
    "Translate",
    "WeightedBCEWithLogitsLoss",
    "WithSideHeads",
    "attention_consistency",
    "available_transforms",
    "get_transform",
    "multiscale_consistency",
    "positive_ratio",
    "register_transform",
]
