"""What the AAMN head and attention consistency on it cost in a training step.

Four steps, each on its own copy of its model with its own optimizer (SGD, momentum 0.9), timed
alternately (:func:`benchmarks.harness.alternate`) after warm-up rounds (which also fill the memory
and run the CAMHook's one-time check):

- ``base``: the backbone's GAP-FC classifier, one view, weighted BCE, backward, step;
- ``aamn``: the same backbone with the AAMN head (:mod:`examples.aamn`), its memory observing the
  step (``with model.observe(targets)``);
- ``base_acfs`` / ``aamn_acfs``: the same through ``AttentionConsistencyLoss().views(...)``
  with the authors' four views (flip x scale) and a :class:`CAMHook`.

Run from the repository root::

    python -m benchmarks.aamn_step                       # the CPU cases below, about 3 minutes
    python -m benchmarks.aamn_step --cases small_resnet:64:56:16:8 --rounds 10

A case is ``arch:size:scale_size:batch:labels``. Results go to ``--output`` (``.json`` with every
timing, ``.md`` with the table of medians and paired ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from attn_consistency import AttentionConsistencyLoss, CAMHook, WeightedBCEWithLogitsLoss, get_transform, positive_ratio
from benchmarks.harness import Clock, alternate, environment, load_average, paired_ratio, timing_summary
from examples._files import write_text_atomic
from examples.models import build_model

__all__ = ["CASES", "main", "steps"]

CASES = ("small_resnet:64:56:16:8", "resnet50:112:96:8:80")
"""The default cases: the synthetic comparison's net and task size, and a ResNet-50 with COCO's 80 labels."""

VARIANTS = ("base", "aamn", "base_acfs", "aamn_acfs")
RATIOS = (("aamn", "base"), ("aamn_acfs", "aamn"), ("base_acfs", "base"), ("aamn_acfs", "base_acfs"))


def _case(text: str) -> tuple[str, int, int, int, int]:
    try:
        arch, *numbers = text.split(":")
        size, scale_size, batch, labels = (int(n) for n in numbers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is arch:size:scale_size:batch:labels, got {text!r}") from None
    return arch, size, scale_size, batch, labels


def steps(
    arch: str, size: int, scale_size: int, batch: int, labels: int, seed: int = 0
) -> dict[str, Callable[[], None]]:
    """The four step functions of one case (see the module's docstring)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = (torch.rand(batch, labels, generator=generator) < 0.3).float()
    criterion = WeightedBCEWithLogitsLoss(positive_ratio(targets))
    transforms = [get_transform("flip"), get_transform("scale", size=scale_size)]
    models = {"base": build_model(arch, labels), "aamn": build_model(f"aamn_{arch}", labels)}

    def step(kind: str, consistency: bool) -> Callable[[], None]:
        model = copy.deepcopy(models[kind]).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        loss_fn, cam = AttentionConsistencyLoss(), CAMHook(model) if consistency else None
        observe = getattr(model, "observe", None)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with observe(targets) if observe else contextlib.nullcontext():
                if cam is None:
                    loss = criterion(model(images), targets)
                else:
                    out = loss_fn.views(
                        model, cam, images, transforms, mode="product", targets=targets, criterion=criterion
                    )
                    loss = out.classification + out.loss
            loss.backward()
            optimizer.step()

        return run

    return {
        "base": step("base", False),
        "aamn": step("aamn", False),
        "base_acfs": step("base", True),
        "aamn_acfs": step("aamn", True),
    }


def _table(results: list[dict]) -> str:
    lines = [
        "| case | "
        + " | ".join(f"{v} (ms)" for v in VARIANTS)
        + " | "
        + " | ".join(f"{a}/{b}" for a, b in RATIOS)
        + " |",
        "|---" * (1 + len(VARIANTS) + len(RATIOS)) + "|",
    ]
    for result in results:
        times = [
            f"{result['variants'][v]['median'] * 1e3:.0f} [{result['variants'][v]['q1'] * 1e3:.0f}-{result['variants'][v]['q3'] * 1e3:.0f}]"
            for v in VARIANTS
        ]
        ratios = [
            f"{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]"
            for r in (result["ratios"][f"{a}/{b}"] for a, b in RATIOS)
        ]
        lines.append(f"| {result['case']} | " + " | ".join(times + ratios) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", type=_case, default=[_case(c) for c in CASES])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "aamn_step"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--rounds, --warmup and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    clock = Clock(torch.device("cpu"))
    results, start_load = [], load_average()
    for arch, size, scale_size, batch, labels in args.cases:
        case = f"{arch} {size}/{scale_size} N={batch} L={labels}"
        print(f"== {case}", file=sys.stderr, flush=True)
        samples = alternate(steps(arch, size, scale_size, batch, labels), args.rounds, args.warmup, clock)
        results.append({
            "case": case,
            "variants": {v: timing_summary(samples, v) for v in VARIANTS},
            "ratios": {f"{a}/{b}": paired_ratio(samples["wall"][a], samples["wall"][b]) for a, b in RATIOS},
        })  # fmt: skip
    text = _table(results)
    print(text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": sys.argv,
        "environment": environment(clock.device),
        "load_average": [start_load, load_average()],
        "results": results,
    }
    write_text_atomic(json.dumps(document, indent=2), output.with_suffix(".json"), "results file")
    write_text_atomic(text + "\n", output.with_suffix(".md"), "results table")
    return results


if __name__ == "__main__":
    main()
