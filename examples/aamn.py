"""AAMN models for the reproduction: a backbone of :func:`examples.models.build_model` with an
:class:`attn_consistency.AAMNHead` on its last feature map.

Arch names are ``aamn_<backbone>``: ``aamn_resnet101`` and ``aamn_resnet50`` for the multi-label
benchmarks, ``aamn_small_resnet`` for the CPU comparison on the synthetic dataset; any backbone
that :func:`~examples.models.build_model` builds and whose pooling is a child module
(torchvision ResNet, ResNeXt, Wide-ResNet, RegNet, EfficientNet, ...) or that has timm's
``forward_features`` works the same way.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from attn_consistency.models import AAMN

__all__ = ["PREFIX", "build_aamn", "trunk"]

PREFIX = "aamn_"
"""Arch names starting with this build an AAMN on the backbone named by the rest."""


class _ForwardFeatures(nn.Module):
    """A timm model as a trunk: its ``forward_features`` (the map before its pooling)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.reset_classifier(0)
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)


def trunk(model: nn.Module) -> tuple[nn.Module, int]:
    """The part of a GAP-FC classifier before its pooling, and the channels of its feature map.

    Raises:
        ValueError: a model with neither ``forward_features`` nor an average-pooling child
            followed only by its classifier (e.g. DenseNet, which pools functionally; MobileNetV3
            and VGG, whose heads hold more than one linear layer).
    """
    if callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "num_features", None), int):
        return _ForwardFeatures(model), model.num_features
    from examples.models import _head

    children = list(model.named_children())
    pools = [k for k, (_, child) in enumerate(children) if isinstance(child, nn.AdaptiveAvgPool2d)]
    _, _, classifier = _head(model)
    if not pools:
        raise ValueError(
            f"{type(model).__name__} has no average-pooling child module: cannot cut it before its pooling"
        )
    # the classifier's input is the feature map's width only when it is the one linear layer after a global pooling
    after = [m for _, child in children[pools[-1] + 1 :] for m in child.modules() if isinstance(m, nn.Linear)]
    if after != [classifier] or children[pools[-1]][1].output_size not in (1, (1, 1)):
        raise ValueError(
            f"{type(model).__name__}'s layers after its pooling are not one linear classifier on the globally pooled "
            "map: cannot tell the channels of its feature map; build attn_consistency.AAMN(trunk, channels, num_labels)"
        )
    return nn.Sequential(OrderedDict(children[: pools[-1]])), classifier.in_features


def build_aamn(arch: str, num_labels: int, pretrained: str | None = None) -> AAMN:
    """``aamn_<backbone>``: the backbone (weights as :func:`~examples.models.build_model` loads
    them for ``<backbone>``, so ``pretrained`` holds the backbone's weights, e.g. torchvision's
    ImageNet file) cut before its pooling, with a new :class:`~attn_consistency.AAMNHead`."""
    from examples.models import build_model

    if not arch.startswith(PREFIX):
        raise ValueError(f"an AAMN arch starts with {PREFIX!r}, got {arch!r}")
    backbone = build_model(arch.removeprefix(PREFIX), num_labels, pretrained)
    features, channels = trunk(backbone)
    return AAMN(features, channels, num_labels)
