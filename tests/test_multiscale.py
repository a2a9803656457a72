"""Multi-scale attention consistency (attn_consistency.multiscale): side heads at several stages.

Oracles: the CAM invariant per stage recomputed from the stage's features, the materialised
per-stage MSE (flip by torch.flip, scale by repeating cells up to the LCM grid), and the
four-view step of MSAC's abstract re-implemented here with torch only.
"""

import copy
import gc
import math
import re
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fixtures import free_port, run_workers
from torch import nn

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    MultiScaleHeads,
    StageRecorder,
    WithSideHeads,
    get_transform,
    multiscale_consistency,
)
from attn_consistency.metrics import attention_inconsistency

STAGES = ["stage1", "stage2", "stage3"]


class Net(nn.Module):
    """Three conv stages (stride 2, 4, 8) and a GAP-FC head: 32 px gives 16/8/4 maps, 24 px 12/6/3."""

    def __init__(self, labels: int = 3, kernel: int = 3) -> None:
        super().__init__()
        pad = kernel // 2

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, 2, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1, self.stage2, self.stage3 = stage(3, 8), stage(8, 12), stage(12, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, labels)

    def forward(self, x):
        return self.fc(self.pool(self.stage3(self.stage2(self.stage1(x)))).flatten(1))


def net(dtype=torch.float32, **kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).to(dtype)


def images(n=2, size=32, seed=1, dtype=torch.float32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def bce(logits, targets):
    """Sigmoid cross-entropy summed over labels, averaged over samples (the paper's reduction)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()


def capture(model, stages):
    """Forward hooks of the test's own that keep each stage's last output."""
    seen = {}
    handles = [
        model.get_submodule(s).register_forward_hook(lambda m, a, out, s=s: seen.__setitem__(s, out)) for s in stages
    ]
    return seen, handles


def cbam(head, features):
    """The side head's enhanced features, written from its weights (train-mode BatchNorm)."""
    conv, bn = head.project[0], head.project[1]
    x = F.relu(F.batch_norm(F.conv2d(features, conv.weight), None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
    first, second = head.attention.mlp[0], head.attention.mlp[2]

    def mlp(v):
        return F.conv2d(F.relu(F.conv2d(v, first.weight, first.bias)), second.weight, second.bias)

    x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    spatial = head.attention.spatial
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    return x * torch.sigmoid(F.conv2d(pooled, spatial.weight, spatial.bias, padding=spatial.padding))


def side(head, features, detach=True):
    """(heatmaps, logits) of a side head from the stage's features: Eq. 1 and GAP-FC, by hand."""
    enhanced = cbam(head, features)
    weight = head.classifier.weight.flatten(1)
    maps = torch.einsum("nchw,lc->nlhw", enhanced, weight.detach() if detach else weight)
    return maps, enhanced.mean((2, 3)) @ weight.T + head.classifier.bias


def lcm_mse(a, b):
    """MSE of two map batches repeated cell by cell up to their LCM grid (materialised)."""
    h, w = math.lcm(a.shape[-2], b.shape[-2]), math.lcm(a.shape[-1], b.shape[-1])
    up = a.repeat_interleave(h // a.shape[-2], -2).repeat_interleave(w // a.shape[-1], -1)
    up_t = b.repeat_interleave(h // b.shape[-2], -2).repeat_interleave(w // b.shape[-1], -1)
    return (up - up_t).square().mean()


# --------------------------------------------------------------------------- the side heads


def test_each_stage_heatmaps_average_to_its_logits_as_computed_from_the_stage_features():
    model = net(torch.float64)
    heads = MultiScaleHeads(model, STAGES).double()
    seen, handles = capture(model, STAGES)
    model(images(dtype=torch.float64))
    (record,) = heads.pop()
    assert list(record.heatmaps) == STAGES == list(record.logits)
    for stage, size in zip(STAGES, (16, 8, 4)):
        maps, logits = record.heatmaps[stage], record.logits[stage]
        assert maps.shape == (2, 3, size, size) and logits.shape == (2, 3)
        head = heads.head(stage)
        # the CAM invariant, exactly (float64)
        torch.testing.assert_close(maps.mean((2, 3)) + head.classifier.bias, logits, rtol=0, atol=1e-12)
        # and both are what the stage's own features give through the head, by hand
        expected_maps, expected_logits = side(head, seen[stage])
        torch.testing.assert_close(maps, expected_maps, rtol=0, atol=1e-12)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)
    for handle in handles:
        handle.remove()


def test_torchvision_resnet_stages_and_the_output_fusion():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    heads = MultiScaleHeads(model, ["layer2", "layer3", "layer4"])
    logits = model(torch.randn(2, 3, 64, 64))
    (record,) = heads.pop()
    assert {s: tuple(m.shape[-2:]) for s, m in record.heatmaps.items()} == {
        "layer2": (8, 8),
        "layer3": (4, 4),
        "layer4": (2, 2),
    }
    assert [h.project[0].in_channels for h in heads.heads] == [128, 256, 512]  # read from the stages' convolutions
    expected = torch.stack([record.logits[s] for s in heads.stages] + [logits]).mean(0)
    torch.testing.assert_close(heads.prediction(logits, record.logits), expected)


def test_timm_stages_by_feature_info_index_and_by_name():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    by_index = MultiScaleHeads(model, [2, 3, 4])
    assert by_index.stages == ("layer2", "layer3", "layer4")
    by_index.remove()
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    heads = MultiScaleHeads(convnext, ["stages.1", "stages.2", "stages.3"])
    assert [h.project[0].in_channels for h in heads.heads] == [80, 160, 320]  # timm's feature_info
    convnext(torch.randn(1, 3, 64, 64))
    (record,) = heads.pop()
    assert [tuple(m.shape) for m in record.heatmaps.values()] == [(1, 4, 8, 8), (1, 4, 4, 4), (1, 4, 2, 2)]


@pytest.mark.parametrize(
    "fusion, expected",
    [
        ("mean", lambda out, x: (x["stage1"] + x["stage2"] + x["stage3"] + out) / 4),
        ("last", lambda out, x: x["stage3"]),
        ("output", lambda out, x: out),
        ("stage2", lambda out, x: x["stage2"]),
    ],
)
def test_fusion_options(fusion, expected):
    model = net()
    heads = MultiScaleHeads(model, STAGES, fusion=fusion)
    out = model(images())
    (record,) = heads.pop()
    torch.testing.assert_close(heads.prediction(out, record.logits), expected(out, record.logits))


def test_mean_fusion_leaves_out_untrained_heads_and_supervision_weights_the_classification():
    model = net()
    heads = MultiScaleHeads(model, STAGES, supervision={"stage1": 0.0, "stage2": 0.5, "output": 2.0})
    out = model(images())
    (record,) = heads.pop()
    x = record.logits
    torch.testing.assert_close(heads.prediction(out, x), (x["stage2"] + x["stage3"] + out) / 3)
    targets = (torch.rand(2, 3, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    expected = 0.5 * bce(x["stage2"], targets) + bce(x["stage3"], targets) + 2.0 * bce(out, targets)
    torch.testing.assert_close(heads.classification(out, x, targets, bce), expected)


# --------------------------------------------------------------------------- the loss per stage


def test_equivariant_maps_give_zero_for_every_stage_term():
    g = torch.Generator().manual_seed(0)
    maps = {"s8": torch.randn(2, 3, 28, 28, generator=g), "s16": torch.randn(2, 3, 14, 14, generator=g)}
    cases = [
        ("flip", None, {s: m.flip(-1) for s, m in maps.items()}),
        (get_transform("rotate", degrees=90.0), 90.0, {s: m.rot90(1, (-2, -1)) for s, m in maps.items()}),
    ]
    for transform, params, moved in cases:
        terms = multiscale_consistency(maps, moved, transform, params)
        assert list(terms) == ["s8", "s16"] and all(t.item() == 0.0 for t in terms.values())
    # scale: maps of 224 and 192 px inputs at strides 8 and 16 that are the same coarse map
    coarse = {"s8": torch.randn(2, 3, 4, 4, generator=g), "s16": torch.randn(2, 3, 2, 2, generator=g)}
    large = {"s8": coarse["s8"].repeat_interleave(7, -1).repeat_interleave(7, -2),
             "s16": coarse["s16"].repeat_interleave(7, -1).repeat_interleave(7, -2)}  # fmt: skip
    small = {"s8": coarse["s8"].repeat_interleave(6, -1).repeat_interleave(6, -2),
             "s16": coarse["s16"].repeat_interleave(6, -1).repeat_interleave(6, -2)}  # fmt: skip
    assert [m.shape[-1] for m in (*large.values(), *small.values())] == [28, 14, 24, 12]
    terms = multiscale_consistency(large, small, get_transform("scale", factor=192 / 224))
    assert all(t.item() == 0.0 for t in terms.values())


def test_random_maps_give_the_materialised_per_stage_mse():
    g = torch.Generator().manual_seed(0)
    large = {"s8": torch.randn(3, 4, 28, 28, generator=g), "s16": torch.randn(3, 4, 14, 14, generator=g)}
    small = {"s8": torch.randn(3, 4, 24, 24, generator=g), "s16": torch.randn(3, 4, 12, 12, generator=g)}
    flipped = {s: torch.randn_like(m) for s, m in large.items()}
    weights = {"s8": 0.5, "s16": 2.0}
    flip = multiscale_consistency(large, flipped, "flip", weights=weights)
    scale = multiscale_consistency(large, small, "scale", weights=weights)
    for stage, weight in weights.items():
        assert float(flip[stage]) == pytest.approx(
            weight * float((large[stage].flip(-1) - flipped[stage]).square().mean()), rel=1e-6
        )
        assert float(scale[stage]) == pytest.approx(weight * float(lcm_mse(large[stage], small[stage])), rel=1e-6)


def symmetric_net():
    """Every conv 1x1 and stride-2 average pooling, the heads' spatial kernels mirror-symmetric:
    the whole model, heads included, commutes with a horizontal flip exactly."""

    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.AvgPool2d(2))

    torch.manual_seed(0)
    model = nn.Sequential()
    model.stage1, model.stage2, model.stage3 = stage(3, 8), stage(8, 12), stage(12, 16)
    model.pool, model.flat, model.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)
    return model.double()


def test_an_exactly_flip_equivariant_model_gives_zero_for_every_stage_flip_term():
    model = symmetric_net()
    heads = MultiScaleHeads(model, STAGES).double()
    with torch.no_grad():
        for head in heads.heads:
            head.attention.spatial.weight.copy_(
                (head.attention.spatial.weight + head.attention.spatial.weight.flip(-1)) / 2
            )
    out = AttentionConsistencyLoss().views(model, heads, images(dtype=torch.float64), ["flip"])
    assert sorted(out.terms) == ["flip/stage1", "flip/stage2", "flip/stage3"]
    assert all(term.item() < 1e-24 for term in out.terms.values())
    # the same model with one non-symmetric kernel: the term of that stage only moves off 0
    with torch.no_grad():
        heads.head("stage2").attention.spatial.weight[..., 0] += 1.0
    out = AttentionConsistencyLoss().views(model, heads, images(dtype=torch.float64), ["flip"])
    assert out.terms["flip/stage2"].item() > 1e-8
    # a side head feeds nothing back into the backbone: the other stages stay exact
    assert out.terms["flip/stage1"].item() < 1e-24 and out.terms["flip/stage3"].item() < 1e-24


def test_the_four_view_step_equals_a_reimplementation_from_the_abstract():
    """MSAC's abstract, written out: (original, flipped) at two sizes through one network, each
    stage's side-head maps compared across flip and scale, deep supervision, a fused prediction."""
    model = net(torch.float64)
    reference = copy.deepcopy(model)
    weights = {"stage1": 0.5, "stage2": 1.0, "stage3": 2.0}
    heads = MultiScaleHeads(model, STAGES, consistency_weights=weights, supervision={"stage1": 0.3}).double()
    heads_ref = [copy.deepcopy(h) for h in heads.heads]
    x, small = images(dtype=torch.float64), images(size=24, seed=2, dtype=torch.float64)
    targets = (torch.rand(2, 3, generator=torch.Generator().manual_seed(3)) < 0.5).double()
    loss = AttentionConsistencyLoss(weights={"flip": 0.6, "scale": 0.8})
    scale = get_transform("scale", size=24)
    out = loss.views(model, heads, x, ["flip", scale], mode="product", resized=small, targets=targets, criterion=bce)
    out.total.backward()

    seen, _ = capture(reference, STAGES)
    per_size = {}
    for name, batch in (("large", x), ("small", small)):
        output = reference(torch.cat([batch, batch.flip(-1)]))
        per_size[name] = (output, {s: side(h, seen[s]) for s, h in zip(STAGES, heads_ref)})
    n = 2
    terms, total, classification, predictions = {}, 0.0, 0.0, []
    for name, size in (("large", 32), ("small", 24)):
        output, by_stage = per_size[name]
        for stage in STAGES:
            maps = by_stage[stage][0]
            terms[f"flip@{size}/{stage}"] = (maps[:n].flip(-1) - maps[n:]).square().mean()
            total = total + 0.6 * weights[stage] * terms[f"flip@{size}/{stage}"]
        for view in (slice(0, n), slice(n, 2 * n)):  # original, flipped
            logits = {s: by_stage[s][1][view] for s in STAGES}
            supervised = {"stage1": 0.3, "stage2": 1.0, "stage3": 1.0}
            classification = (
                classification
                + sum(w * bce(logits[s], targets) for s, w in supervised.items())
                + bce(output[view], targets)
            )
            predictions.append((logits["stage1"] + logits["stage2"] + logits["stage3"] + output[view]) / 4)
    for stage in STAGES:  # scale: (original 32 vs 24) and (flipped 32 vs 24) as one batch
        large, small_maps = per_size["large"][1][stage][0], per_size["small"][1][stage][0]
        terms[f"scale/{stage}"] = lcm_mse(large, small_maps)
        total = total + 0.8 * weights[stage] * terms[f"scale/{stage}"]
    classification = classification / 4
    (classification + total).backward()

    assert set(out.terms) == set(terms) and len(terms) == 9  # 2 x 3 flip terms, a scale term per stage
    for key, value in terms.items():
        torch.testing.assert_close(out.terms[key], value, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, total, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.classification, classification, rtol=1e-10, atol=0)
    # views: (), flip, scale, flip+scale; the references: large (orig, flip), small (orig, flip)
    for got, want in zip(out.logits, [predictions[0], predictions[1], predictions[2], predictions[3]]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-12, msg=name)
    for head, head_ref in zip(heads.heads, heads_ref):
        for p, p_ref in zip(head.parameters(), head_ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-12)


def test_a_stage_term_trains_its_stage_and_head_and_nothing_deeper():
    model = net(torch.float64)
    heads = MultiScaleHeads(model, STAGES).double()
    out = AttentionConsistencyLoss().views(model, heads, images(dtype=torch.float64), ["flip"])
    out.terms["flip/stage2"].backward()

    def touched(module):
        return [n for n, p in module.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]

    assert touched(model.stage1) and touched(model.stage2)  # the backbone up to the stage
    assert not touched(model.stage3) and not touched(model.fc)  # deeper: not on the term's path
    head = heads.head("stage2")
    assert {"attention.spatial.weight", "attention.mlp.0.weight", "project.0.weight"} <= set(touched(head))
    assert head.classifier.weight.grad is None  # W detached, as CAMHook's: learnt by classification
    assert not touched(heads.head("stage1")) and not touched(heads.head("stage3"))


def test_without_detach_the_term_reaches_the_class_convolution():
    model = net(torch.float64)
    heads = MultiScaleHeads(model, STAGES, detach_classifier=False).double()
    out = AttentionConsistencyLoss().views(model, heads, images(dtype=torch.float64), ["flip"])
    out.terms["flip/stage3"].backward()
    assert bool(heads.head("stage3").classifier.weight.grad.abs().sum() > 0)


def test_stage_weights_and_a_stage_at_weight_zero():
    model = net(torch.float64)
    heads = MultiScaleHeads(model, STAGES, consistency_weights={"stage1": 0.0, "stage3": 3.0}).double()
    out = AttentionConsistencyLoss().views(model, heads, images(dtype=torch.float64), ["flip"])
    assert sorted(out.terms) == ["flip/stage2", "flip/stage3"]
    torch.testing.assert_close(out.loss, out.terms["flip/stage2"] + 3.0 * out.terms["flip/stage3"])


def test_inconsistency_per_stage_is_eq5_over_the_set():
    model = net().eval()
    heads = MultiScaleHeads(model, STAGES).eval()
    batches = [images(seed=k) for k in range(2)]
    result = attention_inconsistency(model, heads, batches, "flip")
    seen, handles = capture(model, STAGES)
    for stage, head in zip(STAGES, heads.heads):
        total = 0.0
        for batch in batches:
            with torch.no_grad():
                model(batch)
                maps = head(seen[stage])[0]
                model(batch.flip(-1))
                total += float((maps.flip(-1) - head(seen[stage])[0]).square().mean())
        assert result[f"flip/{stage}"] == pytest.approx(total / 2, rel=1e-5)
    for handle in handles:
        handle.remove()


# --------------------------------------------------------------------------- the backbone untouched


def test_the_heads_never_change_the_backbone():
    model = net()
    plain = copy.deepcopy(model)
    x = images()
    heads = MultiScaleHeads(model, STAGES)
    assert not {id(p) for p in heads.parameters()} & {id(p) for p in model.parameters()}
    assert all(not k.startswith(("stage", "fc")) for k in heads.state_dict())  # only the heads' own
    with_heads = model(x)
    torch.testing.assert_close(with_heads, plain(x), rtol=0, atol=0)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name  # BatchNorm statistics too
    heads.remove()
    heads.remove()  # idempotent
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert len(heads) == 0


def test_paused_overflow_copies_and_dropped_heads():
    model = net()
    heads = MultiScaleHeads(model, STAGES, max_stored=2)
    with heads.paused():
        model(images())
    assert len(heads) == 0
    with pytest.warns(UserWarning, match="without pop"):
        for _ in range(3):
            model(images())
    assert len(heads) == 2
    heads.clear()
    copy.deepcopy(model)(images())  # a copy's forwards are not these heads' to record
    assert len(heads) == 0
    del heads
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_compile_autocast_and_channels_last():
    model = net().to(memory_format=torch.channels_last)
    heads = MultiScaleHeads(model, STAGES).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="aot_eager")
    x = images().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AttentionConsistencyLoss().views(compiled, heads, x, ["flip"])
    assert sorted(out.terms) == ["flip/stage1", "flip/stage2", "flip/stage3"]
    assert all(t.dtype == torch.float32 and bool(t.isfinite()) for t in out.terms.values())
    out.loss.backward()
    assert heads.head("stage1").attention.spatial.weight.grad is not None


def test_ddp_sees_the_heads_through_with_side_heads():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        model = net()
        heads = MultiScaleHeads(model, STAGES)
        ddp = nn.parallel.DistributedDataParallel(WithSideHeads(model, heads))
        out = AttentionConsistencyLoss().views(ddp, heads, images(), ["flip"], targets=torch.ones(2, 3), criterion=bce)
        out.total.backward()
        assert all(p.grad is not None for p in heads.parameters())
    finally:
        dist.destroy_process_group()


def _train_ddp_worker(rank: int, port: int, out_dir: str, settings: dict) -> None:
    import os

    from examples import train as script

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    built = []
    original = script.build_heads
    script.build_heads = lambda *args: built.append(original(*args)) or built[-1]
    script.train(msac_config(Path(out_dir) / "run", **settings), device="cpu")
    torch.save({name: p.detach() for name, p in built[0].named_parameters()}, Path(out_dir) / f"heads{rank}.pt")


def test_the_training_script_under_ddp_averages_the_side_heads_gradients(tmp_path):
    """Each replica trains on its half of the batch: only averaged gradients keep the heads equal."""
    run_workers(_train_ddp_worker, (free_port(), str(tmp_path), {"max_steps": 1}))
    ranks = [torch.load(tmp_path / f"heads{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def test_the_training_script_under_ddp_refuses_an_untrained_head_by_its_flag(tmp_path):
    # the model's own classifier at weight 0 gets no gradient: DDP would fail at the second step
    settings = {"max_steps": 2, "synthetic_train": 16, "supervision": {"output": 0.0}, "fusion": "last"}
    with pytest.raises(
        Exception, match="--supervision gives the head 'output' weight 0: under DDP every head must be trained"
    ):
        run_workers(_train_ddp_worker, (free_port(), str(tmp_path), settings))


# --------------------------------------------------------------------------- bad input


def test_an_unknown_stage_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"stage 'stage4' names no submodule of Net; its stages: stage1, stage2, stage3, pool, fc"
    ):
        MultiScaleHeads(net(), ["stage1", "stage4"])
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    with pytest.raises(ValueError, match=r"its stages: act1, layer1, layer2, layer3, layer4"):
        MultiScaleHeads(model, ["layer5"])
    with pytest.raises(ValueError, match="feature_info has 5 entries"):
        MultiScaleHeads(model, [7])


def test_a_stage_that_is_not_a_4d_map_is_refused_with_its_name_and_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    heads = MultiScaleHeads(model, ["1"], channels={"1": 4})
    with pytest.raises(
        ValueError, match=r"stage '1' of Sequential must give a 4-D floating-point map \(N, C, h, w\), got \(2, 144\)"
    ):
        model(torch.randn(2, 3, 8, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # removed first
    del heads


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(stages=["fc"]), ValueError, "holds the model's classifier"),
        (dict(stages=["stage1", "stage1"]), ValueError, "more than once"),
        (dict(stages="stage1"), TypeError, "non-empty sequence"),
        (dict(stages=STAGES, fusion="max"), ValueError, "fusion must be 'mean', 'last', 'output' or a stage name"),
        (dict(stages=STAGES, fusion="last", supervision={"stage3": 0.0}), ValueError, "supervision weight is 0"),
        (dict(stages=STAGES, supervision={"stage9": 1.0}), ValueError, "supervision key 'stage9' names no head"),
        (
            dict(stages=STAGES, consistency_weights={"stage1": -1.0}),
            ValueError,
            r"consistency_weights\['stage1'\] must be >= 0",
        ),
        (dict(stages=STAGES, channels={"stage1": 5, "pool": 3}), ValueError, "channels key 'pool' names no stage"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiScaleHeads(net(), **kwargs)


def test_wrong_channels_are_reported_at_the_first_forward():
    model = net()
    heads = MultiScaleHeads(model, STAGES, channels={"stage2": 5})
    with pytest.raises(
        ValueError,
        match=r"stage 'stage2' gives maps of shape \(2, 12, 8, 8\), NCHW \(its output is that of a BatchNorm2d, "
        r"which gives \(N, C, h, w\)\), so with 12 channels, but its side head was built for 5; "
        r"pass channels=\{'stage2': 12\}",
    ):
        model(images())
    assert len(heads) == 0 and all(not m._forward_hooks for m in model.modules())


def test_views_takes_the_protocol_and_refuses_anything_else():
    model = net()
    heads = MultiScaleHeads(model, STAGES)
    assert isinstance(heads, StageRecorder) and not isinstance(model, StageRecorder)
    with pytest.raises(TypeError, match="cam must be a CAMHook attached to the model, or a recorder"):
        AttentionConsistencyLoss().views(model, object(), images(), ["flip"])
    with pytest.raises(ValueError, match="the same stages"):
        multiscale_consistency({"a": torch.zeros(1, 1, 2, 2)}, {"b": torch.zeros(1, 1, 2, 2)}, "flip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CAMHook(model).remove()  # a CAMHook on the same backbone is independent of the heads


# --------------------------------------------------------------------------- the training script


def msac_config(out, epochs=1, **settings):
    from examples.train import PRESETS, TrainConfig

    tiny = dict(image_size=32, scale_size=24, epochs=epochs, batch_size=4, test_batch_size=4, workers=0, progress=False,
                synthetic_train=8, synthetic_test=8, lr_step=1, out=str(out))  # fmt: skip
    return TrainConfig(**(PRESETS["synthetic-msac-fs"] | tiny | settings))


def test_msac_presets():
    from examples.train import PRESETS

    for name, transforms in (("wider-r50-msac", ("flip",)), ("wider-r50-msac-fs", ("flip", "scale"))):
        preset = PRESETS[name]
        assert (preset["arch"], preset["image_size"], preset["scale_size"]) == ("resnet50", 224, 192)
        assert preset["transforms"] == transforms and preset["stages"] == ("layer2", "layer3", "layer4")
        assert not preset.get("weights") and preset.get("distance", "mse") == "mse"  # every weight 1, Eq. 5
    assert (
        PRESETS["synthetic-msac"]["stages"]
        == PRESETS["synthetic-msac-fs"]["stages"]
        == ("layers.0", "layers.1", "layers.2")
    )


def test_resumed_msac_run_equals_the_uninterrupted_one(tmp_path, one_thread):
    from examples.train import load_checkpoint, train

    straight = train(msac_config(tmp_path / "straight", 2), device="cpu")
    train(msac_config(tmp_path / "resumed", 1), device="cpu")
    resumed = train(msac_config(tmp_path / "resumed", 2), device="cpu", resume=True)
    assert resumed == straight
    keys = {
        "term-flip@32/layers.0",
        "term-scale/layers.2",
        "inconsistency-flip/layers.1",
        "pointing-game/layers.0",
        "mAP/layers.1",
        "mAP/output",
    }
    assert keys <= set(straight[-1])
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["heads"].keys() == b["heads"].keys() and any(k.startswith("heads.2.attention") for k in a["heads"])
    for key in a["heads"]:
        assert torch.equal(a["heads"][key], b["heads"][key]), key


def test_deep_supervision_and_fusion_reach_the_training_script(tmp_path, one_thread, monkeypatch):
    from examples import train as script

    seen = {}
    original = script.build_heads

    def spy(config, model, labels):
        seen["heads"] = original(config, model, labels)
        return seen["heads"]

    monkeypatch.setattr(script, "build_heads", spy)
    settings = dict(
        fusion="last", supervision={"output": 0.0, "layers.0": 0.5}, stage_weights={"layers.1": 0.0}, max_steps=1
    )
    history = script.train(msac_config(tmp_path, **settings), device="cpu")
    heads = seen["heads"]
    assert heads.fusion == "last" and heads.supervision == {
        "layers.0": 0.5,
        "layers.1": 1.0,
        "layers.2": 1.0,
        "output": 0.0,
    }
    assert not any("layers.1" in key for key in history[-1] if key.startswith("term-"))  # weight 0: no term


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["--stages", "layers.0", "layers.9"],
            r"--stages layers.0 layers.9: stage 'layers.9' names no submodule of SmallResNet; its stages: stem, layers, avgpool, fc",
        ),
        (["--stages", "layers.0", "layers.0"], "--stages names 'layers.0' more than once"),
        (["--fusion", "last"], "--fusion sets the side heads, but --stages names none"),
        (
            ["--stages", "layers.0", "--supervision", '{"layers.2": 1}'],
            "--supervision names 'layers.2', which is not one of layers.0, output",
        ),
        (
            ["--stages", "layers.0", "--stage-weights", '{"layers.0": -1}'],
            "--stage-weights: the weight of 'layers.0' must be >= 0",
        ),
        (
            ["--stages", "layers.0", "--fusion", "max"],
            "--fusion must be 'mean', 'last', 'output' or a stage of --stages",
        ),
    ],
)
def test_bad_msac_flags_name_the_flag(argv, match, tmp_path, capsys):
    from examples.train import main

    argv = [
        "--preset",
        "synthetic",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--synthetic-train",
        "8",
        "--batch-size",
        "4",
        *argv,
    ]
    try:
        main(argv)
    except (ValueError, TypeError) as error:
        message = str(error)
    except SystemExit:
        message = capsys.readouterr().err
    else:
        pytest.fail("the run was not refused")
    assert re.search(match, message), message


def test_figure5_of_a_multiscale_checkpoint_has_a_row_per_stage(tmp_path, one_thread):
    from PIL import Image

    from examples import figure5
    from examples.train import train

    train(msac_config(tmp_path / "run", max_steps=1), device="cpu")
    out = figure5.main([str(tmp_path / "run" / "last.pt"), "--label", "0", "--out", str(tmp_path / "f.png")])
    with Image.open(out) as picture:  # the model's CAM and 3 stages: 4 rows of 2.5 in. under 3 columns of 2.5 in.
        assert picture.height == pytest.approx(4 / 3 * picture.width, rel=0.02)
    model, config, labels = figure5.load_trained(tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match="side heads do not fit --stages layers.0 layers.1"):
        figure5.load_heads(
            tmp_path / "run" / "last.pt",
            model,
            config.__class__(**{**vars(config), "stages": ("layers.0", "layers.1")}),
            len(labels),
        )


def test_a_user_transform_gives_a_term_per_stage_equal_to_the_oracle():
    from attn_consistency import Transform

    class VerticalFlip(Transform):
        name = "vflip"

        def apply_image(self, images, params=None):
            return images.flip(-2)

        def apply_heatmaps(self, heatmaps, params=None):
            return heatmaps.flip(-2), None

    model = net(torch.float64).eval()  # BatchNorm in eval mode: a view's maps do not depend on its batch
    heads = MultiScaleHeads(model, STAGES).double().eval()
    x = images(dtype=torch.float64)
    out = AttentionConsistencyLoss().views(model, heads, x, [VerticalFlip(), get_transform("rotate", degrees=90.0)])
    assert sorted(out.terms) == sorted(f"{t}/{s}" for t in ("vflip", "rotate") for s in STAGES)
    model(x)
    model(x.flip(-2))
    model(x.rot90(1, (-2, -1)))
    original, flipped, rotated = (record.heatmaps for record in heads.pop())
    for stage in STAGES:
        expected = (original[stage].flip(-2) - flipped[stage]).square().mean()
        torch.testing.assert_close(out.terms[f"vflip/{stage}"], expected, rtol=1e-10, atol=0)
        expected = (original[stage].rot90(1, (-2, -1)) - rotated[stage]).square().mean()
        torch.testing.assert_close(out.terms[f"rotate/{stage}"], expected, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- NHWC stages (issue 18, item 3)


class ToNHWC(nn.Module):
    """A stage that says nothing of its layout: a convolution's map, permuted to (N, h, w, C)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class NHWCNet(nn.Module):
    """An NHWC trunk: ``stage`` (no layout cue) then ``norm``, an ``nn.LayerNorm`` over the channels."""

    def __init__(self, channels: int = 16, labels: int = 4) -> None:
        super().__init__()
        self.stage = ToNHWC(channels)
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, labels)

    def forward(self, x):
        return self.fc(self.norm(self.stage(x)).mean((1, 2)))


def nhwc_net(**kwargs) -> NHWCNet:
    torch.manual_seed(0)
    return NHWCNet(**kwargs)


def side_head_on(heads, stage, nhwc):
    """The stage's side head applied by the test itself to the map permuted to NCHW."""
    return heads.head(stage)(nhwc.permute(0, 3, 1, 2), heads.detach_classifier)


@pytest.mark.parametrize("stage", ["norm", "stage"])
def test_an_nhwc_stage_gives_maps_over_its_cells(stage):
    model = nhwc_net()
    heads = MultiScaleHeads(model, [stage], channels=None if stage == "norm" else {"stage": 16})
    seen, handles = capture(model, [stage])
    model(torch.randn(2, 3, 8, 12))
    (record,) = heads.pop()
    assert seen[stage].shape == (2, 8, 12, 16)
    assert record.heatmaps[stage].shape == (2, 4, 8, 12)  # (N, L, h, w): not over (w, C)
    maps, logits = side_head_on(heads, stage, seen[stage])
    torch.testing.assert_close(record.heatmaps[stage], maps, rtol=0, atol=0)
    torch.testing.assert_close(record.logits[stage], logits, rtol=0, atol=0)
    bias = heads.head(stage).classifier.bias
    torch.testing.assert_close(record.heatmaps[stage].mean((2, 3)) + bias, record.logits[stage], rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()


def test_the_height_of_an_nhwc_stage_passed_as_its_channels_is_refused():
    model = nhwc_net()
    heads = MultiScaleHeads(model, ["norm"], channels={"norm": 8})  # what the old message said: 8 is the height
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 3, 8, 12))
    message = str(error.value)
    assert "stage 'norm' gives maps of shape (2, 8, 12, 16), NHWC" in message
    assert "LayerNorm, which works on the last dimension" in message and "pass channels={'norm': 16}" in message
    assert len(heads) == 0 and all(not m._forward_hooks for m in model.modules())


def test_a_square_nhwc_map_without_a_cue_is_refused_by_name_unless_its_layout_is_given():
    model = nhwc_net()
    heads = MultiScaleHeads(model, ["stage"], channels={"stage": 16})
    with pytest.raises(ValueError, match=r"stage 'stage' gives maps of shape \(2, 16, 16, 16\).*could be dim 1.*"
                       r"pass layouts=\{'stage': 'nchw'\} or layouts=\{'stage': 'nhwc'\}"):  # fmt: skip
        model(torch.randn(2, 3, 16, 16))
    heads = MultiScaleHeads(model, ["stage", "norm"], channels={"stage": 16}, layouts={"stage": "nhwc"})
    seen, handles = capture(model, ["stage", "norm"])
    model(torch.randn(2, 3, 16, 16))
    (record,) = heads.pop()
    for stage in ("stage", "norm"):  # 'norm' knows its layout (a LayerNorm over the channels)
        torch.testing.assert_close(record.heatmaps[stage], side_head_on(heads, stage, seen[stage])[0], rtol=0, atol=0)
    for handle in handles:
        handle.remove()


def test_a_layout_settled_at_the_first_forward_is_kept():
    model = nhwc_net()
    heads = MultiScaleHeads(model, ["stage"], channels={"stage": 16})
    model(torch.randn(2, 3, 8, 12))  # dim 3 holds the 16 channels: NHWC
    model(torch.randn(2, 3, 16, 16))  # square now, but the stage's layout is known
    first, second = heads.pop()
    assert first.heatmaps["stage"].shape == (2, 4, 8, 12) and second.heatmaps["stage"].shape == (2, 4, 16, 16)


@pytest.mark.parametrize(
    ("layouts", "error", "match"),
    [
        ({"stage9": "nhwc"}, ValueError, "layouts key 'stage9' names no stage"),
        ({"stage1": "hwc"}, ValueError, r"layouts\['stage1'\] must be 'nchw' or 'nhwc', got 'hwc'"),
        (["nhwc"], TypeError, "layouts must be a mapping"),
    ],
)
def test_bad_layouts(layouts, error, match):
    with pytest.raises(error, match=match):
        MultiScaleHeads(net(), STAGES, layouts=layouts)


def test_a_layout_given_against_the_shape_is_refused_by_name():
    model = net()
    heads = MultiScaleHeads(model, ["stage1"], layouts={"stage1": "nhwc"})
    with pytest.raises(ValueError, match=r"stage 'stage1' gives maps of shape \(2, 8, 16, 16\), NHWC \(layouts="):
        model(images())
    assert len(heads) == 0


def test_timm_swin_stages_are_read_as_nhwc():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, embed_dim=24, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1), img_size=64, window_size=4,
    )  # fmt: skip
    heads = MultiScaleHeads(model, ["layers.1", "layers.2"])
    assert [h.project[0].in_channels for h in heads.heads] == [48, 96]
    seen, handles = capture(model, ["layers.1", "layers.2"])
    model(torch.randn(2, 3, 64, 64))
    (record,) = heads.pop()
    assert seen["layers.1"].shape == (2, 8, 8, 48)
    shapes = {s: tuple(m.shape) for s, m in record.heatmaps.items()}
    assert shapes == {"layers.1": (2, 3, 8, 8), "layers.2": (2, 3, 4, 4)}
    for stage in ("layers.1", "layers.2"):
        torch.testing.assert_close(record.heatmaps[stage], side_head_on(heads, stage, seen[stage])[0], rtol=0, atol=0)
    for handle in handles:
        handle.remove()


def test_a_resnet_stage_as_wide_as_its_channels_is_read_as_nchw():
    """layer1 of a ResNet-18 at 256 px gives (N, 64, 64, 64): torchvision's blocks of convolutions say NCHW."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    heads = MultiScaleHeads(model, ["layer1", "layer4"])
    seen, handles = capture(model, ["layer1"])
    with torch.no_grad():
        model(torch.randn(2, 3, 256, 256))
    (record,) = heads.pop()
    assert seen["layer1"].shape == (2, 64, 64, 64)
    with torch.no_grad():
        expected, _ = heads.head("layer1")(seen["layer1"], heads.detach_classifier)
    torch.testing.assert_close(record.heatmaps["layer1"], expected, rtol=0, atol=0)
    for handle in handles:
        handle.remove()
