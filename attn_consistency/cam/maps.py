"""Recording: the heatmaps of every forward, from the pooled feature map (NCHW, NHWC or tokens) or, as a fallback, Grad-CAM."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._hooks import _NeedsGrad
from .heads import (
    _labels,
    _norm_stats,
    _weight,
    _wide,
)
from .trace import _tensors

if TYPE_CHECKING:
    from .hook import CAMHook


class _Maps:
    """CAMHook's recording of each forward's heatmaps.

    A mixin of :class:`~attn_consistency.CAMHook`, as :class:`~attn_consistency.cam.detect._Detection`.
    """

    layout: str | None

    def _on_pool_input(self: CAMHook, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._record(args[0] if args else None)

    def _on_features_output(self: CAMHook, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._record(output)

    def _record(self: CAMHook, features: Any) -> None:
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

    def _activate(self: CAMHook, features: Any) -> Tensor:
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

    def _shape_layout(self: CAMHook, features: Tensor) -> tuple[str, int]:
        """The layout the shape suggests, before any value can tell (NCHW first, as PyTorch)."""
        channels = _weight(self.classifier).shape[1]
        if features.dim() == 3:
            return "tokens", int(getattr(self._module, "num_prefix_tokens", 0) or 0)
        if features.shape[1] != channels and features.shape[-1] == channels:
            return "nhwc", 0
        return "nchw", 0

    def _check_channels(self: CAMHook, features: Tensor) -> None:
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

    def _grid(self: CAMHook, features: Tensor) -> Tensor:
        """The features as a map ``(N, C, h, w)``: NHWC permuted, tokens laid out on their grid."""
        if self.layout == "nhwc":
            return features.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            tokens = features[:, self.prefix_tokens :]
            height, width = self._token_grid(tokens.shape[1])
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        return features

    def _token_grid(self: CAMHook, count: int) -> tuple[int, int]:
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

    def _heatmaps(self: CAMHook, features: Tensor) -> Tensor:
        grid = self._grid(features)
        heads = [(self.norm, self.classifier), *self.other_heads]
        maps = [self._head_maps(grid, norm, classifier) for norm, classifier in heads]
        return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)

    def _head_maps(self: CAMHook, grid: Tensor, norm: nn.Module | None, classifier: nn.Module) -> Tensor:
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

    def _store_gradcam(self: CAMHook, lives: list[Tensor], output: Any) -> None:
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

    def _unreached(self: CAMHook) -> str:
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

    def _store(self: CAMHook, heatmaps: Tensor) -> None:
        self._keep(heatmaps)
