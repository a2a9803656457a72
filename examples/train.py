"""Train a multi-label classifier with or without attention consistency.

Named presets reproduce the paper's protocols (WIDER Attribute R50/R101 and their
ablations, PA-100K R50, MS-COCO R101 at 288/256); every setting is an option too. The
same script runs on one CPU, one GPU, or many GPUs and nodes through ``torchrun``::

    python -m examples.train --preset wider-r50-acfs --data-root /data/wider \\
        --pretrained /weights/resnet50-11ad3fa6.pth --out runs/wider-r50-acfs
    torchrun --nproc_per_node 8 -m examples.train --preset coco-r101-acfs --data-root /data/coco ...

Every epoch evaluates the test split (all metrics of the paper, the attention
inconsistency of Table 2), writes ``metrics.json`` / ``metrics.csv`` and an atomic
checkpoint ``last.pt`` to ``--out``; ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    Ramp,
    Scale,
    WeightedBCEWithLogitsLoss,
    get_transform,
    positive_ratio,
)
from attn_consistency.consistency import RECOMMENDED_TRIGGER, RECOMMENDED_WARMUP
from attn_consistency.metrics import (
    attention_inconsistency,
    average_precision,
    example_based_metrics,
    label_based_metrics,
    mean_average_precision,
)
from attn_consistency.multiscale import MultiScaleHeads, WithSideHeads
from attn_consistency.strength import heatmap_spread
from examples._files import (
    load_torch,
    make_folder,
    malformed,
    remove_empty_folders,
    save_torch_atomic,
    write_text_atomic,
)
from examples.validation import argument_type, check_training_set, device_type, json_value, validate_config

__all__ = ["PRESETS", "TrainConfig", "main", "train"]


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; the presets fill in the paper's values."""

    dataset: str = "synthetic"  # wider | pa100k | coco | voc | vg500 | csv | synthetic | digits
    data_root: str | None = None
    csv_train: str | None = None
    csv_test: str | None = None
    arch: str = "small_resnet"
    pretrained: str | None = None  # None | "imagenet" | path to a local state dict
    # modules (names, and everything under them) whose weights are not trained: no gradient, no weight
    # decay (their batch norms still update their running statistics in train mode);
    # a fine-tuning run on a CPU freezes the early, high-resolution blocks
    freeze: tuple[str, ...] = ()
    image_size: int = 64
    scale_size: int | None = None  # input size of the scaled view (the paper: 192 for 224)
    # Where the scaled view comes from: 'original' resizes each image file to scale_size, as the
    # authors' loader (two sizes from every crop); 'resize' resamples the image_size batch.
    # None: 'original' for datasets read from files, 'resize' for synthetic (one size only).
    scale_source: str | None = None
    transforms: tuple[str, ...] = ()
    consistency: bool = True  # False: the transforms as data augmentation only (see `augmentation`)
    # With consistency=False: 'views' trains on the same views as the consistency run, every step
    # (the consistency weights set to 0); 'random' applies each transform to the step's batch with
    # probability 1/2 and trains on that one view, as ordinary data augmentation.
    augmentation: str = "views"
    mode: str | None = None  # 'product' (authors' four views) or 'independent'; None: product for flip+scale
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # The strength of the term (attn_consistency.strength): 'mse' is the paper's Eq. 5, 'relative'
    # divides it by the heatmaps' variance, 'correlation' compares each map standardised by its own
    # mean and spread; a warm-up ramps the weights from 0 over that fraction of
    # the run's steps (epochs x steps per epoch, so a run with a warm-up resumes with its epochs only).
    distance: str = "mse"
    warmup: float = 0.0
    warmup_delay: float = 0.0  # fraction of the run's steps at weight 0 before the warm-up starts
    # >0: the warm-up starts only once the classification loss has fallen below this fraction of
    # its first 25 steps' mean (the classifier has found the labels), at the earliest after the delay
    warmup_trigger: float = 0.0
    warmup_shape: str = "linear"
    stop_gradient: str | None = None  # None (both views trained, the paper) | original | transformed
    diagnostics: bool = True  # warn once when the heatmaps collapse or the term dwarfs classification
    # Multi-scale attention consistency (MSAC, attn_consistency.multiscale): side heads at these stages
    # of the backbone, each term computed per stage; the prediction fuses the heads (fusion: mean |
    # last | output | a stage), each head trained with its supervision weight (stages and 'output').
    stages: tuple[str, ...] = ()
    fusion: str = "mean"
    supervision: dict[str, float] = dataclasses.field(default_factory=dict)
    stage_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # consistency per stage
    rotate_degrees: float = 90.0
    translate_fraction: float = 32 / 224
    ignore_unspecified: bool = False  # WIDER's 0 labels: the reference trains them as negatives
    epochs: int = 12
    batch_size: int = 16
    test_batch_size: int = 64
    optimizer: str = "sgd"  # sgd (the paper) | adam
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 3
    lr_gamma: float = 0.5
    workers: int = 4
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    seed: int = 0
    out: str = "runs/default"
    max_steps: int | None = None  # steps per epoch (smoke runs)
    progress: bool = True
    # a file the per-epoch metrics and the resume messages are appended to instead of the screen
    log: str | None = None
    # TensorBoard event files (examples.tensorboard_log): every loss and term per step, the metrics
    # per epoch, the Figure-5 heatmaps of this many test images per epoch
    tensorboard: str | None = None
    tensorboard_images: int = 4
    # the generated datasets: 'synthetic' (examples.synthetic) and 'digits' (examples.digits, which
    # has 10 classes and reads train/test/objects/sizes)
    synthetic_train: int = 1200
    synthetic_test: int = 400
    synthetic_classes: int = 6
    synthetic_objects: int = 3
    synthetic_sizes: tuple[float, float] = (0.25, 0.45)  # box side range, fraction of the image


_WIDER = dict(
    dataset="wider", arch="resnet50", image_size=224, scale_size=192, epochs=12, batch_size=16, lr_step=3, lr_gamma=0.5
)
_AC = {"f": ("flip",), "s": ("scale",), "fs": ("flip", "scale"), "r": ("rotate",), "t": ("translate",)}
PRESETS: dict[str, dict[str, Any]] = {}
for _arch, _tag in (("resnet50", "r50"), ("resnet101", "r101")):
    PRESETS[f"wider-{_tag}"] = dict(_WIDER, arch=_arch)
    for _key, _transforms in _AC.items():
        PRESETS[f"wider-{_tag}-ac{_key}"] = dict(_WIDER, arch=_arch, transforms=_transforms)
for _key in ("f", "s", "r", "t"):  # the paper's data-augmentation rows R50+f/+s/+r/+t
    PRESETS[f"wider-r50-{_key}"] = dict(_WIDER, transforms=_AC[_key], consistency=False)
PRESETS["pa100k-r50"] = dict(_WIDER, dataset="pa100k")
PRESETS["pa100k-r50-acfs"] = dict(_WIDER, dataset="pa100k", transforms=("flip", "scale"))
PRESETS["coco-r101"] = dict(
    dataset="coco", arch="resnet101", image_size=288, scale_size=256, epochs=14, batch_size=24, lr_step=6, lr_gamma=0.1
)
PRESETS["coco-r101-acfs"] = dict(
    PRESETS["coco-r101"], transforms=("flip", "scale"), weights={"flip": 0.6, "scale": 0.8}
)
# MSAC (Xu et al., ICONIP 2020): side heads at ResNet stages 2-4 (strides 8, 16, 32), the flip of its
# abstract, and with the scale term too; every weight 1, as the VAC presets (the paper gives none).
_MSAC_STAGES = ("layer2", "layer3", "layer4")
PRESETS["wider-r50-msac"] = dict(_WIDER, transforms=("flip",), stages=_MSAC_STAGES)
PRESETS["wider-r50-msac-fs"] = dict(_WIDER, transforms=("flip", "scale"), stages=_MSAC_STAGES)
# The CPU demo. From scratch, the small net sits at chance for ~1000 Adam steps before it finds
# the shapes, and the consistency loss stretches that plateau further (measured: README, demo).
# So the demo follows the paper's protocol with a stand-in for ImageNet: `synthetic-pretrain`
# trains on 4 shapes and other images (seed 1); `synthetic` and `synthetic-acfs` fine-tune it on 6
# shapes (the demo's rows are examples.gain's fine-tuned regime). 56/64 is close to the paper's
# 192/224 and gives 7x7 vs 8x8 heatmaps.
_SYNTHETIC = dict(
    dataset="synthetic",
    arch="small_resnet",
    image_size=64,
    scale_size=56,
    batch_size=16,
    optimizer="adam",
    weight_decay=0.0,
    workers=0,
    synthetic_train=2000,
)
PRESETS["synthetic-pretrain"] = dict(
    _SYNTHETIC, synthetic_classes=4, seed=1, epochs=16, lr=2e-3, lr_step=12, lr_gamma=0.1
)
PRESETS["synthetic"] = dict(_SYNTHETIC, synthetic_classes=6, epochs=6, lr=1e-3, lr_step=4, lr_gamma=0.1)
PRESETS["synthetic-acfs"] = dict(PRESETS["synthetic"], transforms=("flip", "scale"))
# the small net's three blocks (strides 4, 8, 8: 16x16, 8x8 and 8x8 maps at 64 px)
SYNTHETIC_STAGES = ("layers.0", "layers.1", "layers.2")
PRESETS["synthetic-msac"] = dict(PRESETS["synthetic"], transforms=("flip",), stages=SYNTHETIC_STAGES)
PRESETS["synthetic-msac-fs"] = dict(PRESETS["synthetic"], transforms=("flip", "scale"), stages=SYNTHETIC_STAGES)


# The recommended strength of the term for a model and data other than the paper's (measured:
# benchmarks/gain.py, README "Does it pay?"): the paper's presets above keep the paper's loss.
RECOMMENDED: dict[str, Any] = dict(distance="relative", warmup=RECOMMENDED_WARMUP, warmup_trigger=RECOMMENDED_TRIGGER)
# Your own data (an image folder with CSV label files): ResNet-50 at the paper's 224/192.
PRESETS["csv-r50"] = dict(_WIDER, dataset="csv")
PRESETS["csv-r50-acfs"] = dict(_WIDER, dataset="csv", transforms=("flip", "scale")) | RECOMMENDED
# AAMN's benchmarks (COCO 2014, VOC 2007, VG-500) with the multi-label protocol of its time, as ML-GCN's
# code runs it (megvii-research/ML-GCN, demo_voc2007_gcn.py): ResNet-101 at 448 px, SGD momentum 0.9,
# weight decay 1e-4, batch 16, 20 epochs, a decay at epoch 30 (none within the run). One learning rate
# for all layers (this script has one): ML-GCN's rate of the pretrained layers, 0.01 (its new layers get
# 0.1), for its loss averaged over the L labels. For the loss summed over the labels here (paper
# Eq. 2-3) the same SGD steps take lr 0.01 / L and weight decay 1e-4 * L: the gradient is L times
# larger, and the decay, added to it, must grow with it. The scaled view at 384 px keeps the paper's
# 192/224. VOC: difficult objects are left out of the loss (and of the AP). The attention consistency
# of AAMN (no published system combines them) keeps the paper's loss with the weights of the authors'
# COCO script, as every reproduction preset; add RECOMMENDED's settings for the strength measured on
# other models.
_MULTILABEL = dict(arch="resnet101", image_size=448, scale_size=384, epochs=20, batch_size=16, lr_step=30, lr_gamma=0.1)
for _dataset, _labels in (("coco", 80), ("voc", 20), ("vg500", 500)):
    _base = dict(
        _MULTILABEL,
        dataset=_dataset,
        lr=0.01 / _labels,
        weight_decay=1e-4 * _labels,
        ignore_unspecified=_dataset == "voc",
    )
    PRESETS["coco-r101-448" if _dataset == "coco" else f"{_dataset}-r101"] = _base  # the baselines
    PRESETS[f"{_dataset}-r101-aamn"] = dict(_base, arch="aamn_resnet101")
    PRESETS[f"{_dataset}-r101-aamn-acfs"] = dict(
        _base, arch="aamn_resnet101", transforms=("flip", "scale"), weights={"flip": 0.6, "scale": 0.8}
    )


# --------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return _Dist()
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------- data


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""The normalisation of the images read from files (torchvision's ImageNet statistics)."""


def _image_transform(size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


class _TwoSizes:
    """Both inputs of the scale term from one image: ``(image at image_size, image at scale_size)``."""

    def __init__(self, large, small) -> None:
        self.large, self.small = large, small

    def __call__(self, image):
        return self.large(image), self.small(image)


#: the datasets made by code (one image size; boxes for the pointing game)
GENERATED = ("synthetic", "digits")


def freeze(model: nn.Module, names: Sequence[str]) -> None:
    """Turn off the gradient of the modules ``names`` of ``model`` (and all they contain)."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            raise ValueError(f"freeze names {name!r}, which is not a module of the model ({type(model).__name__})")
        modules[name].requires_grad_(False)


def scale_source(config: TrainConfig) -> str:
    """``'original'`` or ``'resize'``: see :attr:`TrainConfig.scale_source`."""
    source = config.scale_source or ("resize" if config.dataset in GENERATED else "original")
    if source not in ("original", "resize"):
        raise ValueError(f"scale_source must be 'original' or 'resize', got {source!r}")
    if source == "original" and config.dataset in GENERATED:
        raise ValueError(f"the {config.dataset} images exist at one size only: use --scale-source resize")
    return source


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """Training and test split of ``config.dataset``, images resized to ``config.image_size``.

    When the run has a scale view read from the files (:func:`scale_source` ``'original'``),
    a training sample's image is the pair ``(image at image_size, image at scale_size)``.
    """
    source = scale_source(config)
    if config.dataset == "synthetic":
        from examples.synthetic import SyntheticShapes

        low, high = config.synthetic_sizes
        make = lambda n, split: SyntheticShapes(  # noqa: E731
            n, config.image_size, config.synthetic_classes, config.synthetic_objects, low, high, config.seed, split
        )
        return make(config.synthetic_train, "train"), make(config.synthetic_test, "test")
    if config.dataset == "digits":
        from examples.digits import DigitMosaics

        low, high = config.synthetic_sizes
        make = lambda n, split: DigitMosaics(  # noqa: E731
            n, config.image_size, config.synthetic_objects, low, high, config.seed, split
        )
        return make(config.synthetic_train, "train"), make(config.synthetic_test, "test")
    from examples import datasets

    if config.data_root is None and config.dataset != "csv":
        raise ValueError(f"--data-root is required for dataset {config.dataset!r}")
    transform = _image_transform(config.image_size)
    train_transform = transform
    if "scale" in config.transforms and config.scale_size is not None and source == "original":
        train_transform = _TwoSizes(transform, _image_transform(config.scale_size))
    # reader, training split, test split (PA-100K: the paper trains on train, val unused, and reports test)
    readers = {
        "wider": (datasets.WiderAttribute, "trainval", "test"),
        "pa100k": (datasets.PA100K, "train", "test"),
        "coco": (datasets.COCO2014, "train", "val"),
        "voc": (datasets.VOC2007, "trainval", "test"),
        "vg500": (datasets.VG500, "train", "test"),
    }
    if config.dataset in readers:
        reader, train_split, test_split = readers[config.dataset]
        return reader(config.data_root, train_split, train_transform), reader(config.data_root, test_split, transform)
    if config.dataset == "csv":
        if config.csv_train is None or config.csv_test is None:
            raise ValueError("dataset 'csv' needs --csv-train and --csv-test")
        root = config.data_root or "."
        return (
            datasets.ImageFolderCSV(root, config.csv_train, train_transform),
            datasets.ImageFolderCSV(root, config.csv_test, transform),
        )
    raise ValueError(
        f"unknown dataset {config.dataset!r}: use wider, pa100k, coco, voc, vg500, csv, synthetic or digits"
    )


class _EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch): a resumed run sees the same batches."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# --------------------------------------------------------------------------- checkpoints


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, then rename it
    (:func:`examples._files.write_atomic`: a failure names ``path`` and leaves it as it was)."""
    save_torch_atomic(obj, path, "checkpoint")


def _write_text_atomic(text: str, path: Path) -> None:
    write_text_atomic(text, path, "metrics file")


_CHECKPOINT = {"model": dict, "optimizer": dict, "epoch": int, "config": str, "history": str, "label_names": list}


def load_checkpoint(path: str | Path) -> Any:
    """Read a file written by :func:`save_atomic` (tensors and plain types only).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path``, for a file torch cannot read or that holds other objects.
    """
    return load_torch(path, "checkpoint")


def load_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train`, checked to be one.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path``, for a file that is not such a checkpoint: unreadable,
            holding other objects, or a plain state dict (which ``--pretrained`` takes).
    """
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "config" not in state:
        hint = " (a state dict of weights? --pretrained takes those)" if isinstance(state, dict) else ""
        raise malformed(path, f"not a checkpoint written by examples.train: no 'config'{hint}")
    for key, kind in _CHECKPOINT.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise malformed(
                path, f"not a checkpoint written by examples.train: {key!r} is {type(state.get(key)).__name__}"
            )
    try:
        config, history = json.loads(state["config"]), json.loads(state["history"])
    except json.JSONDecodeError as error:
        raise malformed(path, f"the checkpoint's settings or history are not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(history, list) or len(history) != state["epoch"] + 1:
        raise malformed(path, f"the checkpoint's settings, history and epoch {state['epoch']} disagree")
    return state


def _write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    # the run's first write creates --out: a run that fails before it (a bad argument, a missing
    # file) leaves no empty folder, and neither does a first write that fails
    created = make_folder(out)
    try:
        _write_text_atomic(json.dumps(history, indent=2), out / "metrics.json")
        keys = list(dict.fromkeys(k for row in history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        _write_text_atomic(buffer.getvalue(), out / "metrics.csv")
    except BaseException:
        remove_empty_folders(created)
        raise


def _load_entry(module: nn.Module, state: dict[str, Any], key: str, path: Path, what: str) -> None:
    """``module.load_state_dict(state[key])``; a missing or unfitting entry names the file and the entry."""
    if key not in state:
        raise malformed(path, f"has no {key!r} entry ({what}), which this run needs")
    entry = state[key]
    if not isinstance(entry, dict):
        raise malformed(path, f"its {key!r} entry ({what}) is a {type(entry).__name__}, expected a state dict")
    try:
        module.load_state_dict(entry)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise malformed(path, f"its {key!r} entry ({what}) does not fit this run: {error}") from None


# --------------------------------------------------------------------------- the run


def _transforms(config: TrainConfig) -> list:
    built = []
    for name in config.transforms:
        if name == "scale":
            if config.scale_size is None:
                raise ValueError("the scale transform needs --scale-size")
            built.append(get_transform("scale", factor=config.scale_size / config.image_size))
        elif name == "rotate":
            built.append(get_transform("rotate", degrees=config.rotate_degrees))
        elif name == "translate":
            built.append(get_transform("translate", dx=config.translate_fraction))
        else:
            built.append(get_transform(name))
    return built


def _random_view(images: Tensor, resized: list[Tensor], transforms: list, generator: torch.Generator) -> Tensor:
    """The batch with each transform applied with probability 1/2 (a scale from ``resized`` if given)."""
    chosen = [t for t in transforms if torch.rand((), generator=generator) < 0.5]
    params = {t.name: t.sample(generator) for t in chosen}
    for t in chosen:  # the resize first, from the file's own resize where it has the size
        if (
            isinstance(t, Scale)
            and resized
            and tuple(resized[0].shape[-2:]) == t.output_size(images.shape[-2:], params[t.name])
        ):
            images = resized[0]
            chosen.remove(t)
            break
    for t in chosen:
        images = t.apply_image(images, params[t.name])
    return images


def _schedule(config: TrainConfig, steps: int) -> Ramp | None:
    """The warm-up of the consistency weights: at 0 for ``warmup_delay`` of the run (and until the
    classification loss has fallen, with ``warmup_trigger``), then a ramp over ``warmup``."""
    if not config.warmup and not config.warmup_delay and not config.warmup_trigger:
        return None
    trigger = config.warmup_trigger or None
    return Ramp(
        round(config.warmup * steps), config.warmup_shape, delay=round(config.warmup_delay * steps), trigger=trigger
    )


def build_heads(config: TrainConfig, model: nn.Module, num_labels: int) -> MultiScaleHeads | None:
    """The side heads of a multi-scale run (``config.stages``) attached to ``model``, or None."""
    if not config.stages:
        return None
    try:
        return MultiScaleHeads(
            model,
            config.stages,
            num_labels,
            supervision=config.supervision or None,
            consistency_weights=config.stage_weights or None,
            fusion=config.fusion,
        )
    except ValueError as error:  # a stage the model does not have: the flag that named it
        raise ValueError(f"--stages {' '.join(config.stages)}: {error}") from None


def _classify(
    net: nn.Module, heads: MultiScaleHeads | None, images: Tensor, targets: Tensor, criterion: nn.Module
) -> Tensor:
    """The classification loss of one view: the model's, or every head's (deep supervision)."""
    if heads is None:
        return criterion(net(images), targets)
    output = net(images)
    (record,) = heads.pop()
    return heads.classification(output, record.logits, targets, criterion)


def scale_factor(config: TrainConfig) -> float:
    """Scaled-view size over image size: ``scale_size``, or the paper's 192/224 ratio without one."""
    return (config.scale_size or round(config.image_size * 6 / 7)) / config.image_size


def _step_generator(config: TrainConfig, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((config.seed * 1_000 + epoch) * 1_000_003 + step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cam: CAMHook,
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    heads: MultiScaleHeads | None = None,
) -> dict[str, float]:
    """Test-set metrics: label-based (and example-based), attention inconsistency (Table 2).

    With side ``heads``, the scores are their fused prediction; the mAP of each head alone
    (``mAP/layer2``, ``mAP/output`` for the model's own logits), the inconsistency (and on the
    synthetic set the pointing game) of each stage are reported too (``inconsistency-flip/layer2``).
    """
    loader = DataLoader(dataset, batch_size=config.test_batch_size, shuffle=False, num_workers=config.workers)
    scale = get_transform("scale", factor=scale_factor(config))
    flip = get_transform("flip")
    scores, heatmaps = [], []
    stage_maps: dict[str, list[Tensor]] = {stage: [] for stage in (heads.stages if heads is not None else ())}
    head_scores: dict[str, list[Tensor]] = {head: [] for head in (*stage_maps, "output")} if heads is not None else {}
    pointing = config.dataset in GENERATED  # the datasets with boxes: keep their heatmaps
    memory_format = torch.channels_last if _use(config.channels_last, device) else torch.preserve_format
    for images, _ in _progress(loader, config, "test"):
        images = images.to(device, memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use(config.amp, device)):
            with contextlib.nullcontext() if pointing else cam.paused():
                output = model(images)
        if heads is not None:
            (record,) = heads.pop()
            for head, logits in (record.logits | {"output": output}).items():
                head_scores[head].append(logits.float().cpu())
            output = heads.prediction(output, record.logits)
            for stage in stage_maps if pointing else ():
                stage_maps[stage].append(record.heatmaps[stage].float().cpu())
        scores.append(output.float().cpu())
        if pointing:
            (maps,) = cam.pop()
            heatmaps.append(maps.float().cpu())
    targets = dataset.targets
    encoding = getattr(dataset, "encoding", "binary")
    result = label_based_metrics(
        torch.cat(scores), targets, encoding=encoding, top_k=3 if config.dataset == "coco" else None
    )
    if config.dataset == "pa100k":
        result |= example_based_metrics(torch.cat(scores), targets)
    for head, logits in head_scores.items():
        result[f"mAP/{head}"] = mean_average_precision(torch.cat(logits), targets, encoding=encoding)
    if config.dataset == "voc":  # the VOC tables give every class's AP (difficult entries dropped)
        per_class = average_precision(torch.cat(scores), targets, encoding=encoding)
        result |= {f"AP-{name}": float(ap) for name, ap in zip(dataset.label_names, per_class)}
    amp = _use(config.amp, device)
    # the model's own CAMs, then each stage's (the other recorder paused)
    for recorder, other in ((cam, heads), (heads, cam)) if heads is not None else ((cam, None),):
        batches = (
            images for images, _ in DataLoader(dataset, batch_size=config.test_batch_size, num_workers=config.workers)
        )
        with other.paused() if other is not None else contextlib.nullcontext():
            for name, value in attention_inconsistency(
                model, recorder, batches, [flip, scale], device=device, amp=amp
            ).items():
                result[f"inconsistency-{name}"] = value
    if pointing:
        from examples.synthetic import pointing_game

        result["pointing-game"] = pointing_game(torch.cat(heatmaps), targets, dataset.boxes, config.image_size)
        result["heatmap-spread"] = float(heatmap_spread(torch.cat(heatmaps)))
        for stage, maps in stage_maps.items():
            result[f"pointing-game/{stage}"] = pointing_game(torch.cat(maps), targets, dataset.boxes, config.image_size)
    return result


def _use(flag: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if flag is None else flag


def _progress(iterable, config: TrainConfig, description: str):
    if not config.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


# Settings a resumed run may change: they do not alter what the finished epochs computed.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "out", "progress", "log", "workers", "test_batch_size", "tensorboard", "tensorboard_images"}
)


def _say(config: TrainConfig, text: str, stream: Any = None) -> None:
    """Print a line of the run's report: to ``stream`` (stdout by default), or appended to ``config.log``."""
    if config.log is None:
        print(text, file=stream, flush=True)
    else:
        Path(config.log).parent.mkdir(parents=True, exist_ok=True)
        with open(config.log, "a", encoding="utf-8") as handle:
            print(text, file=handle)


def _older_default(key: str) -> Any:
    """A setting missing from a checkpoint was added later: the value that run behaved as.

    That is the setting's default, except ``scale_source``, whose default now means
    ``'original'`` for files; runs before it resampled the batch.
    """
    if key == "scale_source":
        return "resize"
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(key)
    if field is None:
        return None
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return json.loads(json.dumps(default))


def _file_digest(path: str | None) -> str | None:
    """SHA-256 of a local weights file (``None`` for no file or ``"imagenet"``)."""
    if path in (None, "imagenet"):
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_same_run(state: dict[str, Any], config: TrainConfig, pretrained_digest: str | None, path: Path) -> None:
    """Refuse to resume a checkpoint written with other settings or weights (it would mix two runs)."""
    saved = json.loads(state["config"])
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    # the warm-up is a fraction of the run's steps: more epochs would move it under a running run
    resumable = _RESUMABLE_CHANGES - (
        {"epochs"} if config.warmup or config.warmup_delay or config.warmup_trigger else set()
    )
    changed = [
        f"{key}: {saved.get(key, _older_default(key))!r} there, {value!r} here"
        for key, value in current.items()
        if key not in resumable and saved.get(key, _older_default(key)) != value
    ]
    if state.get("pretrained_sha256") != pretrained_digest:
        changed.append(f"the file {config.pretrained} changed since the run started")
    if changed:
        raise ValueError(
            f"cannot resume {path}: it was written with other settings ({'; '.join(changed)}). "
            "Resume with the same settings, or write to another --out."
        )


def train(config: TrainConfig, device: str | torch.device | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the per-epoch metrics written to ``metrics.json``."""
    validate_config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = dataclasses.replace(config, scale_source=scale_source(config))  # saved resolved
    ddp = _init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    out = Path(config.out)  # created at the first write (_write_metrics)
    torch.manual_seed(config.seed)

    train_set, test_set = build_datasets(config)
    check_training_set(config, len(train_set), ddp.world)
    from examples.models import build_model

    model = build_model(config.arch, train_set.targets.shape[1], config.pretrained).to(device)
    pretrained_digest = _file_digest(config.pretrained)
    heads = build_heads(config, model, train_set.targets.shape[1])
    if heads is not None:
        heads = heads.to(device)
    if _use(config.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
        heads = heads.to(memory_format=torch.channels_last) if heads is not None else None
    freeze(model, config.freeze)
    parameters = [
        p for p in (*model.parameters(), *(heads.parameters() if heads is not None else ())) if p.requires_grad
    ]
    encoding = getattr(train_set, "encoding", "binary")
    ratio = positive_ratio(train_set.targets, encoding, config.ignore_unspecified)
    classification = WeightedBCEWithLogitsLoss(ratio, encoding, config.ignore_unspecified).to(device)
    transforms = _transforms(config)
    weights = config.weights if config.consistency else {t.name: 0.0 for t in transforms}
    # the authors' flip + scale step runs all four combinations of the two
    mode = config.mode or ("product" if set(config.transforms) == {"flip", "scale"} else "independent")
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)

    start_epoch, history, state = 0, [], None
    checkpoint_path = out / "last.pt"
    if resume and checkpoint_path.exists():
        state = load_train_checkpoint(checkpoint_path)
        _check_same_run(state, config, pretrained_digest, checkpoint_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:  # same settings, other tensors: an edited file
            raise malformed(checkpoint_path, f"its weights or optimizer state do not fit this run ({error})") from None
        if heads is not None:
            _load_entry(heads, state, "heads", checkpoint_path, "the side heads' weights")
        start_epoch, history = state["epoch"] + 1, json.loads(state["history"])
        if ddp.main:
            _say(config, f"resuming {checkpoint_path} after epoch {state['epoch'] + 1}", sys.stderr)
    elif resume and ddp.main:
        _say(config, f"no checkpoint at {checkpoint_path}: starting afresh", sys.stderr)

    cam = CAMHook(model)
    # the side heads in one module with the model, so that DDP averages their gradients too
    net: nn.Module = model if heads is None else WithSideHeads(model, heads)
    recorder = cam if heads is None else heads
    if ddp.world > 1:
        # DDP needs a gradient for every parameter at every step (views() runs a forward per size, which
        # find_unused_parameters refuses): a head of weight 0 would get none (its class weight is
        # detached in the heatmaps)
        untrained = [head for head, weight in (heads.supervision.items() if heads is not None else ()) if weight == 0.0]
        if untrained:
            raise ValueError(
                f"--supervision gives the head {untrained[0]!r} weight 0: under DDP every head must be trained "
                "(weight > 0), as DDP needs a gradient for each parameter"
            )
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    sampler = (
        DistributedSampler(train_set, ddp.world, ddp.rank, shuffle=True, seed=config.seed)
        if ddp.world > 1
        else _EpochSampler(len(train_set), config.seed)
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    steps_per_epoch = len(loader) if config.max_steps is None else min(len(loader), config.max_steps)
    consistency = AttentionConsistencyLoss(
        weights=weights,
        distance=config.distance,
        schedule=_schedule(config, config.epochs * steps_per_epoch),
        stop_gradient=config.stop_gradient,
        diagnostics=config.diagnostics and ddp.main,
    )
    if state is not None and "consistency" in state:  # the schedule and diagnostics of the resumed run
        _load_entry(
            consistency, state, "consistency", checkpoint_path, "the consistency loss's schedule and diagnostics"
        )
    board = None
    if config.tensorboard is not None and ddp.main:
        from examples.tensorboard_log import for_run

        board = for_run(config, test_set, steps_per_epoch, start_epoch, list(getattr(train_set, "label_names", [])))
    amp = _use(config.amp, device)
    memory_format = torch.channels_last if _use(config.channels_last, device) else torch.preserve_format
    random_augmentation = bool(transforms) and not config.consistency and config.augmentation == "random"
    no_consistency = torch.zeros((), device=device)
    # a model with a memory filled from the labels (AAMN) sees every training forward of a step
    observe = getattr(model, "observe", None)
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * config.lr_gamma ** (epoch // config.lr_step)
        net.train()
        cam.enabled = heads is None  # with side heads, training needs none of the model's own CAMs
        running = torch.zeros(3, device=device)
        term_sums: dict[str, Tensor] = {}
        steps = 0
        for step, (images, targets) in enumerate(
            _progress(loader, config, f"epoch {epoch + 1}") if ddp.main else loader
        ):
            if config.max_steps is not None and step >= config.max_steps:
                break
            multiplier = consistency.multiplier  # this step's: views() moves the schedule on
            images, resized = (images[0], images[1:]) if isinstance(images, (list, tuple)) else (images, [])
            images, *resized = (
                x.to(device, non_blocking=True, memory_format=memory_format) for x in (images, *resized)
            )
            targets = targets.to(device, non_blocking=True)
            with (
                observe(targets) if observe else contextlib.nullcontext(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp),
            ):
                if transforms and not random_augmentation:
                    views = consistency.views(
                        net,
                        recorder,
                        images,
                        transforms,
                        mode=mode,
                        generator=_step_generator(config, epoch, step),
                        resized=resized,
                        targets=targets,
                        criterion=classification,
                    )
                    cls_loss, ac_loss = views.classification, views.loss
                    for name, term in views.terms.items():
                        term_sums[name] = term_sums.get(name, 0.0) + term.detach().float()
                else:  # one view: the batch, or a random augmentation of it
                    if random_augmentation:
                        images = _random_view(images, resized, transforms, _step_generator(config, epoch, step))
                    with cam.paused():
                        cls_loss = _classify(net, heads, images, targets, classification)
                    ac_loss = no_consistency
                loss = cls_loss + ac_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += torch.stack([loss.detach(), cls_loss.detach(), ac_loss.detach()]).float()
            if board is not None:
                terms_now = (
                    {f"term/{name}": term for name, term in views.terms.items()}
                    if transforms and not random_augmentation
                    else {}
                )
                board.step(
                    epoch,
                    step,
                    {"loss": loss, "cls_loss": cls_loss, "ac_loss": ac_loss, "ac_multiplier": multiplier} | terms_now,
                )
            steps += 1
        terms = torch.stack([term_sums[name] for name in sorted(term_sums)]) if term_sums else None
        if ddp.world > 1:
            dist.all_reduce(running)
            running /= ddp.world
            if terms is not None:  # every replica computes the same terms, in the same order
                dist.all_reduce(terms)
                terms /= ddp.world
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row |= dict(zip(("loss", "cls_loss", "ac_loss"), (running / max(steps, 1)).tolist()))
        # how strong the term is next to the classification loss, and each term unweighted
        row["ac_ratio"] = row["ac_loss"] / row["cls_loss"] if row["cls_loss"] else 0.0
        row["ac_multiplier"] = consistency.multiplier
        if consistency.diagnostics is not None and consistency.diagnostics.last:
            row["ac_grad_ratio"] = consistency.diagnostics.last["gradient_ratio"]
        if terms is not None:
            row |= {f"term-{name}": value / max(steps, 1) for name, value in zip(sorted(term_sums), terms.tolist())}
        cam.enabled = True
        if ddp.main:
            model.eval()
            if heads is not None:
                heads.eval()
            row |= evaluate(model, cam, test_set, config, device, heads)
            history.append(row)
            if board is not None:
                board.epoch(epoch, row, model, cam, heads)
            _write_metrics(history, out)
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "config": json.dumps(dataclasses.asdict(config)),
                    "history": json.dumps(history),
                    "label_names": list(getattr(train_set, "label_names", [])),
                    "pretrained_sha256": pretrained_digest,
                    "consistency": consistency.state_dict(),
                    **({"heads": heads.state_dict()} if heads is not None else {}),
                },
                checkpoint_path,
            )
            _say(config, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if ddp.world > 1:
            dist.barrier()
    if board is not None:
        board.close()
    cam.remove()
    if heads is not None:
        heads.remove()
    if ddp.world > 1:
        dist.destroy_process_group()
    return history


# --------------------------------------------------------------------------- command line


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# settings that take a list of names on the command line, with their help
_NAME_LISTS = {
    "transforms": "views: flip scale rotate translate",
    "stages": "side heads (MSAC), e.g. layer2 layer3 layer4",
    "freeze": "modules whose weights are not trained (batch-norm statistics still adapt), e.g. _conv_stem _bn0 _blocks.0",
}


#: the help of the JSON flags: an example each accepts (with --stages layer2 layer3 layer4, as ResNets name them)
JSON_EXAMPLES = {
    "weights": 'transform name -> weight, JSON, e.g. {"flip": 0.6, "scale": 0.8}',
    "supervision": 'head (a stage of --stages, or "output") -> classification weight, JSON, '
    'e.g. {"layer2": 0.5, "output": 1.0}',
    "stage_weights": 'stage of --stages -> weight of its consistency terms, JSON, e.g. {"layer2": 0.5, "layer4": 1.0}',
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings for a table row")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    parser.add_argument("--device", type=device_type, help="cpu, cuda, cuda:1 (default: cuda if available)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if field.name in _NAME_LISTS:
            parser.add_argument(
                flag, nargs="*", type=argument_type(field.name, str), default=None, help=_NAME_LISTS[field.name]
            )
        elif field.name == "synthetic_sizes":
            parser.add_argument(
                flag, nargs=2, type=argument_type(field.name, float), default=None, metavar=("MIN", "MAX")
            )
        elif field.name in JSON_EXAMPLES:
            parser.add_argument(
                flag, type=argument_type(field.name, json_value), default=None, help=JSON_EXAMPLES[field.name]
            )
        elif isinstance(value, bool) or field.type in ("bool | None", "bool"):
            parser.add_argument(flag, type=argument_type(field.name, _parse_bool), default=None, metavar="BOOL")
        elif isinstance(value, int) or "int" in str(field.type):
            parser.add_argument(flag, type=argument_type(field.name, int), default=None)
        elif isinstance(value, float):
            parser.add_argument(flag, type=argument_type(field.name, float), default=None)
        else:
            parser.add_argument(flag, type=argument_type(field.name, str), default=None)
    args = parser.parse_args(argv)
    settings = dict(PRESETS.get(args.preset, {}))
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name)
        if given is not None:
            settings[field.name] = tuple(given) if field.name in (*_NAME_LISTS, "synthetic_sizes") else given
    return TrainConfig(**settings), args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    config, args = parse_args(argv)
    return train(config, device=args.device, resume=args.resume)


if __name__ == "__main__":
    main()
