"""The zoo in CI: small timm models of every head kind, each exact, exact once built as the
refusal says, Grad-CAM on request, or refused naming the head (benchmarks/zoo.py runs them all)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.zoo import _table, on_grid, probe

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

# model -> what CAMHook must make of it (the family's head in parentheses)
CURATED = {
    "test_resnet": "exact",  # GAP-FC
    "test_efficientnet": "exact",  # GAP, dropout, FC
    "test_convnext": "exact",  # pooling -> LayerNorm2d -> FC (NormMlpClassifierHead)
    "test_nfnet": "exact",
    "test_maxvit": "exact",  # NormMlpClassifierHead after attention stages
    "resnetv2_18": "exact",  # a 1x1 Conv2d classifier
    "test_vit_relpos": "exact",  # average of patch tokens -> fc_norm -> FC
    "test_vit": "exact (global_pool='avg')",  # a class token as built: refused, exact with average pooling
    "pvt_v2_b0": "exact",  # Tensor.mean over an NCHW map, no pooling module
    "levit_128s": "exact",  # two BatchNorm1d + Linear heads averaged (distillation), tokens
    "test_mambaout": "gradcam (on request)",  # NHWC, LayerNorm, then an MLP: no exact map
}


@pytest.mark.parametrize("name", list(CURATED))
def test_curated_zoo(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    result = probe(name, model)
    assert result["status"] == CURATED[name], result
    if result["status"].startswith("exact"):
        assert result["error"] <= 1e-4 and min(result["maps"]) >= 1
    else:
        assert "method='gradcam'" in result["reason"]


def test_probe_reports_a_silently_wrong_map_as_wrong(monkeypatch) -> None:
    # the zoo's own check can fail: maps that do not average to the logits are WRONG, not exact
    from attn_consistency import CAMHook

    pop = CAMHook.pop
    monkeypatch.setattr(CAMHook, "pop", lambda self: [m * 1.5 for m in pop(self)])
    result = probe("test_resnet", timm.create_model("test_resnet", num_classes=5).eval())
    assert result["status"] == "WRONG" and result["error"] > 1e-2


@pytest.mark.parametrize(
    ("maps", "image", "fits"),
    [
        ((7, 7), (224, 224), True),  # stride 32
        ((8, 8), (299, 299), True),  # a stride that rounds
        ((4, 2), (64, 32), True),
        ((2, 4), (64, 32), False),  # the aspect of the image turned
        ((17, 64), (224, 224), False),  # tokens x head_dim of an attention tensor
    ],
)
def test_maps_on_the_input_grid(maps: tuple[int, int], image: tuple[int, int], fits: bool) -> None:
    assert on_grid(maps, image) is fits


def test_probe_reports_a_gradcam_map_off_the_input_grid_as_wrong(monkeypatch) -> None:
    # finite maps whose gradient reaches the backbone, but with their cells in one row: not a map of the image
    from attn_consistency import CAMHook

    pop = CAMHook.pop
    monkeypatch.setattr(CAMHook, "pop", lambda self: [m.flatten(2)[:, :, None] for m in pop(self)])
    result = probe("test_mambaout", timm.create_model("test_mambaout", num_classes=5).eval())
    assert result["status"] == "WRONG" and "cells lie on no grid of the" in result["reason"], result


def test_table_counts_the_families() -> None:
    rows = [
        {"family": "a", "model": "a1", "status": "exact", "maps": [7, 7], "error": 1e-7},
        {"family": "b", "model": "b1", "status": "exact (global_pool='avg')", "maps": [14, 14], "error": 2e-7},
        {"family": "c", "model": "c1", "status": "refused", "reason": "ValueError: x | y"},
        {"family": "d", "model": "d1", "status": "unbuildable", "reason": "needs weights"},
    ]
    text = _table(rows)
    assert "3 buildable families; exact: 2, refused: 1, unbuildable: 1; exact: 67% of the buildable." in text
    assert "x \\| y" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--families", "no_such_family"], "--families: unknown \\['no_such_family'\\]"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--tolerance", "0"], "--tolerance must be positive, got 0.0"),
    ],
)
def test_zoo_command_names_a_bad_flag(argv: list[str], message: str, capsys, tmp_path) -> None:
    from benchmarks.zoo import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--results", str(tmp_path / "zoo")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_zoo_command_writes_its_table(tmp_path) -> None:
    from benchmarks.zoo import main

    rows = main(["--families", "convnext", "--results", str(tmp_path / "zoo")])
    assert [row["status"] for row in rows] == ["exact"]
    assert "| convnext | test_convnext | exact |" in (tmp_path / "zoo.md").read_text()
