"""Resizing, and the closed form of Eq. 5 between maps of two sizes on their least-common-multiple grid."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import (
    check_bool,
    check_finite_number,
    check_generator,
)
from .affine import Rotate, Translate
from .base import (
    Transform,
    _check_heatmaps,
    _check_images,
    _check_pair,
    _fixed,
    _no_autocast,
    _range,
    _uniform,
)
from .flip import Flip


@lru_cache(maxsize=64)
def _common_segments(size: int, size_t: int) -> tuple[list[int], list[int], list[int]]:
    """Nearest upsampling of ``size`` and ``size_t`` cells to their LCM, as segments.

    On the LCM grid cell ``k`` shows cell ``k // (lcm / size)`` of the first map and
    ``k // (lcm / size_t)`` of the second. Both are constant between consecutive
    multiples of either step, so the grid splits into at most ``size + size_t - 1``
    segments. Returns, per segment, the source cell of each map and its length.
    """
    lcm = math.lcm(size, size_t)
    step, step_t = lcm // size, lcm // size_t
    edges = sorted(set(range(0, lcm, step)) | set(range(0, lcm, step_t)) | {lcm})
    starts, ends = edges[:-1], edges[1:]
    return [s // step for s in starts], [s // step_t for s in starts], [e - s for s, e in zip(starts, ends)]


# A dict rather than lru_cache: torch.compile traces through lru_cache wrappers (and warns), but
# reads a dict lookup of constant tensors as it is. Bounded: beyond _SEGMENT_CACHE_SIZE shape
# pairs (a run with many input sizes) the oldest entry goes, first in first out, so that a hit
# stays a plain read.
_segment_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor, Tensor]] = {}


_SEGMENT_CACHE_SIZE = 256


def _segment_tensors(shape: tuple[int, int], shape_t: tuple[int, int], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat cell indices of each block in both maps, and the block weights (area / LCM area).

    Constants of the two shapes, built once per device and dtype.
    """
    key = (*shape, *shape_t, like.device, like.dtype)
    cached = _segment_cache.get(key)
    if cached is None:
        (rows, rows_t, row_len), (cols, cols_t, col_len) = (
            _common_segments(shape[0], shape_t[0]),
            _common_segments(shape[1], shape_t[1]),
        )
        area = math.lcm(shape[0], shape_t[0]) * math.lcm(shape[1], shape_t[1])

        def flat(r: list[int], c: list[int], width: int) -> Tensor:
            return (torch.tensor(r)[:, None] * width + torch.tensor(c)[None, :]).flatten().to(like.device)

        weight = torch.outer(torch.tensor(row_len, dtype=like.dtype), torch.tensor(col_len, dtype=like.dtype))
        cached = (
            flat(rows, cols, shape[1]),
            flat(rows_t, cols_t, shape_t[1]),
            (weight.flatten() / area).to(like.device),
        )
        while len(_segment_cache) >= _SEGMENT_CACHE_SIZE:
            # DataParallel's replicas evict from this cache in threads: another may have taken the key
            _segment_cache.pop(next(iter(_segment_cache.copy())), None)
        _segment_cache[key] = cached
    return cached


def scale_consistency(heatmaps: Tensor, heatmaps_t: Tensor) -> Tensor:
    r"""Mean squared difference of two heatmap batches on their least-common-multiple grid.

    Both maps are upsampled with nearest neighbours to
    :math:`\mathrm{lcm}(h, h') \times \mathrm{lcm}(w, w')` (7x7 and 6x6 to 42x42, as the
    authors' code) and compared by MSE. The upsampling is separable and piecewise
    constant, so the LCM grid splits into at most :math:`(h + h' - 1)(w + w' - 1)` blocks
    on which both maps are constant: the MSE is a weighted sum over those blocks, equal to
    the materialised one, without building the LCM-sized tensors and without the
    cancellation of an expanded :math:`\lVert a \rVert^2 + \lVert b \rVert^2 - 2ab` form.

    Args:
        heatmaps: ``(N, L, h, w)``, floating point.
        heatmaps_t: ``(N, L, h', w')``, on the same device; both are compared in their
            promoted dtype.

    Returns:
        Tensor of shape ``(N, L)``; empty when N or L is 0.

    Raises:
        ValueError: a map of size 0, or different N or L in the two batches.
    """
    _check_pair(heatmaps, heatmaps_t)
    dtype = torch.promote_types(heatmaps.dtype, heatmaps_t.dtype)
    heatmaps, heatmaps_t = heatmaps.to(dtype), heatmaps_t.to(dtype)
    n, labels, h, w = heatmaps.shape
    h_t, w_t = heatmaps_t.shape[-2:]
    index, index_t, weight = _segment_tensors((h, w), (h_t, w_t), heatmaps)
    # Cells as rows, maps as columns: each gather copies whole contiguous rows. The sizes are
    # spelled out (no -1): a reshape of an empty batch cannot infer them.
    blocks = heatmaps.reshape(n * labels, h * w).t()[index]
    blocks_t = heatmaps_t.reshape(n * labels, h_t * w_t).t()[index_t]
    return (weight @ (blocks - blocks_t).square()).view(n, labels)


class Scale(Transform):
    """Rescale the image; compare heatmaps of different sizes on their LCM grid.

    Args:
        factor: output size over input size (the paper: 192/224), or a ``(min, max)``
            range to draw from at each step; finite and > 0.
        size: a fixed output size ``(H, W)`` (or ``int`` for square) instead of a factor.
        antialias: antialias the bilinear image resize (closest to the PIL resize of the
            reference data loader).

    The params of a step are a factor (a finite number > 0) or, with ``size``, an
    ``(H, W)`` pair of positive ints. An image whose scaled size rounds to 0 gets 1.
    The heatmaps of the two views are compared by :func:`scale_consistency`, whatever
    their sizes (7x7 vs 6x6, 14x14 vs 12x12, 1x1 vs 2x2, non-square).
    """

    name = "scale"

    def __init__(
        self,
        factor: float | tuple[float, float] | None = None,
        size: int | tuple[int, int] | None = None,
        antialias: bool = True,
    ) -> None:
        if factor is not None and size is not None:
            raise ValueError("give either factor or size, not both")
        if size is not None:
            size = self._check_size("size", size)
        elif factor is None:
            factor = 192 / 224
        self.factor = None if factor is None else _range("factor", factor)
        if self.factor is not None and self.factor[0] <= 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        self.size = size
        self.antialias = check_bool("antialias", antialias)

    @staticmethod
    def _check_size(name: str, size: object) -> tuple[int, int]:
        def is_int(s: object) -> bool:
            return isinstance(s, numbers.Integral) and not isinstance(s, bool)

        pair = (size, size) if is_int(size) else size
        expected = f"{name} must be a positive int or an (H, W) pair of positive ints, got"
        if isinstance(pair, str) or not isinstance(pair, Sequence) or not all(is_int(s) for s in pair):
            raise TypeError(f"{expected} {type(size).__name__} {size!r}")
        if len(pair) != 2 or not all(s > 0 for s in pair):
            raise ValueError(f"{expected} {size!r}")
        return int(pair[0]), int(pair[1])

    def _params(self, params: Any) -> float | tuple[int, int]:
        """The step's factor or fixed ``(H, W)``, checked."""
        if params is None:
            return self._fixed_size() if self.factor is None else _fixed("scale factor", self.factor)
        if isinstance(params, Sequence) and not isinstance(params, str):
            return self._check_size("scale params (size)", params)
        factor = check_finite_number("scale params (factor)", params)
        if factor <= 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        return factor

    def sample(self, generator: torch.Generator | None = None) -> float | tuple[int, int]:
        check_generator("generator", generator)
        return self._fixed_size() if self.factor is None else _uniform(self.factor, generator)

    def _fixed_size(self) -> tuple[int, int]:
        if self.size is None:  # __init__ sets a factor or a size
            raise RuntimeError("a Scale without a factor has a size")
        return self.size

    def output_size(self, size: Sequence[int], params: Any = None) -> tuple[int, int]:
        """The ``(H, W)`` that :meth:`apply_image` gives an image of size ``size``.

        Raises:
            TypeError, ValueError: ``size`` is not a pair of positive ints, or ``params`` is
                not a finite factor > 0 or an ``(H, W)`` pair.
        """
        height, width = self._check_size("size", size)
        params = self._params(params)
        if isinstance(params, tuple):
            return params
        return max(1, round(height * params)), max(1, round(width * params))

    def apply_image(self, images: Tensor, params: Any = None) -> Tensor:
        _check_images(images)
        size = self.output_size(images.shape[-2:], params)
        if tuple(images.shape[-2:]) == size:
            return images
        with _no_autocast(images):
            return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def apply_heatmaps(self, heatmaps: Tensor, params: Any = None) -> tuple[Tensor, Tensor | None]:
        """Nearest resize of the heatmaps by the same factor (for display).

        The loss does not use it: :meth:`consistency` compares the two views' own maps on
        their common LCM grid instead, as the authors' code.

        Raises:
            ValueError: the scale is to a fixed image size, which says nothing of the
                heatmaps' size.
        """
        _check_heatmaps("heatmaps", heatmaps)
        factor = self._params(params)
        if isinstance(factor, tuple):
            raise ValueError(
                f"scale params: a scale to the fixed image size {factor} has no heatmap size; use a factor"
            )
        return F.interpolate(heatmaps, size=self.output_size(heatmaps.shape[-2:], factor), mode="nearest"), None

    def consistency(self, heatmaps: Tensor, heatmaps_t: Tensor, params: Any = None) -> Tensor:
        # The maps' own sizes carry the scale; params that are given are still checked, since
        # a NaN factor here is the one the image went through.
        if params is not None:
            self._params(params)
        return scale_consistency(heatmaps, heatmaps_t)

    def commutes_with(self, other: Transform) -> bool:
        # A resize by a factor scales both axes alike: it commutes with flips, rotations about
        # the centre, shifts given as fractions of the size, and other resizes by a factor. A
        # resize to a fixed size scales the axes by their own factors (anisotropic unless the
        # image has the size's aspect): it commutes with flips and shifts, with a rotation only
        # by a multiple of 180 degrees (which maps each axis onto itself), and with no other
        # resize (the last fixed size wins). A custom transform says so itself.
        if isinstance(other, (Flip, Translate)):
            return True
        if isinstance(other, Scale):
            return self.size is None and other.size is None
        if isinstance(other, Rotate):
            return self.size is None or other._half_turns_only()
        return False
