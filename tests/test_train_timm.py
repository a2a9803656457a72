"""The training script on timm backbones (issue 9): ``--arch`` takes any timm model name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.models import build_model, check_arch, timm_arch
from examples.train import main

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--dataset", "synthetic", "--synthetic-train", "8", "--synthetic-test", "8", "--image-size", "64",
    "--scale-size", "48", "--batch-size", "4", "--test-batch-size", "4", "--epochs", "1", "--max-steps", "2",
    "--workers", "0", "--progress", "false", "--transforms", "flip", "scale",
]  # fmt: skip
VIT = "vit_tiny_patch16_224(img_size=64, patch_size=16, depth=1, global_pool='avg', dynamic_img_size=True)"


@pytest.mark.parametrize("arch", ["convnext_atto", VIT, "timm/resnet10t"])
def test_training_script_runs_on_timm_backbones(arch: str, tmp_path: Path) -> None:
    history = main(["--arch", arch, "--out", str(tmp_path), "--device", "cpu", *TINY])
    last = history[-1]
    assert all(torch.isfinite(torch.tensor(float(last[key]))) for key in ("loss", "mAP"))
    assert any(key.startswith("term-scale") for key in last) and float(last["term-scale"]) > 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert json.loads(state["config"])["arch"] == arch


def test_timm_arch_parsing() -> None:
    assert timm_arch("resnet50") is None
    assert timm_arch("timm/resnet50") == ("resnet50", {})
    assert timm_arch(" vit_small_patch16_224(global_pool='avg', dynamic_img_size=True) ") == (
        "vit_small_patch16_224",
        {"global_pool": "avg", "dynamic_img_size": True},
    )
    assert check_arch("timm/resnet50") == "timm/resnet50"
    assert type(build_model("resnet50", 3)).__module__.startswith("torchvision")  # torchvision's name first
    assert type(build_model("timm/resnet18", 3)).__module__.startswith("timm")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("not_a_model", r"unknown arch 'not_a_model'.*timm model name"),
        ("vit_tiny_patch16_224(1)", r"give the arguments by name"),
        ("vit_tiny_patch16_224(global_pool=avg)", r"global_pool= is not a literal; quote strings"),
        ("convnext_atto(bogus=1)", r"arch 'convnext_atto\(bogus=1\)'.*refuses the arguments \{'bogus': 1\}"),
        ("timm/not_a_model", r"unknown arch 'timm/not_a_model'"),
        (
            "aamn_not_a_model",
            r"arch 'aamn_not_a_model': an AAMN head on an unknown backbone: unknown arch 'not_a_model'",
        ),
    ],
)
def test_bad_timm_arch_names_it(arch: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(check_arch(arch), 3)


def test_timm_model_starts_from_a_checkpoint_with_another_head(tmp_path: Path) -> None:
    trained = build_model("convnext_atto", 5)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    state = build_model("convnext_atto", 3, str(tmp_path / "last.pt")).state_dict()
    changed = {k for k, v in trained.state_dict().items() if v.shape != state[k].shape or not torch.equal(v, state[k])}
    assert changed == {"head.fc.weight", "head.fc.bias"}
