"""distance="correlation": each map standardised by its own mean and spread, then Eq. 5."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from attn_consistency import AttentionConsistencyLoss, attention_consistency
from attn_consistency.consistency import standardized_heatmaps


def _oracle(heatmaps: torch.Tensor, heatmaps_t: torch.Tensor, warp) -> np.ndarray:
    """Per-map values written out with numpy, one map at a time (floor 0.1 of the mean variance)."""
    a, b = heatmaps.double().numpy(), heatmaps_t.double().numpy()
    floor = 0.1 * 0.5 * (a.var(axis=(2, 3)).mean() + b.var(axis=(2, 3)).mean())
    out = np.zeros(a.shape[:2])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            za = (a[i, j] - a[i, j].mean()) / np.sqrt(a[i, j].var() + floor)
            zb = (b[i, j] - b[i, j].mean()) / np.sqrt(b[i, j].var() + floor)
            left, right = warp(za, zb)
            out[i, j] = ((left - right) ** 2).mean()
    return out


def _lcm_upsample(za: np.ndarray, zb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps repeated cell by cell onto their least-common-multiple grid (the authors' comparison)."""
    size = np.lcm(za.shape, zb.shape)
    up = [np.repeat(np.repeat(z, size[0] // z.shape[0], 0), size[1] // z.shape[1], 1) for z in (za, zb)]
    return up[0], up[1]


def test_flip_matches_hand_written_oracle() -> None:
    torch.manual_seed(0)
    m, m_t = torch.randn(3, 4, 5, 5) * 3 + 2, torch.randn(3, 4, 5, 5)
    got = attention_consistency(m, m_t, "flip", reduction="none", distance="correlation")
    expected = _oracle(m, m_t, lambda za, zb: (za[:, ::-1], zb))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_scale_matches_materialised_lcm_oracle() -> None:
    torch.manual_seed(1)
    m, m_t = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 4, 4) * 0.5 - 1
    got = attention_consistency(m, m_t, "scale", reduction="none", distance="correlation")
    np.testing.assert_allclose(got.numpy(), _oracle(m, m_t, _lcm_upsample), rtol=1e-5, atol=1e-6)


def test_value_is_the_floored_correlation_distance() -> None:
    # Written with the maps' correlation r and variances va, vb and the floor f instead of cells:
    # va/(va+f) + vb/(vb+f) - 2 r sqrt(va vb / ((va+f)(vb+f))), i.e. 2(1 - r) when f << va, vb
    torch.manual_seed(2)
    m = torch.randn(1, 1, 6, 6)
    m_t = 1.5 * (0.6 * m.flip(-1) + 0.8 * torch.randn(1, 1, 6, 6)) + 3
    a, b = m.flip(-1).flatten().double().numpy(), m_t.flatten().double().numpy()
    r = np.corrcoef(a, b)[0, 1]
    va, vb = a.var(), b.var()
    f = 0.1 * 0.5 * (va + vb)
    expected = va / (va + f) + vb / (vb + f) - 2 * r * np.sqrt(va * vb / ((va + f) * (vb + f)))
    value = attention_consistency(m, m_t, "flip", distance="correlation").item()
    assert value == pytest.approx(expected, rel=1e-5)
    assert 0.3 < r < 0.9 and value == pytest.approx(2 * (1 - r), rel=0.15)


@pytest.mark.parametrize("transform", ["flip", "scale"])
def test_gradcheck_float64(transform: str) -> None:
    torch.manual_seed(3)
    m = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    size = 4 if transform == "flip" else 3
    m_t = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: attention_consistency(a, b, transform, distance="correlation"), (m, m_t))


@pytest.mark.parametrize("transform", ["flip", "scale"])
def test_unchanged_by_a_common_positive_scale_and_by_each_maps_shift(transform: str) -> None:
    torch.manual_seed(4)
    m = torch.randn(2, 3, 6, 6)
    m_t = torch.randn(2, 3, 6 if transform == "flip" else 3, 6 if transform == "flip" else 3)
    base = attention_consistency(m, m_t, transform, distance="correlation")
    scaled = attention_consistency(37.0 * m, 37.0 * m_t, transform, distance="correlation")
    shifted = attention_consistency(
        m + torch.randn(2, 3, 1, 1) * 10, m_t + torch.randn(2, 3, 1, 1) * 10, transform, distance="correlation"
    )
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)
    assert base > 0.5  # unrelated maps: far from 0, so the invariance is not that of a constant


def test_zero_for_exactly_equivariant_maps() -> None:
    torch.manual_seed(5)
    m = torch.randn(2, 3, 5, 5)
    # a different logit (mean) per map and view: the maps are still equivariant in shape
    shifted = m.flip(-1) + 4 * torch.randn(2, 3, 1, 1)
    assert attention_consistency(m, shifted, "flip", distance="correlation").item() == pytest.approx(0, abs=1e-10)
    # a different scale per view is not free: the floor is shared by the batches (a tenth of
    # their mean variance), so the map with less spread is standardised to a little less
    tripled = attention_consistency(m, 3 * m.flip(-1), "flip", distance="correlation").item()
    assert 1e-3 < tripled < 0.05
    small = torch.randn(2, 3, 3, 3)
    large = small.repeat_interleave(2, 2).repeat_interleave(2, 3)  # 6x6: the nearest upsampling of 3x3
    assert attention_consistency(large, small, "scale", distance="correlation").item() == pytest.approx(0, abs=1e-10)
    assert attention_consistency(m, m.rot90(1, (2, 3)), "rotate", distance="correlation").item() == pytest.approx(
        0, abs=1e-10
    )
    # the paper's distance is not 0 for the first pair: it counts the gap in mean and scale
    assert attention_consistency(m, shifted, "flip").item() > 1


def test_gradient_moves_no_map_mean_and_does_not_shrink_the_maps() -> None:
    torch.manual_seed(6)
    m = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    attention_consistency(m, m_t, "flip", distance="correlation").backward()
    for maps in (m, m_t):
        assert maps.grad is not None and maps.grad.abs().max() > 1e-3
        # the mean of each map (a GAP-FC logit up to the bias) gets no gradient
        torch.testing.assert_close(maps.grad.sum((2, 3)), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    # scale-free: the gradient is orthogonal to the maps themselves (Euler), so no step shrinks them all
    inner = (m.grad * m).sum() + (m_t.grad * m_t).sum()
    assert inner.abs().item() < 1e-10
    # Eq. 5's gradient does shrink them
    m.grad = m_t.grad = None
    attention_consistency(m, m_t, "flip").backward()
    assert ((m.grad * m).sum() + (m_t.grad * m_t).sum()).item() > 1.0


def test_flat_and_zero_maps_are_finite_and_weighed_by_the_floor() -> None:
    flat = torch.full((2, 3, 4, 4), -7.0, requires_grad=True)
    value = attention_consistency(flat, flat.detach() + 1.0, "flip", distance="correlation")
    value.backward()
    assert value.item() == 0.0 and flat.grad is not None and torch.isfinite(flat.grad).all()
    zeros = torch.zeros(1, 2, 3, 3, requires_grad=True)
    z, z_t = standardized_heatmaps(zeros, zeros)
    assert torch.equal(z, torch.zeros_like(z)) and torch.equal(z_t, torch.zeros_like(z_t))
    # one nearly flat map beside spread ones: standardised far below unit spread, not blown up
    torch.manual_seed(7)
    maps = torch.randn(1, 4, 6, 6)
    maps[0, 0] = 1e-3 * torch.randn(6, 6) - 5
    z, _ = standardized_heatmaps(maps, maps)
    assert z[0, 0].std(unbiased=False) < 1e-2
    assert z[0, 1:].std(dim=(1, 2), unbiased=False).min() > 0.9


def test_the_module_takes_it_and_the_paper_loss_is_unchanged() -> None:
    torch.manual_seed(8)
    m, m_t = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    loss = AttentionConsistencyLoss({"flip": 0.5}, distance="correlation", diagnostics=False)
    expected = 0.5 * attention_consistency(m, m_t, "flip", distance="correlation")
    torch.testing.assert_close(loss(m, m_t, "flip"), expected)
    torch.testing.assert_close(
        AttentionConsistencyLoss(diagnostics=False)(m, m_t, "flip"), ((m.flip(-1) - m_t) ** 2).mean()
    )
    with pytest.raises(ValueError, match="distance must be .*'correlation'"):
        AttentionConsistencyLoss(distance="pearson")
