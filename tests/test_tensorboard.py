"""examples.train --tensorboard: the event files, read back with TensorBoard's own reader, hold every
loss and term per step, every metric per epoch and the Figure-5 pictures of fixed test images."""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.figure5 import load_trained, views_and_maps
from examples.tensorboard_log import figure5_grid, overlay, pick_images
from examples.train import PRESETS, TrainConfig, build_datasets, main, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "image_size": 32, "scale_size": 24, "max_steps": 2, "epochs": 2, "batch_size": 4, "test_batch_size": 8,
    "workers": 0, "progress": False, "synthetic_train": 8, "synthetic_test": 8, "tensorboard_images": 2,
}  # fmt: skip


def config(tmp_path: Path, preset: str = "synthetic-acfs", **changes) -> TrainConfig:
    settings = PRESETS[preset] | TINY | {"out": str(tmp_path / "run"), "tensorboard": str(tmp_path / "tb")} | changes
    return TrainConfig(**settings)


def read(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def test_event_files_hold_every_step_term_metric_and_the_figure5_pictures(tmp_path: Path) -> None:
    history = train(config(tmp_path), device="cpu")
    events = read(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    terms = {"train/term/flip@32", "train/term/flip@24", "train/term/scale"}
    assert {"train/loss", "train/cls_loss", "train/ac_loss", "train/ac_multiplier"} | terms <= tags
    for tag in ("train/loss", *terms):
        assert sorted(scalars(events, tag)) == [0, 1, 2, 3], tag  # 2 epochs of 2 steps
    # the epoch's loss is the mean of its steps' losses, and each term's likewise
    step_loss = scalars(events, "train/loss")
    for epoch, row in enumerate(history):
        first = 2 * epoch
        assert row["loss"] == pytest.approx((step_loss[first] + step_loss[first + 1]) / 2, rel=1e-5)
        term = scalars(events, "train/term/scale")
        assert row["term-scale"] == pytest.approx((term[first] + term[first + 1]) / 2, rel=1e-5)
    # every number of metrics.json, at the epoch's last step
    for key, value in history[-1].items():
        assert scalars(events, f"epoch/{key}") == pytest.approx({1: history[0][key], 3: value}, rel=1e-5), key
    assert {"epoch/mAP", "epoch/inconsistency-flip", "epoch/pointing-game"} <= tags

    test_set = build_datasets(config(tmp_path))[1]
    picked = pick_images(test_set.targets, 2)
    assert [index for index, _ in picked] == [0, 7]
    label_names = test_set.label_names
    image_tags = {f"figure5/{index}-{label_names[label]}" for index, label in picked}
    assert set(events.Tags()["images"]) == image_tags
    model, _, _ = load_trained(tmp_path / "run" / "last.pt")
    for index, label in picked:
        logged = events.Images(f"figure5/{index}-{label_names[label]}")
        assert [event.step for event in logged] == [1, 3]
        assert (logged[-1].height, logged[-1].width) == (32, 3 * 32)
        picture = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"), dtype=np.float64)
        # the last epoch's picture is the trained model's heatmaps of that image and label
        sources = views_and_maps(model, test_set[index][0][None], label, 24 / 32)
        expected = figure5_grid(list(sources.values()), 0, test_set.denormalize).permute(1, 2, 0).numpy() * 255
        assert np.abs(picture - expected).max() <= 1.0


def test_side_heads_get_a_row_per_stage(tmp_path: Path) -> None:
    train(config(tmp_path, "synthetic-msac", epochs=1, max_steps=1, tensorboard_images=1), device="cpu")
    events = read(tmp_path / "tb")
    (tag,) = events.Tags()["images"]
    assert events.Images(tag)[0].height == 32 * 4  # the CAM's row, then layers.0, layers.1, layers.2
    assert {"train/term/flip/layers.0", "epoch/pointing-game/layers.0"} <= set(events.Tags()["scalars"])


def test_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    first = config(tmp_path, epochs=1)
    train(first, device="cpu")
    after_epoch_1 = tmp_path / "epoch1.pt"
    shutil.copy(tmp_path / "run" / "last.pt", after_epoch_1)
    train(config(tmp_path), device="cpu", resume=True)
    # as if the second epoch had died after logging, before its checkpoint: it is trained again
    shutil.copy(after_epoch_1, tmp_path / "run" / "last.pt")
    history = train(config(tmp_path), device="cpu", resume=True)
    events = read(tmp_path / "tb")
    assert [event.step for event in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [event.step for event in events.Scalars("epoch/mAP")] == [1, 3]
    assert [event.step for event in events.Images(events.Tags()["images"][0])] == [1, 3]
    assert scalars(events, "epoch/mAP")[3] == pytest.approx(history[1]["mAP"], rel=1e-5)


def test_command_line_flags_and_their_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "synthetic", "--image-size", "32", "--max-steps", "1", "--epochs", "1", "--synthetic-train", "8",
            "--synthetic-test", "4", "--batch-size", "4", "--workers", "0", "--progress", "false",
            "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"), "--tensorboard-images", "0"]  # fmt: skip
    main(argv)
    events = read(tmp_path / "tb")
    assert events.Tags()["images"] == []
    assert "train/term/scale" not in events.Tags()["scalars"]  # a run without views has no terms
    assert sorted(scalars(events, "train/loss")) == [0]
    json.loads((tmp_path / "run" / "metrics.json").read_text())
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"--tensorboard {tmp_path / 'file'} is a file, not a folder")):
        train(config(tmp_path, tensorboard=str(tmp_path / "file")), device="cpu")
    with pytest.raises(SystemExit):
        main([*argv, "--tensorboard-images", "-1"])
    assert "--tensorboard-images" in capsys.readouterr().err


def test_missing_tensorboard_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=re.escape("--tensorboard needs the tensorboard package")):
        train(config(tmp_path), device="cpu")


def test_pick_images_spreads_and_takes_the_first_present_label() -> None:
    targets = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0], [-1, 0, 1], [0, 1, 0]])
    assert pick_images(targets, 3) == [(0, 1), (2, 0), (4, 1)]
    assert pick_images(targets, 9) == [(0, 1), (1, 0), (2, 0), (3, 2), (4, 1)]  # WIDER's -1 is absent
    assert pick_images(targets, 0) == []


def test_overlay_blends_the_jet_colours() -> None:
    white = torch.ones(3, 2, 2)
    heat = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    blended = overlay(white, heat)
    # jet runs from dark blue (0, 0, 0.5) at 0 to dark red (0.5, 0, 0) at 1
    assert torch.allclose(blended[:, 0, 0], torch.tensor([0.5, 0.5, 0.75]))
    assert torch.allclose(blended[:, 1, 1], torch.tensor([0.75, 0.5, 0.5]))


def test_each_step_logs_the_multiplier_its_loss_was_weighted_with(tmp_path: Path) -> None:
    # a linear warm-up over 2 of the 4 steps: multipliers 0, 0.5, 1, 1
    train(config(tmp_path, warmup=0.5), device="cpu")
    events = read(tmp_path / "tb")
    multiplier = scalars(events, "train/ac_multiplier")
    assert multiplier == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    terms = [scalars(events, f"train/term/{name}") for name in ("flip@32", "flip@24", "scale")]
    for step, ac_loss in scalars(events, "train/ac_loss").items():  # every weight 1, the paper's loss
        assert ac_loss == pytest.approx(multiplier[step] * sum(term[step] for term in terms), rel=1e-5, abs=1e-7)
