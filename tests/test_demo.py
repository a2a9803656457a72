"""The main job, at toy size: pretraining, the four fine-tuning rows, the table and Figure 5."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from examples import demo
from examples.train import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def run_demo(out: Path) -> dict[str, dict[str, float]]:
    return demo.main(["--out", str(out), "--pretrain-epochs", "1", "--pretrain-images", "32", "--epochs", "1", "--train-images", "32", "--test-images", "16", "--no-progress"])  # fmt: skip


def test_demo_pretrains_fine_tunes_both_rows_and_writes_table_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_demo(tmp_path)
    captured = capsys.readouterr()
    printed = captured.out
    # two steps of pretraining learn nothing: the demo says that its starting point is weak
    assert "warning: the pretraining reached mAP" in captured.err
    assert f"--pretrain-epochs 2 --out {tmp_path}-longer" in captured.err

    assert list(results) == list(demo.NAMES.values())
    for row in results.values():
        for key, _ in demo.COLUMNS:
            assert math.isfinite(row[key]), key
    names = demo.NAMES
    assert results[names["baseline"]]["ac_loss"] == results[names["augmentation"]]["ac_loss"] == 0.0
    assert results[names["paper"]]["ac_loss"] > 0.0
    # the recommended warm-up waits for the classification loss to fall: not in one tiny epoch
    recommended = results[names["recommended"]]
    assert recommended["ac_loss"] == 0.0 and recommended["ac_multiplier"] == 0.0 and recommended["term-scale"] > 0.0
    # the control trains on the same four views as the consistency rows, the baseline on one
    assert "term-scale" in results[names["paper"]] and "term-scale" not in results[names["augmentation"]]
    table = demo.table(results)
    assert table in printed
    assert table.count("\n") == 6  # header, rule, five rows
    # MSAC: the recommended row with a side head at each block, every term per stage
    msac = results[names["msac"]]
    assert msac["ac_loss"] == 0.0 and msac["ac_multiplier"] == 0.0  # the same warm-up as the recommended row
    stages = ("layers.0", "layers.1", "layers.2")
    assert {k for k in msac if k.startswith("term-")} == {
        f"term-{t}/{s}" for t in ("flip@64", "flip@56", "scale") for s in stages
    }
    assert all(
        math.isfinite(msac[f"{m}/{s}"])
        for m in ("inconsistency-flip", "inconsistency-scale", "pointing-game")
        for s in stages
    )
    assert demo.stage_table(msac) in printed and demo.stage_table(msac).count("\n") == 5  # own CAM + 3 stages

    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["table"] == table
    pretrain = tmp_path / "pretrain" / "last.pt"
    assert list(summary["configs"]) == list(results)
    for config in summary["configs"].values():
        assert config["pretrained"] == str(pretrain)
        assert (config["synthetic_classes"], config["scale_size"]) == (8, 56)
    with Image.open(tmp_path / "figure5.png") as picture:
        assert picture.width > 200 and picture.height > 200
    with Image.open(tmp_path / "figure5_msac.png") as picture:  # one image: the CAM's row and a row per stage
        assert picture.height > picture.width > 0  # 4 rows of 2.5 in. against 7.5 in. of 3 columns

    # both fine-tuning runs start from the pretrained backbone: one step of Adam at lr 1e-3 moves
    # every weight by about 1e-3 at most, far less than the distance between two random inits
    backbone = {k: v for k, v in load_checkpoint(pretrain)["model"].items() if k.endswith("conv1.weight")}
    assert len(backbone) == 3  # the three residual blocks
    for run in demo.NAMES:
        tuned = load_checkpoint(tmp_path / run / "last.pt")["model"]
        for key, value in backbone.items():
            assert 0 < (tuned[key] - value).abs().max() < 0.01, (run, key)  # trained, from there


def test_demo_resumes_finished_runs_without_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = run_demo(tmp_path)
    stamps = {run: (tmp_path / run / "last.pt").stat().st_mtime_ns for run in ("pretrain", *demo.NAMES)}
    capsys.readouterr()
    assert run_demo(tmp_path) == first
    assert capsys.readouterr().err.count("resuming") == 6
    assert {run: (tmp_path / run / "last.pt").stat().st_mtime_ns for run in stamps} == stamps


def test_demo_does_not_mix_fine_tuning_runs_with_a_longer_pretraining(tmp_path: Path) -> None:
    run_demo(tmp_path)
    args = ["--out", str(tmp_path), "--pretrain-epochs", "2", "--pretrain-images", "32", "--epochs", "1", "--train-images", "32", "--test-images", "16", "--no-progress"]  # fmt: skip
    with pytest.raises(ValueError, match="pretrain/last.pt changed since the run started"):
        demo.main(args)


@pytest.mark.parametrize(
    "flag", ["--epochs", "--pretrain-epochs", "--pretrain-images", "--train-images", "--test-images", "--threads"]
)
def test_demo_counts_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main([flag, "0"])
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
