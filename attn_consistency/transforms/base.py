"""The transform interface: what a transform does to images and to heatmaps, and the checks every transform shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import (
    check_finite_number,
    check_generator,
    check_spatial,
    check_tensor,
)

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
        >>> import torch
        >>> from attn_consistency.transforms import Transform
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
