"""The paper's Figure 5: heatmaps of one label on the original, flipped and scaled image.

One row per (model, image), three columns: the original view, the flipped view, the
scaled view, each with its own heatmap of the chosen label overlaid. Two checkpoints
side by side (baseline vs attention consistency) show whether the attention follows the
transform::

    python -m examples.figure5 runs/baseline/last.pt runs/acfs/last.pt --names R50 R50+ACfs \\
        --label tshirt --indices 0 7 --out figure5.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_consistency import CAMHook, get_transform
from examples.train import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, build_datasets, load_checkpoint, scale_factor

__all__ = ["figure5", "load_trained"]

def _imagenet_denormalize(images: Tensor) -> Tensor:
    """Undo the normalisation of :func:`examples.train.build_datasets` for files."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


@torch.no_grad()
def _views_and_maps(model: nn.Module, images: Tensor, label: int, scale_factor: float) -> list[tuple[Tensor, Tensor]]:
    """(image, heatmap upsampled to the image) for the original, flipped and scaled views."""
    flip, scale = get_transform("flip"), get_transform("scale", factor=scale_factor)
    views = [images, flip.apply_image(images, True), scale.apply_image(images, scale_factor)]
    result = []
    with CAMHook(model) as cam:
        for view in views:
            model(view)
            (maps,) = cam.pop()
            heat = F.interpolate(maps[:, label : label + 1].float(), size=view.shape[-2:], mode="bilinear", align_corners=False)
            result.append((view, heat[:, 0]))
    return result


def figure5(
    models: dict[str, nn.Module],
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
        models: name -> classifier (GAP-FC, evaluated in ``eval()`` mode).
        images: normalised images ``(K, 3, H, W)``.
        label: index of the label whose heatmaps are drawn.
        out: PNG path.
        label_name: shown in the title.
        scale_factor: size of the scaled view over the original's.
        denormalize: maps the normalised images back to [0, 1] RGB.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(models) * images.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    row = 0
    for name, model in models.items():
        training = model.training
        model.eval()
        per_view = _views_and_maps(model, images, label, scale_factor)
        model.train(training)
        for k in range(images.shape[0]):
            heats = [heat[k] for _, heat in per_view]
            low, high = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
            for column, ((view, _), heat, title) in enumerate(zip(per_view, heats, ("original", "flipped", "scaled"))):
                ax = axes[row, column]
                ax.imshow(denormalize(view[k]).clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                ax.imshow(((heat - low) / max(high - low, 1e-12)).cpu().numpy(), cmap="jet", alpha=0.5)
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
    """Model, config and label names of a checkpoint written by ``examples.train``."""
    from examples.models import build_model

    state = load_checkpoint(checkpoint)
    config = TrainConfig(**json.loads(state["config"]))
    names = list(state["label_names"])
    model = build_model(config.arch, len(names))
    model.load_state_dict(state["model"])
    return model.eval(), config, names


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="last.pt files written by examples.train")
    parser.add_argument("--names", nargs="+", help="a row title per checkpoint (default: its folder)")
    parser.add_argument("--label", required=True, help="label name or index")
    parser.add_argument("--indices", type=int, nargs="+", default=[0], help="test images to draw")
    parser.add_argument("--out", default="figure5.png")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.checkpoints):
        parser.error(f"--names has {len(args.names)} entries for {len(args.checkpoints)} checkpoints")

    loaded = [load_trained(path) for path in args.checkpoints]
    _, config, label_names = loaded[0]
    label = int(args.label) if args.label.isdigit() else label_names.index(args.label) if args.label in label_names else None
    if label is None or not 0 <= label < len(label_names):
        parser.error(f"--label {args.label!r} is not one of {label_names}")
    test_set = build_datasets(config)[1]
    images = torch.stack([test_set[i][0] for i in args.indices])
    denormalize = getattr(test_set, "denormalize", _imagenet_denormalize)
    names = args.names or [Path(p).parent.name for p in args.checkpoints]
    return figure5(
        {name: model for name, (model, _, _) in zip(names, loaded)},
        images, label, args.out, label_name=label_names[label], scale_factor=scale_factor(config), denormalize=denormalize,
    )


if __name__ == "__main__":
    print(main())
