"""Finding the head on the first forward: which tensor the model pools, in which layout, and which classifier reads it."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor, nn

from .._hooks import _Undecided, _WeakHook
from .heads import (
    _RASTER_TOKENS,
    _is_classifier,
    _is_norm,
    _is_pool,
    _rtol,
    _version,
    _wide,
)
from .trace import (
    _contains,
    _device_type,
    _feeds,
    _Forward,
    _matches_pooled,
    _no_evidence,
    _same_values,
    _tensors,
)

if TYPE_CHECKING:
    from .hook import CAMHook


# The CAMHooks alive on each model, to warn when a second one records the same features.
_LIVE: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[CAMHook]] = weakref.WeakKeyDictionary()


def _warn_if_shared(cam: CAMHook, stacklevel: int) -> None:
    """Warn once a second live CAMHook records the features ``cam`` records: both would record every forward."""
    if cam.features is None:
        return
    if any(other is not cam and other.features is cam.features for other in _LIVE.get(cam._module, ())):
        warnings.warn(
            f"CAMHook: {cam._model_name} already has a live CAMHook on '{cam._features_name}'; both record "
            "every forward. Reuse one CAMHook across steps, or call remove() on the old one (or use "
            "`with CAMHook(...)`) before attaching another.",
            stacklevel=stacklevel + 1,
        )


class _Detection:
    """CAMHook's first forward: the head's modules found by the hooks they run.

    A mixin of :class:`~attn_consistency.CAMHook`: its methods take the CAMHook as ``self``
    (annotated so, and type-checked against its attributes); the attributes declared here are
    those whose type mypy would otherwise take from an assignment in these methods.
    """

    layout: str | None
    _forward: _Forward | None
    _live: list[Tensor]

    def _on_model_call(self: CAMHook, module: nn.Module, args: tuple[Any, ...]) -> None:
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

    def _on_candidate_features(
        self: CAMHook, index: int, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
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

    def _on_candidate_linear(self: CAMHook, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._forward is not None:
            self._forward.linears.append((index, args[0] if args else None, output))

    def _on_candidate_norm(self: CAMHook, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._forward is not None and args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self._forward.norms.append((module, args[0], output))

    def _on_candidate_output(self: CAMHook, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
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

    def _on_model_output(self: CAMHook, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
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

    def _refuse_meta(self: CAMHook, args: tuple[Any, ...]) -> None:
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

    def _undecided(self: CAMHook, reason: str) -> NoReturn:
        # Not a verdict on the architecture: the hooks stay, and the next forward decides.
        raise _Undecided(
            f"CAMHook could not find the head of {self._model_name} from this forward: {reason}. It tries again "
            "at the next forward; pass features= and classifier= to name the head"
        )

    def _find_norm(self: CAMHook, forward: _Forward, x: Tensor) -> tuple[nn.Module, Tensor] | None:
        """The normalisation whose output is the classifier's input ``x`` (up to dropout), and its input."""
        for module, norm_input, norm_output in reversed(forward.norms):
            if norm_output.numel() == x.numel() and norm_input.numel() == x.numel() and _feeds(norm_output, x):
                return module, norm_input
        return None

    def _layouts(self: CAMHook, tensor: Tensor, target: Tensor) -> Iterator[tuple[str, int]]:
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

    def _pools_to(self: CAMHook, tensor: Tensor, layout: str, prefix: int, target: Tensor, dropout: bool) -> bool:
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

    def _set_layout(self: CAMHook, features: Tensor, target: Tensor, dropout: bool) -> bool:
        """Choose the layout of ``features`` by the values; ``False`` when none averages to ``target``."""
        for layout, prefix in self._layouts(features, target):
            if self._pools_to(features, layout, prefix, target, dropout):
                self.layout, self.prefix_tokens = layout, prefix
                return True
        return False

    def _search_outputs(
        self: CAMHook, forward: _Forward, target: Tensor, dropout: bool
    ) -> tuple[nn.Module, Tensor] | None:
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

    def _class_token(self: CAMHook, forward: _Forward, target: Tensor) -> nn.Module | None:
        """A module whose first token is ``target``: a head that classifies its class token."""
        for module, tensor, _ in reversed(forward.outputs):
            if tensor.dim() == 3 and tensor.numel() > target.numel() and tensor[:, 0].numel() == target.numel():
                if _same_values(tensor[:, 0].contiguous(), target.reshape(tensor[:, 0].shape)):
                    return module
        return None

    def _detect(self: CAMHook, forward: _Forward, output: Any) -> Tensor:
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
        _warn_if_shared(self, stacklevel=2)
        self._attach_features()
        return features

    def _averaged_heads(self: CAMHook, forward: _Forward, output: Tensor) -> tuple[tuple[int, Any, Any], ...] | None:
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

    def _detect_averaged(
        self: CAMHook, forward: _Forward, output: Tensor, calls: tuple[tuple[int, Any, Any], ...]
    ) -> Tensor:
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

    def _not_pooled(self: CAMHook, forward: _Forward, target: Tensor) -> str:
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

    def _detect_gradcam(self: CAMHook, forward: _Forward) -> Tensor:
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

    def _no_gradcam_map(self: CAMHook, forward: _Forward) -> str:
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

    def _runs_more_than_once(self: CAMHook, calls: int) -> str:
        return (
            f"the features '{self._features_name}' run {calls} times in one forward of {self._model_name} (a module "
            "shared by several blocks?), which would record several heatmaps per forward; pass features= naming the "
            "module whose output the model pools for its classifier"
        )

    def _name(self: CAMHook, module: nn.Module) -> str:
        return next((name for name, m in self._module.named_modules() if m is module), type(module).__name__)

    def _classifier_call(self: CAMHook, forward: _Forward, output: Any) -> tuple[tuple[int, Any, Any], Tensor] | None:
        """The classifier call whose output the model returns, with that output; None if undecided."""
        for call in forward.linears:
            for returned in _tensors(output):
                if isinstance(call[2], Tensor) and _same_values(call[2], returned):
                    return call, returned
        return None
