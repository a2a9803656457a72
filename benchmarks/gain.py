"""Does attention consistency pay? Four rows, two regimes, several seeds, on a task below ceiling.

Run from the repository root::

    python -m benchmarks.gain                                   # the synthetic tables (both regimes, 3 seeds)
    python -m benchmarks.gain --regimes real --threads 1 --rows baseline augmentation paper recommended \
        augmentation-scale paper-scale recommended-scale            # the real regime, each view set vs its control
    python -m benchmarks.gain --regimes finetune --seeds 0      # one seed of the fine-tuned regime
    python -m benchmarks.gain --regimes finetune --rows baseline aamn aamn-recommended  # AAMN (examples.gain)
    python -m benchmarks.gain --rows baseline paper \\
        --row 'mse-0.1={"weights": {"flip": 0.1, "scale": 0.1}}'  # another setting, as a row of its own

The study (task, regimes, rows) is defined in :mod:`examples.gain`. Every run writes its metrics
and checkpoint under ``--out/<regime>/<row>/seed<k>``; finished runs are reused, so an
interrupted command continues. The table (mean and sample standard deviation over seeds) is
written to ``--results`` (``.json`` with every run, ``.md`` with the table) and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from examples._files import write_text_atomic
from examples.gain import AAMN_ROWS, DEFAULT_REGIMES, REGIMES, ROWS, SCALE_ROWS, VIEWS, pretrained, run_row, table
from examples.train import TrainConfig

__all__ = ["main"]


# TrainConfig settings that run_row sets for every run: a row giving one would be silently replaced
_OWNED = {
    "out": "is set by the harness (each run is written under --out/<regime>/<row>/seed<k>: give --out)",
    "seed": "is set by the harness (give --seeds)",
    "pretrained": "is set by the regime (finetune loads the stand-in pretraining, real ImageNet's weights, scratch nothing)",
}


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
    owned = sorted(set(value) & set(_OWNED))
    if owned:
        reasons = "; ".join(f"{key!r} {_OWNED[key]}" for key in owned)
        raise argparse.ArgumentTypeError(f"--row {name}: settings the harness sets itself cannot be given: {reasons}")
    return name, VIEWS | value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[dict[str, float]]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=list(DEFAULT_REGIMES),
                        help=f"default: {' '.join(DEFAULT_REGIMES)}; 'real' on request")  # fmt: skip
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS | SCALE_ROWS | AAMN_ROWS), default=list(ROWS),
                        help="built-in rows (default: the four of examples.gain.ROWS; the scale-only and AAMN rows on request)")  # fmt: skip
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
    rows = {name: (ROWS | SCALE_ROWS | AAMN_ROWS)[name] for name in args.rows} | dict(args.row)
    if not rows:
        parser.error("no rows: give --rows and/or --row")
    out = Path(args.out)
    pretrained_path = pretrained(out)[0] if "finetune" in args.regimes else None
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    runs: list[dict[str, Any]] = []
    for regime in args.regimes:
        results[regime] = {}
        for name, row in rows.items():
            for seed in args.seeds:
                print(f"== {regime} / {name} / seed {seed}", file=sys.stderr, flush=True)
                metrics = run_row(regime, row, seed, out / regime / name / f"seed{seed}", pretrained_path)
                results[regime].setdefault(name, []).append(metrics)
                runs.append({"regime": regime, "row": name, "seed": seed, "settings": row, "metrics": metrics})
    text = table(results)
    print(text)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        json.dumps({"command": sys.argv, "regimes": REGIMES, "runs": runs}, indent=2, default=list),
        path.with_suffix(".json"),
        "results file",
    )
    write_text_atomic(text + "\n", path.with_suffix(".md"), "results table")
    return results


if __name__ == "__main__":
    main()
