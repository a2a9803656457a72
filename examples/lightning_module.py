"""Attention consistency in a PyTorch Lightning ``LightningModule`` (extra ``[lightning]``).

The loss goes where Lightning users put a loss: in ``training_step``. The module wraps any GAP-FC
multi-label classifier, attaches a :class:`~attn_consistency.CAMHook` when fitting starts, runs the
views of :meth:`~attn_consistency.AttentionConsistencyLoss.views` and logs the total, the
classification loss, the consistency loss, each term unweighted and the schedule's multiplier.
It works under Lightning's DDP strategy: Lightning wraps the module in DistributedDataParallel, the
views' forwards run inside its ``training_step``, so the gradients are averaged as usual, and the
warm-up's trigger averages the classification loss over the replicas. On the synthetic dataset::

    python -m examples.lightning_module --epochs 2                                  # one CPU process
    python -m examples.lightning_module --epochs 2 --devices 2 --strategy ddp       # two, gloo on CPU

In your own script (``model`` any GAP-FC classifier, ``train_targets`` the training labels)::

    module = AttentionConsistencyModule(model, positive_ratio(train_targets), transforms=("flip", "scale"),
                                        scale_factor=192 / 224)
    lightning.Trainer(max_epochs=12, strategy="ddp").fit(module, train_loader, val_loader)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    Ramp,
    Transform,
    WeightedBCEWithLogitsLoss,
    get_transform,
    positive_ratio,
)
from attn_consistency.metrics import mean_average_precision
from examples.presets import RECOMMENDED

__all__ = ["AttentionConsistencyModule", "main"]


class AttentionConsistencyModule(L.LightningModule):
    """A multi-label classifier trained with the classification loss plus attention consistency.

    The defaults are the strength this library recommends for a model and data other than the
    paper's (``examples.presets.RECOMMENDED``: the relative distance, a warm-up triggered by the
    classification loss); ``distance="mse", warmup=0, warmup_trigger=0`` is the paper's loss.

    Args:
        model: a classifier whose head :class:`~attn_consistency.CAMHook` supports (GAP-FC and the
            heads of its docs); its logits are ``(N, L)``.
        positive_ratio: each label's positive ratio in the training set ``(L,)``
            (:func:`~attn_consistency.positive_ratio`), for the paper's weighted BCE (Eq. 2-3).
        transforms: transform names or instances; ``"scale"`` by name uses ``scale_factor``.
        mode: ``"product"`` (the authors' four views for flip + scale) or ``"independent"``;
            ``None``: product for exactly flip and scale, else independent.
        scale_factor: the scaled view's size over the original's (the paper: 192 / 224).
        weights: a weight per transform name (default 1 each).
        distance: ``"relative"`` or ``"mse"`` (paper Eq. 5).
        warmup: the fraction of the fit's optimizer steps over which the weights ramp up to 1
            (0: none).
        warmup_trigger: > 0: the ramp starts once the classification loss has fallen below this
            fraction of its first steps' mean (0: at the first step).
        lr: SGD learning rate (momentum 0.9, weight decay ``weight_decay``, as the paper).
        weight_decay: SGD weight decay.
        lr_step: epochs between two decays of the learning rate by ``lr_gamma``.
        lr_gamma: the factor of each decay.

    Raises:
        ValueError: a transform the registry does not know, or a setting out of range (from
            :class:`~attn_consistency.AttentionConsistencyLoss` and :class:`~attn_consistency.Ramp`).
    """

    def __init__(
        self,
        model: nn.Module,
        positive_ratio: Tensor,
        transforms: Sequence[str | Transform] = ("flip", "scale"),
        *,
        mode: str | None = None,
        scale_factor: float = 192 / 224,
        weights: dict[str, float] | None = None,
        distance: str = RECOMMENDED["distance"],
        warmup: float = RECOMMENDED["warmup"],
        warmup_trigger: float = RECOMMENDED["warmup_trigger"],
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        lr_step: int = 3,
        lr_gamma: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 <= warmup <= 1:
            raise ValueError(f"warmup must be a fraction of the fit's steps in [0, 1], got {warmup!r}")
        if not 0 <= warmup_trigger < 1:
            raise ValueError(f"warmup_trigger must be in [0, 1) (0: off), got {warmup_trigger!r}")
        self.save_hyperparameters(ignore=["model", "positive_ratio"])
        self.model = model
        self.criterion = WeightedBCEWithLogitsLoss(positive_ratio)
        built = [get_transform(t, factor=scale_factor) if t == "scale" else t for t in transforms]
        self.transforms = [get_transform(t) if isinstance(t, str) else t for t in built]
        names = [t.name for t in self.transforms]
        self.mode = mode or ("product" if sorted(names) == ["flip", "scale"] else "independent")
        # the schedule needs the fit's length: it is built when fitting starts
        self.consistency = AttentionConsistencyLoss(weights=weights, distance=distance)
        self.cam: CAMHook | None = None
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []

    def forward(self, images: Tensor) -> Tensor:
        """The model's logits ``(N, L)``."""
        return self.model(images)

    def on_fit_start(self) -> None:
        """Attach the CAM hook (in each DDP process) and build the warm-up over the fit's steps."""
        self.cam = CAMHook(self.model)
        warmup, trigger = self.hparams["warmup"], self.hparams["warmup_trigger"]
        if (warmup or trigger) and self.consistency.schedule is None:
            steps = int(self.trainer.estimated_stepping_batches)
            self.consistency.schedule = Ramp(round(warmup * steps), trigger=trigger or None)

    def on_fit_end(self) -> None:
        """Remove the hook: the model is left as it was given."""
        if self.cam is not None:
            self.cam.remove()
            self.cam = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The classification loss over the views plus the consistency terms, every term logged."""
        images, targets = batch
        if self.cam is None:
            raise RuntimeError("training_step runs inside Trainer.fit, which attaches the CAM hook")
        multiplier = self.consistency.multiplier  # this step's: views() moves the schedule on
        out = self.consistency.views(
            self.model, self.cam, images, self.transforms, mode=self.mode, targets=targets, criterion=self.criterion
        )
        assert out.classification is not None  # targets and criterion were given
        logged = {"train/loss": out.total, "train/cls_loss": out.classification, "train/ac_loss": out.loss}
        logged |= {f"train/term/{name}": term for name, term in out.terms.items()}
        # every replica logs the same names; Lightning averages them over the replicas
        self.log_dict(
            {k: v.detach() for k, v in logged.items()},
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(images),
        )
        self.log("train/ac_multiplier", multiplier, on_step=True, on_epoch=False, batch_size=len(images))
        return out.total

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """The classification loss of the original view; scores kept for the epoch's mAP."""
        images, targets = batch
        if self.cam is not None:
            with self.cam.paused():
                logits = self.model(images)
        else:  # Trainer.validate without a fit: no hook attached
            logits = self.model(images)
        self.log("val/cls_loss", self.criterion(logits, targets), on_epoch=True, sync_dist=True, batch_size=len(images))
        self._scores.append(logits.detach())
        self._targets.append(targets.detach())

    def on_validation_epoch_end(self) -> None:
        """Log the mAP (paper's metric) of the whole validation set, gathered over replicas."""
        if not self._scores:
            return
        scores, targets = torch.cat(self._scores), torch.cat(self._targets)
        self._scores.clear()
        self._targets.clear()
        if self.trainer.world_size > 1:
            scores, targets = (self.all_gather(x).flatten(0, 1) for x in (scores, targets))
        self.log("val/mAP", mean_average_precision(scores.float().cpu(), targets.cpu()), rank_zero_only=True)

    def configure_optimizers(self) -> Any:
        """SGD with momentum 0.9 and a step decay per epoch, the paper's optimiser."""
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams["lr"], momentum=0.9, weight_decay=self.hparams["weight_decay"]
        )
        decay = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams["lr_step"], self.hparams["lr_gamma"])
        return {"optimizer": optimizer, "lr_scheduler": decay}


def main(argv: Sequence[str] | None = None) -> L.Trainer:
    """Fit the module on the synthetic dataset (the CPU demo's small net) and return the trainer."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from examples.models import SmallResNet
    from examples.synthetic import SyntheticShapes
    from examples.validation import count_type

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=count_type(1), default=2)
    parser.add_argument("--devices", type=count_type(1), default=1, help="processes (CPU) or GPUs")
    parser.add_argument("--strategy", default="auto", help="a Lightning strategy: auto, ddp, ...")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--train-images", type=count_type(1), default=500)
    parser.add_argument("--test-images", type=count_type(1), default=200)
    parser.add_argument("--image-size", type=count_type(32), default=64)
    parser.add_argument("--batch-size", type=count_type(1), default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: none)")
    parser.add_argument("--seed", type=count_type(0), default=0)
    parser.add_argument(
        "--out",
        default="runs/lightning",
        help="Lightning's logs (OUT/lightning_logs/version_N/metrics.csv) and checkpoints",
    )
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)  # every replica starts from the same weights
    train_set = SyntheticShapes(args.train_images, args.image_size, 6, split="train")
    test_set = SyntheticShapes(args.test_images, args.image_size, 6, split="test")
    module = AttentionConsistencyModule(
        SmallResNet(6),
        positive_ratio(train_set.targets),
        scale_factor=(args.image_size * 7 // 8) / args.image_size,
        lr=args.lr,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        devices=args.devices,
        strategy=args.strategy,
        accelerator=args.accelerator,
        default_root_dir=args.out,
        enable_progress_bar=False,
        log_every_n_steps=1,
        logger=CSVLogger(args.out),
    )
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True),
        DataLoader(test_set, batch_size=64),
    )
    return trainer


if __name__ == "__main__":
    main()
