r"""The weighted sigmoid cross-entropy of the paper (Eq. 2-3).

.. math:: \ell_c = -\frac{1}{N} \sum_{i=1}^N \sum_{j=1}^L \omega_{ij}
   \left(y_{ij} \log \sigma(x_{ij}) + (1 - y_{ij}) \log (1 - \sigma(x_{ij}))\right),
   \qquad \omega_{ij} = \begin{cases} e^{1 - p_j} & y_{ij} = 1 \\ e^{p_j} & y_{ij} = 0 \end{cases}

with :math:`p_j` the share of positives of label :math:`j` in the training set. Summed over
labels and averaged over samples: a loss averaged over labels as well is :math:`L` times
smaller and lets the consistency term dominate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_reduction, check_tensor, data_checks_enabled

__all__ = ["WeightedBCEWithLogitsLoss", "positive_ratio"]

_ENCODINGS = {"binary": (0.0, 1.0), "signed": (-1.0, 0.0, 1.0)}


def _check_encoding(encoding: str) -> str:
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding must be 'binary' (0/1) or 'signed' (1/-1/0, 0 unspecified), got {encoding!r}")
    return encoding


def _check_values(name: str, targets: Tensor, encoding: str) -> None:
    allowed = torch.tensor(_ENCODINGS[encoding], dtype=targets.dtype, device=targets.device)
    bad = ~torch.isin(targets, allowed)
    if bool(bad.any()):
        found = sorted({float(v) for v in targets[bad].unique()[:5].tolist()})
        raise ValueError(f"{name} must hold only {_ENCODINGS[encoding]} for encoding={encoding!r}, found {found}")


def positive_ratio(targets: Tensor, encoding: str = "binary", ignore_unspecified: bool = False) -> Tensor:
    r"""The share of positives of each label, :math:`p_j` of Eq. 3.

    Args:
        targets: the training set's label matrix ``(N, L)``.
        encoding: ``'binary'`` (0/1) or ``'signed'`` (1 / -1 / 0 with 0 unspecified, as
            WIDER Attribute).
        ignore_unspecified: with ``'signed'``, count only specified entries in the
            denominator; by default unspecified entries count as negatives, as the
            reference code trains.

    Returns:
        Tensor ``(L,)`` in float32.

    Example:
        >>> positive_ratio(torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]]))
        tensor([0.7500, 0.2500])
    """
    check_tensor("targets", targets, 2, "(N, L)")
    _check_values("targets", targets, _check_encoding(encoding))
    if targets.shape[0] == 0:
        raise ValueError("targets must hold at least one sample")
    positives = (targets == 1).float().sum(0)
    if encoding == "signed" and ignore_unspecified:
        return positives / (targets != 0).float().sum(0).clamp_min(1.0)
    return positives / targets.shape[0]


class WeightedBCEWithLogitsLoss(nn.Module):
    r"""Weighted sigmoid cross-entropy (paper Eq. 2-3), from logits.

    Computed with ``binary_cross_entropy_with_logits`` in float32 (stable for any logit,
    also under autocast).

    Args:
        pos_ratio: :math:`p_j` per label ``(L,)``, e.g. from :func:`positive_ratio`.
        encoding: of the targets, ``'binary'`` (0/1) or ``'signed'`` (1 / -1 / 0).
        ignore_unspecified: with ``'signed'``, give unspecified (0) entries weight 0;
            by default they count as negatives, as the reference code trains.
        reduction: ``'mean'`` (summed over labels, averaged over samples, as Eq. 2),
            ``'sum'``, or ``'none'`` (the weighted ``(N, L)`` terms).
        check_values: check that the targets belong to the encoding; ``None`` checks CPU
            tensors only (on an accelerator the check would wait for the device).

    Shape:
        - logits: ``(N, L)``; targets: ``(N, L)``.
        - output: scalar, or ``(N, L)`` with ``reduction='none'``.

    Example:
        >>> targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> criterion = WeightedBCEWithLogitsLoss(positive_ratio(targets))
        >>> logits = torch.zeros(2, 2, requires_grad=True)
        >>> loss = criterion(logits, targets)
        >>> loss.backward()
    """

    pos_weight: Tensor
    neg_weight: Tensor

    def __init__(
        self,
        pos_ratio: Tensor,
        encoding: str = "binary",
        ignore_unspecified: bool = False,
        reduction: str = "mean",
        check_values: bool | None = None,
    ) -> None:
        super().__init__()
        pos_ratio = torch.as_tensor(pos_ratio, dtype=torch.float32)
        check_tensor("pos_ratio", pos_ratio, 1, "(L,)")
        if not bool(((pos_ratio >= 0) & (pos_ratio <= 1)).all()):
            raise ValueError(f"pos_ratio must lie in [0, 1], got min {float(pos_ratio.min())} max {float(pos_ratio.max())}")
        self.encoding = _check_encoding(encoding)
        self.ignore_unspecified = ignore_unspecified
        self.reduction = check_reduction(reduction)
        self.check_values = check_values
        self.register_buffer("pos_weight", torch.exp(1.0 - pos_ratio))
        self.register_buffer("neg_weight", torch.exp(pos_ratio))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_tensor("logits", logits, 2, "(N, L)", floating=True)
        check_tensor("targets", targets, 2, "(N, L)")
        if logits.shape != targets.shape:
            raise ValueError(f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}")
        if logits.shape[1] != self.pos_weight.shape[0]:
            raise ValueError(f"logits have {logits.shape[1]} labels but pos_ratio has {self.pos_weight.shape[0]}")
        if data_checks_enabled(self.check_values, targets):
            _check_values("targets", targets, self.encoding)
        positive = targets == 1
        weight = torch.where(positive, self.pos_weight, self.neg_weight)
        if self.encoding == "signed" and self.ignore_unspecified:
            weight = weight * (targets != 0)
        with torch.autocast(logits.device.type, enabled=False):
            dtype = torch.promote_types(logits.dtype, torch.float32)
            terms = F.binary_cross_entropy_with_logits(
                logits.to(dtype), positive.to(dtype), weight=weight.to(dtype), reduction="none"
            )
        if self.reduction == "mean":
            return terms.sum() / logits.shape[0]
        if self.reduction == "sum":
            return terms.sum()
        return terms

    def extra_repr(self) -> str:
        return f"labels={self.pos_weight.shape[0]}, encoding={self.encoding!r}, reduction={self.reduction!r}"
