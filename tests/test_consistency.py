import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from attn_consistency import AttentionConsistencyLoss, CAMHook, Flip, attention_consistency, get_transform
from attn_consistency.metrics import attention_inconsistency


class TinyGapFc(nn.Module):
    """Stride-4 conv net with a GAP-FC head: 28x28 inputs give 7x7 maps, 24x24 give 6x6."""

    def __init__(self, labels: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, labels)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


@pytest.fixture
def model() -> TinyGapFc:
    torch.manual_seed(0)
    return TinyGapFc()


def reference_four_view_step(model, images, small_images):
    """The authors' flip + scale step, modelled on the authors' main.py, without the library."""
    features = {}
    handle = model.pool.register_forward_pre_hook(lambda m, args: features.__setitem__("f", args[0]))
    weight = model.fc.weight.detach()

    def forward(x):
        logits = model(x)
        heatmaps = (features["f"].unsqueeze(1) * weight[None, :, :, None, None]).sum(2)
        return logits, heatmaps

    large = torch.cat([images, images.flip(-1)])
    small = torch.cat([small_images, small_images.flip(-1)])
    logits_l, hm_l = forward(large)
    logits_s, hm_s = forward(small)
    handle.remove()
    n = images.shape[0]
    flip_l = F.mse_loss(hm_l[:n], hm_l[n:].flip(-1))
    flip_s = F.mse_loss(hm_s[:n], hm_s[n:].flip(-1))
    lcm = math.lcm(hm_l.shape[-1], hm_s.shape[-1])
    scale = F.mse_loss(F.interpolate(hm_l, size=lcm), F.interpolate(hm_s, size=lcm))
    return torch.cat([logits_l, logits_s]), {"flip_l": flip_l, "flip_s": flip_s, "scale": scale}


def test_product_mode_reproduces_the_authors_four_view_step(model):
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    scale = get_transform("scale", size=24)
    small = scale.apply_image(images, scale.sample())
    ref_logits, ref = reference_four_view_step(model, images, small)

    with CAMHook(model) as cam:
        out = AttentionConsistencyLoss().views(model, cam, images, ["flip", scale], mode="product")
    assert out.views == [(), ("flip",), ("scale",), ("flip", "scale")]
    assert set(out.terms) == {"flip@28", "flip@24", "scale"}
    torch.testing.assert_close(out.terms["flip@28"], ref["flip_l"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["flip@24"], ref["flip_s"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["scale"], ref["scale"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, sum(ref.values()), rtol=1e-6, atol=1e-7)
    # logits in the reference's concatenation order: (orig, flip) at 28, then at 24
    ordered = torch.cat([out.logits[0], out.logits[1], out.logits[2], out.logits[3]])
    torch.testing.assert_close(ordered, ref_logits, rtol=1e-6, atol=1e-6)


def test_resized_images_made_from_the_originals_feed_the_scaled_views(model):
    # the authors' loader resizes each crop to 224 and to 192 directly; here both sizes come
    # from a larger "crop", so the 24 px batch is not a resize of the 28 px one
    crops = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    images = F.interpolate(crops, size=(28, 28), mode="bilinear", antialias=True)
    small = F.interpolate(crops, size=(24, 24), mode="bilinear", antialias=True)
    assert not torch.allclose(small, get_transform("scale", size=24).apply_image(images), atol=1e-3)
    ref_logits, ref = reference_four_view_step(model, images, small)

    with CAMHook(model) as cam:
        out = AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale"], mode="product", resized=small)
    torch.testing.assert_close(out.terms["flip@24"], ref["flip_s"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["scale"], ref["scale"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, sum(ref.values()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(out.logits), ref_logits, rtol=1e-6, atol=1e-6)


def test_resized_images_are_checked(model):
    images = torch.randn(2, 3, 28, 28)
    criterion = AttentionConsistencyLoss()
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match="no scale transform uses them"):
            criterion.views(model, cam, images, ["flip"], resized=torch.randn(2, 3, 24, 24))
        with pytest.raises(ValueError, match=r"resized\[0\] must hold the same 2 images with 3 channels"):
            criterion.views(model, cam, images, ["scale"], resized=torch.randn(3, 3, 24, 24))
        with pytest.raises(
            ValueError, match=r"resized images of size \[\(20, 20\)\] match no scaled view \(those are \[\(24, 24\)\]\)"
        ):
            criterion.views(model, cam, images, ["scale"], resized=[torch.randn(2, 3, 20, 20)])
        with pytest.raises(
            ValueError,
            match=r"resized\[0\] must be on the device and of the dtype of images \(cpu, torch.float32\), got cpu, torch.float64",
        ):
            criterion.views(model, cam, images, ["scale"], resized=torch.randn(2, 3, 24, 24, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"resized holds two batches of size \(24, 24\)"):
            criterion.views(model, cam, images, ["scale"], resized=[torch.randn(2, 3, 24, 24)] * 2)
        with pytest.raises(ValueError, match=r"resized\[0\] must be 4-D"):
            criterion.views(model, cam, images, ["scale"], resized=torch.randn(3, 24, 24))


def test_weights_scale_each_transform_as_the_coco_setting(model):
    images = torch.randn(2, 3, 28, 28)
    with CAMHook(model) as cam:
        plain = AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale"], mode="product")
        weighted = AttentionConsistencyLoss(weights={"flip": 0.6, "scale": 0.8}).views(
            model, cam, images, ["flip", "scale"], mode="product"
        )
    expected = 0.6 * (plain.terms["flip@28"] + plain.terms["flip@24"]) + 0.8 * plain.terms["scale"]
    torch.testing.assert_close(weighted.loss, expected)


def test_zero_weight_makes_the_views_but_computes_no_term(model):
    images = torch.randn(2, 3, 28, 28)
    with CAMHook(model) as cam:
        out = AttentionConsistencyLoss(weights={"flip": 0.0}).views(
            model, cam, images, ["flip", "scale"], mode="product"
        )
        plain = AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale"], mode="product")
    assert out.views == [(), ("flip",), ("scale",), ("flip", "scale")] and len(out.logits) == 4
    assert set(out.terms) == {"scale"}
    torch.testing.assert_close(out.loss, plain.terms["scale"])
    with CAMHook(model) as cam:
        none = AttentionConsistencyLoss(weights={"flip": 0.0, "scale": 0.0}).views(
            model, cam, images, ["flip", "scale"], mode="product"
        )
    assert none.terms == {} and none.loss.item() == 0.0 and none.loss.grad_fn is None


def test_attention_inconsistency_is_eq5_over_the_whole_set(model):
    model.eval()
    batches = [torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    scale = get_transform("scale", size=24)
    with CAMHook(model) as cam:
        both = attention_inconsistency(model, cam, batches, ["flip", scale])
        flip_only = attention_inconsistency(model, cam, iter(batches), "flip")

        def maps_of(views):
            with torch.no_grad():
                model(torch.cat(views))
            (maps,) = cam.pop()
            return maps

        whole = maps_of(batches)
        whole_flipped = maps_of([x.flip(-1) for x in batches])
        whole_small = maps_of([scale.apply_image(x) for x in batches])
    # oracle: every map of the set in one MSE, the 7x7 and 6x6 maps on their materialised 42x42 grid
    assert set(both) == {"flip", "scale"}
    assert both["flip"] == pytest.approx(F.mse_loss(whole.flip(-1), whole_flipped).item(), rel=1e-5)
    assert flip_only == pytest.approx(both["flip"], rel=1e-6)
    lcm = F.interpolate(whole, size=42), F.interpolate(whole_small, size=42)
    assert both["scale"] == pytest.approx(F.mse_loss(*lcm).item(), rel=1e-5)
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match="batches is empty"):
            attention_inconsistency(model, cam, [], "flip")
        with cam.paused(), pytest.raises(RuntimeError, match="3 forwards recorded 0 heatmap batches"):
            attention_inconsistency(model, cam, batches, ["flip", "scale"])


def test_independent_mode_compares_each_view_with_the_original(model):
    images = torch.randn(2, 3, 28, 28)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    with CAMHook(model) as cam:
        out = AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale", "rotate"])
    handle.remove()
    # views of equal size share one forward: (orig, flip, rotate) at 28, then scale at 24
    assert calls == [(6, 3, 28, 28), (2, 3, 24, 24)]
    assert out.views == [(), ("flip",), ("scale",), ("rotate",)]
    assert set(out.terms) == {"flip", "scale", "rotate"}
    torch.testing.assert_close(out.loss, sum(out.terms.values()))
    with CAMHook(model) as cam:
        model(images)
        model(images.flip(-1))
        m, m_t = cam.pop()
    torch.testing.assert_close(out.terms["flip"], F.mse_loss(m.flip(-1), m_t), rtol=1e-5, atol=1e-6)


def test_views_keep_channels_last(model):
    images = torch.randn(2, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with CAMHook(model) as cam:
        AttentionConsistencyLoss().views(model, cam, images, ["flip", "scale"], mode="product")
    handle.remove()
    assert seen == [True, True]


def test_loss_is_float32_under_autocast():
    m = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
    m_t = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AttentionConsistencyLoss()(m, m_t, "scale")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, attention_consistency(m.float(), m_t.float(), "scale"))


def test_reductions_and_weights():
    m, m_t = torch.randn(4, 3, 7, 7), torch.randn(4, 3, 7, 7)
    per_map = AttentionConsistencyLoss(reduction="none")(m, m_t, "flip")
    assert per_map.shape == (4, 3)
    torch.testing.assert_close(per_map, (m.flip(-1) - m_t).square().mean((-2, -1)))
    torch.testing.assert_close(AttentionConsistencyLoss(reduction="sum")(m, m_t, "flip"), per_map.sum())
    torch.testing.assert_close(AttentionConsistencyLoss(weights={"flip": 0.25})(m, m_t, "flip"), 0.25 * per_map.mean())


def test_gradcheck_loss_module():
    m = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    criterion = AttentionConsistencyLoss(weights={"scale": 0.5})
    assert gradcheck(lambda a, b: criterion(a, b, "scale"), (m, m_t))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("m", "m_t", "match"),
    [
        (torch.randn(2, 3, 7), torch.randn(2, 3, 7, 7), r"heatmaps must be 4-D \(N, L, h, w\), got shape \(2, 3, 7\)"),
        (torch.randn(2, 3, 7, 7), torch.randn(3, 7, 7), r"heatmaps_t must be 4-D"),
        (
            torch.randn(2, 3, 7, 7),
            torch.randn(4, 3, 7, 7),
            r"same batch size and number of labels, got \(N, L\) = \(2, 3\) and \(4, 3\)",
        ),
        (torch.randn(2, 3, 7, 7), torch.randn(2, 5, 7, 7), r"\(2, 3\) and \(2, 5\)"),
        (torch.randn(2, 3, 7, 7), torch.randn(2, 3, 6, 6), r"flip: the transformed heatmaps have shape \(2, 3, 7, 7\)"),
    ],
)
def test_shape_errors(m, m_t, match):
    with pytest.raises(ValueError, match=match):
        attention_consistency(m, m_t, "flip")


def test_integer_heatmaps_are_refused():
    with pytest.raises(TypeError, match="heatmaps must be a floating-point tensor, got torch.int64"):
        attention_consistency(torch.ones(1, 1, 2, 2, dtype=torch.long), torch.ones(1, 1, 2, 2), "flip")


def test_non_finite_heatmaps_are_reported():
    m = torch.randn(2, 3, 7, 7)
    m[0, 1, 2, 3] = float("nan")
    m[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"heatmaps has 2 non-finite values \(nan or inf\) out of 294"):
        attention_consistency(m, torch.randn(2, 3, 7, 7), "flip")
    assert torch.isnan(attention_consistency(m, torch.randn(2, 3, 7, 7), "flip", check_finite_values=False))


def test_bad_reduction_and_weights():
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        AttentionConsistencyLoss(reduction="avg")
    with pytest.raises(TypeError, match=r"weights\['flip'\] must be a number, got str"):
        AttentionConsistencyLoss(weights={"flip": "high"})


def test_views_errors(model):
    images = torch.randn(2, 3, 28, 28)
    criterion = AttentionConsistencyLoss()
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match="unknown transform 'shear'; available: flip, rotate, scale, translate"):
            criterion.views(model, cam, images, ["flip", "shear"])
        with pytest.raises(ValueError, match="each transform may appear once"):
            criterion.views(model, cam, images, ["flip", Flip()])
        with pytest.raises(ValueError, match="'flip' and 'rotate' do not"):
            criterion.views(model, cam, images, ["flip", "rotate"], mode="product")
        with pytest.raises(ValueError, match="mode must be 'independent' or 'product', got 'all'"):
            criterion.views(model, cam, images, ["flip"], mode="all")
        with pytest.raises(ValueError, match=r"images must be 4-D \(N, C, H, W\)"):
            criterion.views(model, cam, images[0], ["flip"])
        with pytest.raises(TypeError, match="cam must be a CAMHook"):
            criterion.views(model, object(), images, ["flip"])
        with cam.paused(), pytest.raises(RuntimeError, match="recorded 0 heatmap batches"):
            criterion.views(model, cam, images, ["flip"])
    with pytest.raises(ValueError, match="views\\(\\) adds up its terms"):
        AttentionConsistencyLoss(reduction="none").views(model, cam, images, ["flip"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_on_cuda():
    device = torch.device("cuda")
    net = TinyGapFc().to(device)
    images = torch.randn(4, 3, 28, 28, device=device)
    criterion = AttentionConsistencyLoss()
    with CAMHook(net) as cam:
        criterion.views(net, cam, images, ["flip", "scale"], mode="product")  # first step checks the head
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = criterion.views(net, cam, images, ["flip", "scale"], mode="product")
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


class TupleOutput(TinyGapFc):
    """Returns (logits, features): views() needs the logits alone."""

    def forward(self, x):
        features = self.body(x)
        return self.fc(self.pool(features).flatten(1)), features


class SlicedOutput(TinyGapFc):
    """Returns 3 of the classifier's 5 outputs: its heatmaps are not those of these logits."""

    def forward(self, x):
        return super().forward(x)[:, :3]


def test_views_refuses_a_model_that_does_not_return_one_logits_tensor():
    images = torch.randn(2, 3, 28, 28)
    model = TupleOutput()
    with CAMHook(model, features="pool", classifier="fc") as cam:
        with pytest.raises(
            TypeError, match="views\\(\\) needs a model that returns its logits as one tensor, got a tuple"
        ):
            AttentionConsistencyLoss().views(model, cam, images, ["flip"])
    model = SlicedOutput()  # caught by the hook on its first forward, or by views() after it
    with CAMHook(model, features="pool", classifier="fc", check=False) as cam:
        with pytest.raises(ValueError, match=r"logits of shape \(4, 3\).*5"):
            AttentionConsistencyLoss().views(model, cam, images, ["flip"])


@pytest.mark.parametrize("shape", [(0, 5, 7, 7), (3, 0, 7, 7)])
def test_an_empty_batch_adds_nothing_to_the_loss(shape):
    m = torch.randn(*shape, requires_grad=True)
    for name in ("flip", "scale"):
        m_t = torch.randn(*shape[:2], 6, 6) if name == "scale" else torch.randn(*shape)
        for distance in ("mse", "relative"):
            loss = attention_consistency(m, m_t, name, distance=distance)
            assert loss.shape == () and float(loss.detach()) == 0.0 and loss.requires_grad
            loss.backward()
