r"""The attention consistency loss (paper Eq. 5 and 7), its distances, and the inconsistency metric.

.. math:: \ell_a = \frac{1}{NLHW} \sum_{i=1}^N \sum_{j=1}^L \lVert T(M)_{ij} - M'_{ij} \rVert^2
   \qquad \ell_a = \sum_T w_T\, \ell_{a,T}

with :math:`M = g(I)` the heatmaps of the original view and :math:`M' = g(T(I))` those of
the transformed view. ``distance="relative"`` divides it by the heatmaps' own spatial variance
(plus 1e-3 of their mean square, a floor for flat maps), so that a weight means the same on any
model (see :func:`attention_consistency`); ``distance="correlation"`` compares each map
standardised by its own mean and spread. The multi-view training step
(:meth:`AttentionConsistencyLoss.views`) is in :mod:`attn_consistency.step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._validation import (
    check_bool,
    check_finite,
    check_not_meta,
    check_positive_int,
    check_reduction,
    check_tensor,
    check_weight,
    data_checks_enabled,
)
from .cam import CAMHook
from .step import ConsistencyOutput, StageRecorder, _check_recorder, _Views
from .strength import (
    ConsistencyDiagnostics,
    Ramp,
    _diagnostics_state,
    _ramp_state,
    _state_count,
    _state_entries,
)
from .transforms import Transform, available_transforms, get_transform
from .transforms.base import _check_pair

__all__ = [
    "AttentionConsistencyLoss",
    "ConsistencyOutput",
    "StageRecorder",
    "attention_consistency",
    "attention_inconsistency",
    "heatmap_variance",
    "standardized_heatmaps",
]


_DISTANCES = ("mse", "relative", "correlation")
_STOP_GRADIENT = (None, "original", "transformed")


def _check_distance(distance: str) -> str:
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be 'mse' (paper Eq. 5), 'relative' or 'correlation', got {distance!r}")
    return distance


# The energy floor of distance="relative": the share of the maps' mean square that the
# normaliser never falls below (see heatmap_variance).
_RELATIVE_EPS = 1e-3


def heatmap_variance(heatmaps: Tensor, heatmaps_t: Tensor) -> Tensor:
    r"""The normaliser of ``distance="relative"``: the heatmaps' own spatial variance, floored by their energy.

    .. math:: s = \tfrac12 \big(\overline{\mathrm{Var}}(M) + \overline{\mathrm{Var}}(M')\big)
       + \varepsilon \cdot \tfrac12 \big(\overline{M^2} + \overline{M'^2}\big),
       \qquad \varepsilon = 10^{-3}

    where :math:`\overline{\mathrm{Var}}` is the variance of each map over its cells and
    :math:`\overline{M^2}` the mean square of each map, both averaged over samples and
    labels. The variance centres each map on its own mean, so neither the large constant of
    an absent label's logit nor the spread of the logits across the batch counts: only the
    spatial structure that the consistency term compares.

    The floor, :math:`\varepsilon` times the maps' mean square, keeps :math:`s` away from 0
    where the maps are flat (every cell of a map equal: a collapse, or 1x1 maps). Their
    variance is 0 while Eq. 5 still counts the gap between the two views' map means (their
    logits): without the floor the relative distance has a pole there. With it the value is
    bounded (at most :math:`4/\varepsilon` for a flip or a scale, whose Eq. 5 is at most
    twice the sum of the two mean squares) and continuous, also into exactly flat maps.
    Both parts scale as :math:`c^2` when both batches are multiplied by :math:`c`, so the
    quotient stays scale-free, on flat and 1x1 maps too. On maps with spatial structure the
    floor is small: with :math:`V` the variance part and :math:`E` the mean-square part, it
    divides the value by :math:`1 + \varepsilon E / V` (1.001 for maps centred on 0, 1.017
    for maps whose mean is 4 times their spatial standard deviation).

    :math:`s` is 0 only where every cell of both batches is 0; it is then 1, and the
    relative distance (of two zero batches) 0. Elsewhere it stays in the graph (see
    :func:`attention_consistency`).
    """
    check_tensor("heatmaps", heatmaps, 4, "(N, L, h, w)", floating=True)
    check_tensor("heatmaps_t", heatmaps_t, 4, "(N, L, h', w')", floating=True)
    parts = []
    for maps in (heatmaps, heatmaps_t):
        variance, mean = torch.var_mean(maps, (2, 3), unbiased=False)
        # the mean square of a map is its variance plus its squared mean: no second pass over the cells
        parts.append(variance.mean() + _RELATIVE_EPS * (variance + mean.square()).mean())
    normaliser = 0.5 * (parts[0] + parts[1])
    return torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))


# The floor of distance="correlation": the share of the batches' mean spatial variance that
# each map's own variance is raised by before it divides the map (see standardized_heatmaps).
_CORRELATION_EPS = 0.1


def standardized_heatmaps(heatmaps: Tensor, heatmaps_t: Tensor) -> tuple[Tensor, Tensor]:
    r"""The maps that ``distance="correlation"`` compares: each centred on its own mean and divided by its own spread.

    .. math:: Z_{ij} = \frac{M_{ij} - \mu(M_{ij})}{\sqrt{\mathrm{Var}(M_{ij}) + \varepsilon \bar V}},
       \qquad \bar V = \tfrac12 \big(\overline{\mathrm{Var}}(M) + \overline{\mathrm{Var}}(M')\big),
       \qquad \varepsilon = 0.1

    and the same for :math:`M'`, where :math:`\mu` and :math:`\mathrm{Var}` are a map's mean
    and variance over its cells and :math:`\bar V` the variance averaged over the samples and
    labels of both batches. Eq. 5 of :math:`Z` and :math:`Z'` is then, for maps whose variance
    is well above the floor, :math:`2 (1 - r)` with :math:`r` the correlation of
    :math:`T(M)_{ij}` and :math:`M'_{ij}`: it compares where a map is high, not how high.

    - **A map's mean is removed**, and for a GAP-FC head that mean is the label's logit (up to
      the head's bias): the term's gradient on each map sums to 0 over its cells, so it has no
      part that pulls a logit directly (the features it changes still move the logits as any
      change of the backbone does). Eq. 5 also counts the gap between the two views' logits,
      and that part of its gradient pulls them together.
    - **The maps' scale is divided out**, so the term cannot be lowered by shrinking the maps,
      the way Eq. 5 can (the collapse that costs the paper's loss accuracy on new models): the
      value is unchanged when both batches are multiplied by one constant, and its gradient
      is orthogonal to the two batches taken together (Euler; not to each batch alone, so not
      under ``stop_gradient`` either). A map whose variance is well above the floor is nearly free
      of its own scale too (one view's maps 3 times the other's, exactly equivariant
      otherwise, give about 0.03 where unrelated maps give about 2).
    - **The floor** :math:`\varepsilon \bar V` keeps a flat map (an absent label's, whose
      cells are all about its logit) from being blown up to unit spread: a map with a tenth of
      the batches' typical variance counts half, a flat one not at all (:math:`Z = 0`). It
      scales with the maps, so the distance is unchanged when both batches are multiplied by
      a constant. It is shared by the maps compared together (the samples of the batch, and
      in :meth:`~AttentionConsistencyLoss.views` the views stacked into one term), so a map's
      value depends a little on the others, as batch normalisation does. Where every map of
      both batches is flat, :math:`Z = 0`.

    The statistics are those of each whole map: for a transform that leaves cells without a
    counterpart (a rotation by another angle than a multiple of 90 degrees, a translation),
    maps equal on the valid cells but not elsewhere are standardised apart. For flips,
    rotations by multiples of 90 degrees and the closed-form scale (its nearest-neighbour
    upsampling keeps each map's mean and variance), exactly equivariant maps give 0.
    """
    check_tensor("heatmaps", heatmaps, 4, "(N, L, h, w)", floating=True)
    check_tensor("heatmaps_t", heatmaps_t, 4, "(N, L, h', w')", floating=True)
    stats = [torch.var_mean(maps, (2, 3), unbiased=False, keepdim=True) for maps in (heatmaps, heatmaps_t)]
    floor = _CORRELATION_EPS * 0.5 * (stats[0][0].mean() + stats[1][0].mean())
    standardized = []
    for maps, (variance, mean) in zip((heatmaps, heatmaps_t), stats):
        spread = variance + floor
        # 0 only where every map is flat: the centred maps are then 0, and so is Z
        spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        standardized.append((maps - mean) * spread.rsqrt())
    return standardized[0], standardized[1]


def attention_consistency(
    heatmaps: Tensor,
    heatmaps_t: Tensor,
    transform: str | Transform,
    params: Any = None,
    reduction: str = "mean",
    check_finite_values: bool | None = None,
    distance: str = "mse",
) -> Tensor:
    r"""Attention consistency between two views under one transform (paper Eq. 5).

    With ``distance="mse"`` (the paper) the per-map terms are the mean squared difference
    of Eq. 5, in the heatmaps' own units. With ``distance="relative"`` they are divided by
    :func:`heatmap_variance` :math:`s` of the two batches, their spatial variance plus
    :math:`10^{-3}` times their mean square:

    .. math:: \ell_{a,\mathrm{rel}} = \frac{\ell_a}{\tfrac12 \big(\overline{\mathrm{Var}}(M)
       + \overline{\mathrm{Var}}(M')\big) + \varepsilon\, \tfrac12 \big(\overline{M^2}
       + \overline{M'^2}\big)}

    The value is unchanged when both batches are multiplied by a constant, 0 for exactly
    equivariant maps and about 2 for unrelated maps of equal variance, so one weight means
    the same strength on any model and at any stage of training. The floor keeps it finite
    and continuous where the maps are flat (see :func:`heatmap_variance`).

    :math:`s` stays in the gradient, on purpose. Eq. 5 falls quadratically when the maps
    shrink, so its gradient always has a part that shrinks every map, the flat, small maps
    that cost the paper's loss accuracy on new models (README, "Does it pay?"). A
    scale-free loss has no gradient along that direction (Euler: its gradient is orthogonal
    to the maps); a normaliser kept out of the gradient would rescale Eq. 5's gradient and
    keep the shrinking part.

    With ``distance="correlation"`` Eq. 5 compares :func:`standardized_heatmaps`: each map
    centred on its own mean and divided by its own spread (floored by a tenth of the
    batches' mean spatial variance). About :math:`2 (1 - r)` per map for the correlation
    :math:`r` of the two views' maps, 0 for exactly equivariant maps, and free of each map's
    mean and of the maps' common scale: its gradient has no part along any map's mean (a
    GAP-FC logit) and none that shrinks the maps.

    Computed in float32 (or float64 for float64 input), also under autocast.

    Args:
        heatmaps: :math:`M = g(I)`, shape ``(N, L, h, w)``.
        heatmaps_t: :math:`M' = g(T(I))`, shape ``(N, L, h', w')``.
        transform: a :class:`~attn_consistency.transforms.Transform` or a registered name.
        params: what ``transform.sample()`` returned for this step (and was used on the
            image); ``None`` for a deterministic transform.
        reduction: ``'mean'`` (Eq. 5: the mean over samples, labels and valid cells),
            ``'sum'`` (the sum of the per-map means) or ``'none'`` (the ``(N, L)`` per-map
            means).
        check_finite_values: raise on nan/inf heatmaps. ``None`` checks CPU tensors only:
            on an accelerator the check would wait for the device at every step.
        distance: ``'mse'`` (paper Eq. 5), ``'relative'`` or ``'correlation'`` (both
            scale-free, see above).

    Returns:
        A scalar, or ``(N, L)`` for ``reduction='none'``. An empty batch (``N = 0`` or
        ``L = 0``) gives 0.

    Example:
        >>> m = torch.randn(4, 14, 7, 7, requires_grad=True)
        >>> m_t = torch.randn(4, 14, 7, 7)
        >>> loss = attention_consistency(m, m_t, "flip")
        >>> torch.allclose(loss, torch.nn.functional.mse_loss(m.flip(-1), m_t))
        True
        >>> loss.backward()
    """
    check_reduction(reduction)
    _check_distance(distance)
    check_bool("check_finite_values", check_finite_values, optional=True)
    transform = get_transform(transform)
    _check_pair(heatmaps, heatmaps_t)  # the one pair check, shared with Transform.consistency
    check_not_meta("heatmaps", heatmaps)
    check_not_meta("heatmaps_t", heatmaps_t)
    if data_checks_enabled(check_finite_values, heatmaps, heatmaps_t):
        check_finite("heatmaps", heatmaps)
        check_finite("heatmaps_t", heatmaps_t)
    dtype = torch.promote_types(heatmaps.dtype, torch.float32)
    with torch.autocast(heatmaps.device.type, enabled=False):
        heatmaps, heatmaps_t = heatmaps.to(dtype), heatmaps_t.to(dtype)
        if distance == "correlation":
            heatmaps, heatmaps_t = standardized_heatmaps(heatmaps, heatmaps_t)
        per_map = transform.consistency(heatmaps, heatmaps_t, params)
        if distance == "relative" and per_map.numel():
            per_map = per_map / heatmap_variance(heatmaps, heatmaps_t)
    if reduction == "mean":
        # the mean of no maps is 0, not nan: an empty batch adds nothing to the loss
        return per_map.mean() if per_map.numel() else per_map.sum()
    if reduction == "sum":
        return per_map.sum()
    return per_map


#: the share of a run's steps over which :meth:`AttentionConsistencyLoss.recommended` ramps the term up
RECOMMENDED_WARMUP = 0.2
#: the fraction of its starting value the classification loss falls below before that ramp starts
RECOMMENDED_TRIGGER = 0.75


class AttentionConsistencyLoss(_Views, nn.Module):
    r"""Attention consistency loss (paper Eq. 5), summed over transforms (Eq. 7).

    The defaults are the paper's loss. The options control the term's strength, whose
    meaning otherwise depends on the scale of the model's heatmaps (``distance``,
    ``schedule``, ``weights``), and which branch it trains (``stop_gradient``).

    Args:
        weights: a weight per transform name (default 1 each); the COCO setting of the
            authors is ``{"flip": 0.6, "scale": 0.8}``. Names must be registered transforms;
            weights finite and ``>= 0``. A key must name a registered transform or one
            given to the call (checked at each call: a typo is an error, not weight 1).
        reduction: ``'mean'`` (Eq. 5), ``'sum'`` or ``'none'``, see
            :func:`attention_consistency`.
        check_finite_values: see :func:`attention_consistency`; :meth:`views` checks its
            ``targets`` the same way, and names ``images`` (or a ``resized`` batch) when
            non-finite heatmaps come from a non-finite input.
        distance: ``'mse'`` (paper Eq. 5), ``'relative'`` (Eq. 5 over the heatmaps'
            spatial variance, floored by 1e-3 of their mean square: the same weight means the
            same strength on any model) or ``'correlation'`` (Eq. 5 of each map standardised
            by its own mean and spread: about 2(1 - r), free of the logits and of the maps'
            common scale), see :func:`attention_consistency`.
        schedule: a multiplier of the loss per step, e.g. :class:`~attn_consistency.Ramp`
            (a warm-up from 0); any callable ``step -> float``. :meth:`views` counts its
            calls with gradients enabled as steps; a loop that calls the module directly
            calls :meth:`step` once per optimizer step. The count is in
            :meth:`state_dict`, so a resumed run continues the schedule.
        stop_gradient: ``None`` (both views are trained, as the paper), ``'original'``
            (the maps of the view without the transform are a fixed target: only the
            transformed view is pulled towards them) or ``'transformed'``.
        diagnostics: watch the run and warn once when the heatmaps collapse or the term
            dwarfs the classification loss (:class:`~attn_consistency.strength.ConsistencyDiagnostics`);
            ``False`` turns it off, an instance sets its thresholds.

    Shape:
        - heatmaps: ``(N, L, h, w)``; heatmaps_t: ``(N, L, h', w')``.
        - output: scalar, or ``(N, L)`` with ``reduction='none'``.

    Example:
        >>> criterion = AttentionConsistencyLoss()
        >>> flip = get_transform("flip")
        >>> m = torch.randn(2, 5, 7, 7, requires_grad=True)
        >>> criterion(m, m.detach().flip(-1), flip).item()
        0.0
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        check_finite_values: bool | None = None,
        *,
        distance: str = "mse",
        schedule: Callable[[int], float] | None = None,
        stop_gradient: str | None = None,
        diagnostics: bool | ConsistencyDiagnostics = True,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping from transform name to weight, got {type(weights).__name__}")
        self.weights = {}
        for key, value in (weights or {}).items():
            if not isinstance(key, str):
                raise TypeError(f"weights keys must be transform names (str), got {type(key).__name__} {key!r}")
            self.weights[key] = check_weight(f"weights[{key!r}]", value)
        self.check_finite_values = check_bool("check_finite_values", check_finite_values, optional=True)
        self.distance = _check_distance(distance)
        if isinstance(schedule, type) or (schedule is not None and not callable(schedule)):
            raise TypeError(
                f"schedule must be callable (step -> multiplier), e.g. Ramp(1000), got {type(schedule).__name__}"
            )
        self.schedule = schedule
        if stop_gradient not in _STOP_GRADIENT:
            raise ValueError(f"stop_gradient must be None, 'original' or 'transformed', got {stop_gradient!r}")
        self.stop_gradient = stop_gradient
        if isinstance(diagnostics, bool):
            self.diagnostics = ConsistencyDiagnostics() if diagnostics else None
        elif isinstance(diagnostics, ConsistencyDiagnostics):
            self.diagnostics = diagnostics
        else:
            raise TypeError(f"diagnostics must be a bool or a ConsistencyDiagnostics, got {type(diagnostics).__name__}")
        self.steps = 0
        self._unobserved_since: int | None = None  # the first step forward() ran with a trigger that saw no loss

    @classmethod
    def recommended(
        cls, epochs: int, steps_per_epoch: int, weights: Mapping[str, float] | None = None
    ) -> AttentionConsistencyLoss:
        """The strength this library recommends for a model and data other than the paper's.

        ``distance="relative"`` and a warm-up (:class:`~attn_consistency.Ramp`) that keeps the
        term at 0 until the classification loss has fallen below 0.75 of its start
        (``RECOMMENDED_TRIGGER``), then ramps it up over 20% of the run's optimizer steps
        (``RECOMMENDED_WARMUP``). Give the run's length as you know it, e.g.
        ``steps_per_epoch=len(loader)``: the fraction is worked out here.

        Args:
            epochs: epochs of the run.
            steps_per_epoch: optimizer steps per epoch (calls of :meth:`views`).
            weights: a weight per transform, as in the constructor.

        Example:
            >>> loss = AttentionConsistencyLoss.recommended(epochs=10, steps_per_epoch=50)
            >>> loss.distance, loss.schedule.steps, loss.schedule.trigger
            ('relative', 100, 0.75)
        """
        steps = check_positive_int("epochs", epochs) * check_positive_int("steps_per_epoch", steps_per_epoch)
        schedule = Ramp(round(RECOMMENDED_WARMUP * steps), trigger=RECOMMENDED_TRIGGER)
        return cls(weights, distance="relative", schedule=schedule)

    def step(self) -> None:
        """Advance the schedule by one optimizer step (:meth:`views` does it by itself)."""
        self.steps += 1

    @property
    def multiplier(self) -> float:
        """The schedule's value at the current step (1 without a schedule)."""
        if self.schedule is None:
            return 1.0
        return check_weight(f"schedule({self.steps})", self.schedule(self.steps))

    def get_extra_state(self) -> dict[str, Any]:
        diagnostics = self.diagnostics.state_dict() if self.diagnostics is not None else None
        state_dict = getattr(self.schedule, "state_dict", None)  # a Ramp's; any callable may be a schedule
        schedule = state_dict() if callable(state_dict) else None
        return {"steps": self.steps, "diagnostics": diagnostics, "schedule": schedule}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # every entry is checked before anything is set: a bad checkpoint leaves the loss as it was
        root = "consistency state"
        entries = _state_entries(state, root, "", ("steps",), ("diagnostics", "schedule"))
        steps = _state_count(f"{root} 'steps'", entries["steps"]) or 0
        diagnostics, schedule = entries.get("diagnostics"), entries.get("schedule")
        if diagnostics is not None:
            _diagnostics_state(diagnostics, root, "diagnostics.")
        if schedule is not None and isinstance(self.schedule, Ramp):
            _ramp_state(schedule, root, "schedule.")
        self.steps = steps
        if self.diagnostics is not None and diagnostics is not None:
            self.diagnostics.load_state_dict(diagnostics)
        load_state_dict = getattr(self.schedule, "load_state_dict", None)
        if schedule is not None and callable(load_state_dict):
            load_state_dict(schedule)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore what :meth:`state_dict` returned: the step count and the schedule's and diagnostics' state.

        Raises:
            TypeError, ValueError: ``state_dict`` is not a dict, or an entry of its state is
                missing, unknown or of a wrong type or value (the error names it).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "consistency state must be a dict (what AttentionConsistencyLoss.state_dict() returned), "
                f"got {type(state_dict).__name__}"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _weight(self, transform: Transform) -> float:
        return self.weights.get(transform.name, 1.0)

    def _check_keys(self, transforms: Sequence[Transform]) -> None:
        """Refuse a weight whose key names no transform: a typo would leave that term at weight 1.

        A key may name a registered transform (used in another call) or one of this call's
        transforms (an unregistered instance).
        """
        known = set(available_transforms()) | {t.name for t in transforms}
        unknown = sorted(set(self.weights) - known)
        if unknown:
            raise ValueError(
                f"weights key {unknown[0]!r} names no transform (registered: {', '.join(available_transforms())}; "
                f"this call: {', '.join(t.name for t in transforms)})"
            )

    def _pair(self, heatmaps: Tensor, heatmaps_t: Tensor) -> tuple[Tensor, Tensor]:
        if self.stop_gradient == "original":
            return heatmaps.detach(), heatmaps_t
        if self.stop_gradient == "transformed":
            return heatmaps, heatmaps_t.detach()
        return heatmaps, heatmaps_t

    def forward(self, heatmaps: Tensor, heatmaps_t: Tensor, transform: str | Transform, params: Any = None) -> Tensor:
        """The weighted consistency of ``heatmaps_t`` with ``transform(heatmaps)``, times the schedule."""
        transform = get_transform(transform)
        self._check_keys([transform])
        schedule: Any = self.schedule  # a Ramp with a trigger has a window and counts what it observed
        trigger = getattr(schedule, "trigger", None)
        if trigger is not None and schedule.observed == 0:
            # without the losses the ramp never starts: the term would stay at weight 0 unnoticed. Counted
            # from the first step it was used at (a resumed loss may count many steps before it)
            if self._unobserved_since is None or self._unobserved_since > self.steps:
                self._unobserved_since = self.steps
            unobserved = self.steps - self._unobserved_since
            if unobserved >= schedule.window:
                raise ValueError(
                    f"the schedule starts when the classification loss has fallen (Ramp(trigger={trigger})), but after "
                    f"{unobserved} steps it has seen no loss: call schedule.observe(loss) at each step, or use views() "
                    "with targets= and criterion="
                )
        value = attention_consistency(
            *self._pair(heatmaps, heatmaps_t),
            transform,
            params,
            self.reduction,
            self.check_finite_values,
            self.distance,
        )
        weight = self._weight(transform) * self.multiplier
        if self.diagnostics is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.diagnostics.update(heatmaps, weight * value.detach().sum())
        return value if weight == 1.0 else weight * value


@torch.no_grad()
def _detached(recorded: list[Any]) -> list[Any]:
    """Recorded maps (tensors, or a stage recorder's records) without their autograd graph."""
    return [
        r.detach() if isinstance(r, Tensor) else r._replace(heatmaps={k: v.detach() for k, v in r.heatmaps.items()})
        for r in recorded
    ]


def attention_inconsistency(
    model: nn.Module,
    cam: CAMHook | StageRecorder,
    batches: Iterable[Tensor],
    transform: str | Transform | Sequence[str | Transform],
    *,
    device: torch.device | str | None = None,
    amp: bool = False,
    generator: torch.Generator | None = None,
) -> float | dict[str, float]:
    r"""The paper's attention inconsistency (Table 2): Eq. 5 over a whole test set.

    For every batch, the heatmaps of the images and of their transformed copies are
    compared as in training; the result is the mean over all samples, labels and cells.
    Runs the model as it is (put it in ``eval()`` mode first).

    Args:
        model: the classifier, with ``cam`` attached.
        cam: its :class:`~attn_consistency.CAMHook`, or a :class:`~attn_consistency.step.StageRecorder` (then every
            stage is measured); consumed after each batch.
        batches: image batches ``(N, C, H, W)`` (e.g. ``(x for x, _ in loader)``).
        transform: a transform or a registered name, or a list of them: then each batch is
            read and its original view run once for all of them.
        device: where to run (default: the batches' own device).
        amp: run the forwards under bfloat16 autocast.
        generator: for the transforms' parameters, drawn once per batch.

    Returns:
        The mean squared heatmap difference, a float; for a list, a dict of them by name.
        With a :class:`~attn_consistency.step.StageRecorder`, always a dict, by ``"<name>/<stage>"``.
    """
    _check_recorder(cam)
    several = isinstance(transform, Sequence) and not isinstance(transform, str)
    items: Sequence[Any] = cast(Sequence[Any], transform) if several else [transform]
    transforms = [get_transform(t) for t in items]
    if not transforms:
        raise ValueError("transform must name at least one transform")
    stages: tuple[str | None, ...] = (None,) if isinstance(cam, CAMHook) else cam.stages
    totals: dict[tuple[int, str | None], Tensor] = {}
    count = 0
    for images in batches:
        images = check_tensor("batch", images, 4, "(N, C, H, W)", floating=True)
        if device is not None:
            images = images.to(device)
        params = [t.sample(generator) for t in transforms]
        cam.clear()
        # Grad-CAM maps come from gradients: their forwards need them, even inside torch.no_grad()
        gradients = torch.enable_grad() if getattr(cam, "method", "cam") == "gradcam" else contextlib.nullcontext()
        with gradients, torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            model(images)
            for t, p in zip(transforms, params):
                model(t.apply_image(images, p))
        recorded = _detached(cam.pop())  # a measurement: no graph kept from one batch to the next
        if len(recorded) != 1 + len(transforms):
            raise RuntimeError(
                f"{1 + len(transforms)} forwards recorded {len(recorded)} heatmap batches; is the {type(cam).__name__} "
                "attached to this model (and, for a compiled model, attached before its first call)?"
            )
        maps: list[Mapping[str | None, Tensor]] = [{None: r} if stages == (None,) else r.heatmaps for r in recorded]
        for k, (t, p) in enumerate(zip(transforms, params)):
            for stage in stages:
                per_map = attention_consistency(maps[0][stage], maps[1 + k][stage], t, p, reduction="sum")
                totals[k, stage] = per_map if (k, stage) not in totals else totals[k, stage] + per_map
        first = maps[0][stages[0]]
        count += first.shape[0] * first.shape[1]
    if count == 0:
        raise ValueError("batches is empty")
    result = {
        t.name if stage is None else f"{t.name}/{stage}": float(totals[k, stage]) / count
        for k, t in enumerate(transforms)
        for stage in stages
    }
    return result if several or stages != (None,) else result[transforms[0].name]
