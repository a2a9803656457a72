"""The examples' and benchmarks' surfaces of issue 18: failures that name what is at fault."""

import argparse
import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import examples.train as train_module
from benchmarks import gain as gain_benchmark
from examples._files import remove_empty_folders
from examples.models import build_model
from examples.train import PRESETS, TrainConfig, build_heads, load_checkpoint, parse_args, save_atomic, train
from examples.validation import validate_config

# ---------------------------------------------------------------- benchmarks.gain --row


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [("out", "elsewhere", "give --out"), ("seed", 7, "give --seeds"), ("pretrained", "x.pt", "set by the regime")],
)
def test_gain_row_refuses_the_settings_the_harness_sets(key, value, hint) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        gain_benchmark._row_option(f"mine={json.dumps({key: value, 'lr': 0.1})}")
    assert f"--row mine: settings the harness sets itself cannot be given: {key!r}" in str(error.value)
    assert hint in str(error.value)


def test_gain_row_keeps_other_settings() -> None:
    name, settings = gain_benchmark._row_option('mine={"lr": 0.1}')
    assert name == "mine" and settings["lr"] == 0.1 and "out" not in settings


# ---------------------------------------------------------------- examples.train --help: examples that parse

TINY = {
    "image_size": 32, "scale_size": 24, "max_steps": 1, "epochs": 1, "batch_size": 4, "test_batch_size": 4,
    "workers": 0, "progress": False, "synthetic_train": 8, "synthetic_test": 8,
}  # fmt: skip


def _help_example(flag: str, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help over lines
    match = re.search(rf"{flag} \S+ [^{{]*e\.g\. (\{{[^}}]*\}})", text)
    assert match, f"no example in the help of {flag}"
    return match.group(1)


@pytest.mark.parametrize("flag", ["--weights", "--supervision", "--stage-weights"])
def test_the_example_in_the_help_of_each_json_flag_is_accepted(flag, capsys) -> None:
    example = _help_example(flag, capsys)
    argv = "--arch resnet18 --stages layer2 layer3 layer4 --transforms flip scale --scale-size 56".split()
    config, _ = parse_args([*argv, flag, example])
    assert getattr(config, flag[2:].replace("-", "_")) == json.loads(example)
    validate_config(config)
    heads = build_heads(config, build_model(config.arch, 3), 3)  # the heads check the names of both flags
    assert heads is not None
    heads.remove()


# ---------------------------------------------------------------- a full disk during a checkpoint write


def _full_disk(message: str):
    def save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        raise RuntimeError(message)

    return save


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


ENFORCE = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"


def test_torch_s_short_write_names_the_path_and_the_space_and_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"x": torch.arange(3), "epoch": 1}, path)
    monkeypatch.setattr(torch, "save", _full_disk(ENFORCE))
    with pytest.raises(OSError) as error:
        save_atomic({"x": torch.arange(7), "epoch": 2}, path)
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {path} after 20 bytes: RuntimeError: {ENFORCE}; ")
    assert "the disk may be full or over quota (" in message and f"free on {tmp_path} now)" in message
    assert message.endswith(f"{path} keeps its previous content")
    monkeypatch.undo()
    assert _listing(tmp_path) == ["last.pt"]  # no temporary left
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))


def test_a_write_on_a_disk_with_no_space_left_says_the_disk_is_full(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage._replace(free=4096))
    monkeypatch.setattr(torch, "save", _full_disk(ENFORCE))
    with pytest.raises(OSError) as error:
        save_atomic({"x": torch.arange(7)}, path)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).endswith(
        f"the disk is full or over quota (4.0 KiB free on {tmp_path} now); {path} was not written"
    )

    def no_space(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError) as error:
        save_atomic({"x": torch.arange(7)}, path)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(
        f"[Errno {errno.ENOSPC}] cannot write checkpoint {path}: {os.strerror(errno.ENOSPC)}"
    )
    assert "the disk is full or over quota" in str(error.value)
    assert _listing(tmp_path) == []


def test_a_training_run_on_a_full_disk_names_its_checkpoint(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _full_disk(ENFORCE))
    with pytest.raises(OSError, match=re.escape(f"cannot write checkpoint {out / 'last.pt'} after 20 bytes")):
        train(TrainConfig(**(PRESETS["synthetic"] | TINY | {"out": str(out)})), device="cpu")
    assert _listing(out) == ["metrics.csv", "metrics.json"]


# ---------------------------------------------------------------- resuming a checkpoint with a bad entry


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[TrainConfig, bytes]:
    out = tmp_path_factory.mktemp("finished")
    config = TrainConfig(**(PRESETS["synthetic-acfs"] | TINY | {"out": str(out)}))
    train(config, device="cpu")
    return config, (out / "last.pt").read_bytes()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("abc", "is a str, expected a state dict"),
        ({"_extra_state": {"bogus": 1}}, "does not fit this run: "),
        ([1, 2], "is a list, expected a state dict"),
    ],
)
def test_resuming_a_bad_consistency_entry_names_the_file_and_the_entry(finished_run, tmp_path, entry, problem) -> None:
    config, checkpoint = finished_run
    path = tmp_path / "last.pt"
    path.write_bytes(checkpoint)
    state = load_checkpoint(path)
    state["consistency"] = entry
    torch.save(state, path)
    resumed = dataclasses.replace(config, out=str(tmp_path), epochs=2)
    with pytest.raises(ValueError) as error:
        train(resumed, device="cpu", resume=True)
    expected = f"{path}: its 'consistency' entry (the consistency loss's schedule and diagnostics) {problem}"
    assert str(error.value).startswith(expected)


class _Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({}, "has no 'heads' entry (the side heads' weights), which this run needs"),
        ({"heads": "abc"}, "its 'heads' entry (the side heads' weights) is a str, expected a state dict"),
        ({"heads": {"weight": torch.zeros(3)}}, "its 'heads' entry (the side heads' weights) does not fit this run: "),
    ],
)
def test_the_heads_entry_is_checked_by_name(state, problem, tmp_path) -> None:
    with pytest.raises(ValueError) as error:
        train_module._load_entry(_Module(), state, "heads", tmp_path / "last.pt", "the side heads' weights")
    assert str(error.value).startswith(f"{tmp_path / 'last.pt'}: {problem}")


# ---------------------------------------------------------------- a failing run leaves no empty --out


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset", "csv"],  # refused when the datasets are built
        ["--preset", "synthetic", "--stages", "nope"],  # refused when the heads are built
        ["--preset", "synthetic", "--epochs", "0"],  # refused at parse time
    ],
)
def test_a_failing_run_leaves_no_empty_out_folder(argv, tmp_path) -> None:
    out = tmp_path / "new" / "run"
    tiny = ["--synthetic-train", "8", "--synthetic-test", "8", "--batch-size", "4", "--progress", "false"]
    with pytest.raises((ValueError, SystemExit)):
        train_module.main([*argv, *tiny, "--out", str(out)])
    assert _listing(tmp_path) == []


def test_a_first_write_that_fails_removes_the_folders_it_created(tmp_path, monkeypatch) -> None:
    (tmp_path / "kept").mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="cannot write metrics file"):
        train_module._write_metrics([{"epoch": 1}], tmp_path / "kept" / "a" / "b")
    monkeypatch.undo()
    assert _listing(tmp_path) == ["kept"] and _listing(tmp_path / "kept") == []
    remove_empty_folders([tmp_path / "missing"])  # a folder gone already is no error


def test_another_error_of_the_writer_is_not_blamed_on_the_disk(tmp_path) -> None:
    from examples._files import write_atomic

    def fails(handle) -> None:
        raise RuntimeError("cannot pickle 'generator' object")

    target = tmp_path / "last.pt"
    with pytest.raises(OSError, match=r"cannot pickle 'generator' object") as raised:
        write_atomic(target, fails, "checkpoint")
    assert "disk" not in str(raised.value)
    assert not list(tmp_path.iterdir())  # no temporary left, nothing written
