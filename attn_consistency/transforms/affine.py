"""Rotation about the centre and translation, with the validity mask of the cells they move off the map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import (
    check_bool,
    check_finite_number,
)
from .base import (
    _MASK_THRESHOLD,
    Transform,
    _check_floating_for_sampling,
    _check_heatmaps,
    _check_images,
    _fixed,
    _is_whole,
    _no_autocast,
    _range,
    _uniform,
)


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
