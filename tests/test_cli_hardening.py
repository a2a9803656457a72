"""Every flag of the scripts refuses a value that would train nothing, train backwards, draw the
wrong thing or fail deep inside torch, with a message naming the flag and the value (issue 13)."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import examples.train as train_module
from benchmarks import run as benchmark
from examples import demo, figure5
from examples.models import SmallResNet
from examples.train import PRESETS, TrainConfig, parse_args, save_atomic, train
from examples.validation import check_training_set, validate_config

TINY = {
    "image_size": 32, "scale_size": 24, "max_steps": 1, "epochs": 1, "batch_size": 4, "test_batch_size": 4,
    "workers": 0, "progress": False, "synthetic_train": 8, "synthetic_test": 8,
}  # fmt: skip


# ---------------------------------------------------------------- examples.train: at parse time

TRAIN_PARSE_ERRORS = [
    (["--epochs", "-1"], "argument --epochs: must be at least 1, got -1"),
    (["--epochs", "2.5"], "argument --epochs: expected an integer, got '2.5'"),
    (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
    (["--max-steps", "-1"], "argument --max-steps: must be at least 1, got -1"),
    (["--lr-gamma", "-1"], "argument --lr-gamma: must be in (0, 1] (the factor of each decay), got -1.0"),
    (["--lr-gamma", "0"], "argument --lr-gamma: must be in (0, 1] (the factor of each decay), got 0.0"),
    (["--lr-gamma", "2"], "argument --lr-gamma: must be in (0, 1] (the factor of each decay), got 2.0"),
    (["--lr-step", "0"], "argument --lr-step: must be at least 1 (epochs between two decays), got 0"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0.0"),
    (["--lr", "-0.001"], "argument --lr: must be > 0, got -0.001"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "1e400"], "argument --lr: must be a finite number, got inf"),
    (["--weight-decay", "-1"], "argument --weight-decay: must be >= 0, got -1.0"),
    (["--momentum", "-0.5"], "argument --momentum: must be in [0, 1), got -0.5"),
    (["--momentum", "1"], "argument --momentum: must be in [0, 1), got 1.0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--test-batch-size", "-4"], "argument --test-batch-size: must be at least 1, got -4"),
    (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["--image-size", "0"], "argument --image-size: must be at least 1, got 0"),
    (["--scale-size", "-24"], "argument --scale-size: must be at least 1, got -24"),
    (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["--synthetic-train", "0"], "argument --synthetic-train: must be at least 1, got 0"),
    (["--synthetic-test", "0"], "argument --synthetic-test: must be at least 1, got 0"),
    (
        ["--synthetic-classes", "9"],
        "argument --synthetic-classes: must be in [1, 8] (the shapes of examples.synthetic), got 9",
    ),
    (["--synthetic-objects", "0"], "argument --synthetic-objects: must be at least 1, got 0"),
    (["--synthetic-sizes", "0.2", "nan"], "argument --synthetic-sizes: must be a finite number, got nan"),
    (["--rotate-degrees", "inf"], "argument --rotate-degrees: must be a finite number, got inf"),
    (
        ["--translate-fraction", "1"],
        "argument --translate-fraction: must be in (-1, 1) (a fraction of the width), got 1.0",
    ),
    (
        ["--transforms", "flip", "flp"],
        "argument --transforms: names no transform: 'flp'; available: flip, rotate, scale, translate",
    ),
    (
        ["--weights", '{"flip": -1}'],
        "argument --weights: weights['flip'] must be >= 0 (a negative weight trains the term backwards), got -1",
    ),
    (["--weights", '{"flip": NaN}'], "argument --weights: weights['flip'] must be a finite number, got nan"),
    (["--weights", '{"flip": true}'], "argument --weights: weights['flip'] must be a number, got bool True"),
    (["--weights", "[0.6]"], "argument --weights: must be a JSON object of transform name -> weight"),
    (["--weights", "{flip: 1}"], "argument --weights: expected JSON such as {\"flip\": 0.6}, got '{flip: 1}'"),
    (["--optimizer", "rmsprop"], "argument --optimizer: must be 'sgd' or 'adam', got 'rmsprop'"),
    (["--augmentation", "mixup"], "argument --augmentation: must be 'views' or 'random', got 'mixup'"),
    (["--mode", "all"], "argument --mode: must be 'product' or 'independent', got 'all'"),
    (["--amp", "maybe"], "argument --amp: expected true/false, got 'maybe'"),
    (["--out", " "], "argument --out: must not be empty, got ' '"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "meta"], "argument --device: expected cpu, cuda or cuda:N, got 'meta'"),
]


def usage_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What an argparse refusal printed; it must exit with argparse's usage code 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), TRAIN_PARSE_ERRORS, ids=[" ".join(a) for a, _ in TRAIN_PARSE_ERRORS])
def test_train_flags_are_refused_at_parse_time(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(parse_args, argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_train_device_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "argument --device: 'cuda': torch.cuda.is_available() is False on this machine" in capsys.readouterr().err


def test_every_preset_passes_validation() -> None:
    for name, settings in PRESETS.items():
        validate_config(TrainConfig(**settings))
        config, _ = parse_args(["--preset", name])
        validate_config(config)


# ---------------------------------------------------------------- examples.train: before datasets are built

CONFIG_ERRORS = [
    ({"epochs": -1}, ValueError, "--epochs must be at least 1, got -1"),
    ({"epochs": 2.5}, TypeError, "--epochs must be an integer, got float 2.5"),
    ({"max_steps": 0}, ValueError, "--max-steps must be at least 1, got 0"),
    ({"lr_gamma": -1.0}, ValueError, "--lr-gamma must be in (0, 1] (the factor of each decay), got -1.0"),
    ({"lr_step": 0}, ValueError, "--lr-step must be at least 1 (epochs between two decays), got 0"),
    ({"lr": math.nan}, ValueError, "--lr must be a finite number, got nan"),
    ({"weight_decay": -1e-4}, ValueError, "--weight-decay must be >= 0, got -0.0001"),
    ({"warmup": -1.0}, ValueError, "--warmup must be in [0, 1] (a fraction of the run's steps), got -1.0"),
    ({"warmup": 1.5}, ValueError, "--warmup must be in [0, 1] (a fraction of the run's steps), got 1.5"),
    ({"consistency": "no"}, TypeError, "--consistency must be true or false, got str 'no'"),
    ({"amp": 1}, TypeError, "--amp must be true or false, got int 1"),
    ({"transforms": "flip"}, TypeError, "--transforms must be a sequence of transform names, got str 'flip'"),
    ({"transforms": ("flip", "flip")}, ValueError, "--transforms names 'flip' more than once"),
    ({"transforms": ("flip", "flp")}, ValueError, "--transforms names no transform: 'flp'"),
    (
        {"weights": {"flp": 0}},
        ValueError,
        "--weights names 'flp', which is not a transform of this run (--transforms: flip, scale)",
    ),
    ({"weights": {"flip": -0.5}}, ValueError, "--weights weights['flip'] must be >= 0"),
    ({"weights": {"flip": math.inf}}, ValueError, "--weights weights['flip'] must be a finite number, got inf"),
    ({"synthetic_sizes": (0.45, 0.25)}, ValueError, "--synthetic-sizes must be MIN MAX with 0 < MIN <= MAX < 1"),
    ({"scale_size": None}, ValueError, "the scale transform needs --scale-size"),
    (
        {"dataset": "imagenet"},
        ValueError,
        "--dataset unknown dataset 'imagenet': use wider, pa100k, coco, voc, vg500, csv, synthetic or digits",
    ),
    ({"arch": "resnet5000"}, ValueError, "--arch unknown arch 'resnet5000'"),
    ({"optimizer": "rmsprop"}, ValueError, "--optimizer must be 'sgd' or 'adam', got 'rmsprop'"),
    ({"seed": 2**40}, ValueError, "--seed must be in [0, 4294967295], got 1099511627776"),
    ({"pretrained": "missing/weights.pth"}, FileNotFoundError, "--pretrained names no file: missing/weights.pth"),
]


@pytest.mark.parametrize(("settings", "error", "message"), CONFIG_ERRORS, ids=[str(s) for s, _, _ in CONFIG_ERRORS])
def test_train_refuses_settings_before_building_anything(
    settings: dict, error: type, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "build_datasets", lambda config: pytest.fail("datasets built for a bad setting"))
    out = tmp_path / "run"
    config = TrainConfig(**(PRESETS["synthetic-acfs"] | TINY | {"out": str(out)} | settings))
    with pytest.raises(error, match=re.escape(message)):
        train(config, device="cpu")
    assert not out.exists()  # nothing written, not even the folder


def test_weights_naming_no_transform_of_the_run_are_refused_from_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("--weights names 'flp', which is not a transform of this run")):
        train_module.main(["--preset", "synthetic-acfs", "--weights", '{"flp": 0}', "--out", str(tmp_path)])


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"--out {tmp_path / 'run'} is a file, not a folder")):
        train(TrainConfig(**(PRESETS["synthetic"] | TINY | {"out": str(tmp_path / "run")})), device="cpu")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--data-root {tmp_path / 'nowhere'} is not a folder")):
        train(
            TrainConfig(
                **(PRESETS["wider-r50"] | TINY | {"data_root": str(tmp_path / "nowhere"), "out": str(tmp_path)})
            )
        )


@pytest.mark.parametrize(("batch", "world", "size"), [(16, 1, 8), (5, 3, 10), (5, 2, 8)])
def test_a_batch_larger_than_the_training_set_is_refused_before_training(
    batch: int, world: int, size: int, tmp_path: Path
) -> None:
    # drop_last: an epoch would take no step, report loss 0 and write a checkpoint of an untrained net
    config = TrainConfig(
        **(PRESETS["synthetic"] | TINY | {"batch_size": batch, "synthetic_train": size, "out": str(tmp_path)})
    )
    share = f" ({math.ceil(size / world)} per process of {world})" if world > 1 else ""
    message = (
        f"--batch-size {batch} is larger than the training set of {size} samples{share}: an epoch would take no step"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        check_training_set(config, size, world)
    check_training_set(config, size + world * batch, world)  # enough: no error
    if world == 1:
        with pytest.raises(ValueError, match=re.escape(message)):
            train(config, device="cpu")
        assert list(tmp_path.iterdir()) == []  # no checkpoint, no metrics


# ---------------------------------------------------------------- examples.demo


def test_demo_refuses_fewer_images_than_one_batch_and_an_out_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag in ("--train-images", "--pretrain-images"):
        with pytest.raises(SystemExit):
            demo.main(["--out", str(tmp_path), flag, "8"])
        assert f"{flag} 8 is less than one batch (16 images)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "x"])
    assert "argument --epochs: expected an integer, got 'x'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # nothing trained


# ---------------------------------------------------------------- examples.figure5


def fake_checkpoint(path: Path, classes: int = 4, **settings) -> Path:
    """A checkpoint as examples.train writes it, of an untrained small net on synthetic data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        **(PRESETS["synthetic"] | TINY | {"synthetic_classes": classes, "out": str(path.parent)} | settings)
    )
    save_atomic(
        {
            "model": SmallResNet(classes).state_dict(), "optimizer": {}, "epoch": 0,
            "config": json.dumps(dataclasses.asdict(config)), "history": json.dumps([{"epoch": 1}]),
            "label_names": ["disc", "square", "triangle", "ring", "cross", "bar", "diamond", "frame"][:classes],
            "pretrained_sha256": None,
        },
        path,
    )  # fmt: skip
    return path


def test_figure5_draws_two_checkpoints(tmp_path: Path) -> None:
    a, b = fake_checkpoint(tmp_path / "a" / "last.pt"), fake_checkpoint(tmp_path / "b" / "last.pt")
    out = figure5.main([str(a), str(b), "--label", "square", "--indices", "0", "7", "--out", str(tmp_path / "f.png")])
    assert out == tmp_path / "f.png" and out.stat().st_size > 1000


def test_figure5_refuses_a_file_that_is_not_a_checkpoint_naming_it(tmp_path: Path) -> None:
    plain = tmp_path / "weights.pt"
    torch.save(SmallResNet(4).state_dict(), plain)
    message = f"{plain}: not a checkpoint written by examples.train: no 'config' (a state dict of weights? --pretrained takes those)"
    with pytest.raises(ValueError, match=re.escape(message)):
        figure5.main([str(plain), "--label", "0"])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: not a readable checkpoint")):
        figure5.load_trained(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {tmp_path / 'none.pt'}")):
        figure5.load_trained(tmp_path / "none.pt")
    newer = fake_checkpoint(tmp_path / "newer" / "last.pt")
    state = train_module.load_checkpoint(newer)
    save_atomic(state | {"config": json.dumps(json.loads(state["config"]) | {"from_the_future": 1})}, newer)
    with pytest.raises(
        ValueError, match=re.escape(f"{newer}: settings unknown to this version of examples.train: from_the_future")
    ):
        figure5.load_trained(newer)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--indices", "-1"], "argument --indices: must be at least 0, got -1"),
        (["--indices", "0", "8"], "--indices [8] beyond the test set of 8 images (0 to 7)"),
        (["--label", "hexagon"], "--label 'hexagon' is not one of ['disc', 'square', 'triangle', 'ring']"),
        (["--label", "4"], "--label '4' is not one of"),
        (["--out", "figure.xyz"], "argument --out: 'figure.xyz' must end in one of ."),
        (["--names", "A"], "--names has 1 entries for 2 checkpoints"),
        (["--names", "A", "A"], "--names repeat 'A': give each checkpoint its own name"),
    ],
)
def test_figure5_flags(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = fake_checkpoint(tmp_path / "a" / "last.pt"), fake_checkpoint(tmp_path / "b" / "last.pt")
    argv = [str(a), str(b), *(argv if "--label" in argv else ["--label", "0", *argv])]
    with pytest.raises(SystemExit):
        figure5.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "f.png")]))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


def test_figure5_refuses_checkpoints_of_other_data_or_alike_folder_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = fake_checkpoint(tmp_path / "a" / "last.pt"), fake_checkpoint(tmp_path / "b" / "last.pt", classes=6)
    with pytest.raises(SystemExit):
        figure5.main([str(a), str(b), "--label", "0"])
    assert (
        f"{b} was trained on other data than {a}: labels ['disc', 'square', 'triangle', 'ring', 'cross', 'bar']"
        in capsys.readouterr().err
    )
    c, d = fake_checkpoint(tmp_path / "x" / "run" / "last.pt"), fake_checkpoint(tmp_path / "y" / "run" / "last.pt")
    with pytest.raises(SystemExit):
        figure5.main([str(c), str(d), "--label", "0"])
    assert "the checkpoints' folders (the default --names) repeat 'run'" in capsys.readouterr().err


def test_figure5_function_checks_its_arguments() -> None:
    model = SmallResNet(4)
    with pytest.raises(
        ValueError, match=re.escape(r"images must be a (K, 3, H, W) tensor with K >= 1, got (0, 3, 32, 32)")
    ):
        figure5.figure5({"m": model}, torch.zeros(0, 3, 32, 32), 0, "unused.png")
    with pytest.raises(ValueError, match="models must hold at least one model"):
        figure5.figure5({}, torch.zeros(1, 3, 32, 32), 0, "unused.png")
    with pytest.raises(ValueError, match=re.escape("label must be in [0, 3] (the model's labels), got 4")):
        figure5.figure5({"m": model}, torch.zeros(1, 3, 32, 32), 4, "unused.png")
    with pytest.raises(ValueError, match="scale_factor must be a finite number > 0, got nan"):
        figure5.figure5({"m": model}, torch.zeros(1, 3, 32, 32), 0, "unused.png", scale_factor=math.nan)


# ---------------------------------------------------------------- benchmarks.run

BENCHMARK_ERRORS = [
    (["--batch", "2", "0"], "--batch must be >= 1, got 0"),
    (["--labels", "0"], "--labels must be >= 1, got 0"),
    (["--loss-rounds", "0"], "--loss-rounds must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--seed", "-3"], "--seed must be >= 0, got -3"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--reference-memory-gb", "nan"], "--reference-memory-gb must be a finite number > 0, got nan"),
    (["--reference-memory-gb", "0"], "--reference-memory-gb must be a finite number > 0, got 0.0"),
    (["--device", "gpu"], "--device must be cpu or cuda (cuda:1, ...), got 'gpu'"),
    (["--device", "mps"], "--device must be cpu or cuda (cuda:1, ...), got 'mps'"),
    (["--transforms", "flp"], "--transforms: unknown transform 'flp'"),
    (["--transforms", "flip", "flip"], "--transforms repeats flip"),
    (["--runner", "eager", "eager"], "--runner repeats eager"),
    (["--arch", "resnet5"], "--arch: arch must be 'tiny' or a torchvision"),
    (["--loss-shapes", "1:2:3"], "--loss-shapes: loss shape must be one of"),
    (["--size", "x"], "argument --size: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("argv", "message"), BENCHMARK_ERRORS, ids=[" ".join(a) for a, _ in BENCHMARK_ERRORS])
def test_benchmark_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in usage_error(benchmark.main, ["--preset", "smoke", "--dry-run", *argv], capsys)


@pytest.mark.parametrize("output", ["result.md", "folder", "file/result.json"])
def test_benchmark_output_is_checked_before_the_run(output: str, tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")  # a file where the output's folder should be
    monkeypatch.setattr(benchmark, "_run", lambda *args: pytest.fail("ran with an output it cannot write"))
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "smoke", "--output", str(tmp_path / output)])
    expected = {
        "result.md": "the markdown table is written beside it as .md",
        "folder": "is a folder, expected a file name",
        "file/result.json": "cannot create its folder",
    }[output]
    assert f"--output {tmp_path / output}" in (err := capsys.readouterr().err) and expected in err
