"""Argument checks shared by the public modules: one wording for every error."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__: list[str] = []


def check_tensor(
    name: str, value: object, ndim: int | None = None, layout: str = "", floating: bool = False
) -> Tensor:
    """Return ``value`` if it is a tensor with ``ndim`` dimensions, else raise a message naming it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{shape}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def check_number(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number (not a bool), else raise a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_finite_number(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number, else raise naming ``name``."""
    number = check_number(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_weight(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number ``>= 0`` (a loss weight)."""
    number = check_finite_number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0 (a negative weight trains the term backwards), got {value!r}")
    return number


def check_reduction(reduction: str) -> str:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def data_checks_enabled(flag: bool | None, *tensors: Tensor) -> bool:
    """Whether to run checks that read tensor values (and so wait for the device).

    ``None`` means: check CPU tensors (no device to wait for) and skip tensors on an
    accelerator, where a check would stall the training step. Never checked while
    ``torch.compile`` traces, where a data-dependent branch would break the graph.
    """
    if torch.compiler.is_compiling():
        return False
    if flag is None:
        return all(t.device.type == "cpu" for t in tensors)
    return flag


def check_finite(name: str, value: Tensor) -> None:
    # One reduction in the common case: a finite sum means no nan/inf (an overflowing sum
    # of finite values falls through to the exact count).
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return
    bad = int((~torch.isfinite(value)).sum())
    raise ValueError(f"{name} has {bad} non-finite values (nan or inf) out of {value.numel()}")
