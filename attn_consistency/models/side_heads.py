"""The side heads of multi-scale attention consistency (their attention module, CAMs and logits) and how a stage's maps are found."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int, check_weight


class AttentionModule(nn.Module):
    r"""The attention-enhanced module of a side head: channel attention, then spatial attention.

    Our reading of MSAC's "attention-enhanced modules" is CBAM (Woo et al., ECCV 2018), the
    lightest block that enhances both *what* (channels) and *where* (cells), which is what a
    class heatmap at a middle stage needs: the middle stages' features are not yet
    semantically strong, and a heatmap is a spatial quantity. With :math:`\sigma` the sigmoid,

    .. math:: x' = \sigma\big(\mathrm{MLP}(\mathrm{avg}(x)) + \mathrm{MLP}(\max(x))\big) \odot x,
       \qquad y = \sigma\big(\mathrm{conv}_{k \times k}[\mathrm{mean}_c\, x'; \max_c x']\big) \odot x'

    The MLP is two 1x1 convolutions (``channels -> channels // reduction -> channels``); the
    spatial convolution is zero-padded so that the map keeps its size. It costs
    :math:`O(C^2 / r)` per image plus one :math:`k \times k` convolution of 2 channels.

    Args:
        channels: channels of the input (and output).
        reduction: the MLP's channel reduction :math:`r` (CBAM: 16).
        kernel_size: side of the spatial attention's convolution (CBAM: 7), odd.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        channels = check_positive_int("channels", channels)
        reduction = check_positive_int("reduction", reduction)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the map keeps its size), got {kernel_size}")
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * channel
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(pooled))


class SideHead(nn.Module):
    """The head at one stage: a projection, the attention-enhanced module, a 1x1 class convolution.

    ``features (N, C, h, w)`` -> 1x1 convolution to ``width`` channels, BatchNorm, ReLU (a
    middle stage's features are wide and generic: a learnt projection lets the head pick what
    its labels need at little cost) -> :class:`AttentionModule` -> the enhanced features
    :math:`F^s`. The class convolution (weight :math:`W^s`, bias :math:`b^s`) then gives the
    heatmaps :math:`M^s = W^s * F^s` (no bias) and the logits ``GAP(F^s) @ W^s.T + b^s``: a
    GAP-FC head, so that ``heatmaps.mean((2, 3)) + bias == logits``.

    Args:
        channels: channels of the stage's features.
        num_labels: labels ``L``.
        width: channels of the enhanced features (default ``min(channels, 256)``).
        reduction, kernel_size: see :class:`AttentionModule`.
    """

    def __init__(
        self, channels: int, num_labels: int, width: int | None = None, reduction: int = 16, kernel_size: int = 7
    ) -> None:
        super().__init__()
        channels = check_positive_int("channels", channels)
        num_labels = check_positive_int("num_labels", num_labels)
        width = min(channels, 256) if width is None else check_positive_int("width", width)
        self.project = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.attention = AttentionModule(width, reduction, kernel_size)
        self.classifier = nn.Conv2d(width, num_labels, 1)

    def forward(self, features: Tensor, detach_classifier: bool = True) -> tuple[Tensor, Tensor]:
        """``(heatmaps (N, L, h, w), logits (N, L))`` of ``features``.

        With ``detach_classifier`` the heatmaps use a detached :math:`W^s` (as
        :class:`~attn_consistency.CAMHook`): a consistency loss then trains the attention
        module, the projection and the backbone, and :math:`W^s` learns from the
        classification loss, which always reaches it through the logits.
        """
        enhanced = self.attention(self.project(features))
        weight = self.classifier.weight
        heatmaps = F.conv2d(enhanced, weight.detach() if detach_classifier else weight)
        logits = F.linear(enhanced.mean((2, 3)), weight.flatten(1), self.classifier.bias)
        return heatmaps, logits


class StageRecord(NamedTuple):
    """What :class:`MultiScaleHeads` recorded in one forward of the backbone.

    Attributes:
        heatmaps: stage name -> ``(N, L, h_s, w_s)``, with gradients.
        logits: stage name -> ``(N, L)``, the side head's logits.
    """

    heatmaps: dict[str, Tensor]
    logits: dict[str, Tensor]


def _feature_info(model: nn.Module) -> list[dict[str, Any]] | None:
    """timm's ``feature_info`` as a list of dicts (``module``, ``num_chs``, ...), or None."""
    info = getattr(model, "feature_info", None)
    get_dicts = getattr(info, "get_dicts", None)
    if callable(get_dicts):
        info = get_dicts()
    if isinstance(info, list) and info and all(isinstance(entry, dict) and "module" in entry for entry in info):
        return info
    return None


def _available(model: nn.Module) -> str:
    """The stage names to suggest: timm's feature_info modules, else the model's children."""
    info = _feature_info(model)
    names = [entry["module"] for entry in info] if info else [name for name, _ in model.named_children()]
    return ", ".join(names) + " (or any dotted name of a submodule)"


def _static_channels(stage: nn.Module) -> int | None:
    """Output channels of a stage from its last convolution or norm layer, or None."""
    last = _last_of_sequence(stage)
    if type(last) is nn.Linear:
        return last.out_features
    if type(last) is nn.LayerNorm and len(last.normalized_shape) == 1:
        return last.normalized_shape[0]
    for module in reversed(list(stage.modules())):
        if isinstance(module, nn.Conv2d):
            return module.out_channels
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.num_features
        if isinstance(module, nn.GroupNorm):
            return module.num_channels
    return None


# modules that keep their input's layout: a Sequential ending in one has the layout of what precedes it
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout
)  # fmt: skip


def _last_of_sequence(stage: nn.Module) -> nn.Module:
    """The module whose output is ``stage``'s output up to an activation, through nested ``nn.Sequential``."""
    while type(stage) is nn.Sequential and len(stage) > 0:
        children = list(stage)
        while len(children) > 1 and type(children[-1]) in _ELEMENTWISE:
            children.pop()
        stage = children[-1]
    return stage


def _known_layout(model: nn.Module, name: str, stage: nn.Module) -> tuple[str, str] | None:
    """``(layout, why)`` where the modules say how the stage's output is laid out, else None.

    Only what cannot be wrong: the module giving the output (through ``nn.Sequential``) is a
    convolution or a batch/group norm (NCHW), or exactly ``nn.Linear`` / ``nn.LayerNorm``, which work
    on the last dimension (NHWC); timm's ``output_fmt`` of the stage, or of the model for its
    ``feature_info`` stages. (A timm model without ``output_fmt`` may still give NHWC stages,
    as VOLO: the shape tells those.)
    """
    last = _last_of_sequence(stage)
    if isinstance(last, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return "nchw", f"its output is that of a {type(last).__name__}, which gives (N, C, h, w)"
    if type(last) is nn.Linear or (type(last) is nn.LayerNorm and len(last.normalized_shape) == 1):
        return "nhwc", f"its output is that of a {type(last).__name__}, which works on the last dimension"
    for owner, where in ((stage, "the stage's"), (model, f"{type(model).__name__}'s")):
        if owner is model and name not in {entry["module"] for entry in _feature_info(model) or []}:
            continue
        fmt = getattr(owner, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)
        if isinstance(fmt, str) and fmt.upper() in ("NCHW", "NHWC"):
            return fmt.lower(), f"{where} output_fmt is {fmt.upper()!r}"
    return None


# modules whose forward is known not to permute its output: torch's layers and torchvision's CNN blocks
_NO_PERMUTE = ("torch.nn.modules.", "torchvision.models.")


def _last_layer_is_spatial(stage: nn.Module) -> bool:
    """Whether ``stage`` is built of known modules and its last layer with weights is a conv or a batch/group norm.

    A weaker cue than :func:`_known_layout` (the stage may end in a residual sum, as a ResNet
    block), used only when a map's channels fit both dim 1 and dim 3. A module of other code
    may permute its output in its forward (a convolution, then ``permute`` to NHWC), and a
    layer that works on the last dimension (``nn.Linear``, ``nn.LayerNorm``) after the
    convolution leaves the layout open: both give no cue.
    """
    if not all(type(module).__module__.startswith(_NO_PERMUTE) for module in stage.modules()):
        return False
    for module in reversed(list(stage.modules())):
        if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            return True
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            return False
    return False


def _num_labels(model: nn.Module) -> int | None:
    """Labels of the model's own classifier (timm's ``get_classifier()``, else its last Linear)."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Linear):
        return classifier.out_features
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _check_weights(name: str, weights: Mapping[str, float] | None, known: Sequence[str]) -> dict[str, float]:
    """A weight per known name (default 1), checked; a key naming nothing is an error, not weight 1."""
    if weights is None:
        return dict.fromkeys(known, 1.0)
    if not isinstance(weights, Mapping):
        raise TypeError(f"{name} must be a mapping of name -> weight, got {type(weights).__name__}")
    unknown = [key for key in weights if key not in known]
    if unknown:
        raise ValueError(f"{name} key {unknown[0]!r} names no head (the heads: {', '.join(known)})")
    return {key: check_weight(f"{name}[{key!r}]", weights.get(key, 1.0)) for key in known}
