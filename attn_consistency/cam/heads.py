"""The head of a classifier as the CAM sees it: which modules are norms and classifiers, their weights, and the tolerances of the check."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


# Relative rounding error a computation in each dtype may carry (a few units in the last
# place): the first-forward check must accept the model's own rounding and nothing more.
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# float32 matmuls may run in TF32 ("high") or bf16 ("medium"), see torch.set_float32_matmul_precision;
# a dot product of K terms also accumulates rounding, hence 1e-3 even at "highest".
_MATMUL_RTOL_FP32 = {"highest": 1e-3, "high": 1e-2, "medium": 3e-2}


# Models whose pooled tokens are patch tokens in raster (row-major) order on the image, after their
# prefix (class, distillation, register) tokens: what laying tokens out on a grid needs to be right.
# Other token models are refused unless the user names the features.
_RASTER_TOKENS = frozenset(
    {
        "Beit",
        "Cait",
        "ConVit",
        "EfficientFormer",
        "Eva",
        "Hiera",  # its last stage is back in raster order (checked against its own reroll)
        "Levit",
        "LevitDistilled",
        "MlpMixer",
        "MultiScaleVit",
        "TNT",
        "Twins",
        "VisionTransformer",
        "VisionTransformerRelPos",
        "Xcit",
    }
)


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation of vectors that :func:`_norm_stats` knows.

    LayerNorm / RMSNorm over one dimension (timm's ``LayerNorm2d`` and ``RmsNorm2d`` normalise
    the channels of an ``(N, C, 1, 1)`` pooled map), and BatchNorm1d.
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape) == 1
    if type(module).__name__ in ("RmsNorm", "RmsNorm2d"):
        return len(getattr(module, "normalized_shape", (0,))) == 1
    return isinstance(module, nn.BatchNorm1d)


def _is_classifier(module: nn.Module) -> bool:
    """An ``nn.Linear``, or an ``nn.Conv2d`` that is one (1x1 kernel, stride 1, no padding, one group)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


def _weight_parameter(classifier: nn.Module) -> Tensor:
    weight = classifier.weight
    assert isinstance(weight, Tensor)  # a Linear's or a Conv2d's (_is_classifier)
    return weight


def _bias(classifier: nn.Module) -> Tensor | None:
    bias = getattr(classifier, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _weight(classifier: nn.Module) -> Tensor:
    """The classifier's weight as a matrix ``(L, C)``."""
    weight = _weight_parameter(classifier)
    return weight.reshape(weight.shape[0], -1)


def _labels(classifier: nn.Module) -> int:
    return int(_weight(classifier).shape[0])


def _norm_stats(norm: nn.Module, pooled: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """(mu, 1 / sigma, gamma, beta) of ``norm`` applied to the pooled vectors ``(N, C)``.

    mu and sigma broadcast against ``pooled``: one pair per sample for a LayerNorm (and the
    root mean square for an RMSNorm, whose mu is ``None``), one per channel for a BatchNorm
    (the batch's statistics in training, the running ones otherwise).
    """
    dtype = pooled.dtype
    gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if isinstance(norm, nn.BatchNorm1d):
        running_mean, running_var = norm.running_mean, norm.running_var
        if norm.training or running_mean is None or running_var is None:
            mu, var = pooled.mean(0, keepdim=True), pooled.var(0, unbiased=False, keepdim=True)
        else:
            mu, var = running_mean.to(dtype)[None], running_var.to(dtype)[None]
        return mu, torch.rsqrt(var + norm.eps), gamma, beta
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = torch.finfo(dtype).eps
    if isinstance(norm, nn.LayerNorm):
        mu, var = pooled.mean(1, keepdim=True), pooled.var(1, unbiased=False, keepdim=True)
        return mu, torch.rsqrt(var + eps), gamma, beta
    return None, torch.rsqrt(pooled.pow(2).mean(1, keepdim=True) + eps), gamma, None  # RMSNorm


def _normalise(norm: nn.Module, pooled: Tensor, detach: bool) -> Tensor:
    """``norm(pooled)`` recomputed from its statistics, for the check."""
    mu, inv, gamma, beta = _norm_stats(norm, pooled)
    out = (pooled if mu is None else pooled - mu) * inv
    if gamma is not None:
        out = out * (gamma.detach() if detach else gamma).to(out.dtype)
    if beta is not None:
        out = out + (beta.detach() if detach else beta).to(out.dtype)
    return out


def _is_pool(module: nn.Module) -> bool:
    """Whether ``module`` pools: then the features are its input, not its output."""
    return isinstance(module, _POOL_TYPES) or "Pool" in type(module).__name__


def _rtol(*dtypes: torch.dtype) -> float:
    """The rounding of the least precise of ``dtypes``."""
    return max(_RTOL.get(dtype, _RTOL[torch.bfloat16]) for dtype in dtypes)


def _matmul_rtol(*dtypes: torch.dtype) -> float:
    """The rounding of a matmul in the least precise of ``dtypes``."""
    rtol = _rtol(*dtypes)
    if rtol == _RTOL[torch.float32]:
        return _MATMUL_RTOL_FP32.get(torch.get_float32_matmul_precision(), _RTOL[torch.bfloat16])
    return rtol


def _version(tensor: Tensor) -> int:
    """The tensor's in-place version counter (-1 for an inference tensor, which keeps none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _wide(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 if it is: the precision the check recomputes in."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))
