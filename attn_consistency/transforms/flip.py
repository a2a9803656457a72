"""Horizontal flip (the paper's first transform): exact on images and heatmaps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validation import (
    check_finite_number,
    check_generator,
)
from .base import (
    Transform,
    _check_heatmaps,
    _check_images,
)


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
