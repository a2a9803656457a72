"""The main job, at toy size: pretraining, the four fine-tuning rows (and MSAC), the table and Figure 5."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from examples import demo
from examples.gain import REGIMES
from examples.train import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def run_demo(out: Path, *flags: str) -> dict[str, dict[str, float]]:
    return demo.main(["--out", str(out), "--pretrain-epochs", "1", "--pretrain-images", "32", "--epochs", "1", "--train-images", "32", "--test-images", "16", "--no-progress", *flags])  # fmt: skip


def epoch_rows(log: Path) -> list[dict]:
    """The per-epoch metrics a run's log holds."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_demo_pretrains_fine_tunes_every_row_and_writes_table_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_demo(tmp_path, "--msac")
    captured = capsys.readouterr()
    printed = captured.out
    # two steps of pretraining learn nothing: the demo says that its starting point is weak
    assert "warning: the pretraining reached mAP" in captured.err
    assert f"--pretrain-epochs 2 --out {tmp_path}-longer" in captured.err

    # one line per run on the screen, the per-epoch detail in each run's log only
    runs = ("pretrain", *demo.NAMES, "msac")
    for k, run in enumerate(runs, 1):
        title = "pretraining" if run == "pretrain" else run
        line = next(line for line in printed.splitlines() if line.startswith(f"[{k}/6] {title}: "))
        assert f"[{k}/6] {title}: training ... done in " in line and " s (mAP " in line, line
        assert ("left" in line) == (k < 6), line  # the time left, once a run has set the pace
        log = tmp_path / run / "log.txt"
        assert log.read_text().startswith(f"no checkpoint at {tmp_path / run / 'last.pt'}: starting afresh\n")
        assert [row["epoch"] for row in epoch_rows(log)] == [1], run
    assert '"epoch"' not in printed and '"epoch"' not in captured.err and "afresh" not in captured.err
    assert "1 torch thread." in printed and "total " in printed

    assert list(results) == list(demo.NAMES.values()) + list(demo.MSAC_NAMES.values())
    for row in results.values():
        for key, _ in demo.COLUMNS:
            assert math.isfinite(row[key]), key
    names = demo.NAMES | demo.MSAC_NAMES
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
    # the files it wrote, named at the end
    assert printed.rstrip().splitlines()[-9].startswith(f"Files written under {tmp_path}:")  # then 7 files, total
    for name in ("results.json", "figure5.png", "figure5_msac.png", "<run>/last.pt", "<run>/log.txt", "metrics.json"):
        assert name in printed.rpartition("Files written")[2], name
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
    assert summary["table"] == table and summary["stages"] == demo.stage_table(msac)
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
    for run in (*demo.NAMES, "msac"):
        tuned = load_checkpoint(tmp_path / run / "last.pt")["model"]
        for key, value in backbone.items():
            assert 0 < (tuned[key] - value).abs().max() < 0.01, (run, key)  # trained, from there


def test_demo_prints_the_four_rows_of_the_readme_and_resumes_finished_runs_without_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_demo(tmp_path)
    printed = capsys.readouterr().out
    # by default: the four rows, no MSAC run, table per stage or picture
    assert list(first) == list(demo.NAMES.values())
    assert demo.table(first) in printed and demo.table(first).count("\n") == 5  # header, rule, four rows
    assert "[5/5] recommended: training ... done in " in printed and "[6/" not in printed
    assert "MSAC" not in printed and "msac" not in printed
    assert not (tmp_path / "msac").exists() and not (tmp_path / "figure5_msac.png").exists()
    assert "stages" not in json.loads((tmp_path / "results.json").read_text())

    runs = ("pretrain", *demo.NAMES)
    stamps = {run: (tmp_path / run / "last.pt").stat().st_mtime_ns for run in runs}
    assert run_demo(tmp_path) == first
    captured = capsys.readouterr()
    assert captured.out.count(": reusing the finished run ... done (mAP ") == 5
    assert "left" not in captured.out and "resuming" not in captured.err
    for run in runs:  # the resume message went to the log, after the first call's
        lines = (tmp_path / run / "log.txt").read_text().splitlines()
        assert lines[-1] == f"resuming {tmp_path / run / 'last.pt'} after epoch 1", run
        assert [row["epoch"] for row in epoch_rows(tmp_path / run / "log.txt")] == [1], run
    assert {run: (tmp_path / run / "last.pt").stat().st_mtime_ns for run in stamps} == stamps


def test_demo_runs_torch_on_one_thread_unless_told_and_restores_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(demo, "_demo", lambda args: seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"])))  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(2)  # the fixture restores the count torch had
    demo.main([])
    assert seen.pop() == (1, "1", "1")
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
    demo.main(["--threads", "2"])
    assert seen.pop() == (2, "2", "2")
    assert demo.THREADS == 1 and demo._parser().parse_args([]).threads == 1
    assert "default: 1" in demo._parser().format_help()


def test_time_left_weighs_the_runs_to_come_by_their_expected_cost(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([0.0, 0.0, 10.0, 10.0, 10.0, 10.0, 40.0, 40.0, 340.0])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    runs = [demo._Run(key, key, 1, 1, cost, 0) for key, cost in (("a", 100.0), ("b", 0.0), ("c", 200.0), ("d", 1800.0))]
    progress = demo.Progress(runs)
    for _ in runs:
        progress.finish(progress.start(), 0.5)
    lines = capsys.readouterr().out.splitlines()
    # 10 s for 100: 2000 to come take 200 s; a reused run takes no time and does not set the pace
    assert lines[0] == "[1/4] a: training ... done in 10 s (mAP 50.0); about 3 min left"
    assert lines[1] == "[2/4] b: reusing the finished run ... done (mAP 50.0); about 3 min left"
    # 40 s for 300: 1800 take 240 s
    assert lines[2] == "[3/4] c: training ... done in 30 s (mAP 50.0); about 4 min left"
    assert lines[3] == "[4/4] d: training ... done in 5 min 0 s (mAP 50.0)"
    assert demo.duration(59.6) == "1 min 0 s" and demo._time_left(44) == "about 40 s left"


def test_demo_plans_the_runs_by_views_and_epochs_left(tmp_path: Path) -> None:
    args = demo._parser().parse_args(["--out", str(tmp_path), "--epochs", "4", "--msac"])
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "metrics.json").write_text(json.dumps([{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]))
    plan = {run.key: run for run in demo._plan(args, tmp_path, ["baseline", "paper", "msac"])}
    assert list(plan) == ["pretrain", "baseline", "paper", "msac"]
    assert plan["pretrain"].cost == 16 * (2000 + 400) and plan["baseline"].cost == 4 * (500 + 400)
    paper = demo.TRAIN_COST["paper"]
    assert plan["paper"].done == 3 and plan["paper"].cost == 1 * (500 * paper + 400)  # one epoch left
    assert plan["msac"].cost > 4 * (500 * paper + 400) > plan["baseline"].cost


def test_train_prints_each_epoch_unless_given_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = REGIMES["finetune"] | dict(synthetic_train=16, synthetic_test=8, epochs=1, pretrained=None)
    train(TrainConfig(**tiny | dict(out=str(tmp_path / "screen"))), device="cpu", resume=True)
    captured = capsys.readouterr()
    assert json.loads(captured.out)["epoch"] == 1 and "no checkpoint at" in captured.err  # as before
    log = tmp_path / "logs" / "run.txt"  # its folder is made
    train(TrainConfig(**tiny | dict(out=str(tmp_path / "logged"), log=str(log))), device="cpu", resume=True)
    train(TrainConfig(**tiny | dict(out=str(tmp_path / "logged"), log=str(log))), device="cpu", resume=True)
    assert capsys.readouterr() == ("", "")
    lines = log.read_text().splitlines()
    assert lines[0].endswith("starting afresh") and json.loads(lines[1])["epoch"] == 1
    assert lines[2] == f"resuming {tmp_path / 'logged' / 'last.pt'} after epoch 1" and len(lines) == 3


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
