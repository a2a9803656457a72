"""The training step of the paper (CAM hook + consistency views + weighted BCE) under the
conditions a real loop runs it in: autocast, channels_last, torch.compile and DDP.

The oracle is the same step in plain fp32 eager mode on one process.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fixtures import free_port, run_workers
from torch import nn

from attn_consistency import AttentionConsistencyLoss, CAMHook, WeightedBCEWithLogitsLoss, attention_consistency

LABELS = 5
SIZE = 32  # the net has stride 4: 32x32 images give 8x8 maps, the 192/224 view (27x27) 7x7
VIEWS = [(), ("flip",), ("scale",), ("flip", "scale")]


def make_net(norm: str = "batch", seed: int = 0) -> nn.Sequential:
    """A small GAP-FC conv net; ``norm`` is 'batch', 'group' or 'none'."""
    torch.manual_seed(seed)

    def normalise(channels: int) -> nn.Module:
        if norm == "batch":
            return nn.BatchNorm2d(channels)
        if norm == "group":
            return nn.GroupNorm(4, channels)
        return nn.Identity()

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        normalise(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        normalise(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, LABELS),
    )


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    targets = (torch.rand(n, LABELS, generator=generator) < 0.4).float()
    return images, targets


POS_RATIO = torch.tensor([0.1, 0.3, 0.5, 0.2, 0.7])


def nearest(heatmaps: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest upsampling to ``size x size``: the authors' materialised LCM grid."""
    return F.interpolate(heatmaps, size=(size, size), mode="nearest")


def training_step(model: nn.Module, cam: CAMHook, images: torch.Tensor, targets: torch.Tensor):
    """The authors' four-view step: weighted BCE over every view + flip and scale terms."""
    output = AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale"], mode="product")
    criterion = WeightedBCEWithLogitsLoss(POS_RATIO)
    classification = sum(criterion(logits, targets) for logits in output.logits) / len(output.logits)
    return classification + output.loss, output


def test_product_step_returns_every_view_in_order_and_named_terms() -> None:
    model = make_net("none")
    images, targets = batch(3)
    with CAMHook(model) as cam:
        loss, output = training_step(model, cam, images, targets)
        assert len(cam) == 0
        # Independent oracle: each view through the model on its own.
        flipped = images.flip(-1)
        resized = [
            F.interpolate(x, size=(27, 27), mode="bilinear", align_corners=False, antialias=True)
            for x in (images, flipped)
        ]
        single_logits, single_maps = [], []
        for x in (images, flipped, *resized):
            single_logits.append(model(x))
            single_maps.append(cam.pop()[0])

    assert output.views == VIEWS
    assert [tuple(l.shape) for l in output.logits] == [(3, LABELS)] * 4
    for got, want in zip(output.logits, single_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert list(output.terms) == ["flip@32", "flip@27", "scale"]

    m, m_f, m_s, m_fs = single_maps
    assert m.shape[-2:] == (8, 8) and m_s.shape[-2:] == (7, 7)
    torch.testing.assert_close(output.terms["flip@32"], F.mse_loss(m.flip(-1), m_f), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["flip@27"], F.mse_loss(m_s.flip(-1), m_fs), rtol=1e-5, atol=1e-6)
    # Scale: both maps upsampled with nearest to the LCM grid (8, 7 -> 56), for orig and flip.
    expected_scale = F.mse_loss(nearest(torch.cat([m, m_f]), 56), nearest(torch.cat([m_s, m_fs]), 56))
    torch.testing.assert_close(output.terms["scale"], expected_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, sum(output.terms.values()), rtol=1e-6, atol=0)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_autocast_bfloat16_loss_is_float32_and_close_to_fp32() -> None:
    model = make_net("batch").eval()
    images, _ = batch(2)
    criterion = AttentionConsistencyLoss()
    with CAMHook(model) as cam:
        reference = criterion.views(model, cam, images, ["flip", "scale"], mode="product")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = criterion.views(model, cam, images, ["flip", "scale"], mode="product")
    # Autocast really ran the model in bfloat16 ...
    assert output.logits[0].dtype == torch.bfloat16
    # ... and the loss was computed in float32.
    assert output.loss.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in output.terms.values())
    assert torch.isfinite(output.loss)
    assert list(output.terms) == list(reference.terms)
    # the terms are ~1e-4 to 1e-3 and bf16 moved them by ~0.2%: a relative bound only
    torch.testing.assert_close(output.loss, reference.loss, rtol=2e-2, atol=0.0)
    for name, term in output.terms.items():
        torch.testing.assert_close(term, reference.terms[name], rtol=2e-2, atol=0.0)
    output.loss.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_channels_last_gives_the_same_loss_and_feeds_channels_last() -> None:
    model = make_net("batch")
    images, targets = batch(2)
    with CAMHook(model) as cam:
        loss, output = training_step(model, cam, images, targets)
    loss.backward()

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    model_cl.zero_grad()
    seen = []
    handle = model_cl.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images_cl = images.contiguous(memory_format=torch.channels_last)
    with CAMHook(model_cl) as cam:
        loss_cl, output_cl = training_step(model_cl, cam, images_cl, targets)
    handle.remove()
    loss_cl.backward()

    assert seen == [True, True]  # one forward per input size, each in channels_last
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-5)
    for name, term in output_cl.terms.items():
        torch.testing.assert_close(term, output.terms[name], rtol=1e-5, atol=1e-5)
    for got, want in zip(model_cl.parameters(), model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def consistency_terms(m: torch.Tensor, m_t: torch.Tensor, m_small: torch.Tensor) -> torch.Tensor:
    return attention_consistency(m, m_t, "flip") + 0.8 * attention_consistency(m, m_small, "scale")


def test_compiled_consistency_function_matches_eager() -> None:
    # The default backend (inductor) compiles this in about 20 s on a 2-core CPU.
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(2, LABELS, 7, 7, generator=generator)
    m_t = torch.randn(2, LABELS, 7, 7, generator=generator)
    m_small = torch.randn(2, LABELS, 6, 6, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(consistency_terms)
    expected = consistency_terms(m, m_t, m_small)
    torch.testing.assert_close(compiled(m, m_t, m_small), expected, rtol=1e-5, atol=1e-6)
    # The scale term against the materialised 42x42 nearest upsampling, as the authors' code.
    oracle = F.mse_loss(m.flip(-1), m_t) + 0.8 * F.mse_loss(nearest(m, 42), nearest(m_small, 42))
    torch.testing.assert_close(expected, oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_compiled_model_with_cam_hook_matches_eager(norm: str) -> None:
    # aot_eager: inductor would add a minute of compilation on CPU and trace the same graph.
    images, targets = batch(2)
    eager = make_net(norm)
    compiled_net = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net, backend="aot_eager")
    with CAMHook(eager) as cam_eager, CAMHook(compiled) as cam_compiled:
        assert cam_compiled.classifier is compiled_net[-1]
        # Two steps: the second runs after the hook's one-off check has removed itself.
        for _ in range(2):
            eager.zero_grad()
            compiled_net.zero_grad()
            loss, output = training_step(eager, cam_eager, images, targets)
            loss_c, output_c = training_step(compiled, cam_compiled, images, targets)
            torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
            assert list(output_c.terms) == list(output.terms) == ["flip@32", "flip@27", "scale"]
            for name, term in output_c.terms.items():
                torch.testing.assert_close(term, output.terms[name], rtol=1e-5, atol=1e-6)
            loss.backward()
            loss_c.backward()
            for got, want in zip(compiled_net.parameters(), eager.parameters()):
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        model = make_net("group")
        images, targets = batch(4)
        half = images.shape[0] // world_size
        local = slice(rank * half, (rank + 1) * half)
        ddp = nn.parallel.DistributedDataParallel(model)
        with CAMHook(ddp) as cam:
            loss, output = training_step(ddp, cam, images[local], targets[local])
        loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "terms": {name: term.detach() for name, term in output.terms.items()},
                "logit_shapes": [tuple(l.shape) for l in output.logits],
                "grads": [p.grad for p in model.parameters()],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_full_batch(tmp_path: Path) -> None:
    # GroupNorm, not BatchNorm: per-replica batch statistics would differ from full-batch ones.
    world_size = 2
    run_workers(_ddp_worker, (world_size, free_port(), str(tmp_path)), world_size)

    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]

    model = make_net("group")
    images, targets = batch(4)
    with CAMHook(model) as cam:
        loss, output = training_step(model, cam, images, targets)
    loss.backward()

    for result in results:
        assert result["logit_shapes"] == [(2, LABELS)] * 4
        assert list(result["terms"]) == list(output.terms) == ["flip@32", "flip@27", "scale"]
    # Every term is a mean over samples: the mean of the halves is the full-batch value.
    mean_loss = sum(r["loss"] for r in results) / world_size
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-5)
    for name, term in output.terms.items():
        torch.testing.assert_close(
            sum(r["terms"][name] for r in results) / world_size, term.detach(), rtol=1e-5, atol=1e-6
        )
    # DDP averages the gradients: both replicas hold the full-batch gradient.
    for rank_grads in (results[0]["grads"], results[1]["grads"]):
        for got, param in zip(rank_grads, model.parameters()):
            torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-5)
