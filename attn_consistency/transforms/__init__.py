r"""Spatial transforms applied consistently to images and to their heatmaps.

A transform samples its parameters once per step, free of resolution (a flip flag, an
angle in degrees, a scale factor, a shift as a fraction of the width and height), and
applies the same parameters to the image batch (say 224x224) and to a heatmap batch of
another size (7x7). The paper's equivariance constraint (Eq. 4) is
:math:`T(g(I)) = g(T(I))`; :meth:`Transform.consistency` measures how far apart the two
sides are, per sample and label.

Exact cases are exact: a flip is ``torch.flip``, a multiple of 90 degrees is
``torch.rot90``, a shift by a whole number of cells is indexing. Other angles and shifts
go through ``kornia.geometry.transform`` with ``align_corners`` passed explicitly, and
come with a validity mask of the heatmap cells that have a counterpart in the other view.
"""

from .affine import Rotate, Translate
from .base import Transform
from .flip import Flip
from .registry import available_transforms, get_transform, register_transform
from .scale import Scale, scale_consistency

__all__ = [
    "Transform",
    "Flip",
    "Scale",
    "Rotate",
    "Translate",
    "register_transform",
    "get_transform",
    "available_transforms",
    "scale_consistency",
]

# documented (and pickled) under the path users import them by
for _public in (
    Transform,
    Flip,
    Scale,
    Rotate,
    Translate,
    register_transform,
    get_transform,
    available_transforms,
    scale_consistency,
):
    _public.__module__ = __name__
del _public
