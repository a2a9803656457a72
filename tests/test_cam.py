"""Tests for attn_consistency.cam.CAMHook.

The oracle throughout is the CAM invariant of a GAP-FC head (paper Eq. 1),
``heatmaps.mean((2, 3)) + classifier.bias == logits``, and the maps of separate forwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from attn_consistency import CAMHook

LABELS = 5


def hook_count(model: nn.Module) -> int:
    """Forward hooks and forward pre-hooks registered on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class TinyNet(nn.Module):
    """Two convolutions, global average pooling, one linear layer: the cheapest GAP-FC model."""

    def __init__(self, labels: int = LABELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


class FunctionalPoolNet(nn.Module):
    """Pools with ``Tensor.mean``: no pooling module, so auto-detection cannot work."""

    def __init__(self, labels: int = LABELS) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(12, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class PostPoolNet(nn.Module):
    """GAP, then ``post``, then a linear layer; features can be negative (no final ReLU)."""

    def __init__(self, post: nn.Module, labels: int = LABELS) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.post = post
        self.fc = nn.Linear(16, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.post(self.avgpool(self.body(x)).flatten(1)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cam_of(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, heatmaps) of one forward with a fresh hook, removed afterwards."""
    with CAMHook(model, **kwargs) as cam:
        logits = model(x)
        (heatmaps,) = cam.pop()
    return logits, heatmaps


def assert_cam_invariant(heatmaps: torch.Tensor, classifier: nn.Linear, logits: torch.Tensor) -> None:
    expected = heatmaps.mean((2, 3))
    if classifier.bias is not None:
        expected = expected + classifier.bias
    torch.testing.assert_close(expected, logits, atol=1e-5, rtol=1e-5)


def _timm(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=LABELS, **kwargs)


# (model factory, the classifier CAMHook must find). Inputs 64x64: every family has stride 32.
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=LABELS), lambda m: m.fc),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(weights=None, num_classes=LABELS), lambda m: m.fc),
    "wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(weights=None, num_classes=LABELS), lambda m: m.fc),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(weights=None, num_classes=LABELS), lambda m: m.fc),
    "efficientnet_b0": (
        lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=LABELS),
        lambda m: m.classifier[1],
    ),
    # DenseNet applies its last ReLU functionally (and in place) before pooling.
    "densenet121": (lambda: torchvision.models.densenet121(weights=None, num_classes=LABELS), lambda m: m.classifier),
    "timm_resnet10t": (lambda: _timm("resnet10t"), lambda m: m.get_classifier()),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_cam_invariant_on_known_architectures(name: str) -> None:
    factory, expected_classifier = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = images(2, 3, 64, 64)
    with CAMHook(model) as cam:
        logits = model(x)
        maps = cam.pop()
    assert cam.classifier is expected_classifier(model)
    assert len(maps) == 1
    heatmaps = maps[0]
    assert heatmaps.shape == (2, LABELS, 2, 2)
    assert heatmaps.dtype == torch.float32
    assert heatmaps.requires_grad
    assert_cam_invariant(heatmaps, cam.classifier, logits)


def test_densenet_heatmaps_backpropagate_to_the_backbone() -> None:
    # The hook applies ReLU to the features that DenseNet then ReLUs in place.
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=LABELS).eval()
    _, heatmaps = cam_of(model, images(1, 3, 32, 32))
    heatmaps.square().sum().backward()
    assert model.features.conv0.weight.grad is not None
    assert model.features.conv0.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None


def test_efficientnet_in_train_mode_is_accepted_despite_head_dropout() -> None:
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=LABELS).train()
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p > 0
    torch.manual_seed(1)
    logits, heatmaps = cam_of(model, images(2, 3, 64, 64))
    assert heatmaps.shape == (2, LABELS, 2, 2)
    assert model.training
    # Dropout really acted: the logits are not the dropout-free CAM logits.
    bias = model.classifier[1].bias
    assert not torch.allclose(heatmaps.mean((2, 3)) + bias, logits, atol=1e-3)


def test_timm_head_dropout_in_train_mode_is_accepted() -> None:
    torch.manual_seed(0)
    model = _timm("resnet10t", drop_rate=0.5).train()
    torch.manual_seed(1)
    logits, heatmaps = cam_of(model, images(2, 3, 64, 64))
    assert heatmaps.shape == (2, LABELS, 2, 2)
    assert not torch.allclose(heatmaps.mean((2, 3)) + model.fc.bias, logits, atol=1e-3)


NOT_GAP_FC = {
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=LABELS),
        r"MobileNetV3 is not GAP-FC.*'classifier\.3'",
    ),
}
# ConvNeXt (pooling, LayerNorm, Linear) has exact maps since the heads of issue 9: tests/test_cam_heads.py


@pytest.mark.parametrize("name", list(NOT_GAP_FC))
def test_head_that_is_not_gap_fc_raises_a_clear_error(name: str) -> None:
    factory, message = NOT_GAP_FC[name]
    torch.manual_seed(0)
    model = factory().eval()
    before = hook_count(model)
    with pytest.raises(ValueError, match=message), CAMHook(model):
        model(images(1, 3, 64, 64))
    assert hook_count(model) == before


def test_check_rejects_relu_between_pooling_and_classifier_in_eval_mode() -> None:
    # In eval mode no dropout acts, so pool -> ReLU -> Linear breaks the invariant and
    # must be reported, not mistaken for dropout (ReLU zeroes the negative pooled entries
    # and keeps the rest unscaled).
    torch.manual_seed(0)
    model = PostPoolNet(nn.ReLU()).eval()
    x = images(2, 3, 8, 8)
    pooled = model.avgpool(model.body(x)).flatten(1)
    assert (pooled < 0).any()
    with pytest.raises(ValueError, match="not GAP-FC"), CAMHook(model):
        model(x)


def test_check_accepts_identity_after_pooling() -> None:
    torch.manual_seed(0)
    model = PostPoolNet(nn.Identity()).eval()
    logits, heatmaps = cam_of(model, images(2, 3, 8, 8))
    assert_cam_invariant(heatmaps, model.fc, logits)


def test_functional_pooling_is_found_by_the_values_of_the_first_forward() -> None:
    # no pooling module: the first forward finds the module whose output Tensor.mean pools
    model = FunctionalPoolNet().eval()
    x = images(2, 3, 8, 8)
    logits, heatmaps = cam_of(model, x)
    assert heatmaps.shape == (2, LABELS, 8, 8)
    assert_cam_invariant(heatmaps, model.head, logits)
    torch.testing.assert_close(heatmaps, torch.einsum("lc,nchw->nlhw", model.head.weight, model.body(x)))


def test_auto_detection_failure_names_the_arguments() -> None:
    class NoClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).mean((2, 3))

    with pytest.raises(ValueError, match=r"NoClassifier \(it has no nn.Linear.*features=.*classifier="):
        CAMHook(NoClassifier())


@pytest.mark.parametrize(
    ("features", "classifier"),
    [
        (lambda m: m.body, lambda m: m.head),
        (lambda m: "body", lambda m: "head"),
        (lambda m: "body.3", lambda m: "head"),
        (lambda m: m.body[3], lambda m: m.head),
    ],
    ids=["modules", "names", "dotted-name", "nested-module"],
)
def test_user_named_features_and_classifier(features, classifier) -> None:
    torch.manual_seed(0)
    model = FunctionalPoolNet().eval()
    x = images(2, 3, 8, 8)
    logits, heatmaps = cam_of(model, x, features=features(model), classifier=classifier(model))
    assert heatmaps.shape == (2, LABELS, 8, 8)
    assert_cam_invariant(heatmaps, model.head, logits)
    expected = torch.einsum("lc,nchw->nlhw", model.head.weight, model.body(x))
    torch.testing.assert_close(heatmaps, expected, atol=1e-5, rtol=1e-5)


def test_features_name_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match=r"features='body\.9' names no submodule of FunctionalPoolNet"):
        CAMHook(FunctionalPoolNet(), features="body.9", classifier="head")


def test_classifier_name_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match=r"classifier='fc' names no submodule"):
        CAMHook(FunctionalPoolNet(), features="body", classifier="fc")


def test_module_outside_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="features must be a submodule"):
        CAMHook(FunctionalPoolNet(), features=nn.ReLU(), classifier="head")


def test_features_of_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="features must be an nn.Module or a dotted module name, got int"):
        CAMHook(FunctionalPoolNet(), features=3, classifier="head")


def test_classifier_that_is_not_linear_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="classifier must be an nn.Linear.*got Conv2d"):
        CAMHook(FunctionalPoolNet(), features="body", classifier="body.0")


def test_features_whose_output_is_not_4d_raise_at_forward() -> None:
    model = tiny_net()
    with CAMHook(model, features="flatten", classifier="fc") as cam:
        with pytest.raises(
            ValueError,
            match=r"'flatten' must be a 4-D map \(N, C, h, w\) or \(N, h, w, C\), or tokens \(N, T, C\), got \(2, 16\)",
        ):
            model(images(2, 3, 8, 8))
        assert len(cam) == 0


def test_features_with_wrong_channel_count_are_reported() -> None:
    model = tiny_net()
    message = r"TinyNet is not GAP-FC.*takes 16 features.*'relu1' has 8 channels"
    with CAMHook(model, features="relu1", classifier="fc"), pytest.raises(ValueError, match=message):
        model(images(2, 3, 8, 8))


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        CAMHook(lambda x: x)
    with pytest.raises(ValueError, match="max_stored must be a positive int"):
        CAMHook(tiny_net(), max_stored=0)


@pytest.mark.parametrize("detach_classifier", [True, False])
def test_gradient_routing(detach_classifier: bool) -> None:
    model = tiny_net()
    x = images(3, 3, 8, 8)
    with CAMHook(model, detach_classifier=detach_classifier) as cam:
        model(x)
        (heatmaps,) = cam.pop()
    heatmaps.sum().backward()
    features = model.features(x).detach()
    if detach_classifier:
        assert model.fc.weight.grad is None or not model.fc.weight.grad.any()
    else:
        # d/dW[l, c] of sum(W F) is the sum of feature channel c over samples and cells.
        expected = features.sum((0, 2, 3)).expand(LABELS, -1)
        torch.testing.assert_close(model.fc.weight.grad, expected, rtol=1e-5, atol=1e-5)
        assert model.fc.weight.grad.abs().sum() > 0
    assert model.fc.bias.grad is None
    for conv in (model.conv1, model.conv2):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_backbone_gradient_does_not_depend_on_detaching_the_classifier() -> None:
    x = images(3, 3, 8, 8)
    grads = []
    for detach in (True, False):
        model = tiny_net()
        _, heatmaps = cam_of(model, x, detach_classifier=detach)
        heatmaps.square().mean().backward()
        grads.append(model.conv1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_several_forwards_keep_their_heatmaps_apart_and_in_order() -> None:
    model = tiny_net().eval()
    x1, x2 = images(2, 3, 8, 8, seed=1), images(3, 3, 12, 12, seed=2)
    _, single1 = cam_of(model, x1)
    _, single2 = cam_of(model, x2)
    with CAMHook(model) as cam:
        model(x1)
        model(x2)
        assert len(cam) == 2
        maps = cam.pop()
        assert len(cam) == 0
        assert cam.pop() == []
    assert [m.shape for m in maps] == [(2, LABELS, 8, 8), (3, LABELS, 12, 12)]
    torch.testing.assert_close(maps[0], single1, rtol=0, atol=0)
    torch.testing.assert_close(maps[1], single2, rtol=0, atol=0)


def test_clear_forgets_recorded_heatmaps() -> None:
    model = tiny_net()
    with CAMHook(model) as cam:
        model(images(1, 3, 8, 8))
        cam.clear()
        assert len(cam) == 0 and cam.pop() == []


def test_many_steps_leave_hooks_and_storage_unchanged(one_thread) -> None:
    model = tiny_net()
    x = images(2, 3, 8, 8)
    before = hook_count(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CAMHook(model) as cam:
            assert hook_count(model) == before + 2  # the one-off detection and check, on the model
            model(x)
            cam.pop()
            steady = hook_count(model)
            assert steady == before + 1  # the check removed itself after the first forward
            for _ in range(1000):
                model.zero_grad(set_to_none=True)
                logits = model(x)
                (heatmaps,) = cam.pop()
                (logits.sum() + heatmaps.square().mean()).backward()
                assert len(cam) == 0
            assert hook_count(model) == steady
    assert hook_count(model) == before


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_is_untouched(training: bool) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=LABELS).train(training)
    cam_of(model, images(2, 3, 32, 32))
    assert all(m.training is training for m in model.modules())


def test_existing_gradients_are_untouched() -> None:
    model = tiny_net()
    sentinel = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = sentinel
    model.fc.weight.grad = torch.full_like(model.fc.weight, -3.0)
    with CAMHook(model) as cam:
        model(images(2, 3, 8, 8))
        cam.pop()
    assert model.conv1.weight.grad is sentinel
    assert torch.equal(sentinel, torch.full_like(sentinel, 7.0))
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, -3.0))
    assert model.conv2.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())


def test_remove_twice_removes_every_hook() -> None:
    model = tiny_net()
    before = hook_count(model)
    cam = CAMHook(model)
    assert hook_count(model) > before
    cam.remove()
    assert hook_count(model) == before
    cam.remove()
    assert hook_count(model) == before
    model(images(1, 3, 8, 8))
    assert len(cam) == 0


def test_remove_after_a_forward_drops_stored_maps() -> None:
    model = tiny_net()
    before = hook_count(model)
    cam = CAMHook(model)
    model(images(1, 3, 8, 8))
    assert len(cam) == 1
    cam.remove()
    assert len(cam) == 0
    assert hook_count(model) == before


def test_context_manager_removes_hooks_on_exception() -> None:
    model = tiny_net()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="inside the block"), CAMHook(model) as cam:
        model(images(1, 3, 8, 8))
        raise RuntimeError("inside the block")
    assert hook_count(model) == before
    assert len(cam) == 0


def test_paused_records_nothing() -> None:
    model = tiny_net()
    x = images(2, 3, 8, 8)
    with CAMHook(model) as cam:
        with cam.paused():
            model(x)
        assert len(cam) == 0
        with pytest.raises(KeyError), cam.paused():
            raise KeyError("resumes after an exception")
        model(x)
        assert len(cam) == 1


def test_max_stored_drops_the_oldest_with_a_warning() -> None:
    model = tiny_net().eval()
    inputs = [images(1, 3, 8, 8, seed=seed) for seed in range(5)]
    expected = [cam_of(model, x)[1] for x in inputs]
    with CAMHook(model, max_stored=3) as cam:
        for x in inputs[:3]:
            model(x)
        with pytest.warns(UserWarning, match="3 forwards were recorded without pop"):
            model(inputs[3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every dropped forward
            model(inputs[4])
        maps = cam.pop()
    assert len(maps) == 3
    for got, want in zip(maps, expected[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["compile", "data_parallel"])
def test_wrapped_model_is_looked_through(wrapper: str) -> None:
    model = tiny_net()
    x = images(2, 3, 8, 8)
    expected_logits, expected = cam_of(model, x)
    wrapped = torch.compile(model, backend="aot_eager") if wrapper == "compile" else nn.DataParallel(model)
    with CAMHook(wrapped) as cam:
        assert cam.classifier is model.fc
        # Two forwards: the second runs after the one-off check has removed its hook.
        for _ in range(2):
            logits = wrapped(x)
            (heatmaps,) = cam.pop()
            assert hook_count(model) == 1  # checked, even in a compiled forward
            torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(heatmaps, expected, rtol=1e-6, atol=1e-6)
            assert heatmaps.requires_grad
    assert hook_count(model) == 0


def test_repr_names_the_head() -> None:
    with CAMHook(tiny_net(), detach_classifier=False) as cam:
        assert repr(cam) == "CAMHook(TinyNet, features='avgpool', classifier='fc', detach_classifier=False)"
