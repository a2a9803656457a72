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

from ._validation import (
    ENCODINGS,
    check_bool,
    check_encoding,
    check_finite,
    check_reduction,
    check_target_dtype,
    check_tensor,
    data_checks_enabled,
)

__all__ = ["WeightedBCEWithLogitsLoss", "positive_ratio"]


def _check_targets(targets: object, encoding: str) -> Tensor:
    return check_target_dtype("targets", check_tensor("targets", targets, 2, "(N, L)"), encoding)


def _check_values(name: str, targets: Tensor, encoding: str) -> None:
    allowed = ENCODINGS[encoding]
    # One comparison per allowed value rather than torch.isin: it works for every dtype
    # (bool included), and a value an unsigned dtype cannot hold (-1) is never compared,
    # so it cannot wrap around to 255 and pass.
    bad = torch.ones_like(targets, dtype=torch.bool)
    for value in allowed:
        if value >= 0 or targets.is_signed():
            bad &= targets != value
    if bool(bad.any()):
        found = sorted({float(v) for v in targets[bad].unique()[:5].tolist()})  # type: ignore[no-untyped-call]
        raise ValueError(f"{name} must hold only {allowed} for encoding={encoding!r}, found {found}")


def positive_ratio(targets: Tensor, encoding: str = "binary", ignore_unspecified: bool = False) -> Tensor:
    r"""The share of positives of each label, :math:`p_j` of Eq. 3.

    Args:
        targets: the training set's label matrix ``(N, L)``, of any real dtype; a bool
            matrix is 0/1 (``'binary'`` only: it cannot hold the -1 of ``'signed'``).
        encoding: ``'binary'`` (0/1) or ``'signed'`` (1 / -1 / 0 with 0 unspecified, as
            WIDER Attribute).
        ignore_unspecified: with ``'signed'``, count only specified entries in the
            denominator; by default unspecified entries count as negatives, as the
            reference code trains. No effect with ``'binary'``.

    Returns:
        Tensor ``(L,)`` in float32; empty for ``L = 0``. A label with no specified
        entry (``ignore_unspecified``) has ratio 0.

    Raises:
        TypeError: ``targets`` is not a real tensor, or cannot hold the encoding.
        ValueError: ``targets`` is not 2-D, has no sample, or holds a value outside the
            encoding.

    Example:
        >>> positive_ratio(torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]]))
        tensor([0.7500, 0.2500])
    """
    encoding = check_encoding(encoding)
    check_bool("ignore_unspecified", ignore_unspecified)
    _check_targets(targets, encoding)
    if targets.shape[0] == 0:
        raise ValueError(f"targets must hold at least one sample, got shape {tuple(targets.shape)}")
    _check_values("targets", targets, encoding)
    positives = (targets == 1).float().sum(0)
    if encoding == "signed" and ignore_unspecified:
        return positives / (targets != 0).float().sum(0).clamp_min(1.0)
    return positives / targets.shape[0]


def _as_ratio(pos_ratio: object) -> Tensor:
    if not isinstance(pos_ratio, Tensor):
        try:
            pos_ratio = torch.as_tensor(pos_ratio)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"pos_ratio must be a tensor (or a sequence) of ratios, got {type(pos_ratio).__name__}"
            ) from None
    if pos_ratio.dtype == torch.bool or pos_ratio.is_complex():
        raise TypeError(f"pos_ratio must be a real tensor of ratios in [0, 1], got dtype {pos_ratio.dtype}")
    pos_ratio = pos_ratio.to(torch.float32)
    check_tensor("pos_ratio", pos_ratio, 1, "(L,)")
    # Read once, at construction: NaN would pass no range test and train every label with NaN.
    check_finite("pos_ratio", pos_ratio)
    if not bool(((pos_ratio >= 0) & (pos_ratio <= 1)).all()):
        raise ValueError(f"pos_ratio must lie in [0, 1], got min {float(pos_ratio.min())} max {float(pos_ratio.max())}")
    return pos_ratio


class WeightedBCEWithLogitsLoss(nn.Module):
    r"""Weighted sigmoid cross-entropy (paper Eq. 2-3), from logits.

    Computed with ``binary_cross_entropy_with_logits`` in float32 (stable for any logit,
    also under autocast).

    Args:
        pos_ratio: :math:`p_j` per label ``(L,)``, e.g. from :func:`positive_ratio`;
            finite, in [0, 1] (a bool or complex tensor is refused).
        encoding: of the targets, ``'binary'`` (0/1) or ``'signed'`` (1 / -1 / 0).
        ignore_unspecified: with ``'signed'``, give unspecified (0) entries weight 0;
            by default they count as negatives, as the reference code trains. No effect
            with ``'binary'``.
        reduction: ``'mean'`` (summed over labels, averaged over samples, as Eq. 2),
            ``'sum'``, or ``'none'`` (the weighted ``(N, L)`` terms).
        check_values: check that the targets belong to the encoding; ``None`` checks CPU
            tensors only (on an accelerator the check would wait for the device).
        check_finite_values: raise on nan/inf logits, the same policy: ``None`` checks CPU
            tensors only. Neither check runs while ``torch.compile`` traces.

    Targets may be of any real dtype: bool targets are 0/1 (``'binary'`` only: a bool
    or unsigned tensor cannot hold the -1 of ``'signed'`` and is refused with it).

    Shape:
        - logits: ``(N, L)``; targets: ``(N, L)``. ``N = 0`` works with ``'sum'`` and
          ``'none'``; the mean over no sample is refused.
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
        check_finite_values: bool | None = None,
    ) -> None:
        super().__init__()
        pos_ratio = _as_ratio(pos_ratio)
        self.encoding = check_encoding(encoding)
        self.ignore_unspecified = check_bool("ignore_unspecified", ignore_unspecified)
        self.reduction = check_reduction(reduction)
        self.check_values = check_bool("check_values", check_values, optional=True)
        self.check_finite_values = check_bool("check_finite_values", check_finite_values, optional=True)
        self.register_buffer("pos_weight", torch.exp(1.0 - pos_ratio))
        self.register_buffer("neg_weight", torch.exp(pos_ratio))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        check_tensor("logits", logits, 2, "(N, L)", floating=True)
        _check_targets(targets, self.encoding)
        if logits.shape != targets.shape:
            raise ValueError(
                f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if logits.shape[1] != self.pos_weight.shape[0]:
            raise ValueError(f"logits have {logits.shape[1]} labels but pos_ratio has {self.pos_weight.shape[0]}")
        if targets.device != logits.device:
            raise ValueError(f"targets must be on the device of logits ({logits.device}), got {targets.device}")
        if self.pos_weight.device != logits.device:
            raise ValueError(
                f"logits are on {logits.device} but the criterion's weights on {self.pos_weight.device}: "
                "move the criterion with .to(device)"
            )
        if self.reduction == "mean" and logits.shape[0] == 0:
            raise ValueError(
                f"logits hold no sample (shape {tuple(logits.shape)}): the mean over samples is undefined; "
                "use reduction='sum' or 'none'"
            )
        if data_checks_enabled(self.check_finite_values, logits):
            check_finite("logits", logits)
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
