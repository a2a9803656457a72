"""The training script's control of the term's strength: the schedule resumes, the terms are logged."""

import dataclasses
from pathlib import Path

import pytest

import examples.train as train_module
from examples.train import PRESETS, RECOMMENDED, TrainConfig, load_checkpoint, parse_args, train

TINY = dict(synthetic_train=16, synthetic_test=8, image_size=32, scale_size=24, batch_size=4, test_batch_size=8,
            progress=False, lr_step=1)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def ramped(out: Path) -> TrainConfig:
    # 4 steps per epoch, 3 epochs, a warm-up over half the run (6 steps): the first epoch ends mid-ramp
    settings = TINY | dict(distance="relative", warmup=0.5, out=str(out), epochs=3)
    return TrainConfig(**(PRESETS["synthetic-acfs"] | settings))


def test_the_warm_up_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = train(ramped(tmp_path / "straight"), device="cpu")
    assert [row["ac_multiplier"] for row in straight] == pytest.approx([4 / 6, 1.0, 1.0])
    # interrupted in the second epoch's evaluation, after the first epoch's checkpoint
    evaluate, calls = train_module.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(ramped(tmp_path / "resumed"), device="cpu")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["consistency"]["_extra_state"]["steps"] == 4
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    resumed = train(ramped(tmp_path / "resumed"), device="cpu", resume=True)
    assert resumed == straight


def test_a_warm_up_run_cannot_be_resumed_with_other_epochs(tmp_path: Path) -> None:
    train(dataclasses.replace(ramped(tmp_path), epochs=1), device="cpu")
    with pytest.raises(ValueError, match="epochs: 1 there, 2 here"):
        train(dataclasses.replace(ramped(tmp_path), epochs=2), device="cpu", resume=True)


def test_each_term_and_the_ratio_are_logged(tmp_path: Path) -> None:
    (row,) = train(dataclasses.replace(ramped(tmp_path), warmup=0.0, epochs=1), device="cpu")
    assert {"term-flip@32", "term-flip@24", "term-scale"} <= set(row)
    assert row["ac_ratio"] == pytest.approx(row["ac_loss"] / row["cls_loss"])
    assert row["ac_loss"] == pytest.approx(row["term-flip@32"] + row["term-flip@24"] + row["term-scale"], rel=1e-5)
    assert row["heatmap-spread"] > 0


def test_the_strength_settings_are_flags() -> None:
    config, _ = parse_args(["--preset", "synthetic-acfs", "--distance", "relative", "--warmup", "0.25",
                            "--warmup-shape", "cosine", "--stop-gradient", "original", "--diagnostics", "false"])  # fmt: skip
    assert (config.distance, config.warmup, config.warmup_shape, config.stop_gradient, config.diagnostics) == (
        "relative",
        0.25,
        "cosine",
        "original",
        False,
    )


def test_paper_presets_keep_the_paper_loss_and_users_presets_the_recommended_one() -> None:
    for name, preset in PRESETS.items():
        config = TrainConfig(**preset)
        if name.startswith(("wider", "pa100k", "coco", "synthetic")):
            assert (config.distance, config.warmup, config.stop_gradient) == ("mse", 0.0, None), name
    assert RECOMMENDED.items() <= PRESETS["csv-r50-acfs"].items()
