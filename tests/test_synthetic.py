"""Tests of the synthetic shapes dataset and the pointing game (examples/synthetic.py)."""

import math

import pytest
import torch

from examples.synthetic import (
    SHAPE_NAMES,
    SyntheticShapes,
    pointing_game,
    pointing_game_hits,
    pointing_game_per_label,
)


@pytest.fixture(scope="module")
def data() -> SyntheticShapes:
    # 300 images: more than one rendering chunk (256), so chunk boundaries are covered too.
    return SyntheticShapes(300, image_size=64, seed=7, split="train")


def _peak_maps(shape: tuple[int, ...], peaks: dict[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """Heatmaps of small noise with a maximum of 10 at ``peaks[(n, l)] = (row, col)``."""
    heatmaps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for (n, label), (row, col) in peaks.items():
        heatmaps[n, label, row, col] = 10.0
    return heatmaps


# Three images, 64x64 px, three labels; with 8x8 heatmaps a cell is 8 px wide, cell (i, j) has
# its centre at (8j + 4, 8i + 4).
MIX_BOXES = [
    [(0, 8, 8, 24, 24), (1, 40, 40, 56, 56)],
    [(2, 0, 48, 16, 64), (2, 48, 0, 64, 16)],
    [(0, 30, 30, 34, 34), (1, 0, 0, 8, 8)],
]
MIX_TARGETS = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
MIX_PEAKS = {
    (0, 0): (1, 1),  # centre (12, 12): inside the box
    (0, 1): (0, 0),  # centre (4, 4): 36 px left of the box
    (0, 2): (4, 4),  # absent label: ignored
    (1, 2): (0, 7),  # centre (60, 4): inside the second box of label 2
    (2, 0): (4, 4),  # centre (36, 36): 2 px right of and below the box, within half a cell (4 px)
    (2, 1): (7, 7),  # centre (60, 60): far from the box
}


# --- dataset -------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_data(data: SyntheticShapes) -> None:
    again = SyntheticShapes(300, image_size=64, seed=7, split="train")
    assert torch.equal(again.images, data.images)
    assert torch.equal(again.targets, data.targets)
    assert torch.equal(again.instance_masks, data.instance_masks)
    assert again.boxes == data.boxes


def test_other_seed_or_split_gives_other_images() -> None:
    reference = SyntheticShapes(20, seed=1, split="train")
    for other in (SyntheticShapes(20, seed=2, split="train"), SyntheticShapes(20, seed=1, split="test")):
        assert other.boxes != reference.boxes
        # Every single image differs, not only some of them.
        assert bool((other.images != reference.images).flatten(1).any(1).all())


def test_tensors_have_the_documented_shapes_and_types(data: SyntheticShapes) -> None:
    assert data.images.shape == (300, 3, 64, 64) and data.images.dtype == torch.float32
    assert data.targets.shape == (300, 6) and data.targets.dtype == torch.float32
    assert data.instance_masks.shape == (300, 64, 64) and data.instance_masks.dtype == torch.uint8
    assert len(data) == 300 and len(data.boxes) == 300
    assert data.label_names == SHAPE_NAMES[:6] == ("disc", "square", "triangle", "ring", "cross", "bar")
    assert data.encoding == "binary"
    image, target = data[-1]
    assert torch.equal(image, data.images[299]) and torch.equal(target, data.targets[299])


def test_targets_are_the_labels_of_the_boxes(data: SyntheticShapes) -> None:
    assert set(data.targets.unique().tolist()) == {0.0, 1.0}
    for target, boxes in zip(data.targets, data.boxes, strict=True):
        assert 1 <= len(boxes) <= 3
        assert set(target.nonzero().flatten().tolist()) == {label for label, *_ in boxes}


# Per class: share of the box covered by the shape, and whether the pixels at five points of the
# box are covered (None: too close to an edge to tell). Points in box coordinates from -1 to 1,
# y down: the centre, three points on the diagonal towards the top-left corner, and the middle
# of the left side near the edge.
SIGNATURE_POINTS = ((0.0, 0.0), (-0.2, -0.2), (-0.4, -0.4), (-0.6, -0.6), (-0.8, 0.0))
SHAPE_SIGNATURES = {
    "disc": (math.pi / 4, (True, True, True, True, True)),
    "square": (1.0, (True, True, True, True, True)),
    "triangle": (0.5, (True, True, False, False, False)),
    "ring": (math.pi / 4 * (1 - 0.4**2), (False, False, True, True, True)),
    "cross": (1 - 0.7**2, (True, True, False, False, True)),
    "bar": (1.0, (True, True, True, True, True)),
    "diamond": (0.5, (True, True, True, False, True)),
    "frame": (1 - 0.4**2, (False, False, None, True, True)),
}


def test_each_class_draws_its_own_shape() -> None:
    data = SyntheticShapes(160, image_size=128, num_classes=8, seed=11)  # large shapes, sharp tests
    fills, aspects, covered = {}, {}, {}
    for i, boxes in enumerate(data.boxes):
        for j, (label, x0, y0, x1, y1) in enumerate(boxes):
            mask = data.instance_masks[i, y0:y1, x0:x1] == j + 1
            height, width = mask.shape
            name = data.label_names[label]
            fills.setdefault(name, []).append(float(mask.float().mean()))
            aspects.setdefault(name, []).append(width / height)
            covered.setdefault(name, []).append(
                [bool(mask[int((v + 1) / 2 * height), int((u + 1) / 2 * width)]) for u, v in SIGNATURE_POINTS]
            )
    assert set(fills) == set(SHAPE_NAMES)
    for name, (fill, points) in SHAPE_SIGNATURES.items():
        assert abs(float(torch.tensor(fills[name]).median()) - fill) < 0.03, name
        share = torch.tensor(covered[name]).float().mean(0)
        for expected, measured in zip(points, share.tolist(), strict=True):
            if expected is not None:
                assert measured > 0.9 if expected else measured < 0.1, (name, share)
        aspect = float(torch.tensor(aspects[name]).median())
        assert (2.0 < aspect < 4.0) if name == "bar" else (0.8 < aspect < 1.25), name


def test_every_class_and_object_count_occurs(data: SyntheticShapes) -> None:
    assert bool((data.targets.sum(0) >= 30).all())  # about 90 positives per label expected
    counts = [len(boxes) for boxes in data.boxes]
    assert {counts.count(c) >= 60 for c in (1, 2, 3)} == {True}


def test_boxes_are_inside_the_image_and_disjoint(data: SyntheticShapes) -> None:
    for boxes in data.boxes:
        for label, x0, y0, x1, y1 in boxes:
            assert all(isinstance(v, int) for v in (label, x0, y0, x1, y1))
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for a in range(len(boxes)):
            for b in range(a):
                (_, ax0, ay0, ax1, ay1), (_, bx0, by0, bx1, by1) = boxes[a], boxes[b]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_each_box_is_the_tight_box_of_its_object_mask(data: SyntheticShapes) -> None:
    for i, boxes in enumerate(data.boxes):
        masks = data.instance_masks[i]
        assert int(masks.max()) == len(boxes)
        for j, (_, x0, y0, x1, y1) in enumerate(boxes):
            rows, cols = (masks == j + 1).nonzero(as_tuple=True)
            tight = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
            assert tight == (x0, y0, x1, y1)


def test_objects_stand_out_from_the_background_around_them(data: SyntheticShapes) -> None:
    raw = SyntheticShapes.denormalize(data.images)
    contrasts = []
    for i, boxes in enumerate(data.boxes):
        masks = data.instance_masks[i]
        for j, (_, x0, y0, x1, y1) in enumerate(boxes):
            around = torch.zeros(64, 64, dtype=torch.bool)
            around[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True
            around &= masks == 0
            inside = raw[i][:, masks == j + 1].mean(1)
            contrasts.append(float((inside - raw[i][:, around].mean(1)).norm()))
    # Object colours are drawn >= 0.45 away (RGB, [0, 1]) from the mean background under them;
    # anti-aliased edges and pixel noise in the 2-px frame lower the measured contrast a little.
    assert min(contrasts) > 0.25


def test_object_colour_does_not_reveal_the_class(data: SyntheticShapes) -> None:
    raw = SyntheticShapes.denormalize(data.images)
    colour_sum, count = torch.zeros(6, 3), torch.zeros(6)
    for i, boxes in enumerate(data.boxes):
        for j, (label, *_) in enumerate(boxes):
            colour_sum[label] += raw[i][:, data.instance_masks[i] == j + 1].mean(1)
            count[label] += 1
    mean_colour = colour_sum / count[:, None]
    assert float((mean_colour - mean_colour.mean(0)).abs().max()) < 0.1


def test_images_are_roughly_standardised(data: SyntheticShapes) -> None:
    mean, std = data.images.mean((0, 2, 3)), data.images.std((0, 2, 3))
    assert bool((mean.abs() < 0.1).all()) and bool(((std - 1.0).abs() < 0.1).all())
    raw = SyntheticShapes.denormalize(data.images)
    assert float(raw.min()) >= -1e-6 and float(raw.max()) <= 1.0 + 1e-6


def test_generation_restores_the_thread_count() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        SyntheticShapes(4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_other_size_classes_and_object_count() -> None:
    data = SyntheticShapes(120, image_size=96, num_classes=8, max_objects=4, seed=3, split="val")
    assert data.images.shape == (120, 3, 96, 96) and data.label_names == SHAPE_NAMES
    assert bool((data.targets.sum(0) > 0).all())
    assert max(len(b) for b in data.boxes) == 4
    assert all(0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 for b in data.boxes for _, x0, y0, x1, y1 in b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_images": 2.0}, TypeError, "num_images must be an int"),
        ({"num_images": 0}, ValueError, "num_images must be >= 1"),
        ({"image_size": 16}, ValueError, "image_size must be >= 32"),
        ({"num_classes": 9}, ValueError, r"num_classes must be in \[1, 8\]"),
        ({"max_objects": True}, TypeError, "max_objects must be an int"),
        ({"split": "tarin"}, ValueError, "split must be one of"),
        ({"min_size": 0.1}, ValueError, "min_size"),
        ({"min_size": 0.5, "max_size": 0.4}, ValueError, "max_size"),
        ({"max_size": "big"}, TypeError, "max_size must be a float"),
    ],
)
def test_constructor_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SyntheticShapes(**{"num_images": 4, **kwargs})


# --- pointing game ------------------------------------------------------------------------


def test_peak_at_the_box_centre_scores_one(data: SyntheticShapes) -> None:
    n = 100
    coarse, fine = {}, {}
    for i, boxes in enumerate(data.boxes[:n]):
        for label, x0, y0, x1, y1 in boxes:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            coarse[(i, label)] = (int(cy // 8), int(cx // 8))  # the 8x8 cell holding the centre
            fine[(i, label)] = (int(cy), int(cx))  # the pixel holding the centre
    targets = data.targets[:n]
    assert pointing_game(_peak_maps((n, 6, 8, 8), coarse), targets, data.boxes[:n], 64) == 1.0
    assert pointing_game(_peak_maps((n, 6, 64, 64), fine), targets, data.boxes[:n], 64, tolerance=0) == 1.0


def test_peak_in_a_far_corner_scores_zero() -> None:
    boxes = [[(0, 40, 40, 60, 60)], [(1, 2, 2, 20, 20)]]
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    heatmaps = _peak_maps((2, 2, 7, 7), {(0, 0): (0, 0), (1, 1): (6, 6)})
    assert pointing_game(heatmaps, targets, boxes, 64) == 0.0
    assert pointing_game(heatmaps, targets, boxes, 64, tolerance=10) == 0.0


def test_known_mix_gives_the_exact_fraction() -> None:
    heatmaps = _peak_maps((3, 3, 8, 8), MIX_PEAKS)
    hits = pointing_game_hits(heatmaps, MIX_TARGETS, MIX_BOXES, 64)
    expected = torch.tensor([[True, False, False], [False, False, True], [True, False, False]])
    assert torch.equal(hits, expected)
    assert pointing_game(heatmaps, MIX_TARGETS, MIX_BOXES, 64) == 3 / 5
    per_label = pointing_game_per_label(heatmaps, MIX_TARGETS, MIX_BOXES, 64)
    assert per_label.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(("tolerance", "expected"), [(None, 3 / 5), (0, 2 / 5), (2.0, 2 / 5), (2.5, 3 / 5)])
def test_tolerance_enlarges_the_boxes(tolerance: float | None, expected: float) -> None:
    # Only the peak at (36, 36) next to the box (30, 30, 34, 34) depends on the tolerance:
    # it is 2 px away, and the enlarged box is open (2 px exactly is a miss).
    heatmaps = _peak_maps((3, 3, 8, 8), MIX_PEAKS)
    assert pointing_game(heatmaps, MIX_TARGETS, MIX_BOXES, 64, tolerance=tolerance) == expected


def test_default_tolerance_means_the_argmax_cell_overlaps_the_box() -> None:
    # Cell (0, 2) of an 8x8 grid on 64 px covers x in [16, 24): it touches the boxes that end at
    # x = 16 or start at x = 24 (no area in common) and overlaps those ending at 17 or starting at 23.
    heatmaps = _peak_maps((1, 1, 8, 8), {(0, 0): (0, 2)})
    target = torch.ones(1, 1)
    assert pointing_game(heatmaps, target, [[(0, 0, 0, 16, 8)]], 64) == 0.0
    assert pointing_game(heatmaps, target, [[(0, 0, 0, 17, 8)]], 64) == 1.0
    assert pointing_game(heatmaps, target, [[(0, 24, 0, 40, 8)]], 64) == 0.0
    assert pointing_game(heatmaps, target, [[(0, 23, 0, 40, 8)]], 64) == 1.0


def test_cells_map_to_pixels_per_axis() -> None:
    # 4x4 heatmaps on 32x64 images: cells are 8 px high and 16 px wide.
    boxes = [[(0, 48, 0, 64, 8)], [(0, 0, 24, 16, 32)]]
    targets = torch.ones(2, 1)
    heatmaps = _peak_maps((2, 1, 4, 4), {(0, 0): (0, 3), (1, 0): (3, 0)})
    assert pointing_game(heatmaps, targets, boxes, (32, 64), tolerance=0) == 1.0
    swapped = _peak_maps((2, 1, 4, 4), {(0, 0): (3, 0), (1, 0): (0, 3)})
    assert pointing_game(swapped, targets, boxes, (32, 64), tolerance=0) == 0.0


def test_ties_take_the_first_cell_and_gradients_are_accepted() -> None:
    heatmaps = torch.zeros(1, 1, 4, 4, requires_grad=True)
    target = torch.ones(1, 1)
    assert pointing_game(heatmaps, target, [[(0, 0, 0, 8, 8)]], 32, tolerance=0) == 1.0
    assert pointing_game(heatmaps, target, [[(0, 24, 24, 32, 32)]], 32, tolerance=0) == 0.0


def test_per_label_is_nan_for_a_label_never_present() -> None:
    heatmaps = _peak_maps((1, 2, 4, 4), {(0, 0): (0, 0)})
    per_label = pointing_game_per_label(heatmaps, torch.tensor([[1.0, 0.0]]), [[(0, 0, 0, 8, 8)]], 32)
    assert per_label[0] == 1.0 and math.isnan(per_label[1])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"heatmaps": [[0.0]]}, TypeError, "heatmaps must be a torch.Tensor"),
        ({"targets": [[1.0, 0.0]]}, TypeError, "targets must be a torch.Tensor"),
        ({"heatmaps": torch.zeros(1, 2, 4)}, ValueError, r"heatmaps must have shape \(N, L, h, w\)"),
        ({"targets": torch.ones(1, 3)}, ValueError, r"targets must have shape \(N, L\) = \(1, 2\)"),
        ({"heatmaps": torch.zeros(1, 2, 40, 4)}, ValueError, "larger than image_size 32x32"),
        ({"image_size": (32,)}, ValueError, "image_size must be a positive int or a pair"),
        ({"image_size": 0}, ValueError, "image_size must be a positive int"),
        ({"heatmaps": torch.full((1, 2, 4, 4), math.nan)}, ValueError, "non-finite"),
        ({"tolerance": -1.0}, ValueError, "tolerance must be None or a finite number >= 0"),
        ({"boxes": []}, ValueError, r"boxes must be a sequence of N = 1"),
        ({"boxes": [[(0, 0, 0, 8)]]}, ValueError, r"boxes\[0\]\[0\] must be \(label, x0, y0, x1, y1\)"),
        (
            {"boxes": [[(2, 0, 0, 8, 8)]]},
            ValueError,
            r"boxes\[0\]\[0\] has label 2, expected an int in \[0, 2",
        ),
        ({"boxes": [[(0.0, 0, 0, 8, 8)]]}, ValueError, r"boxes\[0\]\[0\] has label 0.0"),
        ({"boxes": [[(0, 8, 0, 0, 8)]]}, ValueError, r"boxes\[0\]\[0\] must have x0 <= x1"),
        ({"targets": torch.tensor([[1.0, 1.0]])}, ValueError, r"targets\[0, 1\] is positive but boxes\[0\]"),
        ({"targets": torch.zeros(1, 2)}, ValueError, "no present label"),
    ],
)
def test_pointing_game_errors(change: dict, error: type[Exception], match: str) -> None:
    arguments = {
        "heatmaps": torch.zeros(1, 2, 4, 4),
        "targets": torch.tensor([[1.0, 0.0]]),
        "boxes": [[(0, 0, 0, 8, 8)]],
        "image_size": 32,
        "tolerance": None,
    }
    with pytest.raises(error, match=match):
        pointing_game(**{**arguments, **change})
