"""The golden cases: one four-view training step per case, on fixed seeds, through the public API.

``python tests/golden/cases.py`` writes ``step.pt`` from the code as it is; ``tests/test_golden.py``
compares a fresh run with it bit for bit. Regenerate it only for a change of behaviour that is meant
(and say so in the commit): a reshaping of the code must leave every tensor equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attn_consistency import AttentionConsistencyLoss, CAMHook, WeightedBCEWithLogitsLoss, get_transform, positive_ratio

FIXTURE = Path(__file__).with_name("step.pt")


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
    torch.save({name: one_thread_case(name) for name in CASES}, FIXTURE)
    print(f"wrote {FIXTURE}")
