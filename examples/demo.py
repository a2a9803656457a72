"""The main job: baseline vs attention consistency on the built-in synthetic dataset, on CPU.

Follows the paper's protocol at toy size on :class:`examples.synthetic.SyntheticShapes`. A
small GAP-FC network is first pretrained on 4 shapes drawn on other images (a stand-in for
the ImageNet weights the paper starts from), then fine-tuned on 6 shapes twice from those
weights: once with the classification loss alone and once with attention consistency under
flip and scale (the authors' four-view step). It prints a table like the paper's Tables 1-2
and draws Figure 5::

    python -m examples.demo --out runs/demo

Runs resume: a second call reuses finished epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from examples.figure5 import figure5, load_trained
from examples.train import PRESETS, TrainConfig, build_datasets, scale_factor, train

__all__ = ["main"]

PRETRAINED_MAP = 0.95
"""Pretraining mAP below which the demo warns that its starting point is weak."""

COLUMNS = (
    ("mAP", "mAP"),
    ("F1-C", "F1-C"),
    ("F1-O", "F1-O"),
    ("inconsistency-flip", "incons. flip"),
    ("inconsistency-scale", "incons. scale"),
    ("pointing-game", "pointing game"),
)


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: metrics in percent, attention inconsistency (Eq. 5) as is, both as the paper."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[key]:.2f}" if key.startswith("inconsistency") else f"{row[key] * 100:.1f}" for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pretrain-epochs", type=_positive, default=PRESETS["synthetic-pretrain"]["epochs"])
    parser.add_argument("--epochs", type=_positive, default=PRESETS["synthetic"]["epochs"], help="fine-tuning epochs")
    parser.add_argument("--train-images", type=_positive, default=PRESETS["synthetic"]["synthetic_train"])
    parser.add_argument("--test-images", type=_positive, default=TrainConfig.synthetic_test)
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    sizes = dict(synthetic_train=args.train_images, synthetic_test=args.test_images, progress=args.progress)

    pretrain = TrainConfig(**PRESETS["synthetic-pretrain"] | sizes | dict(epochs=args.pretrain_epochs, out=str(out / "pretrain")))
    print(f"== pretraining: {pretrain.synthetic_classes} shapes, {pretrain.epochs} epochs on {pretrain.synthetic_train} images", flush=True)
    pretrained = train(pretrain, device="cpu", resume=True)[-1]
    print(f"   pretrained mAP {pretrained['mAP'] * 100:.1f}", flush=True)
    if pretrained["mAP"] < PRETRAINED_MAP:
        print(
            f"warning: the pretraining reached mAP {pretrained['mAP'] * 100:.1f} only (the net learns the shapes "
            f"suddenly after a plateau, and this run ended before or during it); both rows start from weakly "
            f"trained features. For the intended comparison, run again with more epochs, e.g. "
            f"--pretrain-epochs {2 * pretrain.epochs} --out {out}-longer",
            file=sys.stderr, flush=True,
        )

    runs = {"baseline": "synthetic", "attention consistency (flip + scale)": "synthetic-acfs"}
    results, configs = {}, {}
    for name, preset in runs.items():
        settings = PRESETS[preset] | sizes | dict(epochs=args.epochs, pretrained=str(Path(pretrain.out) / "last.pt"), out=str(out / preset))
        config = TrainConfig(**settings)
        print(f"== {name}: {preset}, {config.epochs} epochs on {config.synthetic_train} images", flush=True)
        history = train(config, device="cpu", resume=True)
        results[name], configs[name] = history[-1], config

    text = table(results)
    print("\n" + text)
    print("metrics in %; attention inconsistency: paper Eq. 5 on the test set (Table 2); pointing game: share of heatmap peaks inside a box of their label")

    config = configs["baseline"]
    test_set = build_datasets(config)[1]
    label = 2 if config.synthetic_classes > 2 else 0
    indices = [i for i in range(len(test_set)) if test_set.targets[i, label] == 1][:2]
    models = {name.split(" (")[0]: load_trained(Path(c.out) / "last.pt")[0] for name, c in configs.items()}
    picture = figure5(
        models, test_set.images[indices], label, out / "figure5.png",
        label_name=test_set.label_names[label], scale_factor=scale_factor(config),
        denormalize=test_set.denormalize,
    )
    summary = {"results": results, "configs": {k: dataclasses.asdict(c) for k, c in configs.items()}, "table": text}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'} and {picture}")
    return results


if __name__ == "__main__":
    main()
