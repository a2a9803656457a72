import math

import pytest
import torch
from torch.autograd import gradcheck

from attn_consistency import WeightedBCEWithLogitsLoss, positive_ratio


def eq2_by_hand(logits, targets, ratio):
    """Paper Eq. 2-3 written out term by term, in float64 (moderate logits only)."""
    total = 0.0
    n, labels = targets.shape
    for i in range(n):
        for j in range(labels):
            x, y, p = float(logits[i, j]), float(targets[i, j]), float(ratio[j])
            w = math.exp(1 - p) if y == 1 else math.exp(p)
            sigma = 1 / (1 + math.exp(-x))
            total -= w * (y * math.log(sigma) + (1 - y) * math.log(1 - sigma))
    return total / n


def test_matches_equation_2_summed_over_labels_averaged_over_samples():
    gen = torch.Generator().manual_seed(0)
    targets = (torch.rand(6, 4, generator=gen) < 0.4).float()
    logits = torch.randn(6, 4, generator=gen) * 3
    ratio = positive_ratio(targets)
    loss = WeightedBCEWithLogitsLoss(ratio)(logits, targets)
    assert loss.item() == pytest.approx(eq2_by_hand(logits, targets, ratio), rel=1e-5)


def test_positive_ratio():
    targets = torch.tensor([[1, -1, 0], [1, 1, -1], [-1, 0, 0], [1, -1, 1]])
    torch.testing.assert_close(positive_ratio(targets, "signed"), torch.tensor([0.75, 0.25, 0.25]))
    torch.testing.assert_close(
        positive_ratio(targets, "signed", ignore_unspecified=True), torch.tensor([0.75, 1 / 3, 0.5])
    )


def test_stable_for_extreme_logits():
    targets = torch.tensor([[1.0, 0.0]])
    criterion = WeightedBCEWithLogitsLoss(torch.tensor([0.5, 0.5]))
    right = criterion(torch.tensor([[1000.0, -1000.0]]), targets)
    wrong = criterion(torch.tensor([[-1000.0, 1000.0]]), targets)
    assert right.item() == 0.0
    assert wrong.item() == pytest.approx(1000 * (math.exp(0.5) + math.exp(0.5)), rel=1e-6)


def test_signed_encoding_counts_unspecified_as_negative_by_default():
    ratio = torch.tensor([0.3, 0.6, 0.2])
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    signed = torch.tensor([[1.0, -1.0, 0.0]])
    binary = torch.tensor([[1.0, 0.0, 0.0]])
    as_reference = WeightedBCEWithLogitsLoss(ratio, encoding="signed")(logits, signed)
    torch.testing.assert_close(as_reference, WeightedBCEWithLogitsLoss(ratio)(logits, binary))
    ignoring = WeightedBCEWithLogitsLoss(ratio, encoding="signed", ignore_unspecified=True, reduction="none")
    terms = ignoring(logits, signed)
    assert terms[0, 2].item() == 0.0
    full = WeightedBCEWithLogitsLoss(ratio, reduction="none")(logits, binary)
    torch.testing.assert_close(terms[0, :2], full[0, :2])


def test_reductions():
    ratio = torch.tensor([0.2, 0.7])
    logits, targets = torch.randn(5, 2), (torch.rand(5, 2) < 0.5).float()
    terms = WeightedBCEWithLogitsLoss(ratio, reduction="none")(logits, targets)
    assert terms.shape == (5, 2)
    torch.testing.assert_close(WeightedBCEWithLogitsLoss(ratio, reduction="sum")(logits, targets), terms.sum())
    torch.testing.assert_close(WeightedBCEWithLogitsLoss(ratio)(logits, targets), terms.sum() / 5)


def test_float32_under_autocast():
    criterion = WeightedBCEWithLogitsLoss(torch.tensor([0.2, 0.7]))
    logits = torch.randn(3, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(logits, torch.ones(3, 2))
    assert loss.dtype == torch.float32


def test_gradcheck():
    criterion = WeightedBCEWithLogitsLoss(torch.tensor([0.2, 0.7, 0.5]))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    logits = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: criterion(x, targets), (logits,))


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (torch.randn(2, 3), torch.ones(2, 4), ValueError, r"same shape, got \(2, 3\) and \(2, 4\)"),
        (torch.randn(2, 4), torch.ones(2, 4), ValueError, "logits have 4 labels but pos_ratio has 3"),
        (torch.randn(2, 3, 1), torch.ones(2, 3), ValueError, r"logits must be 2-D \(N, L\)"),
        (
            torch.randn(2, 3),
            torch.full((2, 3), 2.0),
            ValueError,
            r"targets must hold only \(0.0, 1.0\) for encoding='binary', found \[2.0\]",
        ),
        ([[0.0, 1.0, 2.0]], torch.ones(1, 3), TypeError, "logits must be a torch.Tensor, got list"),
    ],
)
def test_bad_input(logits, targets, error, match):
    with pytest.raises(error, match=match):
        WeightedBCEWithLogitsLoss(torch.tensor([0.1, 0.2, 0.3]))(logits, targets)


def test_bad_construction():
    with pytest.raises(ValueError, match=r"pos_ratio must lie in \[0, 1\]"):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="encoding must be 'binary'"):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5]), encoding="pm1")
    with pytest.raises(
        ValueError, match=r"targets must hold only \(-1.0, 0.0, 1.0\) for encoding='signed', found \[2.0\]"
    ):
        positive_ratio(torch.tensor([[1.0, 2.0]]), "signed")


# ---------------------------------------------------------------- hostile input (issue 13)


def _problem(seed=0, n=6, labels=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, labels, generator=gen) * 3, torch.rand(n, labels, generator=gen) < 0.4


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int8, torch.uint8, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bool_and_integer_targets_give_the_float_target_loss(dtype, reduction):
    logits, positive = _problem()
    ratio = positive_ratio(positive.float())
    oracle = WeightedBCEWithLogitsLoss(ratio, reduction=reduction)(logits, positive.float())
    got = WeightedBCEWithLogitsLoss(ratio, reduction=reduction)(logits, positive.to(dtype))
    assert torch.equal(got, oracle)
    assert torch.equal(positive_ratio(positive.to(dtype)), ratio)
    assert ratio.tolist() == (positive.sum(0) / 6).tolist()


def test_signed_int8_targets_give_the_float_target_loss():
    signed = torch.tensor([[1, -1, 0], [1, 1, -1], [-1, 0, 0], [1, -1, 1]], dtype=torch.int8)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for ignore in (False, True):
        ratio = positive_ratio(signed, "signed", ignore)
        assert torch.equal(ratio, positive_ratio(signed.float(), "signed", ignore))
        criterion = WeightedBCEWithLogitsLoss(ratio, "signed", ignore)
        assert torch.equal(criterion(logits, signed), criterion(logits, signed.float()))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_targets_that_cannot_hold_minus_one_are_refused_as_signed(dtype):
    targets = torch.tensor([[1, 0], [0, 1]], dtype=dtype)
    match = (
        rf"targets of dtype {dtype} cannot hold -1 \(negative\), so with encoding='signed' every 0 would be unspecified"
    )
    with pytest.raises(TypeError, match=match):
        positive_ratio(targets, "signed")
    with pytest.raises(TypeError, match=match):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5, 0.5]), "signed")(torch.zeros(2, 2), targets)


def test_unsigned_255_is_not_taken_for_minus_one():
    targets = torch.tensor([[255, 0], [1, 1]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"targets must hold only \(0.0, 1.0\) for encoding='binary', found \[255.0\]"):
        positive_ratio(targets)
    with pytest.raises(ValueError, match=r"found \[255.0\]"):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5, 0.5]))(torch.zeros(2, 2), targets)


def test_nan_targets_are_reported():
    with pytest.raises(ValueError, match=r"targets must hold only \(0.0, 1.0\) for encoding='binary', found \[nan\]"):
        positive_ratio(torch.tensor([[1.0, math.nan]]))


def test_non_finite_logits_are_reported_on_the_cpu(monkeypatch):
    logits, positive = _problem()
    logits[1, 2], logits[4, 0] = math.nan, -math.inf
    criterion = WeightedBCEWithLogitsLoss(positive_ratio(positive))
    with pytest.raises(ValueError, match=r"logits has 2 non-finite values \(nan or inf\) out of 24"):
        criterion(logits, positive)
    unchecked = WeightedBCEWithLogitsLoss(positive_ratio(positive), check_finite_values=False)
    assert math.isnan(unchecked(logits, positive).item())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # never while compiling
    assert math.isnan(criterion(logits, positive).item())


def test_empty_batch_and_no_label():
    criterion = WeightedBCEWithLogitsLoss(torch.tensor([0.2, 0.7]), reduction="sum")
    assert criterion(torch.zeros(0, 2), torch.zeros(0, 2)).item() == 0.0
    none = WeightedBCEWithLogitsLoss(torch.tensor([0.2, 0.7]), reduction="none")
    assert none(torch.zeros(0, 2), torch.zeros(0, 2)).shape == (0, 2)
    with pytest.raises(
        ValueError, match=r"logits hold no sample \(shape \(0, 2\)\): the mean over samples is undefined"
    ):
        WeightedBCEWithLogitsLoss(torch.tensor([0.2, 0.7]))(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"targets must hold at least one sample, got shape \(0, 3\)"):
        positive_ratio(torch.zeros(0, 3))
    no_label = positive_ratio(torch.zeros(5, 0))
    assert no_label.shape == (0,) and no_label.dtype == torch.float32
    assert WeightedBCEWithLogitsLoss(no_label)(torch.zeros(5, 0), torch.zeros(5, 0)).item() == 0.0


@pytest.mark.parametrize(
    ("pos_ratio", "error", "match"),
    [
        (torch.tensor([0.5, math.nan]), ValueError, r"pos_ratio has 1 non-finite values \(nan or inf\) out of 2"),
        (torch.tensor([math.inf]), ValueError, r"pos_ratio has 1 non-finite values"),
        (
            torch.tensor([True, False]),
            TypeError,
            r"pos_ratio must be a real tensor of ratios in \[0, 1\], got dtype torch.bool",
        ),
        (torch.tensor([0.5 + 0j]), TypeError, r"pos_ratio must be a real tensor .* got dtype torch.complex64"),
        ("abc", TypeError, r"pos_ratio must be a tensor \(or a sequence\) of ratios, got str"),
        (None, TypeError, r"pos_ratio must be a tensor \(or a sequence\) of ratios, got NoneType"),
        (torch.full((2, 1), 0.5), ValueError, r"pos_ratio must be 1-D \(L,\), got shape \(2, 1\)"),
        (torch.tensor(0.5), ValueError, r"pos_ratio must be 1-D \(L,\), got shape \(\)"),
    ],
)
def test_bad_pos_ratio(pos_ratio, error, match):
    with pytest.raises(error, match=match):
        WeightedBCEWithLogitsLoss(pos_ratio)


def test_pos_ratio_as_a_list_equals_the_tensor():
    logits, positive = _problem(labels=2)
    from_list = WeightedBCEWithLogitsLoss([0.25, 0.5])(logits, positive)
    assert torch.equal(
        from_list, WeightedBCEWithLogitsLoss(torch.tensor([0.25, 0.5], dtype=torch.float64))(logits, positive)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ignore_unspecified": 1}, TypeError, r"ignore_unspecified must be a bool, got int 1"),
        ({"check_values": "yes"}, TypeError, r"check_values must be a bool or None, got str 'yes'"),
        ({"check_finite_values": 0}, TypeError, r"check_finite_values must be a bool or None, got int 0"),
        ({"reduction": None}, TypeError, r"reduction must be a str \('none', 'mean' or 'sum'\), got NoneType"),
        ({"reduction": "avg"}, ValueError, r"reduction must be 'none', 'mean' or 'sum', got 'avg'"),
        ({"encoding": None}, TypeError, r"encoding must be a str \('binary' or 'signed'\), got NoneType"),
        ({"encoding": ["binary"]}, TypeError, r"encoding must be a str \('binary' or 'signed'\), got list"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5]), **kwargs)


def test_bad_positive_ratio_options():
    with pytest.raises(TypeError, match=r"ignore_unspecified must be a bool, got str 'no'"):
        positive_ratio(torch.ones(2, 2), "signed", "no")
    with pytest.raises(TypeError, match=r"encoding must be a str"):
        positive_ratio(torch.ones(2, 2), 1)
    with pytest.raises(TypeError, match=r"targets must be a torch.Tensor, got list"):
        positive_ratio([[1, 0]])


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (
            torch.zeros(2, 2),
            torch.zeros(2, 2, device="meta"),
            ValueError,
            r"targets must be on the device of logits \(cpu\), got meta",
        ),
        (
            torch.zeros(2, 2),
            torch.zeros(2, 2, dtype=torch.complex64),
            TypeError,
            r"targets must be real-valued, got dtype torch.complex64",
        ),
        (
            torch.zeros(2, 2, dtype=torch.int64),
            torch.zeros(2, 2),
            TypeError,
            r"logits must be a floating-point tensor, got torch.int64",
        ),
        (torch.zeros(2, 2), torch.zeros(2, 2, 1), ValueError, r"targets must be 2-D \(N, L\), got shape \(2, 2, 1\)"),
    ],
)
def test_bad_forward_input(logits, targets, error, match):
    with pytest.raises(error, match=match):
        WeightedBCEWithLogitsLoss(torch.tensor([0.5, 0.5]))(logits, targets)


def test_criterion_on_another_device_than_the_logits():
    criterion = WeightedBCEWithLogitsLoss(torch.tensor([0.5, 0.5])).to("meta")
    with pytest.raises(ValueError, match=r"logits are on cpu but the criterion's weights on meta: move the criterion"):
        criterion(torch.zeros(2, 2), torch.zeros(2, 2))
