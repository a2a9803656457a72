"""CAMHook, no silently wrong result, round two (issue 18: items 1, 10, 15 and head dropout).

Oracles: Grad-CAM written out by hand (one backward per label, the patch tokens laid out in
raster order), the exact maps of a fresh CAMHook, the eval-mode logits, the hooks left on the
model, and error messages.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_consistency import CAMHook

LABELS = 5
timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def vit(global_pool: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=LABELS, img_size=64, global_pool=global_pool,
        dynamic_img_size=True,
    )  # fmt: skip
    return model.eval()


class MlpHead(nn.Module):
    """A map, average pooling, a hidden layer with a ReLU, a classifier: no exact map, Grad-CAM only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 12, 3, stride=2, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(12, 16)
        self.fc = nn.Linear(16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.pool(self.body(x)).flatten(1))))


class SideBranch(MlpHead):
    """An MlpHead that also runs a convolution whose output the logits never see."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return super().forward(x)


def gradcam_by_hand(features: torch.Tensor, logits_of, cells) -> torch.Tensor:
    """``sum_c alpha_lc F_c`` with ``alpha_lc`` the gradient of logit ``l`` summed over the cells, per label."""
    features = features.detach().requires_grad_(True)
    logits = logits_of(features)
    maps = []
    for label in range(LABELS):
        (grad,) = torch.autograd.grad(logits[:, label].sum(), features, retain_graph=True)
        grid, values = cells(grad), cells(features.detach())
        maps.append((grid.sum((2, 3))[:, :, None, None] * values).sum(1))
    return torch.stack(maps, 1)


# --- item 1: Grad-CAM takes only a map whose cells lie on the image ------------------------------


@pytest.mark.parametrize("size", [(64, 64), (64, 32)], ids=["square", "tall"])
def test_gradcam_of_an_average_pooled_vit_is_its_patch_tokens_on_the_grid(size: tuple[int, int]) -> None:
    model = vit("avg")
    x = images(2, 3, *size)
    with CAMHook(model, method="gradcam") as cam:
        model(x)
        (heatmaps,) = cam.pop()
        assert (cam.layout, cam.prefix_tokens) == ("tokens", 1)
    rows, cols = size[0] // 16, size[1] // 16

    def cells(tokens: torch.Tensor) -> torch.Tensor:  # raster order: row after row of the patch grid
        return tokens[:, 1:].reshape(tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2)

    expected = gradcam_by_hand(model.forward_features(x), model.forward_head, cells)
    assert heatmaps.shape == (2, LABELS, rows, cols)
    torch.testing.assert_close(heatmaps, expected, atol=1e-5, rtol=1e-4)


def test_gradcam_of_a_class_token_vit_names_the_attention_tensor_and_the_way_out() -> None:
    # the last 4-D output is an attention tensor (N, heads, T, head_dim), not a map of the image
    model = vit("token")
    with pytest.raises(ValueError) as refusal, CAMHook(model, method="gradcam"):
        model(images(2, 3, 64, 64))
    message = str(refusal.value)
    assert "'blocks.11.attn.k_norm' (2, 3, 17, 64), is no such map" in message
    assert "class token" in message and "global_pool='avg'" in message and "features=" in message
    assert hook_count(model) == 0


def test_gradcam_of_named_tokens_of_a_class_token_vit() -> None:
    # the tokens the class token attends to have maps; those after the last attention only reach it
    # through the class token, so their patch tokens' maps would be zero: refused by name
    model = vit("token")
    with CAMHook(model, features="blocks.11.norm1", method="gradcam") as cam:
        model(images(2, 3, 64, 64))
        (heatmaps,) = cam.pop()
    assert heatmaps.shape == (2, LABELS, 4, 4) and bool(heatmaps.abs().sum() > 0)
    with (
        pytest.raises(ValueError, match=r"only the prefix \(class, register\) tokens of 'norm' reach the logits"),
        CAMHook(model, features="norm", method="gradcam"),
    ):
        model(images(2, 3, 64, 64))
    assert hook_count(model) == 0


class FunctionalPoolMlp(nn.Module):
    """A map, an attention-shaped 4-D tensor beside it, ``Tensor.mean`` over the map, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.GELU())
        self.qk = nn.Conv2d(12, 12, 1)
        self.hidden = nn.Linear(12, 16)
        self.fc = nn.Linear(16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        attention = self.qk(features).flatten(2).reshape(x.shape[0], 3, 4, -1).softmax(-1)  # (N, heads, 4, hw)
        features = features + attention.mean() * 0
        return self.fc(torch.relu(self.hidden(features.mean((2, 3)))))


def test_gradcam_of_a_functional_pooling_takes_the_map_it_averages() -> None:
    torch.manual_seed(0)
    model = FunctionalPoolMlp().eval()
    x = images(2, 3, 16, 16)
    with CAMHook(model, method="gradcam") as cam:
        model(x)
        (heatmaps,) = cam.pop()
        assert cam.features is model.body and cam.layout == "nchw"
    expected = gradcam_by_hand(model.body(x), lambda f: model.fc(torch.relu(model.hidden(f.mean((2, 3))))), lambda t: t)
    torch.testing.assert_close(heatmaps, expected, atol=1e-5, rtol=1e-4)


def test_gradcam_of_densenet_is_eq1_on_its_last_map() -> None:
    # its global pooling is functional: not the last pooling module that ran (a transition's, at
    # stride 16), and not the ReLU the hook would apply outside the graph (the model applies it in place)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=LABELS).eval()
    x = images(2, 3, 64, 64)
    with CAMHook(model) as cam:
        model(x)
        (exact,) = cam.pop()
    with CAMHook(model, method="gradcam") as cam:
        for _ in range(2):  # the first forward, then the recording hook
            model(x)
            (heatmaps,) = cam.pop()
            assert cam.features is model.features
            torch.testing.assert_close(heatmaps, exact, atol=1e-5, rtol=1e-4)


# --- item 10: Grad-CAM after a refused forward, an empty batch, features that do not feed ---------


def test_gradcam_records_after_a_first_forward_without_gradients() -> None:
    torch.manual_seed(0)
    model = MlpHead().eval()
    x = images(2, 3, 16, 16)
    with CAMHook(model, method="gradcam") as reference:
        model(x)
        (expected,) = reference.pop()
    with CAMHook(model, method="gradcam") as cam:
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"gradients enabled"):
            model(x)
        for _ in range(2):
            model(x)
            (heatmaps,) = cam.pop()
            torch.testing.assert_close(heatmaps, expected)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_empty_first_batch_of_an_mlp_head_waits_for_the_next_forward(method: str) -> None:
    torch.manual_seed(0)
    model = MlpHead().eval()
    x = images(2, 3, 16, 16)
    with CAMHook(model, method=method) as cam:
        with pytest.raises(ValueError, match=r"the batch is empty \(N=0\)\. It tries again at the next forward"):
            model(images(0, 3, 16, 16))
        if method == "cam":  # the next forward decides: no exact map
            with pytest.raises(ValueError, match=r"MlpHead is not GAP-FC.*method='gradcam'"):
                model(x)
            return
        model(x)
        (heatmaps,) = cam.pop()
    with CAMHook(model, method="gradcam") as reference:
        model(x)
        torch.testing.assert_close(heatmaps, reference.pop()[0])


def test_gradcam_of_features_that_do_not_feed_the_logits_names_them() -> None:
    model = SideBranch().eval()
    with (
        pytest.raises(ValueError, match=r"no gradient with respect to the features of 'side': they do not feed"),
        CAMHook(model, features="side", method="gradcam"),
    ):
        model(images(2, 3, 16, 16))
    assert hook_count(model) == 0
    # the way out the message names: the module whose output is pooled
    x = images(2, 3, 16, 16)
    with CAMHook(model, features="body", method="gradcam") as cam:
        model(x)
        (named,) = cam.pop()
    with CAMHook(model, method="gradcam") as cam:
        model(x)
        torch.testing.assert_close(named, cam.pop()[0])


# --- item 15: meta tensors at the first forward -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{}, {"features": "pool", "classifier": "fc"}, {"method": "gradcam"}], ids=["found", "named", "gradcam"]
)
def test_a_first_forward_on_meta_tensors_is_refused_and_the_hook_stays(kwargs: dict) -> None:
    model = nn.Sequential()
    model.body = nn.Conv2d(3, 12, 3, padding=1)
    model.pool = nn.AdaptiveAvgPool2d(1)
    model.flat = nn.Flatten()
    model.fc = nn.Linear(12, LABELS)
    model = model.to("meta")
    with CAMHook(model, **kwargs) as cam:
        with pytest.raises(ValueError, match=r"its input and 4 of its 4 parameters and buffers \('body\.weight', "
                           r"'body\.bias', 'fc\.weight', 'fc\.bias'\) are on the meta device\. Meta tensors carry "
                           "shapes but no values"):  # fmt: skip
            model(torch.empty(2, 3, 8, 8, device="meta"))
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        for parameter in model.parameters():
            nn.init.normal_(parameter)
        logits = model(images(2, 3, 8, 8))
        (heatmaps,) = cam.pop()
    torch.testing.assert_close(heatmaps.mean((2, 3)) + model.fc.bias, logits, atol=1e-5, rtol=1e-4)


def test_a_meta_input_alone_is_named() -> None:
    model = MlpHead()
    with pytest.raises(ValueError, match=r"MlpHead on this forward: its input is on the meta device"):
        with CAMHook(model, method="gradcam"):
            model(torch.empty(2, 3, 16, 16, device="meta"))


# --- head dropout in train mode: the maps give the expected logits ------------------------------


def test_maps_under_train_mode_dropout_give_the_expected_logits_not_the_logits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(12, LABELS),
    )  # fmt: skip
    x = images(4, 3, 8, 8)
    with CAMHook(model) as cam:
        model.eval()
        expected = model(x)  # no dropout active: exact
        (heatmaps,) = cam.pop()
        torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, expected, atol=1e-5, rtol=1e-4)
        model.train()
        torch.manual_seed(1)
        logits = model(x)
        (heatmaps,) = cam.pop()
        # the maps are the un-dropped pooled vector's: the eval-mode logits, the expectation over the mask
        torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, expected, atol=1e-5, rtol=1e-4)
        assert float((heatmaps.mean((2, 3)) + cam.offset - logits).detach().abs().max()) > 1e-2
        with cam.paused(), torch.no_grad():  # the expectation, by 4000 draws of the mask
            many = model(x.repeat(4000, 1, 1, 1)).reshape(4000, *expected.shape).mean(0)
    expected = expected.detach()
    assert float((many - expected).abs().max()) < 0.05 * float(expected.abs().max())
