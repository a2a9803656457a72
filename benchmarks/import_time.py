"""What ``import attn_consistency`` costs over ``import torch``, in fresh interpreters.

Run from the repository root::

    python -m benchmarks.import_time                 # 15 rounds, results/import_time.{json,md}
    python -m benchmarks.import_time --rounds 5 --results /tmp/import_time

Each round starts one interpreter per variant, in rotated order (``torch`` alone, then the
package), and reads the time of the import inside it (``perf_counter`` around the ``import``
statement, so the interpreter's own start is not counted). The ratio is taken round by round,
and its median with the quartiles is the figure to compare with the target (at most 1.15).
The package's child process also says which heavy optional modules the import loaded
(``torch._dynamo``, ``kornia``, ``timm``): only their users should pay for them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import environment, paired_ratio, summarize
from examples._files import write_text_atomic

__all__ = ["HEAVY", "main", "measure_once"]

#: modules that only some users need; ``import attn_consistency`` should not load them
HEAVY = ("torch._dynamo", "kornia", "timm", "torchvision", "scipy", "matplotlib")

_CHILD = """
import sys, time, json
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def measure_once(module: str) -> dict[str, Any]:
    """Seconds to import ``module`` in a new interpreter, and which of :data:`HEAVY` it loaded."""
    code = _CHILD.format(module=module, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"import {module} failed in a child interpreter:\n{result.stderr.strip()}")
    value: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interpreters per variant (default: 15)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "import_time"),
                        help="path of the result files, without extension")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    variants = ("torch", "attn_consistency")
    times: dict[str, list[float]] = {name: [] for name in variants}
    loaded: set[str] = set()
    measure_once("attn_consistency")  # a first import fills the file cache and the bytecode
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for name in order:
            sample = measure_once(name)
            times[name].append(sample["seconds"])
            if name == "attn_consistency":
                loaded |= set(sample["loaded"])
    ratio = paired_ratio(times["attn_consistency"], times["torch"])
    result = {
        "command": sys.argv,
        "environment": environment(torch.device("cpu")),
        "seconds": {name: summarize(values) | {"times_s": values} for name, values in times.items()},
        "ratio": ratio,
        "heavy_modules_loaded": sorted(loaded),
    }
    torch_s, package_s = (result["seconds"][name]["median"] for name in variants)
    text = "\n".join(
        [
            "| import | median (s) | quartiles (s) |",
            "|---|---|---|",
            *(
                f"| {name} | {result['seconds'][name]['median']:.2f} | "
                f"{result['seconds'][name]['q1']:.2f}-{result['seconds'][name]['q3']:.2f} |"
                for name in variants
            ),
            "",
            f"attn_consistency / torch, round by round: median {ratio['median']:.3f} "
            f"(quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f}, {ratio['n']} rounds); "
            f"medians {package_s:.2f} s / {torch_s:.2f} s. "
            f"Optional modules the import loaded: {', '.join(sorted(loaded)) or 'none'}.",
        ]
    )
    print(text)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(result, indent=2), path.with_suffix(".json"), "results file")
    write_text_atomic(text + "\n", path.with_suffix(".md"), "results table")
    return result


if __name__ == "__main__":
    main()
