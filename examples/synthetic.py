"""A synthetic multi-label image dataset with ground-truth boxes, generated in code.

Every image shows 1 to ``max_objects`` non-overlapping shapes (disc, square, triangle, ring,
cross, horizontal bar, diamond, frame) on a random background (smooth gradient, stripes or
smooth colour noise). Colours and sizes are drawn independently of the class, so only the
outline tells the classes apart. All shapes are symmetric about the vertical axis: labels are
invariant under the horizontal flip and the scaling used by the attention consistency loss.
A 90-degree rotation, on the other hand, turns bars vertical and triangles sideways, which the
dataset never shows.

The boxes let :func:`pointing_game` score how well class activation maps localise objects.

Example:
    >>> data = SyntheticShapes(256, image_size=64, seed=0, split="train")
    >>> image, target = data[0]
    >>> image.shape, target.shape
    (torch.Size([3, 64, 64]), torch.Size([6]))
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "SHAPE_NAMES",
    "GeneratedImages",
    "SyntheticShapes",
    "check_sizes",
    "one_thread",
    "pointing_game",
    "pointing_game_hits",
    "pointing_game_per_label",
]

SHAPE_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "bar", "diamond", "frame")
"""Class names, in label order; a dataset with ``num_classes = L`` uses the first ``L``."""

_SPLITS = ("train", "val", "test")
# Per-channel statistics of the raw [0, 1] images, measured on 17,000 images of sizes 32 to 128
# (mean 0.50, std 0.29 to 0.30); fixed constants rather than per-dataset statistics, so that every
# split is normalised the same way.
_MEAN = (0.50, 0.50, 0.50)
_STD = (0.29, 0.29, 0.29)
# Half-height of the bar relative to its half-width; the other shapes fill their box.
_BAR_HALF_HEIGHT = 0.35
# Pixels rendered at once (64 images of 64x64): it bounds the work tensors to a few MB, and was
# as fast as or faster than chunks 4x larger or smaller (measured at 64 and 128 px).
_CHUNK_PIXELS = 64 * 64 * 64
_PLACEMENT_TRIES = 64  # random positions tried per object before the object is skipped
_COLOUR_TRIES = 16  # random colours tried per object to find one far from the local background
_MIN_CONTRAST = 0.45  # RGB distance in [0, 1] units between an object and its local background
_GAP = 2.0  # pixels kept free between the boxes of two objects, so that none is occluded


def _shape_sdf(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a shape in box-normalised coordinates.

    ``u`` and ``v`` are the offsets from the object's centre divided by its half-width and
    half-height, so every shape spans ``[-1, 1]`` along ``u`` (and along ``v`` except the bar).
    """
    au, av = u.abs(), v.abs()
    name = SHAPE_NAMES[shape]
    if name == "disc":
        return torch.sqrt(u * u + v * v) - 1.0
    if name == "square":
        return torch.maximum(au, av) - 1.0
    if name == "triangle":  # apex up: vertices (0, -1), (-1, 1), (1, 1) with y pointing down
        return torch.maximum(v - 1.0, (2.0 * au - v - 1.0) / math.sqrt(5.0))
    if name == "ring":  # outer radius 1, inner radius 0.4
        return (torch.sqrt(u * u + v * v) - 0.7).abs() - 0.3
    if name == "cross":
        return torch.minimum(torch.maximum(au - 1.0, av - 0.3), torch.maximum(au - 0.3, av - 1.0))
    if name == "bar":
        return torch.maximum(au - 1.0, av - _BAR_HALF_HEIGHT)
    if name == "diamond":
        return (au + av - 1.0) / math.sqrt(2.0)
    return (torch.maximum(au, av) - 0.7).abs() - 0.3  # frame: a square with a square hole


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting afterwards.

    Generation is many element-wise ops on a few million values: extra threads gave no speed-up
    (2000 images at 64 px took 1.7 s on 2 cores either way) but made it much slower when other
    processes shared the CPU. One thread also makes the reductions, hence the data,
    independent of the machine's thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator)


def _derive_seed(seed: int, split: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{split}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_sizes(min_size: object, max_size: object, image_size: int) -> None:
    """Refuse object sizes (fractions of ``image_size``) below 8 pixels, above 0.8 of it, or reversed."""
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 8.0 <= min_size * image_size <= max_size * image_size <= 0.8 * image_size:
        raise ValueError(
            "need 8 <= min_size * image_size <= max_size * image_size <= 0.8 * image_size, "
            f"got min_size={min_size}, max_size={max_size}, image_size={image_size}"
        )


class GeneratedImages(Dataset):
    """A multi-label dataset materialised as tensors: ``images``, ``targets`` and ``boxes``.

    Subclasses fill the tensors and set the normalisation constants ``mean`` and ``std``.
    """

    encoding = "binary"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_images: int
    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    @classmethod
    def denormalize(cls, images: torch.Tensor) -> torch.Tensor:
        """Map normalised images (``(..., 3, H, W)``) back to ``[0, 1]`` RGB, e.g. for overlays."""
        mean = images.new_tensor(cls.mean).view(3, 1, 1)
        std = images.new_tensor(cls.std).view(3, 1, 1)
        return images * std + mean


class SyntheticShapes(GeneratedImages):
    """Multi-label images of coloured shapes, materialised once as tensors.

    Image ``i`` holds between 1 and ``max_objects`` objects (uniformly many; an object that finds
    no free place after 64 random tries is skipped: a few percent of objects with the default
    sizes, 7,778 placed of about 8,000 drawn in 4,000 images). Each object has a class drawn uniformly from the first ``num_classes`` entries of
    :data:`SHAPE_NAMES` (a class may appear twice in one image), a box side drawn uniformly in
    ``[min_size, max_size] * image_size`` pixels with an aspect ratio in ``[0.8, 1.25]`` (a bar
    keeps the width and 0.35 of the height), a random position fully inside the image, and a random colour at least 0.45 (RGB distance in
    ``[0, 1]`` units) away from the mean background colour under it. Objects do not overlap:
    their boxes stay 2 pixels apart. Edges are anti-aliased and Gaussian pixel noise is added.

    Images are normalised with fixed constants (``(x - 0.5) / 0.29`` per channel), which gives
    roughly zero mean and unit standard deviation; :meth:`denormalize` undoes it.

    The data depend only on ``(num_images, image_size, num_classes, max_objects, min_size,
    max_size, seed, split)``: the same arguments give bit-identical tensors (with a given torch
    build), whatever the thread settings, and another seed or split gives other images.

    Args:
        num_images: number of images ``N``.
        image_size: side ``S`` of the square images, in pixels (at least 32).
        num_classes: number of labels ``L``, from 1 to 8.
        max_objects: largest number of objects in one image.
        min_size: smallest box side as a fraction of ``image_size`` (at least 8 pixels).
        max_size: largest box side as a fraction of ``image_size`` (at most 0.8).
        seed: random seed.
        split: ``"train"``, ``"val"`` or ``"test"``; mixed into the seed so that splits differ.

    Attributes:
        images: ``(N, 3, S, S)`` float32, normalised.
        targets: ``(N, L)`` float32 in {0, 1}.
        boxes: ``boxes[i]`` lists the objects of image ``i`` as ``(label, x0, y0, x1, y1)``: ints,
            in pixels, the tight box of the pixels at least half covered by the object, ``x1`` and
            ``y1`` exclusive (columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``).
        instance_masks: ``(N, S, S)`` uint8; 0 for background, ``j + 1`` where a pixel is at least
            half covered by object ``boxes[i][j]``.
        label_names: class names, ``L`` of them.
        encoding: ``"binary"``: targets are 0/1 (no "unspecified" entries).

    Example:
        >>> data = SyntheticShapes(8, num_classes=4, max_objects=2, seed=1, split="val")
        >>> data.label_names
        ('disc', 'square', 'triangle', 'ring')
        >>> all(set(data.targets[i].nonzero().flatten().tolist()) == {b[0] for b in data.boxes[i]}
        ...     for i in range(len(data)))
        True
    """

    mean = _MEAN
    std = _STD

    def __init__(
        self,
        num_images: int,
        image_size: int = 64,
        num_classes: int = 6,
        max_objects: int = 3,
        min_size: float = 0.25,
        max_size: float = 0.45,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.num_images = _check_int("num_images", num_images, 1)
        self.image_size = _check_int("image_size", image_size, 32)
        self.num_classes = _check_int("num_classes", num_classes, 1, len(SHAPE_NAMES))
        self.max_objects = _check_int("max_objects", max_objects, 1)
        self.seed = _check_int("seed", seed, 0)
        check_sizes(min_size, max_size, image_size)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.min_size, self.max_size, self.split = float(min_size), float(max_size), split
        self.label_names: tuple[str, ...] = SHAPE_NAMES[:num_classes]

        size = self.image_size
        generator = torch.Generator().manual_seed(_derive_seed(seed, split))
        self.images = torch.empty(num_images, 3, size, size)
        self.targets = torch.zeros(num_images, num_classes)
        self.instance_masks = torch.zeros(num_images, size, size, dtype=torch.uint8)
        self.boxes: list[list[tuple[int, int, int, int, int]]] = []
        chunk = max(1, _CHUNK_PIXELS // size**2)
        with one_thread():
            for start in range(0, num_images, chunk):
                self._render_chunk(slice(start, min(start + chunk, num_images)), generator)

    def _render_chunk(self, rows: slice, generator: torch.Generator) -> None:
        n, size, num_obj = rows.stop - rows.start, self.image_size, self.max_objects
        image = _background(n, size, generator)
        count = torch.randint(1, num_obj + 1, (n,), generator=generator)
        labels = torch.randint(0, self.num_classes, (n, num_obj), generator=generator)
        centres, half = self._place(labels, count, generator)  # (n, K, 2), (n, K, 2) in pixels
        colour_candidates = _uniform(generator, n, num_obj, _COLOUR_TRIES, 3)
        noise = torch.randn(n, 3, size, size, generator=generator) * (0.05 * _uniform(generator, n, 1, 1, 1))

        # Each object is drawn in a square window around its box (a quarter of the image with
        # the default sizes) rather than over the whole image; 4 px of margin hold the soft edge.
        win = min(size, math.ceil(2.0 * float(half.max())) + 4)
        offsets = torch.arange(win)
        every = torch.arange(n).view(n, 1, 1)
        placed = torch.zeros(n, num_obj, dtype=torch.bool)
        tight = torch.zeros(n, num_obj, 4, dtype=torch.long)
        instance = torch.zeros(n, size, size, dtype=torch.uint8)
        for k in range(num_obj):
            origin = (centres[:, k] - win / 2.0).floor().clamp(0, size - win).long()  # (n, 2): x, y
            ix, iy = origin[:, 0, None] + offsets, origin[:, 1, None] + offsets  # (n, win)
            alpha = torch.zeros(n, win, win)
            for shape in range(self.num_classes):
                idx = (half[:, k, 0] > 0).logical_and(labels[:, k] == shape).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                cx, cy = centres[idx, k, 0, None, None], centres[idx, k, 1, None, None]
                rx, ry = half[idx, k, 0, None, None], half[idx, k, 1, None, None]
                if SHAPE_NAMES[shape] == "bar":  # half[..., 1] is the box half-height
                    ry = ry / _BAR_HALF_HEIGHT
                u = (ix[idx, None, :] + 0.5 - cx) / rx  # pixel centres, in units of the half-extent
                v = (iy[idx, :, None] + 0.5 - cy) / ry
                # Scale the distance to pixels so that edges are anti-aliased over one pixel.
                alpha[idx] = (0.5 - _shape_sdf(shape, u, v) * torch.minimum(rx, ry)).clamp(0.0, 1.0)
            mask = alpha >= 0.5  # (n, win, win); all false where no object k
            cols, lines = mask.any(1), mask.any(2)
            placed[:, k] = cols.any(1)
            first = torch.stack([_first_true(cols), _first_true(lines)], 1)
            last = torch.stack([_first_true(cols.flip(1)), _first_true(lines.flip(1))], 1)
            tight[:, k] = torch.cat([origin + first, origin + win - last], 1)

            where = (every, slice(None), iy[:, :, None], ix[:, None, :])
            patch = image[where]  # (n, win, win, 3)
            background = (patch * mask[..., None]).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)[:, None]
            colour = _far_colour(colour_candidates[:, k], background)
            image[where] = patch + (colour[:, None, None, :] - patch) * alpha[..., None]
            where = (every, iy[:, :, None], ix[:, None, :])
            instance[where] = torch.where(mask, k + 1, instance[where])

        # Renumber instances so that j + 1 refers to boxes[i][j] once skipped objects are dropped.
        rank = torch.cat([torch.zeros(n, 1, dtype=torch.long), placed.long().cumsum(1)], 1)
        instance = rank.gather(1, instance.long().flatten(1)).view(n, size, size)
        self.instance_masks[rows] = instance.to(torch.uint8)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        self.images[rows] = ((image + noise).clamp(0.0, 1.0) - mean) / std
        self.targets[rows] = F.one_hot(labels, self.num_classes).mul(placed[..., None]).amax(1).to(self.targets.dtype)
        for lab, box, keep in zip(labels.tolist(), tight.tolist(), placed.tolist(), strict=True):
            self.boxes.append([(c, *b) for c, b, p in zip(lab, box, keep, strict=True) if p])

    def _place(
        self, labels: torch.Tensor, count: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw non-overlapping boxes; returns centres and half-extents, half-extent 0 if skipped."""
        n, num_obj = labels.shape
        size, tries = self.image_size, _PLACEMENT_TRIES
        side = self.min_size + (self.max_size - self.min_size) * _uniform(generator, n, num_obj, tries)
        aspect = torch.exp(math.log(1.25) * (2.0 * _uniform(generator, n, num_obj, tries) - 1.0))
        half = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], -1) * (size / 2.0)
        half = half.clamp(max=size / 2.0 - 1.0)
        is_bar = (labels == SHAPE_NAMES.index("bar"))[..., None, None]
        half = torch.where(is_bar, half * torch.tensor([1.0, _BAR_HALF_HEIGHT]), half)
        # Centres keep the box at least 1 px inside the image.
        room = size - 2.0 * (half + 1.0)
        centre = half + 1.0 + room * _uniform(generator, n, num_obj, tries, 2)

        centres = torch.zeros(n, num_obj, 2)
        halves = torch.zeros(n, num_obj, 2)
        for k in range(num_obj):
            lo, hi = centre[:, k] - half[:, k], centre[:, k] + half[:, k]  # (n, tries, 2)
            prev_lo = (centres[:, :k] - halves[:, :k])[:, None]  # (n, 1, k, 2)
            prev_hi = (centres[:, :k] + halves[:, :k])[:, None]
            overlap = (lo[:, :, None] < prev_hi + _GAP) & (prev_lo < hi[:, :, None] + _GAP)
            clash = (overlap.all(-1) & (halves[:, None, :k, 0] > 0)).any(-1)  # (n, tries)
            free = ~clash
            choice = free.to(torch.uint8).argmax(1)
            keep = free.any(1) & (k < count)
            rows = torch.arange(n)
            centres[:, k] = centre[rows, k, choice]
            halves[:, k] = half[rows, k, choice] * keep[:, None]
        return centres, halves


def _background(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random backgrounds, ``(n, 3, size, size)`` in [0, 1]: a third each of gradients, stripes, noise."""
    rand = functools.partial(_uniform, generator)
    kind = torch.randint(0, 3, (n,), generator=generator).view(n, 1, 1, 1)
    base = rand(n, 3, 1, 1)
    second = (base + 0.6 * rand(n, 3, 1, 1) - 0.3).clamp(0.0, 1.0)
    angle = math.pi * rand(n, 1, 1, 1)
    pos = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2.0
    along = pos.view(1, 1, 1, -1) * angle.cos() + pos.view(1, 1, -1, 1) * angle.sin()  # pixels

    gradient = along / size + 0.5
    period = size * (0.08 + 0.14 * rand(n, 1, 1, 1))
    stripes = 0.5 + 0.5 * torch.sin(2.0 * math.pi * along / period + 2.0 * math.pi * rand(n, 1, 1, 1))
    ramp = torch.where(kind == 0, gradient, stripes)
    blend = base + (second - base) * ramp

    coarse = (base + 0.6 * rand(n, 3, 4, 4) - 0.3).clamp(0.0, 1.0)
    # Bicubic upsampling is separable: two small matrix products, 14-22x faster than interpolate.
    impulses = torch.eye(4).view(4, 1, 4, 1)
    upsample = F.interpolate(impulses, size=(size, 1), mode="bicubic", align_corners=False).view(4, size).T
    smooth = upsample @ coarse @ upsample.T
    return torch.where(kind == 2, smooth, blend).clamp(0.0, 1.0)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first true entry of each row of a 2-D bool tensor (0 for an all-false row)."""
    return mask.to(torch.uint8).argmax(1)


def _far_colour(candidates: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The first of ``candidates`` (``(m, T, 3)``) far enough from ``background`` (``(m, 3)``).

    Falls back on the farthest candidate when none is far enough.
    """
    distance = (candidates - background[:, None]).norm(dim=-1)
    far = distance >= _MIN_CONTRAST
    choice = torch.where(far.any(1), far.to(torch.uint8).argmax(1), distance.argmax(1))
    return candidates[torch.arange(len(candidates)), choice]


def pointing_game_hits(
    heatmaps: torch.Tensor,
    targets: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]]],
    image_size: int | tuple[int, int],
    tolerance: float | None = None,
) -> torch.Tensor:
    r"""Pointing-game hit of every (image, present label) pair.

    For image :math:`n` and a label :math:`l` with ``targets[n, l] > 0``, the maximum of
    ``heatmaps[n, l]`` (the first one on ties) is at cell :math:`(i, j)` of the :math:`h \times w`
    grid, whose centre in image pixels is :math:`((j + \tfrac12) W / w, (i + \tfrac12) H / h)`.
    The pair is a hit when that point lies strictly inside one of the boxes of label :math:`l`
    of image :math:`n` enlarged by the tolerance on every side.

    With ``tolerance=None`` (default) the boxes are enlarged by half a cell (:math:`W / 2w`
    horizontally, :math:`H / 2h` vertically): a hit then means that the argmax cell and the box
    overlap with a positive area, which does not penalise coarse heatmaps for their cell size.
    A number gives the enlargement in pixels (``0``: the cell centre must lie inside the box).

    Args:
        heatmaps: ``(N, L, h, w)`` class activation maps, ``h <= H`` and ``w <= W`` (gradients
            are not tracked).
        targets: ``(N, L)``, a label is present where ``targets > 0``.
        boxes: ``N`` lists of ``(label, x0, y0, x1, y1)`` in pixels (as
            :attr:`SyntheticShapes.boxes`); every present label needs at least one box.
        image_size: ``S`` or ``(H, W)``, the size of the images the boxes refer to.
        tolerance: enlargement of the boxes in pixels, or ``None`` for half a cell.

    Returns:
        ``(N, L)`` bool on the CPU, true for hits; false for misses and for absent labels.

    Raises:
        TypeError: if ``heatmaps`` or ``targets`` is not a tensor.
        ValueError: on inconsistent shapes, non-finite heatmaps, malformed boxes, a negative
            tolerance, or a present label without a box.
    """
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have shape (N, L, h, w), got {tuple(heatmaps.shape)}")
    n, num_labels, h, w = heatmaps.shape
    if targets.shape != (n, num_labels):
        raise ValueError(f"targets must have shape (N, L) = {(n, num_labels)}, got {tuple(targets.shape)}")
    if h == 0 or w == 0:
        raise ValueError(f"heatmaps must have a non-empty spatial size, got {(h, w)}")
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        raise ValueError(f"image_size must be a positive int or a pair (H, W) of them, got {image_size!r}")
    height, width = image_size
    if h > height or w > width:
        raise ValueError(f"heatmaps are {h}x{w}, larger than image_size {height}x{width}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < math.inf):
        raise ValueError(f"tolerance must be None or a finite number >= 0, got {tolerance!r}")
    if not isinstance(boxes, Sequence) or len(boxes) != n:
        got = len(boxes) if isinstance(boxes, Sequence) else type(boxes).__name__
        raise ValueError(f"boxes must be a sequence of N = {n} per-image box lists, got {got}")
    heatmaps = heatmaps.detach()
    if not torch.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain non-finite values (nan or inf)")

    most = max(1, max(len(b) for b in boxes))
    padding = [(-1, 0.0, 0.0, 0.0, 0.0)]  # label -1 matches no label
    for i, image_boxes in enumerate(boxes):
        for j, box in enumerate(image_boxes):
            if not isinstance(box, Sequence) or len(box) != 5:
                raise ValueError(f"boxes[{i}][{j}] must be (label, x0, y0, x1, y1), got {box!r}")
            label, x0, y0, x1, y1 = box
            if not (isinstance(label, numbers.Integral) and 0 <= label < num_labels):
                raise ValueError(f"boxes[{i}][{j}] has label {label!r}, expected an int in [0, {num_labels})")
            if not (x0 <= x1 and y0 <= y1):
                raise ValueError(f"boxes[{i}][{j}] must have x0 <= x1 and y0 <= y1, got {box!r}")
    rows = [list(image_boxes) + padding * (most - len(image_boxes)) for image_boxes in boxes]
    packed = torch.tensor(rows, dtype=torch.float64).view(n, most, 5)

    positive = targets.detach().cpu() > 0
    label_ids = torch.arange(num_labels, dtype=torch.float64).view(1, -1, 1)
    has_box = (packed[:, None, :, 0] == label_ids).any(-1)  # (N, L)
    missing = (positive & ~has_box).nonzero()
    if len(missing):
        i, label = missing[0].tolist()
        raise ValueError(f"targets[{i}, {label}] is positive but boxes[{i}] has no box of label {label}")

    cell = heatmaps.flatten(2).argmax(-1).cpu()  # (N, L); the first maximum on ties
    cell_h, cell_w = height / h, width / w
    px = ((cell % w).double() + 0.5) * cell_w
    py = (torch.div(cell, w, rounding_mode="floor").double() + 0.5) * cell_h
    tol_x, tol_y = (cell_w / 2.0, cell_h / 2.0) if tolerance is None else (float(tolerance),) * 2
    x0, y0, x1, y1 = (packed[:, None, :, c] for c in range(1, 5))  # (N, 1, B)
    inside = (
        (packed[:, None, :, 0] == label_ids)
        & (x0 - tol_x < px[..., None])
        & (px[..., None] < x1 + tol_x)
        & (y0 - tol_y < py[..., None])
        & (py[..., None] < y1 + tol_y)
    )
    return inside.any(-1) & positive


def pointing_game(
    heatmaps: torch.Tensor,
    targets: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]]],
    image_size: int | tuple[int, int],
    tolerance: float | None = None,
) -> float:
    """Pointing-game accuracy: share of hits over all (image, present label) pairs.

    See :func:`pointing_game_hits` for the definition of a hit and the arguments.

    Example:
        >>> heatmaps = torch.zeros(1, 2, 4, 4)
        >>> heatmaps[0, 0, 0, 3] = 1.0  # cell centre (56, 8) on a 64 px image
        >>> pointing_game(heatmaps, torch.tensor([[1.0, 0.0]]), [[(0, 48, 0, 64, 16)]], 64)
        1.0

    Raises:
        ValueError: as :func:`pointing_game_hits`, and if no label is present at all.
    """
    hits = pointing_game_hits(heatmaps, targets, boxes, image_size, tolerance)
    present = int((targets > 0).sum())
    if present == 0:
        raise ValueError("targets has no present label (> 0): the pointing game is undefined")
    return int(hits.sum()) / present


def pointing_game_per_label(
    heatmaps: torch.Tensor,
    targets: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]]],
    image_size: int | tuple[int, int],
    tolerance: float | None = None,
) -> torch.Tensor:
    """Pointing-game accuracy of each label, ``(L,)`` float64, NaN for labels never present.

    See :func:`pointing_game_hits` for the definition of a hit and the arguments.
    """
    hits = pointing_game_hits(heatmaps, targets, boxes, image_size, tolerance)
    present = (targets > 0).sum(0).double()
    return hits.sum(0).double() / present.where(present > 0, torch.nan)
