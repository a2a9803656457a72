"""Issue 18, the loss and its schedule: each test failed before its fix.

The relative distance near flat maps (item 2), non-finite losses and targets (5), a
non-scalar criterion (6), the trigger's units (7), Scale with Rotate (8), the state that a
checkpoint loads (9), meta tensors (15), non-finite images (16), and the smaller things:
the fractional shift's host tensor and the scale term's cache.
"""

import warnings

import pytest
import torch
from test_consistency import TinyGapFc
from torch import nn
from torch.autograd import gradcheck

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    ConsistencyDiagnostics,
    ConsistencyWarning,
    Flip,
    MultiScaleHeads,
    Ramp,
    Rotate,
    Scale,
    Translate,
    attention_consistency,
    get_transform,
)
from attn_consistency.transforms import scale_consistency

RELATIVE_EPS = 1e-3  # heatmap_variance's docstring: the floor is 1e-3 of the maps' mean square


def relative(a, b, name="flip", params=None):
    return attention_consistency(a, b, name, params, distance="relative")


# --------------------------------------------------------------------------- item 2: the relative distance


def test_relative_distance_of_the_issue_is_finite():
    # a flat map against a map that is flat but for one cell of 1e-20: it was inf
    a = 3 * torch.ones(1, 1, 7, 7)
    b = torch.zeros(1, 1, 7, 7)
    b[0, 0, 0, 0] = 1e-20
    value = relative(a, b)
    assert torch.isfinite(value)
    # Eq. 5 is 9, the floor 1e-3 * (9 + 0) / 2
    assert float(value) == pytest.approx(9.0 / (RELATIVE_EPS * 4.5), rel=1e-5)


@pytest.mark.parametrize("name, size_t", [("flip", 7), ("scale", 6)])
def test_relative_distance_is_bounded_by_four_over_eps(name, size_t):
    # Eq. 5 of a flip or a scale is at most twice the two mean squares: the quotient is at most 4 / eps,
    # whatever the spatial spread (it was 1.1e6 at std 1e-3 and a logit gap of 1, 9.8e11 at 1e-6)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for std in (1.0, 1e-1, 1e-3, 1e-6, 1e-9, 0.0):
        for gap in (0.0, 1.0, -50.0):
            m = std * torch.randn(4, 3, 7, 7, generator=generator, dtype=torch.float64)
            m_t = std * torch.randn(4, 3, size_t, size_t, generator=generator, dtype=torch.float64) + gap
            value = float(relative(m, m_t, name))
            assert 0.0 <= value <= 4 / RELATIVE_EPS, (std, gap)
            worst = max(worst, value)
    # the bound is nearly reached by flat maps of opposite signs
    m = torch.ones(2, 3, 7, 7, dtype=torch.float64)
    assert float(relative(m, -m.flip(-1))) == pytest.approx(4 / RELATIVE_EPS, rel=1e-12)
    assert worst > 1000  # flat maps with a logit gap are far apart, but finitely so


@pytest.mark.parametrize("name, size_t", [("flip", 7), ("scale", 6)])
@pytest.mark.parametrize("gap", [0.0, 1.0])
def test_relative_distance_is_continuous_into_flat_maps(name, size_t, gap):
    # at exactly flat maps the old guard fell back to 1 (the maps' units): the value jumped
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    noise_t = torch.randn(2, 3, size_t, size_t, generator=generator, dtype=torch.float64)
    flat = 3.0 * torch.ones(2, 3, 7, 7, dtype=torch.float64)
    flat_t = (3.0 + gap) * torch.ones(2, 3, size_t, size_t, dtype=torch.float64)
    at_flat = float(relative(flat, flat_t, name))
    assert at_flat == pytest.approx(gap**2 / (RELATIVE_EPS * 0.5 * (9.0 + (3.0 + gap) ** 2)), abs=1e-12)
    previous = None
    for t in (1e-4, 1e-6, 1e-8):
        value = float(relative(flat + t * noise, flat_t + t * noise_t, name))
        distance = abs(value - at_flat)
        assert distance <= 1e-3 * max(1.0, at_flat) * (t / 1e-4), t
        if previous is not None:
            assert distance <= previous  # the values close in on the flat maps' one
        previous = distance


@pytest.mark.parametrize("name, size_t, params", [("flip", 7, None), ("scale", 6, None), ("rotate", 7, 30.0)])
@pytest.mark.parametrize("std", [1.0, 1e-4, 0.0])
def test_relative_distance_is_scale_free_with_different_offsets_on_the_two_views(name, size_t, params, std):
    generator = torch.Generator().manual_seed(2)
    m = std * torch.randn(3, 4, 7, 7, generator=generator, dtype=torch.float64) + 2.0
    m_t = std * torch.randn(3, 4, size_t, size_t, generator=generator, dtype=torch.float64) - 0.5
    base = relative(m, m_t, name, params)
    assert torch.isfinite(base) and float(base) > 0
    for c in (1e-6, 1e-2, 3.0, -3.0, 1e5):
        torch.testing.assert_close(relative(c * m, c * m_t, name, params), base, rtol=1e-10, atol=0)


def test_relative_distance_of_one_cell_maps_is_scale_free():
    # 1x1 maps have no variance: they always fell back to 1, so x10 maps gave x100
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 1, 1, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 5, 1, 1, generator=generator, dtype=torch.float64)
    base = relative(x, y)
    expected = ((x - y) ** 2).mean() / (RELATIVE_EPS * 0.5 * ((x**2).mean() + (y**2).mean()))
    torch.testing.assert_close(base, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(relative(10 * x, 10 * y), base, rtol=1e-12, atol=0)
    assert float(base) <= 4 / RELATIVE_EPS
    # a 1x1 map against a 2x2 one through the scale term too
    z = torch.randn(4, 5, 2, 2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(relative(10 * x, 10 * z, "scale"), relative(x, z, "scale"), rtol=1e-12, atol=0)


def test_relative_distance_stays_zero_for_equivariant_maps_and_the_paper_loss_is_unchanged():
    m = torch.randn(2, 3, 7, 7)
    assert float(relative(m, m.flip(-1))) == 0.0
    flat = torch.full((2, 3, 7, 7), 5.0)
    assert float(relative(flat, flat)) == 0.0
    # distance="mse" is Eq. 5 as before, bit for bit: the mean of the transform's per-map terms
    m_t = torch.randn(2, 3, 7, 7)
    for name in ("flip", "scale"):
        other = m_t if name == "flip" else m_t[..., :6, :6]
        per_map = get_transform(name).consistency(m, other)
        assert torch.equal(attention_consistency(m, other, name), per_map.mean())


@pytest.mark.parametrize(
    "name, size, size_t, std",
    [("flip", 5, 5, 1e-3), ("flip", 5, 5, 0.0), ("scale", 5, 4, 1e-2), ("flip", 1, 1, 1.0), ("rotate", 5, 5, 1e-2)],
)
def test_relative_distance_gradcheck_near_and_at_flat_maps(name, size, size_t, std):
    generator = torch.Generator().manual_seed(4)
    m = (std * torch.randn(2, 3, size, size, generator=generator, dtype=torch.float64) + 1.5).requires_grad_()
    m_t = (std * torch.randn(2, 3, size_t, size_t, generator=generator, dtype=torch.float64) - 0.5).requires_grad_()
    params = 30.0 if name == "rotate" else None
    assert gradcheck(lambda a, b: relative(a, b, name, params), (m, m_t), eps=1e-5, atol=1e-6, rtol=1e-5)


def test_relative_distance_keeps_no_gradient_along_the_maps_near_flat_maps():
    # scale-free with the floor too (both parts of the normaliser are of degree 2): Euler's theorem
    generator = torch.Generator().manual_seed(5)
    m = (1e-3 * torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64) + 2.0).requires_grad_()
    m_t = (1e-3 * torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64) + 1.0).requires_grad_()
    grads = torch.autograd.grad(relative(m, m_t, "scale"), (m, m_t))
    radial = float((grads[0] * m.detach()).sum() + (grads[1] * m_t.detach()).sum())
    assert abs(radial) < 1e-9 * float(grads[0].norm() * m.detach().norm())


# --------------------------------------------------------------------------- item 5: non-finite losses and targets


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_window_neither_becomes_the_reference_nor_triggers(bad):
    # one NaN made the reference NaN for good (never beaten); one inf started the ramp at once
    ramp = Ramp(4, trigger=0.5, window=5)
    with pytest.warns(ConsistencyWarning, match=r"Ramp.observe: the mean classification loss \(loss\) .* not finite"):
        for loss in [bad] + [1.0] * 4:
            ramp.observe(torch.tensor(loss))
    assert ramp.reference is None and ramp.start is None
    for _ in range(5):
        ramp.observe(torch.tensor(1.0))
    assert ramp.reference == 1.0 and ramp.start is None
    for _ in range(5):
        ramp.observe(torch.tensor(0.01))
    assert ramp.start == 15
    # a float is read at once, and refused by name
    with pytest.raises(ValueError, match="loss must be a finite number"):
        Ramp(4, trigger=0.5).observe(bad)


def test_views_refuse_non_finite_targets_by_name(model):
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(2, 5)
    targets[0, 0] = float("nan")
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match=r"targets has 1 non-finite values \(nan or inf\) out of 10"):
            loss.views(model, cam, images, ["flip"], targets=targets, criterion=nn.BCEWithLogitsLoss())
        assert loss.steps == 0
        # the data checks' policy, as for the heatmaps: check_finite_values=False skips the check
        unchecked = AttentionConsistencyLoss(check_finite_values=False, diagnostics=False)
        out = unchecked.views(model, cam, images, ["flip"], targets=targets, criterion=nn.BCEWithLogitsLoss())
        assert torch.isnan(out.total)
        # integer targets hold no NaN
        out = loss.views(model, cam, images, ["flip"], targets=torch.zeros(2, 5, dtype=torch.long), criterion=count)
        assert torch.isfinite(out.total)


def count(logits, targets):
    return (logits - targets).square().mean()


# --------------------------------------------------------------------------- item 6: a non-scalar criterion


@pytest.mark.parametrize("diagnostics", [False, True])
@pytest.mark.parametrize("multiscale", [False, True])
def test_views_refuse_a_criterion_that_does_not_reduce(model, diagnostics, multiscale):
    # reduction="none": out.total was silently (2, 5); with diagnostics a torch stack error
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    loss = AttentionConsistencyLoss(diagnostics=diagnostics)
    criterion = nn.BCEWithLogitsLoss(reduction="none")
    recorder = MultiScaleHeads(model, ["body.1"], channels={"body.1": 8}) if multiscale else CAMHook(model)
    with recorder as cam:
        with pytest.raises(
            ValueError, match=r"criterion must return the classification loss as one number .* \(2, 5\)"
        ):
            loss.views(model, cam, images, ["flip"], targets=torch.zeros(2, 5), criterion=criterion)
        with pytest.raises(TypeError, match="criterion must return the classification loss as a tensor, got float"):
            loss.views(model, cam, images, ["flip"], targets=torch.zeros(2, 5), criterion=lambda x, y: 1.0)
        # a loss of shape (1,) is one number
        out = loss.views(
            model, cam, images, ["flip"], targets=torch.zeros(2, 5), criterion=lambda x, y: count(x, y)[None]
        )
        assert out.total.shape == ()


@pytest.fixture
def model() -> TinyGapFc:
    torch.manual_seed(0)
    return TinyGapFc()


# --------------------------------------------------------------------------- item 7: the trigger's units


def constant(level):
    """A criterion whose value is ``level["value"]`` (kept in the graph of the logits)."""

    def criterion(logits, targets):
        return logits.sum() * 0 + level["value"]

    return criterion


def test_the_trigger_starts_the_warm_up_in_the_loss_steps_after_a_resume_without_it(model):
    # a checkpoint made without a trigger: the loss counts 100 steps, the new ramp has observed none.
    # The ramp's start was in observed losses (4) and was read at the loss's step (100): Ramp(0)
    # gave 1.0 at once, Ramp(4) was at its end before it began
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    old = AttentionConsistencyLoss(diagnostics=False)
    old.steps = 100
    loss = AttentionConsistencyLoss(schedule=Ramp(4, trigger=0.5, window=2), diagnostics=False)
    state = old.state_dict()
    loss.load_state_dict(state)
    assert loss.steps == 100 and loss.schedule.observed == 0
    multipliers = []
    level = {"value": 4.0}
    with CAMHook(model) as cam:
        for value in [4.0, 4.0, 1.0, 1.0] + [1.0] * 6:
            level["value"] = value
            multipliers.append(loss.multiplier)
            loss.views(model, cam, images, ["flip"], targets=torch.zeros(2, 5), criterion=constant(level))
    # the window of steps 102-103 triggers: the ramp starts at step 104 and rises over 4 steps
    assert loss.schedule.start == 104
    assert multipliers == [0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_trigger_counts_in_the_loss_steps_in_a_plain_loop_too():
    # forward() takes the multiplier (a call of the ramp at the loss's step), the loop observes the loss
    criterion = AttentionConsistencyLoss(schedule=Ramp(0, trigger=0.5, window=2), diagnostics=False)
    criterion.steps = 100
    m, m_t = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    values = []
    for loss in (4.0, 4.0, 1.0, 1.0, 1.0, 1.0):
        values.append(criterion.multiplier)
        criterion(m, m_t, "flip")
        criterion.schedule.observe(loss)
        criterion.step()
    assert criterion.schedule.start == 104
    assert values == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # an explicit step wins; a plain ramp that was never called counts its observed losses (as before)
    ramp = Ramp(0, trigger=0.5, window=2)
    for step, loss in zip(range(50, 54), (4.0, 4.0, 1.0, 1.0)):
        ramp.observe(loss, step=step)
    assert ramp.start == 54
    plain = Ramp(0, trigger=0.5, window=2)
    for loss in (4.0, 4.0, 1.0, 1.0):
        plain.observe(loss)
    assert plain.start == 4
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        plain.observe(1.0, step=-1)


# --------------------------------------------------------------------------- item 8: Scale and Rotate


def test_a_resize_to_a_fixed_size_does_not_commute_with_a_rotation():
    assert Scale(size=(10, 20)).commutes_with(Rotate()) is False
    assert Scale(size=12).commutes_with(Rotate(30.0)) is False  # square, but the image may not be
    assert Scale(size=(10, 20)).commutes_with(Rotate(180.0)) is True  # each axis onto itself
    assert Scale(size=(10, 20)).commutes_with(Rotate((0.0, 180.0))) is False
    assert Scale(size=(10, 20)).commutes_with(Flip()) and Scale(size=(10, 20)).commutes_with(Translate())
    assert Scale(size=(10, 20)).commutes_with(Scale()) is False  # the last fixed size wins
    assert Scale(0.5).commutes_with(Rotate()) and Scale(0.5).commutes_with(Scale(0.75))
    loss = AttentionConsistencyLoss(diagnostics=False)
    with pytest.raises(ValueError, match="'scale' and 'rotate' do not"):
        loss._transforms([Scale(size=(10, 20)), Rotate()], "product")
    # the check is real: a 90-degree turn and an anisotropic resize give different images in the two orders
    images = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    scale, rotate = Scale(size=(6, 12), antialias=False), Rotate(90.0)
    one = rotate.apply_image(scale.apply_image(images))
    other = scale.apply_image(rotate.apply_image(images))
    assert one.shape != other.shape


# --------------------------------------------------------------------------- item 9: the state a checkpoint loads


def full_state():
    loss = AttentionConsistencyLoss(
        schedule=Ramp(10, trigger=0.5, window=2), diagnostics=ConsistencyDiagnostics(every=4)
    )
    m = torch.randn(2, 3, 7, 7)
    for _ in range(3):
        loss(m, m.flip(-1) + 0.1, "flip")
        loss.schedule.observe(1.0)
        loss.step()
    return loss.state_dict()["_extra_state"]


def with_entry(path, value):
    state = full_state()
    *parents, key = path
    node = state
    for parent in parents:
        node = node[parent]
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return state


DELETE = object()


@pytest.mark.parametrize(
    "state, error, match",
    [
        ({"bogus": 1}, ValueError, r"consistency state lacks the entry 'steps' \(it holds \['bogus'\]\)"),
        ("steps", TypeError, "consistency state must be a dict"),
        (with_entry(["steps"], "abc"), TypeError, "consistency state 'steps' must be an int >= 0 .*got str 'abc'"),
        (with_entry(["steps"], -5), ValueError, "consistency state 'steps' must be an int >= 0 .*got -5"),
        (with_entry(["steps"], 2.5), TypeError, "consistency state 'steps' must be an int"),
        (with_entry(["steps"], True), TypeError, "consistency state 'steps' must be an int"),
        (with_entry(["extra"], 1), ValueError, "consistency state has the unknown entry 'extra'"),
        (
            with_entry(["schedule", "start"], -3),
            ValueError,
            "consistency state 'schedule.start' must be None or an int >= 0",
        ),
        (with_entry(["schedule", "observed"], "3"), TypeError, "consistency state 'schedule.observed' must be an int"),
        (with_entry(["schedule", "reference"], "2"), TypeError, "'schedule.reference' must be None or a number"),
        (with_entry(["schedule", "sum"], DELETE), ValueError, "consistency state 'schedule' lacks the entry 'sum'"),
        (with_entry(["schedule"], [1, 2]), TypeError, "consistency state 'schedule' must be a dict"),
        (
            with_entry(["diagnostics", "updates"], -1),
            ValueError,
            "consistency state 'diagnostics.updates' must be an int",
        ),
        (with_entry(["diagnostics", "warned"], "collapse"), TypeError, "'diagnostics.warned' must be a list of causes"),
        (
            with_entry(["diagnostics", "warned"], ["colapse"]),
            ValueError,
            "'diagnostics.warned' must be a list of causes",
        ),
        (
            with_entry(["diagnostics", "window"], [[1.0, 2.0]]),
            ValueError,
            r"'diagnostics.window' row 0 must be 3 numbers",
        ),
        (with_entry(["diagnostics", "window"], [[1.0, 2.0, "x"]]), TypeError, r"'diagnostics.window' row 0 must be"),
        (with_entry(["diagnostics", "window"], [[1.0, 2.0, 3.0]] * 5), ValueError, "holds 5 rows, more than its 3"),
        (
            with_entry(["diagnostics", "last"], {"spread": "x"}),
            TypeError,
            r"'diagnostics.last.spread' must be a number",
        ),
        (
            with_entry(["diagnostics", "start_spread"], "1"),
            TypeError,
            "'diagnostics.start_spread' must be None or a number",
        ),
    ],
)
def test_a_bad_loss_state_is_refused_by_entry_and_loads_nothing(state, error, match):
    loss = AttentionConsistencyLoss(
        schedule=Ramp(10, trigger=0.5, window=2), diagnostics=ConsistencyDiagnostics(every=4)
    )
    before = loss.state_dict()["_extra_state"]
    with pytest.raises(error, match=match):
        loss.load_state_dict({"_extra_state": state})
    assert loss.state_dict()["_extra_state"] == before  # nothing was set


def test_a_good_loss_state_still_round_trips(tmp_path):
    state = full_state()
    loss = AttentionConsistencyLoss(
        schedule=Ramp(10, trigger=0.5, window=2), diagnostics=ConsistencyDiagnostics(every=4)
    )
    torch.save({"_extra_state": state}, tmp_path / "loss.pt")
    loss.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert repr(loss.state_dict()["_extra_state"]) == repr(state)  # the window holds NaN ratios
    # the restored window closes at the next update, in torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConsistencyWarning)
        loss(torch.randn(2, 3, 7, 7), torch.randn(2, 3, 7, 7), "flip")
    assert loss.diagnostics.updates == 4 and set(loss.diagnostics.last) == {"spread", "ratio", "gradient_ratio"}
    # older checkpoints without the diagnostics' last and window
    state["diagnostics"] = {k: state["diagnostics"][k] for k in ("updates", "start_spread", "warned")}
    loss.load_state_dict({"_extra_state": state})


def test_the_loss_refuses_a_state_that_is_not_a_dict():
    with pytest.raises(TypeError, match="consistency state must be a dict .* got str"):
        AttentionConsistencyLoss().load_state_dict("consistency")


@pytest.mark.parametrize(
    "state, error, match",
    [
        ({"start": -3, "reference": None, "observed": 0, "sum": 0.0}, ValueError, "Ramp state 'start' must be None or"),
        ({"start": None, "reference": None, "observed": 0}, ValueError, "Ramp state lacks the entry 'sum'"),
        (None, TypeError, "Ramp state must be a dict"),
    ],
)
def test_a_bad_ramp_state_is_refused_by_entry(state, error, match):
    ramp = Ramp(10, trigger=0.5)
    with pytest.raises(error, match=match):
        ramp.load_state_dict(state)
    assert ramp.state_dict() == Ramp(10, trigger=0.5).state_dict()


def test_a_bad_diagnostics_state_is_refused_by_entry():
    diagnostics = ConsistencyDiagnostics()
    with pytest.raises(ValueError, match="diagnostics state lacks the entry 'warned'"):
        diagnostics.load_state_dict({"updates": 1, "start_spread": None})
    with pytest.raises(ValueError, match=r"diagnostics state 'window' row 1 must be 3 numbers"):
        diagnostics.load_state_dict(
            {"updates": 3, "start_spread": None, "warned": [], "window": [[1.0, 2.0, 3.0], [1.0]]}
        )
    assert diagnostics.updates == 0


# --------------------------------------------------------------------------- item 15: meta tensors


def test_meta_tensors_are_refused_by_name(model):
    meta = torch.randn(2, 5, 7, 7, device="meta")
    for flag in (None, False, True):
        with pytest.raises(ValueError, match="heatmaps is on the meta device"):
            attention_consistency(meta, meta, "flip", check_finite_values=flag)
        with pytest.raises(ValueError, match="heatmaps is on the meta device"):
            attention_consistency(meta, meta, "flip", check_finite_values=flag, distance="relative")
    loss = AttentionConsistencyLoss()
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match="images is on the meta device"):
            loss.views(model, cam, torch.randn(2, 3, 28, 28, device="meta"), ["flip"])
        with pytest.raises(ValueError, match="targets is on the meta device"):
            loss.views(
                model,
                cam,
                torch.randn(2, 3, 28, 28),
                ["flip"],
                targets=torch.zeros(2, 5, device="meta"),
                criterion=count,
            )


# --------------------------------------------------------------------------- item 16: non-finite images


@pytest.mark.parametrize("transforms, mode", [(["flip"], "independent"), (["flip", "scale"], "product")])
def test_non_finite_heatmaps_name_the_input_batch_when_it_is_the_cause(model, transforms, mode):
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    images[0, 0, 3, 3] = float("nan")
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model) as cam:
        with pytest.raises(
            ValueError, match=r"images has 1 non-finite values .*: the input batch is not finite"
        ) as info:
            loss.views(model, cam, images, transforms, mode=mode)
    assert "heatmaps has" in str(info.value)  # what the heatmaps' check found comes along
    # a resized batch is named too
    clean = torch.randn(2, 3, 28, 28)
    small = torch.randn(2, 3, 24, 24)
    small[1, 2, 0, 0] = float("inf")
    with CAMHook(model) as cam:
        with pytest.raises(ValueError, match=r"resized\[0\] has 1 non-finite values"):
            loss.views(model, cam, clean, ["flip", Scale(size=24)], mode="product", resized=small)


def test_non_finite_heatmaps_from_finite_images_still_name_the_heatmaps(model):
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    loss = AttentionConsistencyLoss(diagnostics=False)
    with CAMHook(model, check=False) as cam:
        with pytest.raises(ValueError, match=r"^heatmaps has \d+ non-finite values"):
            loss.views(model, cam, torch.rand(2, 3, 28, 28), ["flip"])


# --------------------------------------------------------------------------- smaller: Translate, the scale cache


def test_a_fractional_shift_builds_no_tensor_from_host_data():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    images = torch.randn(2, 3, 14, 14)
    translate = Translate(dx=0.1, dy=-0.05)
    expected_shift = torch.tensor([[0.1 * 14, -0.05 * 14]]).expand(2, 2)
    with Ops() as ops:
        shifted = translate.apply_image(images)
        maps, mask = translate.apply_heatmaps(torch.randn(2, 5, 7, 7))
    # torch.tensor(...) of Python numbers is aten.lift_fresh (then a copy to the device)
    assert not [op for op in ops.seen if "lift_fresh" in op], ops.seen
    from kornia.geometry.transform import translate as kornia_translate

    torch.testing.assert_close(shifted, kornia_translate(images, expected_shift, mode="bilinear", align_corners=False))
    assert mask is not None and maps.shape == (2, 5, 7, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fractional_shift_on_the_gpu_does_not_wait_for_the_device():
    images = torch.randn(2, 3, 14, 14, device="cuda")
    translate = Translate(dx=0.1)
    translate.apply_image(images)  # kornia's first call may set things up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        translate.apply_image(images)
        translate.apply_heatmaps(torch.randn(2, 5, 7, 7, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_scale_terms_cache_is_bounded_and_stays_right():
    from attn_consistency.transforms import scale as transforms

    transforms._segment_cache.clear()
    generator = torch.Generator().manual_seed(0)
    for h in range(1, 21):
        for w in range(1, 21):
            scale_consistency(
                torch.randn(1, 1, h, w, generator=generator), torch.randn(1, 1, w, h, generator=generator)
            )
    assert len(transforms._segment_cache) == transforms._SEGMENT_CACHE_SIZE < 400
    # an evicted pair is rebuilt, and still equals the materialised LCM-grid oracle
    assert (1, 1, 1, 1, torch.device("cpu"), torch.float32) not in transforms._segment_cache
    m = torch.randn(2, 3, 1, 1, generator=generator, dtype=torch.float64)
    m_t = torch.randn(2, 3, 1, 1, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(scale_consistency(m, m_t), ((m - m_t) ** 2)[..., 0, 0])
    a = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    big, big_t = (torch.nn.functional.interpolate(x, size=42, mode="nearest") for x in (a, b))
    torch.testing.assert_close(scale_consistency(a, b), ((big - big_t) ** 2).mean((2, 3)))
    assert len(transforms._segment_cache) == transforms._SEGMENT_CACHE_SIZE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_restored_diagnostics_window_closes_on_the_gpu():
    # the restored rows are CPU tensors; the new ones are on the maps' device: one window, one device
    state = full_state()
    loss = AttentionConsistencyLoss(
        schedule=Ramp(10, trigger=0.5, window=2), diagnostics=ConsistencyDiagnostics(every=4)
    )
    loss.load_state_dict({"_extra_state": state})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConsistencyWarning)
        loss(torch.randn(2, 3, 7, 7, device="cuda"), torch.randn(2, 3, 7, 7, device="cuda"), "flip")
    assert loss.diagnostics.updates == 4 and "spread" in loss.diagnostics.last


def test_the_recommended_loss_is_the_relative_distance_with_the_triggered_ramp_of_the_run():
    from attn_consistency import AttentionConsistencyLoss, Ramp
    from examples.train import RECOMMENDED

    loss = AttentionConsistencyLoss.recommended(epochs=3, steps_per_epoch=41, weights={"flip": 0.5})
    by_hand = Ramp(round(0.2 * 3 * 41), trigger=0.75)
    assert loss.distance == "relative" and loss.weights == {"flip": 0.5}
    assert isinstance(loss.schedule, Ramp)
    assert (loss.schedule.steps, loss.schedule.trigger, loss.schedule.shape) == (25, 0.75, "linear")
    assert [loss.schedule(s) for s in range(0, 60, 7)] == [by_hand(s) for s in range(0, 60, 7)]
    # the training script's recommended setting is the same one
    assert RECOMMENDED == dict(distance="relative", warmup=0.2, warmup_trigger=0.75)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        AttentionConsistencyLoss.recommended(epochs=3, steps_per_epoch=0)
    with pytest.raises(TypeError, match="epochs"):
        AttentionConsistencyLoss.recommended(epochs=2.5, steps_per_epoch=10)


def test_a_nan_reference_of_an_older_checkpoint_is_measured_again_with_a_warning():
    from attn_consistency import Ramp
    from attn_consistency.strength import ConsistencyWarning

    ramp = Ramp(10, trigger=0.5, window=2)
    with pytest.warns(ConsistencyWarning, match="Ramp state 'reference' is nan"):
        ramp.load_state_dict({"start": None, "reference": float("nan"), "observed": 4, "sum": 0.0})
    assert ramp.reference is None
    for step, loss in enumerate([2.0, 2.0, 0.5, 0.5], start=4):  # a new reference, then a fall below half
        ramp(step)
        ramp.observe(torch.tensor(loss))
    assert ramp.reference == 2.0 and ramp.start == 8
