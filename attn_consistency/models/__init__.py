"""The models of the related papers, built on the core and never imported by it.

- :mod:`attn_consistency.models.msac`: multi-scale attention consistency (ICONIP 2020): side heads
  at several stages of a backbone, each with its own CAMs and consistency terms.
- :mod:`attn_consistency.models.aamn`: AAMN (TOMM 2023): a GAP-FC multi-label head with a
  categorical memory and channel and spatial relation modules.
"""

from .aamn import AAMN, AAMNHead, CategoricalMemory, ChannelRelation, SpatialRelation
from .msac import AttentionModule, MultiScaleHeads, SideHead, StageRecord, WithSideHeads, multiscale_consistency

__all__ = [
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
]
