"""Argument checks shared by the public modules: one wording for every error."""

from __future__ import annotations

import math
import numbers
from typing import Literal, overload

import torch
from torch import Tensor

__all__: list[str] = []


def check_tensor(name: str, value: object, ndim: int | None = None, layout: str = "", floating: bool = False) -> Tensor:
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


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is an integer ``>= 1`` (not a bool), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_weight(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number ``>= 0`` (a loss weight)."""
    number = check_finite_number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0 (a negative weight trains the term backwards), got {value!r}")
    return number


@overload
def check_bool(name: str, value: object, optional: Literal[False] = False) -> bool: ...


@overload
def check_bool(name: str, value: object, optional: bool) -> bool | None: ...


def check_bool(name: str, value: object, optional: bool = False) -> bool | None:
    """Return ``value`` if it is a bool (or ``None`` when ``optional``), else raise a TypeError.

    A number is refused: ``0``/``1`` for a flag is usually a value passed to the wrong argument.
    """
    if isinstance(value, bool) or (optional and value is None):
        return value
    expected = "a bool or None" if optional else "a bool"
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def check_generator(name: str, value: object) -> torch.Generator | None:
    """Return ``value`` if it is ``None`` or a CPU ``torch.Generator``.

    Parameters are drawn as Python numbers on the host: a generator on an accelerator
    would make every draw wait for the device.
    """
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise ValueError(
            f"{name} must be a CPU torch.Generator (parameters are drawn on the host), got one on {value.device}"
        )
    return value


def check_spatial(name: str, value: Tensor, layout: str) -> Tensor:
    """Return ``value`` if its last two (spatial) sizes are positive, else raise naming the shape.

    A 0-sized map has no cell to compare: every mean over it would be 0 / 0.
    """
    if value.shape[-2] == 0 or value.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty spatial size {layout}, got shape {tuple(value.shape)}")
    return value


# Target values of each label encoding: 'signed' is WIDER Attribute's, with 0 unspecified.
ENCODINGS: dict[str, tuple[float, ...]] = {"binary": (0.0, 1.0), "signed": (-1.0, 0.0, 1.0)}


def check_encoding(encoding: object) -> str:
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a str ('binary' or 'signed'), got {type(encoding).__name__}")
    if encoding not in ENCODINGS:
        raise ValueError(
            f"encoding must be 'binary' or 'signed', got {encoding!r} "
            "('binary': 0/1; 'signed': 1/-1/0 with 0 unspecified)"
        )
    return encoding


def check_target_dtype(name: str, targets: Tensor, encoding: str) -> Tensor:
    """Refuse target dtypes that cannot hold the encoding (no data is read).

    A bool or unsigned tensor holds no -1: declared ``'signed'``, each of its 0s would be
    taken as unspecified, the trap of dropping every negative. Bool targets are 0/1.
    """
    if targets.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {targets.dtype}")
    if encoding == "signed" and not targets.is_signed():
        raise TypeError(
            f"{name} of dtype {targets.dtype} cannot hold -1 (negative), so with encoding='signed' every 0 "
            "would be unspecified; use encoding='binary' for 0/1 targets"
        )
    return targets


def check_reduction(reduction: str) -> str:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str ('none', 'mean' or 'sum'), got {type(reduction).__name__}")
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


class NonFiniteError(ValueError):
    """What :func:`check_finite` raises: a ValueError that a caller can tell from the others."""


def check_finite(name: str, value: Tensor) -> None:
    # One reduction in the common case: a finite sum means no nan/inf (an overflowing sum
    # of finite values falls through to the exact count).
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return
    bad = int((~torch.isfinite(value)).sum())
    raise NonFiniteError(f"{name} has {bad} non-finite values (nan or inf) out of {value.numel()}")


def check_not_meta(name: str, value: Tensor) -> Tensor:
    """Refuse a tensor on the meta device: it has a shape but no values to compute with."""
    if value.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it has a shape but no values, so nothing can be computed from it; "
            "materialise the model and the data on a real device first (e.g. model.to_empty(device=...) and "
            "load the weights)"
        )
    return value
