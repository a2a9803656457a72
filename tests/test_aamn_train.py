"""AAMN in the training script: the VOC / VG-500 / COCO presets end to end at tiny size, the memory
in the checkpoint, resume, and the aamn_<backbone> archs of build_model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from fixtures import VOC_NAMES, write_vg500, write_voc
from test_train import TINY, as_argv, resume_config, write_coco_root
from torch import nn

from attn_consistency import AAMN
from examples.models import SmallResNet, build_model, check_arch
from examples.train import PRESETS, TrainConfig, load_checkpoint, main, train

pytestmark = pytest.mark.usefixtures("one_thread")

# every dataset and both variants (ResNet-101 at 1/16 width: the slim_resnets fixture of conftest.py)
AAMN_PRESETS = ["voc-r101-aamn", "voc-r101-aamn-acfs", "vg500-r101-aamn", "coco-r101-aamn-acfs"]


def _voc_labels(offset: int) -> dict[str, dict[str, int]]:
    """Four images; class j is present in image j % 4, difficult in image (j + 1) % 4, absent elsewhere."""
    labels = {}
    for k in range(4):
        values = {name: 1 for j, name in enumerate(VOC_NAMES) if j % 4 == k}
        values |= {name: 0 for j, name in enumerate(VOC_NAMES) if (j + 1) % 4 == k}
        labels[f"{offset + k:06d}"] = values
    return labels


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    voc = tmp_path_factory.mktemp("voc")
    write_voc(voc, _voc_labels(0), "trainval")
    write_voc(voc, _voc_labels(10), "test")
    vg = tmp_path_factory.mktemp("vg500")
    write_vg500(
        vg,
        {
            "train": {f"{k}.jpg": [k, 100 + k, 499] for k in range(4)},
            "test": {f"{10 + k}.jpg": [k, 499] for k in range(4)},
        },
    )
    return {"voc": voc, "vg500": vg, "coco": write_coco_root(tmp_path_factory.mktemp("coco"))}


def test_presets_follow_the_multilabel_protocol():
    for dataset in ("coco", "voc", "vg500"):
        baseline = PRESETS["coco-r101-448" if dataset == "coco" else f"{dataset}-r101"]
        assert (baseline["arch"], baseline["image_size"], baseline["dataset"]) == ("resnet101", 448, dataset)
        assert PRESETS[f"{dataset}-r101-aamn"] == baseline | {"arch": "aamn_resnet101"}
        acfs = PRESETS[f"{dataset}-r101-aamn-acfs"]
        assert acfs == baseline | {
            "arch": "aamn_resnet101",
            "transforms": ("flip", "scale"),
            "weights": {"flip": 0.6, "scale": 0.8},
        }
        assert baseline["ignore_unspecified"] == (dataset == "voc")  # VOC's difficult objects: out of the loss


def _sgd_steps(start, features, targets, lr, weight_decay, reduce):
    weight = start.clone().requires_grad_()
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(3):
        loss = reduce(nn.functional.binary_cross_entropy_with_logits(features @ weight.T, targets, reduction="none"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach()


def test_preset_sgd_steps_equal_ml_gcns_on_its_label_averaged_loss():
    """ML-GCN: SGD lr 0.01 (pretrained layers), weight decay 1e-4, momentum 0.9 on a loss averaged
    over the L labels. The presets' summed loss must take the very same steps, weight decay included."""
    for dataset, labels in (("coco", 80), ("voc", 20), ("vg500", 500)):
        config = TrainConfig(**PRESETS["coco-r101-448" if dataset == "coco" else f"{dataset}-r101"])
        assert config.optimizer == "sgd" and config.momentum == 0.9
        generator = torch.Generator().manual_seed(labels)
        start = torch.randn(labels, 6, generator=generator, dtype=torch.float64)
        features = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        targets = (torch.rand(4, labels, generator=generator) < 0.3).double()
        data = (start, features, targets)
        ours = _sgd_steps(
            *data, config.lr, config.weight_decay, lambda loss: loss.sum(1).mean()
        )  # summed over labels (Eq. 2-3)
        ml_gcn = _sgd_steps(*data, 0.01, 1e-4, lambda loss: loss.mean())  # MultiLabelSoftMarginLoss: averaged
        torch.testing.assert_close(ours, ml_gcn, rtol=1e-9, atol=1e-12, msg=dataset)


@pytest.fixture
def r101_weights(tmp_path: Path) -> Iterator[Path]:
    """A local ResNet-101 state dict as torchvision distributes it (random weights: no download)."""
    path = tmp_path / "weights" / "resnet101-63fe2227.pth"
    path.parent.mkdir()
    torch.save(torchvision.models.resnet101().state_dict(), path)
    yield path
    path.unlink()  # 170 MB


@pytest.mark.parametrize("preset", AAMN_PRESETS)
@pytest.mark.usefixtures("slim_resnets")  # ResNet-101's blocks and 2048 features at 1/16 width: 25 MB, not 400
def test_aamn_preset_runs_end_to_end_at_tiny_size(preset: str, roots, tmp_path: Path) -> None:
    settings = PRESETS[preset]
    dataset = settings["dataset"]
    # 64 px (2x2 maps): at 32 px a random ResNet-101's 1x1 maps with BatchNorm over 4 values went NaN in
    # one step at lr 0.01, the baseline's as well as AAMN's
    tiny = dict(TINY, image_size=64, scale_size=56, out=str(tmp_path))
    r101_weights = tmp_path / "weights" / "resnet101-63fe2227.pth"
    if preset == "voc-r101-aamn":  # a ResNet-101 state dict in torchvision's format, at the slim width
        r101_weights.parent.mkdir()
        torch.save(torchvision.models.get_model("resnet101", weights=None).state_dict(), r101_weights)
        tiny["pretrained"] = str(r101_weights)
    argv = ["--preset", preset, "--data-root", str(roots[dataset]), "--device", "cpu"] + as_argv(tiny)
    (row,) = main(argv)
    assert all(isinstance(v, (int, float)) for v in row.values())
    assert math.isfinite(row["mAP"]) and row["cls_loss"] > 0
    if dataset == "voc":
        assert {f"AP-{name}" for name in VOC_NAMES} <= set(row)
        assert all(0 <= row[f"AP-{name}"] <= 1 for name in VOC_NAMES)
    if dataset == "coco":
        assert {"P-C@3", "R-C@3", "F1-C@3", "P-O@3", "R-O@3", "F1-O@3"} <= set(row)
    assert ("term-scale" in row) == preset.endswith("-acfs")
    state = load_checkpoint(tmp_path / "last.pt")
    model = state["model"]
    assert model["head.fc.weight"].shape[1] == 2048 and "trunk.layer4.2.conv3.weight" in model
    # the memory is in the checkpoint and was filled by the step's labels (batch of 4: all training images)
    labels = {"voc": 20, "vg500": 500, "coco": 4}[dataset]
    assert model["head.memory.slots"].shape == (labels, 2048)
    filled = model["head.memory.updates"] > 0
    assert filled.any() and not filled.all() if dataset == "vg500" else filled.all()
    assert torch.equal(filled, model["head.memory.slots"].abs().sum(1) > 0)
    if preset == "voc-r101-aamn":
        assert json.loads(state["config"])["pretrained"] == str(r101_weights) and state["pretrained_sha256"]
        r101_weights.unlink()
    (tmp_path / "last.pt").unlink()  # checked: nothing reads it again


def test_build_model_aamn_resnet101_takes_the_torchvision_file(r101_weights: Path) -> None:
    model = build_model("aamn_resnet101", 20, str(r101_weights))
    source = torch.load(r101_weights, weights_only=True)
    state = model.state_dict()
    assert {f"trunk.{k}" for k in source if not k.startswith("fc.")} == {k for k in state if k.startswith("trunk.")}
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"trunk.{key}"], value), key


def test_build_model_aamn_loads_the_backbone_from_a_checkpoint_of_it(tmp_path: Path) -> None:
    backbone = SmallResNet(4)
    torch.save({"model": backbone.state_dict()}, tmp_path / "small.pt")
    model = build_model("aamn_small_resnet", 6, str(tmp_path / "small.pt"))
    assert isinstance(model, AAMN) and model.head.fc.out_features == 6
    for key, value in backbone.state_dict().items():
        if not key.startswith(("fc.", "avgpool")):
            assert torch.equal(model.state_dict()[f"trunk.{key}"], value), key
    assert check_arch("aamn_resnet50") == "aamn_resnet50"
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        check_arch("aamn_resnet7")
    with pytest.raises(ValueError, match="DenseNet has no average-pooling child module"):
        build_model("aamn_densenet121", 3)
    # more than one linear layer after the pooling (an MLP head): its input is not the feature map's width
    for arch, name in (("aamn_mobilenet_v3_small", "MobileNetV3"), ("aamn_vgg11", "VGG")):
        with pytest.raises(ValueError, match=f"{name}'s layers after its pooling are not one linear classifier"):
            build_model(arch, 3)


def _resume_config(out: Path, epochs: int) -> TrainConfig:
    return resume_config(out, epochs, arch="aamn_small_resnet")


def test_resumed_aamn_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = train(_resume_config(tmp_path / "straight", 2), device="cpu")
    train(_resume_config(tmp_path / "resumed", 1), device="cpu", resume=True)
    resumed = train(_resume_config(tmp_path / "resumed", 2), device="cpu", resume=True)
    assert resumed == straight
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["head.memory.updates"].min()) >= 2  # both epochs updated every slot


def test_step_benchmark_writes_every_variant_and_paired_ratios(tmp_path: Path) -> None:
    from benchmarks.aamn_step import RATIOS, VARIANTS
    from benchmarks.aamn_step import main as benchmark

    (result,) = benchmark(
        ["--cases", "small_resnet:32:24:4:4", "--rounds", "3", "--warmup", "1", "--output", str(tmp_path / "step")]
    )
    written = json.loads((tmp_path / "step.json").read_text())["results"]
    assert written == [result] and set(result["variants"]) == set(VARIANTS)
    for a, b in RATIOS:
        rounds = [x / y for x, y in zip(result["variants"][a]["times_s"], result["variants"][b]["times_s"])]
        assert result["ratios"][f"{a}/{b}"]["median"] == pytest.approx(sorted(rounds)[1])
    assert (tmp_path / "step.md").read_text().startswith("| case |")


def test_readme_aamn_snippet_trains_and_fills_the_memory() -> None:
    from test_readme import snippets

    namespace: dict = {}
    exec(compile(snippets()["aamn"], "README:aamn", "exec"), namespace)
    model, targets = namespace["model"], namespace["targets"]
    assert bool(namespace["loss"].isfinite()) and set(namespace["out"].terms) == {"flip@112", "flip@96", "scale"}
    assert torch.equal(model.head.memory.updates > 0, targets.amax(0) > 0)
