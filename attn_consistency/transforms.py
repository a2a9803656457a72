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

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    check_bool,
    check_finite_number,
    check_generator,
    check_spatial,
    check_tensor,
)

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

# A validity mask keeps the cells whose bilinear sample lies wholly inside the source
# (interpolating a map of ones gives 1 there, less where zero padding is mixed in).
_MASK_THRESHOLD = 1.0 - 1e-3


def _check_images(images: object) -> Tensor:
    return check_spatial("images", check_tensor("images", images, 4, "(N, C, H, W)"), "(H, W)")


def _check_heatmaps(name: str, heatmaps: object) -> Tensor:
    return check_spatial(name, check_tensor(name, heatmaps, 4, "(N, L, h, w)", floating=True), "(h, w)")


def _check_pair(heatmaps: object, heatmaps_t: object) -> tuple[Tensor, Tensor]:
    """Both views' heatmaps: 4-D, floating, non-empty maps, the same N and L on one device.

    N = 0 or L = 0 is fine: the result is an empty ``(N, L)``.
    """
    heatmaps = _check_heatmaps("heatmaps", heatmaps)
    heatmaps_t = _check_heatmaps("heatmaps_t", heatmaps_t)
    if heatmaps.shape[:2] != heatmaps_t.shape[:2]:
        raise ValueError(
            "heatmaps and heatmaps_t must have the same batch size and number of labels, got "
            f"(N, L) = {tuple(heatmaps.shape[:2])} and {tuple(heatmaps_t.shape[:2])}"
        )
    if heatmaps.device != heatmaps_t.device:
        raise ValueError(
            f"heatmaps and heatmaps_t must be on one device, got {heatmaps.device} and {heatmaps_t.device}"
        )
    return heatmaps, heatmaps_t


def _check_floating_for_sampling(name: str, x: Tensor, what: str) -> None:
    # Bilinear sampling (kornia) writes fractional values: an integer tensor cannot hold them.
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor for {what} (bilinear sampling), got {x.dtype}")


class Transform:
    """A spatial transform of images and heatmaps; subclass it to add your own.

    A subclass implements :meth:`apply_image` and :meth:`apply_heatmaps`, and
    :meth:`sample` when it has random parameters. :meth:`consistency` then works as for
    the built-ins. Register the subclass with :func:`register_transform` to refer to it by
    name.

    Example:
        >>> class VerticalFlip(Transform):
        ...     def apply_image(self, images, params=None):
        ...         return images.flip(-2)
        ...     def apply_heatmaps(self, heatmaps, params=None):
        ...         return heatmaps.flip(-2), None
        >>> m = torch.randn(2, 3, 7, 7)
        >>> VerticalFlip().consistency(m, m.flip(-2)).abs().max().item()
        0.0
    """

    name: str = "transform"

    def sample(self, generator: torch.Generator | None = None) -> Any:
        """Draw the parameters of one step (``None`` for a deterministic transform).

        Raises:
            TypeError: ``generator`` is not a ``torch.Generator`` (``ValueError``: not on the CPU).
        """
        check_generator("generator", generator)
        return None

    def apply_image(self, images: Tensor, params: Any = None) -> Tensor:
        """Transform an image batch ``(N, C, H, W)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_image")

    def apply_heatmaps(self, heatmaps: Tensor, params: Any = None) -> tuple[Tensor, Tensor | None]:
        """Transform a heatmap batch ``(N, L, h, w)``.

        Returns:
            The transformed heatmaps and a validity mask broadcastable to them (1 where a
            cell has a counterpart in the other view, 0 elsewhere), or ``None`` when
            every cell is valid.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement apply_heatmaps")

    def consistency(self, heatmaps: Tensor, heatmaps_t: Tensor, params: Any = None) -> Tensor:
        r"""Mean squared difference between :math:`T(M)` and :math:`M'` for every map.

        .. math:: d_{ij} = \frac{1}{|V|} \sum_{(m, n) \in V} (T(M)_{ij}(m, n) - M'_{ij}(m, n))^2

        over the valid cells :math:`V`; the mean of :math:`d` over samples and labels is
        the paper's Eq. 5 when every cell is valid. A map with no valid cell (a shift by
        nearly the whole width) has :math:`d = 0`: it has nothing to compare.

        Args:
            heatmaps: :math:`M = g(I)`, shape ``(N, L, h, w)``.
            heatmaps_t: :math:`M' = g(T(I))`, shape ``(N, L, h', w')``.
            params: what :meth:`sample` returned for this step.

        Returns:
            Tensor of shape ``(N, L)``; empty when N or L is 0.

        Raises:
            ValueError: a map of size 0 (``h`` or ``w`` is 0), different N or L in the two
                views, or transformed heatmaps whose shape differs from ``heatmaps_t``.
        """
        _check_pair(heatmaps, heatmaps_t)
        warped, mask = self.apply_heatmaps(heatmaps, params)
        if warped.shape != heatmaps_t.shape:
            raise ValueError(
                f"{self.name}: the transformed heatmaps have shape {tuple(warped.shape)} but "
                f"heatmaps_t has shape {tuple(heatmaps_t.shape)}; did the two views get "
                "inputs of different sizes?"
            )
        squared = (warped - heatmaps_t).square()
        if mask is None:
            return squared.mean((-2, -1))
        mask = mask.to(squared.dtype)
        return (squared * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp_min(1.0)

    def commutes_with(self, other: Transform) -> bool:
        """Whether applying ``self`` then ``other`` equals ``other`` then ``self``.

        The ``"product"`` mode of :meth:`AttentionConsistencyLoss.views` combines
        transforms only when they commute.
        """
        return False

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "name" and not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _range(name: str, value: object) -> tuple[float, float]:
    """A number or a ``(min, max)`` pair of numbers, as a pair."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (min, max) pair, got {len(value)} values")
        low, high = (check_finite_number(name, v) for v in value)
        if low > high:
            raise ValueError(f"{name} must be a (min, max) pair with min <= max, got {tuple(value)}")
        return low, high
    try:
        number = check_finite_number(name, value)
    except TypeError:
        raise TypeError(
            f"{name} must be a number or a (min, max) pair of numbers, got {type(value).__name__} {value!r}"
        ) from None
    return number, number


def _fixed(name: str, bounds: tuple[float, float]) -> float:
    """The parameter of a deterministic transform, used when no params are given."""
    if bounds[0] != bounds[1]:
        raise ValueError(
            f"{name} draws random parameters from {bounds}: pass the params returned by sample(), "
            "the same for the image and the heatmaps"
        )
    return bounds[0]


def _uniform(bounds: tuple[float, float], generator: torch.Generator | None) -> float:
    check_generator("generator", generator)
    low, high = bounds
    if low == high:
        return low
    return low + (high - low) * float(torch.rand((), generator=generator))


def _no_autocast(x: Tensor) -> torch.autocast:
    # kornia's grid_sample wants input and grid in one dtype: sample in the input's own.
    return torch.autocast(x.device.type, enabled=False)


def _is_whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-6


class Flip(Transform):
    """Horizontal flip (along the width), by ``torch.flip``: exact at every size.

    Args:
        p: probability of flipping at a step, in [0, 1] (NaN refused). The paper always
            flips (``p=1``); with ``p < 1`` a step that does not flip compares a view
            with itself.

    The params of a step are a bool (flip or not); any other type is refused.
    """

    name = "flip"

    def __init__(self, p: float = 1.0) -> None:
        p = check_finite_number("p", p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def sample(self, generator: torch.Generator | None = None) -> bool:
        check_generator("generator", generator)
        if self.p in (0.0, 1.0):
            return self.p == 1.0
        return float(torch.rand((), generator=generator)) < self.p

    def _flag(self, params: Any) -> bool:
        if params is None:
            if self.p not in (0.0, 1.0):
                raise ValueError(f"flip with p={self.p} is random: pass the params returned by sample()")
            return self.p == 1.0
        if not isinstance(params, bool):
            raise TypeError(f"flip params must be a bool (flip or not), got {type(params).__name__}")
        return params

    def apply_image(self, images: Tensor, params: Any = None) -> Tensor:
        _check_images(images)
        return images.flip(-1) if self._flag(params) else images

    def apply_heatmaps(self, heatmaps: Tensor, params: Any = None) -> tuple[Tensor, Tensor | None]:
        _check_heatmaps("heatmaps", heatmaps)
        return (heatmaps.flip(-1) if self._flag(params) else heatmaps), None


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


class Rotate(Transform):
    """Rotation about the centre, counter-clockwise for a positive angle.

    Args:
        degrees: the angle, or a ``(min, max)`` range to draw from at each step; finite.
            The paper rotates by 90 degrees.
        align_corners: passed to kornia for angles that are not a multiple of 90.

    Multiples of 90 degrees use ``torch.rot90`` (exact; a non-square input swaps height
    and width; any dtype). Other angles leave corners with no counterpart: they are zero
    in the transformed view and excluded from the loss through the validity mask; they
    need floating-point images. The params of a step are the angle, a finite number.
    """

    name = "rotate"

    def __init__(self, degrees: float | tuple[float, float] = 90.0, align_corners: bool = False) -> None:
        self.degrees = _range("degrees", degrees)
        self.align_corners = check_bool("align_corners", align_corners)

    def sample(self, generator: torch.Generator | None = None) -> float:
        return _uniform(self.degrees, generator)

    def _half_turns_only(self) -> bool:
        """Whether every angle this rotation draws is a multiple of 180 degrees (it maps each axis onto itself)."""
        low, high = self.degrees
        return low == high and _is_whole(low / 180.0)

    def _angle(self, params: Any) -> float:
        if params is None:
            return _fixed("rotate degrees", self.degrees)
        return check_finite_number("rotate params (angle in degrees)", params)

    def _rotate(self, x: Tensor, angle: float, name: str) -> Tensor:
        quarter_turns = angle / 90.0
        if _is_whole(quarter_turns):
            return torch.rot90(x, round(quarter_turns) % 4, dims=(-2, -1))
        _check_floating_for_sampling(name, x, f"a rotation by {angle:g} degrees")
        from kornia.geometry.transform import rotate

        with _no_autocast(x):
            theta = torch.full((x.shape[0],), angle, dtype=x.dtype, device=x.device)
            return rotate(x, theta, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners)

    def apply_image(self, images: Tensor, params: Any = None) -> Tensor:
        _check_images(images)
        return self._rotate(images, self._angle(params), "images")

    def apply_heatmaps(self, heatmaps: Tensor, params: Any = None) -> tuple[Tensor, Tensor | None]:
        _check_heatmaps("heatmaps", heatmaps)
        angle = self._angle(params)
        rotated = self._rotate(heatmaps, angle, "heatmaps")
        if _is_whole(angle / 90.0):
            return rotated, None
        ones = heatmaps.new_ones((1, 1, *heatmaps.shape[-2:]))
        return rotated, self._rotate(ones, angle, "heatmaps") > _MASK_THRESHOLD


def _check_shift(name: str, low: float, high: float) -> None:
    # A shift by the whole size or more leaves no cell with a counterpart in the other view
    # (and torch.roll would wrap the map around): the term would compare nothing, so such
    # a shift is refused rather than given a silent 0. Its usual cause is a shift in pixels.
    if not (-1.0 < low and high < 1.0):
        shown = low if low == high else (low, high)
        raise ValueError(
            f"{name} must lie in (-1, 1) (a fraction of the size; a shift by the whole size leaves "
            f"no cell to compare), got {shown}"
        )


class Translate(Transform):
    """Shift by a fraction of the width and height (positive: right and down).

    Args:
        dx: shift along the width as a fraction of it, in (-1, 1), or a ``(min, max)``
            range. The paper shifts 32 pixels of 224, i.e. ``1/7``: one cell of a 7x7
            heatmap.
        dy: the same along the height.
        align_corners: passed to kornia for shifts that are not whole cells.

    A shift that is a whole number of pixels (or heatmap cells) is done by indexing,
    exactly; any other goes through kornia with bilinear sampling (floating-point images
    only). Cells shifted in from outside are zero and masked out of the loss. The params
    of a step are a ``(dx, dy)`` pair of finite fractions in (-1, 1): a shift by the whole
    size or more is refused, since it would leave no cell to compare.
    """

    name = "translate"

    def __init__(
        self,
        dx: float | tuple[float, float] = 1 / 7,
        dy: float | tuple[float, float] = 0.0,
        align_corners: bool = False,
    ) -> None:
        self.dx, self.dy = _range("dx", dx), _range("dy", dy)
        _check_shift("dx", *self.dx)
        _check_shift("dy", *self.dy)
        self.align_corners = check_bool("align_corners", align_corners)

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, float]:
        return _uniform(self.dx, generator), _uniform(self.dy, generator)

    def _shift(self, params: Any) -> tuple[float, float]:
        if params is None:
            return _fixed("translate dx", self.dx), _fixed("translate dy", self.dy)
        expected = f"translate params must be a (dx, dy) pair of fractions, got {params!r}"
        if isinstance(params, str) or not isinstance(params, Sequence):
            raise TypeError(expected)
        if len(params) != 2:
            raise ValueError(expected)
        shift = []
        for axis, value in zip(("dx", "dy"), params):
            number = check_finite_number(f"translate params ({axis})", value)
            _check_shift(f"translate params ({axis})", number, number)
            shift.append(number)
        return shift[0], shift[1]

    def _translate(self, x: Tensor, dx: float, dy: float, with_mask: bool, name: str) -> tuple[Tensor, Tensor | None]:
        """The shifted ``x`` and, if asked, the mask of cells with a source inside ``x``."""
        height, width = x.shape[-2:]
        sx, sy = dx * width, dy * height
        if _is_whole(sx) and _is_whole(sy):
            # |dx|, |dy| < 1, so |sx| <= width and |sy| <= height: the slices below never wrap.
            sx, sy = round(sx), round(sy)
            mask = x.new_zeros((1, 1, height, width), dtype=torch.bool)
            mask[..., max(sy, 0) : height + min(sy, 0), max(sx, 0) : width + min(sx, 0)] = True
            return torch.roll(x, shifts=(sy, sx), dims=(-2, -1)) * mask, mask if with_mask else None
        _check_floating_for_sampling(name, x, f"a shift of ({sx:g}, {sy:g}) pixels, not whole")
        from kornia.geometry.transform import translate

        with _no_autocast(x):
            # filled on the device (no host tensor to copy, so no wait on the device's queue)
            shift = x.new_empty((x.shape[0], 2))
            shift[:, 0].fill_(sx)
            shift[:, 1].fill_(sy)

            def warp(t: Tensor, s: Tensor) -> Tensor:
                return translate(t, s, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners)

            if not with_mask:
                return warp(x, shift), None
            return warp(x, shift), warp(x.new_ones((1, 1, height, width)), shift[:1]) > _MASK_THRESHOLD

    def apply_image(self, images: Tensor, params: Any = None) -> Tensor:
        _check_images(images)
        return self._translate(images, *self._shift(params), with_mask=False, name="images")[0]

    def apply_heatmaps(self, heatmaps: Tensor, params: Any = None) -> tuple[Tensor, Tensor | None]:
        _check_heatmaps("heatmaps", heatmaps)
        return self._translate(heatmaps, *self._shift(params), with_mask=True, name="heatmaps")


_REGISTRY: dict[str, Callable[..., Transform]] = {}


# Names end up as keys of the loss weights and of the terms, where '@' adds a view's size
# ("flip@224"), and on command lines: identifier-like names keep all of those unambiguous.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def register_transform(
    name: str, factory: Callable[..., Transform] | None = None, *, overwrite: bool = False
) -> Callable[..., Any]:
    """Make a transform available by name to :func:`get_transform` and the loss.

    Use it as a call, ``register_transform("vflip", VerticalFlip)``, or as a class
    decorator, ``@register_transform("vflip")``. A transform built from the name carries
    it (``get_transform("vflip").name == "vflip"``), so the loss weights keyed by it apply.

    Args:
        name: the name to look it up by: a letter or ``_``, then letters, digits, ``_``
            or ``-``.
        factory: a :class:`Transform` subclass or a function returning an instance.
        overwrite: replace an existing entry of that name instead of raising.

    Raises:
        TypeError: ``name`` is not a str, ``factory`` is not callable (or is a class that
            is not a :class:`Transform`), ``overwrite`` is not a bool.
        ValueError: ``name`` is not identifier-like, or is taken and ``overwrite`` is False.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be a letter or '_' followed by letters, digits, '_' or '-', got {name!r}")
    check_bool("overwrite", overwrite)

    def add(factory: Callable[..., Transform]) -> Callable[..., Transform]:
        if isinstance(factory, type) and not issubclass(factory, Transform):
            raise TypeError(f"factory must be a Transform subclass or a callable, got the class {factory.__name__}")
        if not callable(factory):
            raise TypeError(f"factory must be a Transform subclass or a callable, got {type(factory).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a transform named {name!r} is already registered; pass overwrite=True to replace it")
        if isinstance(factory, type) and issubclass(factory, Transform) and "name" not in vars(factory):
            # a subclass that inherits its name (a Flip subclass would be "flip") takes the registered
            # one, so that its instances, made by name or directly, answer to their weight's key
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return add if factory is None else add(factory)


def get_transform(transform: str | Transform, **kwargs: Any) -> Transform:
    """The transform registered as ``transform``, built with ``kwargs``.

    The built transform's ``name`` is the registered one, also for a subclass of a
    built-in (registered as ``"myflip"``, a :class:`Flip` subclass is ``"myflip"``, not
    ``"flip"``). A :class:`Transform` instance is returned as it is, with its own name.

    Example:
        >>> get_transform("rotate", degrees=(-30, 30))
        Rotate(degrees=(-30.0, 30.0), align_corners=False)
    """
    if isinstance(transform, Transform):
        if kwargs:
            raise TypeError("keyword arguments apply to a transform name, not to a Transform instance")
        return transform
    given: object = transform  # checked as any object: a class passed for an instance is a common slip
    if isinstance(given, type) and issubclass(given, Transform):
        raise TypeError(
            f"transform must be a name or a Transform instance, got the class {given.__name__}: "
            f"pass {given.__name__}() or its registered name"
        )
    if not isinstance(transform, str):
        raise TypeError(f"transform must be a name or a Transform, got {type(transform).__name__}")
    if transform not in _REGISTRY:
        raise ValueError(f"unknown transform {transform!r}; available: {', '.join(available_transforms())}")
    built = _REGISTRY[transform](**kwargs)
    if not isinstance(built, Transform):
        raise TypeError(f"the factory registered as {transform!r} returned {type(built).__name__}, not a Transform")
    # The weights and terms of the loss are keyed by name: the name the user registered and
    # asked for, not one inherited from a base class.
    if built.name != transform:
        built.name = transform
    return built


def available_transforms() -> list[str]:
    """Names accepted by :func:`get_transform`, sorted."""
    return sorted(_REGISTRY)


for _cls in (Flip, Scale, Rotate, Translate):
    register_transform(_cls.name, _cls)
