"""Backbones for the reproduction: torchvision classifiers with a new head, and a small CPU net."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from examples._files import load_torch

__all__ = ["SmallResNet", "build_model", "check_arch"]


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            if stride != 1 or inputs != outputs
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A four-stage residual net of stride 8 with a GAP-FC head, for the CPU demo.

    64 px inputs give 8x8 heatmaps and 56 px inputs 7x7, so flips and scales have maps
    fine enough to show where the net looks, at a cost a laptop trains in minutes.
    """

    def __init__(self, num_labels: int, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layers = nn.Sequential(
            _Block(widths[0], widths[1], 2), _Block(widths[1], widths[2], 2), _Block(widths[2], widths[3], 1)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """Where the linear classifier sits: its parent module, attribute name and the layer."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model, "fc", model.fc
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):  # DenseNet
        return model, "classifier", classifier
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        return classifier, str(len(classifier) - 1), classifier[-1]
    raise ValueError(f"do not know where the classifier of {type(model).__name__} is")


def _replace_head(model: nn.Module, num_labels: int) -> None:
    """Give a classifier a new linear layer with ``num_labels`` outputs."""
    parent, name, layer = _head(model)
    setattr(parent, name, nn.Linear(layer.in_features, num_labels))


def _head_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the linear classifier that :func:`_replace_head` replaces."""
    parent, name, _ = _head(model)
    return f"{name}." if parent is model else f"classifier.{name}."


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, under ``"state_dict"``, or a checkpoint of ``examples.train``."""
    state = load_torch(path, "pretrained weights")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = next((key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path} is not a state dict: its entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return state


def check_arch(arch: str) -> str:
    """``arch`` if :func:`build_model` knows it, else a ValueError naming it."""
    if arch == "small_resnet":
        return arch
    if arch.startswith("aamn_"):  # an AAMN head on that backbone (examples.aamn)
        check_arch(arch.removeprefix("aamn_"))
        return arch
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown arch {arch!r}: use 'small_resnet' or a torchvision classification model name")
    return arch


def build_model(arch: str, num_labels: int, pretrained: str | None = None) -> nn.Module:
    """A classifier with ``num_labels`` outputs.

    Args:
        arch: ``"small_resnet"``, a torchvision classification model name (``"resnet50"``...), or
            ``"aamn_<one of those>"`` for an AAMN head on that backbone (:mod:`examples.aamn`).
        num_labels: outputs of the new linear head.
        pretrained: ``None`` (random init), ``"imagenet"`` (torchvision's weights, downloaded
            or from the torch hub cache), or the path of a local file with weights of
            ``arch``: an ImageNet state dict as torchvision distributes it (e.g.
            ``resnet50-11ad3fa6.pth``), or a checkpoint written by :func:`examples.train.train`
            (how the demo starts from its pretraining run). Everything but the classifier is
            loaded; the classifier is a new head.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if check_arch(arch).startswith("aamn_"):
        from examples.aamn import build_aamn

        return build_aamn(arch, num_labels, pretrained)
    if arch == "small_resnet":
        if pretrained == "imagenet":
            raise ValueError("small_resnet has no ImageNet weights: give the path of a checkpoint of it, or None")
        model: nn.Module = SmallResNet(num_labels)
    else:
        import torchvision

        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained == "imagenet" else None)
        _replace_head(model, num_labels)
    if pretrained not in (None, "imagenet"):
        head = _head_prefix(model)
        state = {k: v for k, v in _read_state(pretrained).items() if not k.startswith(head)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes differ
            raise ValueError(f"{pretrained} does not hold weights of {arch}: {error}") from None
        missing = [k for k in missing if not k.startswith(head)]
        if missing or unexpected:
            raise ValueError(
                f"{pretrained} does not hold weights of {arch}: "
                f"missing {missing[:5] or 'nothing'}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5] or 'nothing'}{' ...' if len(unexpected) > 5 else ''}"
            )
    return model
