"""The consistency loss on its own, against the authors' way of computing it.

Two comparisons, each checked for equal values (and gradients) before it is timed:

- the scale term: the library's closed form (:func:`attn_consistency.transforms.scale_consistency`,
  and the public :func:`attention_consistency` with its argument checks) against materialising
  both maps on the LCM grid (nearest ``F.interpolate`` + ``mse_loss``), forward and
  forward + backward, on ``(N, L, h, w)`` vs ``(N, L, h', w')`` maps;
- the whole four-view computation from the pooled features, forward and backward: heatmaps of
  the (original, flipped) views at two sizes, two flip terms and the scale term. The library
  records the heatmaps with a :class:`CAMHook` on a GAP-FC head and sums
  :func:`attention_consistency` terms as ``views(mode="product")`` does; the reference is
  :func:`benchmarks.reference.authors_consistency`. Both run the same GAP-FC forward for the
  logits. The reference builds an ``(2N, L, C, h, w)`` tensor: where that would exceed the
  memory limit, both are timed at the largest batch ``N / 2^k`` that fits, and the result
  says so.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attn_consistency import CAMHook, attention_consistency, get_transform
from attn_consistency.transforms import scale_consistency

from .harness import Clock, alternate, paired_ratio, peak_memory, timing_summary
from .reference import authors_consistency, lcm_scale_mse

__all__ = ["NAMED_SHAPES", "LossShape", "parse_shape", "time_consistency", "time_scale_term"]


@dataclass(frozen=True)
class LossShape:
    """Heatmap and feature sizes of one loss benchmark.

    ``batch`` is the number of images N: the scale term compares N maps with N maps, the
    four-view computation has 2N feature maps (original and flipped) at each size.
    """

    name: str
    batch: int
    labels: int
    channels: int
    size: tuple[int, int]
    size_t: tuple[int, int]

    def label(self, batch: int | None = None) -> str:
        (h, w), (ht, wt) = self.size, self.size_t
        return f"{self.name}: N={batch or self.batch} L={self.labels} C={self.channels} {h}x{w} vs {ht}x{wt}"


NAMED_SHAPES = {
    # WIDER Attribute, ResNet-50/101 at 224 and 192.
    "wider": LossShape("wider", 32, 14, 2048, (7, 7), (6, 6)),
    # MS-COCO at 448 and 384.
    "coco448": LossShape("coco448", 64, 80, 2048, (14, 14), (12, 12)),
    # A large label set (ImageNet-sized) at 224 and 192.
    "labels1000": LossShape("labels1000", 32, 1000, 2048, (7, 7), (6, 6)),
}

_SPEC = re.compile(r"^(\d+):(\d+):(\d+):(\d+)x(\d+):(\d+)x(\d+)$")


def parse_shape(spec: str) -> LossShape:
    """A named shape (``wider``, ``coco448``, ``labels1000``) or ``N:L:C:hxw:h'xw'``."""
    if spec in NAMED_SHAPES:
        return NAMED_SHAPES[spec]
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"loss shape must be one of {', '.join(NAMED_SHAPES)} or N:L:C:hxw:h'xw', got {spec!r}")
    n, labels, channels, h, w, ht, wt = (int(g) for g in match.groups())
    if min(n, labels, channels, h, w, ht, wt) < 1:
        raise ValueError(f"every number of loss shape {spec!r} must be positive")
    return LossShape(spec, n, labels, channels, (h, w), (ht, wt))


def _max_relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _check(what: str, actual: Tensor, expected: Tensor, tolerance: float = 1e-4) -> float:
    """Raise unless ``actual`` matches ``expected`` up to ``tolerance`` of its largest value."""
    error = _max_relative_error(actual.detach().float(), expected.detach().float())
    if not error <= tolerance:
        raise AssertionError(f"{what}: library and reference differ by {error:.3g} (relative), tolerance {tolerance}")
    return error


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """Full fp32 in cuDNN convolutions and matmuls while values are checked (CUDA allows TF32 in
    convolutions by default, which is what is timed)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _values_and_gradients(
    functions: dict[str, Callable[[], Tensor]], inputs: tuple[Tensor, ...]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each function's value and its gradient with respect to ``inputs`` (flattened), in full fp32."""
    values, grads = {}, {}
    with _exact_fp32():
        for name, fn in functions.items():
            values[name] = fn()
            grads[name] = torch.cat([g.flatten() for g in torch.autograd.grad(values[name], inputs)])
    return values, grads


def _timed(variants: dict[str, Callable[[], object]], rounds: int, warmup: int, clock: Clock) -> dict[str, Any]:
    samples = alternate(variants, rounds, warmup, clock)
    return {name: timing_summary(samples, name) for name in variants}


def time_scale_term(shape: LossShape, device: torch.device, rounds: int, warmup: int) -> list[dict[str, Any]]:
    """Closed-form scale term against the materialised LCM upsample, forward and forward+backward."""
    clock = Clock(device)
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.randn(shape.batch, shape.labels, *shape.size, generator=generator).to(device).requires_grad_()
    heatmaps_t = torch.randn(shape.batch, shape.labels, *shape.size_t, generator=generator).to(device).requires_grad_()
    scale = get_transform("scale")
    functions = {
        "closed_form": lambda: scale_consistency(heatmaps, heatmaps_t).mean(),
        "attention_consistency": lambda: attention_consistency(heatmaps, heatmaps_t, scale),
        "materialised_lcm": lambda: lcm_scale_mse(heatmaps, heatmaps_t),
    }
    values, grads = _values_and_gradients(functions, (heatmaps, heatmaps_t))
    errors = {}
    for name in ("closed_form", "attention_consistency"):
        errors[name] = max(
            _check(f"scale term value ({name}, {shape.name})", values[name], values["materialised_lcm"], 1e-5),
            _check(f"scale term gradient ({name}, {shape.name})", grads[name], grads["materialised_lcm"], 1e-5),
        )

    def forward(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def forward_backward(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            heatmaps.grad = heatmaps_t.grad = None
            fn().backward()

        return run

    results = []
    for direction, wrap in (("forward", forward), ("forward+backward", forward_backward)):
        variants = _timed({name: wrap(fn) for name, fn in functions.items()}, rounds, warmup, clock)
        reference = variants["materialised_lcm"]["median"]
        results.append(
            {
                "shape": asdict(shape),
                "label": shape.label(),
                "direction": direction,
                "max_relative_error": errors,
                "variants": variants,
                "speedups": {
                    name: reference / variants[name]["median"] for name in ("closed_form", "attention_consistency")
                },
            }
        )
    return results


class _GapFcHead(nn.Module):
    """Global average pooling and one linear layer: the head CAMHook reads heatmaps from."""

    def __init__(self, channels: int, labels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, labels)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.pool(features).flatten(1))


def reference_batch(shape: LossShape, memory_limit_bytes: float) -> tuple[int, int]:
    """The batch N used for the four-view comparison and the reference's estimated peak bytes.

    The peak of the reference is its broadcast product, ``2N * L * C * h * w`` floats for the
    larger views (the product is freed after the sum; its backward builds one gradient of
    the same size at a time). The profiler's peak matches this within a few percent.
    """
    batch = shape.batch
    cells = max(shape.size[0] * shape.size[1], shape.size_t[0] * shape.size_t[1])

    def estimate(n: int) -> int:
        return (2 * n) * shape.labels * shape.channels * cells * 4

    while batch > 1 and estimate(batch) > memory_limit_bytes:
        batch //= 2
    return batch, estimate(batch)


def time_consistency(
    shape: LossShape, device: torch.device, rounds: int, warmup: int, memory_limit_bytes: float
) -> dict[str, Any]:
    """The four-view consistency computation, forward and backward: library against the authors' way."""
    clock = Clock(device)
    batch, estimate = reference_batch(shape, memory_limit_bytes)
    if estimate > memory_limit_bytes:
        return {
            "shape": asdict(shape),
            "label": shape.label(1),
            "skipped": f"the reference needs about {estimate / 2**30:.1f} GiB even at N=1 "
            f"(limit {memory_limit_bytes / 2**30:.1f} GiB)",
        }
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features = torch.rand(2 * batch, shape.channels, *shape.size, generator=generator).to(device).requires_grad_()
    features_t = torch.rand(2 * batch, shape.channels, *shape.size_t, generator=generator).to(device).requires_grad_()
    head = _GapFcHead(shape.channels, shape.labels).to(device)
    reference_head = copy.deepcopy(head)
    cam = CAMHook(head)
    flip, scale = get_transform("flip"), get_transform("scale")

    def library() -> Tensor:
        head(features), head(features_t)
        heatmaps, heatmaps_t = cam.pop()
        loss = attention_consistency(heatmaps[:batch], heatmaps[batch:], flip)
        loss = loss + attention_consistency(heatmaps_t[:batch], heatmaps_t[batch:], flip)
        return loss + attention_consistency(heatmaps, heatmaps_t, scale)

    def authors() -> Tensor:
        reference_head(features), reference_head(features_t)
        return authors_consistency(features, features_t, reference_head.fc.weight)

    functions = {"library": library, "authors": authors}
    values, grads = _values_and_gradients(functions, (features, features_t))
    error = max(
        _check(f"consistency value ({shape.name})", values["library"], values["authors"]),
        _check(f"consistency gradient ({shape.name})", grads["library"], grads["authors"]),
    )

    def forward_backward(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            features.grad = features_t.grad = None
            fn().backward()

        return run

    steps = {name: forward_backward(fn) for name, fn in functions.items()}
    variants = _timed(steps, rounds, warmup, clock)
    for name, step in steps.items():
        variants[name]["memory"] = peak_memory(step, device)
    cam.remove()
    return {
        "shape": asdict(shape),
        "label": shape.label(batch),
        "batch_used": batch,
        "reference_estimated_bytes": estimate,
        "max_relative_error": error,
        "variants": variants,
        "speedup": variants["authors"]["median"] / variants["library"]["median"],
        "paired_speedup": paired_ratio(variants["authors"]["times_s"], variants["library"]["times_s"]),
    }
