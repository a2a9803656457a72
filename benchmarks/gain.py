"""Does attention consistency pay? Four rows, two regimes, several seeds, on a task below ceiling.

Run from the repository root::

    python -m benchmarks.gain                                   # the whole table (both regimes, 3 seeds)
    python -m benchmarks.gain --regimes finetune --seeds 0      # one seed of the fine-tuned regime
    python -m benchmarks.gain --rows baseline paper \\
        --row 'mse-0.1={"weights": {"flip": 0.1, "scale": 0.1}}'  # another setting, as a row of its own

The task is :class:`examples.synthetic.SyntheticShapes` in a harder setting than the demo's
(more shapes, smaller objects, more of them, fewer training images), so that the baseline's
mAP is well below ceiling (70-90). Two regimes:

- ``scratch``: the small GAP-FC net from random weights;
- ``finetune``: the same net fine-tuned from the stand-in pretraining (``synthetic-pretrain``,
  4 shapes on other images, trained once by this command), as the paper starts from ImageNet.

Rows (every row of a regime and seed sees the same data, order and initial weights):

- ``baseline``: the classification loss on the original view;
- ``augmentation``: the authors' four views (flip x scale), consistency weights 0: the
  control that isolates the consistency term;
- ``paper``: the same views with the paper's loss (Eq. 5, every weight 1);
- ``recommended``: the same views with :data:`examples.train.RECOMMENDED`.

Every run writes its metrics and checkpoint under ``--out/<regime>/<row>/seed<k>``; finished runs
are reused, so an interrupted command continues. The table gives the mean and the sample standard
deviation over seeds of the last epoch's test metrics, and of each run's training time (wall
seconds of the whole run, evaluation included). It is written to ``--results`` (``.json`` with
every run, ``.md`` with the table) and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from examples.train import PRESETS, RECOMMENDED, TrainConfig, train

__all__ = ["REGIMES", "ROWS", "main", "run_row", "table"]

# The harder task. 6 shapes from scratch, 8 (4 of them new) when fine-tuning; objects of 13-22 px
# (scratch) or 10-19 px (fine-tune) on 64 px images, up to 4 of them. Baselines measured at these
# settings: see benchmarks/README.md.
_SYNTHETIC = dict(dataset="synthetic", arch="small_resnet", image_size=64, scale_size=56, batch_size=16,
                  optimizer="adam", weight_decay=0.0, workers=0, synthetic_test=400, synthetic_objects=4,
                  lr_gamma=0.1, progress=False)  # fmt: skip
REGIMES: dict[str, dict[str, Any]] = {
    "scratch": _SYNTHETIC | dict(synthetic_classes=6, synthetic_sizes=(0.2, 0.35), synthetic_train=800, epochs=30, lr=2e-3, lr_step=24),
    "finetune": _SYNTHETIC | dict(synthetic_classes=8, synthetic_sizes=(0.15, 0.3), synthetic_train=500, epochs=10, lr=1e-3, lr_step=8),
}
_VIEWS = dict(transforms=("flip", "scale"), mode="product")
ROWS: dict[str, dict[str, Any]] = {
    "baseline": dict(transforms=()),
    "augmentation": _VIEWS | dict(consistency=False),
    "paper": dict(_VIEWS),
    "recommended": _VIEWS | RECOMMENDED,
}
COLUMNS = (
    ("mAP", "mAP", 100.0),
    ("F1-C", "F1-C", 100.0),
    ("inconsistency-flip", "incons. flip", 1.0),
    ("inconsistency-scale", "incons. scale", 1.0),
    ("pointing-game", "pointing game", 100.0),
    ("seconds", "time (s)", 1.0),
)


def _pretrained(out: Path) -> str:
    """The stand-in pretraining of the fine-tuned regime (trained once, then reused)."""
    config = TrainConfig(**PRESETS["synthetic-pretrain"] | dict(progress=False, out=str(out / "pretrain")))
    train(config, device="cpu", resume=True)
    return str(out / "pretrain" / "last.pt")


def run_row(regime: str, row: dict[str, Any], seed: int, out: Path, pretrained: str | None) -> dict[str, float]:
    """Train (or reuse) one run; its last epoch's metrics and its training time in seconds."""
    settings = REGIMES[regime] | row | dict(seed=seed, out=str(out))
    if regime == "finetune":
        settings["pretrained"] = pretrained
    config = TrainConfig(**settings)
    timing = out / "timing.json"
    start = time.perf_counter()
    history = train(config, device="cpu", resume=True)
    seconds = time.perf_counter() - start
    if timing.exists() and len(history) == config.epochs and seconds < 0.5 * json.loads(timing.read_text())["seconds"]:
        seconds = json.loads(timing.read_text())["seconds"]  # a finished run that was only reloaded
    else:
        timing.write_text(json.dumps({"seconds": seconds}))
    return history[-1] | {"seconds": seconds}


def _summary(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """Markdown: one row per (regime, row), mean +- std over seeds of each column."""
    lines = [
        "| regime | row | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|---" + "|---" * len(COLUMNS) + "|",
    ]
    for regime, rows in results.items():
        for name, runs in rows.items():
            cells = []
            for key, _, factor in COLUMNS:
                mean, std = _summary([run[key] * factor for run in runs])
                digits = 0 if key == "seconds" else 2 if key.startswith("inconsistency") else 1
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}")
            lines.append(f"| {regime} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_option(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--row must be NAME=JSON, got {text!r}")
    try:
        value = json.loads(settings)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--row {name}: the settings are not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--row {name}: the settings must be a JSON object, got {settings!r}")
    unknown = set(value) - {f for f in TrainConfig.__dataclass_fields__}
    if unknown:
        raise argparse.ArgumentTypeError(f"--row {name}: unknown settings {sorted(unknown)}")
    return name, _VIEWS | value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[dict[str, float]]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=list(REGIMES))
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS), default=list(ROWS), help="built-in rows")
    parser.add_argument("--row", action="append", type=_row_option, default=[], metavar="NAME=JSON",
                        help="an extra row: the four views with these TrainConfig settings")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/gain", help="where the runs are written (and reused from)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "gain"),
                        help="path of the result files, without extension")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = {name: ROWS[name] for name in args.rows} | dict(args.row)
    if not rows:
        parser.error("no rows: give --rows and/or --row")
    out = Path(args.out)
    pretrained = _pretrained(out) if "finetune" in args.regimes else None
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    runs: list[dict[str, Any]] = []
    for regime in args.regimes:
        results[regime] = {}
        for name, row in rows.items():
            for seed in args.seeds:
                print(f"== {regime} / {name} / seed {seed}", file=sys.stderr, flush=True)
                metrics = run_row(regime, row, seed, out / regime / name / f"seed{seed}", pretrained)
                results[regime].setdefault(name, []).append(metrics)
                runs.append({"regime": regime, "row": name, "seed": seed, "settings": row, "metrics": metrics})
    text = table(results)
    print(text)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "regimes": REGIMES, "runs": runs}, indent=2, default=list))
    path.with_suffix(".md").write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
