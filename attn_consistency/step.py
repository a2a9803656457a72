"""The multi-view training step: the views of a batch, their forwards by size, and the terms compared.

:meth:`AttentionConsistencyLoss.views` (a mixin of the loss, so that the loss module holds the
distances and the module's forward only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._validation import (
    NonFiniteError,
    check_finite,
    check_not_meta,
    check_tensor,
    data_checks_enabled,
)
from .cam import CAMHook
from .strength import (
    gradient_ratio,
)
from .transforms import Scale, Transform, get_transform

if TYPE_CHECKING:
    from .consistency import AttentionConsistencyLoss


@runtime_checkable
class StageRecorder(Protocol):
    """What :meth:`AttentionConsistencyLoss.views` and :func:`~attn_consistency.consistency.attention_inconsistency` need from
    a recorder of heatmaps at several stages, in place of a :class:`~attn_consistency.CAMHook`
    (:class:`~attn_consistency.models.msac.MultiScaleHeads` is one).

    :meth:`pop` returns one record per forward, oldest first, each with ``heatmaps`` and
    ``logits``: mappings from stage name (in :attr:`stages` order) to ``(N, L, h_s, w_s)`` and
    ``(N, L)`` tensors.
    """

    #: the stage names, in the order of the records' mappings
    stages: tuple[str, ...]

    def clear(self) -> None:
        """Drop the records of the forwards so far."""
        ...

    def pop(self) -> list[Any]:
        """The records since the last call, oldest first."""
        ...

    def stage_weight(self, stage: str) -> float:
        """The consistency weight of ``stage`` (times the transform's weight)."""
        ...

    def prediction(self, output: Tensor, logits: Mapping[str, Tensor]) -> Tensor:
        """The fused prediction ``(N, L)`` from the model's ``output`` and each stage's logits."""
        ...

    def classification(
        self,
        output: Tensor,
        logits: Mapping[str, Tensor],
        targets: Tensor,
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """The classification loss of one view: ``criterion`` on the model's and each stage's logits."""
        ...


def _check_recorder(cam: object) -> None:
    if not isinstance(cam, (CAMHook, StageRecorder)):
        raise TypeError(
            f"cam must be a CAMHook attached to the model, or a recorder of heatmaps at several stages "
            f"(MultiScaleHeads), got {type(cam).__name__}"
        )


def _mean(losses: list[Tensor]) -> Tensor:
    """The mean of the views' losses, added in order (as ``sum()`` would) then divided."""
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total / len(losses)


def _scalar_loss(value: object) -> Tensor:
    """``criterion``'s output, refused unless it is one number (a per-sample mean)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"criterion must return the classification loss as a tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"criterion must return the classification loss as one number (a mean over the batch, e.g. "
            f"reduction='mean'), got a tensor of shape {tuple(value.shape)}"
        )
    return value.reshape(()) if value.dim() else value


def _scalar_criterion(criterion: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``criterion``, with each of its outputs checked by :func:`_scalar_loss`."""

    def checked(logits: Tensor, targets: Tensor) -> Tensor:
        return _scalar_loss(criterion(logits, targets))

    return checked


def _stacked(maps: list[Tensor]) -> Tensor:
    return torch.cat(maps) if len(maps) > 1 else maps[0]


def _shape_key(maps: Tensor | Mapping[str, Tensor]) -> Any:
    """What pairs of views are grouped by: the maps' shape, or every stage's."""
    return maps.shape if isinstance(maps, Tensor) else tuple(m.shape for m in maps.values())


class ConsistencyOutput(NamedTuple):
    """What :meth:`AttentionConsistencyLoss.views` returns.

    Attributes:
        logits: the logits of every view, in the order of ``views``; the first view is the
            original image. With a :class:`StageRecorder`, its fused prediction.
        loss: the weighted sum of the consistency terms, times the schedule's multiplier.
        terms: each consistency term before weighting, by name. A transform whose weight is
            0 still makes its views but has no term (it is not computed). With a
            :class:`StageRecorder`, one term per transform and stage, ``"<name>/<stage>"``
            (e.g. ``flip@224/layer2``); a stage of weight 0 has none.
        views: the names of the transforms applied to each view (``()`` for the original).
        classification: with ``targets`` and ``criterion`` given to ``views()``, the
            classification loss averaged over the views; else ``None``.
    """

    logits: list[Tensor]
    loss: Tensor
    terms: dict[str, Tensor]
    views: list[tuple[str, ...]]
    classification: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """``classification + loss`` (paper Eq. 6): what to backpropagate."""
        if self.classification is None:
            raise ValueError(
                "views() was called without targets= and criterion=: add your classification loss to .loss"
            )
        return self.classification + self.loss

    @property
    def ratio(self) -> Tensor:
        """The consistency loss over the classification loss, detached (how strong the term is)."""
        if self.classification is None:
            raise ValueError("views() was called without targets= and criterion=: there is no classification loss")
        return self.loss.detach() / self.classification.detach()


class _Views:
    """The training step of :class:`~attn_consistency.AttentionConsistencyLoss` (its methods take the loss as ``self``)."""

    def views(
        self: AttentionConsistencyLoss,
        model: nn.Module,
        cam: CAMHook | StageRecorder,
        images: Tensor,
        transforms: Sequence[str | Transform] | str | Transform,
        *,
        mode: str = "independent",
        generator: torch.Generator | None = None,
        resized: Tensor | Sequence[Tensor] = (),
        targets: Tensor | None = None,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> ConsistencyOutput:
        """Run the branches of one training step and return their logits and the loss.

        Builds the views, runs one forward per distinct input size (views of equal size
        concatenated into one batch, as the reference does, so BatchNorm sees them
        together) and compares the heatmaps.

        Modes:
            - ``'independent'``: the original and one view per transform; one term per
              transform, each against the original (Eq. 7).
            - ``'product'``: a view for every combination of the transforms, and for each
              transform a term between every pair of views that differ by it alone; pairs
              whose maps have the same sizes are compared as one batch. With
              ``["flip", "scale"]`` this is the authors' four-view step: (original, flip)
              at 224 and at 192, loss ``flip@224 + flip@192 + scale``. The transforms
              must commute.

        Args:
            model: the classifier (DDP / compiled wrappers are fine).
            cam: the :class:`~attn_consistency.cam.CAMHook` attached to ``model``, or a :class:`StageRecorder` such as
                :class:`~attn_consistency.models.msac.MultiScaleHeads` (multi-scale attention
                consistency): then every term is computed at every stage, weighted by the
                transform's weight times the stage's (``cam.stage_weight``), the logits are
                ``cam.prediction`` and the classification loss ``cam.classification`` (deep
                supervision) of each view. Its recorded maps are consumed.
            images: the batch ``(N, C, H, W)``.
            transforms: transforms or registered names, each used at most once.
            mode: ``'independent'`` or ``'product'``.
            generator: random generator for the transforms' parameters.
            resized: the same images already at other sizes, made from the originals (the
                authors' loader resizes each person crop to 224 and to 192 directly). A view
                whose :class:`~attn_consistency.Scale` gives one of these sizes starts from it
                instead of resampling ``images``; its other transforms apply as usual.
            targets: the labels of ``images``, given with ``criterion``: then the output
                holds the classification loss too (``.classification``, ``.total``,
                ``.ratio``) and the diagnostics compare the two terms. Non-finite values
                are refused where ``check_finite_values`` checks (CPU tensors by default).
            criterion: a per-sample-mean classification loss ``criterion(logits, targets)``,
                e.g. :class:`~attn_consistency.WeightedBCEWithLogitsLoss`; it is averaged over
                the views (each view has the labels of the original), which equals the
                reference's loss over the concatenated views. It must return one number: a
                loss with ``reduction="none"`` is refused.

        A call with gradients enabled counts as one training step of the ``schedule``.

        Returns:
            A :class:`ConsistencyOutput`.
        """
        self._check_call(cam, images, mode, targets, criterion)
        chosen = self._transforms(transforms, mode)
        self._check_keys(chosen)
        params = {t.name: t.sample(generator) for t in chosen}
        views, view_images, sources = self._view_images(images, resized, chosen, params, mode)
        logits, heatmaps, stage_logits = self._forward_by_size(model, cam, view_images)
        recorder = None if isinstance(cam, CAMHook) else cam
        stages = () if recorder is None else recorder.stages
        loss, terms = self._terms(chosen, views, view_images, heatmaps, params, images, sources, recorder)
        view_logits, classification = self._classify(views, logits, stage_logits, targets, criterion, recorder)
        if torch.is_grad_enabled():
            self._observe(loss, classification, views, heatmaps, view_logits, stage_logits, stages)
        return ConsistencyOutput(view_logits, loss, terms, views, classification)

    def _check_call(
        self: AttentionConsistencyLoss,
        cam: CAMHook | StageRecorder,
        images: Tensor,
        mode: str,
        targets: Tensor | None,
        criterion: Callable[[Tensor, Tensor], Tensor] | None,
    ) -> None:
        """The checks of :meth:`views`' arguments that need no transform."""
        if self.reduction == "none":
            raise ValueError("views() adds up its terms: use reduction='mean' or 'sum'")
        _check_recorder(cam)
        check_not_meta("images", check_tensor("images", images, 4, "(N, C, H, W)", floating=True))
        if mode not in ("independent", "product"):
            raise ValueError(f"mode must be 'independent' or 'product', got {mode!r}")
        if (targets is None) != (criterion is None):
            raise ValueError("give targets= and criterion= together (the classification loss needs both), or neither")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be callable as criterion(logits, targets), got {type(criterion).__name__}")
        if targets is not None:
            check_not_meta("targets", check_tensor("targets", targets))
            if targets.shape[0] != images.shape[0]:
                raise ValueError(
                    f"targets must hold one row per image ({images.shape[0]}), got shape {tuple(targets.shape)}"
                )
            # a NaN target makes every step's loss NaN: checked as the heatmaps are (CPU only by default)
            if targets.is_floating_point() and data_checks_enabled(self.check_finite_values, targets):
                check_finite("targets", targets)

    def _view_images(
        self: AttentionConsistencyLoss,
        images: Tensor,
        resized: Any,
        chosen: list[Transform],
        params: dict[str, Any],
        mode: str,
    ) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], Tensor], Mapping[tuple[int, int], Tensor]]:
        """The views (the transforms applied to each, the original first), their images, and the resized batches."""
        views: list[tuple[str, ...]]
        if mode == "independent":
            views = [(), *((t.name,) for t in chosen)]
        else:
            views = [tuple(t.name for i, t in enumerate(chosen) if mask >> i & 1) for mask in range(2 ** len(chosen))]
        by_name = {t.name: t for t in chosen}
        sources = self._resized_sources(images, resized, chosen)
        built = {view: self._view_image(images, view, by_name, params, sources) for view in views}
        view_images = {view: image for view, (image, _) in built.items()}
        used = {size for _, size in built.values()}
        if set(sources) - used:
            scaled = sorted(
                {tuple(view_images[v].shape[-2:]) for v in views if any(isinstance(by_name[n], Scale) for n in v)}
            )
            raise ValueError(
                f"resized images of size {sorted(set(sources) - used)} match no scaled view (those are {scaled})"
            )
        return views, view_images, sources

    def _terms(
        self: AttentionConsistencyLoss,
        chosen: list[Transform],
        views: list[tuple[str, ...]],
        view_images: dict[tuple[str, ...], Tensor],
        heatmaps: dict[tuple[str, ...], Any],
        params: dict[str, Any],
        images: Tensor,
        sources: Mapping[tuple[int, int], Tensor],
        recorder: StageRecorder | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted consistency loss (times the schedule's multiplier) and each term, by name."""
        stages = () if recorder is None else recorder.stages
        terms: dict[str, Tensor] = {}
        loss = images.new_zeros((), dtype=torch.promote_types(images.dtype, torch.float32))
        multiplier = self.multiplier
        for transform in chosen:
            weight = self._weight(transform)
            if weight == 0.0:  # its views serve the classification loss only: no term to compute
                continue
            pairs = [(v, tuple(t.name for t in chosen if t.name in v or t is transform)) for v in views]
            pairs = [(v, w) for v, w in pairs if v != w and w in heatmaps]
            groups: dict[tuple[torch.Size, torch.Size], list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
            for v, w in pairs:
                groups.setdefault((_shape_key(heatmaps[v]), _shape_key(heatmaps[w])), []).append((v, w))
            for group in groups.values():
                name = transform.name
                if len(groups) > 1:
                    height, width = view_images[group[0][0]].shape[-2:]
                    name = f"{name}@{height}" if height == width else f"{name}@{height}x{width}"
                if not stages:
                    original = _stacked([heatmaps[v] for v, _ in group])
                    moved = _stacked([heatmaps[w] for _, w in group])
                    terms[name] = self._term(original, moved, transform, params[transform.name], images, sources)
                    loss = loss + weight * terms[name]
                for stage in stages:
                    stage_weight = recorder.stage_weight(stage) if recorder is not None else 1.0
                    if stage_weight == 0.0:
                        continue
                    original = _stacked([heatmaps[v][stage] for v, _ in group])
                    moved = _stacked([heatmaps[w][stage] for _, w in group])
                    term = self._term(original, moved, transform, params[transform.name], images, sources)
                    terms[f"{name}/{stage}"] = term
                    loss = loss + weight * stage_weight * term
        # a schedule at 0 (the start of a warm-up) still reports the terms
        loss = loss * multiplier if multiplier != 1.0 else loss
        return loss, terms

    def _classify(
        self: AttentionConsistencyLoss,
        views: list[tuple[str, ...]],
        logits: dict[tuple[str, ...], Tensor],
        stage_logits: dict[tuple[str, ...], Any],
        targets: Tensor | None,
        criterion: Callable[[Tensor, Tensor], Tensor] | None,
        recorder: StageRecorder | None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Each view's logits (a recorder's fused prediction) and the classification loss averaged over the views."""
        stages = () if recorder is None else recorder.stages
        if recorder is not None and stages:
            view_logits = [recorder.prediction(logits[v], stage_logits[v]) for v in views]
        else:
            view_logits = [logits[v] for v in views]
        classification = None
        # targets and criterion come together (checked above)
        if criterion is not None and targets is not None and recorder is not None and stages:
            # deep supervision of every head, averaged over the views
            checked = _scalar_criterion(criterion)
            classification = _mean(
                [recorder.classification(logits[v], stage_logits[v], targets, checked) for v in views]
            )
        elif criterion is not None and targets is not None:
            classification = _mean([_scalar_loss(criterion(x, targets)) for x in view_logits])
        return view_logits, classification

    def _observe(
        self: AttentionConsistencyLoss,
        loss: Tensor,
        classification: Tensor | None,
        views: list[tuple[str, ...]],
        heatmaps: dict[tuple[str, ...], Any],
        view_logits: list[Tensor],
        stage_logits: dict[tuple[str, ...], Any],
        stages: tuple[str, ...],
    ) -> None:
        """A training step's bookkeeping: the trigger's loss, the diagnostics, the step count."""
        schedule: Any = self.schedule  # a Ramp with a trigger observes the classification loss
        if getattr(schedule, "trigger", None) is not None:
            if classification is None:
                raise ValueError(
                    "the schedule starts when the classification loss has fallen (Ramp(trigger=...)): give views() "
                    "targets= and criterion=, or call schedule.observe(loss) at each step yourself"
                )
            schedule.observe(classification, step=self.steps)
        if self.diagnostics is not None and not torch.compiler.is_compiling():
            gradients = None
            # with stages: each stage's maps against its own logits, the deepest stage's spread
            maps = [heatmaps[v][s] for v in views for s in stages] if stages else [heatmaps[v] for v in views]
            maps_logits = [stage_logits[v][s] for v in views for s in stages] if stages else view_logits
            if self.diagnostics.due and classification is not None:
                gradients = gradient_ratio(loss, classification, maps, maps_logits)
            self.diagnostics.update(
                heatmaps[views[0]][stages[-1]] if stages else heatmaps[views[0]], loss, classification, gradients
            )
        self.step()

    def _term(
        self: AttentionConsistencyLoss,
        original: Tensor,
        moved: Tensor,
        transform: Transform,
        params: Any,
        images: Tensor,
        sources: Mapping[tuple[int, int], Tensor],
    ) -> Tensor:
        """One consistency term of :meth:`views`; non-finite heatmaps name the input batch when it is the cause."""
        try:
            from .consistency import attention_consistency

            return attention_consistency(
                *self._pair(original, moved), transform, params, self.reduction, self.check_finite_values, self.distance
            )
        except NonFiniteError as error:
            # the heatmaps' check ran, so the inputs' check costs no sync that was not made anyway
            inputs = {"images": images, **{f"resized[{i}]": batch for i, batch in enumerate(sources.values())}}
            for name, batch in inputs.items():
                if data_checks_enabled(self.check_finite_values, batch):
                    try:
                        check_finite(name, batch)
                    except NonFiniteError as cause:
                        raise NonFiniteError(
                            f"{cause}: the input batch is not finite, so neither are the heatmaps ({error})"
                        ) from error
            raise

    def _transforms(self: AttentionConsistencyLoss, transforms: Any, mode: str) -> list[Transform]:
        if isinstance(transforms, (str, Transform)):
            transforms = [transforms]
        if not isinstance(transforms, Sequence) or not transforms:
            raise ValueError("transforms must name at least one transform")
        chosen = [get_transform(t) for t in transforms]
        names = [t.name for t in chosen]
        if len(set(names)) != len(names):
            raise ValueError(f"each transform may appear once, got {names}")
        if mode == "product":
            for a, b in combinations(chosen, 2):
                if not (a.commutes_with(b) or b.commutes_with(a)):
                    raise ValueError(
                        f"mode='product' combines transforms that commute; {a.name!r} and {b.name!r} do not"
                    )
        return chosen

    @staticmethod
    def _resized_sources(
        images: Tensor, resized: Tensor | Sequence[Tensor], chosen: list[Transform]
    ) -> dict[tuple[int, int], Tensor]:
        batches = [resized] if isinstance(resized, Tensor) else list(resized)
        if batches and not any(isinstance(t, Scale) for t in chosen):
            raise ValueError("resized images are given but no scale transform uses them")
        sources: dict[tuple[int, int], Tensor] = {}
        for i, batch in enumerate(batches):
            check_tensor(f"resized[{i}]", batch, 4, "(N, C, H, W)", floating=True)
            if batch.shape[:2] != images.shape[:2]:
                raise ValueError(
                    f"resized[{i}] must hold the same {images.shape[0]} images with {images.shape[1]} channels "
                    f"as images, got shape {tuple(batch.shape)}"
                )
            if batch.device != images.device or batch.dtype != images.dtype:
                raise ValueError(
                    f"resized[{i}] must be on the device and of the dtype of images ({images.device}, {images.dtype}), "
                    f"got {batch.device}, {batch.dtype}"
                )
            size = (int(batch.shape[-2]), int(batch.shape[-1]))
            if size in sources:
                raise ValueError(f"resized holds two batches of size {size}")
            sources[size] = batch
        return sources

    @staticmethod
    def _view_image(
        images: Tensor,
        view: tuple[str, ...],
        by_name: dict[str, Transform],
        params: dict[str, Any],
        sources: dict[tuple[int, int], Tensor],
    ) -> tuple[Tensor, tuple[int, int] | None]:
        """The view's image, and the size of the ``resized`` batch it started from (or None)."""
        names, used = list(view), None
        for name in view:  # the transforms of a view commute: the resize may come first
            transform = by_name[name]
            if isinstance(transform, Scale) and sources:
                size = transform.output_size(images.shape[-2:], params[name])
                if size in sources:
                    images, used = sources[size], size
                    names.remove(name)
                    break
        for name in names:
            images = by_name[name].apply_image(images, params[name])
        return images, used

    @staticmethod
    def _forward_by_size(
        model: nn.Module, cam: CAMHook | StageRecorder, view_images: dict[tuple[str, ...], Tensor]
    ) -> tuple[dict[tuple[str, ...], Tensor], dict[tuple[str, ...], Any], dict[tuple[str, ...], dict[str, Tensor]]]:
        """Per view: the model's logits, the heatmaps (a tensor, or stage -> tensor) and the stages' logits."""
        by_size: dict[tuple[int, ...], list[tuple[str, ...]]] = {}
        for view, image in view_images.items():
            by_size.setdefault(tuple(image.shape[1:]), []).append(view)
        logits: dict[tuple[str, ...], Tensor] = {}
        heatmaps: dict[tuple[str, ...], Any] = {}
        stage_logits: dict[tuple[str, ...], dict[str, Tensor]] = {}
        cam.clear()
        for views in by_size.values():
            parts = [view_images[v] for v in views]
            first = parts[0]
            batch = torch.cat(parts) if len(parts) > 1 else first
            if first.is_contiguous(memory_format=torch.channels_last):
                batch = batch.contiguous(memory_format=torch.channels_last)
            out = model(batch)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"views() needs a model that returns its logits as one tensor, got a {type(out).__name__}; "
                    "wrap the model in a module that returns the logits"
                )
            recorded = cam.pop()
            size = first.shape[0]
            if not isinstance(cam, CAMHook):
                split = _Views._split_record(cam, out, recorded, batch.shape[0], size)
                for view, (view_logits, view_maps, view_stage_logits) in zip(views, split):
                    logits[view], heatmaps[view], stage_logits[view] = view_logits, view_maps, view_stage_logits
                continue
            if len(recorded) != 1:
                raise RuntimeError(
                    f"one forward recorded {len(recorded)} heatmap batches; is the CAMHook attached to this "
                    "model (and not paused)? A model compiled with torch.compile and run before the hook "
                    "was attached keeps running without it: attach the CAMHook before the first call."
                )
            if out.dim() != 2 or out.shape[0] != batch.shape[0] or out.shape[1] != recorded[0].shape[1]:
                raise ValueError(
                    f"the model returned logits of shape {tuple(out.shape)} for {batch.shape[0]} images, but the CAMHook "
                    f"recorded heatmaps for {recorded[0].shape[1]} labels {tuple(recorded[0].shape)}: the hook is not on "
                    "the head that makes these logits; pass features= and classifier= to CAMHook"
                )
            for view, view_logits, maps in zip(views, torch.split(out, size), torch.split(recorded[0], size)):
                logits[view], heatmaps[view] = view_logits, maps
        return logits, heatmaps, stage_logits

    @staticmethod
    def _split_record(
        cam: StageRecorder, out: Tensor, recorded: list[Any], batch: int, size: int
    ) -> list[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        """One forward of a :class:`StageRecorder`, split into its views of ``size`` images each."""
        if len(recorded) != 1:
            raise RuntimeError(
                f"one forward recorded {len(recorded)} multi-stage records; are the {type(cam).__name__} attached to "
                "this model (and not paused)?"
            )
        (record,) = recorded
        maps = next(iter(record.heatmaps.values()))
        if out.dim() != 2 or out.shape[0] != batch or out.shape[1] != maps.shape[1]:
            raise ValueError(
                f"the model returned logits of shape {tuple(out.shape)} for {batch} images, but the side heads recorded "
                f"heatmaps for {maps.shape[1]} labels {tuple(maps.shape)}: build them with num_labels= the model's labels"
            )
        split_maps = {s: torch.split(m, size) for s, m in record.heatmaps.items()}
        split_logits = {s: torch.split(x, size) for s, x in record.logits.items()}
        return [
            (view_logits, {s: m[i] for s, m in split_maps.items()}, {s: x[i] for s, x in split_logits.items()})
            for i, view_logits in enumerate(torch.split(out, size))
        ]
