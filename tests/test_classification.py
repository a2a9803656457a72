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
        (torch.randn(2, 3), torch.full((2, 3), 2.0), ValueError, r"targets must hold only \(0.0, 1.0\) for encoding='binary', found \[2.0\]"),
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
    with pytest.raises(ValueError, match=r"targets must hold only \(-1.0, 0.0, 1.0\) for encoding='signed', found \[2.0\]"):
        positive_ratio(torch.tensor([[1.0, 2.0]]), "signed")
