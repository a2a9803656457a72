"""CAMHook on heads beyond GAP-FC (issue 9): affine heads after pooling, token models, Grad-CAM.

The oracle of every exact head is the invariant ``heatmaps.mean((2, 3)) + cam.offset == logits``
and, for hand-made heads, the maps written out from the formula in CAMHook's docstring without the
library's helpers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from attn_consistency import AttentionConsistencyLoss, CAMHook

LABELS = 5
timm = pytest.importorskip("timm")


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Backbone(nn.Sequential):
    def __init__(self, channels: int = 12) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, channels, 3, stride=2, padding=1))


class PooledHead(nn.Module):
    """backbone -> mean over the cells -> ``norm`` -> dropout -> classifier, in NCHW or NHWC."""

    def __init__(self, norm: nn.Module | None, classifier: str = "linear", nhwc: bool = False, drop: float = 0.0):
        super().__init__()
        self.body = Backbone()
        self.norm = norm if norm is not None else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.conv_classifier = classifier == "conv"
        self.fc = nn.Conv2d(12, LABELS, 1) if self.conv_classifier else nn.Linear(12, LABELS)
        self.nhwc = nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        if self.nhwc:
            pooled = features.permute(0, 2, 3, 1).mean((1, 2))
        else:
            pooled = features.mean((2, 3))
        pooled = self.drop(self.norm(pooled))
        if self.conv_classifier:
            return self.fc(pooled[:, :, None, None]).flatten(1)
        return self.fc(pooled)


class Distilled(nn.Module):
    """Two BatchNorm1d + Linear heads on one pooled vector, averaged (LeViT's and DeiT's inference)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Backbone()
        self.head = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, LABELS))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.body(x).mean((2, 3))
        return (self.head(pooled) + self.head_dist(pooled)) / 2


def _randomise(model: nn.Module) -> nn.Module:
    """Norm parameters and running statistics away from their identity initialisation."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if (
            isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.RMSNorm))
            and getattr(module, "weight", None) is not None
        ):
            with torch.no_grad():
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.3, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def tiny_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    settings = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=LABELS)
    return VisionTransformer(**(settings | kwargs))


def tiny_convnext(**kwargs) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 12, 16, 24), num_classes=LABELS, **kwargs)


def tiny_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=LABELS
    )


# head kind -> (model factory, image size)
HEADS = {
    "layernorm": (lambda: PooledHead(nn.LayerNorm(12)), 16),
    "layernorm-conv-classifier": (lambda: PooledHead(nn.LayerNorm(12), classifier="conv"), 16),
    "batchnorm1d": (lambda: PooledHead(nn.BatchNorm1d(12)), 16),
    "rmsnorm": (lambda: PooledHead(nn.RMSNorm(12)), 16),
    "conv-classifier": (lambda: PooledHead(None, classifier="conv"), 16),
    "nhwc-layernorm": (lambda: PooledHead(nn.LayerNorm(12), nhwc=True), 16),
    "distilled": (Distilled, 16),
    "timm-convnext": (tiny_convnext, 32),
    "timm-swin-nhwc": (tiny_swin, 32),
    "timm-vit-avg-fc_norm": (lambda: tiny_vit(global_pool="avg"), 32),
    "timm-vit-avg-registers": (lambda: tiny_vit(global_pool="avg", reg_tokens=2), 32),
    "timm-resnetv2-conv-classifier": (lambda: timm.create_model("resnetv2_18", num_classes=LABELS), 64),
    "torchvision-convnext": (lambda: torchvision.models.convnext_tiny(weights=None, num_classes=LABELS), 32),
    "timm-normmlp-head": (lambda: timm.create_model("test_convnext", num_classes=LABELS), 32),
}


def _model(kind: str, train: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, size = HEADS[kind]
    model = _randomise(factory())
    return model.train(train), images(4, 3, size, size)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(HEADS))
def test_invariant_of_every_head_kind(kind: str, train: bool) -> None:
    model, x = _model(kind, train)
    with CAMHook(model) as cam:
        logits = model(x)
        (heatmaps,) = cam.pop()
        assert cam.offset is not None and cam.offset.shape == (LABELS,)
        torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5, rtol=1e-4)
        # later forwards (no more check) keep it, and the maps have a gradient to the input
        x2 = images(4, *x.shape[1:], seed=3).requires_grad_(True)
        logits = model(x2)
        (heatmaps,) = cam.pop()
        torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5, rtol=1e-4)
        heatmaps.square().sum().backward()
        assert x2.grad is not None and bool(x2.grad.abs().sum() > 0)


@pytest.mark.parametrize("kind", ["layernorm", "nhwc-layernorm", "distilled", "timm-convnext", "timm-vit-avg-fc_norm"])
def test_invariant_under_bf16_autocast(kind: str) -> None:
    model, x = _model(kind, train=False)
    with CAMHook(model) as cam, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        (heatmaps,) = cam.pop()
    scale = logits.float().abs().max()
    error = (heatmaps.float().mean((2, 3)) + cam.offset - logits.float()).abs().max()
    assert error <= 3e-2 * scale, (float(error), float(scale))


def test_layernorm_head_maps_equal_the_formula() -> None:
    # M_l(m, n) = sum_c W_lc gamma_c (F_c(m, n) - mu) / sigma, mu and sigma of the pooled vector
    model, x = _model("layernorm", train=False)
    with CAMHook(model) as cam:
        model(x)
        (heatmaps,) = cam.pop()
    features = model.body(x)
    pooled = features.mean((2, 3))
    mu = pooled.mean(1)[:, None, None, None]
    sigma = (pooled.var(1, unbiased=False) + model.norm.eps).sqrt()[:, None, None, None]
    weight = model.fc.weight * model.norm.weight
    expected = torch.einsum("lc,nchw->nlhw", weight, (features - mu) / sigma)
    torch.testing.assert_close(heatmaps, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cam.offset, model.fc.weight @ model.norm.bias + model.fc.bias)


def test_vit_maps_are_the_classifier_on_each_patch_token() -> None:
    model = tiny_vit(global_pool="avg", reg_tokens=2).eval()
    x = images(2, 3, 32, 32)
    with CAMHook(model) as cam:
        model(x)
        (heatmaps,) = cam.pop()
    assert heatmaps.shape == (2, LABELS, 4, 4) and cam.layout == "tokens" and cam.prefix_tokens == 3
    tokens = model.forward_features(x)[:, 3:]  # class + 2 registers dropped, raster order
    pooled = tokens.mean(1)
    norm = model.fc_norm
    mu, sigma = pooled.mean(1)[:, None, None], (pooled.var(1, unbiased=False) + norm.eps).sqrt()[:, None, None]
    expected = ((tokens - mu) / sigma * norm.weight) @ model.head.weight.T  # (N, 16, L)
    torch.testing.assert_close(heatmaps, expected.transpose(1, 2).reshape(2, LABELS, 4, 4), atol=1e-5, rtol=1e-5)


def test_non_square_token_grid_follows_the_image() -> None:
    model = tiny_vit(global_pool="avg", img_size=(32, 48), dynamic_img_size=True).eval()
    with CAMHook(model) as cam:
        logits = model(images(2, 3, 32, 48))
        (wide,) = cam.pop()
        model(images(2, 3, 48, 24))
        (tall,) = cam.pop()
    assert wide.shape[-2:] == (4, 6) and tall.shape[-2:] == (6, 3)
    torch.testing.assert_close(wide.mean((2, 3)) + cam.offset, logits, atol=1e-5, rtol=1e-4)


def test_gradcheck_of_layernorm_head_maps() -> None:
    # the features are the input: the maps as a function of F, in float64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(6), nn.Linear(6, 3))
    model = _randomise(model).double()
    cam = CAMHook(model)
    model(images(2, 6, 3, 3).double())  # the first forward finds and checks the head
    cam.clear()

    def maps(features: torch.Tensor) -> torch.Tensor:
        model(features)
        (heatmaps,) = cam.pop()
        return heatmaps

    assert cam.norm is model[3]
    assert torch.autograd.gradcheck(maps, images(2, 6, 3, 3, seed=1).double().requires_grad_(True))
    cam.remove()


def _symmetrise(model: nn.Module) -> nn.Module:
    """Every convolution kernel mirror-symmetric: the model commutes with a horizontal flip."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return model


@pytest.mark.parametrize(
    "factory",
    [
        lambda: tiny_convnext(),
        lambda: tiny_vit(global_pool="avg", class_token=False, pos_embed="none"),
    ],
    ids=["convnext", "vit"],
)
def test_consistency_loss_is_zero_for_an_equivariant_model_and_reaches_the_backbone(factory) -> None:
    torch.manual_seed(0)
    model = _randomise(factory()).eval()
    x = images(2, 3, 32, 32)
    loss = AttentionConsistencyLoss(diagnostics=False)
    equivariant = _symmetrise(copy.deepcopy(model))
    with CAMHook(equivariant) as cam:
        out = loss.views(equivariant, cam, x, ["flip"])
    assert float(out.terms["flip"].detach()) < 1e-10
    with CAMHook(model) as cam:
        out = loss.views(model, cam, x, ["flip"])
    assert float(out.terms["flip"].detach()) > 1e-4
    out.loss.backward()
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad is not None and bool(stem.weight.grad.abs().sum() > 0)


def test_vit_scale_term_on_patch_grids_of_two_sizes() -> None:
    torch.manual_seed(0)
    model = tiny_vit(global_pool="avg", img_size=64, patch_size=16, dynamic_img_size=True).eval()
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model) as cam:
        with torch.no_grad():
            model(images(1, 3, 224, 224))
            model(images(1, 3, 192, 192))
        assert [tuple(m.shape[-2:]) for m in cam.pop()] == [(14, 14), (12, 12)]
        out = loss.views(model, cam, images(2, 3, 224, 224), ["flip", "scale"], mode="product")
    assert set(out.terms) == {"flip@224", "flip@192", "scale"}
    assert all(bool(t.isfinite()) and float(t.detach()) > 0 for t in out.terms.values())
    out.loss.backward()
    assert bool(model.patch_embed.proj.weight.grad.abs().sum() > 0)


def test_class_token_vit_is_refused_with_the_way_out() -> None:
    model = tiny_vit().eval()  # global_pool='token'
    with pytest.raises(ValueError, match=r"classifies its class token.*global_pool='avg'"), CAMHook(model):
        model(images(2, 3, 32, 32))


class MlpHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Backbone()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(12, 16)
        self.fc = nn.Linear(16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.pool(self.body(x)).flatten(1))))


def test_mlp_head_is_refused_and_named_to_gradcam() -> None:
    model = MlpHead().eval()
    with pytest.raises(ValueError, match=r"MlpHead is not GAP-FC.*CAMHook\(model, method='gradcam'\)"), CAMHook(model):
        model(images(2, 3, 16, 16))


def test_timm_mlp_head_is_refused_and_named_to_gradcam() -> None:
    model = timm.create_model("mobilenetv3_small_050", num_classes=LABELS).eval()
    with pytest.raises(ValueError, match=r"MobileNetV3 is not GAP-FC.*method='gradcam'"), CAMHook(model):
        model(images(2, 3, 64, 64))


def test_gradcam_equals_eq1_on_a_gap_fc_model() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=LABELS).eval()
    x = images(2, 3, 64, 64)
    with CAMHook(model) as cam:
        model(x)
        (exact,) = cam.pop()
    with CAMHook(model, method="gradcam") as cam:
        model(x)
        (gradcam,) = cam.pop()
        assert cam.offset is None
    torch.testing.assert_close(gradcam, exact, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("detach", [True, False], ids=["detached-weights", "create_graph"])
def test_gradcam_of_an_mlp_head_matches_autograd_per_label(detach: bool) -> None:
    torch.manual_seed(0)
    model = MlpHead().eval()
    x = images(3, 3, 16, 16)
    with CAMHook(model, method="gradcam", detach_classifier=detach) as cam:
        model(x)
        (heatmaps,) = cam.pop()
    # oracle: one backward per label, alpha = gradient summed over the cells
    features = model.body(x).detach().requires_grad_(True)
    logits = model.fc(torch.relu(model.hidden(features.mean((2, 3)))))
    expected = []
    for label in range(LABELS):
        (grad,) = torch.autograd.grad(logits[:, label].sum(), features, retain_graph=True)
        expected.append((grad.sum((2, 3))[:, :, None, None] * features).sum(1))
    torch.testing.assert_close(heatmaps, torch.stack(expected, 1), atol=1e-5, rtol=1e-4)
    heatmaps.square().sum().backward()
    assert bool(model.body[0].weight.grad.abs().sum() > 0)
    # create_graph: the loss reaches the head through alpha; detached weights keep it away
    assert (model.hidden.weight.grad is not None and bool(model.hidden.weight.grad.abs().sum() > 0)) is not detach


def test_gradcam_without_gradients_is_an_error_that_keeps_the_hook() -> None:
    model = MlpHead().eval()
    with CAMHook(model, method="gradcam") as cam:
        model(images(2, 3, 16, 16))
        cam.clear()
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"method='gradcam'.*gradients enabled"):
            model(images(2, 3, 16, 16))
        model(images(2, 3, 16, 16))
        assert len(cam.pop()) == 1


def test_gradcam_in_the_consistency_loss() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=LABELS).eval()
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model, method="gradcam") as cam:
        out = loss.views(model, cam, images(2, 3, 64, 64), ["flip", "scale"], mode="product")
    assert "scale" in out.terms and any(name.startswith("flip") for name in out.terms)
    assert bool(out.loss.isfinite()) and float(out.loss.detach()) > 0
    out.loss.backward()
    assert bool(model.conv_stem.weight.grad.abs().sum() > 0)


def test_method_is_checked() -> None:
    with pytest.raises(ValueError, match=r"method must be 'cam' .* or 'gradcam'"):
        CAMHook(MlpHead(), method="grad-cam")


@pytest.mark.parametrize("kind", ["timm-convnext", "timm-vit-avg-fc_norm", "nhwc-layernorm"])
def test_channels_last_and_compile(kind: str) -> None:
    model, x = _model(kind, train=False)
    with CAMHook(model) as cam:
        reference = model(x)
        (expected,) = cam.pop()
        model_cl = model.to(memory_format=torch.channels_last)
        logits = model_cl(x.to(memory_format=torch.channels_last))
        (heatmaps,) = cam.pop()
        torch.testing.assert_close(heatmaps, expected, atol=1e-5, rtol=1e-4)
        compiled = torch.compile(model, backend="eager")
        logits = compiled(x)
        (heatmaps,) = cam.pop()
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heatmaps, expected, atol=1e-5, rtol=1e-4)


def test_head_dropout_in_train_mode_between_norm_and_classifier() -> None:
    # NormMlpClassifierHead: pool -> LayerNorm2d -> dropout -> fc; the maps give the un-dropped logits
    torch.manual_seed(0)
    model = _randomise(tiny_convnext(drop_rate=0.5)).train()
    x = images(4, 3, 32, 32)
    with CAMHook(model) as cam:
        torch.manual_seed(1)
        model(x)
        (heatmaps,) = cam.pop()
    model.head.drop.p = 0.0
    torch.manual_seed(1)
    logits = model(x)
    torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5, rtol=1e-4)


def _ddp_vit_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = tiny_vit(global_pool="avg")
        x = images(4, 3, 32, 32)[rank * 2 : rank * 2 + 2]
        ddp = nn.parallel.DistributedDataParallel(model)
        targets = _targets()[rank * 2 : rank * 2 + 2]
        with CAMHook(ddp) as cam:
            out = AttentionConsistencyLoss(diagnostics=False).views(
                ddp, cam, x, ["flip"], targets=targets, criterion=nn.functional.binary_cross_entropy_with_logits
            )
        out.total.backward()
        grads = [p.grad for p in model.parameters()]
        torch.save({"loss": out.total.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_with_a_token_head_matches_one_process(tmp_path) -> None:
    from fixtures import free_port, run_workers

    run_workers(_ddp_vit_worker, (2, free_port(), str(tmp_path)), 2)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    torch.manual_seed(0)
    model = tiny_vit(global_pool="avg")
    with CAMHook(model) as cam:
        out = AttentionConsistencyLoss(diagnostics=False).views(
            model,
            cam,
            images(4, 3, 32, 32),
            ["flip"],
            targets=_targets(),
            criterion=nn.functional.binary_cross_entropy_with_logits,
        )
    out.total.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, out.total.detach(), rtol=1e-5, atol=1e-6)
    for result in results:  # DDP averaged the gradients: each replica holds the full batch's
        for got, param in zip(result["grads"], model.parameters()):
            torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def _targets() -> torch.Tensor:
    return (images(4, LABELS, seed=5) > 0).float()


class SevenTokens(nn.Module):
    """Seven tokens of a square image (not a patch grid), pooled: a user names them as features."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Sequential(nn.Linear(3, 7 * 6), nn.Unflatten(1, (7, 6)))
        self.fc = nn.Linear(6, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tokens(x.mean((2, 3))).mean(1))


def test_tokens_that_fit_no_grid_of_the_image_are_refused() -> None:
    model = SevenTokens()
    with pytest.raises(ValueError, match=r"7 patch tokens of 'tokens' fit no grid of the image's aspect \(16x16"):
        with CAMHook(model, features="tokens", classifier="fc"):
            model(images(2, 3, 16, 16))


def test_rotate_and_translate_terms_on_token_maps() -> None:
    torch.manual_seed(0)
    model = tiny_vit(global_pool="avg", img_size=64, dynamic_img_size=True).eval()
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model) as cam:
        out = loss.views(model, cam, images(2, 3, 64, 64), ["rotate", "translate"])
    assert set(out.terms) == {"rotate", "translate"}
    assert all(bool(t.isfinite()) and float(t.detach()) > 0 for t in out.terms.values())
    out.loss.backward()
    assert bool(model.patch_embed.proj.weight.grad.abs().sum() > 0)


def test_attention_inconsistency_with_gradcam_maps_inside_no_grad() -> None:
    # the evaluation loop runs under no_grad; Grad-CAM's forwards get their gradients anyway
    from attn_consistency.consistency import attention_inconsistency

    torch.manual_seed(0)
    model = MlpHead().eval()
    batches = [images(2, 3, 16, 16, seed=k) for k in range(2)]
    with CAMHook(model, method="gradcam") as cam, torch.no_grad():
        value = attention_inconsistency(model, cam, batches, "flip")
    with CAMHook(model, method="gradcam") as cam:  # the oracle: the same maps, by hand
        total = 0.0
        for x in batches:
            model(x)
            model(x.flip(-1))
            maps, flipped = cam.pop()
            total += float(((maps.flip(-1) - flipped) ** 2).mean((2, 3)).sum().detach())
    assert value == pytest.approx(total / (4 * LABELS), rel=1e-5)


def test_attention_inconsistency_keeps_no_graph(monkeypatch) -> None:
    # outside no_grad, the maps it compares are detached: no graph kept from one batch to the next
    import attn_consistency.consistency as consistency

    model, x = _model("layernorm", train=False)
    compared, compare = [], consistency.attention_consistency
    monkeypatch.setattr(
        consistency,
        "attention_consistency",
        lambda maps, maps_t, *args, **kwargs: (
            compared.append(maps.requires_grad or maps_t.requires_grad) or compare(maps, maps_t, *args, **kwargs)
        ),
    )
    with CAMHook(model) as cam:
        value = consistency.attention_inconsistency(model, cam, [x, x], "flip")
    assert value > 0 and compared == [False, False]
