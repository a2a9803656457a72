"""Tests of the reproduction script examples/train.py on tiny datasets in their real file formats.

Each preset trains one step at 32 px (ResNet maps 1x1, the small net's 4x4 and 3x3; the ResNets at
1/16 of their bottleneck width: conftest.py's slim_resnets) and evaluates, except the ResNet-101 ones
but one, which are checked to equal their trained ResNet-50 twin but for the arch. Resume, atomic
checkpoints, a two-process torchrun and the errors of bad inputs are tested too.
"""

import argparse
import csv
import dataclasses
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from fixtures import WIDER_NAMES, attribute, cell, noise, save, worker_context, write_coco, write_wider

import examples._files as files_module
import examples.train as train_module
from attn_consistency import AttentionConsistencyLoss, get_transform
from examples.models import SmallResNet, build_model
from examples.train import (
    PRESETS,
    TrainConfig,
    _image_transform,
    _random_view,
    build_datasets,
    load_checkpoint,
    main,
    parse_args,
    save_atomic,
    train,
)

REPO = Path(__file__).resolve().parents[1]

LABEL_KEYS = {"mAP", "mA", "P-C", "R-C", "F1-C", "F1-C-harmonic", "P-O", "R-O", "F1-O"}
TRAIN_KEYS = {
    "epoch",
    "lr",
    "loss",
    "cls_loss",
    "ac_loss",
    "ac_ratio",
    "ac_multiplier",
    "inconsistency-flip",
    "inconsistency-scale",
}
EXTRA_KEYS = {
    "wider": set(),
    "pa100k": {"Acc", "Prec", "Recall", "F1"},
    "coco": {f"{key}@3" for key in LABEL_KEYS - {"mAP", "mA"}},
    "synthetic": {"pointing-game", "heatmap-spread"},
    "csv": set(),
}
# Four samples per split, every label positive in two and negative in two (WIDER: also unspecified),
# so that every label-based metric is defined.
LABELS = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
PA_NAMES = ["Female", "AgeOver60", "Age18-60", "Hat"]
COCO_CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}]  # fmt: skip
# Batch 4, not 2: BatchNorm over 1x1 ResNet maps of 2 images normalises 2 values per channel, and
# one step of gradients up to 1e10 left the net NaN.
TINY = {
    "image_size": 32, "max_steps": 1, "epochs": 1, "batch_size": 4, "test_batch_size": 4, "workers": 0,
    "progress": False, "pretrained": None, "synthetic_train": 8, "synthetic_test": 8,
}  # fmt: skip
# ResNet's stride 32 leaves the scaled view 1x1 too; the small net (stride 8) gets 4x4 and 3x3 maps.
SCALE_SIZE = {"resnet50": 28, "resnet101": 28, "small_resnet": 24}
LAYER3_BLOCKS = {"resnet50": 6, "resnet101": 23}
FEATURES = {"resnet50": 2048, "resnet101": 2048, "small_resnet": 128}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- dataset roots in the real formats


def write_wider_root(root: Path) -> Path:
    for split in ("trainval", "test"):
        # two people on the first image, one on each of two more
        files = [f"{split}/0--Parade/0_Parade_{k}.jpg" for k in (0, 0, 1, 2)]
        images: dict[str, dict] = {}
        for k, name in enumerate(files):
            images.setdefault(name, {"file_name": name, "scene_id": 0, "targets": []})
            images[name]["targets"].append({"attribute": attribute(k), "bbox": [1 + k, 2, 12.5, 16]})
        for seed, name in enumerate(images):
            save(root / "Image" / name, noise((20, 24), seed))
        write_wider(
            root,
            {
                "images": list(images.values()),
                "attribute_id_map": {str(i): name for i, name in enumerate(WIDER_NAMES)},
                "scene_id_map": {"0": "Parade"},
            },
            split,
        )
    return root


def write_pa100k_root(root: Path) -> Path:
    variables = {"attributes": cell(PA_NAMES)}
    for offset, split in enumerate(("train", "val", "test")):
        names = [f"{offset * 10 + k:06d}.jpg" for k in range(4)]
        variables[f"{split}_images_name"] = cell(names)
        variables[f"{split}_label"] = np.array(LABELS, dtype=np.uint8)
        for k, name in enumerate(names):
            save(root / "data" / name, noise((12, 24), offset * 10 + k))
    scipy.io.savemat(root / "annotation.mat", variables)
    return root


def write_coco_root(root: Path) -> Path:
    for offset, split in enumerate(("train", "val")):
        images = [
            {
                "id": 100 * offset + k,
                "file_name": f"COCO_{split}2014_{100 * offset + k:012d}.jpg",
                "width": 16,
                "height": 12,
            }
            for k in range(4)
        ]
        annotations = [
            {
                "id": 10 * k + j,
                "image_id": image["id"],
                "category_id": category["id"],
                "bbox": [0, 0, 4, 4],
                "iscrowd": 0,
            }
            for k, image in enumerate(images)
            for j, category in enumerate(COCO_CATEGORIES)
            if LABELS[k][j]
        ]
        write_coco(root, {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}, split)
        for image in images:
            save(root / f"{split}2014" / image["file_name"], noise((16, 12), image["id"]))
    return root


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "wider": write_wider_root(tmp_path_factory.mktemp("wider")),
        "pa100k": write_pa100k_root(tmp_path_factory.mktemp("pa100k")),
        "coco": write_coco_root(tmp_path_factory.mktemp("coco")),
        "csv": write_csv_root(tmp_path_factory.mktemp("csv")),
    }


def write_csv_root(root: Path) -> Path:
    """A user's image folder with CSV label files, the four labels of LABELS."""
    for split in ("train", "test"):
        lines = ["filename,cat,dog,bird,fish"]
        for k, labels in enumerate(LABELS):
            save(root / split / f"{k}.png", noise((40, 32), k))
            lines.append(f"{split}/{k}.png," + ",".join(map(str, labels)))
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_settings(preset: str, data_roots: dict[str, Path], out: Path) -> dict:
    settings = PRESETS[preset]
    root = data_roots.get(settings["dataset"])
    sizes = {"scale_size": SCALE_SIZE[settings["arch"]]}
    if settings["dataset"] == "csv":
        sizes |= {"csv_train": str(root / "train.csv"), "csv_test": str(root / "test.csv")}
    if "translate" in settings.get("transforms", ()) and settings["arch"] != "small_resnet":
        # a shifted 1x1 map has no cell whose source lies inside it: the term would be 0; 64 px gives 2x2
        sizes = {"image_size": 64, "scale_size": 48}
    return dict(TINY, **sizes, out=str(out), data_root=root and str(root))


def as_argv(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


# ---------------------------------------------------------------- every preset, one step


def check_run(preset: str, out: Path, history: list[dict]) -> None:
    """The files of a finished one-epoch run of ``preset`` in ``out`` and what they hold."""
    settings = PRESETS[preset]
    dataset, arch = settings["dataset"], settings["arch"]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.csv", "metrics.json"]  # no temporary left

    written = json.loads((out / "metrics.json").read_text())
    assert written == history and len(written) == 1
    (row,) = written
    consistency = bool(settings.get("transforms")) and settings.get("consistency", True)
    terms = {k for k in row if k.startswith("term-")}
    assert bool(terms) == consistency  # each term, unweighted, where there is one
    # the side heads' stages (MSAC presets): each metric of the heatmaps per stage, "<metric>/<stage>"
    stage_keys = {k for k in row if k not in terms and "/" in k}
    stages = settings.get("stages", ())
    assert {k.partition("/")[2] for k in stage_keys} == ({*stages, "output"} if stages else set())  # output: mAP only
    per_stage = {"mAP", "inconsistency-flip", "inconsistency-scale"} | (
        {"pointing-game"} if dataset == "synthetic" else set()
    )
    assert {k.partition("/")[0] for k in stage_keys} == (per_stage if stages else set())
    assert set(row) - terms - stage_keys - {"ac_grad_ratio"} == TRAIN_KEYS | LABEL_KEYS | EXTRA_KEYS[dataset]
    assert row["epoch"] == 1 and row["lr"] == settings.get("lr", 1e-3)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()), row
    assert row["cls_loss"] > 0
    assert row["loss"] == pytest.approx(row["cls_loss"] + row["ac_loss"], rel=1e-6)
    if consistency and settings.get("warmup_trigger"):
        # a one-step run is too short for the warm-up to start: the terms are computed, weighted 0
        assert row["ac_loss"] == 0 and row["ac_multiplier"] == 0 and all(row[t] > 0 for t in terms)
    elif consistency:
        assert row["ac_loss"] > 0 and all(row[t] > 0 for t in terms)
    else:  # no views, or the views as data augmentation only
        assert row["ac_loss"] == 0

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(row)
    assert [{k: float(v) for k, v in r.items()} for r in rows] == written

    # weights_only: a checkpoint of tensors and plain types
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0
    assert json.loads(state["history"]) == written
    config = json.loads(state["config"])
    assert (config["arch"], config["dataset"], tuple(config["transforms"])) == (
        arch,
        dataset,
        settings.get("transforms", ()),
    )
    labels = {"wider": 14, "pa100k": 4, "coco": 4, "csv": 4, "synthetic": settings.get("synthetic_classes", 6)}[dataset]
    assert state["model"]["fc.weight"].shape == (labels, FEATURES[arch])
    if arch in LAYER3_BLOCKS:
        blocks = {int(key.split(".")[1]) for key in state["model"] if key.startswith("layer3.")}
        assert blocks == set(range(LAYER3_BLOCKS[arch]))
    names = {"wider": WIDER_NAMES, "pa100k": PA_NAMES, "coco": ["dog", "person", "toothbrush", "car"]}
    if dataset in names:
        assert state["label_names"] == names[dataset]
    assert state["optimizer"]["param_groups"][0]["lr"] == row["lr"]


R101_PRESETS = sorted(name for name, settings in PRESETS.items() if settings["arch"].endswith("resnet101"))
# ResNet-101 steps cost twice ResNet-50's: one is trained, the others differ from a trained preset by the arch only
# (the AAMN presets on VOC, VG-500 and COCO are trained in test_aamn_train.py).
TRAINED = sorted(set(PRESETS) - set(R101_PRESETS)) + ["coco-r101-acfs"]


@pytest.mark.parametrize("preset", TRAINED)
@pytest.mark.usefixtures("slim_resnets")  # the ResNets' blocks and 2048 features at 1/16 width: 25 MB, not 180
def test_preset_trains_one_step_and_writes_metrics_and_checkpoint(preset: str, data_roots, tmp_path: Path) -> None:
    settings = tiny_settings(preset, data_roots, tmp_path / preset)
    if preset == "wider-r50-acfs":  # through the command line
        history = main(["--preset", preset, "--device", "cpu"] + as_argv(settings))
    else:
        history = train(TrainConfig(**(PRESETS[preset] | settings)), device="cpu")
    check_run(preset, tmp_path / preset, history)
    (tmp_path / preset / "last.pt").unlink()  # checked: nothing reads it again


@pytest.mark.parametrize("preset", ["wider-r50-acfs", "coco-r101-acfs", "wider-r50-s"])
def test_scaled_view_is_resized_from_the_image_file_as_the_authors_loader(
    preset: str, data_roots, tmp_path: Path
) -> None:
    config = TrainConfig(**(PRESETS[preset] | tiny_settings(preset, data_roots, tmp_path)))
    train_set, test_set = build_datasets(config)
    (large, small), target = train_set[1]
    assert large.shape == (3, 32, 32) and small.shape == (3, 28, 28)
    # straight from the file at 28 px, not a resample of the 32 px tensor
    raw = type(train_set)(*_reader_args(config), transform=None)
    image, raw_target = raw[1]
    torch.testing.assert_close(small, _image_transform(28)(image))
    torch.testing.assert_close(large, _image_transform(32)(image))
    assert torch.equal(target, raw_target)
    assert test_set[0][0].shape == (3, 32, 32)  # the test split has the original view only
    resampled = TrainConfig(**(dataclasses.asdict(config) | {"scale_source": "resize"}))
    assert build_datasets(resampled)[0][1][0].shape == (3, 32, 32)


def _reader_args(config: TrainConfig) -> tuple:
    split = {"wider": "trainval", "pa100k": "train", "coco": "train"}[config.dataset]
    return (config.data_root, split)


def test_scale_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the synthetic images exist at one size only: use --scale-source resize"):
        build_datasets(TrainConfig(**(PRESETS["synthetic-acfs"] | TINY | {"scale_source": "original"})))
    with pytest.raises(ValueError, match="scale_source must be 'original' or 'resize', got 'crop'"):
        build_datasets(TrainConfig(**(PRESETS["synthetic-acfs"] | TINY | {"scale_source": "crop"})))


def test_random_view_applies_each_transform_half_the_time() -> None:
    flip, scale = get_transform("flip"), get_transform("scale", factor=24 / 32)
    images = torch.randn(2, 3, 32, 32)
    small = torch.randn(2, 3, 24, 24)  # stands for the loader's own 24 px resize
    counts = {"none": 0, "flip": 0, "scale": 0, "both": 0}
    for step in range(400):
        view = _random_view(images, [small], [flip, scale], torch.Generator().manual_seed(step))
        if view.shape[-1] == 32:
            key = "none" if torch.equal(view, images) else "flip"
            assert key == "none" or torch.equal(view, images.flip(-1))
        else:
            key = "scale" if torch.equal(view, small) else "both"
            assert key == "scale" or torch.equal(view, small.flip(-1))
        counts[key] += 1
    assert all(70 <= n <= 130 for n in counts.values()), counts  # 100 each expected; 6 sigma is 52
    # without the loader's resize, the scaled view is resampled from the batch
    views = [_random_view(images, [], [scale], torch.Generator().manual_seed(seed)) for seed in range(20)]
    scaled = [view for view in views if view.shape[-1] == 24]
    assert scaled
    for view in scaled:
        torch.testing.assert_close(view, scale.apply_image(images))


def test_augmentation_only_row_with_random_augmentation_trains(data_roots, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        AttentionConsistencyLoss, "views", lambda *a, **k: pytest.fail("random augmentation runs one view")
    )
    settings = tiny_settings("wider-r50-f", data_roots, tmp_path) | {"arch": "small_resnet", "augmentation": "random"}
    (row,) = train(TrainConfig(**(PRESETS["wider-r50-f"] | settings)), device="cpu")
    assert row["ac_loss"] == 0 and row["cls_loss"] > 0 and math.isfinite(row["mAP"])
    with pytest.raises(ValueError, match="augmentation must be 'views' or 'random', got 'mixup'"):
        train(TrainConfig(**(PRESETS["wider-r50-f"] | settings | {"augmentation": "mixup"})), device="cpu")


def test_r101_presets_are_r50_presets_with_the_arch_changed() -> None:
    wider = [name for name in R101_PRESETS if name.startswith("wider-")]
    assert len(wider) == 6
    for name in wider:
        assert PRESETS[name] == PRESETS[name.replace("-r101", "-r50")] | {"arch": "resnet101"}
    acfs = PRESETS["coco-r101-acfs"]
    assert {k: v for k, v in acfs.items() if k not in ("transforms", "weights")} == PRESETS["coco-r101"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parse_args_gives_the_preset_and_the_overrides(preset: str) -> None:
    config, args = parse_args(["--preset", preset])
    assert dataclasses.asdict(config) == dataclasses.asdict(TrainConfig(**PRESETS[preset]))
    assert args.resume is False and args.device is None
    overridden, args = parse_args(
        ["--preset", preset, "--image-size", "32", "--transforms", "flip", "rotate", "--weights", '{"flip": 0.5}',
         "--amp", "false", "--lr", "0.25", "--max-steps", "3", "--resume", "--device", "cpu"]
    )  # fmt: skip
    expected = dataclasses.replace(
        config, image_size=32, transforms=("flip", "rotate"), weights={"flip": 0.5}, amp=False, lr=0.25, max_steps=3
    )
    assert overridden == expected
    assert args.resume is True and args.device == "cpu"


def test_paper_settings_of_the_presets() -> None:
    r50, r101, coco = (parse_args(["--preset", name])[0] for name in ("wider-r50-acfs", "wider-r101", "coco-r101-acfs"))
    assert (r50.arch, r50.image_size, r50.scale_size, r50.transforms, r50.consistency) == (
        "resnet50",
        224,
        192,
        ("flip", "scale"),
        True,
    )
    assert (r50.lr, r50.lr_step, r50.lr_gamma, r50.epochs, r50.batch_size) == (1e-3, 3, 0.5, 12, 16)
    assert (r101.arch, r101.transforms) == ("resnet101", ())
    assert (coco.arch, coco.image_size, coco.scale_size, coco.weights) == (
        "resnet101",
        288,
        256,
        {"flip": 0.6, "scale": 0.8},
    )
    assert (coco.lr_step, coco.lr_gamma, coco.epochs, coco.batch_size) == (6, 0.1, 14, 24)
    assert parse_args(["--preset", "wider-r50-t"])[0].consistency is False


# ---------------------------------------------------------------- resume


def resume_config(out: Path, epochs: int, **extra: object) -> TrainConfig:
    # lr_step=1: the second epoch runs at another learning rate, which a resumed run must restore
    settings = {
        "scale_size": 24,
        "max_steps": None,
        "lr_step": 1,
        "synthetic_train": 16,
        "out": str(out),
        "epochs": epochs,
    }
    return TrainConfig(**(PRESETS["synthetic-acfs"] | TINY | settings | extra))


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    straight = train(resume_config(tmp_path / "straight", 2), device="cpu")
    capsys.readouterr()

    first = train(resume_config(tmp_path / "resumed", 1), device="cpu", resume=True)
    assert "no checkpoint at" in capsys.readouterr().err
    assert first == straight[:1]
    resumed = train(resume_config(tmp_path / "resumed", 2), device="cpu", resume=True)
    err = capsys.readouterr().err
    assert "resuming" in err and "after epoch 1" in err

    assert [row["epoch"] for row in straight] == [1, 2]
    preset = PRESETS["synthetic-acfs"]
    assert straight[1]["lr"] == pytest.approx(preset["lr"] * preset["lr_gamma"])
    assert straight[1]["ac_loss"] > 0
    assert resumed == straight
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text()) == straight
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"]
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert x.keys() == y.keys()
        for key in x:  # Adam: step, exp_avg, exp_avg_sq
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


def test_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    history = train(resume_config(tmp_path, 1), device="cpu")
    before = (tmp_path / "last.pt").read_bytes()
    assert train(resume_config(tmp_path, 1), device="cpu", resume=True) == history
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resuming_with_other_settings_names_them(tmp_path: Path) -> None:
    train(resume_config(tmp_path, 1), device="cpu")
    changed = dataclasses.replace(resume_config(tmp_path, 2), lr=0.5, transforms=("flip",))
    message = f"cannot resume {tmp_path / 'last.pt'}: it was written with other settings"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        train(changed, device="cpu", resume=True)
    assert "lr: 0.001 there, 0.5 here" in str(error.value)
    assert "transforms: ['flip', 'scale'] there, ['flip'] here" in str(error.value)
    assert "epochs" not in str(error.value)


def test_resuming_with_other_run_only_settings_goes_on(tmp_path: Path) -> None:
    first = train(resume_config(tmp_path, 1), device="cpu")
    more = dataclasses.replace(resume_config(tmp_path, 2), workers=1, test_batch_size=2, progress=True)
    history = train(more, device="cpu", resume=True)
    assert history[:1] == first and [row["epoch"] for row in history] == [1, 2]


def test_resuming_after_the_pretrained_file_changed_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "pretrained.pt"
    torch.save(SmallResNet(4).state_dict(), weights)
    config = dataclasses.replace(resume_config(tmp_path / "run", 1), pretrained=str(weights))
    train(config, device="cpu")
    torch.save(SmallResNet(4).state_dict(), weights)  # other random weights, same path
    with pytest.raises(ValueError, match=re.escape(f"the file {weights} changed since the run started")):
        train(dataclasses.replace(config, epochs=2), device="cpu", resume=True)


def test_checkpoint_without_scale_source_resumes_as_it_ran(data_roots, tmp_path: Path) -> None:
    # written before the setting existed: the scaled view was then resampled from the batch
    settings = tiny_settings("wider-r50-acfs", data_roots, tmp_path) | {"arch": "small_resnet", "scale_size": 24}
    config = TrainConfig(**(PRESETS["wider-r50-acfs"] | settings))
    train(config, device="cpu")
    state = load_checkpoint(tmp_path / "last.pt")
    saved = json.loads(state["config"])
    assert saved["scale_source"] == "original"  # saved resolved
    del saved["scale_source"]
    save_atomic(state | {"config": json.dumps(saved)}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=re.escape("scale_source: 'resize' there, 'original' here")):
        train(dataclasses.replace(config, epochs=2), device="cpu", resume=True)
    assert len(train(dataclasses.replace(config, epochs=2, scale_source="resize"), device="cpu", resume=True)) == 2


def test_checkpoint_without_a_later_setting_resumes_with_its_default(tmp_path: Path) -> None:
    train(resume_config(tmp_path, 1), device="cpu")
    state = load_checkpoint(tmp_path / "last.pt")
    saved = json.loads(state["config"])
    del saved["optimizer"]  # as a checkpoint written before the setting existed: it ran sgd, the default
    save_atomic(state | {"config": json.dumps(saved)}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=re.escape("optimizer: 'sgd' there, 'adam' here")):
        train(resume_config(tmp_path, 2), device="cpu", resume=True)  # the preset's adam differs
    del saved["augmentation"]  # its default, 'views', is what this run uses: it resumes
    saved["optimizer"] = "adam"
    save_atomic(state | {"config": json.dumps(saved)}, tmp_path / "last.pt")
    assert [row["epoch"] for row in train(resume_config(tmp_path, 2), device="cpu", resume=True)] == [1, 2]


def test_training_step_feeds_the_file_resized_batch_to_the_scaled_views(
    data_roots, tmp_path: Path, monkeypatch
) -> None:
    seen = []
    views = AttentionConsistencyLoss.views

    def spy(self, model, cam, images, transforms, **kwargs):
        seen.append((tuple(images.shape), [tuple(x.shape) for x in kwargs["resized"]]))
        return views(self, model, cam, images, transforms, **kwargs)

    monkeypatch.setattr(AttentionConsistencyLoss, "views", spy)
    settings = tiny_settings("wider-r50-acfs", data_roots, tmp_path) | {"arch": "small_resnet", "scale_size": 24}
    train(TrainConfig(**(PRESETS["wider-r50-acfs"] | settings)), device="cpu")
    assert seen == [((4, 3, 32, 32), [(4, 3, 24, 24)])]
    seen.clear()
    train(
        TrainConfig(**(PRESETS["wider-r50-acfs"] | settings | {"scale_source": "resize", "out": str(tmp_path / "b")})),
        device="cpu",
    )
    assert seen == [((4, 3, 32, 32), [])]


# ---------------------------------------------------------------- atomic checkpoints


def test_save_atomic_writes_the_file_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"x": torch.arange(3), "epoch": 1}, path)
    save_atomic({"x": torch.arange(5), "epoch": 2}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and torch.equal(state["x"], torch.arange(5))


def test_save_atomic_failing_midway_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"x": torch.arange(3), "epoch": 1}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"x": torch.arange(7), "epoch": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["x"], torch.arange(3))


def test_metrics_files_are_written_atomically_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = [{"epoch": 1, "mAP": 0.5}]
    train_module._write_metrics(history, tmp_path)

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        train_module._write_metrics(history + [{"epoch": 2, "mAP": 0.75}], tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.json"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == history


def test_full_disk_names_the_path_and_keeps_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"x": torch.arange(3), "epoch": 1}, path)
    history = [{"epoch": 1, "mAP": 0.5}]
    train_module._write_metrics(history, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError, match=re.escape(f"cannot write checkpoint {path}: {os.strerror(errno.ENOSPC)}")
    ) as error:
        save_atomic({"x": torch.arange(7), "epoch": 2}, path)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "fsync", full)  # the text files fail where a full disk shows: on flush to disk
    with pytest.raises(OSError, match=re.escape(f"cannot write metrics file {tmp_path / 'metrics.json'}")):
        train_module._write_metrics(history + [{"epoch": 2, "mAP": 0.75}], tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "metrics.csv", "metrics.json"]
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    assert json.loads((tmp_path / "metrics.json").read_text()) == history


def test_interrupted_write_leaves_the_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"x": torch.arange(3), "epoch": 1}, path)

    def interrupted(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # Ctrl-C (or a SIGTERM handler) in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"x": torch.arange(7), "epoch": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_writers_are_removed_at_the_next_write(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        names = {
            f".last.pt.tmp{dead}": False,  # as written before the host was in the name
            f".last.pt.tmp{dead}@{files_module._HOST}": False,
            f".last.pt.tmp{live.pid}@{files_module._HOST}": True,  # a live writer's: never touched
            f".last.pt.tmp{dead}@another-machine": True,  # a pid of another machine means nothing here
            f".metrics.json.tmp{dead}": True,  # another target's: cleaned when that one is written
        }
        for name in names:
            (tmp_path / name).write_bytes(b"half a checkpoint")
        save_atomic({"epoch": 1}, tmp_path / "last.pt")
        assert sorted(os.listdir(tmp_path)) == sorted(["last.pt"] + [name for name, kept in names.items() if kept])
    finally:
        live.kill()
        live.wait()
    save_atomic({"epoch": 2}, tmp_path / "last.pt")  # that writer has gone now
    assert f".last.pt.tmp{live.pid}@{files_module._HOST}" not in os.listdir(tmp_path)


def _killed_writer(path: str) -> None:
    def killed(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between the write and the rename

    torch.save = killed  # in the writer's own process
    save_atomic({"epoch": 2}, path)


def test_killed_writer_leaves_the_checkpoint_and_a_temporary_the_next_write_removes(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    # another process, forked from the DDP tests' server (which has imported torch: a new
    # interpreter spent 5-8 s importing it and examples.train)
    writer = worker_context().Process(target=_killed_writer, args=(str(path),))
    writer.start()
    writer.join(timeout=120)
    if writer.is_alive():
        writer.kill()
    assert writer.exitcode == -signal.SIGKILL
    leftover = [name for name in os.listdir(tmp_path) if name != "last.pt"]
    assert len(leftover) == 1 and leftover[0].startswith(".last.pt.tmp"), leftover
    assert load_checkpoint(path) == {"epoch": 1}
    save_atomic({"epoch": 3}, path)
    assert os.listdir(tmp_path) == ["last.pt"] and load_checkpoint(path) == {"epoch": 3}


def test_resume_refuses_weights_that_do_not_fit_the_run_naming_the_file(tmp_path: Path) -> None:
    train(resume_config(tmp_path, 1), device="cpu")
    state = load_checkpoint(tmp_path / "last.pt")
    save_atomic(state | {"model": SmallResNet(3).state_dict()}, tmp_path / "last.pt")  # 3 labels, the run has 6
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'last.pt'}: its weights or optimizer state do not fit this run")
    ):
        train(resume_config(tmp_path, 2), device="cpu", resume=True)


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated", "object", "state_dict", "history"])
def test_resume_refuses_a_last_pt_that_is_not_a_checkpoint_naming_it(content: str, tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(b"not a checkpoint" * 8)
    elif content == "truncated":
        torch.save({"model": SmallResNet(6).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "object":
        torch.save({"config": argparse.Namespace(lr=0.1)}, path)  # a pickled object: never unpickled
    elif content == "state_dict":
        torch.save(SmallResNet(6).state_dict(), path)
    else:  # settings and history that do not belong together
        train(resume_config(tmp_path, 1), device="cpu")
        state = load_checkpoint(path)
        save_atomic(state | {"history": "[]"}, path)
    before = path.read_bytes()
    reason = {
        "empty": "not a readable checkpoint (EOFError",
        "garbage": "not a readable checkpoint (",
        "truncated": "not a readable checkpoint (RuntimeError: PytorchStreamReader failed",
        "object": "not a readable checkpoint (it holds objects other than tensors and plain types (Unsupported global: GLOBAL argparse.Namespace",
        "state_dict": "not a checkpoint written by examples.train: no 'config' (a state dict of weights? --pretrained takes those)",
        "history": "the checkpoint's settings, history and epoch 0 disagree",
    }[content]
    with pytest.raises(ValueError, match=re.escape(f"{path}: {reason}")) as error:
        train(resume_config(tmp_path, 2), device="cpu", resume=True)
    assert "weights_only=False" not in str(error.value) and "weights_only` set to `False" not in str(error.value)
    assert path.read_bytes() == before  # nothing written over it


# ---------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "examples.train", "--preset", "synthetic-acfs", "--device", "cpu",
        "--out", str(out),
    ] + as_argv(dict(TINY, scale_size=24, epochs=2, max_steps=None, synthetic_train=16))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 180 s\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{stdout}\n{stderr}"

    # rank 0 alone evaluates and prints one line per epoch
    printed = [json.loads(line[line.index("{") :]) for line in stdout.splitlines() if '{"epoch"' in line]
    assert [row["epoch"] for row in printed] == [1, 2]
    history = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        terms = {k for k in row if k.startswith("term-")}
        assert terms == {"term-flip@32", "term-flip@24", "term-scale"}  # averaged over both replicas
        assert set(row) - terms == TRAIN_KEYS | LABEL_KEYS | EXTRA_KEYS["synthetic"]
        assert all(math.isfinite(v) for v in row.values())
        assert row["ac_loss"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.csv", "metrics.json"]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and json.loads(state["history"]) == history
    assert not any(key.startswith("module.") for key in state["model"])  # the model, not its DDP wrapper


# ---------------------------------------------------------------- errors


def test_unknown_preset_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main(["--preset", "wider-r18"])
    assert error.value.code == 2
    assert "invalid choice: 'wider-r18'" in capsys.readouterr().err


def test_unknown_arch_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'resnet5000'"):
        main(["--arch", "resnet5000", "--out", str(tmp_path)] + as_argv({"synthetic_train": 8, "synthetic_test": 8}))


def test_unknown_dataset_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'"):
        main(["--dataset", "imagenet", "--data-root", str(tmp_path), "--out", str(tmp_path)])


@pytest.mark.parametrize("preset", ["wider-r50", "pa100k-r50", "coco-r101"])
def test_real_dataset_needs_data_root(preset: str, tmp_path: Path) -> None:
    dataset = PRESETS[preset]["dataset"]
    with pytest.raises(ValueError, match=re.escape(f"--data-root is required for dataset {dataset!r}")):
        main(["--preset", preset, "--out", str(tmp_path)])


@pytest.mark.parametrize("given", [[], ["--csv-train", "train.csv"], ["--csv-test", "test.csv"]])
def test_csv_dataset_needs_both_csv_files(given: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset 'csv' needs --csv-train and --csv-test"):
        main(["--dataset", "csv", "--out", str(tmp_path)] + given)


def test_missing_pretrained_file_names_the_path(data_roots, tmp_path: Path) -> None:
    path = tmp_path / "weights" / "resnet50-11ad3fa6.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        main(
            [
                "--preset",
                "wider-r50",
                "--data-root",
                str(data_roots["wider"]),
                "--pretrained",
                str(path),
                "--out",
                str(tmp_path),
            ]
        )


def test_pretrained_file_of_another_arch_names_the_file(data_roots, tmp_path: Path) -> None:
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    # batch 4: the preset's 16 is more than the 4 people of the fixture, which is refused first
    argv = [
        "--preset",
        "wider-r50",
        "--data-root",
        str(data_roots["wider"]),
        "--pretrained",
        str(path),
        "--batch-size",
        "4",
    ]
    with pytest.raises(ValueError, match=re.escape(f"{path} does not hold weights of resnet50")):
        main(argv + ["--out", str(tmp_path)])
    path.unlink()  # 47 MB


@pytest.mark.parametrize("wrapped", [False, True])
def test_pretrained_file_loads_the_backbone_and_replaces_the_head(wrapped: bool, tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": imagenet} if wrapped else imagenet, path)
    model = build_model("resnet18", 5, str(path))
    state = model.state_dict()
    assert state["fc.weight"].shape == (5, 512)
    for key, value in imagenet.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    path.unlink()  # 47 MB


def test_small_resnet_starts_from_a_checkpoint_of_train(tmp_path: Path) -> None:
    config = TrainConfig(**(PRESETS["synthetic-pretrain"] | TINY | {"out": str(tmp_path)}))
    train(config, device="cpu")
    pretrained = load_checkpoint(tmp_path / "last.pt")["model"]
    assert pretrained["fc.weight"].shape == (4, FEATURES["small_resnet"])
    state = build_model("small_resnet", 6, str(tmp_path / "last.pt")).state_dict()
    assert state["fc.weight"].shape == (6, FEATURES["small_resnet"])
    assert state.keys() == pretrained.keys()
    for key, value in pretrained.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0"])
def test_torchvision_model_starts_from_a_checkpoint_with_another_head(arch: str, tmp_path: Path) -> None:
    # a checkpoint of train() for 5 labels (under "model"), reused for 3 labels
    trained = build_model(arch, 5)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    state = build_model(arch, 3, str(tmp_path / "last.pt")).state_dict()
    changed = {
        key
        for key, value in trained.state_dict().items()
        if value.shape != state[key].shape or not torch.equal(value, state[key])
    }
    assert changed and all(key.startswith(("fc.", "classifier.")) for key in changed), changed
    (tmp_path / "last.pt").unlink()  # 16-45 MB


def test_small_resnet_rejects_other_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="small_resnet has no ImageNet weights"):
        build_model("small_resnet", 3, "imagenet")
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(f"{path} does not hold weights of small_resnet")):
        build_model("small_resnet", 3, str(path))
    path.unlink()  # 47 MB
    wide = tmp_path / "wide.pth"
    torch.save(SmallResNet(3, widths=(16, 32, 64, 256)).state_dict(), wide)
    with pytest.raises(ValueError, match=re.escape(f"{wide} does not hold weights of small_resnet")):
        build_model("small_resnet", 3, str(wide))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pt"))):
        build_model("small_resnet", 3, str(tmp_path / "missing.pt"))


def test_scale_transform_needs_scale_size(tmp_path: Path) -> None:
    config = TrainConfig(**(TINY | {"transforms": ("flip", "scale"), "scale_size": None, "out": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"the scale transform needs --scale-size"):
        train(config, device="cpu")
