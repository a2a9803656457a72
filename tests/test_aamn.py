"""AAMN modules (attn_consistency.aamn): shapes, neutral forms, equations against independent
re-implementations, gradcheck, the memory update (one process and two gloo replicas), checkpoints,
and the CAM invariant and consistency loss through the AAMN head."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fixtures import free_port, run_workers
from torch import nn

from attn_consistency import (
    AAMN,
    AAMNHead,
    AttentionConsistencyLoss,
    CAMHook,
    CategoricalMemory,
    ChannelRelation,
    SpatialRelation,
    WeightedBCEWithLogitsLoss,
)

C, L = 8, 5


def _filled_memory(dtype: torch.dtype = torch.float32, filled: tuple[int, ...] = (0, 2, 3)) -> CategoricalMemory:
    torch.manual_seed(0)
    memory = CategoricalMemory(C, L, key_channels=4).to(dtype)
    with torch.no_grad():
        memory.slots[list(filled)] = torch.randn(len(filled), C, dtype=dtype)
        memory.updates[list(filled)] = 1
        memory.gate.fill_(0.7)
    return memory


def _modules(dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    torch.manual_seed(1)
    modules = [
        _filled_memory(dtype),
        ChannelRelation(C, reduction=2).to(dtype),
        SpatialRelation(C, reduction=2).to(dtype),
    ]
    with torch.no_grad():
        for module in modules:
            module.gate.fill_(0.7)
    return modules


# --------------------------------------------------------------------------- independent oracles


def _memory_oracle(memory: CategoricalMemory, x: torch.Tensor) -> torch.Tensor:
    filled = [l for l in range(L) if memory.updates[l] > 0]
    m = memory.slots[filled]
    q = torch.einsum("dc,nchw->nhwd", memory.query.weight[:, :, 0, 0], x)
    k = m @ memory.key.weight.t()
    v = m @ memory.value.weight.t()
    a = torch.softmax(torch.einsum("nhwd,ld->nhwl", q, k) / math.sqrt(memory.key_channels), -1)
    return x + memory.gate * torch.einsum("nhwl,lc->nchw", a, v)


def _channel_oracle(module: ChannelRelation, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    logits = torch.einsum("c,nchw->nhw", module.context.weight[0, :, 0, 0], x) + module.context.bias[0]
    alpha = torch.softmax(logits.reshape(n, -1), -1)
    context = torch.einsum("ncp,np->nc", x.reshape(n, c, -1), alpha)
    conv1, norm, _, conv2 = module.transform
    hidden = context @ conv1.weight[:, :, 0, 0].t() + conv1.bias
    mu, var = hidden.mean(1, keepdim=True), hidden.var(1, unbiased=False, keepdim=True)
    hidden = (hidden - mu) / torch.sqrt(var + norm.eps) * norm.weight[:, 0, 0] + norm.bias[:, 0, 0]
    out = torch.relu(hidden) @ conv2.weight[:, :, 0, 0].t() + conv2.bias
    return x + module.gate * out[:, :, None, None]


def _spatial_oracle(module: SpatialRelation, x: torch.Tensor) -> torch.Tensor:
    """The non-local form: every pixel sums every other, weighted by their pairwise affinity, O(N^2)."""
    n, c, h, w = x.shape
    emb = lambda conv: torch.einsum("dc,ncp->ndp", conv.weight[:, :, 0, 0], x.reshape(n, c, -1))  # noqa: E731
    theta, phi, g = emb(module.theta), emb(module.phi), emb(module.g)
    phi = phi - phi.mean(2, keepdim=True)
    g = g - g.mean(2, keepdim=True)
    affinity = torch.einsum("ndi,ndj->nij", theta, phi) / (h * w)  # (N, pixels i, pixels j)
    y = torch.einsum("nij,ndj->ndi", affinity, g)
    out = torch.einsum("cd,ndp->ncp", module.out.weight[:, :, 0, 0], y).reshape(n, c, h, w)
    return x + module.gate * out


# --------------------------------------------------------------------------- modules


def test_each_module_keeps_the_shape_and_is_the_identity_with_its_gate_at_zero():
    x = torch.randn(3, C, 5, 4)
    fresh = [CategoricalMemory(C, L), ChannelRelation(C), SpatialRelation(C)]
    for module in fresh:  # as built: gate 0
        assert float(module.gate.detach()) == 0.0
        assert torch.equal(module(x), x)
    for module in _modules():
        y = module(x)
        assert y.shape == x.shape
        assert not torch.allclose(y, x)  # the branch is not zero: the identity comes from the gate
        with torch.no_grad():
            module.gate.zero_()
        assert torch.equal(module(x), x)


def test_a_fresh_head_is_exactly_gap_fc_on_the_backbone_features():
    head = AAMNHead(C, L)
    x = torch.randn(2, C, 3, 3)
    assert torch.equal(head.enhance(x), x)
    torch.testing.assert_close(head(x), x.mean((2, 3)) @ head.fc.weight.t() + head.fc.bias)


def test_an_empty_memory_reads_zero_and_still_gives_every_parameter_a_gradient():
    # DDP (find_unused_parameters=False) needs every parameter in the graph from the first step
    memory = CategoricalMemory(C, L)
    with torch.no_grad():
        memory.gate.fill_(1.0)
    x = torch.randn(2, C, 3, 3)
    y = memory(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert all(p.grad is not None for p in memory.parameters())


def test_modules_match_their_equations():
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    memory, channel, spatial = _modules(torch.float64)
    torch.testing.assert_close(memory(x), _memory_oracle(memory, x))
    torch.testing.assert_close(channel(x), _channel_oracle(channel, x))
    torch.testing.assert_close(spatial(x), _spatial_oracle(spatial, x))


@pytest.mark.parametrize("index", [0, 1, 2], ids=["memory", "channel", "spatial"])
def test_gradcheck_float64(index):
    module = _modules(torch.float64)[index]
    x = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [p for p in module.parameters()]
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x, *params), eps=1e-6, atol=1e-5)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="x must have 8 channels, got shape \\(2, 3, 4, 4\\)"):
        ChannelRelation(C)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="x must be 4-D"):
        SpatialRelation(C)(torch.randn(2, C, 4))
    with pytest.raises(ValueError, match="momentum must be a number in \\(0, 1\\], got 0"):
        CategoricalMemory(C, L, momentum=0)
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        AAMNHead(C, 0)
    with pytest.raises(ValueError, match="targets must have 5 columns"):
        with CategoricalMemory(C, L).observe(torch.ones(2, 4)):
            pass
    with pytest.raises(ValueError, match="the trunk must return a 4-D feature map"):
        AAMN(nn.Flatten(), C, L)(torch.randn(2, C, 2, 2))


# --------------------------------------------------------------------------- the memory update


def test_one_step_moves_only_the_slot_of_the_label_present_and_toward_that_sample():
    memory = _filled_memory(filled=(0, 1, 2, 3, 4))
    before = memory.slots.clone()
    x = torch.randn(4, C, 3, 3)
    targets = torch.zeros(4, L)
    targets[:, 0] = 1  # label 0 in every sample
    targets[2, 3] = 1  # label 3 in sample 2 only
    targets[1, 4] = 0.0  # label 4 nowhere (signed datasets: -1 absent, 0 unspecified)
    targets[3, 4] = -1.0
    with memory.observe(targets):
        memory(x)
    feature = x[2].mean((1, 2))
    assert torch.linalg.norm(memory.slots[3] - feature) < torch.linalg.norm(before[3] - feature)
    torch.testing.assert_close(memory.slots[3], 0.9 * before[3] + 0.1 * feature)
    torch.testing.assert_close(memory.slots[0], 0.9 * before[0] + 0.1 * x.mean((0, 2, 3)))
    for untouched in (1, 2, 4):
        assert torch.equal(memory.slots[untouched], before[untouched])
    assert memory.updates.tolist() == [2, 1, 1, 2, 1]


def test_the_first_update_of_a_slot_is_the_mean_and_only_training_forwards_count():
    memory = CategoricalMemory(C, L)
    x = torch.randn(3, C, 2, 2)
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0], [0.0, 0, 0, 0, 0]])
    memory.eval()
    with memory.observe(targets):
        memory(x)
    assert memory.updates.sum() == 0
    memory.train()
    with memory.observe(targets):
        memory(x)
    torch.testing.assert_close(memory.slots[0], x[:2].mean((0, 2, 3)))
    torch.testing.assert_close(memory.slots[1], x[1].mean((1, 2)))
    assert memory.updates.tolist() == [1, 1, 0, 0, 0]
    assert memory.slots[2:].abs().sum() == 0


def test_observe_counts_every_view_of_a_step_and_updates_once_at_the_end():
    memory = _filled_memory(filled=(0, 1, 2, 3, 4))
    before = memory.slots.clone()
    x, flipped, small = torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3), torch.randn(2, C, 2, 2)
    targets = torch.tensor([[0.0, 1, 0, 0, 0], [0.0, 0, 0, 0, 0]])
    with memory.observe(targets):
        first = memory(torch.cat([x, flipped]))  # two views in one batch, as views() runs them
        again = memory(torch.cat([x, flipped]))
        memory(small)
        assert torch.equal(memory.slots, before) and torch.equal(first, again)  # read the step's start
    g = lambda t: t.mean((1, 2))  # noqa: E731
    mean = (2 * g(x[0]) + 2 * g(flipped[0]) + g(small[0])) / 5  # x[0]'s views: the only sample with label 1
    torch.testing.assert_close(memory.slots[1], 0.9 * before[1] + 0.1 * mean)
    for untouched in (0, 2, 3, 4):
        assert torch.equal(memory.slots[untouched], before[untouched])


def test_observe_refuses_batches_that_are_not_copies_of_the_targets_and_leaves_no_state():
    memory = CategoricalMemory(C, L)
    with pytest.raises(ValueError, match="ran 3 samples for targets of 2 rows"):
        with memory.observe(torch.ones(2, L)):
            memory(torch.randn(3, C, 2, 2))
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with memory.observe(torch.ones(2, L)), memory.observe(torch.ones(2, L)):
            pass
    with pytest.raises(KeyError):  # an exception inside: no update, and the memory observes nothing later
        with memory.observe(torch.ones(2, L)):
            memory(torch.randn(2, C, 2, 2))
            raise KeyError("boom")
    assert memory.updates.sum() == 0 and memory._observed is None
    memory(torch.randn(2, C, 2, 2))
    assert memory._observed is None


def test_the_update_is_deterministic():
    x, targets = torch.randn(6, C, 3, 3), (torch.rand(6, L) > 0.5).float()
    results = []
    for _ in range(2):
        memory = CategoricalMemory(C, L)
        for _ in range(3):
            with memory.observe(targets):
                memory(x)
        results.append(memory.slots.clone())
    assert torch.equal(results[0], results[1])


def _tiny_aamn() -> AAMN:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), nn.GroupNorm(2, C), nn.ReLU())
    model = AAMN(trunk, C, L, key_channels=4, channel_reduction=2, spatial_reduction=2)
    with torch.no_grad():
        for module in (model.head.memory, model.head.channel_relation, model.head.spatial_relation):
            module.gate.fill_(0.5)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(4, 3, 8, 8, generator=generator), (torch.rand(4, L, generator=generator) > 0.5).float())
        for _ in range(3)
    ]


def _nan_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images, the third with one NaN pixel, and targets that give every label to it."""
    images, targets = _batches()[0]
    images, targets = images.clone(), targets.clone()
    images[2, 0, 3, 3] = float("nan")
    targets[2] = 1.0
    return images, targets


def _ddp_memory_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        model = _tiny_aamn()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for images, targets in _batches():  # three steps: the second and third read a filled memory
            local = slice(2 * rank, 2 * rank + 2)
            with model.observe(targets[local]):
                loss = nn.functional.binary_cross_entropy_with_logits(ddp(images[local]), targets[local])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(
            {"slots": model.head.memory.slots, "updates": model.head.memory.updates}, Path(out_dir) / f"rank{rank}.pt"
        )
        # a NaN pixel in one replica's batch (issue 18): refused by both replicas at the same step
        # (no replica left waiting in the reduction), or left out by both, which stay identical
        images, targets = _nan_batch()
        local = slice(2 * rank, 2 * rank + 2)
        memory = model.head.memory
        before = memory.slots.clone()
        refused = ""
        try:
            with torch.no_grad(), model.observe(targets[local]):
                ddp(images[local])
        except ValueError as error:
            refused = str(error)
        unchanged = torch.equal(memory.slots, before)
        memory.check_finite_values = False
        with torch.no_grad(), model.observe(targets[local]):
            ddp(images[local])
        result = {"refused": refused, "unchanged": unchanged, "slots": memory.slots, "updates": memory.updates}
        torch.save(result, Path(out_dir) / f"nan{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_replicas_hold_identical_slots_equal_to_one_process_on_the_whole_batch(tmp_path):
    run_workers(_ddp_memory_worker, (free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["slots"], ranks[1]["slots"])
    assert torch.equal(ranks[0]["updates"], ranks[1]["updates"])

    model = _tiny_aamn()  # one process on the concatenated batches (GroupNorm: no batch statistics)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for images, targets in _batches():
        with model.observe(targets):
            loss = nn.functional.binary_cross_entropy_with_logits(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(ranks[0]["updates"], model.head.memory.updates)
    assert int((model.head.memory.updates > 0).sum()) > 0
    torch.testing.assert_close(ranks[0]["slots"], model.head.memory.slots, rtol=1e-5, atol=1e-6)

    nan = [torch.load(tmp_path / f"nan{r}.pt", weights_only=True) for r in range(2)]
    assert all(result["unchanged"] for result in nan)
    assert "the pooled features of sample 0 (view 0)" in nan[1]["refused"]  # rank 1's local sample 0 is image 2
    assert "no row of this process (another replica's)" in nan[0]["refused"]
    assert all("1 of the rows to update the memory with hold nan or inf" in result["refused"] for result in nan)
    assert torch.equal(nan[0]["slots"], nan[1]["slots"]) and torch.equal(nan[0]["updates"], nan[1]["updates"])
    assert nan[0]["slots"].isfinite().all()
    images, targets = _nan_batch()
    memory = model.head.memory
    memory.check_finite_values = False
    with torch.no_grad(), model.observe(targets):
        model(images)
    torch.testing.assert_close(nan[0]["slots"], memory.slots, rtol=1e-5, atol=1e-6)
    assert torch.equal(nan[0]["updates"], memory.updates)


def test_state_dict_round_trip_restores_the_memory_exactly(tmp_path):
    model = _tiny_aamn()
    for images, targets in _batches():
        with model.observe(targets):
            model(images)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = _tiny_aamn()
    assert not torch.equal(restored.head.memory.slots, model.head.memory.slots)
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(restored.head.memory.slots, model.head.memory.slots)
    assert torch.equal(restored.head.memory.updates, model.head.memory.updates)
    images = _batches()[0][0]
    assert torch.equal(restored(images), model(images))


# --------------------------------------------------------------------------- CAMs and consistency


def test_cam_invariant_of_the_aamn_head():
    model = _tiny_aamn()
    for images, targets in _batches():
        with model.observe(targets):
            model(images)
    images = _batches()[0][0]
    with CAMHook(model) as cam:
        logits = model(images)
        (heatmaps,) = cam.pop()
    assert cam.classifier is model.head.fc
    assert heatmaps.shape == (4, L, 4, 4)
    torch.testing.assert_close(heatmaps.mean((2, 3)) + model.head.fc.bias, logits, rtol=1e-5, atol=1e-6)
    # the maps are those of the enhanced map, not of the backbone's
    enhanced = model.head.enhance(model.trunk(images))
    torch.testing.assert_close(
        heatmaps, torch.einsum("lc,nchw->nlhw", model.head.fc.weight, enhanced), rtol=1e-5, atol=1e-6
    )


def test_consistency_loss_through_the_aamn_head_reaches_every_module_and_fills_the_memory():
    model = _tiny_aamn()
    images, targets = _batches()[0]
    loss_fn = AttentionConsistencyLoss()
    with CAMHook(model) as cam, model.observe(targets):
        out = loss_fn.views(
            model,
            cam,
            images,
            ["flip", "scale"],
            mode="product",
            generator=torch.Generator().manual_seed(0),
            targets=targets,
            criterion=WeightedBCEWithLogitsLoss(torch.full((L,), 0.5)),
        )
    assert set(out.terms) == {"flip", "scale"}
    assert torch.isfinite(out.loss) and out.loss > 0
    model.zero_grad()
    out.loss.backward()
    for module in (model.trunk, model.head.channel_relation, model.head.spatial_relation):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.head.fc.weight.grad is None  # W is detached: the consistency term trains the features
    assert (model.head.memory.updates > 0).sum() == int(targets.amax(0).sum())  # four views, one update


def test_timm_backbone_trunk():
    timm = pytest.importorskip("timm")
    from examples.aamn import trunk

    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=L)
    features, channels = trunk(backbone)
    model = AAMN(features, channels, L)
    images = torch.randn(2, 3, 64, 64)
    with CAMHook(model) as cam:
        logits = model(images)
        (heatmaps,) = cam.pop()
    assert heatmaps.shape == (2, L, 2, 2)
    torch.testing.assert_close(heatmaps.mean((2, 3)) + model.head.fc.bias, logits, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- hostile inputs (issue 18)


def test_a_nan_pixel_inside_observe_is_refused_by_name_and_leaves_the_memory_clean():
    model = _tiny_aamn()
    images, targets = _nan_batch()
    clean = torch.cat([images[:2], images[3:]])
    with model.observe(targets[:2]):
        model(images[:2])
    memory = model.head.memory
    before, updates = memory.slots.clone(), memory.updates.clone()
    with pytest.raises(ValueError) as error, model.observe(targets):
        model(torch.cat([images, images.flip(-1)]))  # two views: the NaN image is rows 2 and 6
    message = str(error.value)
    assert message.startswith("CategoricalMemory.observe(): 2 of the rows to update the memory with hold nan or inf")
    assert "the pooled features of sample 2 (view 0), sample 2 (view 1)" in message and "left as they were" in message
    assert torch.equal(memory.slots, before) and torch.equal(memory.updates, updates)
    assert model(clean).isfinite().all()  # every later clean batch: finite logits


def test_with_checks_off_non_finite_samples_are_left_out_of_the_update():
    images, targets = _nan_batch()
    keep = [0, 1, 3]
    reference, model = _tiny_aamn(), _tiny_aamn()
    model.head.memory.check_finite_values = False
    with model.observe(targets):
        model(images)
    with reference.observe(targets[keep]):
        reference(images[keep])
    memory = model.head.memory
    assert torch.equal(memory.updates, reference.head.memory.updates) and memory.slots.isfinite().all()
    torch.testing.assert_close(memory.slots, reference.head.memory.slots, rtol=0, atol=0)
    assert model(images[keep]).isfinite().all()


@pytest.mark.parametrize(
    ("row", "column", "value", "what"),
    [(1, 3, float("nan"), "the pooled features of row 1"), (0, 0, float("inf"), "the pooled features of row 0"),
     (2, -1, float("nan"), "the targets of row 2")],
)  # fmt: skip
def test_update_refuses_non_finite_features_or_targets_by_row(row, column, value, what):
    memory = _filled_memory()
    before = memory.slots.clone()
    features, targets = torch.randn(3, C), torch.ones(3, L)
    (features if what.startswith("the pooled") else targets)[row, column] = value
    with pytest.raises(ValueError, match=r"CategoricalMemory\.update\(\): 1 of the rows .*" + what):
        memory.update(features, targets)
    assert torch.equal(memory.slots, before)
    memory.check_finite_values = False
    memory.update(features, targets)
    assert memory.slots.isfinite().all()


def test_nan_targets_given_to_observe_are_refused():
    model = _tiny_aamn()
    images, targets = _batches()[0]
    targets = targets.clone()
    targets[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"observe\(\): 1 of the rows .*the targets of sample 1 \(view 0\)"):
        with model.observe(targets):
            model(images)
    assert model.head.memory.updates.sum() == 0


def test_an_empty_batch_gives_empty_logits_and_updates_nothing():
    model = _tiny_aamn()
    images, targets = _batches()[0]
    with model.observe(targets):
        model(images)
    memory = model.head.memory
    before, updates = memory.slots.clone(), memory.updates.clone()
    empty = images[:0]
    with model.observe(targets[:0]):
        logits = model(torch.cat([empty, empty]))
    assert logits.shape == (0, L)
    assert torch.equal(memory.slots, before) and torch.equal(memory.updates, updates)
    with pytest.raises(ValueError, match=r"ran 2 samples for targets of 0 rows"):
        with model.observe(targets[:0]):
            model(images[:2])
    for module in (model.head.memory, model.head.channel_relation, model.head.spatial_relation):
        assert module(torch.randn(0, C, 3, 3)).shape == (0, C, 3, 3)
    with pytest.raises(ValueError, match=r"x must have a non-empty spatial size \(H, W\), got shape \(2, 8, 0, 3\)"):
        model.head(torch.randn(2, C, 0, 3))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: AAMNHead(16, 4, memory="no"), TypeError, "memory must be a bool, got str 'no'"),
        (lambda: AAMNHead(16, 4, channel_relation=1), TypeError, "channel_relation must be a bool, got int 1"),
        (lambda: AAMNHead(16, 4, spatial_relation=None), TypeError, "spatial_relation must be a bool"),
        (lambda: CategoricalMemory(C, L, momentum="0.1"), TypeError, "momentum must be a number, got str '0.1'"),
        (lambda: CategoricalMemory(C, L, momentum=None), TypeError, "momentum must be a number, got NoneType"),
        (lambda: AAMNHead(C, L, momentum=True), TypeError, "momentum must be a number, got bool True"),
        (lambda: CategoricalMemory(C, L, momentum=float("nan")), ValueError, "momentum must be a finite number"),
        (lambda: CategoricalMemory(C, L, momentum=1.5), ValueError, r"momentum must be a number in \(0, 1\]"),
        (lambda: AAMNHead(C, L, check_finite_values="yes"), TypeError, "check_finite_values must be a bool or None"),
    ],
)
def test_arguments_of_the_wrong_type_or_value(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_memory_false_leaves_the_memory_out():
    head = AAMNHead(C, L, memory=False)
    assert isinstance(head.memory, nn.Identity)
    with head.observe(torch.ones(2, L)):
        assert head(torch.randn(2, C, 3, 3)).shape == (2, L)
