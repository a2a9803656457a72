"""The head before and during the first forward: the modules a name or a model family points to, what the
first forward's hooks saw (the modules called, the tensors they gave), and how two tensors are compared."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import (
    _is_classifier,
    _is_pool,
    _rtol,
)


def _resolve(wrapper: nn.Module, model: nn.Module, what: str, value: object) -> nn.Module:
    """The submodule of ``model`` that ``value`` (a module or a dotted name) designates."""
    if isinstance(value, str):
        found = None
        for root in (model, wrapper):  # a name may be relative to the wrapper ("module.fc")
            try:
                found = root.get_submodule(value)
                break
            except AttributeError:
                continue
        if found is None or not any(m is found for m in model.modules()):
            raise ValueError(f"{what}={value!r} names no submodule of {type(model).__name__}")
        value = found
    elif not isinstance(value, nn.Module):
        raise TypeError(f"{what} must be an nn.Module or a dotted module name, got {type(value).__name__}")
    elif not any(m is value for m in model.modules()):
        raise ValueError(f"{what} must be a submodule of the model, got a {type(value).__name__} outside it")
    if value is model:
        raise ValueError(f"{what} must be a submodule of {type(model).__name__}, not the model itself")
    return value


def _static_head(
    model: nn.Module,
) -> tuple[nn.Module | None, nn.Module | None, Callable[[Tensor], Tensor] | None, bool]:
    """A first guess of (features, classifier, activation), and whether the model family fixes it.

    timm (a ``global_pool`` module + ``get_classifier()``) and torchvision's DenseNet say where
    their head is. For any other model the guess (the last average pooling and the last linear
    layer registered) only names the head until the first forward shows which modules feed the
    output; the features may be ``None`` (a model that pools with ``Tensor.mean``).
    """
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        pools = [m for name, m in model.named_modules() if name.split(".")[-1] == "global_pool"]
        classifier = get_classifier()
        if isinstance(classifier, nn.Module) and _is_classifier(classifier):
            return (pools[-1] if pools else None), classifier, None, bool(pools)
    features, linear = getattr(model, "features", None), getattr(model, "classifier", None)
    if type(model).__name__ == "DenseNet" and isinstance(features, nn.Module) and isinstance(linear, nn.Linear):
        # torchvision's DenseNet applies its last ReLU functionally, between the
        # `features` block and the (functional) pooling.
        return features, linear, F.relu, True
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    pools = pools or [m for m in model.modules() if _is_pool(m) and m is not model]
    linears: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linears = linears or [m for m in model.modules() if _is_classifier(m)]
    return (pools[-1] if pools else None), (linears[-1] if linears else None), None, False


def _tensors(output: object) -> list[Tensor]:
    """The tensors a model returned: itself, or those in a tuple, list or dict."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for t in output.values() if isinstance(t, Tensor)]
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, Tensor)]
    return []


def _device_type(output: Any) -> str:
    tensors = _tensors(output)
    return tensors[0].device.type if tensors else "cpu"


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _no_evidence(tensor: Any) -> str:
    """Why values cannot tell which modules are the head."""
    if isinstance(tensor, Tensor) and tensor.numel() == 0:
        return "the batch is empty (N=0)"
    return "its values are non-finite (nan or inf)"


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` is ``a`` or a view of it in the same order (flatten, view, identity)."""
    try:
        return (
            a.numel() == b.numel() > 0
            and a.dtype == b.dtype
            and a.data_ptr() == b.data_ptr()
            and a.is_contiguous()
            and b.is_contiguous()
        )
    except RuntimeError:  # a tensor subclass without storage
        return False


def _same_values(a: Tensor, b: Tensor) -> bool | None:
    """Whether ``b`` holds ``a``'s values (a view, a copy or a cast); ``None`` when no value can tell.

    Shared memory answers even for nan (a first batch with a nan pixel in a model with
    BatchNorm in train mode is all nan); else the finite values must be equal.
    """
    if a.numel() != b.numel():
        return False
    if a.numel() == 0:
        return None
    if _shares_memory(a, b):
        return True
    a, b = a.detach().reshape(-1).float(), b.detach().reshape(-1).to(device=a.device, dtype=torch.float32)
    finite = a.isfinite()
    if not torch.equal(finite, b.isfinite()):
        return False
    if not bool(finite.any()):
        return None
    return torch.equal(a[finite], b[finite])


def _matches_pooled(pooled: Tensor, x: Tensor, tol: Tensor, rtol: float) -> bool:
    """Whether ``x`` is ``pooled`` up to ``tol``, or ``pooled`` through inverted dropout.

    Dropout between pooling and classifier (EfficientNet, timm's ``drop_rate``) zeroes some
    entries and scales the rest by one factor ``1 / (1 - p) > 1``; the maps of Eq. 1 are still
    those of the model, whose expected logits they give. A ReLU zeroes entries too but keeps
    the scale 1, and a plain scaling zeroes none: both are refused.
    """
    if bool(((x - pooled).abs() <= tol).all()):
        return True
    kept = x != 0
    dropped = ~kept & (pooled.abs() > tol)
    if not bool(dropped.any()) or not bool(kept.any()):
        return False
    scale = float(x[kept].abs().sum() / pooled[kept].abs().sum().clamp_min(torch.finfo(torch.float32).tiny))
    if not scale > 1.0 + rtol:
        return False
    deviation = (x[kept] - scale * pooled[kept]).abs()
    return bool((deviation <= scale * tol[kept] + rtol * x[kept].abs()).all())


def _feeds(pooled: Tensor, x: Tensor) -> bool | None:
    """Whether the pooling output ``pooled`` is the classifier input ``x`` (up to dropout).

    ``None`` when no value can tell (an empty batch, non-finite values).
    """
    if pooled.numel() != x.numel():
        return False
    if pooled.numel() == 0:
        return None
    if _shares_memory(pooled, x):
        return True
    p, v = pooled.detach().reshape(x.shape).float(), x.detach().to(device=pooled.device, dtype=torch.float32)
    finite = p.isfinite() & v.isfinite()
    if not bool(finite.any()):
        return None
    p, v = p[finite], v[finite]
    rtol = _rtol(pooled.dtype, x.dtype)
    return _matches_pooled(p, v, rtol * p.abs(), rtol)


class _Forward:
    """What the one-off hooks saw during one call of the model."""

    def __init__(self, pools: list[nn.Module], linears: list[nn.Module]) -> None:
        self.pool_candidates = pools
        self.linear_candidates = linears
        # (candidate index, features, pooled output or None when the candidate is not a pooling)
        self.pools: list[tuple[int, Tensor, Tensor | None]] = []
        # (candidate index, input, output) of every call of a candidate classifier
        self.linears: list[tuple[int, Any, Any]] = []
        # (module, input, output) of every call of a normalisation
        self.norms: list[tuple[nn.Module, Tensor, Tensor]] = []
        # (module, output, its version counter then) of every module returning a 3-D or 4-D tensor, in
        # the order they returned: where a model that pools functionally (x.mean(...)) has its features
        self.outputs: list[tuple[nn.Module, Tensor, int]] = []
        # the distinct 2-D inputs of modules (Grad-CAM only): where a head after a functional pooling
        # (x.mean(...)) takes the pooled vector, which names the cells of the map it averages
        self.vectors: list[Tensor] = []
        # (float32 copy or None without check, original dtype) of each recorded feature map
        self.features: list[tuple[Tensor | None, torch.dtype]] = []
        # the feature maps recorded by the features hook, as the model computed them (with the graph)
        self.live: list[Tensor] = []
        # a module whose pooled tokens would have fed the classifier, had their order been known
        self.unordered: nn.Module | None = None
