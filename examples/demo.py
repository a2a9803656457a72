"""The main job: baseline vs attention consistency on the built-in synthetic dataset, on CPU.

Trains the same small GAP-FC network twice on :class:`examples.synthetic.SyntheticShapes`,
once with the classification loss alone and once with attention consistency under flip
and scale (the authors' four-view step), then prints a table like the paper's Tables 1-2
and draws Figure 5::

    python -m examples.demo --out runs/demo

Runs resume: a second call reuses finished epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from examples.figure5 import figure5, load_trained
from examples.train import PRESETS, TrainConfig, build_datasets, train

__all__ = ["main"]

COLUMNS = (
    ("mAP", "mAP"),
    ("F1-C", "F1-C"),
    ("F1-O", "F1-O"),
    ("inconsistency-flip", "incons. flip"),
    ("inconsistency-scale", "incons. scale"),
    ("pointing-game", "pointing game"),
)


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: metrics in percent (as the paper), inconsistencies x1000."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[key] * 1000:.2f}" if key.startswith("inconsistency") else f"{row[key] * 100:.1f}" for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=PRESETS["synthetic"]["epochs"])
    parser.add_argument("--train-images", type=int, default=TrainConfig.synthetic_train)
    parser.add_argument("--test-images", type=int, default=TrainConfig.synthetic_test)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = {"baseline": "synthetic", "attention consistency (flip + scale)": "synthetic-acfs"}
    results, configs = {}, {}
    for name, preset in runs.items():
        settings = PRESETS[preset] | dict(
            epochs=args.epochs, synthetic_train=args.train_images, synthetic_test=args.test_images,
            out=str(out / preset), progress=args.progress,
        )
        config = TrainConfig(**settings)
        print(f"== {name}: {preset}, {config.epochs} epochs on {config.synthetic_train} images", flush=True)
        history = train(config, device="cpu", resume=True)
        results[name], configs[name] = history[-1], config

    text = table(results)
    print("\n" + text)
    print("metrics in %, attention inconsistency (paper Eq. 5 on the test set) x1000")

    config = configs["baseline"]
    test_set = build_datasets(config)[1]
    label = 2 if config.synthetic_classes > 2 else 0
    indices = [i for i in range(len(test_set)) if test_set.targets[i, label] == 1][:2]
    models = {name.split(" (")[0]: load_trained(Path(c.out) / "last.pt")[0] for name, c in configs.items()}
    picture = figure5(
        models, test_set.images[indices], label, out / "figure5.png",
        label_name=test_set.label_names[label], scale_factor=config.scale_size / config.image_size,
        denormalize=test_set.denormalize,
    )
    summary = {"results": results, "configs": {k: dataclasses.asdict(c) for k, c in configs.items()}, "table": text}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'} and {picture}")
    return results


if __name__ == "__main__":
    main()
