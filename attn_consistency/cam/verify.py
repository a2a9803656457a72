"""Checking on the first forward that the head found is one whose CAMs average to the logits (paper Eq. 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import (
    _bias,
    _labels,
    _matmul_rtol,
    _norm_stats,
    _normalise,
    _rtol,
    _weight,
    _wide,
)
from .trace import _Forward, _matches_pooled, _same_values, _tensors

if TYPE_CHECKING:
    from .hook import CAMHook


class _Verification:
    """CAMHook's check of the head it found, on the first forward.

    A mixin of :class:`~attn_consistency.CAMHook`, as :class:`~attn_consistency.cam.detect._Detection`.
    """

    norm: nn.Module | None

    def _verdict(self: CAMHook, forward: _Forward, output: Any) -> bool:
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

    def _verdict_averaged(self: CAMHook, forward: _Forward, output: Any) -> bool:
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

    def _check_labels(self: CAMHook, logits: Tensor, labels: int) -> None:
        if logits.dim() == 0 or logits.shape[-1] != labels:
            self._fail(
                f"{self._model_name} returns logits of shape {tuple(logits.shape)}, but its classifier "
                f"'{self._classifier_name}' has {labels} outputs: the heatmaps (N, {labels}, h, w) would not "
                "match the logits' last dimension"
            )

    def _check_gap_fc(
        self: CAMHook,
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
