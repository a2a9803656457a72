import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from attn_consistency import (
    AttentionConsistencyLoss,
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
from attn_consistency.transforms import registry as transforms_registry
from attn_consistency.transforms import scale as transforms_scale


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
    rows, rows_t, lengths = transforms_scale._common_segments(7, 6)
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
        transforms_registry._REGISTRY.pop("vflip", None)


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
        transforms_registry._REGISTRY.pop("identity_for_test", None)


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
        (
            lambda: Rotate(degrees="ninety"),
            TypeError,
            r"degrees must be a number or a \(min, max\) pair of numbers, got str",
        ),
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


# ---------------------------------------------------------------- hostile input (issue 13)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Rotate(degrees=NAN), r"degrees must be a finite number, got nan"),
        (lambda: Rotate(degrees=(0.0, INF)), r"degrees must be a finite number, got inf"),
        (lambda: Scale(factor=INF), r"factor must be a finite number, got inf"),
        (lambda: Scale(factor=(NAN, 0.9)), r"factor must be a finite number, got nan"),
        (lambda: Translate(dx=NAN), r"dx must be a finite number, got nan"),
        (lambda: Translate(dy=(-INF, 0.1)), r"dy must be a finite number, got -inf"),
        (lambda: Flip(p=NAN), r"p must be a finite number, got nan"),
    ],
)
def test_non_finite_transform_parameters_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("transform", "params", "match"),
    [
        (Rotate(), NAN, r"rotate params \(angle in degrees\) must be a finite number, got nan"),
        (Rotate(), -INF, r"rotate params \(angle in degrees\) must be a finite number, got -inf"),
        (Scale(), NAN, r"scale params \(factor\) must be a finite number, got nan"),
        (Scale(), INF, r"scale params \(factor\) must be a finite number, got inf"),
        (Translate(), (NAN, 0.0), r"translate params \(dx\) must be a finite number, got nan"),
        (Translate(), (0.0, INF), r"translate params \(dy\) must be a finite number, got inf"),
    ],
)
@pytest.mark.parametrize("method", ["apply_image", "apply_heatmaps", "consistency", "attention_consistency"])
def test_non_finite_params_are_refused_everywhere(transform, params, match, method):
    m = torch.randn(1, 2, 8, 8)
    calls = {
        "apply_image": lambda: transform.apply_image(m, params),
        "apply_heatmaps": lambda: transform.apply_heatmaps(m, params),
        # Scale ignores its params here (the maps' sizes carry the scale) but still checks them.
        "consistency": lambda: transform.consistency(m, m, params),
        "attention_consistency": lambda: attention_consistency(m, m, transform, params),
    }
    with pytest.raises(ValueError, match=match):
        calls[method]()


def test_flip_params_nan_is_not_a_flag():
    with pytest.raises(TypeError, match=r"flip params must be a bool \(flip or not\), got float"):
        Flip().apply_heatmaps(torch.randn(1, 1, 3, 3), NAN)


@pytest.mark.parametrize("params", [(1.0, 0.0), (-1.0, 0.0), (8 / 7, 0.0), (-8 / 7, 0.0), (-10 / 7, 0.0), (0.0, 2.0)])
def test_shift_by_the_whole_size_or_more_is_refused(params):
    # Before: torch.roll wrapped a shift of -8/7 around and kept 6 of 7 columns "valid".
    axis = "dx" if params[0] else "dy"
    m = torch.randn(1, 2, 7, 7)
    match = rf"translate params \({axis}\) must lie in \(-1, 1\) \(a fraction of the size; a shift by the whole size"
    for call in (lambda: Translate().apply_heatmaps(m, params), lambda: Translate().apply_image(m, params)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("dx", [1 - 1e-7, -(1 - 1e-7)])
def test_shift_rounding_to_the_whole_width_leaves_no_valid_cell(dx, generator):
    m = torch.randn(2, 3, 7, 7, generator=generator)
    moved, mask = Translate(dx=dx).apply_heatmaps(m)  # 7 whole cells: the indexing path
    assert mask.shape == (1, 1, 7, 7) and not bool(mask.any())
    assert torch.equal(moved, torch.zeros_like(m))
    assert torch.equal(Translate(dx=dx).consistency(m, torch.randn(2, 3, 7, 7)), torch.zeros(2, 3))


@pytest.mark.parametrize("dx", [0.95, -0.95, 6.5 / 7])
def test_fractional_shift_of_nearly_the_width_leaves_no_valid_cell(dx, generator):
    m = torch.randn(2, 3, 7, 7, generator=generator)
    for align_corners in (False, True):
        _, mask = Translate(dx=dx, align_corners=align_corners).apply_heatmaps(m)  # kornia path
        assert not bool(mask.any())
    assert torch.equal(Translate(dx=dx).consistency(m, torch.randn(2, 3, 7, 7)), torch.zeros(2, 3))


def test_whole_cell_shift_up_to_the_border_does_not_wrap(generator):
    m = torch.randn(2, 3, 7, 7, generator=generator)
    moved, mask = Translate(dx=-6 / 7, dy=6 / 7).apply_heatmaps(m)
    expected = torch.zeros_like(m)
    expected[..., 6, 0] = m[..., 0, 6]
    assert torch.equal(moved, expected)
    assert mask.sum() == 1 and bool(mask[0, 0, 6, 0])


EMPTY_CASES = [
    ("flip", None, (7, 7), (7, 7)),
    ("rotate", 90.0, (7, 5), (5, 7)),
    ("rotate", 30.0, (7, 7), (7, 7)),
    ("translate", (1 / 7, 0.0), (7, 7), (7, 7)),
    ("translate", (0.1, 0.05), (7, 7), (7, 7)),
    ("scale", None, (7, 7), (6, 6)),
]


@pytest.mark.parametrize(("name", "params", "shape", "shape_t"), EMPTY_CASES)
@pytest.mark.parametrize(("n", "labels"), [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_labels_give_an_empty_per_map_result(name, params, shape, shape_t, n, labels):
    transform = get_transform(name)
    m, m_t = torch.randn(n, labels, *shape), torch.randn(n, labels, *shape_t)
    per_map = transform.consistency(m, m_t, params)
    assert per_map.shape == (n, labels) and per_map.dtype == m.dtype
    assert attention_consistency(m, m_t, transform, params, reduction="none").shape == (n, labels)


@pytest.mark.parametrize(("name", "params", "shape", "shape_t"), EMPTY_CASES)
@pytest.mark.parametrize("empty", [(0, 7), (7, 0)])
def test_zero_sized_maps_and_images_are_refused(name, params, shape, shape_t, empty):
    transform = get_transform(name)
    bad, good = torch.randn(2, 3, *empty), torch.randn(2, 3, *shape_t)
    shape_text = re.escape(str((2, 3, *empty)))
    with pytest.raises(
        ValueError, match=rf"heatmaps must have a non-empty spatial size \(h, w\), got shape {shape_text}"
    ):
        transform.apply_heatmaps(bad, params)
    with pytest.raises(
        ValueError, match=rf"images must have a non-empty spatial size \(H, W\), got shape {shape_text}"
    ):
        transform.apply_image(bad, params)
    with pytest.raises(
        ValueError, match=rf"^heatmaps must have a non-empty spatial size \(h, w\), got shape {shape_text}"
    ):
        transform.consistency(bad, good, params)
    with pytest.raises(
        ValueError, match=rf"heatmaps_t must have a non-empty spatial size \(h, w\), got shape {shape_text}"
    ):
        transform.consistency(torch.randn(2, 3, *shape), bad, params)


@pytest.mark.parametrize(("shape", "shape_t"), [((1, 1), (2, 2)), ((1, 1), (7, 7)), ((7, 7), (1, 1)), ((1, 3), (2, 1))])
def test_scale_term_with_one_cell_maps_equals_materialised(shape, shape_t, generator):
    m = torch.randn(3, 2, *shape, generator=generator, dtype=torch.float64)
    m_t = torch.randn(3, 2, *shape_t, generator=generator, dtype=torch.float64)
    assert torch.allclose(
        transforms_scale.scale_consistency(m, m_t).mean(), materialised_scale_mse(m, m_t), rtol=1e-12, atol=0
    )


def test_scale_sizes_round_to_at_least_one_cell():
    scale = Scale(factor=0.1)
    assert scale.output_size((1, 1)) == (1, 1)
    assert scale.output_size((3, 100)) == (1, 10)
    one = torch.randn(2, 3, 1, 1)
    resized, mask = Scale(factor=0.5).apply_heatmaps(one)
    assert mask is None and torch.equal(resized, one)
    assert Scale(factor=2.0).apply_heatmaps(one)[0].shape == (2, 3, 2, 2)
    assert Scale(factor=0.01).apply_image(torch.randn(1, 3, 20, 30)).shape == (1, 3, 1, 1)


def test_scale_term_of_mixed_dtypes_is_computed_in_the_wider_one(generator):
    m = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    m_t = torch.randn(2, 3, 6, 6, generator=generator)
    got = transforms_scale.scale_consistency(m, m_t)
    assert got.dtype == torch.float64
    assert torch.allclose(got.mean(), materialised_scale_mse(m, m_t.double()), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("m", "m_t", "match"),
    [
        (
            torch.randn(2, 3, 7, 7),
            torch.randn(3, 3, 6, 6),
            r"same batch size and number of labels, got \(N, L\) = \(2, 3\) and \(3, 3\)",
        ),
        (
            torch.randn(2, 3, 7, 7),
            torch.randn(2, 3, 6, 6, device="meta"),
            r"heatmaps and heatmaps_t must be on one device, got cpu and meta",
        ),
    ],
)
def test_scale_term_refuses_unmatched_batches(m, m_t, match):
    with pytest.raises(ValueError, match=match):
        transforms_scale.scale_consistency(m, m_t)
    with pytest.raises(ValueError, match=match):
        Flip().consistency(m, m_t)


def test_scale_to_a_fixed_size_gives_no_heatmap_size():
    with pytest.raises(
        ValueError, match=r"scale params: a scale to the fixed image size \(96, 128\) has no heatmap size"
    ):
        Scale(size=(96, 128)).apply_heatmaps(torch.randn(2, 3, 7, 7))
    with pytest.raises(ValueError, match=r"fixed image size \(4, 4\) has no heatmap size"):
        Scale().apply_heatmaps(torch.randn(2, 3, 7, 7), (4, 4))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Rotate(align_corners=1), TypeError, r"align_corners must be a bool, got int 1"),
        (lambda: Translate(align_corners="no"), TypeError, r"align_corners must be a bool, got str 'no'"),
        (lambda: Scale(antialias=None), TypeError, r"antialias must be a bool, got NoneType"),
        (lambda: Scale(factor=True), TypeError, r"factor must be a number or a \(min, max\) pair of numbers, got bool"),
        (lambda: Scale(factor=(0.5, "0.9")), TypeError, r"factor must be a number, got str"),
        (
            lambda: Scale(size=2.5),
            TypeError,
            r"size must be a positive int or an \(H, W\) pair of positive ints, got float 2.5",
        ),
        (
            lambda: Scale(size="ab"),
            TypeError,
            r"size must be a positive int or an \(H, W\) pair of positive ints, got str",
        ),
        (lambda: Scale(size=(True, 4)), TypeError, r"size must be a positive int or an \(H, W\) pair"),
        (
            lambda: Scale(size=(3, 4, 5)),
            ValueError,
            r"size must be a positive int or an \(H, W\) pair of positive ints, got \(3, 4, 5\)",
        ),
        (
            lambda: Scale(size=-3),
            ValueError,
            r"size must be a positive int or an \(H, W\) pair of positive ints, got -3",
        ),
        (
            lambda: Scale().output_size((0, 5)),
            ValueError,
            r"size must be a positive int or an \(H, W\) pair of positive ints, got \(0, 5\)",
        ),
        (
            lambda: Translate(dy=(0.5, 1.0)),
            ValueError,
            r"dy must lie in \(-1, 1\) \(a fraction of the size; .*\), got \(0.5, 1.0\)",
        ),
        (lambda: Flip(p=-0.1), ValueError, r"p must be in \[0, 1\], got -0.1"),
        (lambda: Flip(p=True), TypeError, r"p must be a number, got bool"),
    ],
)
def test_invalid_constructor_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("transform", "params", "error", "match"),
    [
        (
            Translate(),
            (0.1, 0.1, 0.1),
            ValueError,
            r"translate params must be a \(dx, dy\) pair of fractions, got \(0.1, 0.1, 0.1\)",
        ),
        (Translate(), "ab", TypeError, r"translate params must be a \(dx, dy\) pair of fractions, got 'ab'"),
        (Translate(), (0.1, "0"), TypeError, r"translate params \(dy\) must be a number, got str"),
        (
            Scale(),
            (0, 5),
            ValueError,
            r"scale params \(size\) must be a positive int or an \(H, W\) pair of positive ints, got \(0, 5\)",
        ),
        (Scale(), "ab", TypeError, r"scale params \(factor\) must be a number, got str"),
        (Scale(), True, TypeError, r"scale params \(factor\) must be a number, got bool"),
        (Rotate(), True, TypeError, r"rotate params \(angle in degrees\) must be a number, got bool"),
    ],
)
def test_invalid_params_types_and_lengths(transform, params, error, match):
    with pytest.raises(error, match=match):
        transform.apply_image(torch.randn(1, 3, 8, 8), params)


@pytest.mark.parametrize(
    "transform", [Transform(), Flip(p=0.5), Rotate((-30, 30)), Scale((0.5, 0.9)), Translate((-0.1, 0.1))]
)
def test_generator_of_the_wrong_type_is_refused(transform):
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        transform.sample(3)
    transform.sample(torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_generator_on_an_accelerator_is_refused():
    with pytest.raises(ValueError, match=r"generator must be a CPU torch.Generator .* got one on cuda"):
        Rotate((-30, 30)).sample(torch.Generator(device="cuda"))


def test_integer_images_exact_paths_work_and_sampled_paths_are_refused():
    images = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8)
    assert torch.equal(Flip().apply_image(images), images.flip(-1))
    assert torch.equal(Rotate().apply_image(images, 90.0), torch.rot90(images, 1, (-2, -1)))
    shifted = Translate(dx=1 / 8).apply_image(images)
    assert shifted.dtype == torch.uint8 and torch.equal(shifted[..., 1:], images[..., :-1])
    with pytest.raises(
        TypeError,
        match=r"images must be a floating-point tensor for a rotation by 30 degrees \(bilinear sampling\), got torch.uint8",
    ):
        Rotate().apply_image(images, 30.0)
    with pytest.raises(
        TypeError, match=r"images must be a floating-point tensor for a shift of \(0.8, 0\) pixels, not whole"
    ):
        Translate().apply_image(images, (0.1, 0.0))


class _MyFlip(Flip):
    pass


class _NamedVerticalFlip(VerticalFlip):
    name = "vertical"


def test_registered_name_is_the_transform_name(generator):
    # Before: a Flip subclass registered as "myflip" kept the name "flip", so a weight keyed
    # by "myflip" was ignored.
    register_transform("myflip", _MyFlip)
    register_transform("halfflip", lambda: Flip(p=0.5))
    register_transform("vflip2", _NamedVerticalFlip)
    try:
        assert get_transform("myflip").name == "myflip"
        assert get_transform("halfflip").name == "halfflip"
        assert get_transform("vflip2").name == "vflip2"
        # a registered subclass that inherited its name answers to the registered one, also when made
        # directly; a class that names itself keeps its name
        assert _MyFlip().name == "myflip" and _NamedVerticalFlip().name == "vertical"
        direct = AttentionConsistencyLoss(weights={"myflip": 0.0})
        assert float(direct(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), _MyFlip())) == 0.0
        assert [get_transform(n).name for n in ("flip", "rotate", "scale", "translate")] == [
            "flip",
            "rotate",
            "scale",
            "translate",
        ]
        m = torch.randn(2, 3, 7, 7, generator=generator)
        m_t = torch.randn(2, 3, 7, 7, generator=generator)
        weighted = AttentionConsistencyLoss(weights={"myflip": 0.25})(m, m_t, "myflip")
        assert torch.allclose(weighted, 0.25 * F.mse_loss(m.flip(-1), m_t), rtol=1e-6, atol=0)
    finally:
        for name in ("myflip", "halfflip", "vflip2"):
            transforms_registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((3, Flip), {}, TypeError, r"name must be a str, got int"),
        (("", Flip), {}, ValueError, r"name must be a letter or '_' followed by letters, digits, '_' or '-', got ''"),
        (("flip@224", Flip), {}, ValueError, r"name must be .*, got 'flip@224'"),
        ((" flip", Flip), {}, ValueError, r"name must be .*, got ' flip'"),
        (("2flip", Flip), {}, ValueError, r"got '2flip'"),
        (("notcallable", 3), {}, TypeError, r"factory must be a Transform subclass or a callable, got int"),
        (
            ("notatransform", int),
            {},
            TypeError,
            r"factory must be a Transform subclass or a callable, got the class int",
        ),
        (("anything", Flip), {"overwrite": 1}, TypeError, r"overwrite must be a bool, got int 1"),
    ],
)
def test_register_refuses_bad_names_and_factories(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        register_transform(*args, **kwargs)
    assert available_transforms() == sorted(["flip", "rotate", "scale", "translate"])


def test_get_transform_refuses_a_class_and_other_types():
    with pytest.raises(
        TypeError, match=r"transform must be a name or a Transform instance, got the class Flip: pass Flip\(\)"
    ):
        get_transform(Flip)
    with pytest.raises(TypeError, match=r"transform must be a name or a Transform, got int"):
        get_transform(3)
