"""The three training steps compared by the benchmark.

(a) ``a_plain``: one view, weighted BCE, backward, SGD step.
(b) ``b_multiview``: the views the method needs (built with the library's transforms, exactly
    as :meth:`AttentionConsistencyLoss.views` builds them, and fed as one forward per input
    size), classification loss only.
(c) ``c_consistency``: the same through ``AttentionConsistencyLoss().views(...)`` and a
    :class:`CAMHook`, classification loss plus the consistency loss.

(d) ``d_multiscale`` (with ``stages``): the step of (c) through :class:`MultiScaleHeads` at those
    stages instead of the single CAMHook (multi-scale attention consistency): a side head per
    stage, every term per stage, the classification loss of every head (deep supervision).

(c)/(b) is then what the library adds (hook, heatmaps, consistency terms and their backward);
(b)/(a) is what the extra views cost; (d)/(c) what the stages cost against VAC's single one. Each variant trains its own copy of one initial model,
with its own optimizer, so that no hook, compiled graph or optimizer state is shared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    Transform,
    WeightedBCEWithLogitsLoss,
    get_transform,
    positive_ratio,
)
from attn_consistency.models import MultiScaleHeads

__all__ = [
    "GRADCAM",
    "MULTISCALE",
    "VARIANTS",
    "StepCase",
    "build_model",
    "build_steps",
    "build_transforms",
    "check_arch",
]

VARIANTS = ("a_plain", "b_multiview", "c_consistency")
MULTISCALE = "d_multiscale"
"""The fourth variant, timed when a case has ``stages``."""
GRADCAM = "e_gradcam"
"""(c) with the maps of ``CAMHook(method='gradcam')``, timed when a case has ``gradcam``
(``"detached"``: the default ``detach_classifier=True``; ``"create_graph"``: ``False``)."""


@dataclass(frozen=True)
class StepCase:
    """One configuration of the training-step benchmark."""

    device: str
    arch: str
    labels: int
    batch: int
    size: int
    scale_size: int
    transforms: tuple[str, ...]
    mode: str
    precision: str
    channels_last: bool
    compile: bool
    seed: int = 0
    stages: tuple[str, ...] = ()
    gradcam: str = ""  # "", or "detached" / "create_graph": time (e) with CAMHook(method='gradcam')

    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        runner = "compile" if self.compile else "eager"
        sizes = f"{self.size}/{self.scale_size}" if "scale" in self.transforms else f"{self.size}"
        views = "+".join(self.transforms) + ("" if self.mode == "product" else f" ({self.mode})")
        stages = f" stages={','.join(self.stages)}" if self.stages else ""
        stages += f" +gradcam({self.gradcam})" if self.gradcam else ""
        return (
            f"{self.arch} {sizes} N={self.batch} L={self.labels} {views} "
            f"{self.precision} {layout} {runner} {self.device}{stages}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TinyNet(nn.Module):
    """Three strided convolutions and a GAP-FC head (stride 8): the smoke test's model."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 8), (8, 16), (16, 32)):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def check_arch(arch: str) -> str:
    if arch != "tiny" and arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"arch must be 'tiny' or a torchvision classification model (resnet50, ...), got {arch!r}")
    return arch


def build_model(arch: str, labels: int) -> nn.Module:
    """``"tiny"`` (:class:`TinyNet`) or a torchvision classification model, untrained (weights=None)."""
    if check_arch(arch) == "tiny":
        return TinyNet(labels)
    return torchvision.models.get_model(arch, weights=None, num_classes=labels)


def build_transforms(names: Sequence[str], scale_size: int) -> list[Transform]:
    """The library's transforms by name; ``scale`` resizes to ``scale_size``."""
    return [get_transform("scale", size=scale_size) if name == "scale" else get_transform(name) for name in names]


def _views(transforms: Sequence[Transform], mode: str) -> list[tuple[Transform, ...]]:
    """The views of ``AttentionConsistencyLoss.views``, in its order, as transform tuples."""
    if mode == "independent":
        return [()] + [(t,) for t in transforms]
    return [tuple(t for i, t in enumerate(transforms) if mask >> i & 1) for mask in range(2 ** len(transforms))]


def multiview_batches(images: Tensor, transforms: Sequence[Transform], mode: str) -> list[Tensor]:
    """The input batches of (b): the views of (c), concatenated by size, one batch per forward.

    Mirrors ``AttentionConsistencyLoss.views`` (same parameter draws, same order of transforms
    on each view, same concatenation and memory format), so (b) and (c) do the same input work.
    """
    params = {t.name: t.sample() for t in transforms}
    by_size: dict[tuple[int, ...], list[Tensor]] = {}
    for view in _views(transforms, mode):
        image = images
        for transform in view:
            image = transform.apply_image(image, params[transform.name])
        by_size.setdefault(tuple(image.shape[1:]), []).append(image)
    batches = []
    for group in by_size.values():
        batch = torch.cat(group) if len(group) > 1 else group[0]
        if group[0].is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        batches.append(batch)
    return batches


def classification_loss(criterion: nn.Module, logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Mean over views of the per-sample-mean weighted BCE: the reference's loss over all views."""
    return sum(criterion(view_logits, targets) for view_logits in logits) / len(logits)


def build_steps(case: StepCase) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The three step functions of ``case`` and facts about them (pixel ratio of (b) to (a)).

    The first call of each step is a warm-up: it compiles (with ``compile``) and runs the
    CAMHook's one-time GAP-FC check.
    """
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    initial = build_model(case.arch, case.labels).to(device=device, memory_format=memory_format)
    images = torch.randn(case.batch, 3, case.size, case.size, generator=generator).to(device)
    images = images.contiguous(memory_format=memory_format)
    targets = (torch.rand(case.batch, case.labels, generator=generator) < 0.3).float().to(device)
    criterion = WeightedBCEWithLogitsLoss(positive_ratio(targets.cpu())).to(device)
    transforms = build_transforms(case.transforms, case.scale_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16")

    def trainable() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(initial).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        return (torch.compile(model, dynamic=False) if case.compile else model), optimizer

    def update(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        loss.backward()
        optimizer.step()

    model_a, optimizer_a = trainable()
    model_b, optimizer_b = trainable()
    model_c, optimizer_c = trainable()
    cam = CAMHook(model_c)

    def plain() -> None:
        optimizer_a.zero_grad(set_to_none=True)
        with autocast:
            loss = criterion(model_a(images), targets)
        update(optimizer_a, loss)

    def multiview() -> None:
        optimizer_b.zero_grad(set_to_none=True)
        with autocast:
            batches = multiview_batches(images, transforms, case.mode)
            logits = [view for batch in batches for view in model_b(batch).split(case.batch)]
            loss = classification_loss(criterion, logits, targets)
        update(optimizer_b, loss)

    def consistency_step(model: nn.Module, recorder: CAMHook, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        loss_fn = AttentionConsistencyLoss()  # one per variant: their step counts stay apart

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                out = loss_fn.views(model, recorder, images, transforms, mode=case.mode)
                loss = classification_loss(criterion, out.logits, targets) + out.loss
            update(optimizer, loss)

        return step

    steps = {"a_plain": plain, "b_multiview": multiview, "c_consistency": consistency_step(model_c, cam, optimizer_c)}
    if case.stages:
        model_d, optimizer_d = trainable()
        heads = MultiScaleHeads(model_d, case.stages).to(device=device, memory_format=memory_format)
        optimizer_d.add_param_group({"params": list(heads.parameters())})  # the optimizer's settings
        multiscale_loss = AttentionConsistencyLoss()

        def multiscale() -> None:
            optimizer_d.zero_grad(set_to_none=True)
            with autocast:
                out = multiscale_loss.views(
                    model_d, heads, images, transforms, mode=case.mode, targets=targets, criterion=criterion
                )
            update(optimizer_d, out.total)

        steps[MULTISCALE] = multiscale
    if case.gradcam:
        model_e, optimizer_e = trainable()
        # detached: the weights alpha are constants, as Eq. 1's detached W; create_graph: alpha in the graph
        gradcam = CAMHook(model_e, method="gradcam", detach_classifier=case.gradcam == "detached")
        steps[GRADCAM] = consistency_step(model_e, gradcam, optimizer_e)

    views = multiview_batches(images, transforms, case.mode)
    facts = {
        "views": len(_views(transforms, case.mode)),
        "forwards": len(views),
        "view_batch_shapes": [list(v.shape) for v in views],
        "pixel_ratio": sum(v.numel() for v in views) / images.numel(),
    }
    return steps, facts
