r"""AAMN: an attention-augmented memory head for multi-label classification (Zhou et al., TOMM 2023).

The AAMN paper (doi 10.1145/3570166) is public through its abstract and reference list only:
no equations, no code. It puts three modules on the last feature map of a CNN backbone:

1. a **categorical memory** that mines the dataset-level context of every category and augments
   the current image's features with it (:class:`CategoricalMemory`);
2. a **channel-relation exploration** module that captures the relationships between the
   feature channels (:class:`ChannelRelation`);
3. a **spatial-relation enhancement** module that models second-order statistics of the features
   and long-range dependencies between pixels (:class:`SpatialRelation`).

Each module here follows the published module of the family the paper cites, and says in its
docstring where our reading of the abstract had to choose. Every module is residual with a learned
scalar ``gate`` that starts at 0, so a freshly built head is exactly the backbone's GAP-FC
classifier (as DANet and SAGAN start their attention branches) and an ImageNet backbone starts from
the baseline's function.

The classifier of :class:`AAMNHead` is global average pooling followed by one linear layer over
the *enhanced* map, so :class:`~attn_consistency.CAMHook` finds it and the heatmaps satisfy
``heatmaps.mean((2, 3)) + fc.bias == logits``: the attention consistency loss applies unchanged.

The memory is filled from the training data (:meth:`CategoricalMemory.observe`), which needs the
labels of the batch: wrap the training forward passes of a step in ``with model.observe(targets):``
(every model of this module has it; a model without memory accepts it and does nothing).

Example:
    >>> import torchvision
    >>> resnet = torchvision.models.resnet18()
    >>> trunk = nn.Sequential(*list(resnet.children())[:-2])  # up to the last feature map
    >>> model = AAMN(trunk, channels=512, num_labels=20)
    >>> images, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 20)).float()
    >>> with model.observe(targets):
    ...     logits = model(images)
    >>> logits.shape, int(model.head.memory.updates.gt(0).sum()) == int(targets.amax(0).sum())
    (torch.Size([4, 20]), True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validation import (
    check_bool,
    check_finite_number,
    check_positive_int,
    check_spatial,
    check_tensor,
    data_checks_enabled,
)

__all__ = ["AAMN", "AAMNHead", "CategoricalMemory", "ChannelRelation", "SpatialRelation"]


def _check_map(name: str, x: object, channels: int) -> Tensor:
    tensor = check_tensor(name, x, 4, "(N, C, H, W)", floating=True)
    if tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(tensor.shape)}")
    return check_spatial(name, tensor, "(H, W)")


def _rows(rows: Tensor, describe: Callable[[int], str]) -> str:
    """The first few of ``rows`` (a bool mask), described, for a message."""
    index = rows.nonzero().flatten().tolist()
    shown = ", ".join(describe(i) for i in index[:5])
    return shown + (f" and {len(index) - 5} more" if len(index) > 5 else "")


class _Gated(nn.Module):
    """A residual branch ``x + gate * branch(x)`` whose scalar gate starts at 0 (the identity)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.gate = nn.Parameter(torch.zeros(()))

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch of the module, ``(N, C, H, W)`` from ``(N, C, H, W)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        _check_map("x", x, self.channels)
        return x + self.gate * self.branch(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class CategoricalMemory(_Gated):
    r"""One memory slot per label, filled from the training data and read by attention.

    Follows the categorical memory networks (Deng et al. 2020, "Fine-grained classification via
    categorical memory networks", the AAMN paper's reference [10]): a slot holds a prototype of
    its category, a moving average of the features of the training images that show it, and every
    position of the current feature map reads the slots by attention. With
    :math:`x_i \in \mathbb{R}^C` the feature at position :math:`i`, :math:`m_l` the slot of
    label :math:`l` and :math:`\mathcal{F}` the slots filled so far,

    .. math::

        q_i = W_q x_i, \quad k_l = W_k m_l, \quad v_l = W_v m_l, \quad
        a_{il} = \frac{\exp(q_i^\top k_l / \sqrt{d})}{\sum_{l' \in \mathcal{F}} \exp(q_i^\top k_{l'} / \sqrt{d})}
        \ (l \in \mathcal{F}), \quad
        y_i = x_i + \gamma \sum_{l \in \mathcal{F}} a_{il} v_l

    with :math:`d` the key size and :math:`\gamma` the gate (0 at the start: the identity).
    Before any slot is filled the read is 0.

    **The update** (:meth:`update`, run by :meth:`observe` once per training step). With
    :math:`g_n` the average over positions of the module's input for sample :math:`n` (detached)
    and :math:`P_l` the samples of the step whose label :math:`l` is present (target > 0.5: a
    signed dataset's unspecified 0 and absent -1 do not count), the batch prototype is
    :math:`\bar g_l = \frac{1}{|P_l|}\sum_{n \in P_l} g_n` and

    .. math::

        m_l \leftarrow \begin{cases} \bar g_l & \text{first time } P_l \neq \emptyset \\
        (1 - \mu)\, m_l + \mu\, \bar g_l & P_l \neq \emptyset \\ m_l & P_l = \emptyset \end{cases}

    Under ``torch.distributed`` the sums :math:`\sum_{n \in P_l} g_n` and counts :math:`|P_l|`
    are summed over the replicas before the division (one ``all_reduce``), so every replica
    holds the slots one process would compute on the concatenated batch. The update uses sums
    and a matrix product only: it is deterministic for a given batch.

    **Non-finite values never reach the slots.** A sample whose pooled features or targets hold
    a nan or inf (one NaN pixel of an image is enough) would make every slot of its labels NaN
    for good, and with them every later logit, even with the gate at 0. Where data checks run
    (``check_finite_values``: by default on CPU, where they cost no device synchronisation)
    such an update is refused with a ``ValueError`` naming the samples and the slots are left
    as they were; where they do not (an accelerator, by default), the samples are left out of
    the update without a synchronisation, as a slot whose new value would not be finite.

    Where the abstract was silent, we chose:

    - *a moving-average memory, not a learned one*: the abstract's memory "excavates the
      contextual information of various categories from the dataset"; a learned memory would be
      parameters with no tie to the images of its category. Its relatives (reference [10]; the
      class-wise memory bank of Alonso et al. 2021, reference [1]) both fill it from the features
      of the samples of the class. Slots are buffers: saved in ``state_dict`` and checkpoints.
    - *the image-level average of the module's input* as the feature of a sample (the pooled
      feature a GAP classifier sees), every view of the step counted (the flipped and scaled
      views of attention consistency show the same labels);
    - *momentum* :math:`\mu = 0.1` per step in which the label occurs, as BatchNorm's running
      statistics: the backbone's features drift while it trains, and a slot averaging over
      about the last 10 occurrences follows them;
    - *a per-position read*, so that the memory enhances the map that the CAM is computed from.

    Args:
        channels: channels :math:`C` of the feature map.
        num_labels: number of labels (slots).
        key_channels: size :math:`d` of queries and keys (default ``max(C // 8, 1)``).
        momentum: :math:`\mu` in (0, 1].
        check_finite_values: refuse updates from non-finite features or targets (``True``),
            leave them out silently (``False``), or refuse on CPU and leave out elsewhere
            (``None``, the default: no device synchronisation), as
            :class:`~attn_consistency.AttentionConsistencyLoss`.

    Attributes:
        slots: ``(num_labels, channels)`` buffer of the prototypes.
        updates: ``(num_labels,)`` int64 buffer, the steps that updated each slot (0: empty).
    """

    slots: Tensor
    updates: Tensor

    def __init__(
        self,
        channels: int,
        num_labels: int,
        key_channels: int | None = None,
        momentum: float = 0.1,
        *,
        check_finite_values: bool | None = None,
    ) -> None:
        super().__init__(channels)
        self.num_labels = check_positive_int("num_labels", num_labels)
        key = (
            check_positive_int("key_channels", key_channels) if key_channels is not None else max(self.channels // 8, 1)
        )
        self.momentum = check_finite_number("momentum", momentum)
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        self.check_finite_values = check_bool("check_finite_values", check_finite_values, optional=True)
        self.key_channels = key
        self.query = nn.Conv2d(self.channels, key, 1, bias=False)
        self.key = nn.Linear(self.channels, key, bias=False)
        self.value = nn.Linear(self.channels, self.channels, bias=False)
        self.register_buffer("slots", torch.zeros(self.num_labels, self.channels))
        self.register_buffer("updates", torch.zeros(self.num_labels, dtype=torch.long))
        self._observed: list[Tensor] | None = None  # pooled inputs of the forwards inside observe()

    def branch(self, x: Tensor) -> Tensor:
        if self._observed is not None and self.training:
            self._observed.append(x.detach().float().mean((2, 3)))
        # a copy: the update after the forward must not change a tensor that backward needs
        slots = self.slots.clone().to(x.dtype)
        filled = self.updates > 0
        usable = filled | ~filled.any()  # no slot filled yet: all slots are 0 and so is the read
        n, c, h, w = x.shape
        queries = self.query(x).flatten(2).transpose(1, 2)  # (N, HW, d)
        scores = queries @ self.key(slots).t() / math.sqrt(self.key_channels)  # (N, HW, L)
        attention = scores.masked_fill(~usable, float("-inf")).softmax(-1)
        read = attention @ self.value(slots)  # (N, HW, C)
        out: Tensor = read.transpose(1, 2).reshape(n, c, h, w)
        return out

    @contextlib.contextmanager
    def observe(self, targets: Tensor, process_group: dist.ProcessGroup | None = None) -> Iterator[CategoricalMemory]:
        """Collect the features of the training forwards inside the block, then update the slots.

        Every forward inside the block (in training mode) must hold ``k * len(targets)`` samples
        for some integer ``k``: ``k`` views of the batch, concatenated view after view, as
        :meth:`AttentionConsistencyLoss.views` runs them. The slots change once, when the block
        ends without an exception; the forwards inside read the slots of the step's start.
        Under ``torch.distributed`` every replica must run the block at every step (the update
        reduces across replicas).

        Args:
            targets: ``(N, num_labels)`` labels of the batch (present where > 0.5).
            process_group: the group to reduce over (default: the whole world, when
                ``torch.distributed`` is initialised).

        Raises:
            RuntimeError: a block opened inside another one.
            ValueError: targets of the wrong shape, a forward whose batch is not a whole
                number of copies of the targets, or (where data checks run: see
                ``check_finite_values``) non-finite targets or pooled features; the slots are
                then left as they were.
        """
        self._check_targets(targets)
        if self._observed is not None:
            raise RuntimeError("observe() blocks of one memory cannot be nested")
        self._observed = []
        try:
            yield self
            observed = self._observed
        finally:
            self._observed = None
        n = targets.shape[0]
        bad = [len(g) for g in observed if (len(g) % n if n else len(g))]
        if bad:
            raise ValueError(
                f"observe(): a forward inside the block ran {bad[0]} samples for targets of {n} rows; each forward "
                "must hold whole copies of the batch (views concatenated one after the other)"
            )
        observed = [g for g in observed if len(g)]  # an empty batch updates nothing (but still reduces)
        features = torch.cat(observed) if observed else self.slots.new_zeros(0, self.channels)
        repeated = torch.cat([targets.repeat(len(g) // n, 1) for g in observed]) if observed else targets[:0]
        # row r of the features: sample (r mod n) of the batch, in copy (r div n) of the forwards' views
        self._update(features, repeated, process_group, lambda r: f"sample {r % n} (view {r // n})", "observe()")

    def _check_targets(self, targets: object) -> None:
        tensor = check_tensor("targets", targets, 2, "(N, num_labels)")
        if tensor.shape[1] != self.num_labels:
            raise ValueError(
                f"targets must have {self.num_labels} columns (one per slot), got shape {tuple(tensor.shape)}"
            )

    @torch.no_grad()
    def update(self, features: Tensor, targets: Tensor, process_group: dist.ProcessGroup | None = None) -> None:
        """Move each slot toward the mean feature of the samples whose label is present.

        Rows whose features or targets are not finite are refused or left out (see the class's
        ``check_finite_values``).

        Args:
            features: ``(M, channels)`` pooled features (one row per sample and view).
            targets: ``(M, num_labels)`` their labels (present where > 0.5).
            process_group: as in :meth:`observe`.

        Raises:
            ValueError: arguments of the wrong shape, or (where data checks run) non-finite
                rows, named; the slots are then left as they were.
        """
        self._update(features, targets, process_group, lambda r: f"row {r}", "update()")

    def _update(
        self,
        features: Tensor,
        targets: Tensor,
        process_group: dist.ProcessGroup | None,
        describe: Callable[[int], str],
        caller: str,
    ) -> None:
        check_tensor("features", features, 2, "(M, channels)", floating=True)
        self._check_targets(targets)
        if features.shape != (targets.shape[0], self.channels):
            raise ValueError(
                f"features must be ({targets.shape[0]}, {self.channels}) for targets of shape {tuple(targets.shape)}, "
                f"got {tuple(features.shape)}"
            )
        targets = targets.to(self.slots.device)
        features = features.to(self.slots)
        # rows with a nan or inf are left out, without a synchronisation: a 0 weight does not
        # cancel a NaN in the matrix product (0 * nan is nan), so their features become 0 too
        bad_features = ~features.isfinite().all(1)
        bad_targets = ~targets.isfinite().all(1) if targets.is_floating_point() else torch.zeros_like(bad_features)
        finite = ~(bad_features | bad_targets)
        present = ((targets > 0.5) & finite[:, None]).to(self.slots.dtype)
        features = torch.where(finite[:, None], features, torch.zeros_like(features))
        totals = torch.cat([present.t() @ features, present.sum(0)[:, None]], 1)  # (L, C + 1): sums, counts
        # one more row, the rows left out: every replica then refuses the same step together
        skipped = torch.zeros(1, totals.shape[1], dtype=totals.dtype, device=totals.device)
        skipped[0, 0] = (~finite).sum()
        totals = torch.cat([totals, skipped])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            dist.all_reduce(totals, group=process_group)
        if data_checks_enabled(self.check_finite_values, features, targets) and bool(totals[-1, 0] > 0):
            self._refuse(bad_features, bad_targets, int(totals[-1, 0]), describe, caller)
        totals = totals[:-1]
        sums, counts = totals[:, :-1], totals[:, -1]
        mean = sums / counts.clamp_min(1)[:, None]
        moved = torch.where((self.updates > 0)[:, None], (1 - self.momentum) * self.slots + self.momentum * mean, mean)
        seen = (counts > 0) & moved.isfinite().all(1)  # finite features can still sum past the dtype's range
        self.slots.copy_(torch.where(seen[:, None], moved, self.slots))
        self.updates += seen.long()

    def _refuse(
        self, bad_features: Tensor, bad_targets: Tensor, total: int, describe: Callable[[int], str], caller: str
    ) -> None:
        parts = []
        if bool(bad_features.any()):
            parts.append(
                f"the pooled features of {_rows(bad_features, describe)} (the memory's input: a non-finite input "
                "batch or weights?)"
            )
        if bool(bad_targets.any()):
            parts.append(f"the targets of {_rows(bad_targets, describe)}")
        local = "; ".join(parts) if parts else "no row of this process (another replica's)"
        raise ValueError(
            f"CategoricalMemory.{caller}: {total} of the rows to update the memory with hold nan or inf: {local}. "
            "The slots were left as they were (a non-finite slot would make every later logit NaN); "
            "check_finite_values=False leaves such rows out silently"
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_labels={self.num_labels}, key_channels={self.key_channels}, "
            f"momentum={self.momentum}, check_finite_values={self.check_finite_values}"
        )


class ChannelRelation(_Gated):
    r"""Channel-relation exploration: a global-context block (GCNet, Cao et al. 2019, reference [2]).

    A context vector pooled by attention over the positions passes through a bottleneck that
    models the dependencies between channels (as squeeze-excitation, reference [22]) and is added
    to every position:

    .. math::

        \alpha_j = \frac{\exp(w_k^\top x_j)}{\sum_{j'} \exp(w_k^\top x_{j'})}, \quad
        c = \sum_j \alpha_j x_j, \quad
        y_i = x_i + \gamma\, W_2\, \mathrm{ReLU}(\mathrm{LN}(W_1 c))

    with :math:`W_1 \in \mathbb{R}^{C/r \times C}`, :math:`W_2 \in \mathbb{R}^{C \times C/r}` and
    the gate :math:`\gamma` (0 at the start). Where the abstract was silent we chose GCNet's
    block, which the paper cites, over DANet's channel attention (reference [15], a ``C x C``
    affinity applied at each position): both relate channels; the GC block costs ``O(C^2 / r)``
    per image, not ``O(C^2 HW)``. As the added term is the same at every position, it shifts each
    label's heatmap by a constant: the CAM of the enhanced map stays meaningful.

    Args:
        channels: channels :math:`C`.
        reduction: bottleneck ratio :math:`r` (GCNet: 16).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels)
        hidden = max(self.channels // check_positive_int("reduction", reduction), 1)
        self.context = nn.Conv2d(self.channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(self.channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(hidden, self.channels, 1),
        )

    def branch(self, x: Tensor) -> Tensor:
        weights = self.context(x).flatten(2).softmax(-1)  # (N, 1, HW)
        context = (x.flatten(2) @ weights.transpose(1, 2))[..., None]  # (N, C, 1, 1)
        out: Tensor = self.transform(context)
        return out


class SpatialRelation(_Gated):
    r"""Spatial-relation enhancement: second-order pooling read back at every pixel.

    The embedded features :math:`\theta_i = W_\theta x_i`, :math:`\phi_j = W_\phi x_j`,
    :math:`g_j = W_g x_j` (``d = C / r`` channels) give the cross-covariance of the map over its
    :math:`N = HW` positions (second-order statistics, as second-order pooling, Carreira et al.
    2012, reference [3], and GSoP-Net, reference [74]), which every position reads:

    .. math::

        \Sigma = \frac{1}{N} \sum_j (g_j - \bar g)(\phi_j - \bar\phi)^\top, \quad
        y_i = x_i + \gamma\, W_o\, \Sigma\, \theta_i
            = x_i + \gamma\, W_o \frac{1}{N} \sum_j \big(\theta_i^\top (\phi_j - \bar\phi)\big)(g_j - \bar g)

    The second form is the dot-product non-local block (Wang et al. 2018, reference [46]) on
    centred embeddings: each pixel aggregates every other pixel weighted by their pairwise
    affinity, the long-range dependency the abstract names. The first form is how it is
    computed, in ``O(N d^2)`` instead of ``O(N^2 d)``.

    Where the abstract was silent we chose this identity as the link between "second-order
    statistics" and "long-range dependencies", the centring (a covariance rather than a raw
    second moment, as GSoP), no matrix normalisation (iSQRT-COV's square root or O2P's
    logarithm would break the identity with the non-local form), and the gate :math:`\gamma`
    (0 at the start) in place of the non-local block's zero-initialised BatchNorm.

    Args:
        channels: channels :math:`C`.
        reduction: embedding ratio :math:`r` (default 8).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__(channels)
        hidden = max(self.channels // check_positive_int("reduction", reduction), 1)
        self.theta = nn.Conv2d(self.channels, hidden, 1, bias=False)
        self.phi = nn.Conv2d(self.channels, hidden, 1, bias=False)
        self.g = nn.Conv2d(self.channels, hidden, 1, bias=False)
        self.out = nn.Conv2d(hidden, self.channels, 1, bias=False)

    def branch(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (N, d, HW)
        phi = self.phi(x).flatten(2)
        g = self.g(x).flatten(2)
        phi = phi - phi.mean(2, keepdim=True)
        g = g - g.mean(2, keepdim=True)
        covariance = g @ phi.transpose(1, 2) / (h * w)  # (N, d, d)
        out: Tensor = self.out((covariance @ theta).reshape(n, theta.shape[1], h, w))  # n may be 0
        return out


class AAMNHead(nn.Module):
    r"""The three modules in sequence, then the GAP-FC classifier over the enhanced map.

    .. math:: \mathrm{logits} = W\, \mathrm{GAP}(S(R(M(F)))) + b

    with :math:`M` the categorical memory, :math:`R` the channel relation, :math:`S` the
    spatial relation and :math:`F` the backbone's last feature map. The abstract lists the
    modules in this order and says the memory "augments the current input feature", so it comes
    first; the two relation modules then work on the augmented map. Any module can be left out
    (``memory=False`` ...) for an ablation; it is then an ``nn.Identity``.

    Args:
        channels: channels of the backbone's feature map.
        num_labels: outputs of the classifier (and slots of the memory).
        memory, channel_relation, spatial_relation: whether each module is used.
        key_channels, momentum, check_finite_values: of :class:`CategoricalMemory`.
        channel_reduction: of :class:`ChannelRelation`.
        spatial_reduction: of :class:`SpatialRelation`.
    """

    def __init__(
        self,
        channels: int,
        num_labels: int,
        *,
        memory: bool = True,
        channel_relation: bool = True,
        spatial_relation: bool = True,
        key_channels: int | None = None,
        momentum: float = 0.1,
        channel_reduction: int = 16,
        spatial_reduction: int = 8,
        check_finite_values: bool | None = None,
    ) -> None:
        super().__init__()
        channels, num_labels = check_positive_int("channels", channels), check_positive_int("num_labels", num_labels)
        memory = check_bool("memory", memory)
        channel_relation = check_bool("channel_relation", channel_relation)
        spatial_relation = check_bool("spatial_relation", spatial_relation)
        self.memory: nn.Module = (
            CategoricalMemory(channels, num_labels, key_channels, momentum, check_finite_values=check_finite_values)
            if memory
            else nn.Identity()
        )
        self.channel_relation: nn.Module = (
            ChannelRelation(channels, channel_reduction) if channel_relation else nn.Identity()
        )
        self.spatial_relation: nn.Module = (
            SpatialRelation(channels, spatial_reduction) if spatial_relation else nn.Identity()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_labels)

    def enhance(self, features: Tensor) -> Tensor:
        """The enhanced feature map (the map the classifier pools and the CAMs are made of)."""
        enhanced: Tensor = self.spatial_relation(self.channel_relation(self.memory(features)))
        return enhanced

    def forward(self, features: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.avgpool(self.enhance(features)).flatten(1))
        return logits

    def observe(
        self, targets: Tensor, process_group: dist.ProcessGroup | None = None
    ) -> contextlib.AbstractContextManager[nn.Module]:
        """:meth:`CategoricalMemory.observe` of the memory; a no-op context without one."""
        if isinstance(self.memory, CategoricalMemory):
            return self.memory.observe(targets, process_group)
        return contextlib.nullcontext(self)


class AAMN(nn.Module):
    """A backbone trunk (images to its last feature map) followed by an :class:`AAMNHead`.

    Args:
        trunk: the module that maps images ``(N, 3, H, W)`` to the feature map ``(N, C, h, w)``
            (a torchvision ResNet without its pooling and classifier; a timm model's
            ``forward_features``...).
        channels: ``C``.
        num_labels: outputs.
        **head: keyword arguments of :class:`AAMNHead`.
    """

    def __init__(self, trunk: nn.Module, channels: int, num_labels: int, **head: Any) -> None:
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        self.trunk = trunk
        self.head = AAMNHead(channels, num_labels, **head)

    def forward(self, images: Tensor) -> Tensor:
        features = self.trunk(images)
        if not isinstance(features, Tensor) or features.dim() != 4:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"the trunk must return a 4-D feature map (N, C, h, w), got {got}")
        logits: Tensor = self.head(features)
        return logits

    def observe(
        self, targets: Tensor, process_group: dist.ProcessGroup | None = None
    ) -> contextlib.AbstractContextManager[nn.Module]:
        """Fill the memory from the training forwards inside the block (:meth:`CategoricalMemory.observe`)."""
        return self.head.observe(targets, process_group)
