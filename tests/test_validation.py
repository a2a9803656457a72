"""The shared argument checks: each refuses with a message naming the argument."""

import math

import numpy as np
import pytest
import torch

from attn_consistency._validation import (
    check_bool,
    check_encoding,
    check_finite,
    check_finite_number,
    check_generator,
    check_number,
    check_reduction,
    check_spatial,
    check_target_dtype,
    check_weight,
    data_checks_enabled,
)


def test_numbers_accept_reals_and_refuse_bools_and_non_finite():
    assert check_number("x", np.float32(0.5)) == 0.5 and type(check_number("x", 3)) is float
    assert check_finite_number("x", -2) == -2.0 and check_weight("w", 0) == 0.0
    with pytest.raises(TypeError, match=r"x must be a number, got bool True"):
        check_finite_number("x", True)
    with pytest.raises(ValueError, match=r"x must be a finite number, got nan"):
        check_finite_number("x", math.nan)
    with pytest.raises(ValueError, match=r"w must be a finite number, got inf"):
        check_weight("w", math.inf)
    with pytest.raises(ValueError, match=r"w must be >= 0 \(a negative weight trains the term backwards\), got -0.5"):
        check_weight("w", -0.5)


def test_bools():
    assert check_bool("flag", False) is False and check_bool("flag", None, optional=True) is None
    with pytest.raises(TypeError, match=r"flag must be a bool, got NoneType None"):
        check_bool("flag", None)
    with pytest.raises(TypeError, match=r"flag must be a bool or None, got int 1"):
        check_bool("flag", 1, optional=True)


def test_generator():
    generator = torch.Generator()
    assert check_generator("generator", generator) is generator and check_generator("generator", None) is None
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        check_generator("generator", 0)


def test_spatial_size():
    check_spatial("maps", torch.zeros(0, 0, 1, 1), "(h, w)")  # empty N and L are fine
    with pytest.raises(ValueError, match=r"maps must have a non-empty spatial size \(h, w\), got shape \(1, 2, 3, 0\)"):
        check_spatial("maps", torch.zeros(1, 2, 3, 0), "(h, w)")


def test_encodings_and_target_dtypes():
    assert check_encoding("signed") == "signed"
    with pytest.raises(ValueError, match=r"encoding must be 'binary' or 'signed', got 'pm1'"):
        check_encoding("pm1")
    with pytest.raises(TypeError, match=r"encoding must be a str \('binary' or 'signed'\), got NoneType"):
        check_encoding(None)
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.float16):
        check_target_dtype("targets", torch.zeros(1, 1, dtype=dtype), "binary")
    check_target_dtype("targets", torch.zeros(1, 1, dtype=torch.int8), "signed")
    with pytest.raises(TypeError, match=r"targets of dtype torch.bool cannot hold -1"):
        check_target_dtype("targets", torch.zeros(1, 1, dtype=torch.bool), "signed")
    with pytest.raises(TypeError, match=r"targets must be real-valued, got dtype torch.complex64"):
        check_target_dtype("targets", torch.zeros(1, 1, dtype=torch.complex64), "binary")


def test_reduction():
    with pytest.raises(TypeError, match=r"reduction must be a str \('none', 'mean' or 'sum'\), got list"):
        check_reduction(["mean"])
    with pytest.raises(ValueError, match=r"reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        check_reduction("avg")


def test_finite_tensor_check_counts_and_survives_overflow():
    check_finite("x", torch.zeros(0))
    check_finite("x", torch.full((4,), 3e38))  # the sum overflows, the values are finite
    with pytest.raises(ValueError, match=r"x has 3 non-finite values \(nan or inf\) out of 5"):
        check_finite("x", torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.0]))


def test_data_checks_policy(monkeypatch):
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")  # 'meta' stands for an accelerator
    assert data_checks_enabled(None, cpu) is True
    assert data_checks_enabled(None, cpu, meta) is False
    assert data_checks_enabled(True, meta) is True and data_checks_enabled(False, cpu) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert data_checks_enabled(True, cpu) is False
