"""Issue 18, the loss and its schedule: each test failed before its fix.

The relative distance near flat maps (item 2), non-finite losses and targets (5), a
non-scalar criterion (6), the trigger's units (7), Scale with Rotate (8), the state that a
checkpoint loads (9), meta tensors (15), non-finite images (16), and the smaller things:
the fractional shift's host tensor and the scale term's cache.
"""

import pytest
import torch
from torch.autograd import gradcheck

from attn_consistency import attention_consistency, get_transform

RELATIVE_EPS = 1e-3  # heatmap_variance's docstring: the floor is 1e-3 of the maps' mean square


def relative(a, b, name="flip", params=None):
    return attention_consistency(a, b, name, params, distance="relative")


# --------------------------------------------------------------------------- item 2: the relative distance


def test_relative_distance_of_the_issue_is_finite():
    # a flat map against a map that is flat but for one cell of 1e-20: it was inf
    a = 3 * torch.ones(1, 1, 7, 7)
    b = torch.zeros(1, 1, 7, 7)
    b[0, 0, 0, 0] = 1e-20
    value = relative(a, b)
    assert torch.isfinite(value)
    # Eq. 5 is 9, the floor 1e-3 * (9 + 0) / 2
    assert float(value) == pytest.approx(9.0 / (RELATIVE_EPS * 4.5), rel=1e-5)


@pytest.mark.parametrize("name, size_t", [("flip", 7), ("scale", 6)])
def test_relative_distance_is_bounded_by_four_over_eps(name, size_t):
    # Eq. 5 of a flip or a scale is at most twice the two mean squares: the quotient is at most 4 / eps,
    # whatever the spatial spread (it was 1.1e6 at std 1e-3 and a logit gap of 1, 9.8e11 at 1e-6)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for std in (1.0, 1e-1, 1e-3, 1e-6, 1e-9, 0.0):
        for gap in (0.0, 1.0, -50.0):
            m = std * torch.randn(4, 3, 7, 7, generator=generator, dtype=torch.float64)
            m_t = std * torch.randn(4, 3, size_t, size_t, generator=generator, dtype=torch.float64) + gap
            value = float(relative(m, m_t, name))
            assert 0.0 <= value <= 4 / RELATIVE_EPS, (std, gap)
            worst = max(worst, value)
    # the bound is nearly reached by flat maps of opposite signs
    m = torch.ones(2, 3, 7, 7, dtype=torch.float64)
    assert float(relative(m, -m.flip(-1))) == pytest.approx(4 / RELATIVE_EPS, rel=1e-12)
    assert worst > 1000  # flat maps with a logit gap are far apart, but finitely so


@pytest.mark.parametrize("name, size_t", [("flip", 7), ("scale", 6)])
@pytest.mark.parametrize("gap", [0.0, 1.0])
def test_relative_distance_is_continuous_into_flat_maps(name, size_t, gap):
    # at exactly flat maps the old guard fell back to 1 (the maps' units): the value jumped
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    noise_t = torch.randn(2, 3, size_t, size_t, generator=generator, dtype=torch.float64)
    flat = 3.0 * torch.ones(2, 3, 7, 7, dtype=torch.float64)
    flat_t = (3.0 + gap) * torch.ones(2, 3, size_t, size_t, dtype=torch.float64)
    at_flat = float(relative(flat, flat_t, name))
    assert at_flat == pytest.approx(gap**2 / (RELATIVE_EPS * 0.5 * (9.0 + (3.0 + gap) ** 2)), abs=1e-12)
    previous = None
    for t in (1e-4, 1e-6, 1e-8):
        value = float(relative(flat + t * noise, flat_t + t * noise_t, name))
        distance = abs(value - at_flat)
        assert distance <= 1e-3 * max(1.0, at_flat) * (t / 1e-4), t
        if previous is not None:
            assert distance <= previous  # the values close in on the flat maps' one
        previous = distance


@pytest.mark.parametrize("name, size_t, params", [("flip", 7, None), ("scale", 6, None), ("rotate", 7, 30.0)])
@pytest.mark.parametrize("std", [1.0, 1e-4, 0.0])
def test_relative_distance_is_scale_free_with_different_offsets_on_the_two_views(name, size_t, params, std):
    generator = torch.Generator().manual_seed(2)
    m = std * torch.randn(3, 4, 7, 7, generator=generator, dtype=torch.float64) + 2.0
    m_t = std * torch.randn(3, 4, size_t, size_t, generator=generator, dtype=torch.float64) - 0.5
    base = relative(m, m_t, name, params)
    assert torch.isfinite(base) and float(base) > 0
    for c in (1e-6, 1e-2, 3.0, -3.0, 1e5):
        torch.testing.assert_close(relative(c * m, c * m_t, name, params), base, rtol=1e-10, atol=0)


def test_relative_distance_of_one_cell_maps_is_scale_free():
    # 1x1 maps have no variance: they always fell back to 1, so x10 maps gave x100
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 1, 1, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 5, 1, 1, generator=generator, dtype=torch.float64)
    base = relative(x, y)
    expected = ((x - y) ** 2).mean() / (RELATIVE_EPS * 0.5 * ((x**2).mean() + (y**2).mean()))
    torch.testing.assert_close(base, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(relative(10 * x, 10 * y), base, rtol=1e-12, atol=0)
    assert float(base) <= 4 / RELATIVE_EPS
    # a 1x1 map against a 2x2 one through the scale term too
    z = torch.randn(4, 5, 2, 2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(relative(10 * x, 10 * z, "scale"), relative(x, z, "scale"), rtol=1e-12, atol=0)


def test_relative_distance_stays_zero_for_equivariant_maps_and_the_paper_loss_is_unchanged():
    m = torch.randn(2, 3, 7, 7)
    assert float(relative(m, m.flip(-1))) == 0.0
    flat = torch.full((2, 3, 7, 7), 5.0)
    assert float(relative(flat, flat)) == 0.0
    # distance="mse" is Eq. 5 as before, bit for bit: the mean of the transform's per-map terms
    m_t = torch.randn(2, 3, 7, 7)
    for name in ("flip", "scale"):
        other = m_t if name == "flip" else m_t[..., :6, :6]
        per_map = get_transform(name).consistency(m, other)
        assert torch.equal(attention_consistency(m, other, name), per_map.mean())


@pytest.mark.parametrize(
    "name, size, size_t, std",
    [("flip", 5, 5, 1e-3), ("flip", 5, 5, 0.0), ("scale", 5, 4, 1e-2), ("flip", 1, 1, 1.0), ("rotate", 5, 5, 1e-2)],
)
def test_relative_distance_gradcheck_near_and_at_flat_maps(name, size, size_t, std):
    generator = torch.Generator().manual_seed(4)
    m = (std * torch.randn(2, 3, size, size, generator=generator, dtype=torch.float64) + 1.5).requires_grad_()
    m_t = (std * torch.randn(2, 3, size_t, size_t, generator=generator, dtype=torch.float64) - 0.5).requires_grad_()
    params = 30.0 if name == "rotate" else None
    assert gradcheck(lambda a, b: relative(a, b, name, params), (m, m_t), eps=1e-5, atol=1e-6, rtol=1e-5)


def test_relative_distance_keeps_no_gradient_along_the_maps_near_flat_maps():
    # scale-free with the floor too (both parts of the normaliser are of degree 2): Euler's theorem
    generator = torch.Generator().manual_seed(5)
    m = (1e-3 * torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64) + 2.0).requires_grad_()
    m_t = (1e-3 * torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64) + 1.0).requires_grad_()
    grads = torch.autograd.grad(relative(m, m_t, "scale"), (m, m_t))
    radial = float((grads[0] * m.detach()).sum() + (grads[1] * m_t.detach()).sum())
    assert abs(radial) < 1e-9 * float(grads[0].norm() * m.detach().norm())
