import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from attn_consistency import (
    Flip,
    Rotate,
    Scale,
    Transform,
    Translate,
    attention_consistency,
    available_transforms,
    get_transform,
    register_transform,
)
from attn_consistency import transforms as transforms_module


def materialised_scale_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The authors' way: nearest-upsample both maps to the LCM grid and take the MSE."""
    size = (math.lcm(a.shape[-2], b.shape[-2]), math.lcm(a.shape[-1], b.shape[-1]))
    return F.mse_loss(F.interpolate(a, size=size, mode="nearest"), F.interpolate(b, size=size, mode="nearest"))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_builtins_are_registered():
    assert available_transforms() == sorted(["flip", "rotate", "scale", "translate"])


# ---------------------------------------------------------------- exact oracles


def test_flip_term_equals_mse_against_flipped_maps(generator):
    m = torch.randn(3, 5, 7, 7, generator=generator)
    m_t = torch.randn(3, 5, 7, 7, generator=generator)
    expected = F.mse_loss(m, torch.flip(m_t, [-1]))
    assert torch.allclose(attention_consistency(m, m_t, "flip"), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("shape", "shape_t"),
    [((7, 7), (6, 6)), ((9, 9), (8, 8)), ((14, 14), (12, 12)), ((7, 7), (7, 7)), ((7, 5), (6, 4)), ((3, 8), (5, 6))],
)
def test_scale_term_equals_materialised_lcm_mse(shape, shape_t, generator):
    m = torch.randn(4, 3, *shape, generator=generator, dtype=torch.float64)
    m_t = torch.randn(4, 3, *shape_t, generator=generator, dtype=torch.float64)
    assert torch.allclose(attention_consistency(m, m_t, "scale"), materialised_scale_mse(m, m_t), rtol=1e-12, atol=0)
    per_map = attention_consistency(m, m_t, "scale", reduction="none")
    size = (math.lcm(shape[0], shape_t[0]), math.lcm(shape[1], shape_t[1]))
    up = (F.interpolate(m, size=size) - F.interpolate(m_t, size=size)).square().mean((-2, -1))
    assert per_map.shape == (4, 3)
    assert torch.allclose(per_map, up, rtol=1e-12, atol=0)


def test_scale_term_in_float32_matches_materialised(generator):
    m = torch.randn(8, 14, 7, 7, generator=generator) * 20
    m_t = torch.randn(8, 14, 6, 6, generator=generator) * 20
    assert torch.allclose(attention_consistency(m, m_t, "scale"), materialised_scale_mse(m, m_t), rtol=1e-5)


def test_scale_segments_cover_the_lcm_grid():
    rows, rows_t, lengths = transforms_module._common_segments(7, 6)
    assert sum(lengths) == 42
    assert len(lengths) == 7 + 6 - 1
    upsampled = torch.arange(7).repeat_interleave(6)
    upsampled_t = torch.arange(6).repeat_interleave(7)
    expanded = torch.tensor(rows).repeat_interleave(torch.tensor(lengths))
    expanded_t = torch.tensor(rows_t).repeat_interleave(torch.tensor(lengths))
    assert torch.equal(expanded, upsampled) and torch.equal(expanded_t, upsampled_t)


# ---------------------------------------------------------------- exact equivariance gives 0


def test_exactly_equivariant_flip_gives_zero(generator):
    m = torch.randn(2, 4, 7, 9, generator=generator)
    assert attention_consistency(m, m[..., torch.arange(8, -1, -1)], "flip").item() <= 1e-6


@pytest.mark.parametrize("angle", [90.0, 180.0, 270.0, -90.0, 450.0])
def test_exactly_equivariant_quarter_rotation_gives_zero(angle, generator):
    m = torch.randn(2, 4, 7, 7, generator=generator)
    turns = round(angle / 90) % 4
    m_t = m
    for _ in range(turns):  # counter-clockwise quarter turn: column j becomes row (w - 1 - j)
        m_t = m_t.transpose(-2, -1).flip(-2)
    assert attention_consistency(m, m_t, "rotate", angle).item() <= 1e-6


def test_exactly_equivariant_scale_gives_zero(generator):
    base = torch.randn(2, 3, 2, 2, generator=generator)  # 14 and 12 share the factor 2
    m = base.repeat_interleave(7, -2).repeat_interleave(7, -1)
    m_t = base.repeat_interleave(6, -2).repeat_interleave(6, -1)
    assert attention_consistency(m, m_t, "scale").item() <= 1e-6
    constant = torch.full((2, 3, 7, 7), 3.0), torch.full((2, 3, 6, 6), 3.0)
    assert attention_consistency(*constant, "scale").item() <= 1e-6


@pytest.mark.parametrize(("dx", "dy"), [(1 / 7, 0.0), (-2 / 7, 1 / 7), (0.0, -3 / 7)])
def test_whole_cell_translation_is_exact_and_masked(dx, dy, generator):
    m = torch.randn(2, 3, 7, 7, generator=generator)
    sx, sy = round(dx * 7), round(dy * 7)
    m_t = torch.randn(2, 3, 7, 7, generator=generator)  # cells shifted in from outside: anything
    valid = torch.zeros(7, 7, dtype=torch.bool)
    valid[max(sy, 0) : 7 + min(sy, 0), max(sx, 0) : 7 + min(sx, 0)] = True
    source = torch.zeros(7, 7, dtype=torch.bool)
    source[max(-sy, 0) : 7 - max(sy, 0), max(-sx, 0) : 7 - max(sx, 0)] = True
    m_t[..., valid] = m[..., source]
    assert attention_consistency(m, m_t, "translate", (dx, dy)).item() <= 1e-6
    noise = torch.randn(2, 3, 7, 7, generator=generator)
    got = attention_consistency(m, m_t - noise, "translate", (dx, dy))
    assert torch.allclose(got, noise[..., valid].square().mean(), rtol=1e-5)


def test_translation_is_resolution_free():
    image = torch.arange(224.0).expand(1, 1, 224, 224)
    heatmap = torch.arange(7.0).expand(1, 1, 7, 7)
    shift = Translate(dx=32 / 224)
    assert torch.equal(shift.apply_image(image)[..., 32:], image[..., :-32])
    assert torch.equal(shift.apply_image(image)[..., :32], torch.zeros(1, 1, 224, 32))
    moved, mask = shift.apply_heatmaps(heatmap)
    assert torch.equal(moved[..., 1:], heatmap[..., :-1])
    assert mask[..., 0].sum() == 0 and bool(mask[..., 1:].all())


def test_general_rotation_masks_corners_and_agrees_with_quarter_turn_path(generator):
    m = torch.randn(2, 3, 9, 9, generator=generator)
    rotated, mask = Rotate(degrees=30.0).apply_heatmaps(m, 30.0)
    assert mask.shape == (1, 1, 9, 9)
    assert not bool(mask[..., 0, 0]) and bool(mask[..., 4, 4])
    near, _ = Rotate().apply_heatmaps(m, 90.0 + 1e-4)  # through kornia
    exact, exact_mask = Rotate().apply_heatmaps(m, 90.0)  # through torch.rot90
    assert exact_mask is None
    assert torch.allclose(near, exact, atol=1e-3)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    assert torch.allclose(Rotate().apply_image(image, 90.0 + 1e-4), Rotate().apply_image(image, 90.0), atol=1e-3)


def test_general_rotation_loss_averages_valid_cells_only(generator):
    m = torch.randn(2, 3, 9, 9, generator=generator)
    rotated, mask = Rotate().apply_heatmaps(m, 30.0)
    m_t = rotated + 1.0 * mask - 100.0 * ~mask  # off by one on valid cells, garbage elsewhere
    assert torch.allclose(attention_consistency(m, m_t, "rotate", 30.0), torch.tensor(1.0), rtol=1e-5)


def test_fractional_translation_goes_through_kornia_with_mask(generator):
    m = torch.randn(2, 3, 7, 7, generator=generator)
    moved, mask = Translate(dx=0.1).apply_heatmaps(m)
    assert mask is not None and not bool(mask[..., 0].any()) and bool(mask[..., 1:].all())
    # 0.7 of a cell to the right: bilinear mix of a cell and its left neighbour
    expected = 0.3 * m[..., 1:] + 0.7 * m[..., :-1]
    assert torch.allclose(moved[..., 1:], expected, atol=1e-5)


def test_scale_image_and_heatmap_sizes():
    images = torch.randn(2, 3, 224, 224)
    assert Scale().apply_image(images).shape[-2:] == (192, 192)
    assert Scale(size=(96, 128)).apply_image(images).shape[-2:] == (96, 128)
    assert Scale(factor=288 / 256).apply_image(torch.randn(1, 3, 256, 256)).shape[-2:] == (288, 288)
    assert Scale().apply_heatmaps(torch.randn(2, 3, 7, 7))[0].shape[-2:] == (6, 6)


def test_image_transforms_keep_channels_last():
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert Scale(factor=0.75).apply_image(images).is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("name", "params", "shape_t"),
    [
        ("flip", None, (5, 6)),
        ("rotate", 90.0, (6, 5)),
        ("rotate", 30.0, (5, 6)),
        ("translate", (1 / 6, -1 / 5), (5, 6)),
        ("translate", (0.1, 0.05), (5, 6)),
        ("scale", None, (4, 5)),
    ],
)
def test_gradcheck_transform_and_loss(name, params, shape_t, generator):
    transform = get_transform(name)
    m = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(2, 2, *shape_t, generator=generator, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a: transform.apply_heatmaps(a, params)[0], (m,))
    assert gradcheck(lambda a, b: attention_consistency(a, b, transform, params), (m, m_t))


# ---------------------------------------------------------------- sampling and registry


def test_sampling_is_resolution_free_and_seeded():
    rotate = Rotate(degrees=(-30, 30))
    first = rotate.sample(torch.Generator().manual_seed(1))
    assert first == rotate.sample(torch.Generator().manual_seed(1))
    assert -30 <= first <= 30
    dx, dy = Translate(dx=(-0.2, 0.2), dy=(0.0, 0.1)).sample(torch.Generator().manual_seed(2))
    assert -0.2 <= dx <= 0.2 and 0 <= dy <= 0.1
    assert Flip().sample() is True and Flip(p=0.0).sample() is False
    assert 0.5 <= Scale(factor=(0.5, 0.9)).sample(torch.Generator().manual_seed(3)) <= 0.9


def test_random_transform_without_params_is_refused():
    with pytest.raises(ValueError, match="pass the params returned by sample"):
        Rotate(degrees=(-30, 30)).apply_image(torch.randn(1, 3, 8, 8))


class VerticalFlip(Transform):
    def apply_image(self, images, params=None):
        return images.flip(-2)

    def apply_heatmaps(self, heatmaps, params=None):
        return heatmaps.flip(-2), None


def test_user_transform_registers_and_works_in_the_loss(generator):
    register_transform("vflip", VerticalFlip, overwrite=True)
    try:
        assert "vflip" in available_transforms()
        transform = get_transform("vflip")
        assert transform.name == "vflip"
        m = torch.randn(2, 3, 7, 7, generator=generator)
        m_t = torch.randn(2, 3, 7, 7, generator=generator)
        assert torch.allclose(attention_consistency(m, m_t, "vflip"), F.mse_loss(m.flip(-2), m_t))
        with pytest.raises(ValueError, match="already registered"):
            register_transform("vflip", VerticalFlip)
    finally:
        transforms_module._REGISTRY.pop("vflip", None)


def test_register_as_decorator():
    @register_transform("identity_for_test")
    class Identity(Transform):
        def apply_image(self, images, params=None):
            return images

        def apply_heatmaps(self, heatmaps, params=None):
            return heatmaps, None

    try:
        assert isinstance(get_transform("identity_for_test"), Identity)
    finally:
        transforms_module._REGISTRY.pop("identity_for_test", None)


# ---------------------------------------------------------------- bad input


def test_unknown_transform_lists_available():
    with pytest.raises(ValueError, match=r"unknown transform 'shear'; available: flip, rotate, scale, translate"):
        get_transform("shear")


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Scale(factor=0), ValueError, r"factor must be > 0, got 0"),
        (lambda: Scale(factor=-1.5), ValueError, r"factor must be > 0"),
        (lambda: Scale(factor=0.5, size=100), ValueError, "either factor or size"),
        (lambda: Scale(size=(0, 5)), ValueError, "size must be a positive int"),
        (lambda: Rotate(degrees="ninety"), TypeError, r"degrees must be a number or a \(min, max\) pair of numbers, got str"),
        (lambda: Rotate(degrees=(30, -30)), ValueError, "min <= max"),
        (lambda: Translate(dx=1.5), ValueError, r"dx must lie in \(-1, 1\)"),
        (lambda: Flip(p=2), ValueError, r"p must be in \[0, 1\], got 2"),
        (lambda: get_transform("rotate", angle=3), TypeError, "angle"),
        (lambda: get_transform(Flip(), p=0.5), TypeError, "keyword arguments apply to a transform name"),
    ],
)
def test_invalid_parameters(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("transform", "params", "error", "match"),
    [
        (Rotate(), "ninety", TypeError, r"rotate params \(angle in degrees\) must be a number, got str"),
        (Scale(), -0.5, ValueError, "scale factor must be > 0, got -0.5"),
        (Translate(), 0.5, TypeError, r"translate params must be a \(dx, dy\) pair"),
        (Flip(), 1, TypeError, "flip params must be a bool"),
    ],
)
def test_invalid_sampled_params(transform, params, error, match):
    with pytest.raises(error, match=match):
        transform.apply_image(torch.randn(1, 3, 8, 8), params)


def test_images_must_be_4d():
    with pytest.raises(ValueError, match=r"images must be 4-D \(N, C, H, W\), got shape \(3, 8, 8\)"):
        Flip().apply_image(torch.randn(3, 8, 8))
