"""Writers of tiny dataset fixtures in each dataset's real file format, shared by the test modules."""

import json
import multiprocessing
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


VOC_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def write_voc(
    root: Path, labels: dict[str, dict[str, int]], split: str = "trainval", size: tuple[int, int] = (40, 30)
) -> Path:
    """``root/VOCdevkit/VOC2007`` as the devkit ships it, for images ``{id: {class: 1 | 0 | -1}}``
    (classes not given are -1; 0 = only difficult objects): the image set, the 20 class files
    (``"%s %2d"`` lines, as the devkit writes them), one XML annotation and one JPEG per image."""
    base = root / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in labels))
    for name in VOC_NAMES:
        (main / f"{name}_{split}.txt").write_text(
            "".join(f"{i} {values.get(name, -1):2d}\n" for i, values in labels.items())
        )
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    for k, (image_id, values) in enumerate(labels.items()):
        objects = []
        for name, value in values.items():
            if value == 1:  # a visible object, and a difficult one beside it
                objects += [(name, 0), (name, 1)]
            elif value == 0:
                objects.append((name, 1))
        xml = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
            f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
            for name, d in objects
        )
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{xml}</annotation>"
        )
        save(base / "JPEGImages" / f"{image_id}.jpg", noise(size, k))
    return base


def write_vg500(root: Path, splits: dict[str, dict[str, list[int]]], size: tuple[int, int] = (40, 30)) -> None:
    """SSGRL's VG-500 files for ``{split: {file name: [label indices]}}``: ``<split>_list_500.txt``,
    one ``vg_category_500_labels_index.json`` for all splits, and the images under ``VG_100K/``."""
    labels: dict[str, list[int]] = {}
    for split, images in splits.items():
        (root / f"{split}_list_500.txt").write_text("".join(f"{name}\n" for name in images))
        labels |= images
    (root / "vg_category_500_labels_index.json").write_text(json.dumps(labels))
    for k, name in enumerate(labels):
        save(root / "VG_100K" / name, noise(size, k))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What the workers' server imports once per test session: a spawned worker spent most of its time
# importing torch and torch._dynamo (which DDP and the package load), about 10 s on an idle 2-core
# machine and 30-40 s on a busy one, and each test started two.
WORKER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "attn_consistency"]


def worker_context() -> multiprocessing.context.ForkServerContext:
    """The multiprocessing context of :func:`run_workers`: processes forked from a server that
    imports ``WORKER_PRELOAD`` when the first of them starts."""
    multiprocessing.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts
    return multiprocessing.get_context("forkserver")


def run_workers(worker: Callable[..., None], args: tuple, processes: int = 2, timeout: float = 120) -> None:
    """``worker(rank, *args)`` in ``processes`` new processes; fails the test after ``timeout`` s.

    The processes are forked from a server ("forkserver") that was started, without threads, at
    the first call and imported ``WORKER_PRELOAD``: like a spawned process each starts afresh but
    for those imports, and nothing of the test's process (its threads, its patches) goes with it."""
    import pytest
    import torch.multiprocessing as mp

    worker_context()
    context = mp.start_processes(worker, args=args, nprocs=processes, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the workers did not finish within {timeout:.0f} s")


DOCS = Path(__file__).resolve().parents[1] / "docs"


def sphinx(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The documentation's strict build command of the README (warnings are errors, every
    reference checked), with the repository's configuration over ``source``, into ``out/html``."""
    command = ["sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", "-c", str(DOCS)]
    command += ["-d", str(out / "doctrees"), str(source), str(out / "html")]
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=DOCS.parent, capture_output=True, text=True, timeout=600, check=False
    )
