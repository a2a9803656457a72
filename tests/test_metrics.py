"""Tests for attn_consistency.metrics, with scikit-learn as the oracle."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from attn_consistency.metrics import (
    average_precision,
    balanced_accuracy,
    example_based_metrics,
    label_based_metrics,
    label_precision_recall_f1,
    mean_average_precision,
    predict_labels,
)

SEEDS = [0, 1, 2, 3, 4]
ATOL = 1e-12  # float64 rounding: the same definition, summed in another order


def random_problem(seed: int, encoding: str = "binary") -> tuple[np.ndarray, np.ndarray]:
    """Logits with many ties and targets with edge-case labels.

    Label 0 has no positive, label 1 no negative, label 2 is never predicted positive.
    """
    rng = np.random.default_rng(seed)
    n, n_labels = int(rng.integers(50, 301)), int(rng.integers(5, 21))
    # Quantised scores: ties within a label, and exact zeros (threshold is strict).
    scores = rng.integers(-4, 5, size=(n, n_labels)) / 2.0
    scores[:, 3:5] = rng.normal(size=(n, 2))
    scores[:, 2] = -np.abs(scores[:, 2])
    prevalence = rng.uniform(0.05, 0.6, size=n_labels)
    positive = rng.random((n, n_labels)) < prevalence
    positive[:, 0] = False
    positive[:, 1] = True
    # Correlate scores with truth so the metrics are not all near chance.
    scores[:, 3:] += 1.5 * positive[:, 3:]
    if encoding == "binary":
        return scores, positive.astype(np.int64)
    targets = np.where(positive, 1, -1)
    unspecified = rng.random((n, n_labels)) < 0.2
    unspecified[:, 1] = False  # keep label 1 all-positive
    targets[unspecified] = 0
    return scores, targets


def sklearn_ap(scores: np.ndarray, targets: np.ndarray, drop_zeros: bool) -> np.ndarray:
    """Per-label sklearn AP; NaN where the kept entries have no positive."""
    out = []
    for label in range(targets.shape[1]):
        keep = targets[:, label] != 0 if drop_zeros else slice(None)
        y, s = targets[keep, label] == 1, scores[keep, label]
        out.append(average_precision_score(y, s) if y.any() else math.nan)
    return np.array(out)


# --------------------------------------------------------------------------- AP / mAP


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_with_ties(seed: int) -> None:
    scores, targets = random_problem(seed)
    assert len(np.unique(scores[:, 5])) < len(scores) // 4  # ties really present
    expected = sklearn_ap(scores, targets, drop_zeros=False)
    ap = average_precision(scores, targets)
    assert ap.shape == (targets.shape[1],) and ap.dtype == torch.float64
    np.testing.assert_allclose(ap.numpy(), expected, rtol=0, atol=ATOL)
    assert math.isnan(ap[0])  # label without positives
    mean_ap = mean_average_precision(scores, targets)
    assert mean_ap == pytest.approx(np.nanmean(expected), abs=ATOL)
    assert label_based_metrics(scores, targets)["mAP"] == mean_ap


def test_average_precision_ties_hand_computed() -> None:
    # Ranked: 0.9 (+), then a tie {0.5 (+), 0.5 (-), 0.5 (+)}, then 0.1 (-).
    # Precision at the tie counts the whole group: 3/4 for both tied positives.
    scores = torch.tensor([[0.5], [0.9], [0.5], [0.1], [0.5]])
    targets = torch.tensor([[1], [1], [0], [0], [1]])
    expected = (1.0 + 0.75 + 0.75) / 3
    assert average_precision(scores, targets).item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_signed_drops_unspecified(seed: int) -> None:
    scores, targets = random_problem(seed, "signed")
    assert (targets == 0).any() and (targets == -1).any()
    expected = sklearn_ap(scores, targets, drop_zeros=True)
    ap = average_precision(scores, targets, encoding="signed")
    np.testing.assert_allclose(ap.numpy(), expected, rtol=0, atol=ATOL)
    # Dropping is not the same as counting the zeros as negatives.
    as_negatives = sklearn_ap(scores, np.where(targets == 0, -1, targets), drop_zeros=True)
    assert not np.allclose(ap.numpy()[2:], as_negatives[2:])


def test_dropped_zero_trap_on_binary_targets() -> None:
    scores, targets = random_problem(7)
    # The bug this API prevents: dropping zeros of 0/1 targets drops every negative.
    naive = sklearn_ap(scores, targets, drop_zeros=True)
    np.testing.assert_allclose(naive[1:], 1.0, rtol=0, atol=ATOL)

    ap = average_precision(scores, targets, encoding="binary")
    np.testing.assert_allclose(ap.numpy(), sklearn_ap(scores, targets, drop_zeros=False), rtol=0, atol=ATOL)
    assert (ap[2:] < 1.0).all()

    # Declaring the 0/1 targets as signed reproduces the trap, with a warning.
    for fn in (average_precision, mean_average_precision, label_based_metrics):
        with pytest.warns(UserWarning, match="contain no -1"):
            fn(scores, targets, encoding="signed")
    with pytest.warns(UserWarning, match="encoding='binary'"):
        trapped = average_precision(scores, targets, encoding="signed")
    assert torch.all(trapped[1:] == 1.0)


def test_no_warning_for_genuine_signed_targets() -> None:
    scores, targets = random_problem(0, "signed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label_based_metrics(scores, targets, encoding="signed")


def test_map_all_labels_without_positives_is_nan() -> None:
    scores = torch.randn(6, 3)
    assert math.isnan(mean_average_precision(scores, torch.zeros(6, 3)))
    assert torch.isnan(average_precision(scores, torch.zeros(6, 3))).all()


# --------------------------------------------------------------------------------- mA


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("encoding", ["binary", "signed"])
def test_balanced_accuracy_matches_sklearn(seed: int, encoding: str) -> None:
    scores, targets = random_problem(seed, encoding)
    y, pred = targets == 1, scores > 0  # signed: unspecified counts as negative
    ma = balanced_accuracy(scores, targets, encoding=encoding)
    assert math.isnan(ma[0]) and math.isnan(ma[1])  # no positive / no negative
    expected = [balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(2, y.shape[1])]
    np.testing.assert_allclose(ma[2:].numpy(), expected, rtol=0, atol=ATOL)
    metrics = label_based_metrics(scores, targets, encoding=encoding)
    assert metrics["mA"] == pytest.approx(np.mean(expected), abs=ATOL)


def test_balanced_accuracy_threshold_for_probabilities() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.1, 0.55]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # label 0 at 0.5: TPR 1/2, TNR 1/2; label 1: TPR 1, TNR 2/3.
    ma = balanced_accuracy(probs, targets, threshold=0.5)
    np.testing.assert_allclose(ma.numpy(), [0.5, (1 + 2 / 3) / 2], rtol=0, atol=ATOL)


# ------------------------------------------------------------------------- P / R / F1


def sklearn_prf(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray | float]:
    kw = {"zero_division": 0}  # scikit-learn's default value, without the warning
    out: dict[str, np.ndarray | float] = {}
    for name, fn in (("P", precision_score), ("R", recall_score), ("F1", f1_score)):
        out[f"{name}-label"] = fn(y, pred, average=None, **kw)
        out[f"{name}-C"] = fn(y, pred, average="macro", **kw)
        out[f"{name}-O"] = fn(y.ravel(), pred.ravel(), **kw)
        assert out[f"{name}-O"] == pytest.approx(fn(y, pred, average="micro", **kw))
    cp, cr = out["P-C"], out["R-C"]
    out["F1-C-harmonic"] = 2 * cp * cr / (cp + cr)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("encoding", ["binary", "signed"])
def test_precision_recall_f1_match_sklearn(seed: int, encoding: str) -> None:
    scores, targets = random_problem(seed, encoding)
    y, pred = (targets == 1).astype(int), (scores > 0).astype(int)
    assert not pred[:, 2].any()  # a label with no predicted positive
    expected = sklearn_prf(y, pred)

    p, r, f1 = label_precision_recall_f1(scores, targets, encoding=encoding)
    for name, got in (("P", p), ("R", r), ("F1", f1)):
        np.testing.assert_allclose(got.numpy(), expected[f"{name}-label"], rtol=0, atol=ATOL)

    metrics = label_based_metrics(scores, targets, encoding=encoding)
    for key in ("P-C", "R-C", "F1-C", "F1-C-harmonic", "P-O", "R-O", "F1-O"):
        assert metrics[key] == pytest.approx(expected[key], abs=ATOL), key
    # The two F1-C variants are different numbers on this data.
    assert abs(metrics["F1-C"] - metrics["F1-C-harmonic"]) > 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_variants_match_numpy_construction(seed: int, k: int) -> None:
    scores, targets = random_problem(seed)
    # Explicit construction: the k highest scores per row, ties to the lower index.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    pred = np.zeros_like(targets)
    np.put_along_axis(pred, top, 1, axis=1)
    assert (pred.sum(1) == k).all()
    np.testing.assert_array_equal(predict_labels(scores, top_k=k).numpy(), pred.astype(bool))

    expected = sklearn_prf(targets, pred)
    metrics = label_based_metrics(scores, targets, top_k=k)
    for key in ("P-C", "R-C", "F1-C", "F1-C-harmonic", "P-O", "R-O", "F1-O"):
        assert metrics[f"{key}@{k}"] == pytest.approx(expected[key], abs=ATOL), key
    p, _, _ = label_precision_recall_f1(scores, targets, top_k=k)
    np.testing.assert_allclose(p.numpy(), expected["P-label"], rtol=0, atol=ATOL)


def test_label_based_metrics_keys_and_range() -> None:
    scores, targets = random_problem(3)
    base = ["mAP", "mA", "P-C", "R-C", "F1-C", "F1-C-harmonic", "P-O", "R-O", "F1-O"]
    metrics = label_based_metrics(scores, targets, top_k=3)
    top = ["P-C@3", "R-C@3", "F1-C@3", "F1-C-harmonic@3", "P-O@3", "R-O@3", "F1-O@3"]
    assert list(metrics) == base + top
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in metrics.values())
    assert list(label_based_metrics(scores, targets)) == base


def test_threshold_is_strict_and_top_k_tie_break() -> None:
    scores = torch.tensor([[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]])
    expected = torch.tensor([[False, True, False], [True, True, True]])
    assert torch.equal(predict_labels(scores), expected)
    top2 = torch.tensor([[True, True, False], [True, True, False]])
    assert torch.equal(predict_labels(scores, top_k=2), top2)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_signed_counts_unspecified_as_negative_except_for_ap(seed: int) -> None:
    scores, targets = random_problem(seed, "signed")
    signed = label_based_metrics(scores, targets, encoding="signed", top_k=3)
    binary = label_based_metrics(scores, (targets == 1).astype(int), top_k=3)
    assert signed.keys() == binary.keys()
    for key in signed.keys() - {"mAP"}:
        assert signed[key] == binary[key], key
    assert signed["mAP"] > binary["mAP"]  # fewer negatives once unspecified are dropped


def test_torch_and_numpy_inputs_agree() -> None:
    scores, targets = random_problem(5)
    from_numpy = label_based_metrics(scores, targets, top_k=3)
    t_scores = torch.from_numpy(scores).float().requires_grad_()
    from_torch = label_based_metrics(t_scores, torch.from_numpy(targets).bool(), top_k=3)
    # float32 scores: same ranking and same signs, so identical metrics.
    assert from_numpy == from_torch


# ---------------------------------------------------------------------- example-based


@pytest.mark.parametrize("seed", SEEDS)
def test_example_based_matches_sklearn_samples_average(seed: int) -> None:
    scores, targets = random_problem(seed)
    targets[:5] = 0  # examples with no true label
    scores[3:8] = -1.0  # examples with no predicted label (3, 4 also empty union)
    y, pred = targets, (scores > 0).astype(int)
    kw = {"average": "samples", "zero_division": 0}
    metrics = example_based_metrics(scores, targets)
    assert list(metrics) == ["Acc", "Prec", "Recall", "F1"]
    assert metrics["Acc"] == pytest.approx(jaccard_score(y, pred, **kw), abs=ATOL)
    assert metrics["Prec"] == pytest.approx(precision_score(y, pred, **kw), abs=ATOL)
    assert metrics["Recall"] == pytest.approx(recall_score(y, pred, **kw), abs=ATOL)
    p, r = metrics["Prec"], metrics["Recall"]
    assert metrics["F1"] == pytest.approx(2 * p * r / (p + r), abs=ATOL)
    assert example_based_metrics(pred.astype(bool), targets) == metrics


def test_example_based_zero_denominator_convention() -> None:
    # row 0: Y={0}, F={0,1} -> acc 1/2, prec 1/2, rec 1
    # row 1: Y={},  F={}    -> every denominator 0: contributes 0 to all three sums
    # row 2: Y={2}, F={}    -> acc 0, prec 0 (|F| = 0), rec 0
    preds = torch.tensor([[True, True, False], [False, False, False], [False, False, False]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    metrics = example_based_metrics(preds, targets)
    expected = {"Acc": 1 / 6, "Prec": 1 / 6, "Recall": 1 / 3, "F1": 2 / 9}
    assert metrics == pytest.approx(expected, abs=1e-15)
    # Same result from logits thresholded at 0 and from probabilities at 0.5.
    logits = torch.where(preds, 1.0, -1.0)
    assert example_based_metrics(logits, targets) == metrics
    assert example_based_metrics(torch.sigmoid(logits), targets, threshold=0.5) == metrics


def test_example_based_nothing_right_is_zero() -> None:
    preds = torch.tensor([[False, True], [False, False]])
    targets = torch.tensor([[1, 0], [0, 0]])
    assert example_based_metrics(preds, targets) == {
        "Acc": 0.0,
        "Prec": 0.0,
        "Recall": 0.0,
        "F1": 0.0,
    }


def test_example_based_signed_counts_unspecified_as_negative() -> None:
    scores, targets = random_problem(2, "signed")
    signed = example_based_metrics(scores, targets, encoding="signed")
    assert signed == example_based_metrics(scores, (targets == 1).astype(int))
    assert signed != example_based_metrics(scores, (targets != -1).astype(int))


# ----------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"scores \(5, 3\) and targets \(5, 4\)"):
        label_based_metrics(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"scores \(4, 3\) and targets \(5, 3\)"):
        example_based_metrics(torch.zeros(4, 3), torch.zeros(5, 3))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_non_2d_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"scores must be 2-D \(N, L\), got shape"):
        average_precision(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match=r"targets must be 2-D"):
        average_precision(torch.zeros(5, 2), torch.zeros(shape))
    with pytest.raises(ValueError, match=r"scores must be 2-D"):
        predict_labels(torch.zeros(shape))


def test_empty_input() -> None:
    with pytest.raises(ValueError, match=r"scores must be non-empty, got shape \(0, 3\)"):
        label_based_metrics(torch.zeros(0, 3), torch.zeros(0, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores(bad: float) -> None:
    scores = torch.zeros(4, 3)
    scores[1, 2] = bad
    scores[3, 0] = bad
    with pytest.raises(ValueError, match=r"scores must be finite, found 2 NaN/inf"):
        label_based_metrics(scores, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"scores must be finite"):
        predict_labels(scores.numpy())


def test_targets_outside_encoding() -> None:
    scores = torch.zeros(3, 2)
    signed = torch.tensor([[1, -1], [0, 1], [-1, 0]])
    with pytest.raises(ValueError, match=r"targets .* \{0, 1\} for encoding='binary', found \{-1\}"):
        average_precision(scores, signed)
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\} for encoding='signed', found \{0.5, 2\}"):
        label_based_metrics(scores, torch.tensor([[1, 0.5], [2, 1], [0, 0]]), encoding="signed")
    with pytest.raises(ValueError, match=r"found \{nan\}"):
        example_based_metrics(scores, torch.tensor([[1, math.nan], [0, 1], [0, 0]]))


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match=r"encoding must be 'binary' or 'signed', got 'wider'"):
        label_based_metrics(torch.zeros(3, 2), torch.zeros(3, 2), encoding="wider")


def test_bad_types() -> None:
    with pytest.raises(TypeError, match=r"scores must be a torch.Tensor or a numpy.ndarray, got list"):
        average_precision([[0.1, 0.2]], torch.zeros(1, 2))
    with pytest.raises(TypeError, match=r"targets has unsupported numpy dtype object"):
        average_precision(torch.zeros(1, 2), np.array([[1, None]], dtype=object))
    with pytest.raises(TypeError, match=r"threshold must be a float, got str"):
        label_based_metrics(torch.zeros(2, 2), torch.zeros(2, 2), threshold="0.5")


@pytest.mark.parametrize("k", [0, 4])
def test_top_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=rf"top_k must be in \[1, 3\] \(number of labels\), got {k}"):
        label_based_metrics(torch.zeros(2, 3), torch.zeros(2, 3), top_k=k)
    with pytest.raises(TypeError, match=r"top_k must be an int or None, got float"):
        predict_labels(torch.zeros(2, 3), top_k=3.0)


# ------------------------------------------------------------- hostile input (issue 13)

ALL_METRICS = [
    average_precision,
    mean_average_precision,
    balanced_accuracy,
    label_precision_recall_f1,
    label_based_metrics,
    example_based_metrics,
]
WITH_THRESHOLD = [
    lambda s, t, **kw: balanced_accuracy(s, t, **kw),
    lambda s, t, **kw: label_precision_recall_f1(s, t, **kw),
    lambda s, t, **kw: label_precision_recall_f1(s, t, top_k=1, **kw),
    lambda s, t, **kw: label_based_metrics(s, t, **kw),
    lambda s, t, **kw: label_based_metrics(s, t, top_k=1, **kw),
    lambda s, t, **kw: example_based_metrics(s, t, **kw),
    lambda s, t, **kw: example_based_metrics(s > 0, t, **kw),
    lambda s, t, **kw: predict_labels(s, **kw),
    lambda s, t, **kw: predict_labels(s, top_k=2, **kw),
]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("call", WITH_THRESHOLD)
def test_non_finite_threshold_is_refused(call, bad: float) -> None:
    # Before: threshold=nan predicted nothing and reported P = R = F1 = 0 without an error.
    scores, targets = random_problem(0)
    with pytest.raises(ValueError, match=rf"threshold must be a finite number, got {bad}"):
        call(scores, targets, threshold=bad)


@pytest.mark.parametrize("call", WITH_THRESHOLD)
def test_threshold_type_is_checked_even_where_unused(call) -> None:
    scores, targets = random_problem(0)
    with pytest.raises(TypeError, match=r"threshold must be a float, got str"):
        call(scores, targets, threshold="0.5")
    with pytest.raises(TypeError, match=r"threshold must be a float, got bool"):
        call(scores, targets, threshold=True)


def test_numpy_scalars_for_threshold_and_top_k() -> None:
    scores, targets = random_problem(1)
    expected = label_based_metrics(scores, targets, threshold=0.5, top_k=3)
    assert label_based_metrics(scores, targets, threshold=np.float32(0.5), top_k=np.int64(3)) == expected
    with pytest.raises(TypeError, match=r"top_k must be an int or None, got bool"):
        predict_labels(scores, top_k=True)


@pytest.mark.parametrize("fn", ALL_METRICS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_refused_by_every_metric(fn, bad: float) -> None:
    scores, targets = random_problem(2)
    scores[0, 3] = bad
    with pytest.raises(ValueError, match=r"scores must be finite, found 1 NaN/inf value\(s\)"):
        fn(scores, targets)


@pytest.mark.parametrize("fn", ALL_METRICS)
@pytest.mark.parametrize(
    "convert",
    [
        lambda t: t.astype(bool),
        lambda t: t.astype(np.uint8),
        lambda t: torch.from_numpy(t).bool(),
        lambda t: t.astype(np.float32),
    ],
)
def test_bool_and_integer_targets_give_the_int64_result(fn, convert) -> None:
    scores, targets = random_problem(3)
    expected = fn(scores, targets)
    got = fn(scores, convert(targets))
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(expected.values())), **exact)
    else:
        torch.testing.assert_close(got, expected, **exact)


@pytest.mark.parametrize("fn", ALL_METRICS)
@pytest.mark.parametrize("targets", [np.ones((3, 2), dtype=bool), torch.ones(3, 2, dtype=torch.uint8)])
def test_targets_that_cannot_hold_minus_one_are_refused_as_signed(fn, targets) -> None:
    # A bool or unsigned matrix declared signed is the dropped-zero trap: every 0 unspecified.
    with pytest.raises(
        TypeError, match=r"targets of dtype torch.(bool|uint8) cannot hold -1 \(negative\), so with encoding='signed'"
    ):
        fn(torch.randn(3, 2), targets, encoding="signed")


@pytest.mark.parametrize("encoding", [None, ["binary"], 1])
def test_encoding_of_the_wrong_type(encoding) -> None:
    with pytest.raises(TypeError, match=r"encoding must be a str \('binary' or 'signed'\), got"):
        label_based_metrics(torch.zeros(3, 2), torch.zeros(3, 2), encoding=encoding)


@pytest.mark.parametrize("fn", ALL_METRICS)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_input_refused_by_every_metric(fn, shape) -> None:
    shape_text = re.escape(str(shape))
    with pytest.raises(ValueError, match=rf"scores must be non-empty, got shape {shape_text}"):
        fn(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match=rf"targets must be non-empty, got shape {shape_text}"):
        fn(torch.zeros(3, 3), torch.zeros(shape))


def test_complex_input_refused() -> None:
    with pytest.raises(TypeError, match=r"scores must be real-valued, got dtype torch.complex64"):
        average_precision(torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"targets must be real-valued, got dtype torch.complex64"):
        average_precision(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.complex64))


def test_many_offending_target_values_are_capped() -> None:
    scores = torch.arange(-10.0, 10.0).reshape(4, 5)
    # scores passed as targets by mistake: the message lists a few values and the count
    with pytest.raises(
        ValueError, match=r"for encoding='binary', found \{-10, -9, -8, -7, -6, -5, -4, -3, \.\.\. \(18 values\)\}$"
    ):
        label_based_metrics(scores, scores)
