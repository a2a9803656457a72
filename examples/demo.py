"""The main job: attention consistency against its controls on the built-in synthetic dataset, on CPU.

Follows the paper's protocol at toy size on :class:`examples.synthetic.SyntheticShapes`. A
small GAP-FC network is first pretrained on 4 shapes drawn on other images (a stand-in for
the ImageNet weights the paper starts from), then fine-tuned from those weights on a harder
task (8 shapes, 4 of them new, small objects, 500 training images: the ``finetune`` regime of
``benchmarks/gain.py``, seed 0) four times: the baseline, the authors' four views (flip x
scale) as augmentation only, the paper's loss on those views, and the recommended setting.
It prints a table like the paper's Tables 1-2 and draws Figure 5::

    python -m examples.demo --out runs/demo

``--msac`` adds a fifth run, side heads at the net's three blocks (multi-scale attention
consistency, MSAC) at the recommended strength: a fifth row of the table, a table per stage
and ``figure5_msac.png``.

The screen shows one line per run, as it starts and as it ends, with an estimate of the time
left; the per-epoch metrics and the resume messages of each run go to ``OUT/<run>/log.txt``.
Runs resume: a second call reuses finished epochs.

Threads: torch runs on one thread unless ``--threads`` says otherwise. The threads of a
parallel region wait for each other at every op, so on a busy machine one of them descheduled
stalls the rest: on this repository's 2-core machine, busy with other jobs (load average 8-13),
one epoch of the paper's row took 148 s on 2 threads and 11-14 s on 1. One thread cannot wait
for itself: a busy machine slows the demo down by its share of the core, not by a collapse.
On one thread the whole demo needs about 3 minutes of CPU time (2 min 56 s measured), its
wall time on an idle core; a second thread could gain little of it, the net being small and
its ops short. The thread count also changes the figures a little (the CPU kernels add up in
another order).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from examples._files import write_text_atomic
from examples.figure5 import figure5, load_heads, load_trained
from examples.gain import REGIMES, ROWS, pretrained, run_row
from examples.presets import PRESETS, SYNTHETIC_STAGES
from examples.train import build_datasets, scale_factor
from examples.validation import count_type

__all__ = ["main"]

PRETRAINED_MAP = 0.95
"""Pretraining mAP below which the demo warns that its starting point is weak."""

THREADS = 1
"""Torch CPU threads unless ``--threads`` says otherwise (the module's docstring says why)."""

NAMES = {
    "baseline": "baseline",
    "augmentation": "flip + scale views, no consistency",
    "paper": "attention consistency, paper (Eq. 5, weight 1)",
    "recommended": "attention consistency, recommended",
}
"""The rows of the demo's table (the README's quick-start table), by run."""

MSAC_NAMES = {"msac": "multi-scale attention consistency (MSAC), recommended"}
"""The row ``--msac`` adds."""

DEMO_ROWS = ROWS | {"msac": ROWS["recommended"] | dict(stages=SYNTHETIC_STAGES)}
""":data:`examples.gain.ROWS` and MSAC: the recommended row with side heads at the three blocks, every
stage's terms at the recommended strength (the relative distance makes the stages' terms comparable,
so each gets weight 1), each head supervised with weight 1 and the prediction their mean."""

TRAIN_COST = {"pretrain": 1.0, "baseline": 1.0, "augmentation": 3.5, "paper": 3.5, "recommended": 3.6, "msac": 5.0}
"""Cost of a training image per epoch in each run, relative to one view (four views at 64 and 56 px:
about 3.5; MSAC's side heads add more). With an evaluation image at 1, it weighs the runs' times
for the estimate of the time left."""

COLUMNS = (
    ("mAP", "mAP"),
    ("F1-C", "F1-C"),
    ("F1-O", "F1-O"),
    ("inconsistency-flip", "incons. flip"),
    ("inconsistency-scale", "incons. scale"),
    ("pointing-game", "pointing game"),
    ("seconds", "time (s)"),
)

NOTE = (
    "metrics in %; attention inconsistency: paper Eq. 5 on the test set (Table 2); pointing game: share of "
    "heatmap peaks inside a box of their label; time: seconds of training and evaluation"
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


def duration(seconds: float) -> str:
    """``41 s``, ``2 min 5 s``."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def _time_left(seconds: float) -> str:
    """A rounded estimate: ``about 40 s left``, ``about 3 min left``."""
    if seconds < 90:
        return f"about {max(10, round(seconds / 10) * 10)} s left"
    return f"about {round(seconds / 60)} min left"


def _epochs_done(run: Path) -> int:
    """Epochs a run folder has finished (0 for none)."""
    with contextlib.suppress(OSError, ValueError):
        return len(json.loads((run / "metrics.json").read_text()))
    return 0


@dataclasses.dataclass
class _Run:
    key: str  # the folder under --out
    title: str  # how the progress line names it
    epochs: int
    images: int
    cost: float  # expected work left, in evaluation images (see TRAIN_COST)
    done: int  # epochs finished before this call


class Progress:
    """One line per run on the screen: ``[3/5] paper: training ... done in 41 s (mAP 82.7); about 2 min left``.

    The time left is the expected work of the runs still to come (:data:`TRAIN_COST`) at the
    pace of the runs trained so far (runs reused from an earlier call take no time and do not count).
    """

    def __init__(self, runs: list[_Run]) -> None:
        self.runs, self.index = runs, 0
        self.seconds = self.work = 0.0
        self.started = time.perf_counter()

    def start(self) -> _Run:
        run = self.runs[self.index]
        self.index += 1
        if run.cost == 0:
            what = "reusing the finished run"
        elif run.done:
            what = f"training (resuming after epoch {run.done} of {run.epochs})"
        else:
            what = "training"
        print(f"[{self.index}/{len(self.runs)}] {run.title}: {what} ...", end=" ", flush=True)
        self._clock = time.perf_counter()
        return run

    def finish(self, run: _Run, metric: float) -> None:
        seconds = time.perf_counter() - self._clock
        if run.cost > 0:
            self.seconds, self.work = self.seconds + seconds, self.work + run.cost
        left = sum(r.cost for r in self.runs[self.index :])
        estimate = f"; {_time_left(left * self.seconds / self.work)}" if left > 0 and self.work > 0 else ""
        done = f"done in {duration(seconds)}" if run.cost > 0 else "done"
        print(f"{done} (mAP {metric * 100:.1f}){estimate}", flush=True)


def _plan(args: argparse.Namespace, out: Path, keys: Sequence[str]) -> list[_Run]:
    runs = [_Run("pretrain", "pretraining", args.pretrain_epochs, args.pretrain_images, 0.0, 0)]
    runs += [_Run(key, key, args.epochs, args.train_images, 0.0, 0) for key in keys]
    for run in runs:
        run.done = min(_epochs_done(out / run.key), run.epochs)
        per_epoch = run.images * TRAIN_COST[run.key] + args.test_images
        run.cost = (run.epochs - run.done) * per_epoch
    return runs


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` CPU threads (OpenMP and MKL), then restore what was set before.

    Sets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` for any process started meanwhile, and the
    inter-op threads too where torch still allows it (once per process, before any parallel work).
    """
    before, environment = torch.get_num_threads(), {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, str(count)))
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def _parser() -> argparse.ArgumentParser:
    regime = REGIMES["finetune"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pretrain-epochs", type=_positive, default=PRESETS["synthetic-pretrain"]["epochs"])
    parser.add_argument("--pretrain-images", type=_positive, default=PRESETS["synthetic-pretrain"]["synthetic_train"])
    parser.add_argument("--epochs", type=_positive, default=regime["epochs"], help="fine-tuning epochs")
    parser.add_argument("--train-images", type=_positive, default=regime["synthetic_train"])
    parser.add_argument("--test-images", type=_positive, default=regime["synthetic_test"])
    parser.add_argument(
        "--threads",
        type=_positive,
        default=THREADS,
        help="torch CPU threads (default: %(default)s, which does not collapse on a busy machine, where "
        "threads stall waiting for each other: see above)",
    )
    parser.add_argument("--msac", action="store_true", help="add the MSAC run: a fifth row, a table per stage")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a progress bar for every epoch's steps (default: one line per run only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    with threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = Path(args.out)
    names = NAMES | (MSAC_NAMES if args.msac else {})
    sizes = dict(synthetic_test=args.test_images, progress=args.progress)
    classes = PRESETS["synthetic-pretrain"]["synthetic_classes"]
    print(
        f"Pretraining on {classes} shapes ({_count(args.pretrain_epochs, 'epoch')}, "
        f"{_count(args.pretrain_images, 'image')}), then {len(names)} fine-tuning runs on "
        f"{REGIMES['finetune']['synthetic_classes']} shapes ({_count(args.epochs, 'epoch')}, "
        f"{_count(args.train_images, 'image')}, {_count(args.test_images, 'test image')}), on "
        f"{_count(args.threads, 'torch thread')}. Per-epoch detail: {out / '<run>' / 'log.txt'}",
        flush=True,
    )
    progress = Progress(_plan(args, out, list(names)))
    step = progress.start()
    weights, pretrained_metrics = pretrained(
        out,
        epochs=args.pretrain_epochs,
        synthetic_train=args.pretrain_images,
        log=str(out / "pretrain" / "log.txt"),
        **sizes,
    )
    progress.finish(step, pretrained_metrics["mAP"])
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
    for key, name in names.items():
        step = progress.start()
        log = str(out / key / "log.txt")
        results[name] = run_row("finetune", DEMO_ROWS[key], 0, out / key, weights, log=log, **fine_tune)
        progress.finish(step, results[name]["mAP"])
        configs[name] = load_trained(out / key / "last.pt")[1]
    total = time.perf_counter() - progress.started

    text = table(results)
    print("\n" + text + "\n\n" + NOTE)
    stages = stage_table(results[MSAC_NAMES["msac"]]) if args.msac else None
    if stages is not None:
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
    pictures = [figure5(models, test_set.images[indices], label, out / "figure5.png", **drawing)]
    if args.msac:
        msac_model, msac_config, msac_labels = load_trained(out / "msac" / "last.pt")
        heads = load_heads(out / "msac" / "last.pt", msac_model, msac_config, len(msac_labels))
        pictures.append(
            figure5(
                {"MSAC": (msac_model, heads)}, test_set.images[indices[:1]], label, out / "figure5_msac.png", **drawing
            )
        )
        heads.remove()
    summary: dict[str, Any] = {
        "results": results,
        "configs": {k: dataclasses.asdict(c) for k, c in configs.items()},
        "table": text,
    }
    if stages is not None:
        summary["stages"] = stages
    write_text_atomic(json.dumps(summary, indent=2), out / "results.json", "demo results")
    print(f"\n{written(out, ['pretrain', *names], [p.name for p in pictures])}")
    print(f"total {duration(total)} on {_count(args.threads, 'torch thread')}", flush=True)
    return results


def written(out: Path, runs: Sequence[str], pictures: Sequence[str]) -> str:
    """What the demo wrote, file by file."""
    what = {
        "figure5.png": "Figure 5: heatmaps of the baseline and both attention-consistency rows",
        "figure5_msac.png": "Figure 5 of the MSAC run: a row per stage",
    }
    lines = [
        f"Files written under {out}:",
        "  results.json              the table, each row's last metrics and settings"
        + (", the table per stage" if "msac" in runs else ""),
        *(f"  {name:<25} {what[name]}" for name in pictures),
        f"  <run>/last.pt             each run's checkpoint; <run> is {', '.join(runs)}",
        "  <run>/metrics.json, .csv  each run's metrics per epoch",
        "  <run>/log.txt             each run's per-epoch report and resume messages",
        "  <run>/timing.json         each fine-tuning run's training time",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
