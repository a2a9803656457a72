r"""Multi-scale attention consistency (Xu et al., ICONIP 2020): class heatmaps at several depths.

MSAC feeds the original and the flipped picture through one ResNet "with additional
attention-enhanced modules" that give semantically strong attention heatmaps, and adds the
distance between the two pictures' *multi-scale* heatmaps to the loss. Only the abstract is
public, so this module is our documented reading of it, built for any backbone:

- at each named stage (``layer2``, ``layer3``, ``layer4`` of a ResNet; a timm model's stage
  names or ``feature_info`` indices) a :class:`SideHead`: a light attention-enhanced module
  (:class:`AttentionModule`, channel then spatial attention as CBAM) and a 1x1 class
  convolution. Its heatmaps :math:`M^s` (paper VAC, Eq. 1, on the enhanced features
  :math:`F^s`) and its logits obey the CAM invariant of a GAP-FC head,

  .. math:: M^s_l(m, n) = \sum_c W^s(l, c)\, F^s_c(m, n), \qquad
     \tfrac{1}{h_s w_s} \textstyle\sum_{m,n} M^s_l(m, n) + b^s_l = \text{logit}^s_l ;

- :class:`MultiScaleHeads` records every stage's heatmaps and logits at each forward of the
  backbone (the backbone itself is never changed), trains each stage's logits by the
  classification loss (deep supervision) and fuses them into the prediction;
- :meth:`AttentionConsistencyLoss.views <attn_consistency.AttentionConsistencyLoss.views>`
  takes it in place of a :class:`~attn_consistency.CAMHook`: every transform of the registry
  gives one term per stage (``flip@224/layer2``, ``scale/layer3``...), and
  :func:`multiscale_consistency` is the same per stage for two views' maps.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._hooks import _Recording, _remove_handles, _unwrap, _WeakHook
from .._validation import check_bool, check_positive_int
from ..consistency import attention_consistency
from ..transforms import Transform
from .side_heads import (
    AttentionModule,
    SideHead,
    StageRecord,
    _available,
    _check_weights,
    _feature_info,
    _known_layout,
    _last_layer_is_spatial,
    _num_labels,
    _static_channels,
)

__all__ = [
    "AttentionModule",
    "MultiScaleHeads",
    "SideHead",
    "StageRecord",
    "WithSideHeads",
    "multiscale_consistency",
]

OUTPUT = "output"
"""The name of the backbone's own logits among the heads (supervision weights, fusion)."""

_FUSIONS = ("mean", "last", OUTPUT)
_LAYOUTS = ("nchw", "nhwc")


class WithSideHeads(nn.Module):
    """The backbone and its :class:`MultiScaleHeads` as one module, whose forward is the backbone's.

    For ``DistributedDataParallel`` (which must see the heads' parameters to average their
    gradients) and for one ``state_dict`` of both. The heads record as usual.

    Args:
        model: the backbone the heads are attached to.
        heads: its :class:`MultiScaleHeads`.
    """

    def __init__(self, model: nn.Module, heads: MultiScaleHeads) -> None:
        super().__init__()
        if not isinstance(heads, MultiScaleHeads):
            raise TypeError(f"heads must be a MultiScaleHeads, got {type(heads).__name__}")
        if _unwrap(model) is not heads.model:
            raise ValueError("heads must be attached to model (MultiScaleHeads(model, ...))")
        self.model = model
        self.heads = heads

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class MultiScaleHeads(_Recording, nn.Module):
    r"""Side heads at several stages of a backbone, recording class heatmaps at every forward.

    ``MultiScaleHeads(model, ["layer2", "layer3", "layer4"])`` builds a :class:`SideHead` per
    stage and hooks the stages: each forward of ``model`` then records, per stage, the
    heatmaps ``(N, L, h_s, w_s)`` (with gradients) and the logits of its side head, as one
    :class:`StageRecord` that :meth:`pop` returns. The backbone's computation and output are
    never changed (the heads read the stages' outputs); :meth:`remove` takes the hooks off.
    The heads' parameters are this module's: give them to the optimizer and save
    :meth:`state_dict` with the model's.

    **Deep supervision.** Each stage's logits are trained by the classification loss, and so
    is the backbone's own output (head ``"output"``), each with its weight in
    ``supervision`` (default 1 each): :meth:`classification` is
    :math:`\sum_h w_h\, \ell_c(\text{logits}_h, y)`, a sum as the terms of the consistency
    loss (Eq. 7), so that each head gets the full signal of a standalone classifier.

    **Fusion.** :meth:`prediction` is what the model predicts with its heads:

    - ``"mean"`` (default): the mean of the logits of every head with a supervision weight
      above 0 (the stages and the backbone's output): an ensemble of the depths, each of
      which was trained to classify;
    - ``"last"``: the deepest stage's side head;
    - ``"output"``: the backbone's own logits (the heads only shape the features);
    - a stage name: that stage's side head.

    A fusion that reads a head whose supervision weight is 0 (never trained) is refused.

    **Consistency.** ``consistency_weights`` weighs each stage's consistency terms (default
    1 each); :meth:`AttentionConsistencyLoss.views
    <attn_consistency.AttentionConsistencyLoss.views>` multiplies it with the transform's weight.

    Hygiene as :class:`~attn_consistency.CAMHook`: looks through DDP / DataParallel /
    ``torch.compile`` wrappers (under DDP, wrap :class:`WithSideHeads` so that the heads'
    gradients are averaged too); never changes the model's mode; keeps no tensor across
    steps other than the records not yet popped (at most ``max_stored``); :meth:`remove` is
    idempotent, and it is a context manager. The hooks run eagerly under ``torch.compile``.
    The heads follow the backbone's device only when moved with it (``heads.to(device)``).

    Args:
        model: the backbone (any module whose stages give 4-D maps ``(N, C, h, w)``, or
            ``(N, h, w, C)`` as timm's Swin: see ``layouts``).
        stages: names of the stage modules (dotted names relative to ``model``, e.g.
            ``"layer2"`` or timm's ``"stages.1"``) or, for a timm model, indices into its
            ``feature_info``; shallow to deep, as the model runs them.
        num_labels: labels ``L`` (default: the outputs of the model's own classifier).
        channels: stage name -> channels of its output, where they cannot be read from
            timm's ``feature_info`` or the stage's last convolution or norm layer. Checked at
            the first forward.
        layouts: stage name -> ``"nchw"`` (maps ``(N, C, h, w)``) or ``"nhwc"`` (``(N, h, w, C)``,
            permuted for the side head; its heatmaps are ``(N, L, h, w)`` either way). By default
            the layout is what the modules say (the module giving the stage's output: a
            convolution or a batch norm is NCHW, an ``nn.Linear`` or ``nn.LayerNorm`` NHWC; timm's
            ``output_fmt``), else what the shape says at the first forward: the one of dims 1
            and 3 that holds the stage's channels. A map where both or neither do is refused,
            named, rather than read over the wrong axes.
        width, reduction, kernel_size: of each :class:`SideHead`.
        supervision: head name (stage or ``"output"``) -> weight of its classification loss.
        consistency_weights: stage name -> weight of its consistency terms.
        fusion: ``"mean"``, ``"last"``, ``"output"`` or a stage name (see above).
        detach_classifier: the heatmaps use a detached class weight :math:`W^s` (see
            :meth:`SideHead.forward`).
        max_stored: forwards kept before the oldest unpopped records are dropped (with a
            warning).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a stage that names no submodule (the message lists the model's stages),
            the model itself or a module holding its classifier, a repeated stage, unknown
            weight keys, a fusion that names no head or an untrained one; at a forward, a
            stage whose output is not a 4-D map, or not of the channels its head was built for,
            or whose layout the shape cannot tell (named with its shape; the hooks are removed
            first).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=5)
        >>> heads = MultiScaleHeads(model, ["layer2", "layer3", "layer4"])
        >>> logits = model(torch.randn(2, 3, 64, 64))
        >>> (record,) = heads.pop()
        >>> {stage: tuple(maps.shape) for stage, maps in record.heatmaps.items()}
        {'layer2': (2, 5, 8, 8), 'layer3': (2, 5, 4, 4), 'layer4': (2, 5, 2, 2)}
        >>> head = heads.head("layer3")
        >>> torch.allclose(record.heatmaps["layer3"].mean((2, 3)) + head.classifier.bias, record.logits["layer3"], atol=1e-5)
        True
        >>> heads.prediction(logits, record.logits).shape
        torch.Size([2, 5])
        >>> heads.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[str | int],
        num_labels: int | None = None,
        *,
        channels: Mapping[str, int] | None = None,
        layouts: Mapping[str, str] | None = None,
        width: int | None = None,
        reduction: int = 16,
        kernel_size: int = 7,
        supervision: Mapping[str, float] | None = None,
        consistency_weights: Mapping[str, float] | None = None,
        fusion: str = "mean",
        detach_classifier: bool = True,
        max_stored: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        module = _unwrap(model)
        names, modules = self._resolve_stages(module, stages)
        if num_labels is None:
            num_labels = _num_labels(module)
            if num_labels is None:
                raise ValueError(
                    f"cannot tell how many labels {type(module).__name__} has (no nn.Linear): pass num_labels="
                )
        num_labels = check_positive_int("num_labels", num_labels)
        if channels is not None and not isinstance(channels, Mapping):
            raise TypeError(f"channels must be a mapping of stage name -> channels, got {type(channels).__name__}")
        channels = dict(channels or {})
        unknown = [key for key in channels if key not in names]
        if unknown:
            raise ValueError(f"channels key {unknown[0]!r} names no stage of these heads ({', '.join(names)})")
        if layouts is not None and not isinstance(layouts, Mapping):
            raise TypeError(
                f"layouts must be a mapping of stage name -> 'nchw' or 'nhwc', got {type(layouts).__name__}"
            )
        layouts = dict(layouts or {})
        unknown = [key for key in layouts if key not in names]
        if unknown:
            raise ValueError(f"layouts key {unknown[0]!r} names no stage of these heads ({', '.join(names)})")
        for key, value in layouts.items():
            if not isinstance(value, str) or value.lower() not in _LAYOUTS:
                raise ValueError(f"layouts[{key!r}] must be 'nchw' or 'nhwc', got {value!r}")
        # stage -> (layout, why): given, or what the modules say; the others are settled by the shape
        self._layouts: list[tuple[str, str] | None] = [
            (layouts[name].lower(), f"layouts={{{name!r}: {layouts[name]!r}}}")
            if name in layouts
            else _known_layout(module, name, stage)
            for name, stage in zip(names, modules)
        ]
        info = {entry["module"]: entry.get("num_chs") for entry in _feature_info(module) or []}
        built = []
        for name, stage in zip(names, modules):
            count = channels.get(name) or info.get(name) or _static_channels(stage)
            if count is None:
                raise ValueError(
                    f"cannot tell how many channels stage {name!r} ({type(stage).__name__}) gives: pass channels={{{name!r}: C}}"
                )
            built.append(
                SideHead(check_positive_int(f"channels[{name!r}]", count), num_labels, width, reduction, kernel_size)
            )
        self.heads = nn.ModuleList(built)
        self.stages: tuple[str, ...] = tuple(names)
        self.num_labels = num_labels
        self.supervision = _check_weights("supervision", supervision, (*names, OUTPUT))
        if not any(self.supervision.values()):
            raise ValueError("supervision gives every head weight 0: nothing would be trained to classify")
        self.consistency_weights = _check_weights("consistency_weights", consistency_weights, names)
        self.fusion = self._check_fusion(fusion)
        self.detach_classifier = check_bool("detach_classifier", detach_classifier)
        self.max_stored = check_positive_int("max_stored", max_stored)
        self.enabled = True
        # plain attributes, not submodules: the backbone's parameters are not the heads'
        self.__dict__["_model"] = module
        self.__dict__["_stage_modules"] = tuple(modules)
        self._stored: list[StageRecord] = []
        self._current: StageRecord | None = None
        self._warned_overflow = False
        self._handles: list[RemovableHandle] = []
        weakref.finalize(self, _remove_handles, self._handles)
        self._handles.append(module.register_forward_pre_hook(_WeakHook(self, "_on_model_call")))
        for index, stage in enumerate(modules):
            self._handles.append(stage.register_forward_hook(_WeakHook(self, "_on_stage_output", index)))
        self._handles.append(module.register_forward_hook(_WeakHook(self, "_on_model_output")))

    # --- construction ------------------------------------------------------------------

    @staticmethod
    def _resolve_stages(model: nn.Module, stages: Sequence[str | int]) -> tuple[list[str], list[nn.Module]]:
        if isinstance(stages, (str, int)) or not isinstance(stages, Sequence) or not stages:
            raise TypeError(f"stages must be a non-empty sequence of stage names, got {stages!r}")
        info = _feature_info(model)
        names: list[str] = []
        for given in stages:
            stage: object = given  # checked as any object: a wrong type gets a message naming it
            if not isinstance(stage, bool) and isinstance(stage, numbers.Integral):
                index = int(stage)
                if info is None or not -len(info) <= index < len(info):
                    count = f"has {len(info)} entries" if info else "is missing (not a timm model)"
                    raise ValueError(
                        f"stage {stage} is a feature_info index, but {type(model).__name__}'s feature_info {count}"
                    )
                stage = info[index]["module"]
            if not isinstance(stage, str):
                raise TypeError(
                    f"stages must be names (str) or feature_info indices (int), got {type(stage).__name__} {stage!r}"
                )
            names.append(stage)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stages names {', '.join(map(repr, repeated))} more than once")
        modules = []
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"stage {name!r} names no submodule of {type(model).__name__}; its stages: {_available(model)}"
                ) from None
            if module is model or (linears and any(m is linears[-1] for m in module.modules())):
                raise ValueError(
                    f"stage {name!r} holds the model's classifier: name a stage of the backbone, before the head"
                )
            modules.append(module)
        return names, modules

    def _check_fusion(self, fusion: str) -> str:
        if not isinstance(fusion, str):
            raise TypeError(f"fusion must be a str, got {type(fusion).__name__} {fusion!r}")
        if fusion not in _FUSIONS and fusion not in self.stages:
            raise ValueError(
                f"fusion must be 'mean', 'last', 'output' or a stage name ({', '.join(self.stages)}), got {fusion!r}"
            )
        read = self._fused_heads(fusion)
        untrained = [head for head in read if self.supervision[head] == 0.0] if fusion != "mean" else []
        if untrained:
            raise ValueError(
                f"fusion={fusion!r} reads the head {untrained[0]!r}, whose supervision weight is 0 (never trained)"
            )
        return fusion

    def _fused_heads(self, fusion: str) -> list[str]:
        if fusion == "mean":
            return [head for head, weight in self.supervision.items() if weight > 0]
        if fusion == "last":
            return [self.stages[-1]]
        return [fusion]

    # --- the heads as a recorder (what views() and attention_inconsistency use) -----------

    @property
    def model(self) -> nn.Module:
        """The backbone the heads are attached to (behind any wrapper)."""
        model: nn.Module = self.__dict__["_model"]
        return model

    def head(self, stage: str) -> SideHead:
        """The :class:`SideHead` of ``stage``."""
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} has no head (the heads: {', '.join(self.stages)})")
        return cast(SideHead, self.heads[self.stages.index(stage)])

    def stage_weight(self, stage: str) -> float:
        """The weight of ``stage``'s consistency terms."""
        return self.consistency_weights[stage]

    def prediction(self, output: Tensor, logits: Mapping[str, Tensor]) -> Tensor:
        """The fused logits (see ``fusion``) from the backbone's ``output`` and the stages' ``logits``."""
        chosen = [output if head == OUTPUT else logits[head] for head in self._fused_heads(self.fusion)]
        return chosen[0] if len(chosen) == 1 else torch.stack(chosen).mean(0)

    def classification(
        self,
        output: Tensor,
        logits: Mapping[str, Tensor],
        targets: Tensor,
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """Deep supervision: :math:`\\sum_h w_h\\, \\text{criterion}(\\text{logits}_h, \\text{targets})` over the heads."""
        total = None
        for head, weight in self.supervision.items():
            if weight == 0.0:
                continue
            term = criterion(output if head == OUTPUT else logits[head], targets)
            term = term if weight == 1.0 else weight * term
            total = term if total is None else total + term
        if total is None:
            raise ValueError("every head's supervision weight is 0: there is no classification loss")
        return total

    def pop(self) -> list[StageRecord]:
        """The records of every forward since the last call, oldest first; then forget them."""
        return super().pop()

    def remove(self) -> None:
        """Take the hooks off the backbone and drop stored records; safe to call twice."""
        _remove_handles(self._handles)
        self._stored = []
        self._current = None

    def __enter__(self) -> MultiScaleHeads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"stages={self.stages}, fusion={self.fusion!r}, detach_classifier={self.detach_classifier}"

    # --- recording ---------------------------------------------------------------------

    def _on_model_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._current = StageRecord({}, {}) if self.enabled else None

    def _on_stage_output(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        record = self._current
        if record is None:  # paused, or the stage ran outside a call of the model
            return
        name = self.stages[index]
        try:
            if not isinstance(output, Tensor) or output.dim() != 4 or not output.is_floating_point():
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(
                    f"stage {name!r} of {type(self.model).__name__} must give a 4-D floating-point map (N, C, h, w), "
                    f"got {shape}; name a stage whose output is a feature map"
                )
            head = cast(SideHead, self.heads[index])
            layout = self._layout(index, output, cast(nn.Conv2d, head.project[0]).in_channels)
            if name in record.heatmaps:
                raise ValueError(
                    f"stage {name!r} ran twice in one forward (a shared module?); name a stage that runs once"
                )
        except ValueError:
            self.remove()
            raise
        features = output.permute(0, 3, 1, 2) if layout == "nhwc" else output
        record.heatmaps[name], record.logits[name] = head(features, self.detach_classifier)

    def _layout(self, index: int, output: Tensor, expected: int) -> str:
        """The layout of stage ``index``'s 4-D ``output`` (settled at its first forward); checked."""
        name, shape = self.stages[index], tuple(output.shape)
        known = self._layouts[index]
        if known is not None:
            layout, why = known
            dim = 1 if layout == "nchw" else 3
            if shape[dim] != expected:
                other = "nhwc" if layout == "nchw" else "nchw"
                raise ValueError(
                    f"stage {name!r} gives maps of shape {shape}, {layout.upper()} ({why}), so with {shape[dim]} "
                    f"channels, but its side head was built for {expected}; pass channels={{{name!r}: {shape[dim]}}}, "
                    f"or layouts={{{name!r}: {other!r}}} if the map is {other.upper()}"
                )
            return layout
        nchw, nhwc = shape[1] == expected, shape[3] == expected
        if nchw and nhwc and _last_layer_is_spatial(cast(tuple[nn.Module, ...], self._stage_modules)[index]):
            # a square-ish map whose channels fit both dims: the stage's last layer with weights says
            # NCHW (a ResNet's layer1 at 256 px: 64 channels, 64x64 cells)
            nhwc = False
        if nchw and nhwc:
            raise ValueError(
                f"stage {name!r} gives maps of shape {shape}: its side head's {expected} channels could be dim 1 "
                f"(N, C, h, w) or dim 3 (N, h, w, C), and nothing in the model tells which; pass "
                f"layouts={{{name!r}: 'nchw'}} or layouts={{{name!r}: 'nhwc'}}"
            )
        if not nchw and not nhwc:
            raise ValueError(
                f"stage {name!r} gives maps of shape {shape}, but its side head was built for {expected} channels, "
                f"at neither dim 1 (N, C, h, w) nor dim 3 (N, h, w, C); pass channels={{{name!r}: {shape[1]}}} if "
                f"the map is NCHW, or channels={{{name!r}: {shape[3]}}} and layouts={{{name!r}: 'nhwc'}} if it is NHWC"
            )
        layout = "nchw" if nchw else "nhwc"
        self._layouts[index] = (layout, f"its {expected} channels are dim {1 if nchw else 3} at the first forward")
        return layout

    def _on_model_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        record, self._current = self._current, None
        if record is None:
            return
        missing = [name for name in self.stages if name not in record.heatmaps]
        if missing:
            self.remove()
            raise ValueError(
                f"stage {missing[0]!r} did not run in the forward of {type(self.model).__name__}; name stages its forward calls"
            )
        # in the model's order of stages, whatever order the hooks fired in
        record = StageRecord({s: record.heatmaps[s] for s in self.stages}, {s: record.logits[s] for s in self.stages})
        self._keep(record)


def multiscale_consistency(
    heatmaps: Mapping[str, Tensor],
    heatmaps_t: Mapping[str, Tensor],
    transform: str | Transform,
    params: Any = None,
    *,
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    distance: str = "mse",
    check_finite_values: bool | None = None,
) -> dict[str, Tensor]:
    r"""The attention consistency of Eq. 5 at every stage: :math:`\ell_{a,T}^s` per stage :math:`s`.

    Each stage's pair is compared by
    :func:`~attn_consistency.attention_consistency` (so the scale term stays in closed
    form at any stride: 28x28 against 24x24 for 224/192 inputs at stride 8), and multiplied
    by its weight.

    Args:
        heatmaps: stage -> :math:`M^s = g^s(I)`, ``(N, L, h_s, w_s)`` (a :attr:`StageRecord.heatmaps`).
        heatmaps_t: stage -> :math:`g^s(T(I))`, the same stages.
        transform, params, reduction, distance, check_finite_values: as
            :func:`~attn_consistency.attention_consistency`.
        weights: stage -> weight (default 1 each).

    Returns:
        stage -> the weighted term (scalar, or ``(N, L)`` for ``reduction='none'``).

    Raises:
        TypeError, ValueError: the two views hold other stages, a weight key names no stage,
            or a pair is refused by :func:`~attn_consistency.attention_consistency`.
    """
    for name, value in (("heatmaps", heatmaps), ("heatmaps_t", heatmaps_t)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping of stage name -> heatmaps, got {type(value).__name__}")
    if list(heatmaps) != list(heatmaps_t):
        raise ValueError(
            f"heatmaps and heatmaps_t must hold the same stages, got {list(heatmaps)} and {list(heatmaps_t)}"
        )
    stage_weights = _check_weights("weights", weights, list(heatmaps))
    terms = {}
    for stage, maps in heatmaps.items():
        term = attention_consistency(
            maps, heatmaps_t[stage], transform, params, reduction, check_finite_values, distance
        )
        terms[stage] = term if stage_weights[stage] == 1.0 else stage_weights[stage] * term
    return terms
