r"""Class activation maps, with gradients, from any GAP-FC classifier.

For a model whose head is global average pooling followed by one linear layer, the
heatmap of label :math:`l` (paper Eq. 1) is

.. math:: M_l(m, n) = \sum_c W(l, c)\, F_c(m, n)

with :math:`F` the tensor the model average-pools and :math:`W` the linear weight. Then
``heatmaps.mean((2, 3)) + bias == logits``: :class:`CAMHook` checks it on the first
forward, so a model whose head is not GAP-FC is reported instead of silently giving
wrong maps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["CAMHook"]

_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _is_pool(module: nn.Module) -> bool:
    """Whether ``module`` pools: then the features are its input, not its output."""
    return isinstance(module, _POOL_TYPES) or "Pool" in type(module).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _resolve(model: nn.Module, what: str, value: nn.Module | str) -> nn.Module:
    if isinstance(value, nn.Module):
        if not any(m is value for m in model.modules()):
            raise ValueError(f"{what} must be a submodule of the model, got a {type(value).__name__} outside it")
        return value
    if isinstance(value, str):
        try:
            return model.get_submodule(value)
        except AttributeError:
            raise ValueError(f"{what}={value!r} names no submodule of {type(model).__name__}") from None
    raise TypeError(f"{what} must be an nn.Module or a dotted module name, got {type(value).__name__}")


def _find_head(model: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor] | None]:
    """Find (features module, classifier, activation) of the common model families."""
    if callable(getattr(model, "get_classifier", None)):  # timm
        pools = [m for name, m in model.named_modules() if name.split(".")[-1] == "global_pool"]
        if pools:
            return pools[-1], model.get_classifier(), None
    if type(model).__name__ == "DenseNet" and hasattr(model, "features") and hasattr(model, "classifier"):
        # torchvision's DenseNet applies its last ReLU functionally, between the
        # `features` block and the pooling.
        return model.features, model.classifier, F.relu
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not pools or not linears:
        raise ValueError(
            f"could not find the average pooling and linear classifier of {type(model).__name__}; "
            "pass features= (the pooling module, or the module whose output is pooled) and classifier="
        )
    return pools[-1], linears[-1], None


class CAMHook:
    r"""Record the class activation maps of every forward pass, with gradients.

    Attach it to a model whose head is global average pooling followed by a linear layer;
    after each forward, :meth:`pop` returns the heatmaps ``(N, L, h, w)`` of the forwards
    since the last call, in order. The maps stay in the autograd graph, so a loss on them
    trains the backbone.

    Finds the pooled features and the classifier by itself for torchvision ResNet /
    ResNeXt / Wide-ResNet / RegNet / EfficientNet / DenseNet and for timm models
    (``global_pool`` + ``get_classifier()``); name them for any other model.

    Args:
        model: the classifier (a DistributedDataParallel, DataParallel or compiled wrapper
            is looked through).
        features: the pooling module (its input is the feature map :math:`F`), or the
            module whose output is the feature map; a module or a dotted name.
        classifier: the ``nn.Linear`` applied to the pooled features; module or name.
        activation: a function applied to the ``features`` output before pooling, for
            models that apply it functionally (DenseNet's ReLU; found automatically).
        detach_classifier: use a detached :math:`W`, as the authors' code: the consistency
            loss then trains the backbone only and the classifier learns from the
            classification loss. ``False`` lets the loss reach :math:`W` too.
        check: on the first forward, verify ``heatmaps.mean((2, 3)) + bias == logits`` and
            raise a ``ValueError`` naming the head when it fails.
        max_stored: forwards kept before the oldest unconsumed maps are dropped (with a
            warning), so that a loop that never calls :meth:`pop` cannot leak memory.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=5)
        >>> with CAMHook(model) as cam:
        ...     logits = model(torch.randn(2, 3, 64, 64))
        ...     (heatmaps,) = cam.pop()
        >>> heatmaps.shape
        torch.Size([2, 5, 2, 2])
        >>> torch.allclose(heatmaps.mean((2, 3)) + model.fc.bias, logits, atol=1e-5)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        features: nn.Module | str | None = None,
        classifier: nn.Module | str | None = None,
        *,
        activation: Callable[[Tensor], Tensor] | None = None,
        detach_classifier: bool = True,
        check: bool = True,
        max_stored: int = 64,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(max_stored, int) or max_stored < 1:
            raise ValueError(f"max_stored must be a positive int, got {max_stored!r}")
        module = _unwrap(model)
        found = _find_head(module) if features is None or classifier is None else (None, None, None)
        self.features = _resolve(module, "features", features) if features is not None else found[0]
        self.classifier = _resolve(module, "classifier", classifier) if classifier is not None else found[1]
        # the activation found with the features applies only when the user named neither
        self.activation = activation if activation is not None or features is not None else found[2]
        if not isinstance(self.classifier, nn.Linear):
            raise TypeError(
                f"classifier must be an nn.Linear applied to the pooled features, got "
                f"{type(self.classifier).__name__}; pass classifier= to name it"
            )
        names = {m: name for name, m in module.named_modules()}
        self._model_name = type(module).__name__
        self._features_name = names.get(self.features, type(self.features).__name__)
        self._classifier_name = names.get(self.classifier, "classifier")
        self._classifier_block = self._enclosing_block(module, self._classifier_name)
        self.detach_classifier = detach_classifier
        self.max_stored = max_stored
        self.enabled = True
        self._maps: list[Tensor] = []
        self._warned_overflow = False
        self._pending_check: tuple[Tensor, Tensor] | None = None
        self._handle: RemovableHandle | None = (
            self.features.register_forward_pre_hook(self._on_pool_input)
            if _is_pool(self.features)
            else self.features.register_forward_hook(self._on_features_output)
        )
        self._check_handle = self.classifier.register_forward_hook(self._on_logits) if check else None

    @staticmethod
    def _enclosing_block(model: nn.Module, name: str) -> str:
        """Describe the Sequential the classifier sits in, for the not-GAP-FC error."""
        parent = name.rpartition(".")[0]
        if not parent:
            return ""
        block, classifier = model.get_submodule(parent), model.get_submodule(name)
        others = [type(m).__name__ for m in block.children() if m is not classifier]
        return f" ('{parent}' also holds {', '.join(others)})" if others else ""

    def _on_pool_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._record(args[0])

    def _on_features_output(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self._record(output)

    def _record(self, features: Tensor) -> None:
        if not self.enabled:
            return
        if not isinstance(features, Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"{self._model_name}: the features of '{self._features_name}' must be a 4-D map "
                f"(N, C, h, w), got {shape}; pass features= naming the pooling module or the "
                "module whose output is pooled"
            )
        if self.activation is not None:
            features = self.activation(features)
        weight = self.classifier.weight
        if features.shape[1] != weight.shape[1]:
            raise ValueError(
                f"{self._model_name} is not GAP-FC: the classifier '{self._classifier_name}' takes "
                f"{weight.shape[1]} features but the pooled map '{self._features_name}' has "
                f"{features.shape[1]} channels{self._classifier_block}"
            )
        if self.detach_classifier:
            weight = weight.detach()
        heatmaps = F.conv2d(features, weight[:, :, None, None].to(features.dtype))
        if len(self._maps) >= self.max_stored:
            self._maps.pop(0)
            if not self._warned_overflow:
                self._warned_overflow = True
                warnings.warn(
                    f"CAMHook: {self.max_stored} forwards were recorded without pop(); the oldest "
                    "heatmaps are dropped. Call pop() after each step, or pause the hook "
                    "(`with cam.paused():`) around forwards that need no heatmaps.",
                    stacklevel=2,
                )
        self._maps.append(heatmaps)
        if self._check_handle is not None and not torch.compiler.is_compiling():
            # the check runs on an eager forward (see _on_logits): keep it out of compiled graphs
            self._pending_check = (heatmaps.detach(), features.detach().mean((2, 3)))

    def _on_logits(self, module: nn.Module, args: tuple[Any, ...], logits: Tensor) -> None:
        if torch.compiler.is_compiling():
            # a data-dependent check would split the compiled graph; check in eager instead
            return
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return
        with torch.no_grad():
            self._check_gap_fc(*pending, args[0].detach(), logits.detach())
        self._check_handle.remove()
        self._check_handle = None

    def _check_gap_fc(self, heatmaps: Tensor, pooled: Tensor, classifier_input: Tensor, logits: Tensor) -> None:
        """Raise unless ``logits == heatmaps.mean((2, 3)) + bias``, up to dropout in the head."""
        expected = heatmaps.float().mean((2, 3))
        if self.classifier.bias is not None:
            expected = expected + self.classifier.bias.float()
        low_precision = heatmaps.dtype in (torch.float16, torch.bfloat16)
        rtol = 3e-2 if low_precision else 1e-4
        if logits.shape != expected.shape:
            detail = f"the classifier output has shape {tuple(logits.shape)}, expected {tuple(expected.shape)}"
        else:
            logits = logits.float()
            error = float((expected - logits).abs().max())
            if error <= rtol * (1.0 + float(logits.abs().max())):
                return
            if self._differs_by_dropout(pooled.float(), classifier_input.float(), rtol):
                return
            detail = f"logits differ from heatmaps.mean((2, 3)) + bias by up to {error:.3g}"
        raise ValueError(
            f"{self._model_name} is not GAP-FC between '{self._features_name}' and "
            f"'{self._classifier_name}'{self._classifier_block}: {detail}. Class activation "
            "maps need global average pooling followed by one linear layer; pass features= "
            "and classifier= to name them, or use a model with such a head"
        )

    @staticmethod
    def _differs_by_dropout(pooled: Tensor, classifier_input: Tensor, rtol: float) -> bool:
        """Whether the classifier input is the pooled map through (inverted) dropout.

        Dropout between pooling and classifier (EfficientNet, timm's ``drop_rate``) zeroes
        some entries and scales the rest by ``1 / (1 - p)``; the maps of Eq. 1 are still
        those of the model, whose expected logits they give.
        """
        if classifier_input.shape != pooled.shape:
            classifier_input = classifier_input.reshape(pooled.shape[0], -1)
            if classifier_input.shape != pooled.shape:
                return False
        kept = classifier_input != 0
        if not bool(kept.any()):
            return False
        scale = float(classifier_input[kept].abs().sum() / pooled[kept].abs().sum().clamp_min(1e-12))
        deviation = float((classifier_input[kept] - scale * pooled[kept]).abs().max())
        dropped = bool((~kept).any())
        return dropped and scale > 1.0 + rtol and deviation <= rtol * (1.0 + float(classifier_input.abs().max()))

    def pop(self) -> list[Tensor]:
        """The heatmaps of every forward since the last call, oldest first; then forget them."""
        maps, self._maps = self._maps, []
        return maps

    def clear(self) -> None:
        """Forget the heatmaps recorded so far."""
        self._maps = []

    def __len__(self) -> int:
        return len(self._maps)

    @contextmanager
    def paused(self) -> Iterator[CAMHook]:
        """Record nothing inside the block (an evaluation loop that needs no heatmaps)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def remove(self) -> None:
        """Detach the hooks from the model and drop stored maps; safe to call twice."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._check_handle is not None:
            self._check_handle.remove()
            self._check_handle = None
        self._maps = []
        self._pending_check = None

    def __enter__(self) -> CAMHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"CAMHook({self._model_name}, features='{self._features_name}', "
            f"classifier='{self._classifier_name}', detach_classifier={self.detach_classifier})"
        )
