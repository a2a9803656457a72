"""examples/lightning_module.py: attention consistency in a LightningModule's training_step, on CPU
with fast_dev_run, and under Lightning's DDP strategy in two processes."""

import copy
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
import lightning as L

from attn_consistency import positive_ratio
from examples.lightning_module import AttentionConsistencyModule
from examples.models import SmallResNet
from examples.synthetic import SyntheticShapes
from examples.train import RECOMMENDED

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning 2.6's own _pytree builds torch's LeafSpec, which the torch installed here deprecates: not ours
    pytest.mark.filterwarnings(
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning:lightning\.pytorch\.utilities\._pytree"
    ),
]


def loaders(size: int = 64, batch: int = 4) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    train_set, test_set = SyntheticShapes(8, size, 4, split="train"), SyntheticShapes(8, size, 4, split="test")
    return (
        torch.utils.data.DataLoader(train_set, batch_size=batch),  # no shuffle: the first batch is known
        torch.utils.data.DataLoader(test_set, batch_size=batch),
    )


def fast_dev_run(module: AttentionConsistencyModule, steps: int) -> L.Trainer:
    trainer = L.Trainer(
        fast_dev_run=steps, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, *loaders())
    return trainer


def test_fast_dev_run_logs_every_term_and_trains_the_weights() -> None:
    torch.manual_seed(0)
    train_loader, _ = loaders()
    module = AttentionConsistencyModule(
        SmallResNet(4), positive_ratio(train_loader.dataset.targets), scale_factor=56 / 64, lr=0.1
    )
    before = copy.deepcopy(module.model.state_dict())
    trainer = fast_dev_run(module, 2)
    logged = trainer.callback_metrics
    # the authors' four views: (original, flip) at 64 px (8x8 maps) and 56 px (7x7), and the scale term
    for name in ("loss", "cls_loss", "ac_loss", "term/flip@64", "term/flip@56", "term/scale", "ac_multiplier"):
        assert f"train/{name}" in logged or f"train/{name}_step" in logged, name
    assert {"val/cls_loss", "val/mAP"} <= set(logged)
    assert all(float(logged[f"train/term/{name}_step"]) > 0 for name in ("flip@64", "flip@56", "scale"))
    # two steps are too few for the recommended warm-up to start: the terms are logged, not yet added
    assert float(logged["train/ac_multiplier"]) == 0.0 and float(logged["train/ac_loss_step"]) == 0.0
    assert float(logged["train/loss_step"]) == pytest.approx(float(logged["train/cls_loss_step"]))
    moved = [
        name
        for name, value in module.model.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, before[name])
    ]
    assert "layers.0.conv1.weight" in moved and "fc.weight" in moved
    assert module.cam is None  # the hook was removed when the fit ended
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.model.modules())
    assert module.consistency.steps == 2 and module.consistency.schedule.trigger == RECOMMENDED["warmup_trigger"]


def test_the_logged_flip_term_equals_the_paper_term_computed_independently() -> None:
    torch.manual_seed(0)
    train_loader, _ = loaders()
    module = AttentionConsistencyModule(
        SmallResNet(4),
        positive_ratio(train_loader.dataset.targets),
        ("flip",),
        distance="mse",
        warmup=0,
        warmup_trigger=0,
    )
    oracle = copy.deepcopy(module.model).train()
    images, targets = next(iter(train_loader))
    # Eq. 1 and Eq. 5 without the library: features through a forward hook, the FC weight, one
    # forward of the original and flipped batch together (as the reference, so BatchNorm sees both)
    features = []
    oracle.layers.register_forward_hook(lambda m, i, o: features.append(o))
    with torch.no_grad():
        logits = oracle(torch.cat([images, images.flip(-1)]))
        heatmaps = torch.einsum("lc,nchw->nlhw", oracle.fc.weight, features[0])
    flip_term = F.mse_loss(heatmaps[:4], heatmaps[4:].flip(-1))
    criterion = module.criterion
    classification = (criterion(logits[:4], targets) + criterion(logits[4:], targets)) / 2
    trainer = fast_dev_run(module, 1)
    logged = trainer.callback_metrics
    assert float(logged["train/term/flip_step"]) == pytest.approx(float(flip_term), rel=1e-4)
    assert float(logged["train/cls_loss_step"]) == pytest.approx(float(classification), rel=1e-4)
    assert float(logged["train/loss_step"]) == pytest.approx(float(classification + flip_term), rel=1e-4)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"warmup must be a fraction"):
        AttentionConsistencyModule(SmallResNet(4), torch.full((4,), 0.5), warmup=2)
    with pytest.raises(ValueError, match=r"warmup_trigger must be in \[0, 1\)"):
        AttentionConsistencyModule(SmallResNet(4), torch.full((4,), 0.5), warmup_trigger=1.5)
    with pytest.raises(ValueError, match="shear"):
        AttentionConsistencyModule(SmallResNet(4), torch.full((4,), 0.5), ("shear",))


RANK_SCRIPT = """
import sys
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from examples.lightning_module import main
trainer = main({argv!r})
params = {{name: p.detach() for name, p in trainer.lightning_module.model.named_parameters()}}
torch.save({{"world_size": trainer.world_size, "params": params}}, {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


def test_ddp_strategy_in_two_processes_keeps_the_replicas_equal(tmp_path: Path) -> None:
    argv = ["--epochs", "1", "--devices", "2", "--strategy", "ddp", "--train-images", "16", "--test-images", "8",
            "--batch-size", "4", "--image-size", "32", "--lr", "0.1", "--out", str(tmp_path)]  # fmt: skip
    script = tmp_path / "fit.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), argv=argv, out=str(tmp_path)))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["params"].items():  # the gradients were averaged: one model
        assert torch.allclose(value, ranks[1]["params"][name], atol=1e-6), name
    torch.manual_seed(0)  # the seed main gives both replicas: the weights moved from it
    assert not torch.equal(ranks[0]["params"]["fc.weight"], SmallResNet(6).fc.weight)
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    steps = [row for row in rows if row.get("train/term/flip_step")]
    assert len(steps) == 2  # 16 images, 2 replicas, batch 4: 2 steps
    assert all(float(row["train/term/scale_step"]) > 0 for row in steps)
    assert any(row.get("val/mAP") for row in rows)


def test_readme_lightning_snippet_trains_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from test_readme import run

    monkeypatch.chdir(tmp_path)  # where Lightning would write anything
    namespace = run("setup")
    before = namespace["model"].fc.weight.detach().clone()
    run("lightning", namespace=namespace)
    logged = namespace["trainer"].callback_metrics
    assert {"train/term/flip@224", "train/term/flip@192", "train/term/scale"} <= set(logged)
    assert namespace["trainer"].global_step == 2
    assert not torch.equal(namespace["model"].fc.weight, before)
