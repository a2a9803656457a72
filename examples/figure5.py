"""The paper's Figure 5: heatmaps of one label on the original, flipped and scaled image.

One row per (model, image), three columns: the original view, the flipped view, the
scaled view, each with its own heatmap of the chosen label overlaid. Two checkpoints
side by side (baseline vs attention consistency) show whether the attention follows the
transform. A checkpoint with side heads (multi-scale attention consistency, ``--stages``)
gets a row per stage as well, under the row of the model's own CAM::

    python -m examples.figure5 runs/baseline/last.pt runs/acfs/last.pt --names R50 R50+ACfs \\
        --label tshirt --indices 0 7 --out figure5.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_consistency import CAMHook, get_transform
from attn_consistency.models import MultiScaleHeads
from examples.checkpoint import load_train_checkpoint
from examples.train import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainConfig,
    build_datasets,
    build_heads,
    scale_factor,
)
from examples.validation import count_type

__all__ = ["VIEWS", "denormalizer", "figure5", "load_heads", "load_trained", "normalise_together", "views_and_maps"]

VIEWS = ("original", "flipped", "scaled")
"""The three views of a row, in the order of :func:`views_and_maps`."""


def _imagenet_denormalize(images: Tensor) -> Tensor:
    """Undo the normalisation of :func:`examples.train.build_datasets` for files."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


def denormalizer(dataset: object) -> Callable[[Tensor], Tensor]:
    """What maps ``dataset``'s images back to [0, 1] RGB: its own ``denormalize`` (the synthetic
    set), else the inverse of the ImageNet normalisation of the images read from files."""
    return getattr(dataset, "denormalize", _imagenet_denormalize)


@torch.no_grad()
def views_and_maps(
    model: nn.Module,
    images: Tensor,
    label: int,
    scale_factor: float,
    heads: MultiScaleHeads | None = None,
    cam: CAMHook | None = None,
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """The heatmaps of ``label`` on the original, flipped and scaled views of ``images``.

    Args:
        model: a GAP-FC classifier, in the mode the caller wants (``eval()`` for a figure).
        images: normalised images ``(K, 3, H, W)``.
        label: index of the label whose heatmaps are drawn.
        scale_factor: size of the scaled view over the original's.
        heads: the model's side heads (multi-scale), whose stages give a source each.
        cam: the model's live :class:`CAMHook`, recording (a training run has one); None: one
            is attached for these three forwards and removed.

    Returns:
        Per heatmap source (``""`` for the model's CAM, then each stage of ``heads``): (view,
        heatmap upsampled to the view) for the original, flipped and scaled views.

    Raises:
        ValueError: ``label`` is not one of the model's labels.
    """
    flip, scale = get_transform("flip"), get_transform("scale", factor=scale_factor)
    views = [images, flip.apply_image(images, True), scale.apply_image(images, scale_factor)]
    result: dict[str, list[tuple[Tensor, Tensor]]] = {}
    if heads is not None:
        heads.clear()  # records of forwards before these
    with contextlib.nullcontext(cam) if cam is not None else CAMHook(model) as hook:
        hook.clear()
        for view in views:
            model(view)
            (maps,) = hook.pop()
            by_source = {"": maps} | (heads.pop()[0].heatmaps if heads is not None else {})
            if not 0 <= label < maps.shape[1]:
                raise ValueError(f"label must be in [0, {maps.shape[1] - 1}] (the model's labels), got {label}")
            for source, source_maps in by_source.items():
                heat = F.interpolate(
                    source_maps[:, label : label + 1].float(),
                    size=view.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
                result.setdefault(source, []).append((view, heat[:, 0]))
    return result


def normalise_together(heats: Sequence[Tensor]) -> list[Tensor]:
    """Heatmaps scaled to [0, 1] by their common minimum and maximum, so that a change of strength
    between them (the views of one image) stays visible."""
    low, high = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
    return [(heat - low) / max(high - low, 1e-12) for heat in heats]


def figure5(
    models: dict[str, nn.Module | tuple[nn.Module, MultiScaleHeads]],
    images: Tensor,
    label: int,
    out: str | Path,
    *,
    label_name: str | None = None,
    scale_factor: float = 192 / 224,
    denormalize: Callable[[Tensor], Tensor] = _imagenet_denormalize,
) -> Path:
    """Draw the heatmaps of ``label`` for each model on original / flipped / scaled images.

    Each heatmap is normalised to [0, 1] over the three views of one (model, image) row,
    so that a change of strength between views stays visible.

    Args:
        models: name -> classifier (GAP-FC, evaluated in ``eval()`` mode), or name ->
            ``(classifier, its MultiScaleHeads)``: then a row per stage follows the CAM's.
        images: normalised images ``(K, 3, H, W)``.
        label: index of the label whose heatmaps are drawn.
        out: PNG path.
        label_name: shown in the title.
        scale_factor: size of the scaled view over the original's.
        denormalize: maps the normalised images back to [0, 1] RGB.

    Returns:
        The path written.
    """
    if not models:
        raise ValueError("models must hold at least one model")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 1 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (K, 3, H, W) tensor with K >= 1, got {shape}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(f"label must be an int, got {type(label).__name__} {label!r}")
    if not (isinstance(scale_factor, int | float) and 0 < scale_factor < float("inf")):
        raise ValueError(f"scale_factor must be a finite number > 0, got {scale_factor!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_model = {}
    for name, entry in models.items():
        model, heads = entry if isinstance(entry, tuple) else (entry, None)
        modules = [model] if heads is None else [model, heads]
        training = [module.training for module in modules]
        for module in modules:
            module.eval()
        sources = views_and_maps(model, images, label, scale_factor, heads)
        for module, mode in zip(modules, training):
            module.train(mode)
        per_model |= {f"{name} {source}".strip(): per_view for source, per_view in sources.items()}
    rows = len(per_model) * images.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    row = 0
    for name, per_view in per_model.items():
        for k in range(images.shape[0]):
            heats = normalise_together([heat[k] for _, heat in per_view])
            for column, ((view, _), heat, title) in enumerate(zip(per_view, heats, VIEWS)):
                ax = axes[row, column]
                ax.imshow(denormalize(view[k]).clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                ax.imshow(heat.cpu().numpy(), cmap="jet", alpha=0.5)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{title} {view.shape[-1]}px", fontsize=8)
                if column == 0:
                    ax.set_ylabel(name, fontsize=9)
            row += 1
    fig.suptitle(f"heatmaps of '{label_name or label}'", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_trained(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig, list[str]]:
    """Model, config and label names of a checkpoint written by ``examples.train``.

    Raises:
        ValueError: naming the file, when it is not such a checkpoint (a plain state dict, a
            file of another program or of a later version with unknown settings).
    """
    from examples.models import build_model

    state = load_train_checkpoint(checkpoint)
    settings = json.loads(state["config"])
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{checkpoint}: settings unknown to this version of examples.train: {', '.join(unknown)}")
    config = TrainConfig(**settings)
    names = list(state["label_names"])
    model = build_model(config.arch, len(names))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(
            f"{checkpoint}: its weights do not fit {config.arch} with {len(names)} labels: {error}"
        ) from None
    return model.eval(), config, names


def load_heads(checkpoint: str | Path, model: nn.Module, config: TrainConfig, labels: int) -> MultiScaleHeads | None:
    """The side heads of a checkpoint of a multi-scale run, attached to its ``model`` (or None).

    ``model``, ``config`` and the number of ``labels`` are what :func:`load_trained` returned.

    Raises:
        ValueError: naming the file, when its heads do not fit ``config.stages``.
    """
    heads = build_heads(config, model, labels)
    if heads is None:
        return None
    try:
        heads.load_state_dict(load_train_checkpoint(checkpoint)["heads"])
    except (KeyError, RuntimeError) as error:
        heads.remove()
        raise ValueError(
            f"{checkpoint}: its side heads do not fit --stages {' '.join(config.stages)}: {error}"
        ) from None
    return heads.eval()


def _image_format(text: str) -> str:
    """``--out``: a file name whose extension matplotlib can write."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(text).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise argparse.ArgumentTypeError(f"{text!r} must end in one of .{', .'.join(sorted(formats))}")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file name")
    return text


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="last.pt files written by examples.train")
    parser.add_argument("--names", nargs="+", help="a row title per checkpoint (default: its folder)")
    parser.add_argument("--label", required=True, help="label name or index")
    parser.add_argument("--indices", type=count_type(0), nargs="+", default=[0], help="test images to draw")
    parser.add_argument("--out", type=_image_format, default="figure5.png", help="an image file (.png, .pdf, ...)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.checkpoints):
        parser.error(f"--names has {len(args.names)} entries for {len(args.checkpoints)} checkpoints")
    names = args.names or [Path(p).parent.name for p in args.checkpoints]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # one row per name: a repeated name would drop a model from the figure
        given = "--names" if args.names else "the checkpoints' folders (the default --names)"
        parser.error(f"{given} repeat {', '.join(map(repr, repeated))}: give each checkpoint its own name")

    loaded = [load_trained(path) for path in args.checkpoints]
    _, config, label_names = loaded[0]
    for path, (_, other, other_names) in zip(args.checkpoints[1:], loaded[1:]):
        # the heatmaps of one label index on one test set: the runs must share both
        if other_names != label_names or (other.dataset, other.image_size) != (config.dataset, config.image_size):
            parser.error(
                f"{path} was trained on other data than {args.checkpoints[0]}: labels {other_names} at "
                f"{other.image_size} px on {other.dataset!r}, there {label_names} at {config.image_size} px on {config.dataset!r}"
            )
    label = (
        int(args.label)
        if args.label.isdigit()
        else label_names.index(args.label)
        if args.label in label_names
        else None
    )
    if label is None or not 0 <= label < len(label_names):
        parser.error(f"--label {args.label!r} is not one of {label_names}")
    test_set = build_datasets(config)[1]
    beyond = [i for i in args.indices if i >= len(test_set)]
    if beyond:
        parser.error(f"--indices {beyond} beyond the test set of {len(test_set)} images (0 to {len(test_set) - 1})")
    images = torch.stack([test_set[i][0] for i in args.indices])
    denormalize = denormalizer(test_set)
    models = {}
    for name, path, (model, config_k, labels_k) in zip(names, args.checkpoints, loaded):
        heads = load_heads(path, model, config_k, len(labels_k))
        models[name] = model if heads is None else (model, heads)
    return figure5(
        models,
        images,
        label,
        args.out,
        label_name=label_names[label],
        scale_factor=scale_factor(config),
        denormalize=denormalize,
    )


if __name__ == "__main__":
    print(main())
