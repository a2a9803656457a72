"""Does attention consistency pay? The study behind ``benchmarks/gain.py`` and the demo.

The task is :class:`examples.synthetic.SyntheticShapes` in a harder setting than the demo's
(more shapes, smaller objects, more of them, fewer training images), so that the baseline's
mAP is well below ceiling (70-90). Two regimes:

- ``scratch``: the small GAP-FC net from random weights;
- ``finetune``: the same net fine-tuned from the stand-in pretraining (``synthetic-pretrain``,
  4 shapes on other images, trained once by this command), as the paper starts from ImageNet;
- ``real`` (the paper's regime, run on request): EfficientNet-Lite0 with its ImageNet weights
  (``examples.pretrained``) fine-tuned on :class:`examples.digits.DigitMosaics`, real handwritten
  digits on real photographs, at 160 px (5x5 heatmaps; the scaled view 128 px, 4x4). To fit a
  2-core CPU, the weights of the stem and of the first 8 of its 16 blocks are not trained
  (``freeze``; their batch norms still update their statistics).

Rows (every row of a regime and seed sees the same data, order and initial weights):

- ``baseline``: the classification loss on the original view;
- ``augmentation``: the authors' four views (flip x scale), consistency weights 0: the
  control that isolates the consistency term;
- ``paper``: the same views with the paper's loss (Eq. 5, every weight 1);
- ``recommended``: the same views with :data:`examples.presets.RECOMMENDED`.

:data:`SCALE_ROWS` are the control, paper and recommended rows with the scale view alone: the
transform whose constraint every label survives (digits are not mirror-symmetric, so flip is
the wrong constraint on the real regime's digits; its rows show what that costs).

:data:`AAMN_ROWS` (run on request, ``--rows aamn ...``) put an AAMN head on the same net
(``aamn_small_resnet``: the fine-tuned regime loads the pretrained net into its trunk): ``aamn`` alone,
``aamn-paper`` and ``aamn-recommended`` with the four views and the loss of ``paper`` / ``recommended``.

:func:`run_row` trains one (regime, row, seed); a finished run is reused. :func:`table` gives
the mean and the sample standard deviation over seeds of the last epoch's test metrics and of
each run's training time (wall seconds of the whole run, evaluation included).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from examples._files import write_text_atomic
from examples.presets import PRESETS, RECOMMENDED
from examples.train import TrainConfig, train

__all__ = ["AAMN_ROWS", "DEFAULT_REGIMES", "REGIMES", "ROWS", "SCALE_ROWS", "VIEWS", "pretrained", "run_row", "table"]

# The harder task: the demo presets' net, images and optimizer, with 6 shapes from scratch or 8
# (4 of them new) when fine-tuning, objects of 13-22 px (scratch) or 10-19 px (fine-tune) on 64 px
# images, up to 4 of them. The baselines' mAP at these settings: README, "Does it pay?".
_SYNTHETIC = PRESETS["synthetic"] | dict(synthetic_objects=4, synthetic_test=400, progress=False)
_FROZEN = ("_conv_stem", "_bn0", *(f"_blocks.{i}" for i in range(8)))
REGIMES: dict[str, dict[str, Any]] = {
    "scratch": _SYNTHETIC
    | dict(synthetic_classes=6, synthetic_sizes=(0.2, 0.35), synthetic_train=800, epochs=30, lr=2e-3, lr_step=24),
    "finetune": _SYNTHETIC
    | dict(synthetic_classes=8, synthetic_sizes=(0.15, 0.3), synthetic_train=500, epochs=10, lr=1e-3, lr_step=8),
    "real": dict(
        dataset="digits",
        arch="efficientnet-lite0",
        pretrained="imagenet",
        freeze=_FROZEN,
        image_size=160,
        scale_size=128,
        synthetic_train=800,
        synthetic_test=200,
        synthetic_objects=3,
        synthetic_sizes=(0.2, 0.4),
        epochs=4,
        batch_size=16,
        test_batch_size=50,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        lr_step=3,
        lr_gamma=0.3,
        workers=0,
        progress=False,
    ),
}
#: the regimes ``benchmarks.gain`` runs unless told (``real`` takes about 5-15 min a row on a CPU)
DEFAULT_REGIMES = ("scratch", "finetune")
VIEWS = dict(transforms=("flip", "scale"), mode="product")
ROWS: dict[str, dict[str, Any]] = {
    "baseline": dict(transforms=()),
    "augmentation": VIEWS | dict(consistency=False),
    "paper": dict(VIEWS),
    "recommended": VIEWS | RECOMMENDED,
}
SCALE_ROWS: dict[str, dict[str, Any]] = {
    "augmentation-scale": dict(transforms=("scale",), consistency=False),
    "paper-scale": dict(transforms=("scale",)),
    "recommended-scale": dict(transforms=("scale",)) | RECOMMENDED,
}
_AAMN = dict(arch="aamn_small_resnet")
AAMN_ROWS: dict[str, dict[str, Any]] = {
    "aamn": ROWS["baseline"] | _AAMN,
    "aamn-paper": ROWS["paper"] | _AAMN,
    "aamn-recommended": ROWS["recommended"] | _AAMN,
}
COLUMNS = (
    ("mAP", "mAP", 100.0),
    ("F1-C", "F1-C", 100.0),
    ("inconsistency-flip", "incons. flip", 1.0),
    ("inconsistency-scale", "incons. scale", 1.0),
    ("pointing-game", "pointing game", 100.0),
    ("seconds", "time (s)", 1.0),
)


def pretrained(out: Path, **overrides: Any) -> tuple[str, dict[str, float]]:
    """The stand-in pretraining of the fine-tuned regime (trained once, then reused).

    Returns the checkpoint's path and the pretraining's last metrics.
    """
    config = TrainConfig(
        **PRESETS["synthetic-pretrain"] | dict(progress=False) | overrides | dict(out=str(out / "pretrain"))
    )
    history = train(config, device="cpu", resume=True)
    return str(out / "pretrain" / "last.pt"), history[-1]


def run_row(
    regime: str, row: dict[str, Any], seed: int, out: Path, pretrained_path: str | None, **overrides: Any
) -> dict[str, float]:
    """Train (or reuse) one run; its last epoch's metrics and its training time in seconds.

    ``overrides`` change settings of the regime (the demo's test runs it at toy size).
    """
    settings = REGIMES[regime] | row | overrides | dict(seed=seed, out=str(out))
    if regime == "finetune":
        settings["pretrained"] = pretrained_path
    config = TrainConfig(**settings)
    # written once the run has finished: a run that was only reloaded keeps the time it took
    timing = out / "timing.json"
    stored = json.loads(timing.read_text()) if timing.exists() else {}
    start = time.perf_counter()
    history = train(config, device="cpu", resume=True)
    if stored.get("epochs") != config.epochs:
        # an interrupted and resumed run counts the time since it resumed
        stored = {"epochs": config.epochs, "seconds": time.perf_counter() - start}
        write_text_atomic(json.dumps(stored), timing, "timing file")
    return history[-1] | {"seconds": stored["seconds"]}


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
