"""CAMHook: attach, record, pop; the head it found and the offset of Eq. 1."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple, NoReturn

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._hooks import _Recording, _remove_all, _remove_handles, _unwrap, _WeakHook
from .._validation import check_positive_int
from .detect import _LIVE, _Detection, _warn_if_shared
from .heads import (
    _bias,
    _is_classifier,
    _is_pool,
    _weight,
    _weight_parameter,
)
from .maps import _Maps
from .trace import _Forward, _resolve, _static_head
from .verify import _Verification


def _check_options(
    model: object,
    activation: object,
    detach_classifier: object,
    check: object,
    max_stored: object,
    method: object,
) -> int:
    """CAMHook's checks of its arguments that need no look at the model's modules; ``max_stored`` as an int."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(_unwrap(model), torch.jit.ScriptModule):
        raise TypeError("model must be an eager nn.Module, got a TorchScript module, whose forward runs no hooks")
    if activation is not None and not callable(activation):
        raise TypeError(f"activation must be a function of the features or None, got {type(activation).__name__}")
    for name, flag in (("detach_classifier", detach_classifier), ("check", check)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    max_stored = check_positive_int("max_stored", max_stored)
    if method not in ("cam", "gradcam"):
        raise ValueError(
            f"method must be 'cam' (the exact maps of Eq. 1) or 'gradcam' (the differentiable Grad-CAM fallback "
            f"for heads that are not affine), got {method!r}"
        )
    return max_stored


class _Head(NamedTuple):
    """The head CAMHook starts from: named by the user, or guessed from the model's family."""

    features: nn.Module | None
    classifier: nn.Module
    activation: Callable[[Tensor], Tensor] | None
    named_features: nn.Module | None
    named_classifier: nn.Module | None
    resolved: bool  # known, or both named: no first-forward search


def _find_head(
    model: nn.Module,
    features: nn.Module | str | None,
    classifier: nn.Module | str | None,
    method: str,
) -> _Head:
    """The modules ``features`` and ``classifier`` name (or the family's guess), checked."""
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
            "features must be the pooling module or the module whose output is the 4-D feature map, got an nn.Linear"
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
    return _Head(head_features, head_classifier, guess_activation, named_features, named_classifier, resolved)


class CAMHook(_Detection, _Verification, _Maps, _Recording):
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
        >>> import torch
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
        max_stored = _check_options(model, activation, detach_classifier, check, max_stored, method)
        module = _unwrap(model)
        head = _find_head(model, features, classifier, method)
        self._module = module
        self._model_name = type(module).__name__
        self._set_head(head.features, head.classifier)
        # the activation found with the features applies only when the user named neither
        # (Grad-CAM differentiates the tensor the model itself pools, which a function applied by the
        # hook is not; DenseNet's in-place ReLU leaves that tensor as the output of its features)
        guessed = head.activation if method == "cam" else None
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
        self._features_named = head.named_features is not None
        self._classifier_named = head.named_classifier is not None
        self._resolved = head.resolved
        self._pending = True  # the first-forward verification
        self._forward: _Forward | None = None
        self._hooks: dict[str, list[RemovableHandle]] = {"features": [], "model": [], "forward": []}
        weakref.finalize(self, _remove_all, self._hooks)
        live = _LIVE.setdefault(module, weakref.WeakSet())
        _warn_if_shared(self, stacklevel=2)
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
        _remove_handles(self._hooks[kind])

    @staticmethod
    def _fail(message: str, error: type[Exception] = ValueError) -> NoReturn:
        # raised inside a hook, whose wrapper (_WeakHook) removes every hook first
        raise error(message)

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
