"""Writers of tiny dataset fixtures in each dataset's real file format, shared by the test modules."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

WIDER_NAMES = [
    "male", "longhair", "sunglass", "hat", "tshirt", "longsleeve", "formal",
    "shorts", "jeans", "longpants", "skirt", "facemask", "logo", "stripe",
]  # fmt: skip


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def attribute(k: int) -> list[int]:
    """A distinct, known 14-value WIDER attribute vector per k; k = 0, 1, 2 give every label 1, -1 and 0."""
    return [(k + i) % 3 - 1 for i in range(14)]


def write_wider(root: Path, annotation: dict, split: str = "trainval") -> Path:
    path = root / "Anno" / f"wider_attribute_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(annotation))
    return path


def cell(strings: list[str]) -> np.ndarray:
    """A Kx1 MATLAB cell array of strings, as in the real annotation.mat."""
    array = np.empty((len(strings), 1), dtype=object)
    for k, string in enumerate(strings):
        array[k, 0] = string
    return array


def write_coco(root: Path, annotation: dict, split: str = "val") -> None:
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(annotation))


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """A (width, height) RGB image of uniform random pixels: unlike a solid colour, it gives BatchNorm some variance."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)
