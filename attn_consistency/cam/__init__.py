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

from .._hooks import _WeakHook  # noqa: F401  (its path in pickles of models saved with a hook attached before the split)
from .hook import CAMHook

__all__ = ["CAMHook"]
