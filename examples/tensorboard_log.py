"""TensorBoard logging of a run of :mod:`examples.train` (``--tensorboard DIR``, extra ``[tensorboard]``).

What a run writes to ``DIR``, so that a user watches the attention change while training::

    python -m examples.train --preset synthetic-acfs --tensorboard runs/tb/acfs --out runs/acfs
    tensorboard --logdir runs/tb

* ``train/loss``, ``train/cls_loss``, ``train/ac_loss``, ``train/ac_multiplier`` (the warm-up's
  factor) and ``train/term/NAME`` (each consistency term, unweighted) at every step. The x axis is
  the global step, ``epoch * steps_per_epoch + step``. Under DDP they are the main process's own
  batch (the other replicas' terms are averaged into the epoch's values only).
* ``epoch/KEY`` for every number of the epoch's row of ``metrics.json`` (the averaged losses and
  terms, the learning rate, every test metric), at the global step of the epoch's last step.
* ``figure5/K-LABEL``: the paper's Figure 5 for test image K, each epoch: the heatmap of LABEL
  (the image's first present label) on the original, flipped and scaled view (one row per heatmap
  source: the model's CAM, then each side head's stage), scaled to [0, 1] over the three views as
  :func:`examples.figure5.figure5` does. The images are the same every epoch, spread over the test set.

A resumed run writes a new event file beside the old ones and drops (TensorBoard's ``purge_step``)
what the interrupted epoch had logged, so that no step appears twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_consistency import CAMHook
from attn_consistency.models import MultiScaleHeads
from examples.figure5 import normalise_together, views_and_maps

__all__ = ["TensorBoardLog", "figure5_grid", "for_run", "overlay", "pick_images"]

_FLUSH_EVERY = 50
"""Steps whose scalars wait on the device: one transfer for many, not a synchronisation per step."""


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch's writer needs the tensorboard package
        raise ImportError(
            f"--tensorboard needs the tensorboard package ({error}): pip install -e '.[tensorboard]'"
        ) from None
    return SummaryWriter


def overlay(image: Tensor, heat: Tensor, alpha: float = 0.5) -> Tensor:
    """``image`` (3, H, W) in [0, 1] with ``heat`` (H, W) in [0, 1] drawn over it in matplotlib's
    ``jet`` colours, as :func:`examples.figure5.figure5` does; returns (3, H, W) in [0, 1]."""
    from matplotlib import colormaps

    colours = torch.as_tensor(colormaps["jet"](heat.clamp(0, 1).cpu().numpy())[..., :3], dtype=torch.float32)
    return (1 - alpha) * image.clamp(0, 1).cpu() + alpha * colours.permute(2, 0, 1)


def figure5_grid(
    per_source: Sequence[list[tuple[Tensor, Tensor]]], k: int, denormalize: Callable[[Tensor], Tensor]
) -> Tensor:
    """One picture (3, rows * H, 3 * W) of image ``k``: a row per heatmap source, a column per view.

    Args:
        per_source: what :func:`examples.figure5.views_and_maps` returned, one entry per source.
        k: the image of the batch.
        denormalize: maps a normalised image back to [0, 1] RGB.

    Returns:
        The overlays, the smaller scaled view centred on a black cell of the original's size.
    """
    rows = []
    for per_view in per_source:
        height, width = per_view[0][0].shape[-2:]
        cells = []
        for (view, _), heat in zip(per_view, normalise_together([heat[k] for _, heat in per_view])):
            cell = overlay(denormalize(view[k].float().cpu()), heat)
            top, left = (height - cell.shape[-2]) // 2, (width - cell.shape[-1]) // 2
            cells.append(F.pad(cell, (left, width - cell.shape[-1] - left, top, height - cell.shape[-2] - top)))
        rows.append(torch.cat(cells, dim=-1))
    return torch.cat(rows, dim=-2)


def pick_images(targets: Tensor, count: int) -> list[tuple[int, int]]:
    """``count`` test images spread evenly over the test set, each with the label to draw.

    Args:
        targets: the test set's labels ``(N, L)`` (1 for present; WIDER's -1/0 count as absent).
        count: how many images (fewer when the test set is smaller).

    Returns:
        ``(index, label)`` pairs: the image's first present label, label 0 for an image with none.
    """
    size = targets.shape[0]
    indices = torch.linspace(0, size - 1, min(count, size)).round().long().unique().tolist() if count else []
    picked = []
    for index in indices:
        present = (targets[index] == 1).nonzero()
        picked.append((index, int(present[0, 0]) if len(present) else 0))
    return picked


def _stack_by_device(rows: list[Tensor]) -> list[Tensor]:
    """The rows as they were, moved to the host in one transfer per device and length."""
    if len({(row.device, row.shape) for row in rows}) == 1:
        return list(torch.stack(rows).cpu())
    return [row.cpu() for row in rows]


class TensorBoardLog:
    """The TensorBoard event files of one training run (see the module's docstring for the tags).

    Args:
        log_dir: the folder of the event files (created).
        steps_per_epoch: the run's steps per epoch, for the global step.
        start_epoch: the first epoch this process trains (0, or the resumed epoch).
        images: the test images of the Figure-5 pictures ``(K, 3, H, W)``, normalised.
        indices: their indices in the test set (for the tags).
        labels: the label drawn for each image.
        label_names: the dataset's label names (for the tags), or empty.
        scale_factor: the scaled view's size over the original's.
        denormalize: maps the normalised images back to [0, 1] RGB.

    Raises:
        ImportError: the tensorboard package is not installed (the message says how to install it).
    """

    def __init__(
        self,
        log_dir: str | Path,
        steps_per_epoch: int,
        start_epoch: int,
        images: Tensor,
        indices: Sequence[int],
        labels: Sequence[int],
        label_names: Sequence[str],
        scale_factor: float,
        denormalize: Callable[[Tensor], Tensor],
    ) -> None:
        writer = _summary_writer()
        self.steps_per_epoch = steps_per_epoch
        self.writer = writer(str(log_dir), purge_step=start_epoch * steps_per_epoch if start_epoch else None)
        if not len(images) == len(indices) == len(labels):
            raise ValueError(
                f"images, indices and labels must have one entry per image, got {len(images)}, {len(indices)}, {len(labels)}"
            )
        self.images, self.indices, self.labels = images, list(indices), list(labels)
        self.label_names = list(label_names)
        self.scale_factor, self.denormalize = scale_factor, denormalize
        self._pending: list[tuple[int, list[str], Tensor, dict[str, float]]] = []

    def step(self, epoch: int, step: int, values: dict[str, Tensor | float]) -> None:
        """Log one step's scalars (``train/NAME``): tensors (on any one device) stay there until
        the next flush, plain numbers are kept as they are."""
        names = [name for name, value in values.items() if isinstance(value, Tensor)]
        numbers = {name: float(value) for name, value in values.items() if not isinstance(value, Tensor)}
        stacked = (
            torch.stack([values[name].detach().float().reshape(()) for name in names]) if names else torch.zeros(0)
        )  # type: ignore[union-attr]
        self._pending.append((epoch * self.steps_per_epoch + step, names, stacked, numbers))
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if not self._pending:
            return
        on_host = [values.cpu().tolist() for values in _stack_by_device([values for _, _, values, _ in self._pending])]
        for (global_step, names, _, numbers), row in zip(self._pending, on_host):
            for name, value in [*zip(names, row), *numbers.items()]:
                self.writer.add_scalar(f"train/{name}", value, global_step)
        self._pending.clear()

    def epoch(
        self, epoch: int, row: dict[str, Any], model: nn.Module, cam: CAMHook, heads: MultiScaleHeads | None = None
    ) -> None:
        """Log the epoch's row (``epoch/KEY``) and the Figure-5 pictures of the fixed test images.

        Args:
            epoch: the epoch just trained (from 0).
            row: the epoch's metrics; its numbers are logged, other values skipped.
            model: the classifier, in ``eval()`` mode, on the images' device or not.
            cam: the run's live CAMHook on ``model``.
            heads: the run's side heads, if any.
        """
        self._flush_steps()
        global_step = (epoch + 1) * self.steps_per_epoch - 1
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, global_step)
        if len(self.images):
            device = next(model.parameters()).device
            for label in sorted(set(self.labels)):  # one label per forward: the images that show it
                chosen = [k for k, picked in enumerate(self.labels) if picked == label]
                sources = views_and_maps(model, self.images[chosen].to(device), label, self.scale_factor, heads, cam)
                name = self.label_names[label] if label < len(self.label_names) else str(label)
                for position, k in enumerate(chosen):
                    grid = figure5_grid(list(sources.values()), position, self.denormalize)
                    self.writer.add_image(f"figure5/{self.indices[k]}-{name}", grid, global_step)
        self.writer.flush()

    def close(self) -> None:
        """Write what is pending and close the event file."""
        self._flush_steps()
        self.writer.close()


def for_run(
    config: Any, test_set: Any, steps_per_epoch: int, start_epoch: int, label_names: Sequence[str]
) -> TensorBoardLog:
    """The log of a run of :func:`examples.train.train` with ``config.tensorboard`` set.

    Args:
        config: the run's :class:`~examples.train.TrainConfig`.
        test_set: its test split, with ``targets``; ``config.tensorboard_images`` of its images
            (:func:`pick_images`) get a Figure-5 picture each epoch.
        steps_per_epoch: the run's steps per epoch.
        start_epoch: the first epoch trained now (a resumed run's next epoch).
        label_names: the dataset's label names.

    Returns:
        The log, its event files in ``config.tensorboard``.
    """
    from examples.figure5 import denormalizer
    from examples.train import scale_factor

    picked = pick_images(test_set.targets, config.tensorboard_images)
    images = torch.stack([test_set[index][0] for index, _ in picked]) if picked else torch.zeros(0, 3, 1, 1)
    return TensorBoardLog(
        config.tensorboard,
        steps_per_epoch,
        start_epoch,
        images,
        [index for index, _ in picked],
        [label for _, label in picked],
        label_names,
        scale_factor(config),
        denormalizer(test_set),
    )
