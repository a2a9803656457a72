r"""How strong the consistency term is: weight schedules and the diagnostics a user sees.

The distance of Eq. 5 is in the heatmaps' own units, so the paper's weight of 1 means a
different strength on another model, another label count or another stage of training.
Three levers control it (see :class:`~attn_consistency.AttentionConsistencyLoss`):

- ``distance="relative"`` divides Eq. 5 by the heatmaps' own spatial variance plus 1e-3 of
  their mean square (in the gradient: the loss is scale-free), so that one weight means the
  same on any model;
- a weight schedule such as :class:`Ramp` (a warm-up from 0), here;
- the weights themselves.

:class:`ConsistencyDiagnostics` watches a run and warns once when the heatmaps collapse
(their spread falls far below where it started) or when the term dwarfs the
classification loss early on.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import check_finite_number, check_tensor

__all__ = ["ConsistencyDiagnostics", "ConsistencyWarning", "Ramp", "gradient_ratio", "heatmap_spread"]

_SHAPES = ("linear", "cosine", "gaussian")


def _check_steps(name: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (a number of steps), got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _state_entries(
    state: object, root: str, prefix: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    """``state`` if it is a dict of the ``required`` (and ``optional``) entries, else an error naming it.

    ``root`` names the whole state (``"consistency state"``), ``prefix`` the path of this
    part in it (``"schedule."``, or ``""`` for the whole): errors name ``root 'prefix.key'``.
    """
    what = f"{root} {prefix[:-1]!r}" if prefix else root
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a dict (what state_dict() returned), got {type(state).__name__}")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{what} lacks the entry {missing[0]!r} (it holds {sorted(map(str, state))})")
    unknown = sorted(str(key) for key in state if key not in required + optional)
    if unknown:
        raise ValueError(f"{what} has the unknown entry {unknown[0]!r} (known: {', '.join(required + optional)})")
    return state


def _state_count(name: str, value: object, optional: bool = False) -> int | None:
    """An int >= 0 (or None when ``optional``) read from a saved state, else an error naming the entry."""
    if value is None and optional:
        return None
    expected = "None or an int >= 0" if optional else "an int >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected} (a number of steps), got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be {expected} (a number of steps), got {value!r}")
    return int(value)


def _state_number(name: str, value: object, optional: bool = False, finite: bool = True) -> float | None:
    """A real number (finite when ``finite``; None when ``optional``) from a saved state."""
    if value is None and optional:
        return None
    kind = "a finite number" if finite else "a number"
    expected = f"None or {kind}" if optional else kind
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _ramp_state(state: object, root: str, prefix: str = "") -> tuple[int | None, float | None, int, float]:
    """The checked ``(start, reference, observed, sum)`` of a :meth:`Ramp.state_dict`."""
    entries = _state_entries(state, root, prefix, ("start", "reference", "observed", "sum"))

    def name(key: str) -> str:
        return f"{root} {prefix + key!r}"

    start = _state_count(name("start"), entries["start"], optional=True)
    reference = _state_number(name("reference"), entries["reference"], optional=True, finite=False)
    if reference is not None and not math.isfinite(reference):
        # written before non-finite windows were skipped: that reference kept the term off for good
        warnings.warn(
            f"{name('reference')} is {reference}: the trigger's starting loss is measured again",
            ConsistencyWarning,
            stacklevel=2,
        )
        reference = None
    observed = _state_count(name("observed"), entries["observed"]) or 0
    # the partial window's sum: a non-finite one is skipped when its window closes
    total = _state_number(name("sum"), entries["sum"], finite=False) or 0.0
    return start, reference, observed, total


class Ramp:
    r"""A warm-up of the consistency weight: a multiplier that rises from 0 to 1.

    With :math:`t = \min(1, \max(0, s - s_0) / \text{steps})` at step :math:`s`:

    - ``'linear'``: :math:`t`;
    - ``'cosine'``: :math:`(1 - \cos \pi t) / 2`, flat at both ends;
    - ``'gaussian'``: :math:`\exp(-5 (1 - t)^2)` for :math:`t > 0` (the ramp-up of temporal
      ensembling, Laine and Aila 2017), 0 before the ramp starts.

    The ramp starts at :math:`s_0 =` ``delay``, or, with ``trigger``, at the first step after
    ``delay`` that ends a window of ``window`` steps whose mean classification loss is below
    ``trigger`` times the first window's (counted in the steps the ramp is called with, see
    :meth:`observe`). A window whose mean is not finite (a NaN or inf loss) is skipped, with
    a :class:`ConsistencyWarning`: it is neither the reference nor a trigger. The term then
    waits until the classifier has found the labels, however long that takes: a net trained
    from scratch can sit at chance level for a long, unpredictable time, and a consistency
    term switched on then keeps it there. The loss is fed by :meth:`observe`, which
    :meth:`~attn_consistency.AttentionConsistencyLoss.views` calls when it is given
    ``targets`` and ``criterion``; it is read once per window (one device sync), averaged over
    the replicas under ``torch.distributed`` so that every replica starts at the same step.

    Call it with a step number in a plain loop (``cls + ramp(step) * consistency(...)``),
    or give it to :class:`~attn_consistency.AttentionConsistencyLoss` (``schedule=``), which
    counts the steps itself and saves the ramp's state with its own.

    Args:
        steps: length of the ramp in steps; 0 means a step from 0 to 1 at :math:`s_0`.
        shape: ``'linear'``, ``'cosine'`` or ``'gaussian'``.
        delay: steps at 0 before the ramp may start.
        trigger: start the ramp once the classification loss has fallen below this
            fraction (in ``(0, 1)``) of its first window's mean; ``None`` starts at ``delay``.
        window: steps per window of the trigger.

    Example:
        >>> ramp = Ramp(100)
        >>> [ramp(s) for s in (0, 50, 100, 1000)]
        [0.0, 0.5, 1.0, 1.0]
        >>> round(Ramp(100, "cosine")(25), 4)
        0.1464
    """

    def __init__(
        self, steps: int, shape: str = "linear", delay: int = 0, trigger: float | None = None, window: int = 25
    ) -> None:
        self.steps = _check_steps("steps", steps)
        self.delay = _check_steps("delay", delay)
        if shape not in _SHAPES:
            raise ValueError(f"shape must be one of {', '.join(map(repr, _SHAPES))}, got {shape!r}")
        self.shape = shape
        if trigger is not None:
            trigger = check_finite_number("trigger", trigger)
            if not 0.0 < trigger < 1.0:
                raise ValueError(f"trigger must lie in (0, 1) (a fraction of the starting loss), got {trigger!r}")
        self.trigger = trigger
        self.window = _check_steps("window", window, low=1)
        self.start: int | None = None if trigger is not None else self.delay
        self.reference: float | None = None
        self._observed = 0
        self._sum: Tensor | float = 0.0
        self._last_call: int | None = None  # the step of the last call: what observe() counts in

    @property
    def observed(self) -> int:
        """Steps whose loss :meth:`observe` has taken (it stops counting once the ramp started)."""
        return self._observed

    def observe(self, loss: Tensor | float, step: int | None = None) -> None:
        """Feed one step's classification loss (a tensor is read once per window).

        Args:
            loss: the step's loss, one number (a float must be finite; a tensor is read at
                the end of its window, and a window with a non-finite mean is skipped).
            step: the step this loss belongs to, in the units the ramp is called with: when
                it closes the window that triggers, the ramp starts at ``step + 1``.
                Default: the step of the last call ``ramp(step)`` (a loop that takes the
                multiplier and then observes the loss, as
                :class:`~attn_consistency.AttentionConsistencyLoss` does, whatever its step
                count), or, before any call, the number of losses observed before this one.
        """
        if step is not None:
            step = _check_steps("step", step)
        if self.start is not None:
            return
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"observe() takes the step's loss as one number, got a tensor of shape {tuple(loss.shape)}"
                )
            value: Tensor | float = loss.detach().float().reshape(())
        else:
            value = check_finite_number("loss", loss)
        if step is None:
            step = self._last_call if self._last_call is not None else self._observed
        self._sum = self._sum + value
        self._observed += 1
        if self._observed % self.window:
            return
        total, self._sum = self._sum, 0.0
        if isinstance(total, Tensor) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every replica must start at the same step: decide on the loss over all of them
            total = total.clone()
            dist.all_reduce(total)
            total /= dist.get_world_size()
        mean = float(total) / self.window
        if not math.isfinite(mean):
            # one NaN reference would never be beaten, one inf would be at once: the window is skipped
            warnings.warn(
                f"Ramp.observe: the mean classification loss (loss) of the {self.window} steps up to step {step} is "
                f"{mean}, not finite; that window is skipped (neither the reference nor a trigger)",
                ConsistencyWarning,
                stacklevel=_caller(),
            )
            return
        if self.reference is None:
            self.reference = mean
        elif self.trigger is not None and step >= self.delay and mean < self.trigger * self.reference:
            self.start = step + 1

    def __call__(self, step: int) -> float:
        step = _check_steps("step", step)
        self._last_call = step
        if self.start is None or step < self.start:
            return 0.0
        if self.steps == 0:
            return 1.0
        t = min(1.0, (step - self.start) / self.steps)
        if self.shape == "linear":
            return t
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * t))
        return math.exp(-5.0 * (1.0 - t) ** 2) if t > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The trigger's state (when the ramp started, the loss it watches), for a resumed run."""
        return {"start": self.start, "reference": self.reference, "observed": self._observed, "sum": float(self._sum)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checked whole before anything is set).

        Raises:
            TypeError, ValueError: naming the entry that is missing, unknown or of a wrong
                type or value.
        """
        start, reference, observed, total = _ramp_state(state, "Ramp state")
        self.start, self.reference, self._observed, self._sum = start, reference, observed, total

    def __repr__(self) -> str:
        trigger = f", trigger={self.trigger}, window={self.window}" if self.trigger is not None else ""
        return f"Ramp(steps={self.steps}, shape={self.shape!r}, delay={self.delay}{trigger})"


class ConsistencyWarning(UserWarning):
    """Raised (once per cause) by :class:`ConsistencyDiagnostics`."""


def heatmap_spread(heatmaps: Tensor) -> Tensor:
    """The spatial spread of a heatmap batch: the std over cells, averaged over maps (detached)."""
    maps = check_tensor("heatmaps", heatmaps, 4, "(N, L, h, w)", floating=True).detach().float().flatten(2)
    if maps.shape[-1] < 2 or maps.shape[0] * maps.shape[1] == 0:
        return maps.new_zeros(())
    return maps.std(-1, unbiased=False).mean()


def gradient_ratio(
    consistency: Tensor, classification: Tensor, heatmaps: Sequence[Tensor], logits: Sequence[Tensor]
) -> Tensor:
    r"""How hard the consistency term pushes the heatmaps, next to the classification loss.

    .. math:: r = \lVert \partial \ell_a / \partial M \rVert \,/\, \lVert \partial \ell_c / \partial M \rVert

    over the heatmaps of every view (NaN when neither loss has a gradient). For a GAP-FC head the logits are
    ``heatmaps.mean((2, 3)) + bias``, so the classification loss's gradient on each cell is
    its gradient on the logit over :math:`hw`: both are read from the small graphs between
    the heatmaps and the losses (the backbone is not traversed). Unlike the ratio of the
    loss values, it shows a term that is small but dominates the training signal.
    """
    wanted = [m for m in heatmaps if m.requires_grad]
    if not wanted or not consistency.requires_grad or not classification.requires_grad:
        return consistency.new_full((), math.nan, dtype=torch.float32)
    grads_maps = torch.autograd.grad(consistency, wanted, retain_graph=True, allow_unused=True)
    grads_logits = torch.autograd.grad(classification, list(logits), retain_graph=True, allow_unused=True)
    pushed = sum(g.float().square().sum() for g in grads_maps if g is not None)
    pulled = sum(
        g.float().square().sum() / (m.shape[-2] * m.shape[-1])
        for g, m in zip(grads_logits, heatmaps, strict=True)
        if g is not None
    )
    return (torch.as_tensor(pushed) / torch.as_tensor(pulled)).sqrt().detach()


class ConsistencyDiagnostics:
    r"""Watch the consistency term during training and warn once when it goes wrong.

    :meth:`update` takes each step's heatmaps, weighted consistency loss and (when known)
    classification loss, as tensors, without waiting for the device. Every ``every``
    updates the window is read (one device sync) and checked:

    - **collapse**: the heatmaps' spatial spread (:func:`heatmap_spread`) falls below
      ``collapse`` times its value over the first window. The consistency term is easiest
      to satisfy with flat maps; flat maps carry no localisation.
    - **dominance**: during the first ``early_steps`` updates, the consistency term pushes
      the heatmaps ``dominance`` times harder than the classification loss
      (:func:`gradient_ratio`, measured on the window's last step; the ratio of the loss
      values where no gradients are given). A term that strong sets the features before the
      classifier has found the labels.

    Each warning (a :class:`ConsistencyWarning`) is given once per instance. The last
    window's values are in :attr:`last`: ``spread``, ``ratio`` (consistency over
    classification loss), ``gradient_ratio``.

    Args:
        every: updates per window (one sync per window).
        collapse: spread ratio (now / start) below which the maps count as collapsed.
        dominance: gradient ratio above which the term dwarfs the classification loss.
        early_steps: updates during which dominance is checked.

    Attributes:
        last: the last window's values (empty before the first window is read).
        updates: the updates so far.
    """

    def __init__(self, every: int = 25, collapse: float = 0.2, dominance: float = 1.0, early_steps: int = 500) -> None:
        self.every = _check_steps("every", every, low=1)
        self.collapse = check_finite_number("collapse", collapse)
        self.dominance = check_finite_number("dominance", dominance)
        if not 0.0 < self.collapse < 1.0:
            raise ValueError(f"collapse must lie in (0, 1), got {collapse!r}")
        if self.dominance <= 0.0:
            raise ValueError(f"dominance must be > 0, got {dominance!r}")
        self.early_steps = _check_steps("early_steps", early_steps)
        self.updates = 0
        self.start_spread: float | None = None
        self.last: dict[str, float] = {}
        self.warned: set[str] = set()
        self._window: list[Tensor] = []

    @property
    def due(self) -> bool:
        """Whether the next :meth:`update` closes a window (and so reads its gradient ratio)."""
        return (self.updates + 1) % self.every == 0

    def update(
        self,
        heatmaps: Tensor,
        consistency: Tensor,
        classification: Tensor | None = None,
        gradients: Tensor | None = None,
    ) -> None:
        """Record one step (``gradients``: its :func:`gradient_ratio`, if measured); check a full window."""
        check_tensor("consistency", consistency)
        if classification is not None:
            check_tensor("classification", classification)
        nan = consistency.new_full((), math.nan, dtype=torch.float32)
        ratio = nan if classification is None else consistency.detach().float() / classification.detach().float()
        grad = nan if gradients is None else gradients.float()
        entry = torch.stack([heatmap_spread(heatmaps).to(nan.device), ratio.to(nan.device), grad.to(nan.device)])
        if self._window and self._window[0].device != entry.device:
            # a window restored from a checkpoint is on the CPU: one stack needs one device
            self._window = [e.to(entry.device) for e in self._window]
        self._window.append(entry)
        self.updates += 1
        # windows end at multiples of `every` updates, so that a resumed run checks at the same steps
        if self.updates % self.every == 0:
            self._check(torch.stack(self._window).cpu())
            self._window = []

    def _check(self, window: Tensor) -> None:
        spread = float(window[:, 0].mean())
        means = []
        for column in (1, 2):
            values = window[:, column][torch.isfinite(window[:, column])]
            means.append(float(values.mean()) if len(values) else math.nan)
        ratio, gradients = means
        self.last = {"spread": spread, "ratio": ratio, "gradient_ratio": gradients}
        if self.start_spread is None:
            self.start_spread = spread
        elif self.start_spread > 0 and spread < self.collapse * self.start_spread:
            self._warn(
                "collapse",
                f"the heatmaps are collapsing: their spatial spread fell to {spread:.3g} from {self.start_spread:.3g} "
                f"over the first {self.every} steps ({spread / self.start_spread:.0%}). Flat maps satisfy the "
                "consistency term and localise nothing: lower its weight, use distance='relative', or warm it up "
                "(schedule=Ramp(...)).",
            )
        strength, what = (gradients, "pushes the heatmaps") if math.isfinite(gradients) else (ratio, "is")
        if self.updates <= self.early_steps and strength > self.dominance:
            self._warn(
                "dominance",
                f"the consistency term {what} {strength:.3g}x {'as hard as ' if what != 'is' else ''}the classification "
                f"loss in the first {self.updates} steps: it sets the features before the classifier has found the "
                "labels. Lower its weight, use distance='relative', or warm it up (schedule=Ramp(...)).",
            )

    def _warn(self, cause: str, message: str) -> None:
        if cause not in self.warned:
            self.warned.add(cause)
            warnings.warn(
                f"attention consistency: {message} (diagnostics=False silences this)",
                ConsistencyWarning,
                stacklevel=_caller(),
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to check the same windows as an uninterrupted one."""
        window = [entry.tolist() for entry in self._window]  # read once, at checkpoint time
        return {
            "updates": self.updates, "start_spread": self.start_spread, "warned": sorted(self.warned),
            "last": dict(self.last), "window": window,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checked whole before anything is set).

        Raises:
            TypeError, ValueError: naming the entry that is missing, unknown or of a wrong
                type, value or shape.
        """
        self.updates, self.start_spread, self.warned, self.last, self._window = _diagnostics_state(
            state, "diagnostics state"
        )


_CAUSES = ("collapse", "dominance")


def _diagnostics_state(
    state: object, root: str, prefix: str = ""
) -> tuple[int, float | None, set[str], dict[str, float], list[Tensor]]:
    """The checked ``(updates, start_spread, warned, last, window)`` of a diagnostics state."""
    entries = _state_entries(state, root, prefix, ("updates", "start_spread", "warned"), ("last", "window"))

    def name(key: str) -> str:
        return f"{root} {prefix + key!r}"

    updates = _state_count(name("updates"), entries["updates"]) or 0
    start_spread = _state_number(name("start_spread"), entries["start_spread"], optional=True, finite=False)
    warned = entries["warned"]
    if isinstance(warned, str) or not isinstance(warned, (list, tuple, set)):
        raise TypeError(f"{name('warned')} must be a list of causes among {_CAUSES}, got {warned!r}")
    if not set(warned) <= set(_CAUSES):
        raise ValueError(f"{name('warned')} must be a list of causes among {_CAUSES}, got {warned!r}")
    last = entries.get("last", {})
    if not isinstance(last, Mapping) or not all(isinstance(k, str) for k in last):
        raise TypeError(f"{name('last')} must be a dict of numbers by name, got {type(last).__name__} {last!r}")
    last = {k: _state_number(name(f"last.{k}"), v, finite=False) for k, v in last.items()}
    window = entries.get("window", [])
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence):
        raise TypeError(f"{name('window')} must be a list of [spread, ratio, gradient ratio] rows, got {window!r}")
    if len(window) > updates:
        raise ValueError(f"{name('window')} holds {len(window)} rows, more than its {updates} updates")
    rows = []
    for i, row in enumerate(window):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != 3:
            raise ValueError(f"{name('window')} row {i} must be 3 numbers (spread, ratio, gradient ratio), got {row!r}")
        values = [_state_number(f"{name('window')} row {i}", v, finite=False) for v in row]
        rows.append(torch.tensor(values, dtype=torch.float32))
    return updates, start_spread, set(warned), cast(dict[str, float], last), rows


def _caller() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch's module calls."""
    import sys

    package = __name__.rpartition(".")[0].replace(".", "/")
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and (
        f"/{package}/" in frame.f_code.co_filename or "/torch/nn/modules/" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level
