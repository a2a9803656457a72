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

# The script in four files: this one holds the settings (TrainConfig), the data, the training loop
# and the evaluation; examples/presets.py the presets, examples/checkpoint.py the checkpoint and
# metrics files, examples/cli.py the command line (parse_args and main here call it).

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from attn_consistency.metrics import (
    attention_inconsistency,
    average_precision,
    example_based_metrics,
    label_based_metrics,
    mean_average_precision,
)
from attn_consistency.models import MultiScaleHeads, WithSideHeads
from attn_consistency.strength import heatmap_spread
from examples._files import malformed
from examples.checkpoint import (
    _check_same_run,
    _file_digest,
    _load_entry,
    _write_metrics,
    load_train_checkpoint,
    save_train_checkpoint,
)

# moved to examples.presets and examples.checkpoint: importable from here as before
from examples.checkpoint import load_checkpoint as load_checkpoint
from examples.checkpoint import save_atomic as save_atomic
from examples.presets import PRESETS as PRESETS
from examples.presets import RECOMMENDED as RECOMMENDED
from examples.presets import SYNTHETIC_STAGES as SYNTHETIC_STAGES
from examples.validation import check_training_set, validate_config

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
    # Multi-scale attention consistency (MSAC, attn_consistency.models.msac): side heads at these stages
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


def _say(config: TrainConfig, text: str, stream: Any = None) -> None:
    """Print a line of the run's report: to ``stream`` (stdout by default), or appended to ``config.log``."""
    if config.log is None:
        print(text, file=stream, flush=True)
    else:
        Path(config.log).parent.mkdir(parents=True, exist_ok=True)
        with open(config.log, "a", encoding="utf-8") as handle:
            print(text, file=handle)


# --------------------------------------------------------------------------- building a run


def _setup(config: TrainConfig, device: str | torch.device | None) -> tuple[TrainConfig, torch.device, _Dist]:
    """The checked settings (``scale_source`` resolved, as saved), the device and the run's processes."""
    validate_config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = dataclasses.replace(config, scale_source=scale_source(config))  # saved resolved
    ddp = _init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    return config, device, ddp


def _build_model(
    config: TrainConfig, num_labels: int, device: torch.device
) -> tuple[nn.Module, MultiScaleHeads | None, str | None]:
    """The model and its side heads on ``device``, frozen where ``config.freeze`` says, and the
    SHA-256 of the pretrained weights file it started from (``None`` for none or ``"imagenet"``)."""
    from examples.models import build_model

    model = build_model(config.arch, num_labels, config.pretrained).to(device)
    pretrained_digest = _file_digest(config.pretrained)
    heads = build_heads(config, model, num_labels)
    if heads is not None:
        heads = heads.to(device)
    if _use(config.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
        heads = heads.to(memory_format=torch.channels_last) if heads is not None else None
    freeze(model, config.freeze)
    return model, heads, pretrained_digest


def _classification_loss(config: TrainConfig, train_set: Dataset, device: torch.device) -> WeightedBCEWithLogitsLoss:
    """The paper's weighted BCE (Eq. 2-3), with the positive ratios of the training set."""
    encoding = getattr(train_set, "encoding", "binary")
    ratio = positive_ratio(train_set.targets, encoding, config.ignore_unspecified)
    return WeightedBCEWithLogitsLoss(ratio, encoding, config.ignore_unspecified).to(device)


def _build_optimizer(config: TrainConfig, model: nn.Module, heads: MultiScaleHeads | None) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or Adam over the weights that are trained (not frozen)."""
    parameters = [
        p for p in (*model.parameters(), *(heads.parameters() if heads is not None else ())) if p.requires_grad
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _resume(
    config: TrainConfig,
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    heads: MultiScaleHeads | None,
    pretrained_digest: str | None,
    ddp: _Dist,
) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """``--resume``: the first epoch to run, the history so far and the checkpoint at ``path``, whose
    weights and optimizer state are loaded; ``(0, [], None)`` where there is no checkpoint yet.

    Raises:
        ValueError: naming ``path``, for a checkpoint of another run or one that does not fit it.
    """
    if not path.exists():
        if ddp.main:
            _say(config, f"no checkpoint at {path}: starting afresh", sys.stderr)
        return 0, [], None
    state = load_train_checkpoint(path)
    _check_same_run(state, config, pretrained_digest, path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # same settings, other tensors: an edited file
        raise malformed(path, f"its weights or optimizer state do not fit this run ({error})") from None
    if heads is not None:
        _load_entry(heads, state, "heads", path, "the side heads' weights")
    start_epoch, history = state["epoch"] + 1, json.loads(state["history"])
    if ddp.main:
        _say(config, f"resuming {path} after epoch {state['epoch'] + 1}", sys.stderr)
    return start_epoch, history, state


def _wrap(
    config: TrainConfig, model: nn.Module, heads: MultiScaleHeads | None, ddp: _Dist, device: torch.device
) -> tuple[CAMHook, nn.Module, CAMHook | MultiScaleHeads]:
    """The model's CAM hook, the module a step trains (the model with its side heads, under DDP
    and ``torch.compile`` where the run says) and the recorder of the heatmaps the term compares."""
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
    return cam, net, recorder


def _loader(
    config: TrainConfig, train_set: Dataset, ddp: _Dist, device: torch.device
) -> tuple[DistributedSampler | _EpochSampler, DataLoader]:
    """The sampler (shuffled by seed and epoch; each process its share under DDP) and the training batches."""
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
    return sampler, loader


def _consistency_loss(
    config: TrainConfig,
    transforms: list,
    steps: int,
    ddp: _Dist,
    state: dict[str, Any] | None,
    path: Path,
) -> AttentionConsistencyLoss:
    """The attention consistency term of a run of ``steps`` steps (its warm-up is a fraction of
    them), weighted 0 without consistency, with the schedule and diagnostics of a resumed ``state``."""
    weights = config.weights if config.consistency else {t.name: 0.0 for t in transforms}
    consistency = AttentionConsistencyLoss(
        weights=weights,
        distance=config.distance,
        schedule=_schedule(config, steps),
        stop_gradient=config.stop_gradient,
        diagnostics=config.diagnostics and ddp.main,
    )
    if state is not None and "consistency" in state:  # the schedule and diagnostics of the resumed run
        _load_entry(consistency, state, "consistency", path, "the consistency loss's schedule and diagnostics")
    return consistency


@dataclasses.dataclass
class _Run:
    """What :func:`train` builds once and every epoch uses."""

    config: TrainConfig
    device: torch.device
    ddp: _Dist
    out: Path
    train_set: Dataset
    test_set: Dataset
    model: nn.Module
    heads: MultiScaleHeads | None
    pretrained_digest: str | None
    cam: CAMHook
    net: nn.Module
    recorder: CAMHook | MultiScaleHeads
    classification: nn.Module
    consistency: AttentionConsistencyLoss
    transforms: list
    mode: str
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler | _EpochSampler
    loader: DataLoader
    board: Any  # examples.tensorboard_log's log, or None

    def __post_init__(self) -> None:
        self.amp = _use(self.config.amp, self.device)
        self.memory_format = (
            torch.channels_last if _use(self.config.channels_last, self.device) else torch.preserve_format
        )
        self.random_augmentation = (
            bool(self.transforms) and not self.config.consistency and self.config.augmentation == "random"
        )
        self.no_consistency = torch.zeros((), device=self.device)
        # a model with a memory filled from the labels (AAMN) sees every training forward of a step
        self.observe = getattr(self.model, "observe", None)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"


# --------------------------------------------------------------------------- an epoch


def _forward(
    run: _Run, epoch: int, step: int, images: Tensor | Sequence[Tensor], targets: Tensor, term_sums: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The losses of one training step (total, classification, consistency) and its unweighted
    terms by name (none for one view), each term added to ``term_sums``."""
    config, device = run.config, run.device
    images, resized = (images[0], images[1:]) if isinstance(images, (list, tuple)) else (images, [])
    images, *resized = (x.to(device, non_blocking=True, memory_format=run.memory_format) for x in (images, *resized))
    targets = targets.to(device, non_blocking=True)
    terms: dict[str, Tensor] = {}
    with (
        run.observe(targets) if run.observe else contextlib.nullcontext(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp),
    ):
        if run.transforms and not run.random_augmentation:
            views = run.consistency.views(
                run.net,
                run.recorder,
                images,
                run.transforms,
                mode=run.mode,
                generator=_step_generator(config, epoch, step),
                resized=resized,
                targets=targets,
                criterion=run.classification,
            )
            cls_loss, ac_loss, terms = views.classification, views.loss, views.terms
            for name, term in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + term.detach().float()
        else:  # one view: the batch, or a random augmentation of it
            if run.random_augmentation:
                images = _random_view(images, resized, run.transforms, _step_generator(config, epoch, step))
            with run.cam.paused():
                cls_loss = _classify(run.net, run.heads, images, targets, run.classification)
            ac_loss = run.no_consistency
        loss = cls_loss + ac_loss
    return loss, cls_loss, ac_loss, terms


def _train_epoch(run: _Run, epoch: int) -> tuple[Tensor, dict[str, Tensor], int]:
    """The training steps of ``epoch``: the sums of (loss, classification, consistency) and of
    each unweighted term by name over the steps, and the number of steps."""
    config = run.config
    run.sampler.set_epoch(epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = config.lr * config.lr_gamma ** (epoch // config.lr_step)
    run.net.train()
    run.cam.enabled = run.heads is None  # with side heads, training needs none of the model's own CAMs
    running = torch.zeros(3, device=run.device)
    term_sums: dict[str, Tensor] = {}
    steps = 0
    for step, (images, targets) in enumerate(
        _progress(run.loader, config, f"epoch {epoch + 1}") if run.ddp.main else run.loader
    ):
        if config.max_steps is not None and step >= config.max_steps:
            break
        multiplier = run.consistency.multiplier  # this step's: views() moves the schedule on
        loss, cls_loss, ac_loss, terms = _forward(run, epoch, step, images, targets, term_sums)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        running += torch.stack([loss.detach(), cls_loss.detach(), ac_loss.detach()]).float()
        if run.board is not None:
            terms_now = {f"term/{name}": term for name, term in terms.items()}
            run.board.step(
                epoch,
                step,
                {"loss": loss, "cls_loss": cls_loss, "ac_loss": ac_loss, "ac_multiplier": multiplier} | terms_now,
            )
        steps += 1
    return running, term_sums, steps


def _epoch_row(run: _Run, epoch: int, running: Tensor, term_sums: dict[str, Tensor], steps: int) -> dict[str, Any]:
    """The epoch's row of the history before its evaluation: the learning rate, the mean losses
    (averaged over the processes), the strength of the term and each term unweighted."""
    ddp, consistency = run.ddp, run.consistency
    terms = torch.stack([term_sums[name] for name in sorted(term_sums)]) if term_sums else None
    if ddp.world > 1:
        dist.all_reduce(running)
        running /= ddp.world
        if terms is not None:  # every replica computes the same terms, in the same order
            dist.all_reduce(terms)
            terms /= ddp.world
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"]}
    row |= dict(zip(("loss", "cls_loss", "ac_loss"), (running / max(steps, 1)).tolist()))
    # how strong the term is next to the classification loss, and each term unweighted
    row["ac_ratio"] = row["ac_loss"] / row["cls_loss"] if row["cls_loss"] else 0.0
    row["ac_multiplier"] = consistency.multiplier
    if consistency.diagnostics is not None and consistency.diagnostics.last:
        row["ac_grad_ratio"] = consistency.diagnostics.last["gradient_ratio"]
    if terms is not None:
        row |= {f"term-{name}": value / max(steps, 1) for name, value in zip(sorted(term_sums), terms.tolist())}
    return row


def _finish_epoch(run: _Run, epoch: int, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """On the main process: ``row`` with the epoch's evaluation added to ``history``, then the
    metrics files, the checkpoint and the row's line of the report."""
    model, heads, config = run.model, run.heads, run.config
    model.eval()
    if heads is not None:
        heads.eval()
    row |= evaluate(model, run.cam, run.test_set, config, run.device, heads)
    history.append(row)
    if run.board is not None:
        run.board.epoch(epoch, row, model, run.cam, heads)
    _write_metrics(history, run.out)
    save_train_checkpoint(
        run.checkpoint_path,
        model=model,
        optimizer=run.optimizer,
        epoch=epoch,
        config=config,
        history=history,
        label_names=list(getattr(run.train_set, "label_names", [])),
        pretrained_digest=run.pretrained_digest,
        consistency=run.consistency,
        heads=heads,
    )
    _say(config, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, device: str | torch.device | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the per-epoch metrics written to ``metrics.json``."""
    config, device, ddp = _setup(config, device)
    out = Path(config.out)  # created at the first write (_write_metrics)
    torch.manual_seed(config.seed)

    train_set, test_set = build_datasets(config)
    check_training_set(config, len(train_set), ddp.world)
    model, heads, pretrained_digest = _build_model(config, train_set.targets.shape[1], device)
    classification = _classification_loss(config, train_set, device)
    transforms = _transforms(config)
    # the authors' flip + scale step runs all four combinations of the two
    mode = config.mode or ("product" if set(config.transforms) == {"flip", "scale"} else "independent")
    optimizer = _build_optimizer(config, model, heads)
    checkpoint_path = out / "last.pt"
    start_epoch, history, state = (
        _resume(config, checkpoint_path, model, optimizer, heads, pretrained_digest, ddp) if resume else (0, [], None)
    )

    cam, net, recorder = _wrap(config, model, heads, ddp, device)
    sampler, loader = _loader(config, train_set, ddp, device)
    steps_per_epoch = len(loader) if config.max_steps is None else min(len(loader), config.max_steps)
    consistency = _consistency_loss(config, transforms, config.epochs * steps_per_epoch, ddp, state, checkpoint_path)
    board = None
    if config.tensorboard is not None and ddp.main:
        from examples.tensorboard_log import for_run

        board = for_run(config, test_set, steps_per_epoch, start_epoch, list(getattr(train_set, "label_names", [])))
    run = _Run(
        config=config,
        device=device,
        ddp=ddp,
        out=out,
        train_set=train_set,
        test_set=test_set,
        model=model,
        heads=heads,
        pretrained_digest=pretrained_digest,
        cam=cam,
        net=net,
        recorder=recorder,
        classification=classification,
        consistency=consistency,
        transforms=transforms,
        mode=mode,
        optimizer=optimizer,
        sampler=sampler,
        loader=loader,
        board=board,
    )
    for epoch in range(start_epoch, config.epochs):
        running, term_sums, steps = _train_epoch(run, epoch)
        row = _epoch_row(run, epoch, running, term_sums, steps)
        cam.enabled = True
        if ddp.main:
            _finish_epoch(run, epoch, row, history)
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


# --------------------------------------------------------------------------- command line (examples.cli)
# examples.cli imports this module, so these import it when called


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The settings and the arguments of a command line: :func:`examples.cli.parse_args`."""
    from examples import cli

    return cli.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train as the command line ``argv`` says: :func:`examples.cli.main`."""
    from examples import cli

    return cli.main(argv)


if __name__ == "__main__":
    # `python -m examples.train` runs this file as __main__; examples.cli then imports it again as
    # examples.train (one more module object, with its own TrainConfig), and only that one is used
    main()
