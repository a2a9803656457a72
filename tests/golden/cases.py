"""The golden cases: fixed seeds, through the public API, every tensor they give kept in ``step.json``.

Each case but ``history`` is one four-view training step (original, flip, scale, flip + scale, as
the authors' step) of a small model, and keeps its logits, consistency terms, losses and the
gradient of every parameter (and, for AAMN, the memory it fills):

- ``gap-fc-paper``, ``gap-fc-relative``, ``gap-fc-stop-gradient``, ``gap-fc-correlation``: a conv net
  with a GAP-FC head (CAMHook's NCHW maps) and the loss's options (``distance``, ``weights``,
  ``stop_gradient``);
- ``layernorm-head``: the same net with a LayerNorm between the pooling and the classifier;
- ``token-head``: a ViT-like net (patch embedding, a class token and a transformer block on tokens
  ``(N, T, C)``, mean of the patch tokens, LayerNorm, Linear): CAMHook's token layout;
- ``msac``: :class:`~attn_consistency.MultiScaleHeads` on a three-stage net, given to ``views`` as
  its recorder (side-head maps and logits per stage, deep supervision, fusion, ``resized``);
- ``aamn``: an :class:`~attn_consistency.AAMN` model with a filled categorical memory, the step
  inside ``model.observe(targets)``;
- ``history``: two epochs of ``examples.train.train`` on the synthetic dataset at toy size: the
  per-epoch floats of its history (losses, terms, mAP, inconsistencies...) and the sum of each
  final weight and buffer.

``python tests/golden/cases.py`` writes ``step.json`` from the code as it is: ``{"host": ..., "cases":
...}``, with the host that wrote it (torch version, CPU capability and model, machine), since a
float32 result differs in its last bits from one CPU (AVX2, AVX512) to another. ``tests/test_golden.py``
compares a fresh run with it within rounding on any host, and bit for bit on the host that wrote it.
Regenerate it only for a change of behaviour that is meant (and say so in the commit): a reshaping
of the code must leave every tensor equal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attn_consistency import (
    AAMN,
    AttentionConsistencyLoss,
    CAMHook,
    MultiScaleHeads,
    WeightedBCEWithLogitsLoss,
    get_transform,
    positive_ratio,
)

FIXTURE = Path(__file__).with_name("step.json")
ROOT = Path(__file__).resolve().parents[2]  # the repository: `examples` is imported from it
LABELS = 5


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


def host() -> dict[str, str]:
    """What a float32 result's last bits depend on: torch, the CPU kernels it dispatches to, the CPU
    (its model name, which can be a generic one such as "Intel(R) Xeon(R) Processor", and a digest of
    its feature flags, which tell two generations of that name apart)."""
    cpu, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            lines = info.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    except OSError:
        pass
    return dict(
        torch=torch.__version__,
        capability=torch.backends.cpu.get_cpu_capability(),
        cpu=cpu,
        cpu_flags=hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16],
        machine=platform.machine(),
    )


# --------------------------------------------------------------------------- the models


class GapFc(nn.Module):
    """A stride-4 conv net with a GAP-FC head (28 px inputs give 7x7 maps, 24 px give 6x6)."""

    def __init__(self, labels: int = LABELS, norm: bool = False) -> None:
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


class TokenBlock(nn.Module):
    """A pre-norm transformer block on tokens ``(N, T, C)``: self-attention, then an MLP, both residual."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm1(tokens)
        tokens = tokens + self.attn(x, x, x, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


class TokenNet(nn.Module):
    """A ViT-like net: 4 px patches (32 px inputs give an 8x8 token grid, 24 px 6x6), a class token,
    one block, the mean of the patch tokens, a LayerNorm and a linear head."""

    num_prefix_tokens = 1  # the class token, before the patch tokens (CAMHook drops it)

    def __init__(self, labels: int = LABELS, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(TokenBlock(dim))
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, C) in raster order
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        tokens = self.blocks(tokens)
        return self.head(self.fc_norm(tokens[:, self.num_prefix_tokens :].mean(1)))


STAGES = ("stage1", "stage2", "stage3")


class Stages(nn.Module):
    """Three conv stages (stride 2, 4, 8) and a GAP-FC head: 32 px gives 16/8/4 maps, 24 px 12/6/3."""

    def __init__(self, labels: int = LABELS) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1, self.stage2, self.stage3 = stage(3, 8), stage(8, 12), stage(12, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage3(self.stage2(self.stage1(x)))).flatten(1))


# --------------------------------------------------------------------------- the cases


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, size, size, generator=generator)
    targets = (torch.rand(4, LABELS, generator=generator) > 0.5).float()
    return images, targets


def _step(
    model: nn.Module,
    cam: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    scale_size: int,
    loss: dict[str, Any],
    parameters: dict[str, nn.Parameter],
    **views: Any,
) -> dict[str, torch.Tensor]:
    """One four-view step (flip and scale, product mode), its backward, and every tensor it gave."""
    loss_fn = AttentionConsistencyLoss(**loss, diagnostics=False)
    out = loss_fn.views(
        model,
        cam,
        images,
        ["flip", get_transform("scale", size=scale_size)],
        mode="product",
        targets=targets,
        criterion=WeightedBCEWithLogitsLoss(positive_ratio(targets)),
        **views,
    )
    assert out.classification is not None
    (out.classification + out.loss).backward()
    result = {f"logits/{i}": logits.detach() for i, logits in enumerate(out.logits)}
    result |= {f"term/{key}": value.detach() for key, value in out.terms.items()}
    result |= {"loss": out.loss.detach(), "classification": out.classification.detach()}
    for key, parameter in parameters.items():
        assert parameter.grad is not None, key
        result[f"grad/{key}"] = parameter.grad
    return result


def _gap_fc(norm: bool = False, **loss: Any) -> Callable[[], dict[str, torch.Tensor]]:
    def case() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = GapFc(norm=norm)
        images, targets = _batch(28)
        with CAMHook(model) as cam:
            return _step(model, cam, images, targets, 24, loss, dict(model.named_parameters()))

    return case


def token_head() -> dict[str, torch.Tensor]:
    """CAMHook on the patch tokens of :class:`TokenNet`, named (a model it does not know)."""
    torch.manual_seed(0)
    model = TokenNet()
    images, targets = _batch(32)
    with CAMHook(model, features="blocks", classifier="head") as cam:
        result = _step(model, cam, images, targets, 24, {}, dict(model.named_parameters()))
        assert cam.layout == "tokens" and cam.prefix_tokens == 1 and cam.norm is model.fc_norm
    return result


def msac() -> dict[str, torch.Tensor]:
    """Side heads at three stages as the recorder of ``views``, a 24 px batch given as ``resized``."""
    torch.manual_seed(0)
    model = Stages()
    heads = MultiScaleHeads(
        model,
        list(STAGES),
        reduction=4,  # 2-4 hidden channels in the attention's MLP (16 would leave one, dead after a ReLU)
        consistency_weights={"stage1": 0.5, "stage2": 1.0, "stage3": 2.0},
        supervision={"stage1": 0.3},
    )
    images, targets = _batch(32)
    small = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False)
    parameters = dict(model.named_parameters()) | {f"heads.{k}": p for k, p in heads.named_parameters()}
    with heads:
        return _step(
            model, heads, images, targets, 24, dict(weights={"flip": 0.6, "scale": 0.8}), parameters, resized=small
        )


def aamn() -> dict[str, torch.Tensor]:
    """An AAMN model (memory, channel and spatial relation, gates at 0.5), its memory filled by one
    forward of another batch, then the step inside ``observe`` (which updates the memory again)."""
    torch.manual_seed(0)
    channels = 8
    trunk = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.GroupNorm(2, channels), nn.ReLU())
    model = AAMN(trunk, channels, LABELS, key_channels=4, channel_reduction=2, spatial_reduction=2)
    with torch.no_grad():
        for module in (model.head.memory, model.head.channel_relation, model.head.spatial_relation):
            module.gate.fill_(0.5)
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(4, 3, 16, 16, generator=generator)
    first_targets = (torch.rand(4, LABELS, generator=generator) > 0.5).float()
    with torch.no_grad(), model.observe(first_targets):
        model(first)
    images, targets = _batch(16)  # 8x8 maps, 6x6 for the 12 px view
    with CAMHook(model) as cam, model.observe(targets):
        result = _step(model, cam, images, targets, 12, {}, dict(model.named_parameters()))
    memory = model.head.memory
    result["memory/slots"] = memory.slots.clone()
    result["memory/updates"] = memory.updates.float()
    return result


def history() -> dict[str, torch.Tensor]:
    """Two epochs of ``examples.train.train`` (synthetic-acfs at 32/24 px, 8 images, batches of 4)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.train import PRESETS, TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **PRESETS["synthetic-acfs"]
            | dict(
                image_size=32,
                scale_size=24,
                epochs=2,
                batch_size=4,
                test_batch_size=8,
                synthetic_train=8,
                synthetic_test=8,
                workers=0,
                progress=False,
                out=out,
                log=str(Path(out) / "log.txt"),
            )
        )
        rows = train(config, device="cpu")
        state = torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert len(rows) == 2
    keys = [key for key, value in rows[0].items() if isinstance(value, float)]
    result = {f"history/{key}": torch.tensor([row[key] for row in rows], dtype=torch.float32) for key in keys}
    result |= {f"param/{key}": value.sum().float() for key, value in state.items() if value.is_floating_point()}
    return result


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "gap-fc-paper": _gap_fc(),
    "gap-fc-relative": _gap_fc(distance="relative", weights={"flip": 0.6, "scale": 0.8}),
    "gap-fc-stop-gradient": _gap_fc(stop_gradient="original"),
    "gap-fc-correlation": _gap_fc(distance="correlation"),
    "layernorm-head": _gap_fc(norm=True),
    "token-head": token_head,
    "msac": msac,
    "aamn": aamn,
    "history": history,
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the case ``name``."""
    return CASES[name]()


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
    fixture = {"host": host(), "cases": {name: encode(one_thread_case(name)) for name in CASES}}
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
