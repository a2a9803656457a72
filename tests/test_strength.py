"""The levers of the term's strength: the schedule, the relative distance, stop-gradient, diagnostics."""

import math
import warnings

import pytest
import torch
from test_consistency import TinyGapFc
from torch.autograd import gradcheck

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    ConsistencyDiagnostics,
    ConsistencyWarning,
    Flip,
    Ramp,
    WeightedBCEWithLogitsLoss,
    attention_consistency,
    get_transform,
)
from attn_consistency.consistency import heatmap_variance
from attn_consistency.strength import gradient_ratio


@pytest.fixture
def model() -> TinyGapFc:
    torch.manual_seed(0)
    return TinyGapFc()


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "ramp, values",
    [
        (Ramp(100), {0: 0.0, 25: 0.25, 50: 0.5, 99: 0.99, 100: 1.0, 10_000: 1.0}),
        (Ramp(100, "cosine"), {0: 0.0, 50: 0.5, 25: (1 - math.cos(math.pi / 4)) / 2, 100: 1.0}),
        (Ramp(10, "gaussian"), {0: 0.0, 5: math.exp(-5 * 0.25), 10: 1.0, 11: 1.0}),
        (Ramp(10, delay=5), {0: 0.0, 4: 0.0, 5: 0.0, 10: 0.5, 15: 1.0}),
        (Ramp(0), {0: 1.0, 7: 1.0}),
    ],
)
def test_ramp_values_at_chosen_steps(ramp, values):
    for step, value in values.items():
        assert ramp(step) == pytest.approx(value, abs=1e-12), step


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=-1), ValueError, "steps must be >= 0, got -1"),
        (dict(steps=1.5), TypeError, "steps must be an int"),
        (dict(steps=True), TypeError, "steps must be an int"),
        (dict(steps=10, shape="exp"), ValueError, "shape must be one of 'linear', 'cosine', 'gaussian', got 'exp'"),
        (dict(steps=10, delay=-2), ValueError, "delay must be >= 0"),
    ],
)
def test_ramp_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Ramp(**kwargs)


def test_triggered_ramp_starts_once_the_loss_has_fallen():
    ramp = Ramp(4, trigger=0.5, window=2)
    losses = [10.0, 10.0, 9.0, 8.0, 6.0, 4.0, 4.0, 4.0, 3.0]  # windows: 10 (reference), 8.5, 5, 4 < 5
    for loss in losses:
        ramp.observe(torch.tensor(loss))
    assert (ramp.reference, ramp.start) == (10.0, 8)
    assert [ramp(step) for step in (0, 7, 8, 9, 10, 12, 50)] == [0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    # a delay holds the start back even when the loss has fallen earlier
    late = Ramp(0, trigger=0.5, window=2, delay=9)
    for loss in losses + [3.0]:
        late.observe(loss)
    assert late.start == 10
    never = Ramp(4, trigger=0.5, window=2)
    for loss in [10.0] * 20:
        never.observe(loss)
    assert never.start is None and never(1000) == 0.0
    with pytest.raises(ValueError, match=r"trigger must lie in \(0, 1\)"):
        Ramp(4, trigger=1.0)


def test_triggered_ramp_in_views_needs_the_classification_and_resumes(model):
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    criterion = WeightedBCEWithLogitsLoss(torch.full((5,), 0.5))
    loss = AttentionConsistencyLoss(schedule=Ramp(2, trigger=0.9, window=2), diagnostics=False)
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match=r"give views\(\) targets= and criterion="):
            loss.views(model, cam, images, ["flip"])
        for _ in range(3):
            loss.views(model, cam, images, ["flip"], targets=targets, criterion=criterion)
    assert loss.schedule.reference is not None and loss.schedule._observed == 3
    restored = AttentionConsistencyLoss(schedule=Ramp(2, trigger=0.9, window=2), diagnostics=False)
    restored.load_state_dict(loss.state_dict())
    assert restored.schedule.state_dict() == loss.schedule.state_dict()
    assert restored.steps == loss.steps == 3


def test_triggered_ramp_in_a_plain_loop_needs_the_losses():
    ramp = Ramp(2, trigger=0.5, window=2)
    criterion = AttentionConsistencyLoss(schedule=ramp, diagnostics=False)
    m, m_t = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    for _ in range(2):
        criterion(m, m_t, "flip")
        criterion.step()
    with pytest.raises(ValueError, match="after 2 steps it has seen no loss: call schedule.observe"):
        criterion(m, m_t, "flip")
    fed = AttentionConsistencyLoss(schedule=Ramp(2, trigger=0.5, window=2), diagnostics=False)
    for loss in (4.0, 4.0, 1.0, 1.0, 1.0):
        fed(m, m_t, "flip")
        fed.schedule.observe(loss)
        fed.step()
    assert fed.schedule.start == 4 and fed.multiplier == 0.5


def test_views_apply_the_schedule_and_count_steps(model):
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = AttentionConsistencyLoss(diagnostics=False)
    ramped = AttentionConsistencyLoss(schedule=Ramp(4), diagnostics=False)
    with CAMHook(model) as cam:
        for step in range(6):
            reference = plain.views(model, cam, images, ["flip"])
            out = ramped.views(model, cam, images, ["flip"])
            torch.testing.assert_close(out.loss, min(step / 4, 1.0) * reference.loss)
            # the terms are reported before weighting
            torch.testing.assert_close(out.terms["flip"], reference.terms["flip"])
        assert ramped.steps == 6
        with torch.no_grad():  # evaluation does not advance the schedule
            ramped.views(model, cam, images, ["flip"])
        assert ramped.steps == 6


def test_forward_applies_the_schedule_and_step_advances_it():
    m, m_t = torch.randn(2, 3, 7, 7), torch.randn(2, 3, 7, 7)
    criterion = AttentionConsistencyLoss(weights={"flip": 0.5}, schedule=Ramp(10), diagnostics=False)
    plain = attention_consistency(m, m_t, "flip")
    assert float(criterion(m, m_t, "flip")) == 0.0
    for _ in range(3):
        criterion.step()
    torch.testing.assert_close(criterion(m, m_t, "flip"), 0.5 * 0.3 * plain)
    assert criterion.multiplier == pytest.approx(0.3)


def test_schedule_state_survives_a_checkpoint_round_trip(tmp_path):
    criterion = AttentionConsistencyLoss(schedule=Ramp(100))
    for _ in range(37):
        criterion.step()
    torch.save(criterion.state_dict(), tmp_path / "loss.pt")
    restored = AttentionConsistencyLoss(schedule=Ramp(100))
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert restored.steps == 37
    assert restored.multiplier == pytest.approx(0.37)


def test_schedule_values_are_checked():
    criterion = AttentionConsistencyLoss(schedule=lambda step: -1.0)
    with pytest.raises(ValueError, match=r"schedule\(0\) must be >= 0"):
        criterion(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), "flip")
    with pytest.raises(TypeError, match="schedule must be callable"):
        AttentionConsistencyLoss(schedule=0.5)


# --------------------------------------------------------------------------- relative distance


RELATIVE_EPS = 1e-3  # the energy floor of the relative distance (heatmap_variance's docstring)


def oracle_normaliser(m, m_t):
    """Hand-written: the per-map spatial variance of both batches plus 1e-3 times their mean square."""
    var = lambda x: torch.stack(  # noqa: E731
        [x[n, l].flatten().var(unbiased=False) for n in range(x.shape[0]) for l in range(x.shape[1])]
    ).mean()
    return 0.5 * (var(m) + var(m_t)) + RELATIVE_EPS * 0.5 * ((m**2).mean() + (m_t**2).mean())


def relative_oracle(m, m_t, transform, params=None):
    """Hand-written: Eq. 5 of the materialised transform over the normaliser of both batches."""
    warped, _ = transform.apply_heatmaps(m, params)
    mse = ((warped - m_t) ** 2).mean()
    return mse / oracle_normaliser(m, m_t)


@pytest.mark.parametrize("name, params", [("flip", None), ("rotate", 90.0), ("translate", (1 / 7, 0.0))])
def test_relative_distance_equals_the_oracle(name, params):
    generator = torch.Generator().manual_seed(3)
    m, m_t = (
        torch.randn(3, 4, 7, 7, generator=generator, dtype=torch.float64),
        torch.randn(3, 4, 7, 7, generator=generator, dtype=torch.float64),
    )
    transform = get_transform(name)
    value = attention_consistency(m, m_t, transform, params, distance="relative")
    if name == "translate":  # masked cells are left out of the mean: compare on the valid columns
        warped, mask = transform.apply_heatmaps(m, params)
        mse = (((warped - m_t) ** 2) * mask).sum() / (mask.sum() * 3 * 4)
        expected = mse / heatmap_variance(m, m_t)
    else:
        expected = relative_oracle(m, m_t, transform, params)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def test_relative_distance_of_the_scale_term_equals_the_materialised_oracle():
    generator = torch.Generator().manual_seed(4)
    m = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    m_t = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    big, big_t = (torch.nn.functional.interpolate(x, size=42, mode="nearest") for x in (m, m_t))
    expected = ((big - big_t) ** 2).mean() / oracle_normaliser(m, m_t)
    torch.testing.assert_close(
        attention_consistency(m, m_t, "scale", distance="relative"), expected, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name, params", [("flip", None), ("scale", None), ("rotate", 30.0)])
def test_relative_distance_is_unchanged_when_both_batches_are_scaled(name, params):
    generator = torch.Generator().manual_seed(5)
    m = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    m_t = torch.randn(
        2, 3, 7 if name == "scale" else 8, 7 if name == "scale" else 8, generator=generator, dtype=torch.float64
    )
    transform = get_transform(name, **({"factor": 7 / 8} if name == "scale" else {}))
    base = attention_consistency(m, m_t, transform, params, distance="relative")
    for c in (1e-3, 3.0, 250.0):
        torch.testing.assert_close(
            attention_consistency(c * m, c * m_t, transform, params, distance="relative"), base, rtol=1e-10, atol=0
        )
    # while the paper's distance is in the maps' units
    torch.testing.assert_close(
        attention_consistency(3.0 * m, 3.0 * m_t, transform, params),
        9.0 * attention_consistency(m, m_t, transform, params),
    )


@pytest.mark.parametrize("name", ["flip", "scale"])
def test_relative_distance_sees_a_constant_added_to_each_map_only_through_the_floor(name):
    # a per-(sample, label) constant (the logit's level) changes neither Eq. 5's spatial
    # comparison under flip nor the variance part of the normaliser; only the energy floor
    # (1e-3 of the mean square) sees it, so spreading the logits lowers the term by at most
    # that share
    generator = torch.Generator().manual_seed(9)
    m = torch.randn(8, 3, 7, 7, generator=generator, dtype=torch.float64)
    m_t = torch.randn(
        8, 3, 6 if name == "scale" else 7, 6 if name == "scale" else 7, generator=generator, dtype=torch.float64
    )
    offsets = 10.0 * torch.randn(8, 3, 1, 1, generator=generator, dtype=torch.float64)
    base = attention_consistency(m, m_t, name, distance="relative")
    shifted = attention_consistency(m + offsets, m_t + offsets, name, distance="relative")
    eq5 = attention_consistency(m, m_t, name)
    torch.testing.assert_close(attention_consistency(m + offsets, m_t + offsets, name), eq5, rtol=1e-9, atol=0)
    torch.testing.assert_close(shifted, eq5 / oracle_normaliser(m + offsets, m_t + offsets), rtol=1e-9, atol=0)
    variance = 0.5 * (m.var((2, 3), unbiased=False).mean() + m_t.var((2, 3), unbiased=False).mean())
    torch.testing.assert_close(base, eq5 / oracle_normaliser(m, m_t), rtol=1e-9, atol=0)
    # the floor's share: E / V grew from about 1 to about 100, so the value fell by about 10%
    energy = 0.5 * (((m + offsets) ** 2).mean() + ((m_t + offsets) ** 2).mean())
    assert float(shifted) == pytest.approx(float(eq5 / (variance + RELATIVE_EPS * energy)), rel=1e-9)
    assert 0.8 < float(shifted / base) < 1.0


def test_relative_distance_of_unrelated_maps_is_about_two():
    generator = torch.Generator().manual_seed(10)
    m, m_t = torch.randn(64, 10, 7, 7, generator=generator), torch.randn(64, 10, 7, 7, generator=generator)
    assert float(attention_consistency(m, m_t, "flip", distance="relative")) == pytest.approx(2.0, rel=0.03)


def test_relative_distance_is_zero_for_exactly_equivariant_maps():
    m = torch.randn(2, 3, 7, 7)
    assert float(attention_consistency(m, m.flip(-1), "flip", distance="relative")) == 0.0
    assert float(attention_consistency(m, torch.rot90(m, 1, (-2, -1)), "rotate", 90.0, distance="relative")) == 0.0
    # 14x14 and 7x7 maps that nearest-upsample to the same 14x14 grid
    coarse = torch.randn(2, 3, 7, 7)
    fine = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert float(attention_consistency(fine, coarse, "scale", distance="relative")) == 0.0


def test_relative_distance_of_flat_maps_is_relative_to_their_energy():
    # flat maps have no variance: the floor, 1e-3 of their mean square, is the whole normaliser
    # (it used to fall back to 1, the maps' own units: neither scale-free nor continuous)
    m, m_t = torch.full((2, 3, 4, 4), 2.0, dtype=torch.float64), torch.full((2, 3, 3, 3), 2.5, dtype=torch.float64)
    normaliser = RELATIVE_EPS * 0.5 * (2.0**2 + 2.5**2)
    torch.testing.assert_close(heatmap_variance(m, m_t), torch.tensor(normaliser, dtype=torch.float64))
    value = attention_consistency(m, m_t, "scale", distance="relative")
    torch.testing.assert_close(value, torch.tensor(0.25 / normaliser, dtype=torch.float64))
    torch.testing.assert_close(attention_consistency(7 * m, 7 * m_t, "scale", distance="relative"), value)
    # two batches of zeros: nothing to compare, 0 (the normaliser is 1 there)
    zeros = torch.zeros(2, 3, 4, 4)
    assert heatmap_variance(zeros, zeros) == 1.0
    assert float(attention_consistency(zeros, zeros, "flip", distance="relative")) == 0.0


@pytest.mark.parametrize("name, size_t", [("flip", 5), ("scale", 4), ("rotate", 5)])
def test_relative_distance_gradcheck(name, size_t):
    generator = torch.Generator().manual_seed(6)
    m = torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(2, 3, size_t, size_t, generator=generator, dtype=torch.float64, requires_grad=True)
    params = 30.0 if name == "rotate" else None
    assert gradcheck(
        lambda a, b: attention_consistency(a, b, name, params, distance="relative"), (m, m_t), eps=1e-6, atol=1e-8
    )


def test_relative_distance_has_no_gradient_that_shrinks_the_maps():
    # scale-free: the gradient is orthogonal to the maps themselves (Euler's theorem, degree 0),
    # while Eq. 5's gradient has a part along them (it falls when both maps shrink)
    generator = torch.Generator().manual_seed(7)
    m = torch.randn(4, 3, 7, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(4, 3, 6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    for distance, along in (("relative", 0.0), ("mse", None)):
        grads = torch.autograd.grad(attention_consistency(m, m_t, "scale", distance=distance), (m, m_t))
        radial = float((grads[0] * m.detach()).sum() + (grads[1] * m_t.detach()).sum())
        if along is None:  # degree 2: <grad, M> = 2 * loss
            assert radial == pytest.approx(2 * float(attention_consistency(m.detach(), m_t.detach(), "scale")))
        else:
            assert abs(radial) < 1e-12


def test_relative_distance_in_views_and_the_module(model):
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    paper = AttentionConsistencyLoss(diagnostics=False)
    relative = AttentionConsistencyLoss(distance="relative", diagnostics=False)
    with CAMHook(model) as cam:
        a = paper.views(
            model, cam, images, ["flip", "scale"], mode="product", generator=torch.Generator().manual_seed(0)
        )
        b = relative.views(
            model, cam, images, ["flip", "scale"], mode="product", generator=torch.Generator().manual_seed(0)
        )
        model(images)
        model(images.flip(-1))
        m, m_t = cam.pop()
    assert set(a.terms) == set(b.terms) == {"flip@28", "flip@24", "scale"}
    # the same flip maps at 28 px, divided by their variance
    flip_pair_variance = heatmap_variance(m, m_t)
    torch.testing.assert_close(b.terms["flip@28"], a.terms["flip@28"] / flip_pair_variance, rtol=1e-5, atol=0)
    torch.testing.assert_close(relative(m, m_t, "flip"), attention_consistency(m, m_t, "flip") / flip_pair_variance)
    with pytest.raises(
        ValueError, match="distance must be 'mse' \\(paper Eq. 5\\), 'relative' or 'correlation', got 'l2'"
    ):
        AttentionConsistencyLoss(distance="l2")


# --------------------------------------------------------------------------- stop gradient


@pytest.mark.parametrize("stop, trained", [(None, {0, 1}), ("original", {1}), ("transformed", {0})])
def test_stop_gradient_chooses_the_branch_that_is_trained(stop, trained):
    m = torch.randn(2, 3, 7, 7, requires_grad=True)
    m_t = torch.randn(2, 3, 7, 7, requires_grad=True)
    AttentionConsistencyLoss(stop_gradient=stop, diagnostics=False)(m, m_t, "flip").backward()
    got = {i for i, x in enumerate((m, m_t)) if x.grad is not None and bool(x.grad.abs().sum() > 0)}
    assert got == trained
    with pytest.raises(ValueError, match="stop_gradient must be None, 'original' or 'transformed'"):
        AttentionConsistencyLoss(stop_gradient="both")


def test_stop_gradient_in_views_keeps_the_value(model):
    images = torch.randn(2, 3, 28, 28)
    with CAMHook(model) as cam:
        a = AttentionConsistencyLoss(diagnostics=False).views(model, cam, images, ["flip"])
        b = AttentionConsistencyLoss(stop_gradient="original", diagnostics=False).views(model, cam, images, ["flip"])
    torch.testing.assert_close(a.loss, b.loss)
    a_grad = torch.autograd.grad(a.loss, model.body[0].weight)[0]
    b_grad = torch.autograd.grad(b.loss, model.body[0].weight)[0]
    assert not torch.allclose(a_grad, b_grad)


# --------------------------------------------------------------------------- classification in views()


def test_views_with_targets_give_the_classification_and_the_ratio(model):
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = (torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    criterion = WeightedBCEWithLogitsLoss(torch.full((5,), 0.5))
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model) as cam:
        out = loss.views(model, cam, images, ["flip", "scale"], mode="product", targets=targets, criterion=criterion)
    expected = sum(criterion(logits, targets) for logits in out.logits) / 4
    torch.testing.assert_close(out.classification, expected)
    torch.testing.assert_close(out.total, expected + out.loss)
    torch.testing.assert_close(out.ratio, out.loss.detach() / expected.detach())
    assert out.total.requires_grad
    with CAMHook(model) as cam:
        bare = loss.views(model, cam, images, ["flip"])
        with pytest.raises(ValueError, match="give targets= and criterion= together"):
            loss.views(model, cam, images, ["flip"], targets=targets)
        with pytest.raises(ValueError, match=r"targets must hold one row per image \(4\)"):
            loss.views(model, cam, images, ["flip"], targets=targets[:3], criterion=criterion)
    assert bare.classification is None
    with pytest.raises(ValueError, match="without targets= and criterion="):
        bare.total


# --------------------------------------------------------------------------- diagnostics


def spread_batch(spread: float) -> torch.Tensor:
    """Heatmaps (2, 3, 4, 4) whose every map has spatial std ``spread`` (a checkerboard of +-spread)."""
    board = (torch.arange(16).view(4, 4) + torch.arange(4).view(4, 1)) % 2 * 2.0 - 1.0
    return (spread * board).expand(2, 3, 4, 4).clone()


def run(diagnostics, spreads, ratio=0.1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for spread in spreads:
            diagnostics.update(spread_batch(spread), torch.tensor(ratio), torch.tensor(1.0))
    return [w for w in caught if issubclass(w.category, ConsistencyWarning)]


def test_collapse_warning_fires_once_on_a_constructed_collapse():
    diagnostics = ConsistencyDiagnostics(every=5, collapse=0.2)
    caught = run(diagnostics, [4.0] * 5 + [0.5] * 20)
    assert len(caught) == 1
    assert "collapsing" in str(caught[0].message) and "12%" in str(caught[0].message)
    assert "diagnostics=False" in str(caught[0].message)
    assert diagnostics.last["spread"] == pytest.approx(0.5)


def test_collapse_warning_is_silent_on_a_healthy_run():
    # maps whose spread grows, or dips by less than the threshold, are healthy
    assert run(ConsistencyDiagnostics(every=5), [1.0] * 5 + [0.5] * 5 + [3.0] * 20) == []


def test_dominance_warning_fires_early_only():
    caught = run(ConsistencyDiagnostics(every=5, dominance=1.0, early_steps=10), [1.0] * 10, ratio=4.0)
    assert len(caught) == 1 and "4x the classification loss" in str(caught[0].message)
    late = ConsistencyDiagnostics(every=5, dominance=1.0, early_steps=10)
    run(late, [1.0] * 10, ratio=0.5)
    assert run(late, [1.0] * 10, ratio=4.0) == []


def test_gradient_ratio_equals_the_oracle_on_maps_that_make_the_logits():
    # the oracle: logits built from the maps themselves (GAP-FC), so autograd gives the
    # classification's gradient on every cell directly
    generator = torch.Generator().manual_seed(8)
    m = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    logits, logits_t = m.mean((2, 3)) + bias, m_t.mean((2, 3)) + bias
    targets = (torch.rand(3, 4, generator=generator) < 0.5).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    classification = 0.5 * (bce(logits, targets) + bce(logits_t, targets))
    consistency = 0.3 * attention_consistency(m, m_t, "flip")
    norm = lambda grads: torch.sqrt(sum(g.square().sum() for g in grads))  # noqa: E731
    expected = norm(torch.autograd.grad(consistency, (m, m_t), retain_graph=True)) / norm(
        torch.autograd.grad(classification, (m, m_t), retain_graph=True)
    )
    got = gradient_ratio(consistency, classification, [m, m_t], [logits, logits_t])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    # nothing was accumulated into the leaves: the training step's backward is untouched
    assert m.grad is None and m_t.grad is None


def test_diagnostics_resume_checks_the_same_windows():
    values = [float(v) for v in torch.linspace(0.5, 3.0, 10)]

    def feed(diagnostics, ratios):
        for ratio in ratios:
            diagnostics.update(spread_batch(ratio), torch.tensor(ratio), torch.tensor(1.0), torch.tensor(2 * ratio))

    straight = ConsistencyDiagnostics(every=3, dominance=100.0)
    feed(straight, values)
    first = ConsistencyDiagnostics(every=3, dominance=100.0)
    feed(first, values[:4])
    resumed = ConsistencyDiagnostics(every=3, dominance=100.0)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, values[4:])
    assert resumed.last == pytest.approx(straight.last) and resumed.updates == straight.updates == 10
    assert straight.last["gradient_ratio"] == pytest.approx(2 * sum(values[6:9]) / 3)


def test_diagnostics_arguments_are_checked():
    with pytest.raises(ValueError, match=r"collapse must lie in \(0, 1\)"):
        ConsistencyDiagnostics(collapse=1.5)
    with pytest.raises(ValueError, match="dominance must be > 0"):
        ConsistencyDiagnostics(dominance=0)
    with pytest.raises(ValueError, match="every must be >= 1"):
        ConsistencyDiagnostics(every=0)
    with pytest.raises(TypeError, match="diagnostics must be a bool or a ConsistencyDiagnostics"):
        AttentionConsistencyLoss(diagnostics="on")


def test_views_warn_when_the_term_dwarfs_the_classification_loss(model):
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(4, 5)
    criterion = WeightedBCEWithLogitsLoss(torch.full((5,), 0.5))
    heavy = {"flip": 1e6}
    with CAMHook(model) as cam:
        loud = AttentionConsistencyLoss(weights=heavy, diagnostics=ConsistencyDiagnostics(every=2))
        with pytest.warns(ConsistencyWarning, match="the classification loss"):
            for _ in range(2):
                loud.views(model, cam, images, ["flip"], targets=targets, criterion=criterion)
        quiet = AttentionConsistencyLoss(weights=heavy, diagnostics=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConsistencyWarning)
            for _ in range(30):
                quiet.views(model, cam, images, ["flip"], targets=targets, criterion=criterion)


def test_weights_are_validated(model):
    typo = AttentionConsistencyLoss(weights={"flp": 0.0})
    with pytest.raises(ValueError, match="weights key 'flp' names no transform"):
        typo(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), "flip")
    with CAMHook(model) as cam, pytest.raises(ValueError, match="weights key 'flp' names no transform"):
        typo.views(model, cam, torch.randn(2, 3, 28, 28), ["flip"])
    with pytest.raises(TypeError, match="weights keys must be transform names"):
        AttentionConsistencyLoss(weights={1: 0.5})

    class Unregistered(Flip):
        name = "mirror"

    # an unregistered transform instance is weighted by its own name
    m = torch.randn(2, 3, 4, 4)
    assert float(AttentionConsistencyLoss(weights={"mirror": 0.0})(m, torch.randn(2, 3, 4, 4), Unregistered())) == 0.0
    for bad, match in ((-1.0, ">= 0"), (math.nan, "finite"), (math.inf, "finite")):
        with pytest.raises(ValueError, match=match):
            AttentionConsistencyLoss(weights={"flip": bad})


def _observe_on_replica(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ramp = Ramp(4, trigger=0.5, window=2)
        # replica 0 alone falls below half of its start at its third window, replica 1 never:
        # their mean (5 -> 3.5 -> 3.0 -> 2.25) crosses 0.5 * 5 only at the fourth window
        losses = [[6.0, 6.0, 3.0, 3.0, 2.0, 2.0, 0.5, 0.5], [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]][rank]
        for loss in losses:
            ramp.observe(torch.tensor(loss))
        results[rank] = (ramp.reference, ramp.start)
    finally:
        dist.destroy_process_group()


def test_triggered_ramp_starts_at_the_same_step_on_every_replica():
    import socket

    import torch.multiprocessing as mp
    from fixtures import run_workers

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    run_workers(_observe_on_replica, (port, results))  # from a server that imported torch once
    assert results[0] == results[1] == (5.0, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ConsistencyDiagnostics().update([1], torch.tensor(1.0)), TypeError, "heatmaps must be a torch.Tensor"),
        (
            lambda: ConsistencyDiagnostics().update(torch.randn(2, 3, 4), torch.tensor(1.0)),
            ValueError,
            "heatmaps must be 4-D",
        ),
        (
            lambda: ConsistencyDiagnostics().update(torch.randn(2, 3, 4, 4), 1.0),
            TypeError,
            "consistency must be a torch.Tensor",
        ),
        (
            lambda: AttentionConsistencyLoss(schedule=Ramp),
            TypeError,
            "schedule must be callable .*, e.g. Ramp\\(1000\\), got type",
        ),
        (lambda: heatmap_variance([1], torch.randn(1, 1, 2, 2)), TypeError, "heatmaps must be a torch.Tensor"),
        (lambda: Ramp(10)(2.5), TypeError, "step must be an int"),
        (
            lambda: Ramp(10, trigger=0.5).observe(torch.tensor([1.0, 2.0])),
            ValueError,
            "observe\\(\\) takes the step's loss as one number",
        ),
        (lambda: Ramp(10, trigger=0.5).observe(float("nan")), ValueError, "loss must be a finite number"),
        (lambda: ConsistencyDiagnostics(every=-1), ValueError, "every must be >= 1, got -1"),
    ],
)
def test_bad_arguments_of_the_strength_api_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call()
