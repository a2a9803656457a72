"""The golden cases: one four-view training step per case, on fixed seeds, through the public API.

``python tests/golden/cases.py`` writes ``step.json`` from the code as it is; ``tests/test_golden.py``
compares a fresh run with it bit for bit. Regenerate it only for a change of behaviour that is meant
(and say so in the commit): a reshaping of the code must leave every tensor equal.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attn_consistency import AttentionConsistencyLoss, CAMHook, WeightedBCEWithLogitsLoss, get_transform, positive_ratio

FIXTURE = Path(__file__).with_name("step.json")


def encode(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Each tensor's dtype, shape and raw bytes (base64): exact, and a text file, not a checkpoint."""
    return {
        key: dict(
            dtype=str(t.dtype), shape=list(t.shape), data=base64.b64encode(t.contiguous().numpy().tobytes()).decode()
        )
        for key, t in tensors.items()
    }


def decode(entries: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The tensors :func:`encode` wrote (float32 only, as every tensor of a case is)."""
    out = {}
    for key, entry in entries.items():
        assert entry["dtype"] == "torch.float32", (key, entry["dtype"])
        raw = bytearray(base64.b64decode(entry["data"]))
        out[key] = torch.frombuffer(raw, dtype=torch.float32).reshape(entry["shape"])
    return out


class GapFc(nn.Module):
    """A stride-4 conv net with a GAP-FC head (28 px inputs give 7x7 maps, 24 px give 6x6)."""

    def __init__(self, labels: int = 5, norm: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(16) if norm else nn.Identity()
        self.fc = nn.Linear(16, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.pool(self.body(x)).flatten(1)))


CASES: dict[str, dict[str, Any]] = {
    "gap-fc-paper": dict(norm=False, loss={}),
    "gap-fc-relative": dict(norm=False, loss=dict(distance="relative", weights={"flip": 0.6, "scale": 0.8})),
    "gap-fc-stop-gradient": dict(norm=False, loss=dict(stop_gradient="original")),
    "layernorm-head": dict(norm=True, loss={}),
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one step of ``name``: logits, terms, losses and each parameter's gradient."""
    case = CASES[name]
    torch.manual_seed(0)
    model = GapFc(norm=case["norm"])
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 28, 28, generator=generator)
    targets = (torch.rand(4, 5, generator=generator) > 0.5).float()
    scale = get_transform("scale", size=24)
    loss_fn = AttentionConsistencyLoss(**case["loss"], diagnostics=False)
    with CAMHook(model) as cam:
        out = loss_fn.views(
            model,
            cam,
            images,
            ["flip", scale],
            mode="product",
            targets=targets,
            criterion=WeightedBCEWithLogitsLoss(positive_ratio(targets)),
        )
        assert out.classification is not None
        (out.classification + out.loss).backward()
    result = {f"logits/{i}": logits.detach() for i, logits in enumerate(out.logits)}
    result |= {f"term/{key}": value.detach() for key, value in out.terms.items()}
    result |= {"loss": out.loss.detach(), "classification": out.classification.detach()}
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None, key
        result[f"grad/{key}"] = parameter.grad
    return result


def one_thread_case(name: str) -> dict[str, torch.Tensor]:
    """:func:`run_case` on one thread: a convolution's weight gradient depends on the thread count
    in its last bits (2e-8 between 1 and 2 threads), and CI may run with any count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return run_case(name)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    fixture = {name: encode(one_thread_case(name)) for name in CASES}
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
