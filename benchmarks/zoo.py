"""Which timm model families give heatmaps, and how exact they are: one small model per family.

Run from the repository root (timm must be installed; no weights are downloaded)::

    python -m benchmarks.zoo                          # every family of the installed timm, a few minutes
    python -m benchmarks.zoo --families convnext vision_transformer swin_transformer

For each family (a module of ``timm.models``) the smallest-named model that builds is made with
``num_classes=5`` and random weights, in eval mode, and one batch of two images at its default
input size goes through ``CAMHook(model)``:

- ``exact``: the maps of Eq. 1; the invariant ``heatmaps.mean((2, 3)) + cam.offset == logits``
  holds to ``--tolerance`` relative to the largest logit.
- ``exact (<remedy>)``: refused as built, with a message naming the way out, and exact once built
  that way (``global_pool='avg'`` for a class-token transformer, no distillation head).
- ``gradcam (on request)``: no exact map exists (a head with hidden layers); refused with a
  message naming ``method='gradcam'``, and ``CAMHook(model, method='gradcam')`` gives finite maps
  whose gradient reaches the backbone.
- ``refused``: a ``ValueError`` / ``TypeError`` of CAMHook that names the head (its message is kept).
- ``WRONG``: maps that break the invariant without an error. ``crash``: an exception from inside
  torch or timm. Both are defects; the command exits with status 1 when any occurs.

Every map must also lie on the input's grid: ``h x w`` cells are ``H / s x W / s`` (each within a
cell) for one stride ``s``, so that a tensor that is no map of the image (an attention tensor
``(N, heads, T, head_dim)``) is WRONG even when its values are finite.

The table is written to ``--results`` (``.json`` and ``.md``) and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attn_consistency import CAMHook
from examples._files import write_text_atomic

__all__ = ["families", "main", "on_grid", "probe", "representative"]

# Name fragments of small variants, smallest first: how a family's representative is chosen.
_SMALL = (
    "test_", "atto", "femto", "pico", "nano", "xxxs", "xxs", "mini", "tiny", "xs", "_t0", "s0", "b0", "m0", "_t",
    "small", "_s", "18", "_050", "26", "34", "lite",
)  # fmt: skip
# The ways out that CAMHook's refusals name, as timm keyword arguments, by a phrase of the message.
_REMEDIES = (("global_pool='avg'", {"global_pool": "avg"}), ("distill", {"distilled": False}))


def families() -> dict[str, list[str]]:
    """The installed timm's model names, by the module of ``timm.models`` that defines them."""
    import timm
    from timm.models import _registry

    found: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        found[_registry._model_to_module.get(name, "?")].append(name)
    return dict(sorted(found.items()))


def _size_rank(name: str) -> tuple[int, int, str]:
    rank = next((i for i, tag in enumerate(_SMALL) if tag in name), len(_SMALL))
    return rank, len(name), name


def representative(names: Sequence[str], tries: int = 3) -> tuple[str | None, torch.nn.Module | None, str]:
    """The first of the smallest-named models that builds, the model, and why none did."""
    import timm

    error = "no model"
    for name in sorted(names, key=_size_rank)[:tries]:
        try:
            return name, timm.create_model(name, pretrained=False, num_classes=5).eval(), ""
        except Exception as failure:  # a model that needs weights, or other arguments
            error = f"{type(failure).__name__}: {failure}"
    return None, None, error


def _ours(error: BaseException) -> bool:
    """Whether ``error`` is one of CAMHook's own refusals (raised in attn_consistency, not in torch or timm)."""
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, (ValueError, TypeError)) and bool(frames) and "attn_consistency" in frames[-1].filename


def _images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def on_grid(maps: Sequence[int], image: Sequence[int]) -> bool:
    """Whether maps of ``h x w`` cells can cover an ``H x W`` image at one stride ``s``.

    ``|h - H / s| < 1`` and ``|w - W / s| < 1`` for one integer ``s``: what padding or rounding in
    the strided layers leaves of ``h = H / s``, and the aspect of the image kept.
    """
    (h, w), (height, width) = maps, image
    return any(abs(h - height / s) < 1 and abs(w - width / s) < 1 for s in range(1, max(height, width) + 1))


def _attempt(model: torch.nn.Module, method: str, tolerance: float) -> dict[str, Any]:
    """One CAMHook on ``model``: the status, the maps' size and the invariant's relative error."""
    x = _images(model)
    try:
        cam = CAMHook(model, method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "gradcam":
                x.requires_grad_(True)
                logits = model(x)
            else:
                with torch.no_grad():
                    logits = model(x)
        (heatmaps,) = cam.pop()
    except Exception as error:
        cam_error = _ours(error)
        return {"status": "refused" if cam_error else "crash", "reason": f"{type(error).__name__}: {error}"}
    finally:
        if "cam" in locals():
            cam.remove()
    result: dict[str, Any] = {"maps": list(heatmaps.shape[-2:])}
    if heatmaps.dim() != 4 or not on_grid(heatmaps.shape[-2:], x.shape[-2:]):
        grid = "x".join(map(str, heatmaps.shape[-2:]))
        image = "x".join(map(str, x.shape[-2:]))
        reason = f"maps of shape {tuple(heatmaps.shape)}: {grid} cells lie on no grid of the {image} input"
        return result | {"status": "WRONG", "error": None, "reason": reason}
    if method == "gradcam":
        (grad,) = torch.autograd.grad(heatmaps.square().sum(), x)
        ok = bool(heatmaps.isfinite().all()) and bool(grad.abs().sum() > 0)
        return result | {"status": "gradcam (on request)" if ok else "WRONG", "error": None}
    logits = logits if isinstance(logits, torch.Tensor) else logits[0]
    scale = float(logits.abs().max().clamp_min(1e-12))
    error = float((heatmaps.mean((2, 3)) + cam.offset - logits).abs().max()) / scale
    return result | {"status": "exact" if error <= tolerance else "WRONG", "error": error}


def probe(name: str, model: torch.nn.Module, tolerance: float = 1e-4, **remedies: Any) -> dict[str, Any]:
    """Try ``model`` as built; on a refusal, the way out its message names; report what worked."""
    import timm

    result = {"model": name} | _attempt(model, "cam", tolerance)
    if result["status"] != "refused":
        return result
    reason = result["reason"]
    for phrase, kwargs in _REMEDIES:
        if phrase in reason:
            try:
                rebuilt = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
            except Exception:
                continue  # this model has no such option: the refusal stands
            again = _attempt(rebuilt, "cam", tolerance)
            if again["status"] == "exact":
                remedy = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
                return result | again | {"status": f"exact ({remedy})"}
    if "method='gradcam'" in reason:
        again = _attempt(model, "gradcam", tolerance)
        return result | again | ({} if "reason" in again else {"reason": reason})  # a crash's or WRONG's own
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | model | result | maps | invariant error | reason |", "|---|---|---|---|---|---|"]
    for row in rows:
        maps = "x".join(map(str, row["maps"])) if row.get("maps") else ""
        error = f"{row['error']:.1e}" if isinstance(row.get("error"), float) else ""
        reason = (row.get("reason") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['family']} | {row['model']} | {row['status']} | {maps} | {error} | {reason[:200]} |")
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"].split(" (")[0] if row["status"].startswith("exact") else row["status"]] += 1
    built = sum(1 for row in rows if row["status"] != "unbuildable")
    summary = ", ".join(f"{status}: {count}" for status, count in sorted(counts.items()))
    exact = counts.get("exact", 0)
    lines += ["", f"{built} buildable families; {summary}; exact: {exact / max(built, 1):.0%} of the buildable."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", help="modules of timm.models (default: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative invariant error of 'exact'")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/zoo"), help="path stem of .json/.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance}")
    try:
        import timm
    except ImportError:
        parser.error("timm is not installed: pip install -e '.[timm]'")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    known = families()
    unknown = sorted(set(args.families or ()) - set(known))
    if unknown:
        parser.error(f"--families: unknown {unknown}; timm {timm.__version__} has {sorted(known)}")
    rows = []
    for family in args.families or known:
        start = time.perf_counter()
        name, model, why = representative(known[family])
        if model is None:
            row = {"model": name or known[family][0], "status": "unbuildable", "reason": why}
        else:
            row = probe(name, model, args.tolerance)
        row = {"family": family} | row | {"seconds": round(time.perf_counter() - start, 2)}
        print(f"{family:28s} {row['model']:34s} {row['status']:24s} {row.get('reason', '')[:90]}", flush=True)
        rows.append(row)
        del model
    meta = {"timm": timm.__version__, "torch": torch.__version__, "tolerance": args.tolerance, "command": sys.argv}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    json_text = json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    write_text_atomic(json_text, args.results.with_suffix(".json"), "the zoo results")
    text = _table(rows)
    header = f"timm {timm.__version__}, torch {torch.__version__}: `python -m benchmarks.zoo`\n\n"
    write_text_atomic(header + text, args.results.with_suffix(".md"), "the zoo table")
    print(text)
    if any(row["status"] in ("WRONG", "crash") for row in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
