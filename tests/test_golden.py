"""The golden test: a reshaping of the code must leave every tensor of a training step equal, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from golden.cases import CASES, FIXTURE, decode, one_thread_case

GOLDEN = {name: decode(entries) for name, entries in json.loads(FIXTURE.read_text()).items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_four_view_step_is_what_it_was_bit_for_bit(name: str) -> None:
    fresh = one_thread_case(name)
    stored = GOLDEN[name]
    assert sorted(fresh) == sorted(stored)
    for key, value in stored.items():
        assert fresh[key].dtype == value.dtype and fresh[key].shape == value.shape, key
        assert torch.equal(fresh[key], value), f"{name}: {key} changed"


def test_the_golden_cases_differ_from_one_another() -> None:
    # a fixture where the options had no effect would prove nothing about them
    # (stop_gradient changes the gradients only, not the loss's value)
    losses = {name: GOLDEN[name]["loss"].item() for name in CASES if name != "gap-fc-stop-gradient"}
    assert len(set(losses.values())) == len(losses), losses
    paper, stopped = GOLDEN["gap-fc-paper"], GOLDEN["gap-fc-stop-gradient"]
    assert not torch.equal(paper["grad/body.0.weight"], stopped["grad/body.0.weight"])
