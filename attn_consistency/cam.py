r"""Class activation maps, with gradients, from any classifier affine after average pooling.

For a model whose head is global average pooling followed by one linear layer, the
heatmap of label :math:`l` (paper Eq. 1) is

.. math:: M_l(m, n) = \sum_c W(l, c)\, F_c(m, n)

with :math:`F` the tensor the model average-pools and :math:`W` the linear weight. Then
``heatmaps.mean((2, 3)) + bias == logits``. The same holds, with ``cam.offset`` for the
bias, for every head that is affine in the pooled vector once per-sample statistics are
fixed (a LayerNorm after the pooling, NHWC maps, average-pooled patch tokens of a vision
transformer, a 1x1 convolution as classifier). It holds exactly when no dropout between the
pooling and the classifier is active (eval mode, or a head without dropout): the maps are
those of the pooled vector before dropout, so in train mode they give the logits with that
dropout off, which are the logits' expectation over its random mask, not the logits.
:class:`CAMHook` finds the head by following the model's first forward, and checks there,
in float32, that it really is such a head, so a model whose head is not is reported instead
of silently giving wrong maps.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["CAMHook"]

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

# The CAMHooks alive on each model, to warn when a second one records the same features.
_LIVE: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[CAMHook]] = weakref.WeakKeyDictionary()


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


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


def _rtol(*dtypes: torch.dtype) -> float:
    """The rounding of the least precise of ``dtypes``."""
    return max(_RTOL.get(dtype, _RTOL[torch.bfloat16]) for dtype in dtypes)


def _matmul_rtol(*dtypes: torch.dtype) -> float:
    """The rounding of a matmul in the least precise of ``dtypes``."""
    rtol = _rtol(*dtypes)
    if rtol == _RTOL[torch.float32]:
        return _MATMUL_RTOL_FP32.get(torch.get_float32_matmul_precision(), _RTOL[torch.bfloat16])
    return rtol


def _remove_all(hooks: dict[str, list[RemovableHandle]]) -> None:
    for handles in hooks.values():
        for handle in handles:
            handle.remove()
        handles.clear()


class _Undecided(ValueError):
    """The first forward cannot tell which modules are the head (no finite value, no sample)."""


class _NeedsGrad(RuntimeError):
    """A Grad-CAM forward ran without gradients: an error of that call, not of the architecture."""


class _Removable(Protocol):
    """What a :class:`_WeakHook` calls into: a recorder (CAMHook, MultiScaleHeads) that can remove its hooks."""

    def remove(self) -> None: ...


class _WeakHook:
    """A hook calling ``cam.<method>(*bound, *hook_args)`` that holds no reference to ``cam``.

    A CAMHook the user dropped without remove() then stops recording, and its finalizer
    takes the hooks off the model; a strong reference from the model would keep every
    forgotten hook recording (and its maps in memory). A hook that raises first removes
    every hook of its CAMHook: left on the model, they would fail again at every later
    forward, even at plain inference or through a new, correct CAMHook. A copy of the model
    (deepcopy for an EMA teacher, pickling) gets inert hooks: its forwards are not this
    CAMHook's to record.
    """

    __slots__ = ("_ref", "_method", "_bound")

    def __init__(self, cam: _Removable | None, method: str = "", *bound: object) -> None:
        self._ref = weakref.ref(cam) if cam is not None else None
        self._method = method
        self._bound = bound

    # Traced under torch.compile, not torch.compiler.disable'd (that decorator imports torch._dynamo,
    # about half of this package's import time, for every user). Once the first forward has found
    # and checked the head, the recording hook is tensor code and a list append, which dynamo keeps
    # in the model's graph: a forward compiles with fullgraph=True (tests/test_compile.py). The
    # first forward's one-off hooks read values: they break its graph, once.
    def __call__(self, *args: Any) -> None:
        owner = self._ref() if self._ref is not None else None
        if owner is None:
            if self._ref is None and args and isinstance(args[0], nn.Module):
                _forget(args[0], self)  # a copy's hook: no handle can remove it, so it removes itself
            return
        try:
            getattr(owner, self._method)(*self._bound, *args)
        except (_Undecided, _NeedsGrad):
            raise
        except Exception:
            owner.remove()
            raise

    def __reduce__(self) -> tuple[type[_WeakHook], tuple[None]]:
        return _WeakHook, (None,)

    def __deepcopy__(self, memo: dict[int, object]) -> _WeakHook:
        return _WeakHook(None)


def _forget(module: nn.Module, hook: _WeakHook) -> None:
    """Take ``hook`` off ``module`` (torch iterates over a copy of the hooks: safe inside a call)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]


def _version(tensor: Tensor) -> int:
    """The tensor's in-place version counter (-1 for an inference tensor, which keeps none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _wide(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 if it is: the precision the check recomputes in."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


class _Recording:
    """What a recorder of one entry per forward shares (CAMHook, MultiScaleHeads): the entries
    kept until :meth:`pop`, at most ``max_stored`` of them, and :meth:`paused`."""

    max_stored: int
    enabled: bool
    _stored: list[Any]
    _warned_overflow: bool

    def pop(self) -> list[Any]:
        """What every forward since the last call recorded, oldest first; then forget it."""
        stored, self._stored = self._stored, []
        return stored

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self._stored = []

    def __len__(self) -> int:
        return len(self._stored)

    @contextmanager
    def paused(self) -> Iterator[Any]:
        """Record nothing inside the block (an evaluation loop that needs no heatmaps).

        CAMHook's first-forward detection and check still run on a paused forward.
        """
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def _keep(self, entry: Any) -> None:
        """Store one forward's entry, dropping the oldest (with one warning) beyond ``max_stored``."""
        if len(self._stored) >= self.max_stored:
            self._stored.pop(0)
            if not self._warned_overflow:
                self._warned_overflow = True
                name = type(self).__name__
                warnings.warn(
                    f"{name}: {self.max_stored} forwards were recorded without pop(); the oldest are dropped. Call "
                    f"pop() after each step, or pause the {name} (`with recorder.paused():`) around forwards that "
                    "need no heatmaps.",
                    stacklevel=3,
                )
        self._stored.append(entry)


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


class CAMHook(_Recording):
    r"""Record the class activation maps of every forward pass, with gradients.

    Attach it to a classifier whose logits are affine in its average-pooled features; after
    each forward, :meth:`pop` returns the heatmaps ``(N, L, h, w)`` of the forwards since
    the last call, in order. The maps stay in the autograd graph, so a loss on them trains
    the backbone, and ``heatmaps.mean((2, 3)) + cam.offset`` is the model's logits in eval
    mode, or with no dropout between the pooling and the classifier; in train mode with such
    dropout it is the logits with the dropout off (their expectation over its mask).

    **Heads with exact maps** (affine in the pooled features). Average pooling of a map ``F`` (NCHW, or NHWC
    as Swin's), or of the patch tokens of a vision transformer (prefix tokens dropped, the
    rest laid out on the patch grid of each image), then optionally a LayerNorm, RMSNorm
    or BatchNorm1d of the pooled vector (ConvNeXt's ``LayerNorm2d``, ViT's ``fc_norm``) and
    dropout, then an ``nn.Linear`` or a 1x1 ``nn.Conv2d``; or the mean of two such heads on
    one pooled vector (a distillation head at inference). With a norm of statistics
    ``mu``, ``sigma`` (one pair per sample for a LayerNorm, the batch's or the running ones
    for a BatchNorm), the maps are :math:`M_l = \sum_c W_{lc}\gamma_c (F_c - \mu)/\sigma`,
    and ``mu``, ``sigma`` stay in the graph. A vision transformer that classifies its
    class token, a head with hidden layers (an MLP, MobileNetV3), attention pooling and
    max-pooling have no exact map: they are refused, with the way out in the message.
    ``benchmarks/zoo.py`` lists what this gives on every timm family.

    **Grad-CAM, on request.** ``method='gradcam'`` gives maps for any head after a pooling:
    :math:`M_l = \sum_c \alpha_{lc} F_c` with :math:`\alpha_{lc} = \sum_{m,n} \partial y_l /
    \partial F_c(m, n)` (Grad-CAM without its ReLU and with summed, not averaged, gradients,
    so that on a GAP-FC head it is Eq. 1 exactly), one batched backward over all labels at
    each forward. It is not Eq. 1 for other heads, so it is never chosen silently, and it
    needs the forward to run with gradients. With ``detach_classifier=True`` (the default,
    as Eq. 1's detached :math:`W`) the weights :math:`\alpha` are constants; ``False`` keeps
    them in the graph (``create_graph=True``), so the loss also trains the head and reaches
    the backbone through second derivatives. ``offset`` is ``None``: the maps do not average
    to the logits. Its features are the input of the last global average pooling module,
    or, for a model that pools with ``Tensor.mean``, the map (or raster tokens, laid out on
    the patch grid) whose average a later module takes: a tensor whose cells cannot be
    placed on the image (an attention tensor) is refused by name, as are features the
    logits have no gradient for. Cost: ``benchmarks/results/cpu-gradcam*.md``.

    **Finding the head.** The first call of the model is followed: the classifier is the
    ``nn.Linear`` (or 1x1 ``nn.Conv2d``) whose output the model returns (as is, or through
    flatten / view), or the pair whose mean it returns; its input is traced back through a
    norm to a pooled vector; and the features are the input of the average pooling module
    that gives it, or, for a model that pools with ``Tensor.mean``, the output of the last
    module that averages to it (a map, or tokens of a model known to keep them in raster
    order; name the module for others). Values decide, not names: a squeeze-excitation
    block registered after the head is not mistaken for it. Until that first forward,
    :attr:`features` and :attr:`classifier` hold a guess (timm's ``global_pool`` and
    ``get_classifier()``, else the last average pooling and the last linear layer), and
    :attr:`features` may be ``None``. Name the modules for a model that returns more than
    its logits, and call the model itself (``model(x)``, not its parts) at least once. A
    forward whose values cannot tell (an empty batch, all values non-finite, meta tensors)
    raises a ``ValueError`` saying so; the hook stays and the next forward decides.

    **The check.** On the first forward with a non-empty batch and finite values, in
    float32 (float64 for a float64 model), within the rounding of the dtype the model ran
    in (bf16 under autocast): the pooled vector is the average over the cells of :math:`F`
    (up to dropout when no norm follows), with a tolerance relative to the magnitude of
    :math:`F`; a norm's output is its normalisation of that vector; the classifier's output
    is ``input @ W.T + bias``, relative to ``|input| @ |W|.T + |bias|``; and the model returns
    that output (or a tuple, list or dict holding it), whose last dimension is the number of
    labels. A forward with non-finite values or no sample says nothing about the
    architecture, so the check waits for the next one; its heatmaps are recorded (the
    consistency loss reports non-finite heatmaps). The detection and the check run once,
    eagerly even under ``torch.compile``; afterwards one hook per forward records the maps.

    On any error raised from its hooks (a head that is not affine after pooling, features
    that are not a map with the classifier's channel count, a failing ``activation``) the
    CAMHook first removes all its hooks, so that later forwards of the model, and a new
    CAMHook, run as if it had never been attached.

    Args:
        model: the classifier (a DistributedDataParallel, DataParallel or compiled wrapper
            is looked through).
        features: the pooling module (its input is the feature map :math:`F`), or the
            module whose output is the feature map (NCHW, NHWC, or tokens ``(N, T, C)`` in
            raster order after any prefix tokens); a module or a dotted name (relative to
            ``model`` or to the module it wraps).
        classifier: the ``nn.Linear`` (or 1x1 ``nn.Conv2d``) giving the logits; module or name.
        activation: a function applied to the ``features`` output before pooling, for
            models that apply it functionally (DenseNet's ReLU; found automatically). It
            must keep the shape of the features.
        detach_classifier: use a detached head (:math:`W`, a norm's :math:`\gamma`; Grad-CAM's
            :math:`\alpha`), as the authors' code: the consistency loss then trains the
            backbone only and the head learns from the classification loss. ``False`` lets
            the loss reach the head too.
        check: run the value checks above. ``False`` keeps the detection and the structural
            checks (the features run once per forward, the classifier runs, a tensor output
            has one logit per label).
        max_stored: forwards kept before the oldest unconsumed maps are dropped (with a
            warning), so that a loop that never calls :meth:`pop` cannot leak memory.
        method: ``'cam'`` (the exact maps of Eq. 1) or ``'gradcam'`` (the fallback above).

    Attributes:
        features: the module hooked for :math:`F` (see above for the time before the first
            forward).
        classifier: the module whose weight gives :math:`W`.
        norm: the norm between the pooling and the classifier, or ``None``.
        other_heads: ``(norm, classifier)`` of the heads averaged with the classifier's.
        layout: ``'nchw'``, ``'nhwc'`` or ``'tokens'`` (``None`` before the first forward).
        prefix_tokens: tokens before the patch tokens (class, distillation, registers).
        enabled: ``False`` records nothing (see :meth:`paused`).

    Raises:
        TypeError: an argument of the wrong type; at the first forward, a model output with
            no tensor in it (or, for detection, not a tensor).
        ValueError: a module that is not in the model or cannot be the head; at the first
            forward, a head without exact maps, features that are not a map with the
            classifier's channel count, features that run more than once per forward, or a
            model whose output is not its classifier's; with ``method='gradcam'``, no map whose
            cells lie on the image, or features the logits have no gradient for.
        RuntimeError: with ``method='gradcam'``, a forward without gradients (the hook stays).

    A CAMHook keeps its hooks on the model until :meth:`remove`, the end of a ``with`` block,
    or its garbage collection: keep a reference to it while it should record. Attach one per
    model and reuse it at every step; a second live CAMHook on the same features gets a
    warning.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=5)
        >>> with CAMHook(model) as cam:
        ...     logits = model(torch.randn(2, 3, 64, 64))
        ...     (heatmaps,) = cam.pop()
        >>> heatmaps.shape
        torch.Size([2, 5, 2, 2])
        >>> torch.allclose(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5)
        True
        >>> convnext = torchvision.models.convnext_tiny(num_classes=5)  # pooling, LayerNorm, Linear
        >>> with CAMHook(convnext) as cam:
        ...     logits = convnext(torch.randn(2, 3, 64, 64))
        ...     (heatmaps,) = cam.pop()
        >>> torch.allclose(heatmaps.mean((2, 3)) + cam.offset, logits, atol=1e-5)
        True
    """

    # declared here: methods read them before mypy has seen __init__ assign them
    _module: nn.Module
    _model_name: str
    activation: Callable[[Tensor], Tensor] | None
    detach_classifier: bool
    method: str
    prefix_tokens: int
    check: bool
    _features_named: bool
    _classifier_named: bool
    _resolved: bool
    _pending: bool
    _warned_outside: bool

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
        method: str = "cam",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(_unwrap(model), torch.jit.ScriptModule):
            raise TypeError("model must be an eager nn.Module, got a TorchScript module, whose forward runs no hooks")
        if activation is not None and not callable(activation):
            raise TypeError(f"activation must be a function of the features or None, got {type(activation).__name__}")
        for name, flag in (("detach_classifier", detach_classifier), ("check", check)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        given: object = max_stored  # checked as any object: callers need not be typed
        if isinstance(given, bool) or not isinstance(given, numbers.Integral):
            raise TypeError(f"max_stored must be a positive int, got {type(given).__name__} {given!r}")
        if max_stored < 1:
            raise ValueError(f"max_stored must be a positive int, got {max_stored!r}")
        if method not in ("cam", "gradcam"):
            raise ValueError(
                f"method must be 'cam' (the exact maps of Eq. 1) or 'gradcam' (the differentiable Grad-CAM fallback "
                f"for heads that are not affine), got {method!r}"
            )
        module = _unwrap(model)
        named_features = _resolve(model, module, "features", features) if features is not None else None
        named_classifier = _resolve(model, module, "classifier", classifier) if classifier is not None else None
        guess_features, guess_classifier, guess_activation, known = _static_head(module)
        head_features = named_features if named_features is not None else guess_features
        head_classifier = named_classifier if named_classifier is not None else guess_classifier
        if head_classifier is None:
            raise ValueError(
                f"could not find the linear classifier of {type(module).__name__} (it has no nn.Linear and no 1x1 "
                "nn.Conv2d); pass features= (the pooling module, or the module whose output is pooled) and classifier="
            )
        if not (isinstance(head_classifier, nn.Linear) if method == "gradcam" else _is_classifier(head_classifier)):
            raise TypeError(
                f"classifier must be an nn.Linear{'' if method == 'gradcam' else ' (or a 1x1 nn.Conv2d)'} giving the "
                f"logits, got {type(head_classifier).__name__}"
                f"{' with kernel ' + 'x'.join(map(str, head_classifier.kernel_size)) if isinstance(head_classifier, nn.Conv2d) else ''}"
                "; pass classifier= to name it"
            )
        # Known families and named modules are the head; otherwise the first forward decides
        # among every pooling and every linear layer (those named stand alone), and a wrong
        # guess must not be an error.
        resolved = known or (named_features is not None and named_classifier is not None)
        resolved = resolved and method == "cam"  # Grad-CAM finds its pooling at the first forward
        if isinstance(named_features, nn.Linear):
            raise TypeError(
                "features must be the pooling module or the module whose output is the 4-D feature map, "
                "got an nn.Linear"
            )
        if (
            (resolved or named_features is not None)
            and head_features is not None
            and any(m is head_classifier for m in head_features.modules())
        ):
            raise ValueError(
                f"features must run before the classifier, got a {type(head_features).__name__} that holds it; "
                "name the pooling module or the module whose output is pooled"
            )
        if resolved and nn.parameter.is_lazy(_weight_parameter(head_classifier)):
            raise ValueError(
                f"the classifier {type(head_classifier).__name__} is not initialized yet; run one forward "
                "of the model before attaching the CAMHook"
            )
        self._module = module
        self._model_name = type(module).__name__
        self._set_head(head_features, head_classifier)
        # the activation found with the features applies only when the user named neither
        # (Grad-CAM differentiates the tensor the model itself pools, which a function applied by the
        # hook is not; DenseNet's in-place ReLU leaves that tensor as the output of its features)
        guessed = guess_activation if method == "cam" else None
        self.activation = activation if activation is not None or features is not None else guessed
        self.detach_classifier = detach_classifier
        self.method = method
        self.norm: nn.Module | None = None
        # (norm, classifier) of heads whose logits the model averages with the classifier's (a
        # distillation head, as DeiT, LeViT or EfficientFormer have at inference)
        self.other_heads: list[tuple[nn.Module | None, nn.Module]] = []
        self.layout: str | None = None
        self.prefix_tokens = 0
        self._input_size: tuple[int, ...] | None = None
        self._live: list[Tensor] = []
        self.check = check
        self.max_stored = int(max_stored)
        self.enabled = True
        self._stored: list[Tensor] = []
        self._warned_overflow = False
        self._warned_outside = False
        self._features_named = named_features is not None
        self._classifier_named = named_classifier is not None
        self._resolved = resolved
        self._pending = True  # the first-forward verification
        self._forward: _Forward | None = None
        self._hooks: dict[str, list[RemovableHandle]] = {"features": [], "model": [], "forward": []}
        weakref.finalize(self, _remove_all, self._hooks)
        live = _LIVE.setdefault(module, weakref.WeakSet())
        if self.features is not None and any(other.features is self.features for other in live):
            warnings.warn(
                f"CAMHook: {self._model_name} already has a live CAMHook on '{self._features_name}'; both record "
                "every forward. Reuse one CAMHook across steps, or call remove() on the old one (or use "
                "`with CAMHook(...)`) before attaching another.",
                stacklevel=2,
            )
        live.add(self)
        if self._resolved:
            self._attach_features()
        self._hooks["model"] += [
            module.register_forward_pre_hook(_WeakHook(self, "_on_model_call")),
            module.register_forward_hook(_WeakHook(self, "_on_model_output")),
        ]

    def _set_head(self, features: nn.Module | None, classifier: nn.Module) -> None:
        names = {m: name for name, m in self._module.named_modules()}
        self.features = features
        self.classifier = classifier
        self._features_name = (
            names.get(features, type(features).__name__) if features is not None else "(not found yet)"
        )
        self._classifier_name = names.get(classifier, "classifier")
        self._classifier_block = self._enclosing_block(self._module, self._classifier_name)

    @staticmethod
    def _enclosing_block(model: nn.Module, name: str) -> str:
        """Describe the Sequential the classifier sits in, for the not-GAP-FC error."""
        parent = name.rpartition(".")[0]
        if not parent:
            return ""
        block, classifier = model.get_submodule(parent), model.get_submodule(name)
        others = [type(m).__name__ for m in block.children() if m is not classifier]
        return f" ('{parent}' also holds {', '.join(others)})" if others else ""

    def _attach_features(self) -> None:
        features = self.features
        if self._hooks["features"] or features is None:
            return
        if _is_pool(features):
            handle = features.register_forward_pre_hook(_WeakHook(self, "_on_pool_input"))
        else:
            handle = features.register_forward_hook(_WeakHook(self, "_on_features_output"))
        self._hooks["features"].append(handle)

    def _remove_hooks(self, kind: str) -> None:
        for handle in self._hooks[kind]:
            handle.remove()
        self._hooks[kind].clear()

    @staticmethod
    def _fail(message: str, error: type[Exception] = ValueError) -> NoReturn:
        # raised inside a hook, whose wrapper (_WeakHook) removes every hook first
        raise error(message)

    # --- recording -------------------------------------------------------------------

    def _on_pool_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._record(args[0] if args else None)

    def _on_features_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._record(output)

    def _record(self, features: Any) -> None:
        forward = self._forward
        if forward is None:
            if not self.enabled:
                return
            if self._pending and not self._warned_outside:
                self._warned_outside = True
                warnings.warn(
                    f"CAMHook: '{self._features_name}' ran outside a call of {self._model_name} (its parts called "
                    "one by one?); the head is checked on the first call of the model itself, so these heatmaps "
                    "are unchecked",
                    stacklevel=2,
                )
        features = self._activate(features)
        self._check_channels(features)
        if forward is not None:
            # a copy: the model may change the features in place after the hook (DenseNet's ReLU)
            copy = _wide(features) if self.check else None
            if copy is not None and copy.dtype == features.dtype:
                copy = copy.clone()
            forward.features.append((copy, features.dtype))
            if self._pending:
                # the maps of the first forward wait for its end, where the head (a norm after the
                # pooling, the layout) is settled; a copy in the graph, for the same reason as above,
                # except for Grad-CAM, which needs the tensor the logits were computed from
                forward.live.append(features.clone() if self.method == "cam" else features)
                return
        if not self.enabled:
            return
        if self.method == "gradcam":
            self._live.append(features)  # its maps need the model's output: made at the end of the forward
        else:
            self._store(self._heatmaps(features))

    def _activate(self, features: Any) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() not in (3, 4):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            self._fail(
                f"{self._model_name}: the features of '{self._features_name}' must be a 4-D map "
                f"(N, C, h, w) or (N, h, w, C), or tokens (N, T, C), got {shape}; pass features= naming the "
                "pooling module or the module whose output is pooled"
            )
        if not features.is_floating_point():
            self._fail(
                f"{self._model_name}: the features of '{self._features_name}' must be floating point, "
                f"got {features.dtype}",
                TypeError,
            )
        if self.activation is not None:
            activated = self.activation(features)  # an error here also removes the hooks (_WeakHook)
            if not isinstance(activated, Tensor) or activated.shape != features.shape:
                got = tuple(activated.shape) if isinstance(activated, Tensor) else type(activated).__name__
                self._fail(
                    f"activation must return a tensor of the features' shape {tuple(features.shape)} "
                    f"(it is applied to '{self._features_name}' before pooling), got {got}",
                    ValueError if isinstance(activated, Tensor) else TypeError,
                )
            features = activated
        assert isinstance(features, Tensor)
        return features

    def _shape_layout(self, features: Tensor) -> tuple[str, int]:
        """The layout the shape suggests, before any value can tell (NCHW first, as PyTorch)."""
        channels = _weight(self.classifier).shape[1]
        if features.dim() == 3:
            return "tokens", int(getattr(self._module, "num_prefix_tokens", 0) or 0)
        if features.shape[1] != channels and features.shape[-1] == channels:
            return "nhwc", 0
        return "nchw", 0

    def _check_channels(self, features: Tensor) -> None:
        if self.method == "gradcam":
            if self.layout is None:
                self.layout, self.prefix_tokens = ("nchw", 0) if features.dim() == 4 else self._shape_layout(features)
            return  # the gradients weigh any number of channels
        if self.layout is None:
            self.layout, self.prefix_tokens = self._shape_layout(features)
        channels = _weight(self.classifier).shape[1]
        dim = 1 if self.layout == "nchw" else -1
        if features.dim() != (3 if self.layout == "tokens" else 4) or features.shape[dim] != channels:
            self._fail(
                f"{self._model_name} is not GAP-FC: the classifier '{self._classifier_name}' takes "
                f"{channels} features but the pooled map '{self._features_name}' has "
                f"{features.shape[dim]} channels{self._classifier_block}. If layers with an activation sit between "
                "them (an MLP head), no exact map exists: ask for the differentiable Grad-CAM fallback by name, "
                "CAMHook(model, method='gradcam')"
            )

    def _grid(self, features: Tensor) -> Tensor:
        """The features as a map ``(N, C, h, w)``: NHWC permuted, tokens laid out on their grid."""
        if self.layout == "nhwc":
            return features.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            tokens = features[:, self.prefix_tokens :]
            height, width = self._token_grid(tokens.shape[1])
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        return features

    def _token_grid(self, count: int) -> tuple[int, int]:
        """The rows and columns of ``count`` patch tokens in raster order, for this forward's image."""
        if count < 1:
            self._fail(
                f"{self._model_name}: the tokens of '{self._features_name}' hold no patch token after its "
                f"{self.prefix_tokens} prefix (class/register) tokens"
            )
        height, width = self._input_size or (1, 1)
        ratio = height / width
        divisors = [d for d in range(1, count + 1) if count % d == 0]
        rows = min(divisors, key=lambda d: abs(math.log(d * d / (count * ratio))))
        if abs(math.log(rows * rows / (count * ratio))) > math.log(2) + 1e-9:
            # no grid of this many tokens has the image's shape: a guess would scramble the maps
            self._fail(
                f"{self._model_name}: {count} patch tokens of '{self._features_name}' fit no grid of the image's "
                f"aspect ({height}x{width}; the nearest is {rows}x{count // rows}); pass features= naming a module "
                "whose output is a feature map"
            )
        return rows, count // rows

    def _heatmaps(self, features: Tensor) -> Tensor:
        grid = self._grid(features)
        heads = [(self.norm, self.classifier), *self.other_heads]
        maps = [self._head_maps(grid, norm, classifier) for norm, classifier in heads]
        return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)

    def _head_maps(self, grid: Tensor, norm: nn.Module | None, classifier: nn.Module) -> Tensor:
        weight = _weight(classifier)
        if self.detach_classifier:
            weight = weight.detach()
        weight = weight.to(device=grid.device, dtype=grid.dtype)
        if norm is not None:
            # M_l = sum_c W_lc gamma_c (F_c - mu) / sigma, with mu and sigma those the norm takes from
            # the pooled vector: in the graph, so that the maps' gradient is the head's
            mu, inv, gamma, _ = _norm_stats(norm, grid.to(torch.promote_types(grid.dtype, torch.float32)).mean((2, 3)))
            if gamma is not None:
                weight = weight * (gamma.detach() if self.detach_classifier else gamma).to(weight)
            if mu is not None:
                grid = grid - mu.to(grid.dtype)[:, :, None, None]
            grid = grid * inv.to(grid.dtype)[:, :, None, None]
        return F.conv2d(grid, weight[:, :, None, None])

    def _store_gradcam(self, lives: list[Tensor], output: Any) -> None:
        """Grad-CAM maps ``sum_c alpha_lc F_c``, ``alpha_lc = sum_mn d logit_l / d F_c(m, n)``, per label."""
        if not lives:
            return
        labels = _labels(self.classifier)
        logits = next((t for t in _tensors(output) if t.dim() >= 1 and t.shape[-1] == labels), None)
        if logits is None:
            self._fail(f"{self._model_name} returned no logits with {labels} labels in their last dimension")
        for live in lives:
            if not torch.is_grad_enabled() or not live.requires_grad or not logits.requires_grad:
                raise _NeedsGrad(
                    "CAMHook(method='gradcam') takes its maps from the gradients of the logits: run the forward "
                    "with gradients enabled (not under torch.no_grad() or inference_mode), or pause the hook "
                    "(`with cam.paused():`) around forwards that need no maps"
                )
            create_graph = not self.detach_classifier
            flat = logits.reshape(-1, labels)
            basis = torch.eye(labels, dtype=flat.dtype, device=flat.device)[:, None, :].expand(labels, *flat.shape)
            grad = torch.autograd.grad
            grads: Tensor | None  # None: the features do not feed the logits
            try:
                (grads,) = grad(
                    flat,
                    live,
                    basis,
                    retain_graph=True,
                    create_graph=create_graph,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            except RuntimeError:  # an operation without a batching rule: one backward per label
                per_label = [
                    grad(flat, live, basis[label], retain_graph=True, create_graph=create_graph, allow_unused=True)[0]
                    for label in range(labels)
                ]
                grads = None if any(g is None for g in per_label) else torch.stack(per_label)
            if grads is None:
                self._fail(self._unreached())
            if self._pending and self.layout == "tokens" and self.prefix_tokens:
                prefix, patches = grads[:, :, : self.prefix_tokens], grads[:, :, self.prefix_tokens :]
                if bool(prefix.any()) and not bool(patches.any()):
                    self._fail(
                        f"{self._model_name}: only the prefix (class, register) tokens of '{self._features_name}' "
                        "reach the logits, its patch tokens have no gradient (a head that classifies its class "
                        "token), so their Grad-CAM maps would be zero; pass features= naming tokens that the class "
                        "token attends to (the last block's norm1), or build the model with average pooling (timm: "
                        "global_pool='avg')"
                    )
            alpha = torch.stack([self._grid(g) for g in grads]).sum((3, 4))  # (L, N, C)
            self._store(torch.einsum("lnc,nchw->nlhw", alpha, self._grid(live)))

    def _unreached(self) -> str:
        """Why the logits have no gradient with respect to the features."""
        head = (
            f"{self._model_name}: the logits have no gradient with respect to the features of '{self._features_name}'"
        )
        if self.activation is not None:
            return (
                f"{head} after activation=, a function the model does not apply itself (the model computes its "
                "logits from its own tensors); pass features= naming the module whose output the model pools, "
                "without activation="
            )
        return (
            f"{head}: they do not feed its classifier '{self._classifier_name}'; pass features= naming the module "
            "whose output the model pools for its classifier"
        )

    def _store(self, heatmaps: Tensor) -> None:
        self._keep(heatmaps)

    # --- the first forward: detection and check ------------------------------------------

    def _on_model_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._remove_hooks("forward")  # left by a forward that raised before its end
        image = args[0] if args else None
        self._input_size = tuple(image.shape[-2:]) if isinstance(image, Tensor) and image.dim() >= 3 else None
        self._live = []
        if not self._pending:
            return
        self._refuse_meta(args)
        model = self._module
        modules = [m for m in model.modules() if m is not model]
        pools: list[nn.Module]
        if self._resolved:
            pools, linears = [], [self.classifier, *(classifier for _, classifier in self.other_heads)]
        else:
            # the modules of this forward: the user may have replaced some since the hook was attached
            named = [self.features] if self.features is not None else []
            pools = named if self._features_named else [m for m in modules if _is_pool(m)]
            linears = [self.classifier] if self._classifier_named else [m for m in modules if _is_classifier(m)]
        self._forward = _Forward(pools, linears)
        handles = self._hooks["forward"]
        for index, pool in enumerate(pools):
            handles.append(pool.register_forward_hook(_WeakHook(self, "_on_candidate_features", index)))
        for index, linear in enumerate(linears):
            handles.append(linear.register_forward_hook(_WeakHook(self, "_on_candidate_linear", index)))
        if self.method == "cam":
            for norm in (m for m in modules if _is_norm(m)):
                handles.append(norm.register_forward_hook(_WeakHook(self, "_on_candidate_norm")))
        if not self._resolved and not self._features_named:
            for other in modules:
                handles.append(other.register_forward_hook(_WeakHook(self, "_on_candidate_output")))

    def _on_candidate_features(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        forward = self._forward
        if forward is None:
            return
        if _is_pool(forward.pool_candidates[index]):
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                forward.pools.append((index, args[0], output))
        else:
            features = self._activate(output)
            # a copy: the model may change its output in place later, after the hook saw it; Grad-CAM
            # differentiates the logits with respect to the tensor itself, which a copy is not in the graph of
            copy = features is output and self.method == "cam"
            forward.pools.append((index, features.clone() if copy else features, None))

    def _on_candidate_linear(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._forward is not None:
            self._forward.linears.append((index, args[0] if args else None, output))

    def _on_candidate_norm(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._forward is not None and args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self._forward.norms.append((module, args[0], output))

    def _on_candidate_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        forward = self._forward
        if forward is None:
            return
        if isinstance(output, Tensor) and output.dim() in (3, 4) and output.is_floating_point():
            forward.outputs.append((module, output, _version(output)))
        vector = args[0] if args else None
        if (
            self.method == "gradcam"
            and isinstance(vector, Tensor)
            and vector.dim() == 2
            and vector.is_floating_point()
            and not any(vector is seen for seen in forward.vectors)
        ):
            forward.vectors.append(vector)

    def _on_model_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._pending:
            lives, self._live = self._live, []
            if self.method == "gradcam" and self.enabled:
                self._store_gradcam(lives, output)
            return
        forward, self._forward = self._forward, None
        self._remove_hooks("forward")
        if forward is None:
            return
        if not self._resolved:
            features = self._detect(forward, output)
            forward.features.append((_wide(features) if self.check else None, features.dtype))
            forward.live.append(features)
        with torch.no_grad(), torch.autocast(_device_type(output), enabled=False):
            done = self._verdict(forward, output)
        if self.enabled:
            if self.method == "gradcam":
                self._store_gradcam(forward.live, output)
            else:
                for features in forward.live:
                    self._store(self._heatmaps(features))
        if done:
            self._pending = False
            if self.layout != "tokens" and self.method == "cam":  # tokens need each image's size
                self._remove_hooks("model")

    def _refuse_meta(self, args: tuple[Any, ...]) -> None:
        """Refuse a first forward on meta tensors, naming them: the head is found and checked from values."""
        meta = ["its input"] if any(t.is_meta for t in _tensors(list(args))) else []
        named = [*self._module.named_parameters(), *self._module.named_buffers()]
        held = [name for name, tensor in named if tensor.is_meta]
        if held:
            shown = held if len(held) <= 4 else held[:3]
            listed = ", ".join(f"'{name}'" for name in shown) + (f" and {len(held) - 3} more" if held != shown else "")
            meta.append(f"{len(held)} of its {len(named)} parameters and buffers ({listed})")
        if meta:
            raise _Undecided(
                f"CAMHook cannot find or check the head of {self._model_name} on this forward: {' and '.join(meta)} "
                f"{'is' if meta == ['its input'] else 'are'} on the meta device. Meta tensors carry shapes but no "
                "values, and the head is found and checked from the values of the first forward. Run it on a real "
                "device (after model.to_empty(device=...) and loading the weights); the hook stays and that "
                "forward decides"
            )

    def _undecided(self, reason: str) -> NoReturn:
        # Not a verdict on the architecture: the hooks stay, and the next forward decides.
        raise _Undecided(
            f"CAMHook could not find the head of {self._model_name} from this forward: {reason}. It tries again "
            "at the next forward; pass features= and classifier= to name the head"
        )

    def _find_norm(self, forward: _Forward, x: Tensor) -> tuple[nn.Module, Tensor] | None:
        """The normalisation whose output is the classifier's input ``x`` (up to dropout), and its input."""
        for module, norm_input, norm_output in reversed(forward.norms):
            if norm_output.numel() == x.numel() and norm_input.numel() == x.numel() and _feeds(norm_output, x):
                return module, norm_input
        return None

    def _layouts(self, tensor: Tensor, target: Tensor) -> Iterator[tuple[str, int]]:
        """The layouts (with prefix tokens) under which ``tensor`` could pool to ``target`` ``(N, C)``."""
        channels = target.numel() // max(tensor.shape[0], 1) if tensor.dim() else 0
        if not tensor.dim() or target.numel() != tensor.shape[0] * channels:
            return  # not one vector per sample of this batch
        if tensor.dim() == 4 and tensor.shape[1] == channels:
            yield "nchw", 0
        if tensor.dim() == 4 and tensor.shape[3] == channels:
            yield "nhwc", 0
        if tensor.dim() == 3 and tensor.shape[2] == channels:
            known = int(getattr(self._module, "num_prefix_tokens", 0) or 0)
            yield from (("tokens", k) for k in dict.fromkeys([known, *range(min(tensor.shape[1] - 1, 17))]))

    def _pools_to(self, tensor: Tensor, layout: str, prefix: int, target: Tensor, dropout: bool) -> bool:
        """Whether ``tensor``, laid out so, averages to ``target`` (up to dropout when allowed)."""
        if tensor.shape[0] == 0 or (layout == "tokens" and tensor.shape[1] <= prefix):
            return False
        cells = _wide(tensor)
        cells = (
            cells.flatten(2) if layout == "nchw" else (cells.flatten(1, 2) if layout == "nhwc" else cells[:, prefix:])
        )
        dims = 2 if layout == "nchw" else 1
        pooled = cells.mean(dims)
        goal = _wide(target).reshape(pooled.shape).to(pooled)
        finite = pooled.isfinite() & goal.isfinite()
        if not bool(finite.any()):
            return False
        rtol = _rtol(tensor.dtype, target.dtype)
        tol = (rtol * cells.abs().mean(dims))[finite]
        if not dropout:
            return bool(((pooled[finite] - goal[finite]).abs() <= tol).all())
        return _matches_pooled(pooled[finite], goal[finite], tol, rtol)

    def _set_layout(self, features: Tensor, target: Tensor, dropout: bool) -> bool:
        """Choose the layout of ``features`` by the values; ``False`` when none averages to ``target``."""
        for layout, prefix in self._layouts(features, target):
            if self._pools_to(features, layout, prefix, target, dropout):
                self.layout, self.prefix_tokens = layout, prefix
                return True
        return False

    def _search_outputs(self, forward: _Forward, target: Tensor, dropout: bool) -> tuple[nn.Module, Tensor] | None:
        """The last module whose output averages to ``target`` (a model that pools with ``Tensor.mean``)."""
        for module, tensor, version in reversed(forward.outputs):
            if (_version(tensor) != version and self.method == "cam") or _contains(module, self.classifier):
                # changed in place since (its values are not those pooled), or the head itself; Grad-CAM
                # reads the values and the gradient of the tensor as it is at the end of the forward
                continue
            for layout, prefix in self._layouts(tensor, target):
                if layout == "tokens":
                    cells = tensor.shape[1] - prefix
                else:
                    cells = tensor.shape[2] * tensor.shape[3] if layout == "nchw" else tensor.shape[1] * tensor.shape[2]
                if cells <= 1:
                    continue  # one cell: the pooled vector itself (after the head's pooling), not a map of it
                if self._pools_to(tensor, layout, prefix, target, dropout):
                    if layout == "tokens" and self._model_name not in _RASTER_TOKENS:
                        forward.unordered = forward.unordered or module  # right values, but where on the image?
                        continue
                    self.layout, self.prefix_tokens = layout, prefix
                    return module, tensor
        return None

    def _class_token(self, forward: _Forward, target: Tensor) -> nn.Module | None:
        """A module whose first token is ``target``: a head that classifies its class token."""
        for module, tensor, _ in reversed(forward.outputs):
            if tensor.dim() == 3 and tensor.numel() > target.numel() and tensor[:, 0].numel() == target.numel():
                if _same_values(tensor[:, 0].contiguous(), target.reshape(tensor[:, 0].shape)):
                    return module
        return None

    def _detect(self, forward: _Forward, output: Any) -> Tensor:
        """Pick the classifier and the pooling that feed the model's output; return the features."""
        model = self._model_name
        if self._classifier_named:
            calls = forward.linears
            if not calls:
                self._fail(f"the classifier '{self._classifier_name}' did not run in the forward of {model}")
            named = self._classifier_call(forward, output)
            event = named[0] if named is not None else calls[-1]  # the check reports a mismatch
        else:
            if not isinstance(output, Tensor):
                self._fail(
                    f"{model} returned a {type(output).__name__}: finding its classifier needs the model to "
                    "return its logits as a tensor; pass classifier= (and features=) to name the head",
                    TypeError,
                )
            relations = [
                (call, _same_values(call[2], output)) for call in forward.linears if isinstance(call[2], Tensor)
            ]
            matching = [call for call, same in relations if same]
            indices = sorted({call[0] for call in matching})
            if len(indices) > 1:
                names = ", ".join(f"'{self._name(forward.linear_candidates[i])}'" for i in indices)
                self._fail(f"the output of {model} is that of several linear layers ({names}); pass classifier=")
            if not matching:
                averaged = self._averaged_heads(forward, output)
                if averaged is not None:
                    return self._detect_averaged(forward, output, averaged)
                if any(same is None for _, same in relations):
                    self._undecided(_no_evidence(output))
                self._fail(
                    f"could not find the classifier of {model}: no nn.Linear (or 1x1 nn.Conv2d) computes what it "
                    f"returns (a tensor of shape {tuple(output.shape)}); class activation maps need average pooling "
                    "followed by one linear layer whose output the model returns. Pass features= and classifier= "
                    "to name them"
                )
            event = matching[-1]
        classifier = forward.linear_candidates[event[0]]
        self._set_head(self.features, classifier)
        x = event[1]
        if self.method == "gradcam":
            return self._detect_gradcam(forward)
        if not isinstance(x, Tensor):
            self._fail(f"the classifier '{self._classifier_name}' of {model} must be called with its input as a tensor")
        norm = self._find_norm(forward, x)
        target, dropout = (norm[1], False) if norm is not None else (x, True)
        self.norm = norm[0] if norm is not None else None
        if self._features_named:
            calls = forward.pools
            if not calls:
                self._fail(f"the features '{self._features_name}' did not run in the forward of {model}")
            if len(calls) > 1:
                self._fail(self._runs_more_than_once(len(calls)))
            _, named_features, pooled = calls[0]
            features = self._activate(named_features) if pooled is not None else named_features  # a pooling's input
            if not self._set_layout(features, target, dropout):
                self.layout, self.prefix_tokens = self._shape_layout(features)  # the check reports it
        else:
            pool_relations = [
                (call, _feeds(call[2], target) if call[2] is not None else False) for call in forward.pools
            ]
            feeding = {call[0] for call, feeds in pool_relations if feeds}
            # a pooling nested in another one that feeds the classifier has the same input: keep the outer one
            candidates = forward.pool_candidates
            outer = sorted(
                i for i in feeding if not any(j != i and _contains(candidates[j], candidates[i]) for j in feeding)
            )
            if len(outer) > 1:
                names = ", ".join(f"'{self._name(candidates[i])}'" for i in outer)
                self._fail(
                    f"several poolings of {model} feed its classifier '{self._classifier_name}' ({names}); "
                    "pass features="
                )
            found: Tensor | None = None
            if outer:
                calls = [call for call in forward.pools if call[0] == outer[0]]
                self._set_head(candidates[outer[0]], classifier)
                if len(calls) > 1:
                    self._fail(self._runs_more_than_once(len(calls)))
                found = self._activate(calls[0][1])
                if not self._set_layout(found, target, dropout):
                    self.layout, self.prefix_tokens = self._shape_layout(found)  # the check reports it
            else:
                searched = self._search_outputs(forward, target, dropout)
                if searched is not None:
                    self._set_head(searched[0], classifier)
                    found = self._activate(searched[1])
            if found is None:
                if any(feeds is None for _, feeds in pool_relations) or not bool(_wide(target).isfinite().any()):
                    self._undecided(_no_evidence(target))
                self._fail(self._not_pooled(forward, target))
            features = found
        self._check_channels(features)
        self._resolved = True
        if self.features is not None:
            live = _LIVE.get(self._module, ())
            if any(other is not self and other.features is self.features for other in live):
                warnings.warn(
                    f"CAMHook: {self._model_name} already has a live CAMHook on '{self._features_name}'; both "
                    "record every forward. Reuse one CAMHook across steps, or call remove() on the old one (or use "
                    "`with CAMHook(...)`) before attaching another.",
                    stacklevel=2,
                )
        self._attach_features()
        return features

    def _averaged_heads(self, forward: _Forward, output: Tensor) -> tuple[tuple[int, Any, Any], ...] | None:
        """Two classifier calls whose outputs' mean the model returns (a distillation head), if any.

        ``None`` for an empty output too: no value can tell (every comparison of nothing holds).
        """
        if output.numel() == 0:
            return None
        calls = [c for c in forward.linears if isinstance(c[1], Tensor) and isinstance(c[2], Tensor)]
        calls = [c for c in calls if c[2].numel() == output.numel()]
        for i, first in enumerate(calls):
            for second in calls[i + 1 :]:
                if first[0] != second[0]:
                    a, b = _wide(first[2]).reshape(output.shape), _wide(second[2]).reshape(output.shape)
                    mean, scale = (a + b) / 2, (a.abs() + b.abs()) / 2
                    if bool(((mean - _wide(output)).abs() <= _rtol(output.dtype) * scale + 1e-30).all()):
                        return first, second
        return None

    def _detect_averaged(self, forward: _Forward, output: Tensor, calls: tuple[tuple[int, Any, Any], ...]) -> Tensor:
        """Detection for a model that averages the logits of heads on the same pooled features."""
        first, *others = calls
        classifier = forward.linear_candidates[first[0]]
        self._set_head(self.features, classifier)
        heads = []
        for call in calls:
            found = self._find_norm(forward, call[1])
            heads.append(
                (found[0] if found else None, forward.linear_candidates[call[0]], found[1] if found else call[1])
            )
        target = heads[0][2]
        for _, other, other_target in heads[1:]:
            if _same_values(other_target, target) is not True:
                self._fail(
                    f"{self._model_name} averages the logits of '{self._classifier_name}' and '{self._name(other)}', "
                    "whose inputs differ: not one pooled vector through affine heads; pass classifier= to name one"
                )
        self.norm = heads[0][0]
        self.other_heads = [(norm, other) for norm, other, _ in heads[1:]]
        searched = None
        for call in (c for c in forward.pools if c[2] is not None and _feeds(c[2], target)):
            self._set_head(forward.pool_candidates[call[0]], classifier)
            features = self._activate(call[1])
            if self._set_layout(features, target, dropout=False):
                searched = (self.features, features)
                break
        if searched is None:
            searched = self._search_outputs(forward, target, dropout=heads[0][0] is None)
            if searched is None:
                self._fail(self._not_pooled(forward, target))
            self._set_head(searched[0], classifier)
            searched = (searched[0], self._activate(searched[1]))
        features = searched[1]
        self._check_channels(features)
        self._resolved = True
        self._attach_features()
        return features

    def _not_pooled(self, forward: _Forward, target: Tensor) -> str:
        """Why no feature map of the forward averages to the classifier's input, and the way out."""
        model, classifier = self._model_name, self._classifier_name
        token = self._class_token(forward, target)
        if token is not None:
            return (
                f"{model} classifies its class token (the first token of '{self._name(token)}'), not an average of "
                "its patch tokens: that head is not GAP-FC and has no class activation maps. Build the model with "
                "average pooling of the patch tokens instead (timm: timm.create_model(name, global_pool='avg'), "
                "which adds fc_norm), or name features= and classifier= of such a head"
            )
        if forward.unordered is not None:
            return (
                f"{model} pools the tokens of '{self._name(forward.unordered)}', but CAMHook does not know where "
                "they lie on the image (their order is known for the raster patch grid of "
                f"{', '.join(sorted(_RASTER_TOKENS))}); name features= (the module whose tokens are pooled, in "
                "row-major order) and classifier= if they are a raster grid"
            )
        advice = (
            ". Class activation maps need average pooling followed by one linear layer (through at most a "
            "LayerNorm/BatchNorm/RMSNorm and dropout); pass features= and classifier= to name them. For a head "
            "with hidden layers (an MLP after the pooling) there is no exact map: ask for the differentiable "
            "Grad-CAM fallback by name, CAMHook(model, method='gradcam')"
        )
        return (
            f"{model} is not GAP-FC: the input of its classifier '{classifier}' is not the output of an average "
            f"pooling{self._classifier_block}{advice}"
        )

    def _detect_gradcam(self, forward: _Forward) -> Tensor:
        """Grad-CAM's features: the named ones, the input of the global pooling module that ran last, or
        (a model that pools with ``Tensor.mean``) the map or raster tokens whose average a later module takes.

        Only a map whose cells are known to lie on the image is taken: a 4-D tensor that merely ran
        last (an attention tensor ``(N, heads, T, head_dim)``) is refused by name.
        """
        calls = forward.pools
        pooled: Tensor | None
        if self._features_named:
            if not calls:
                self._fail(f"the features '{self._features_name}' did not run in the forward of {self._model_name}")
            if len(calls) > 1:
                self._fail(self._runs_more_than_once(len(calls)))
            index, features, pooled = calls[0]
            if pooled is not None:  # a pooling's input; another module's output was activated by its hook
                features = self._activate(features)
        else:
            # a global pooling (one value per channel), not one inside the backbone (DenseNet's transitions)
            pooling = [
                call
                for call in calls
                if call[2] is not None
                and call[1].dim() == 4
                and call[2].numel() in (call[1].shape[0] * call[1].shape[1], call[1].shape[0] * call[1].shape[3])
            ]
            if not pooling:
                found = next(
                    (hit for v in reversed(forward.vectors) if (hit := self._search_outputs(forward, v, False))),
                    None,
                )
                if found is None:
                    self._fail(self._no_gradcam_map(forward))
                self._set_head(found[0], self.classifier)  # _search_outputs chose the layout
                self._resolved = True
                self._attach_features()
                return self._activate(found[1])
            index, features, pooled = pooling[-1]
            self._set_head(forward.pool_candidates[index], self.classifier)
            if sum(call[0] == index for call in calls) > 1:
                self._fail(self._runs_more_than_once(sum(call[0] == index for call in calls)))
            features = self._activate(features)
        if features.dim() == 3:  # named tokens, in raster order after the model's prefix tokens
            self.layout, self.prefix_tokens = self._shape_layout(features)
        else:
            width = getattr(self._module, "num_features", None)  # timm's count of the features' channels
            channels = pooled.numel() // max(features.shape[0], 1) if pooled is not None else width
            nhwc = features.shape[1] != channels and features.shape[-1] == channels
            self.layout, self.prefix_tokens = ("nhwc", 0) if nhwc else ("nchw", 0)
        self._resolved = True
        self._attach_features()
        return features

    def _no_gradcam_map(self, forward: _Forward) -> str:
        """Why Grad-CAM found no map whose cells lie on the image, naming what ran last, and the way out."""
        model = self._model_name
        advice = (
            "; pass features= naming the module whose output is the feature map ((N, C, h, w) or (N, h, w, C), "
            "or tokens (N, T, C) in raster order after any prefix tokens)"
        )
        if forward.unordered is not None:
            return (
                f"CAMHook(method='gradcam'): {model} pools the tokens of '{self._name(forward.unordered)}', but "
                "CAMHook does not know where they lie on the image (their order is known for the raster patch "
                f"grid of {', '.join(sorted(_RASTER_TOKENS))}){advice}"
            )
        token = next((t for t in (self._class_token(forward, v) for v in forward.vectors) if t is not None), None)
        last = next(
            ((m, t) for m, t, _ in reversed(forward.outputs) if t.dim() == 4 and not _contains(m, self.classifier)),
            None,
        )
        ran = f"; the last 4-D output, '{self._name(last[0])}' {tuple(last[1].shape)}, is no such map" if last else ""
        if token is not None:
            advice = (
                f"; it classifies its class token (the first token of '{self._name(token)}'), not a pooling: build "
                "it with average pooling (timm: global_pool='avg'), or pass features= naming tokens (N, T, C) in "
                "raster order that the class token attends to"
            )
        return (
            f"CAMHook(method='gradcam') found no feature map of {model} whose cells it can place on the image: "
            "no average pooling module ran, and no module's output (a map, or the tokens of a model known to keep "
            f"them in raster order) averages to a vector its head takes{ran}{advice}"
        )

    def _runs_more_than_once(self, calls: int) -> str:
        return (
            f"the features '{self._features_name}' run {calls} times in one forward of {self._model_name} (a module "
            "shared by several blocks?), which would record several heatmaps per forward; pass features= naming the "
            "module whose output the model pools for its classifier"
        )

    def _name(self, module: nn.Module) -> str:
        return next((name for name, m in self._module.named_modules() if m is module), type(module).__name__)

    def _classifier_call(self, forward: _Forward, output: Any) -> tuple[tuple[int, Any, Any], Tensor] | None:
        """The classifier call whose output the model returns, with that output; None if undecided."""
        for call in forward.linears:
            for returned in _tensors(output):
                if isinstance(call[2], Tensor) and _same_values(call[2], returned):
                    return call, returned
        return None

    def _verdict(self, forward: _Forward, output: Any) -> bool:
        """Check the head on what the first forward saw; ``False`` when it cannot tell yet."""
        model, classifier = self._model_name, self._classifier_name
        if not forward.features:
            self._fail(
                f"the features '{self._features_name}' did not run in the forward of {model}; name a module "
                "that runs before the classifier"
            )
        if len(forward.features) > 1:
            self._fail(self._runs_more_than_once(len(forward.features)))
        if not forward.linears:
            self._fail(f"the classifier '{classifier}' did not run in the forward of {model}")
        returned = _tensors(output)
        if not returned:
            self._fail(
                f"{model} returned a {type(output).__name__}; CAMHook needs its logits as a tensor (or in a tuple, "
                "list or dict)",
                TypeError,
            )
        labels = _labels(self.classifier)
        if not self.check or self.method == "gradcam":
            if isinstance(output, Tensor):
                self._check_labels(output, labels)
            return True
        if self.other_heads:
            return self._verdict_averaged(forward, output)
        found = self._classifier_call(forward, output)
        if found is None:
            calls = [call[2] for call in forward.linears if isinstance(call[2], Tensor)]
            if any(_same_values(call, t) is None for call in calls for t in returned):
                return False
            shapes = ", ".join(str(tuple(t.shape)) for t in returned)
            self._fail(
                f"{model} is not GAP-FC between '{self._features_name}' and '{classifier}'{self._classifier_block}: "
                f"it does not return the output of '{classifier}' (it returns {shapes}). Class activation maps "
                "explain the logits of global average pooling followed by one linear layer; pass features= and "
                "classifier= to name them, or use a model with such a head"
            )
        (_, x, y), logits = found
        self._check_labels(logits, labels)
        if not isinstance(x, Tensor):
            self._fail(f"the classifier '{classifier}' of {model} must be called with its input as a positional tensor")
        features, dtype = forward.features[0]
        assert features is not None  # with check=True the features' copy is kept
        if features.shape[0] == 0 or not all(bool(t.isfinite().all()) for t in (features, x, y)):
            return False
        norm = self._find_norm(forward, x) if self.norm is None else None
        if norm is not None and self._set_layout(features, norm[1], dropout=False):
            self.norm = norm[0]  # named modules with a norm between them
        elif self.norm is None:
            self._set_layout(features, x, dropout=True)
        self._check_gap_fc(forward, features, dtype, x, y, self.norm, self.classifier)
        return True

    def _verdict_averaged(self, forward: _Forward, output: Any) -> bool:
        """The check of averaged heads: each head on the pooled features, and the model's mean of them."""
        heads = [(self.norm, self.classifier), *self.other_heads]
        calls = []
        for _, classifier in heads:
            call = next((c for c in forward.linears if forward.linear_candidates[c[0]] is classifier), None)
            if call is None or not isinstance(call[1], Tensor):
                self._fail(
                    f"the classifier '{self._name(classifier)}' did not run in the forward of {self._model_name}"
                )
            calls.append(call)
        logits = next((t for t in _tensors(output) if t.numel() == calls[0][2].numel()), None)
        mean = torch.stack([_wide(c[2]).reshape(-1) for c in calls]).mean(0)
        if logits is None or not bool(
            ((mean - _wide(logits).reshape(-1)).abs() <= _rtol(logits.dtype) * mean.abs() + 1e-30).all()
        ):
            self._fail(f"{self._model_name} does not return the mean of its heads' logits")
        self._check_labels(logits, _labels(self.classifier))
        features, dtype = forward.features[0]
        assert features is not None  # with check=True the features' copy is kept
        if features.shape[0] == 0 or not all(bool(t.isfinite().all()) for c in calls for t in (c[1], c[2])):
            return False
        for (norm, classifier), call in zip(heads, calls):
            self._check_gap_fc(forward, features, dtype, call[1], call[2], norm, classifier)
        return True

    def _check_labels(self, logits: Tensor, labels: int) -> None:
        if logits.dim() == 0 or logits.shape[-1] != labels:
            self._fail(
                f"{self._model_name} returns logits of shape {tuple(logits.shape)}, but its classifier "
                f"'{self._classifier_name}' has {labels} outputs: the heatmaps (N, {labels}, h, w) would not "
                "match the logits' last dimension"
            )

    def _check_gap_fc(
        self,
        forward: _Forward,
        features: Tensor,
        dtype: torch.dtype,
        x: Tensor,
        y: Tensor,
        norm: nn.Module | None,
        classifier: nn.Module,
    ) -> None:
        """Raise unless ``x`` is the head's map of the averaged ``features`` and ``y`` the classifier's of ``x``.

        In float32, with tolerances relative to the magnitude of what each step computes
        (the features for the pooling, the normalised vector for a norm, ``|x| @ |W|.T + |bias|``
        for the classifier), in the rounding of the dtype the model ran in. The logits
        themselves set no tolerance: a head whose logits happen to be small would pass any
        check scaled by them.
        """
        grid = self._grid(features)
        n, channels, h, w = grid.shape
        name = self._name(classifier) if classifier is not self.classifier else self._classifier_name
        head = f"{self._model_name} is not GAP-FC between '{self._features_name}' and '{name}'"
        advice = (
            ". Class activation maps need global average pooling followed by one linear layer; pass "
            "features= and classifier= to name them, or use a model with such a head"
        )
        if x.numel() != n * channels:
            self._fail(
                f"{head}{self._classifier_block}: the classifier's input has shape {tuple(x.shape)}, not the "
                f"pooled ({n}, {channels}){advice}"
            )
        x32 = _wide(x).reshape(n, channels)
        grid = grid.to(device=x32.device, dtype=torch.promote_types(grid.dtype, x32.dtype))
        pooled = grid.mean((2, 3))
        magnitude = grid.abs().mean((2, 3))
        rtol = _rtol(dtype, x.dtype)
        if norm is not None:
            call = next((c for c in reversed(forward.norms) if c[0] is norm), None)
            norm_name = self._name(norm)
            if call is None:
                self._fail(f"{head}: the norm '{norm_name}' between them did not run")
            norm_in = _wide(call[1]).reshape(pooled.shape).to(pooled)
            if not bool(((norm_in - pooled).abs() <= rtol * magnitude).all()):
                error = float((norm_in - pooled).abs().max())
                self._fail(
                    f"{head}{self._classifier_block}: the input of the norm '{norm_name}' is not the average of the "
                    f"features over their {h}x{w} cells (off by up to {error:.3g}, for features of mean magnitude "
                    f"{float(grid.abs().mean()):.3g}){advice}"
                )
            expected = _normalise(norm, pooled, detach=True)
            mu, inv, gamma, beta = _norm_stats(norm, pooled)
            spread = (pooled.abs() if mu is None else (pooled - mu).abs() + mu.abs()) * inv
            spread = spread * (1 if gamma is None else _wide(gamma).to(pooled).abs()) + (
                0 if beta is None else _wide(beta).to(pooled).abs()
            )
            norm_out = _wide(call[2]).reshape(pooled.shape).to(pooled)
            if not bool(((norm_out - expected).abs() <= 2 * _rtol(dtype, call[2].dtype) * spread + 1e-6).all()):
                self._fail(
                    f"{head}: the output of '{norm_name}' ({type(norm).__name__}) is not the normalisation of "
                    f"the pooled features by their per-sample statistics (off by up to "
                    f"{float((norm_out - expected).abs().max()):.3g}); is it normalising over other dimensions?"
                    f"{advice[1:]}"
                )
            pooled, magnitude = norm_out, spread
        if not _matches_pooled(pooled, x32, rtol * magnitude, rtol):
            error = float((x32 - pooled).abs().max())
            what = (
                f"the output of the norm '{self._name(norm)}'"
                if norm is not None
                else (f"the average of the features over their {h}x{w} cells")
            )
            self._fail(
                f"{head}{self._classifier_block}: the classifier's input is not {what} (off by up to {error:.3g}, "
                f"for features of mean magnitude {float(grid.abs().mean()):.3g}){advice}"
            )
        weight = _wide(_weight(classifier)).to(x32.dtype)
        given_bias = _bias(classifier)
        bias = None if given_bias is None else _wide(given_bias).to(x32.dtype)
        expected = F.linear(x32, weight, bias)
        magnitude = x32.abs() @ weight.abs().T
        if bias is not None:
            magnitude = magnitude + bias.abs()
        if y.numel() != expected.numel():
            self._fail(f"{head}: the classifier's output has shape {tuple(y.shape)}, expected {tuple(expected.shape)}")
        deviation = (_wide(y).reshape(expected.shape).to(expected) - expected).abs()
        if not bool((deviation <= _matmul_rtol(x.dtype, y.dtype) * magnitude).all()):
            self._fail(
                f"{head}: the output of '{name}' is not input @ weight.T + bias (off by up to "
                f"{float(deviation.max()):.3g}); is it a Linear subclass, or changed by another hook?{advice[1:]}"
            )

    # --- public API ----------------------------------------------------------------------

    @property
    def offset(self) -> Tensor | None:
        """The per-label constant ``(L,)`` the head adds to the maps' average: ``heatmaps.mean((2, 3)) + offset``
        is the logits (with dropout between the pooling and the classifier active, in train mode, the
        logits with that dropout off: their expectation over its mask).

        The classifier's bias for a GAP-FC head (zeros without one), ``W @ beta + bias`` with a
        norm's shift ``beta`` after the pooling. Detached. ``None`` until the first forward has
        found and checked the head, and with ``method='gradcam'``, whose maps do not average to
        the logits.
        """
        if self._pending or self.method == "gradcam" or self.classifier is None:
            return None
        offsets = []
        with torch.no_grad():
            for norm, classifier in [(self.norm, self.classifier), *self.other_heads]:
                weight = _weight(classifier)
                bias = _bias(classifier)
                offset = bias.detach().clone() if bias is not None else weight.new_zeros(weight.shape[0])
                beta = getattr(norm, "bias", None) if norm is not None else None
                if beta is not None:
                    offset = offset + weight.detach() @ beta.detach().to(weight)
                offsets.append(offset)
        return offsets[0] if len(offsets) == 1 else torch.stack(offsets).mean(0)

    def pop(self) -> list[Tensor]:
        """The heatmaps of every forward since the last call, oldest first; then forget them."""
        return super().pop()

    def remove(self) -> None:
        """Detach the hooks from the model and drop stored maps; safe to call twice."""
        _remove_all(self._hooks)
        self._forward = None
        self._stored = []
        live = _LIVE.get(self._module)
        if live is not None:
            live.discard(self)

    def __enter__(self) -> CAMHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"CAMHook({self._model_name}, features='{self._features_name}', "
            f"classifier='{self._classifier_name}', detach_classifier={self.detach_classifier})"
        )
