"""Evaluation metrics reported in the paper (label-based and example-based).

Label-based metrics (WIDER Attribute, MS-COCO): mAP, mA, precision / recall / F1 per
class (``-C``) and overall (``-O``), and the top-k variants used on MS-COCO.
Example-based metrics (PA-100K): Acc, Prec, Recall, F1. Everything is computed in
float64 on the CPU and returned as fractions in [0, 1], not percent. The attention
inconsistency of Table 2 (Eq. 5 over a test set) is :func:`attention_inconsistency`.

Label encodings (the ``encoding`` argument):

* ``"binary"``: targets in {0, 1}; 1 = positive, 0 = negative (PA-100K, MS-COCO). Bool
  targets are 0/1.
* ``"signed"``: targets in {1, -1, 0}; 1 = positive, -1 = negative, 0 = unspecified
  (WIDER Attribute). As in the reference code, unspecified entries are *dropped* for
  average precision and counted as *negatives* for every other metric.

The encoding is explicit on purpose: "dropping the zeros" of a 0/1-encoded dataset drops
every negative and makes every AP equal to 1.0. So ``"signed"`` refuses targets of a dtype
that cannot hold -1 (bool, unsigned integers), and warns when the targets hold no -1.

Every input is checked, with an error naming the argument: scores and targets must be
non-empty (N, L) real matrices of one shape, scores finite, targets in the encoding,
``threshold`` a finite number and ``top_k`` an int in [1, L].

Conventions where a ratio is undefined:

* The AP of a label with no positive entry, and the mA of a label with no positive or
  no negative entry, are NaN; ``mAP`` and ``mA`` average over the other labels (NaN when
  no label is left). scikit-learn returns 0.0 (AP) or a one-class score (balanced
  accuracy) there instead.
* Precision, recall and F1 with a zero denominator are 0, scikit-learn's default
  ``zero_division``; such labels stay in the ``-C`` averages (like ``average='macro'``).
* Example-based: an example whose denominator is 0 contributes 0 and the mean still
  divides by N (reference code; scikit-learn's ``average='samples'`` does the same).
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TypeAlias

import torch
from torch import Tensor

from ._validation import ENCODINGS, check_encoding, check_finite_number, check_target_dtype
from .consistency import attention_inconsistency

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Encoding",
    "attention_inconsistency",
    "average_precision",
    "balanced_accuracy",
    "example_based_metrics",
    "label_based_metrics",
    "label_precision_recall_f1",
    "mean_average_precision",
    "predict_labels",
]

Encoding: TypeAlias = Literal["binary", "signed"]
ArrayLike: TypeAlias = "Tensor | np.ndarray"


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    """Detached CPU tensor from a torch tensor or a numpy array."""
    if isinstance(x, Tensor):
        return x.detach().cpu()
    # An ndarray can only exist if numpy is already imported: torch stays the only need.
    np_module = sys.modules.get("numpy")
    if np_module is not None and isinstance(x, np_module.ndarray):
        try:
            return torch.from_numpy(np_module.ascontiguousarray(x))
        except TypeError as err:
            raise TypeError(f"{name} has unsupported numpy dtype {x.dtype}") from err
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def _check_matrix(x: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, L), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")


def _check_finite(scores: Tensor) -> Tensor:
    n_bad = int((~torch.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"scores must be finite, found {n_bad} NaN/inf value(s)")
    return scores


def _format_set(values: Iterable[float], limit: int = 8) -> str:
    # Capped: scores passed as targets by mistake would list every distinct score.
    values = list(values)
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return "{" + shown + (f", ... ({len(values)} values)" if len(values) > limit else "") + "}"


def _prepare(scores: ArrayLike, targets: ArrayLike, encoding: Encoding) -> tuple[Tensor, Tensor]:
    """Validate and return (scores, targets) as float64 (N, L) tensors."""
    check_encoding(encoding)
    s = _as_tensor(scores, "scores")
    t = _as_tensor(targets, "targets")
    _check_matrix(s, "scores")
    _check_matrix(t, "targets")
    if s.shape != t.shape:
        raise ValueError(
            f"scores and targets must have the same shape, got scores {tuple(s.shape)} and targets {tuple(t.shape)}"
        )
    check_target_dtype("targets", t, encoding)
    s = _check_finite(s.to(torch.float64))
    t = t.to(torch.float64)
    allowed = ENCODINGS[encoding]
    offending = [v for v in torch.unique(t).tolist() if v not in allowed]
    if offending:
        raise ValueError(
            f"targets must take values in {_format_set(allowed)} for "
            f"encoding={encoding!r}, found {_format_set(offending)}"
        )
    return s, t


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den == 0`` (scikit-learn's default zero_division)."""
    nonzero = den > 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


def _nanmean(x: Tensor) -> float:
    return float(torch.nanmean(x))


def _check_threshold(threshold: object) -> float:
    # NaN would predict nothing positive (every comparison is False): a silent wrong score.
    try:
        return check_finite_number("threshold", threshold)
    except TypeError:
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}") from None


def _predict(scores: Tensor, threshold: float, top_k: int | None) -> Tensor:
    # Checked with top_k too, where it is unused: a bad value is a bug all the same.
    threshold = _check_threshold(threshold)
    if top_k is None:
        return scores > threshold
    given: object = top_k  # checked as any object: a caller's wrong type must not slip through
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        raise TypeError(f"top_k must be an int or None, got {type(given).__name__}")
    top_k = int(given)
    n_labels = scores.shape[1]
    if not 1 <= top_k <= n_labels:
        raise ValueError(f"top_k must be in [1, {n_labels}] (number of labels), got {top_k}")
    # A stable sort makes ties at the k-th score deterministic: lower label index wins.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def predict_labels(scores: ArrayLike, *, threshold: float = 0.0, top_k: int | None = None) -> Tensor:
    r"""Binary predictions from scores, by threshold or by top-k.

    With ``top_k=None`` a label is predicted positive when
    :math:`s_{il} > \text{threshold}` (the reference code's rule ``logit > 0``). With
    ``top_k=k`` each example predicts its k highest scores as positive (the MS-COCO
    top-3 protocol) and ``threshold`` is ignored; ties at the k-th score go to the lower
    label index.

    Args:
        scores: (N, L) logits or probabilities, finite.
        threshold: decision threshold (0.0 for logits, 0.5 for probabilities); a finite
            number, checked also with ``top_k``.
        top_k: number of labels predicted per example, in [1, L], or None to threshold.

    Returns:
        (N, L) bool tensor.

    Example:
        >>> predict_labels(torch.tensor([[0.3, -1.0, 2.0]]), top_k=2)
        tensor([[ True, False,  True]])
    """
    s = _as_tensor(scores, "scores")
    _check_matrix(s, "scores")
    return _predict(_check_finite(s.to(torch.float64)), threshold, top_k)


def _warn_if_no_negatives(targets: Tensor, encoding: Encoding) -> None:
    # stacklevel 3: the user's call of the public function that called this helper.
    if encoding == "signed" and not (targets == -1).any():
        warnings.warn(
            "encoding='signed' but targets contain no -1: every 0 is treated as "
            "unspecified and dropped, so AP ignores all negatives; use "
            "encoding='binary' for 0/1 targets",
            stacklevel=3,
        )


def _average_precision(s: Tensor, t: Tensor, encoding: Encoding) -> Tensor:
    counted = (t != 0) if encoding == "signed" else torch.ones_like(t, dtype=torch.bool)
    hit = ((t == 1) & counted).to(torch.float64)

    # Label-major (L, N), so that searchsorted runs batched over labels.
    order = torch.sort(s.T, dim=1, descending=True, stable=True).indices
    ranked_hit = torch.gather(hit.T, 1, order)
    true_pos = torch.cumsum(ranked_hit, dim=1)
    n_counted = torch.cumsum(torch.gather(counted.T, 1, order).to(torch.float64), dim=1)
    # Tied scores are one threshold: every member of a tie group gets the precision at
    # the group's last position, found by searchsorted on the ascending negated scores.
    neg = (-torch.gather(s.T, 1, order)).contiguous()
    group_end = torch.searchsorted(neg, neg, right=True) - 1
    precision = _safe_div(torch.gather(true_pos, 1, group_end), torch.gather(n_counted, 1, group_end))
    n_pos = true_pos[:, -1]
    ap = (ranked_hit * precision).sum(dim=1) / n_pos
    return torch.where(n_pos > 0, ap, torch.nan)


def average_precision(scores: ArrayLike, targets: ArrayLike, *, encoding: Encoding = "binary") -> Tensor:
    r"""Per-label non-interpolated average precision.

    For label l, with :math:`P_l` positives and :math:`\mathrm{Prec}_l(t)` the precision
    of the prediction "score >= t":

    .. math::
        \mathrm{AP}_l = \frac{1}{P_l} \sum_{i:\, y_{il}=1} \mathrm{Prec}_l(s_{il})

    Tied scores form one threshold (the precision at a tie counts the whole tie group),
    so this equals scikit-learn's ``average_precision_score`` on each column, to float64
    rounding. With ``encoding="signed"`` the unspecified (0) entries of a label are
    dropped before ranking (a warning is raised when the targets hold no -1 at all: 0/1
    targets declared as signed would lose every negative).

    Args:
        scores: (N, L) logits or probabilities; only their order within a label matters.
        targets: (N, L) labels in the given ``encoding``.
        encoding: ``"binary"`` (0/1) or ``"signed"`` (1 / -1 / 0 = unspecified).

    Returns:
        (L,) float64 tensor; NaN for a label with no positive entry.

    Example:
        >>> scores = torch.tensor([[0.9], [0.8], [0.1]])
        >>> average_precision(scores, torch.tensor([[1], [0], [1]]))
        tensor([0.8333], dtype=torch.float64)
    """
    s, t = _prepare(scores, targets, encoding)
    _warn_if_no_negatives(t, encoding)
    return _average_precision(s, t, encoding)


def mean_average_precision(scores: ArrayLike, targets: ArrayLike, *, encoding: Encoding = "binary") -> float:
    r"""mAP: the mean of :func:`average_precision` over labels with a positive entry.

    .. math::
        \mathrm{mAP} = \frac{1}{|\mathcal{L}|} \sum_{l \in \mathcal{L}} \mathrm{AP}_l,
        \quad \mathcal{L} = \{l : P_l > 0\}

    Args:
        scores: (N, L) logits or probabilities.
        targets: (N, L) labels in the given ``encoding``.
        encoding: ``"binary"`` or ``"signed"`` (see :func:`average_precision`).

    Returns:
        A float in [0, 1]; NaN when no label has a positive entry.
    """
    s, t = _prepare(scores, targets, encoding)
    _warn_if_no_negatives(t, encoding)
    return _nanmean(_average_precision(s, t, encoding))


def _confusion(pred: Tensor, positive: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(TP, FP, FN, TN) counts as float64, summed along ``dim``."""
    tp = (pred & positive).sum(dim).to(torch.float64)
    fp = (pred & ~positive).sum(dim).to(torch.float64)
    fn = (~pred & positive).sum(dim).to(torch.float64)
    tn = (~pred & ~positive).sum(dim).to(torch.float64)
    return tp, fp, fn, tn


def _balanced_accuracy(pred: Tensor, positive: Tensor) -> Tensor:
    tp, fp, fn, tn = _confusion(pred, positive, dim=0)
    n_pos, n_neg = tp + fn, tn + fp
    ma = (_safe_div(tp, n_pos) + _safe_div(tn, n_neg)) / 2
    return torch.where((n_pos > 0) & (n_neg > 0), ma, torch.nan)


def balanced_accuracy(
    scores: ArrayLike,
    targets: ArrayLike,
    *,
    encoding: Encoding = "binary",
    threshold: float = 0.0,
) -> Tensor:
    r"""Per-label mean of the true-positive and true-negative rates (the terms of mA).

    .. math::
        \mathrm{mA}_l = \frac{1}{2}\left(\frac{TP_l}{TP_l + FN_l}
        + \frac{TN_l}{TN_l + FP_l}\right)

    Predictions are ``scores > threshold``; with ``encoding="signed"`` the unspecified
    (0) entries count as negatives.

    Args:
        scores: (N, L) logits or probabilities.
        targets: (N, L) labels in the given ``encoding``.
        encoding: ``"binary"`` or ``"signed"``.
        threshold: predicted positive when ``score > threshold``.

    Returns:
        (L,) float64 tensor; NaN for a label with no positive or no negative entry (one
        of the two rates is undefined). The paper's mA is its NaN-ignoring mean.
    """
    s, t = _prepare(scores, targets, encoding)
    return _balanced_accuracy(_predict(s, threshold, None), t == 1)


def _precision_recall_f1(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (
        _safe_div(tp, tp + fp),
        _safe_div(tp, tp + fn),
        _safe_div(2 * tp, 2 * tp + fp + fn),
    )


def label_precision_recall_f1(
    scores: ArrayLike,
    targets: ArrayLike,
    *,
    encoding: Encoding = "binary",
    threshold: float = 0.0,
    top_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-label precision, recall and F1.

    .. math::
        P_l = \frac{TP_l}{TP_l + FP_l}, \quad R_l = \frac{TP_l}{TP_l + FN_l}, \quad
        F1_l = \frac{2\, TP_l}{2\, TP_l + FP_l + FN_l}

    A zero denominator gives 0 (scikit-learn's default). Predictions as in
    :func:`predict_labels`; with ``encoding="signed"`` the unspecified (0) entries count
    as negatives.

    Args:
        scores: (N, L) logits or probabilities.
        targets: (N, L) labels in the given ``encoding``.
        encoding: ``"binary"`` or ``"signed"``.
        threshold: predicted positive when ``score > threshold`` (unused with top_k).
        top_k: predict the k highest scores of each example instead of thresholding.

    Returns:
        Three (L,) float64 tensors: precision, recall, F1.
    """
    s, t = _prepare(scores, targets, encoding)
    tp, fp, fn, _ = _confusion(_predict(s, threshold, top_k), t == 1, dim=0)
    return _precision_recall_f1(tp, fp, fn)


def _prf_summary(pred: Tensor, positive: Tensor, suffix: str) -> dict[str, float]:
    tp, fp, fn, _ = _confusion(pred, positive, dim=0)
    cp, cr, cf1 = (float(x.mean()) for x in _precision_recall_f1(tp, fp, fn))
    op, or_, of1 = (float(x) for x in _precision_recall_f1(tp.sum(), fp.sum(), fn.sum()))
    return {
        f"P-C{suffix}": cp,
        f"R-C{suffix}": cr,
        f"F1-C{suffix}": cf1,
        f"F1-C-harmonic{suffix}": 2 * cp * cr / (cp + cr) if cp + cr > 0 else 0.0,
        f"P-O{suffix}": op,
        f"R-O{suffix}": or_,
        f"F1-O{suffix}": of1,
    }


def label_based_metrics(
    scores: ArrayLike,
    targets: ArrayLike,
    *,
    encoding: Encoding = "binary",
    threshold: float = 0.0,
    top_k: int | None = None,
) -> dict[str, float]:
    r"""All label-based metrics of the paper, as fractions in [0, 1].

    Keys, in this order (predictions are ``score > threshold``):

    * ``"mAP"``: :func:`mean_average_precision` (labels with no positive ignored).
    * ``"mA"``: NaN-ignoring mean of :func:`balanced_accuracy`.
    * ``"P-C"``, ``"R-C"``: mean over labels of per-label precision / recall.
    * ``"F1-C"``: mean over labels of per-label F1 (the reference code's F1-C).
    * ``"F1-C-harmonic"``: :math:`2\,\mathrm{CP}\,\mathrm{CR}/(\mathrm{CP}+\mathrm{CR})`
      from ``P-C`` and ``R-C``, the variant of MS-COCO papers (0 when both are 0).
    * ``"P-O"``, ``"R-O"``, ``"F1-O"``: the same ratios over all N x L example-label
      pairs, e.g. :math:`\mathrm{OP} = \sum_l TP_l / \sum_l (TP_l + FP_l)`.

    With ``top_k=k`` the seven P/R/F1 keys follow again with the suffix ``"@k"``
    (``"P-C@3"``, ..., ``"F1-O@3"``), computed on each example's k highest scores.

    Args:
        scores: (N, L) logits or probabilities.
        targets: (N, L) labels in the given ``encoding``. With ``"signed"`` the
            unspecified (0) entries are dropped for AP and count as negatives elsewhere.
        encoding: ``"binary"`` (0/1) or ``"signed"`` (1 / -1 / 0).
        threshold: predicted positive when ``score > threshold`` (0.0 for logits).
        top_k: also report the top-k variants (3 on MS-COCO).

    Returns:
        dict from metric name to float.

    Example:
        >>> scores = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [1.0, 0.2]])
        >>> targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
        >>> m = label_based_metrics(scores, targets, top_k=1)
        >>> m["mAP"], m["F1-O"], m["P-C@1"]
        (1.0, 0.8571428571428571, 1.0)
    """
    s, t = _prepare(scores, targets, encoding)
    _warn_if_no_negatives(t, encoding)
    positive = t == 1
    pred = _predict(s, threshold, None)
    metrics = {
        "mAP": _nanmean(_average_precision(s, t, encoding)),
        "mA": _nanmean(_balanced_accuracy(pred, positive)),
    }
    metrics |= _prf_summary(pred, positive, "")
    if top_k is not None:
        metrics |= _prf_summary(_predict(s, threshold, top_k), positive, f"@{top_k}")
    return metrics


def example_based_metrics(
    scores: ArrayLike,
    targets: ArrayLike,
    *,
    encoding: Encoding = "binary",
    threshold: float = 0.0,
) -> dict[str, float]:
    r"""Example-based metrics of PA-100K, as fractions in [0, 1].

    With :math:`Y_i` the true and :math:`F_i` the predicted label set of example i:

    .. math::
        \mathrm{Acc} = \frac{1}{N}\sum_i \frac{|Y_i \cap F_i|}{|Y_i \cup F_i|}, \quad
        \mathrm{Prec} = \frac{1}{N}\sum_i \frac{|Y_i \cap F_i|}{|F_i|}, \quad
        \mathrm{Recall} = \frac{1}{N}\sum_i \frac{|Y_i \cap F_i|}{|Y_i|}, \quad
        \mathrm{F1} = \frac{2\,\mathrm{Prec}\,\mathrm{Recall}}
        {\mathrm{Prec} + \mathrm{Recall}}

    As in the reference code, an example whose denominator is 0 (empty union, nothing
    predicted, or no true label) adds 0 to its sum and the mean still divides by N; F1
    is 0 when Prec + Recall = 0. Acc, Prec and Recall then equal scikit-learn's
    ``jaccard_score``, ``precision_score`` and ``recall_score`` with
    ``average='samples'``; F1 is the harmonic mean of the two averages, not
    scikit-learn's mean of per-example F1.

    Args:
        scores: (N, L) scores, thresholded as ``score > threshold``; a bool tensor or
            array is taken as the predictions themselves.
        targets: (N, L) labels in the given ``encoding`` (unspecified: negative).
        encoding: ``"binary"`` (0/1) or ``"signed"`` (1 / -1 / 0).
        threshold: predicted positive when ``score > threshold``.

    Returns:
        ``{"Acc": ..., "Prec": ..., "Recall": ..., "F1": ...}``.

    Example:
        >>> preds = torch.tensor([[True, True, False], [False, False, False]])
        >>> targets = torch.tensor([[1, 0, 0], [0, 0, 1]])
        >>> example_based_metrics(preds, targets)
        {'Acc': 0.25, 'Prec': 0.25, 'Recall': 0.5, 'F1': 0.3333333333333333}
    """
    raw = _as_tensor(scores, "scores")
    s, t = _prepare(raw, targets, encoding)
    if raw.dtype == torch.bool:
        _check_threshold(threshold)  # unused with given predictions: a bad value is a bug all the same
        pred = raw
    else:
        pred = _predict(s, threshold, None)
    positive = t == 1
    inter = (pred & positive).sum(1).to(torch.float64)
    union = (pred | positive).sum(1).to(torch.float64)
    acc = float(_safe_div(inter, union).mean())
    prec = float(_safe_div(inter, pred.sum(1).to(torch.float64)).mean())
    rec = float(_safe_div(inter, positive.sum(1).to(torch.float64)).mean())
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"Acc": acc, "Prec": prec, "Recall": rec, "F1": f1}
