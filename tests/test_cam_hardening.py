"""CAMHook against hostile models and arguments (issue 13).

Oracles: the CAM invariant ``heatmaps.mean((2, 3)) + bias == logits``, the modules a
model's forward really uses, the hooks left on every module, and error messages.
"""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from attn_consistency import CAMHook

LABELS = 5


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_cam_invariant(
    heatmaps: torch.Tensor, classifier: nn.Linear, logits: torch.Tensor, atol: float = 1e-5
) -> None:
    torch.testing.assert_close(heatmaps.float().mean((2, 3)) + classifier.bias, logits.float(), atol=atol, rtol=atol)


class Body(nn.Sequential):
    def __init__(self, channels: int = 16, norm: bool = False) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )


class AvgMaxPool(nn.Module):
    """``(avg + max) / 2`` over the cells: timm's 'avgmax' pooling, not GAP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))


class PoolNet(nn.Module):
    """Body, a pooling, flatten, a linear layer; ``norm`` adds BatchNorm (a nan then spreads to the batch)."""

    def __init__(self, pool: nn.Module | None = None, norm: bool = False, weight_scale: float = 1.0) -> None:
        super().__init__()
        self.body = Body(norm=norm)
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, LABELS)
        with torch.no_grad():
            self.fc.weight.mul_(weight_scale)
            self.fc.bias.mul_(weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1)))))
        return x * scale[:, :, None, None]


class SEAfterHead(nn.Module):
    """The head is registered first, the SE block (pooling + linear layers) after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, LABELS)
        self.se = SqueezeExcitation(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.se(self.body(x))), 1))


class UnusedLastLinear(PoolNet):
    """The last registered linear layer (and pooling) is never used by the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.spare_pool = nn.AdaptiveAvgPool2d(1)
        self.spare = nn.Linear(16, 3)


class ReturnsTuple(PoolNet):
    def forward(self, x: torch.Tensor):
        features = self.body(x)
        return self.fc(self.pool(features).flatten(1)), features


class ReturnsDict(PoolNet):
    def forward(self, x: torch.Tensor):
        return {"logits": super().forward(x)}


def model_of(cls: type[nn.Module], *args, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


# --- 1. the GAP-FC check cannot be fooled by small logits or bf16 ------------------------


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_timm_avgmax_pooling_is_refused(bf16: bool) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, global_pool="avgmax", num_classes=LABELS)
    with torch.no_grad():  # logits of ~0.1, as in the report: a tolerance scaled by them accepted the maps
        model.fc.weight.mul_(0.05)
    before = hook_count(model)
    message = r"ResNet is not GAP-FC between 'global_pool' and 'fc'.*not the average of the features over their 2x2"
    with pytest.raises(ValueError, match=message):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), CAMHook(model):
            model(images(2, 3, 64, 64))
    assert hook_count(model) == before


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_small_logits_do_not_loosen_the_check(bf16: bool) -> None:
    # Logits of ~1e-3: a tolerance scaled by the logits (3e-2 * (1 + max|logits|)) took these
    # avg+max maps, whose mean is off by far more than the logits themselves.
    model = model_of(PoolNet, AvgMaxPool(), weight_scale=1e-3).eval()
    x = images(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        wrong = F.conv2d(model.body(x), model.fc.weight[:, :, None, None]).mean((2, 3)) + model.fc.bias
    assert float(logits.abs().max()) < 0.01
    assert float((wrong - logits).abs().max()) > 0.1 * float(logits.abs().max())  # the maps would be wrong
    cam = CAMHook(model, features="body", classifier="fc")
    with pytest.raises(ValueError, match=r"PoolNet is not GAP-FC between 'body' and 'fc'.*not the average"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
    assert hook_count(model) == 0 and len(cam) == 0


class SequentialNet(nn.Sequential):
    """A custom GAP-FC model written as a Sequential, with BatchNorm and dropout before the classifier."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, stride=4, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=8, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(32, LABELS),
        )


def _timm_resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", pretrained=False, num_classes=LABELS)


GENUINE = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=LABELS).eval(), lambda m: m.fc),
    "efficientnet_b0-train": (
        lambda: torchvision.models.efficientnet_b0(num_classes=LABELS).train(),
        lambda m: m.classifier[1],
    ),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=LABELS).eval(), lambda m: m.classifier),
    "timm_resnet18": (lambda: _timm_resnet18().eval(), lambda m: m.fc),
    "sequential-train": (lambda: SequentialNet().train(), lambda m: m[-1]),
}


@pytest.fixture(scope="module")
def genuine_models() -> dict[str, nn.Module]:
    return {}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(GENUINE))
def test_genuine_gap_fc_models_pass_the_check(name: str, bf16: bool, genuine_models: dict) -> None:
    factory, classifier_of = GENUINE[name]
    if name not in genuine_models:
        torch.manual_seed(0)
        genuine_models[name] = factory()
    model = genuine_models[name]
    training = [m.training for m in model.modules()]
    before = hook_count(model)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), CAMHook(model) as cam:
        logits = model(images(2, 3, 64, 64))
        (heatmaps,) = cam.pop()
        assert hook_count(model) == before + 1  # checked: only the recording hook is left
    assert cam.classifier is classifier_of(model)
    assert heatmaps.shape == (2, LABELS, 2, 2)
    assert heatmaps.dtype == (torch.bfloat16 if bf16 else torch.float32)
    if not model.training:  # dropout in train mode changes the logits, not the maps
        assert_cam_invariant(heatmaps, cam.classifier, logits, atol=5e-2 if bf16 else 1e-5)
    assert [m.training for m in model.modules()] == training
    assert hook_count(model) == before


class NormalizedLinear(nn.Linear):
    """A Linear subclass whose forward normalises its weight rows: not ``x @ W.T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1), self.bias)


class DoubledPool(PoolNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(2 * self.pool(self.body(x)).flatten(1))


def test_classifier_that_is_not_its_linear_map_is_refused() -> None:
    model = model_of(PoolNet)
    model.fc = NormalizedLinear(16, LABELS)
    message = r"PoolNet is not GAP-FC between 'pool' and 'fc': the output of 'fc' is not input @ weight.T \+ bias"
    with pytest.raises(ValueError, match=message), CAMHook(model):
        model(images(2, 3, 8, 8))
    model = model_of(PoolNet)
    model.fc.register_forward_hook(lambda module, args, output: 2 * output)  # another library's hook
    with pytest.raises(ValueError, match=message), CAMHook(model):
        model(images(2, 3, 8, 8))


def test_scaled_pooling_is_not_dropout() -> None:
    model = model_of(DoubledPool)
    message = r"DoubledPool is not GAP-FC: the input of its classifier 'fc' is not the output of an average pooling"
    with pytest.raises(ValueError, match=message):
        with CAMHook(model):
            model(images(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"off by up to [0-9.]+, for features of mean magnitude"):
        with CAMHook(model, features="pool", classifier="fc"):
            model(images(2, 3, 8, 8))


def test_float64_model_is_checked_in_float64() -> None:
    model = model_of(PoolNet).double()
    with CAMHook(model) as cam:
        logits = model(images(2, 3, 8, 8).double())
        (heatmaps,) = cam.pop()
        assert hook_count(model) == 1
    assert heatmaps.dtype == torch.float64
    torch.testing.assert_close(heatmaps.mean((2, 3)) + model.fc.bias, logits, rtol=1e-12, atol=1e-12)


def test_the_check_runs_under_torch_compile() -> None:
    # The check used to be skipped inside compiled graphs, and so never ran for a compiled model.
    model = model_of(PoolNet, AvgMaxPool())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    cam = CAMHook(compiled, features="body", classifier="fc")
    with pytest.raises(ValueError, match=r"PoolNet is not GAP-FC between 'body' and 'fc'"):
        compiled(images(2, 3, 8, 8))
    assert hook_count(model) == 0 and len(cam) == 0


# --- 2. detection follows the forward, not the registration order ---------------------------


def test_squeeze_excitation_registered_after_the_head_is_not_the_head() -> None:
    model = model_of(SEAfterHead).eval()
    x = images(2, 3, 8, 8)
    with CAMHook(model) as cam:
        logits = model(x)
        (heatmaps,) = cam.pop()
        assert cam.features is model.avgpool and cam.classifier is model.fc
        assert repr(cam) == "CAMHook(SEAfterHead, features='avgpool', classifier='fc', detach_classifier=True)"
        model(x)
        (again,) = cam.pop()
    assert heatmaps.shape == (2, LABELS, 4, 4) == again.shape
    assert_cam_invariant(heatmaps, model.fc, logits)
    expected = torch.einsum("lc,nchw->nlhw", model.fc.weight, model.se(model.body(x)))
    torch.testing.assert_close(heatmaps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, heatmaps, rtol=0, atol=0)


def test_modules_the_forward_does_not_use_are_not_the_head() -> None:
    model = model_of(UnusedLastLinear).eval()
    x = images(2, 3, 8, 8)
    with CAMHook(model) as cam:
        logits = model(x)
        (heatmaps,) = cam.pop()
    assert cam.features is model.pool and cam.classifier is model.fc
    assert_cam_invariant(heatmaps, model.fc, logits)


def test_a_classifier_replaced_after_attaching_is_found() -> None:
    model = model_of(PoolNet).eval()
    with CAMHook(model) as cam:
        model.fc = nn.Linear(16, 3)  # a new head for another label set, before the first forward
        logits = model(images(2, 3, 8, 8))
        (heatmaps,) = cam.pop()
    assert cam.classifier is model.fc and heatmaps.shape == (2, 3, 4, 4)
    assert_cam_invariant(heatmaps, model.fc, logits)


@pytest.mark.parametrize("attach", ["before", "after"])
def test_squeeze_excitation_is_not_the_head_under_torch_compile(attach: str) -> None:
    model = model_of(SEAfterHead).eval()
    x = images(2, 3, 8, 8)
    expected_logits = model(x)
    torch._dynamo.reset()
    if attach == "before":
        cam = CAMHook(model)
        compiled = torch.compile(model, backend="aot_eager")
    else:
        compiled = torch.compile(model, backend="aot_eager")
        cam = CAMHook(compiled)
    for _ in range(2):  # the first forward detects and checks, the second only records
        logits = compiled(x)
        (heatmaps,) = cam.pop()
        assert heatmaps.shape == (2, LABELS, 4, 4)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
        assert_cam_invariant(heatmaps, model.fc, logits)
    assert cam.classifier is model.fc
    # A CAMHook dropped without remove() leaves no hook, even after compiled forwards.
    del cam
    gc.collect()
    assert hook_count(model) == 0


@pytest.mark.parametrize("cls", [ReturnsTuple, ReturnsDict])
def test_detection_needs_a_tensor_output(cls: type[nn.Module]) -> None:
    model = model_of(cls)
    kind = "tuple" if cls is ReturnsTuple else "dict"
    message = (
        rf"{cls.__name__} returned a {kind}: finding its classifier needs the model to return its logits as a "
        r"tensor; pass classifier="
    )
    with pytest.raises(TypeError, match=message), CAMHook(model):
        model(images(1, 3, 8, 8))
    assert hook_count(model) == 0


@pytest.mark.parametrize("cls", [ReturnsTuple, ReturnsDict])
def test_named_head_works_with_a_tuple_or_dict_output(cls: type[nn.Module]) -> None:
    model = model_of(cls).eval()
    with CAMHook(model, features="pool", classifier="fc") as cam:
        output = model(images(2, 3, 8, 8))
        (heatmaps,) = cam.pop()
        assert hook_count(model) == 1  # checked
    logits = output[0] if cls is ReturnsTuple else output["logits"]
    assert_cam_invariant(heatmaps, model.fc, logits)


class FlatLogits(PoolNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten()


class ScaledLogits(PoolNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_label_count_must_match_the_logits() -> None:
    model = model_of(FlatLogits)
    message = r"FlatLogits returns logits of shape \(10,\), but its classifier 'fc' has 5 outputs"
    with pytest.raises(ValueError, match=message), CAMHook(model):
        model(images(2, 3, 8, 8))
    with pytest.raises(ValueError, match=message), CAMHook(model, features="pool", classifier="fc", check=False):
        model(images(2, 3, 8, 8))
    assert hook_count(model) == 0


def test_logits_that_no_linear_layer_computes_are_refused() -> None:
    model = model_of(ScaledLogits)
    with pytest.raises(
        ValueError, match=r"could not find the classifier of ScaledLogits: no nn.Linear \(or 1x1 nn.Conv2d\) computes"
    ):
        with CAMHook(model):
            model(images(2, 3, 8, 8))
    message = r"ScaledLogits is not GAP-FC between 'pool' and 'fc': it does not return the output of 'fc'"
    with pytest.raises(ValueError, match=message), CAMHook(model, features="pool", classifier="fc"):
        model(images(2, 3, 8, 8))
    assert hook_count(model) == 0


class SharedPool(nn.Module):
    """One pooling module serves the SE block and the head: it runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Linear(16, 16)
        self.fc = nn.Linear(16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        f = f * torch.sigmoid(self.gate(self.pool(f).flatten(1)))[:, :, None, None]
        return self.fc(self.pool(f).flatten(1))


def test_features_that_run_twice_per_forward_are_refused() -> None:
    model = model_of(SharedPool)
    x = images(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"the features 'pool' run 2 times in one forward of SharedPool"):
        with CAMHook(model):
            model(x)
    with pytest.raises(ValueError, match=r"'pool' run 2 times"), CAMHook(model, features="pool", classifier="fc"):
        model(x)
    assert hook_count(model) == 0


# --- 3. a failure leaves no hook behind ------------------------------------------------------


FAILURES = {
    "detection": (
        lambda: PoolNet(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Tanh())),
        {},
        r"PoolNet is not GAP-FC: the input of its classifier 'fc' is not the output of an average pooling",
    ),
    "check": (
        lambda: PoolNet(AvgMaxPool()),
        {"features": "body", "classifier": "fc"},
        r"PoolNet is not GAP-FC between 'body' and 'fc': the classifier's input is not the average",
    ),
    "channels": (
        lambda: PoolNet(),
        {"features": "body.2", "classifier": "fc"},
        r"the classifier 'fc' takes 16 features but the pooled map 'body\.2' has 8 channels",
    ),
    "not-4d": (
        lambda: PoolNet(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
        {"features": "pool", "classifier": "fc"},
        r"the features of 'pool' must be a 4-D map \(N, C, h, w\) or \(N, h, w, C\), or tokens \(N, T, C\), got \(2, 16\)",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_after_a_failure_the_model_and_a_new_hook_work(case: str) -> None:
    factory, kwargs, message = FAILURES[case]
    torch.manual_seed(0)
    model = factory().eval()
    x = images(2, 3, 8, 8)
    expected = model(x)
    cam = CAMHook(model, **kwargs)
    with pytest.raises(ValueError, match=message):
        model(x)
    assert hook_count(model) == 0 and len(cam) == 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # plain inference
    # A new hook on modules that are right for this model (its head need not be GAP-FC with check=False).
    with CAMHook(model, features="body", classifier="fc", check=case not in ("detection", "check")) as cam:
        for _ in range(2):
            model(x)
            (heatmaps,) = cam.pop()
            assert heatmaps.shape == (2, LABELS, 4, 4)
    assert hook_count(model) == 0


# --- 4. non-finite values are not blamed on the architecture ---------------------------------


def nan_pixel(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize("named", [False, True], ids=["detected", "named"])
def test_nan_first_batch_postpones_the_check(named: bool) -> None:
    # BatchNorm in train mode spreads one nan pixel to every sample and every cell.
    model = model_of(PoolNet, norm=True).train()
    kwargs = {"features": "pool", "classifier": "fc"} if named else {}
    x = images(2, 3, 8, 8)
    with CAMHook(model, **kwargs) as cam:
        logits = model(nan_pixel(x))
        (heatmaps,) = cam.pop()
        assert logits.isnan().all() and heatmaps.isnan().all()
        assert cam.features is model.pool and cam.classifier is model.fc
        assert hook_count(model) == 3  # recording, and the check still waiting on the model
        logits = model(x)
        (heatmaps,) = cam.pop()
        assert hook_count(model) == 1  # checked on the finite forward
    assert_cam_invariant(heatmaps, model.fc, logits)


def test_a_bad_head_is_still_refused_after_a_nan_batch() -> None:
    model = model_of(PoolNet, AvgMaxPool(), norm=True).train()
    x = images(2, 3, 8, 8)
    with CAMHook(model, features="body", classifier="fc") as cam:
        model(nan_pixel(x))
        assert len(cam) == 1
        with pytest.raises(ValueError, match=r"PoolNet is not GAP-FC between 'body' and 'fc'"):
            model(x)
    assert hook_count(model) == 0


class CopiedPool(PoolNet):
    """The pooled vector reaches the classifier as a copy: only values tie the two together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1).clone())


def test_detection_on_values_that_tell_nothing_waits_for_the_next_forward() -> None:
    model = model_of(CopiedPool, norm=True).train()
    x = images(2, 3, 8, 8)
    with CAMHook(model) as cam:
        message = r"could not find the head of CopiedPool from this forward: its values are non-finite"
        with pytest.raises(ValueError, match=message):
            model(nan_pixel(x))
        with pytest.raises(ValueError, match=r"CopiedPool from this forward: the batch is empty \(N=0\)"):
            model(x[:0])
        assert len(cam) == 0
        logits = model(x)
        (heatmaps,) = cam.pop()
        assert cam.features is model.pool and hook_count(model) == 1
    assert_cam_invariant(heatmaps, model.fc, logits)


def test_empty_first_batch_records_empty_maps_and_checks_later() -> None:
    model = model_of(PoolNet, AvgMaxPool()).eval()
    x = images(2, 3, 8, 8)
    with CAMHook(model, features="body", classifier="fc") as cam:
        model(x[:0])
        (heatmaps,) = cam.pop()
        assert heatmaps.shape == (0, LABELS, 4, 4)
        with pytest.raises(ValueError, match="not GAP-FC"):
            model(x)


# --- 5. forgotten hooks do not keep recording ------------------------------------------------


def test_a_dropped_hook_removes_its_hooks() -> None:
    model = model_of(PoolNet)
    x = images(1, 3, 8, 8)
    cam = CAMHook(model)
    assert hook_count(model) == 2
    del cam
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    cam = CAMHook(model)
    model(x)
    assert len(cam) == 1 and hook_count(model) == 1
    del cam
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_new_hook_every_step_warns_and_does_not_leak() -> None:
    model = model_of(PoolNet)
    x = images(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = None
        for _ in range(8):  # more than max_stored: hooks still recording would overflow and warn
            cam = CAMHook(model, max_stored=3)
            model(x)
            (heatmaps,) = cam.pop()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 7 and all("already has a live CAMHook on 'pool'" in m for m in messages)
    assert "Reuse one CAMHook across steps, or call remove()" in messages[0]
    gc.collect()
    assert hook_count(model) == 1  # only the last hook's recording hook
    cam.remove()
    assert hook_count(model) == 0


def test_copies_of_the_model_do_not_record_into_the_hook() -> None:
    model = model_of(PoolNet)
    x = images(2, 3, 8, 8)
    with CAMHook(model) as cam:
        teacher = copy.deepcopy(model)  # an EMA teacher, copied after the hook was attached
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        teacher(x)
        loaded(x)
        assert len(cam) == 0
        logits = model(x)
        (heatmaps,) = cam.pop()
    assert_cam_invariant(heatmaps, model.fc, logits)
    # the copies' inert hooks took themselves off at their first call: none is left on them
    for copy_ in (teacher, loaded):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in copy_.modules())


def test_second_live_hook_warns_until_the_first_is_removed() -> None:
    model = model_of(PoolNet)
    first = CAMHook(model)
    with pytest.warns(UserWarning, match=r"PoolNet already has a live CAMHook on 'pool'"):
        second = CAMHook(model)
    first.remove()
    second.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CAMHook(model), CAMHook(model, features="body", classifier="fc"):  # other features: no warning
            pass


# --- 6. arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_stored": True}, TypeError, "max_stored must be a positive int, got bool True"),
        ({"max_stored": 2.0}, TypeError, "max_stored must be a positive int, got float 2.0"),
        ({"max_stored": -1}, ValueError, "max_stored must be a positive int, got -1"),
        ({"activation": 3}, TypeError, "activation must be a function of the features or None, got int"),
        ({"detach_classifier": 1}, TypeError, "detach_classifier must be a bool, got int 1"),
        ({"check": "yes"}, TypeError, "check must be a bool, got str 'yes'"),
        ({"features": "fc", "classifier": "fc"}, TypeError, "features must be the pooling module.*got an nn.Linear"),
        ({"features": "", "classifier": "fc"}, ValueError, "features must be a submodule of PoolNet, not the model"),
        ({"features": "pool", "classifier": ""}, ValueError, "classifier must be a submodule of PoolNet, not the"),
        ({"features": "pool", "classifier": "fc.weight"}, ValueError, r"classifier='fc\.weight' names no submodule"),
        ({"features": nn.ReLU()}, ValueError, "features must be a submodule"),
        ({"classifier": "body.0"}, TypeError, "classifier must be an nn.Linear.*got Conv2d"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, error: type[Exception], message: str) -> None:
    model = model_of(PoolNet)
    with pytest.raises(error, match=message):
        CAMHook(model, **kwargs)
    assert hook_count(model) == 0


def test_torchscript_model_is_a_type_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model_of(PoolNet))
    with pytest.raises(TypeError, match="model must be an eager nn.Module, got a TorchScript module"):
        CAMHook(scripted)


class Headed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, LABELS))
        self.aux = nn.Linear(16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        self.aux(features.mean((2, 3)))  # runs, but the model does not return it
        return self.head(features)


class AttentionPool(nn.Module):
    """Attention pooling (as CLIP's): its name says pool, and it holds the last linear layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, 1)
        self.proj = nn.Linear(channels, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        weights = torch.softmax(self.query(tokens), dim=1)
        return self.proj((weights * tokens).sum(1))


class AttentionPoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.attnpool = AttentionPool(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.body(x))


def test_a_guess_that_holds_the_classifier_is_no_error_until_the_forward_decides() -> None:
    model = model_of(AttentionPoolNet)
    cam = CAMHook(model)  # the guess (attnpool, attnpool.proj) is only a guess
    message = r"AttentionPoolNet is not GAP-FC: the input of its classifier 'attnpool\.proj' is not the output of an"
    with pytest.raises(ValueError, match=message):
        model(images(1, 3, 8, 8))
    assert hook_count(model) == 0 and len(cam) == 0


def test_features_holding_the_classifier_are_refused() -> None:
    with pytest.raises(ValueError, match="features must run before the classifier, got a Sequential that holds it"):
        CAMHook(model_of(Headed), features="head", classifier="head.2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"features": "head.0", "classifier": "aux"},
            r"Headed is not GAP-FC between 'head\.0' and 'aux'.*does not return the output of 'aux'",
        ),
        ({"features": "body", "classifier": "aux"}, r"does not return the output of 'aux'"),
        ({"features": "head.0"}, None),
        ({"classifier": "head.2"}, None),
    ],
)
def test_named_modules_are_checked_against_the_forward(kwargs: dict, message: str | None) -> None:
    model = model_of(Headed).eval()
    x = images(2, 3, 8, 8)
    if message is not None:
        with pytest.raises(ValueError, match=message), CAMHook(model, **kwargs):
            model(x)
        assert hook_count(model) == 0
        return
    with CAMHook(model, **kwargs) as cam:
        logits = model(x)
        (heatmaps,) = cam.pop()
    assert cam.features is model.head[0] and cam.classifier is model.head[2]
    assert_cam_invariant(heatmaps, model.head[2], logits)


class Spare(PoolNet):
    def __init__(self) -> None:
        super().__init__()
        self.spare_pool = nn.AdaptiveAvgPool2d(1)
        self.spare = nn.Linear(16, LABELS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": "spare_pool", "classifier": "fc"}, "the features 'spare_pool' did not run in the forward of"),
        ({"features": "pool", "classifier": "spare"}, "the classifier 'spare' did not run in the forward of Spare"),
        ({"features": "spare_pool"}, "the features 'spare_pool' did not run in the forward of Spare"),
        ({"classifier": "spare"}, "the classifier 'spare' did not run in the forward of Spare"),
    ],
)
def test_named_modules_that_do_not_run_are_reported(kwargs: dict, message: str) -> None:
    model = model_of(Spare)
    with pytest.raises(ValueError, match=message), CAMHook(model, **kwargs):
        model(images(1, 3, 8, 8))
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    ("activation", "error", "message"),
    [
        (
            lambda f: f.mean(1, keepdim=True),
            ValueError,
            r"activation must return a tensor of the features' shape \(2, 16, 4, 4\).*got \(2, 1, 4, 4\)",
        ),
        (lambda f: None, TypeError, "activation must return a tensor.*got NoneType"),
    ],
)
def test_activation_must_keep_the_features_shape(activation, error: type[Exception], message: str) -> None:
    model = model_of(PoolNet)
    with pytest.raises(error, match=message), CAMHook(model, activation=activation):
        model(images(2, 3, 8, 8))
    assert hook_count(model) == 0


class ReturnsNothing(PoolNet):
    def forward(self, x: torch.Tensor) -> None:
        super().forward(x)


def test_model_output_that_holds_no_tensor_is_reported() -> None:
    model = model_of(ReturnsNothing)
    with pytest.raises(TypeError, match="ReturnsNothing returned a NoneType; CAMHook needs its logits as a tensor"):
        with CAMHook(model, features="pool", classifier="fc"):
            model(images(1, 3, 8, 8))
    assert hook_count(model) == 0


def test_lazy_classifier_must_be_initialized_first() -> None:
    model = model_of(PoolNet)
    model.fc = nn.LazyLinear(LABELS)
    with pytest.raises(ValueError, match="the classifier LazyLinear is not initialized yet; run one forward"):
        CAMHook(model, features="pool", classifier="fc")


def test_failing_activation_removes_the_hooks() -> None:
    model = model_of(PoolNet)
    cam = CAMHook(model, activation=lambda features: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(images(1, 3, 8, 8))
    assert hook_count(model) == 0 and len(cam) == 0
    model(images(1, 3, 8, 8))


def test_timm_parts_called_one_by_one_record_with_a_warning_then_the_model_call_checks() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=LABELS).eval()
    x = images(1, 3, 64, 64)
    with CAMHook(model) as cam:
        with pytest.warns(UserWarning, match=r"'global_pool' ran outside a call of ResNet.*unchecked"):
            logits = model.forward_head(model.forward_features(x))
        (heatmaps,) = cam.pop()
        assert_cam_invariant(heatmaps, model.fc, logits)
        assert hook_count(model) == 3  # the check waits for a call of the model itself
        model(x)
        assert len(cam.pop()) == 1 and hook_count(model) == 1


def test_names_may_be_relative_to_a_wrapper() -> None:
    model = model_of(PoolNet).eval()
    x = images(2, 3, 8, 8)
    wrapped = nn.DataParallel(model)
    with CAMHook(wrapped, features="module.pool", classifier="module.fc") as cam:
        logits = wrapped(x)
        (heatmaps,) = cam.pop()
    assert cam.features is model.pool
    assert_cam_invariant(heatmaps, model.fc, logits)


def test_paused_first_forward_still_detects_and_checks() -> None:
    model = model_of(SEAfterHead)
    with CAMHook(model) as cam:
        with cam.paused(), torch.inference_mode():
            model(images(2, 3, 8, 8))
        assert len(cam) == 0
        assert cam.classifier is model.fc and hook_count(model) == 1
