"""The authors' way of computing the consistency terms, modelled on the authors' training step
(hguosc/visual_attention_consistency, ``main.py``).

A plain re-implementation, independent of the library, that the benchmarks time the library
against (and check it against first):

- heatmaps by broadcast-multiply-and-sum of the features with the (detached) FC weight,
  which builds an ``(N, L, C, h, w)`` tensor;
- flip by ``grid_sample`` on a mirrored sampling grid built for ``align_corners=True``
  (what PyTorch 0.3 did implicitly; under ``align_corners=True`` the grid points fall on cell
  centres, so it is a flip up to rounding);
- scale by nearest ``F.interpolate`` of both maps to the least-common-multiple grid, then MSE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["authors_consistency", "broadcast_heatmaps", "grid_flip", "lcm_scale_mse"]


def broadcast_heatmaps(features: Tensor, weight: Tensor) -> Tensor:
    """``M[n, l] = sum_c W[l, c] F[n, c]`` as the authors compute it: ``(N, C, h, w) -> (N, L, h, w)``."""
    return (features.unsqueeze(1) * weight.detach()[None, :, :, None, None]).sum(2)


def grid_flip(heatmaps: Tensor) -> Tensor:
    """Flip along the width by bilinear ``grid_sample`` on a mirrored ``align_corners=True`` grid."""
    n, _, h, w = heatmaps.shape
    xs = torch.linspace(1.0, -1.0, w, device=heatmaps.device, dtype=heatmaps.dtype)
    ys = torch.linspace(-1.0, 1.0, h, device=heatmaps.device, dtype=heatmaps.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(n, h, w, 2)
    return F.grid_sample(heatmaps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def lcm_scale_mse(heatmaps: Tensor, heatmaps_t: Tensor) -> Tensor:
    """MSE of both maps upsampled (nearest) to the least-common-multiple grid (42x42 for 7x7 and 6x6)."""
    size = tuple(math.lcm(a, b) for a, b in zip(heatmaps.shape[-2:], heatmaps_t.shape[-2:]))
    return F.mse_loss(F.interpolate(heatmaps, size=size), F.interpolate(heatmaps_t, size=size))


def authors_consistency(features: Tensor, features_t: Tensor, weight: Tensor) -> Tensor:
    """The four-view flip + scale consistency loss: ``flip@large + flip@small + scale``.

    Args:
        features: the pooled features of the large views, original then flipped:
            ``(2N, C, h, w)``.
        features_t: the same for the small (rescaled) views: ``(2N, C, h', w')``.
        weight: the FC weight ``(L, C)``.
    """
    n = features.shape[0] // 2
    heatmaps, heatmaps_t = broadcast_heatmaps(features, weight), broadcast_heatmaps(features_t, weight)
    flip = F.mse_loss(heatmaps[:n], grid_flip(heatmaps[n:]))
    flip_t = F.mse_loss(heatmaps_t[:n], grid_flip(heatmaps_t[n:]))
    return flip + flip_t + lcm_scale_mse(heatmaps, heatmaps_t)
