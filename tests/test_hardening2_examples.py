"""The examples' and benchmarks' surfaces of issue 18: failures that name what is at fault."""

import argparse
import json

import pytest

from benchmarks import gain as gain_benchmark

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
