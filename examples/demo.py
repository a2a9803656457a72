"""The main job: attention consistency against its controls on the built-in synthetic dataset, on CPU.

Follows the paper's protocol at toy size on :class:`examples.synthetic.SyntheticShapes`. A
small GAP-FC network is first pretrained on 4 shapes drawn on other images (a stand-in for
the ImageNet weights the paper starts from), then fine-tuned from those weights on a harder
task (8 shapes, 4 of them new, small objects, 500 training images: the ``finetune`` regime of
``benchmarks/gain.py``, seed 0) four times: the baseline, the authors' four views (flip x
scale) as augmentation only, the paper's loss on those views, and the recommended setting;
then once more with side heads at the net's three blocks (multi-scale attention consistency,
MSAC) and the recommended strength. It prints a table like the paper's Tables 1-2, the MSAC
row per stage, and draws Figure 5 (and the MSAC run's, a row per stage)::

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

from examples._files import write_text_atomic
from examples.figure5 import figure5, load_heads, load_trained
from examples.gain import REGIMES, ROWS, pretrained, run_row
from examples.train import PRESETS, SYNTHETIC_STAGES, build_datasets, scale_factor
from examples.validation import count_type

__all__ = ["main"]

PRETRAINED_MAP = 0.95
"""Pretraining mAP below which the demo warns that its starting point is weak."""

NAMES = {
    "baseline": "baseline",
    "augmentation": "flip + scale views, no consistency",
    "paper": "attention consistency, paper (Eq. 5, weight 1)",
    "recommended": "attention consistency, recommended",
    "msac": "multi-scale attention consistency (MSAC), recommended",
}
"""The rows of :data:`DEMO_ROWS`, as the table names them."""

DEMO_ROWS = ROWS | {"msac": ROWS["recommended"] | dict(stages=SYNTHETIC_STAGES)}
""":data:`examples.gain.ROWS` and MSAC: the recommended row with side heads at the three blocks, every
stage's terms at the recommended strength (the relative distance makes the stages' terms comparable,
so each gets weight 1), each head supervised with weight 1 and the prediction their mean."""

COLUMNS = (
    ("mAP", "mAP"),
    ("F1-C", "F1-C"),
    ("F1-O", "F1-O"),
    ("inconsistency-flip", "incons. flip"),
    ("inconsistency-scale", "incons. scale"),
    ("pointing-game", "pointing game"),
    ("seconds", "time (s)"),
)


def stage_table(row: dict[str, float]) -> str:
    """Markdown table of a multi-scale run: each stage's attention inconsistency and pointing game."""
    stages = [key.partition("/")[2] for key in row if key.startswith("inconsistency-flip/")]
    lines = ["| stage | incons. flip | incons. scale | pointing game |", "|---|---|---|---|"]
    lines.append(
        f"| model's own CAM | {row['inconsistency-flip']:.2f} | {row['inconsistency-scale']:.2f} | {row['pointing-game'] * 100:.1f} |"
    )
    for stage in stages:
        cells = (
            row[f"inconsistency-flip/{stage}"],
            row[f"inconsistency-scale/{stage}"],
            row[f"pointing-game/{stage}"] * 100,
        )
        lines.append(f"| side head at {stage} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.1f} |")
    return "\n".join(lines)


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: metrics in percent, attention inconsistency (Eq. 5) as is, both as the paper."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        cells = [
            f"{row[key]:.2f}"
            if key.startswith("inconsistency")
            else f"{row[key]:.0f}"
            if key == "seconds"
            else f"{row[key] * 100:.1f}"
            for key, _ in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_positive = count_type(1)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything trains, values that argparse alone lets through."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    batch = {
        "--pretrain-images": PRESETS["synthetic-pretrain"]["batch_size"],
        "--train-images": REGIMES["finetune"]["batch_size"],
    }
    for name, size in batch.items():
        given = getattr(args, name.removeprefix("--").replace("-", "_"))
        if given < size:  # an epoch drops its last, partial batch: it would take no step
            parser.error(f"{name} {given} is less than one batch ({size} images)")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    regime = REGIMES["finetune"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pretrain-epochs", type=_positive, default=PRESETS["synthetic-pretrain"]["epochs"])
    parser.add_argument("--pretrain-images", type=_positive, default=PRESETS["synthetic-pretrain"]["synthetic_train"])
    parser.add_argument("--epochs", type=_positive, default=regime["epochs"], help="fine-tuning epochs")
    parser.add_argument("--train-images", type=_positive, default=regime["synthetic_train"])
    parser.add_argument("--test-images", type=_positive, default=regime["synthetic_test"])
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    sizes = dict(synthetic_test=args.test_images, progress=args.progress)

    classes = PRESETS["synthetic-pretrain"]["synthetic_classes"]
    print(
        f"== pretraining: {classes} shapes, {args.pretrain_epochs} epochs on {args.pretrain_images} images", flush=True
    )
    weights, pretrained_metrics = pretrained(
        out, epochs=args.pretrain_epochs, synthetic_train=args.pretrain_images, **sizes
    )
    print(f"   pretrained mAP {pretrained_metrics['mAP'] * 100:.1f}", flush=True)
    if pretrained_metrics["mAP"] < PRETRAINED_MAP:
        print(
            f"warning: the pretraining reached mAP {pretrained_metrics['mAP'] * 100:.1f} only (the net learns the shapes "
            f"suddenly after a plateau, and this run ended before or during it); every row starts from weakly "
            f"trained features. For the intended comparison, run again with more epochs, e.g. "
            f"--pretrain-epochs {2 * args.pretrain_epochs} --out {out}-longer",
            file=sys.stderr,
            flush=True,
        )

    fine_tune = sizes | dict(synthetic_train=args.train_images, epochs=args.epochs)
    results, configs = {}, {}
    for key, name in NAMES.items():
        print(f"== {name}: {args.epochs} epochs on {args.train_images} images", flush=True)
        results[name] = run_row("finetune", DEMO_ROWS[key], 0, out / key, weights, **fine_tune)
        configs[name] = load_trained(out / key / "last.pt")[1]

    text = table(results)
    print("\n" + text)
    print(
        "metrics in %; attention inconsistency: paper Eq. 5 on the test set (Table 2); pointing game: share of "
        "heatmap peaks inside a box of their label; time: seconds of training and evaluation"
    )
    stages = stage_table(results[NAMES["msac"]])
    print(f"\nMSAC per stage (its mAP is that of the fused prediction):\n{stages}")

    config = configs[NAMES["baseline"]]
    test_set = build_datasets(config)[1]
    label = 2 if config.synthetic_classes > 2 else 0
    if not (test_set.targets[:, label] == 1).any():  # a small --test-images: draw a shape it shows
        label = int(test_set.targets.sum(0).argmax())
    indices = [i for i in range(len(test_set)) if test_set.targets[i, label] == 1][:2]
    drawn = {"baseline": "baseline", "paper": "AC paper", "recommended": "AC recommended"}
    models = {title: load_trained(out / key / "last.pt")[0] for key, title in drawn.items()}
    drawing = dict(
        label_name=test_set.label_names[label], scale_factor=scale_factor(config), denormalize=test_set.denormalize
    )
    picture = figure5(models, test_set.images[indices], label, out / "figure5.png", **drawing)
    msac_model, msac_config, msac_labels = load_trained(out / "msac" / "last.pt")
    heads = load_heads(out / "msac" / "last.pt", msac_model, msac_config, len(msac_labels))
    stage_picture = figure5(
        {"MSAC": (msac_model, heads)}, test_set.images[indices[:1]], label, out / "figure5_msac.png", **drawing
    )
    heads.remove()
    summary = {
        "results": results,
        "configs": {k: dataclasses.asdict(c) for k, c in configs.items()},
        "table": text,
        "stages": stages,
    }
    write_text_atomic(json.dumps(summary, indent=2), out / "results.json", "demo results")
    print(f"wrote {out / 'results.json'}, {picture} and {stage_picture}")
    return results


if __name__ == "__main__":
    main()
