"""Time the training step with and without attention consistency, and the loss on its own.

Run from the repository root::

    python -m benchmarks.run --preset cpu                  # ResNet-18, 112/96 px, batch 8, CPU
    python -m benchmarks.run --preset cpu-compile          # the same steps eager and torch.compile'd
    python -m benchmarks.run --preset cuda-r50             # ResNet-50 224/192, batch 32 and 64
    python -m benchmarks.run --preset cuda-r101-coco       # ResNet-101 448/384, 80 labels
    python -m benchmarks.run --preset cuda-r50 --dry-run   # print the cases and exit

A preset fills every setting; a flag given on the command line overrides it. Flags that take
several values (``--batch 32 64``, ``--runner eager compile``) make one case per combination.
Each run writes a JSON file (machine, versions, command, configuration, every timing, medians,
spread, ratios, peak memory) and a markdown table next to it, and prints the table.
See ``benchmarks/README.md`` for what is measured and the latest results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from examples._files import write_text_atomic

from .harness import (
    Clock,
    alternate,
    environment,
    load_average,
    paired_ratio,
    peak_memory,
    summarize,
    timing_summary,
)
from .loss_alone import NAMED_SHAPES, parse_shape, time_consistency, time_scale_term
from .report import markdown
from .training_step import GRADCAM, MULTISCALE, StepCase, build_steps, build_transforms, check_arch

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    # The smallest form, for the smoke test: a few seconds.
    "smoke": {
        "device": "cpu", "arch": "tiny", "labels": 3, "batch": [2], "size": 32, "scale_size": 24,
        "steps": 2, "warmup": 1, "threads": 1,
        "loss_shapes": ["2:3:8:3x3:2x2"], "loss_rounds": 2, "loss_warmup": 1, "reference_memory_gb": 0.5,
    },
    # A laptop-sized run: ResNet-18 at 112 px (scale view at 96), batch 8.
    "cpu": {
        "device": "cpu", "arch": "resnet18", "labels": 14, "batch": [8], "size": 112, "scale_size": 96,
        "steps": 10, "warmup": 2, "threads": 1,
        "loss_rounds": 4, "loss_warmup": 1, "reference_memory_gb": 1.0,
    },
    # The same with (d): multi-scale attention consistency, side heads at ResNet stages 2-4.
    "cpu-msac": {
        "device": "cpu", "arch": "resnet18", "labels": 14, "batch": [8], "size": 112, "scale_size": 96,
        "steps": 10, "warmup": 2, "threads": 1, "stages": ["layer2", "layer3", "layer4"], "parts": ["step"],
        "loss_rounds": 4, "loss_warmup": 1, "reference_memory_gb": 1.0,
    },
    # The training steps eager and under torch.compile (inductor on the CPU), side by side.
    "cpu-compile": {
        "device": "cpu", "arch": "resnet18", "labels": 14, "batch": [8], "size": 112, "scale_size": 96,
        "steps": 10, "warmup": 2, "threads": 1, "runner": ["eager", "compile"], "parts": ["step"],
        "loss_rounds": 4, "loss_warmup": 1, "reference_memory_gb": 1.0,
    },
    # What the Grad-CAM fallback costs against exact maps, on a model where both apply: (e)/(c).
    "cpu-gradcam": {
        "device": "cpu", "arch": "resnet18", "labels": 14, "batch": [8], "size": 112, "scale_size": 96,
        "steps": 10, "warmup": 2, "threads": 1, "gradcam": "detached", "parts": ["step"],
        "loss_rounds": 4, "loss_warmup": 1, "reference_memory_gb": 1.0,
    },
    # WIDER Attribute setting: ResNet-50 at 224/192, 14 labels.
    "cuda-r50": {
        "device": "cuda", "arch": "resnet50", "labels": 14, "batch": [32, 64], "size": 224, "scale_size": 192,
        "precision": ["bf16"], "memory_format": ["channels_last"], "runner": ["eager", "compile"],
        "steps": 30, "warmup": 5, "loss_rounds": 30, "loss_warmup": 3, "reference_memory_gb": 40.0,
    },
    # MS-COCO at 448/384: ResNet-101, 80 labels, the authors' COCO batch of 24.
    "cuda-r101-coco": {
        "device": "cuda", "arch": "resnet101", "labels": 80, "batch": [24], "size": 448, "scale_size": 384,
        "precision": ["bf16"], "memory_format": ["channels_last"], "runner": ["eager", "compile"],
        "steps": 20, "warmup": 5, "loss_rounds": 30, "loss_warmup": 3, "reference_memory_gb": 40.0,
    },
}  # fmt: skip

DEFAULTS: dict[str, Any] = {
    "transforms": ["flip", "scale"],
    "mode": "product",
    "precision": ["fp32"],
    "memory_format": ["contiguous"],
    "runner": ["eager"],
    "threads": None,
    "loss_shapes": list(NAMED_SHAPES),
    "parts": ["step", "loss"],
    "seed": 0,
    "stages": [],
    "gradcam": "",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every setting left out comes from the preset: "
        + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in preset.items())}" for name, preset in PRESETS.items()),
    )
    add = parser.add_argument
    add("--preset", choices=list(PRESETS), default="cpu", help="settings to start from (default: cpu)")
    add("--device", help="cpu or cuda (cuda:1, ...)")
    add("--arch", help="torchvision model with a GAP-FC head (weights=None), or 'tiny' (a 3-layer net)")
    add("--labels", type=int, help="number of labels L")
    add("--batch", type=int, nargs="+", help="images per step N (the multi-view steps see 2N per forward)")
    add("--size", type=int, help="input size of the original view")
    add("--scale-size", type=int, help="input size of the rescaled views")
    add("--transforms", nargs="+", help="transform names for the views (the library's registry)")
    add("--mode", choices=["product", "independent"], help="AttentionConsistencyLoss.views mode")
    add("--precision", nargs="+", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    add("--memory-format", nargs="+", choices=["contiguous", "channels_last"], help="model and input layout")
    add("--runner", nargs="+", choices=["eager", "compile"], help="eager, or torch.compile(model)")
    add("--steps", type=int, help="timed rounds of the training step (one step of each variant per round)")
    add("--warmup", type=int, help="untimed rounds first")
    add("--threads", type=int, help="torch.set_num_threads")
    add("--loss-shapes", nargs="+", help=f"{', '.join(NAMED_SHAPES)} or N:L:C:hxw:h'xw'")
    add("--loss-rounds", type=int, help="timed rounds of each loss benchmark")
    add("--loss-warmup", type=int, help="untimed rounds of each loss benchmark")
    add("--reference-memory-gb", type=float, help="cap on the reference loss's broadcast tensors")
    add("--parts", nargs="+", choices=["step", "loss"], help="what to run")
    add("--stages", nargs="+", help="also time (d): MultiScaleHeads at these stages (e.g. layer2 layer3 layer4)")
    add(
        "--gradcam",
        nargs="?",
        const="detached",
        choices=["detached", "create_graph"],
        help="also time (e): (c) with CAMHook(method='gradcam'), its weights detached (default) or in the graph",
    )
    add("--seed", type=int)
    add("--output", type=Path, help="JSON result path (default benchmarks/results/<preset>.json); .md beside it")
    add("--dry-run", action="store_true", help="print the resolved cases and exit")
    return parser


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's settings with the command line's on top."""
    settings = {**DEFAULTS, **PRESETS[args.preset]}
    for key, value in vars(args).items():
        if key not in ("preset", "output", "dry_run") and value is not None:
            settings[key] = value
    settings["preset"] = args.preset
    return settings


def step_cases(settings: dict[str, Any]) -> list[StepCase]:
    grid = itertools.product(settings["batch"], settings["precision"], settings["memory_format"], settings["runner"])
    return [
        StepCase(
            device=settings["device"],
            arch=settings["arch"],
            labels=settings["labels"],
            batch=batch,
            size=settings["size"],
            scale_size=settings["scale_size"],
            transforms=tuple(settings["transforms"]),
            mode=settings["mode"],
            precision=precision,
            channels_last=memory_format == "channels_last",
            compile=runner == "compile",
            seed=settings["seed"],
            stages=tuple(settings["stages"]),
            gradcam=settings["gradcam"] or "",
        )
        for batch, precision, memory_format, runner in grid
    ]


_LOWEST = {
    "labels": 1,
    "size": 1,
    "scale_size": 1,
    "steps": 1,
    "loss_rounds": 1,
    "warmup": 0,
    "loss_warmup": 0,
    "seed": 0,
}


def _check_settings(parser: argparse.ArgumentParser, settings: dict[str, Any]) -> None:
    """``parser.error`` naming the flag and the value of the first setting (from the preset or
    the command line) that cannot run."""
    for key, low in _LOWEST.items():
        if settings[key] < low:
            parser.error(f"--{key.replace('_', '-')} must be >= {low}, got {settings[key]}")
    if min(settings["batch"]) < 1:
        parser.error(f"--batch must be >= 1, got {min(settings['batch'])}")
    if settings["threads"] is not None and settings["threads"] < 1:
        parser.error(f"--threads must be >= 1, got {settings['threads']}")
    if not 0 < settings["reference_memory_gb"] < math.inf:
        parser.error(f"--reference-memory-gb must be a finite number > 0, got {settings['reference_memory_gb']}")
    for key in ("transforms", "batch", "loss_shapes", "precision", "memory_format", "runner", "parts", "stages"):
        repeated = sorted({str(v) for v in settings[key] if list(settings[key]).count(v) > 1})
        if repeated:  # a repeated transform would be one view twice; a repeated case, a wasted run
            parser.error(f"--{key.replace('_', '-')} repeats {', '.join(repeated)}")
    try:
        device_type = torch.device(settings["device"]).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda (cuda:1, ...), got {settings['device']!r}")
    checks = (
        ("--loss-shapes", lambda: [parse_shape(spec) for spec in settings["loss_shapes"]]),
        ("--arch", lambda: check_arch(settings["arch"])),
        ("--transforms", lambda: build_transforms(settings["transforms"], settings["scale_size"])),
    )
    for name, check in checks:
        try:
            value = check()
        except (ValueError, RuntimeError, TypeError) as error:
            parser.error(f"{name}: {error}")
        if name == "--loss-shapes":
            settings["loss_shapes"] = value


def _output(parser: argparse.ArgumentParser, path: Path) -> Path:
    """``--output``: a JSON file whose markdown twin (``.md`` beside it) is another file."""
    if path.suffix.lower() == ".md":
        parser.error(f"--output {path}: the markdown table is written beside it as .md; give a .json path")
    if path.is_dir():
        parser.error(f"--output {path} is a folder, expected a file name")
    try:  # before the run, not after it
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output {path}: cannot create its folder ({error.strerror or error})")
    return path


def _require_device(parser: argparse.ArgumentParser, settings: dict[str, Any]) -> torch.device:
    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {settings['device']} (preset {settings['preset']!r}) needs a CUDA GPU, and "
            "torch.cuda.is_available() is False on this machine; use --dry-run to see the cases, or --preset cpu"
        )
    return device


def _ratios(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, Any]]:
    """(c)/(b), (b)/(a) and, with (d), (d)/(c): ratio of the medians, and the summary of the
    round-by-round ratios."""
    pairs = {"c/b": ("c_consistency", "b_multiview"), "b/a": ("b_multiview", "a_plain")}
    if MULTISCALE in times:
        pairs["d/c"] = (MULTISCALE, "c_consistency")
    if GRADCAM in times:
        pairs["e/c"] = (GRADCAM, "c_consistency")
    medians = {name: summarize(values)["median"] for name, values in times.items()}
    of_medians = {key: medians[num] / medians[den] for key, (num, den) in pairs.items()}
    paired = {key: paired_ratio(times[num], times[den]) for key, (num, den) in pairs.items()}
    return of_medians, paired


def run_step_case(case: StepCase, rounds: int, warmup: int) -> dict[str, Any]:
    device = torch.device(case.device)
    if case.compile:
        # Every case compiles fresh models of one class: drop the previous cases' graphs, or
        # dynamo's per-function recompile limit would send later cases back to eager.
        torch._dynamo.reset()
    steps, facts = build_steps(case)
    samples = alternate(steps, rounds, warmup, Clock(device))
    variants = {name: timing_summary(samples, name) for name in steps}
    for name in steps:
        variants[name]["memory"] = peak_memory(steps[name], device)
    result = {"case": case.as_dict(), "label": case.label(), **facts, "variants": variants}
    result["ratios"], result["paired_ratios"] = _ratios(samples["wall"])
    if "process" in samples:
        result["process_ratios"], result["process_paired_ratios"] = _ratios(samples["process"])
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(vars(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def _benchmark_settings(settings: dict[str, Any], device: torch.device, compiles: bool) -> Iterator[None]:
    """Thread count, cuDNN autotuning and dynamo's hook guards for the run; restored after it."""
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if settings["threads"] is not None:
            torch.set_num_threads(settings["threads"])
        torch.backends.cudnn.benchmark = device.type == "cuda"
        # By default dynamo does not guard on module hooks: a compiled model that has already
        # run (or another compiled instance of its class) keeps running code traced without
        # the CAMHook, and the hook records nothing. Guarding on hooks gives the hooked model
        # of (c) its own graphs; (a) and (b) pay the same guard checks.
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False) if compiles else nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _run(settings: dict[str, Any], cases: list[StepCase], device: torch.device, command: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "command": command,
        "environment": environment(device),
        "load_average": {"start": load_average()},
        "settings": settings,
        "step": [],
        "loss": {"scale_term": [], "consistency": []},
    }
    for case in cases:
        print(f"step: {case.label()}", file=sys.stderr, flush=True)
        result["step"].append(run_step_case(case, settings["steps"], settings["warmup"]))
    if "loss" in settings["parts"]:
        limit = settings["reference_memory_gb"] * 2**30
        for shape in settings["loss_shapes"]:
            print(f"loss: {shape.label()}", file=sys.stderr, flush=True)
            rounds, warmup = settings["loss_rounds"], settings["loss_warmup"]
            result["loss"]["scale_term"] += time_scale_term(shape, device, rounds, warmup)
            result["loss"]["consistency"].append(time_consistency(shape, device, rounds, warmup, limit))
    result["load_average"]["end"] = load_average()
    return _jsonable(result)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result that was written to the JSON file."""
    parser = _parser()
    args = parser.parse_args(argv)
    settings = resolve(args)
    _check_settings(parser, settings)
    cases = step_cases(settings) if "step" in settings["parts"] else []
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.dry_run:
        print(command)
        for case in cases:
            print("step:", case.label())
        for shape in settings["loss_shapes"] if "loss" in settings["parts"] else []:
            print("loss:", shape.label())
        return {"command": command, "cases": [case.as_dict() for case in cases]}
    output = _output(parser, args.output or RESULTS / f"{args.preset}.json")
    device = _require_device(parser, settings)
    with _benchmark_settings(settings, device, any(case.compile for case in cases)):
        result = _run(settings, cases, device, command)

    table = markdown(result)
    write_text_atomic(json.dumps(result, indent=1) + "\n", output, "benchmark result")
    write_text_atomic(table, output.with_suffix(".md"), "benchmark table")
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
