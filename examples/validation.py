"""The checks of every setting of :mod:`examples.train`, made before anything is built.

One rule per setting serves both the command line (:func:`argument_type`, an argparse ``type=``)
and a :class:`~examples.train.TrainConfig` built in code (:func:`validate_config`), so that a
value that would train nothing, train backwards or fail deep inside torch fails at once with a
message naming the flag and the value, e.g. ``--lr-gamma must be in (0, 1], got -1.0``.

A setting without a rule of its own is checked against its declared type (a ``float`` must be
finite, a ``bool`` a bool, ...), so that a setting added later is not left unchecked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attn_consistency import available_transforms
from attn_consistency._validation import check_weight
from examples.models import check_arch

__all__ = [
    "DATASETS",
    "argument_type",
    "check_training_set",
    "count_type",
    "device_type",
    "flag",
    "json_value",
    "validate_config",
]

DATASETS = ("wider", "pa100k", "coco", "voc", "vg500", "csv", "synthetic", "digits")

Rule = Callable[[Any], None]
"""Raises ValueError (TypeError for a wrong type) with a message that reads after the flag."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``lr_gamma`` -> ``--lr-gamma``."""
    return "--" + name.replace("_", "-")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def _count(low: int, high: int | None = None, why: str = "") -> Rule:
    def rule(value: Any) -> None:
        number = _integer(value)
        if number < low or (high is not None and number > high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"must be {bound}{why}, got {value!r}")

    return rule


def _interval(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, why: str = ""
) -> Rule:
    def rule(value: Any) -> None:
        number = _real(value)
        if number < low or (low_open and number == low) or number > high or (high_open and number == high):
            if high == math.inf:
                bound = f"> {low}" if low_open else f">= {low}"
            else:
                bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"must be {bound}{why}, got {value!r}")

    return rule


def _choice(*options: str) -> Rule:
    listed = ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"

    def rule(value: Any) -> None:
        if value not in options:
            raise ValueError(f"must be {listed}, got {value!r}")

    return rule


def _text(value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"must not be empty, got {value!r}")


def _boolean(value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {type(value).__name__} {value!r}")


def _transform_name(value: Any) -> None:
    _text(value)
    if value not in available_transforms():
        raise ValueError(f"names no transform: {value!r}; available: {', '.join(available_transforms())}")


def _names(what: str, item: Rule) -> Rule:
    """A sequence of names, each checked by ``item``, none repeated."""

    def rule(value: Any) -> None:
        if isinstance(value, str) or not isinstance(value, tuple | list):
            raise TypeError(f"must be a sequence of {what}, got {type(value).__name__} {value!r}")
        for name in value:
            item(name)
        repeated = sorted({name for name in value if list(value).count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(map(repr, repeated))} more than once, got {tuple(value)}")

    return rule


_transforms = _names("transform names", _transform_name)
_stages = _names("stage (module) names", _text)


def _weights(value: Any) -> None:
    if not isinstance(value, dict):
        raise TypeError(f'must be a JSON object of transform name -> weight, e.g. {{"flip": 0.6}}, got {value!r}')
    for name, weight in value.items():
        check_weight(f"weights[{name!r}]", weight)


def _head_weights(value: Any) -> None:
    if not isinstance(value, dict):
        raise TypeError(f'must be a JSON object of name -> weight, e.g. {{"layer2": 0.5}}, got {value!r}')
    for name, weight in value.items():
        check_weight(f"the weight of {name!r}", weight)


def _sizes(value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"must be a (MIN, MAX) pair, got {value!r}")
    low, high = (_real(v) for v in value)
    if not 0 < low <= high < 1:
        raise ValueError(f"must be MIN MAX with 0 < MIN <= MAX < 1 (fractions of the image side), got {tuple(value)}")


def _arch(value: Any) -> None:
    _text(value)
    check_arch(value)


def _dataset(value: Any) -> None:
    if value not in DATASETS:
        raise ValueError(f"unknown dataset {value!r}: use {', '.join(DATASETS[:-1])} or {DATASETS[-1]}")


_RULES: dict[str, Rule] = {
    "dataset": _dataset,
    "arch": _arch,
    "image_size": _count(1),
    "scale_size": _count(1),
    "transforms": _transforms,
    "augmentation": _choice("views", "random"),
    "mode": _choice("product", "independent"),
    "weights": _weights,
    "stages": _stages,
    "freeze": _names("module names", _text),
    "supervision": _head_weights,
    "stage_weights": _head_weights,
    "translate_fraction": _interval(-1, 1, low_open=True, high_open=True, why=" (a fraction of the width)"),
    "warmup": _interval(0, 1, why=" (a fraction of the run's steps)"),
    "warmup_delay": _interval(0, 1, why=" (a fraction of the run's steps)"),
    "warmup_trigger": _interval(0, 1, high_open=True, why=" (a fraction of the starting classification loss; 0: off)"),
    "distance": _choice("mse", "relative", "correlation"),
    "warmup_shape": _choice("linear", "cosine", "gaussian"),
    "stop_gradient": _choice("original", "transformed"),
    "epochs": _count(1),
    "batch_size": _count(1),
    "test_batch_size": _count(1),
    "optimizer": _choice("sgd", "adam"),
    "lr": _interval(0, low_open=True),
    "momentum": _interval(0, 1, high_open=True),
    "weight_decay": _interval(0),
    "lr_step": _count(1, why=" (epochs between two decays)"),
    "lr_gamma": _interval(0, 1, low_open=True, why=" (the factor of each decay)"),
    "workers": _count(0),
    "seed": _count(0, 2**32 - 1),
    "out": _text,
    "tensorboard": _text,
    "tensorboard_images": _count(0),
    "max_steps": _count(1),
    "synthetic_train": _count(1),
    "synthetic_test": _count(1),
    "synthetic_classes": _count(1, 8, why=" (the shapes of examples.synthetic)"),
    "synthetic_objects": _count(1),
    "synthetic_sizes": _sizes,
}

_BY_TYPE: dict[str, Rule] = {"int": _integer, "float": _real, "bool": _boolean, "str": _text}


def _rule(field: dataclasses.Field) -> tuple[Rule | None, bool]:
    """The rule of a setting and whether ``None`` is allowed, from its declared type."""
    declared = str(field.type).replace(" ", "")
    optional = declared.endswith("|None")
    return _RULES.get(field.name) or _BY_TYPE.get(declared.removesuffix("|None")), optional


def _check(field: dataclasses.Field, value: Any) -> None:
    rule, optional = _rule(field)
    if rule is None or (optional and value is None):
        return
    try:
        rule(value)
    except TypeError as error:
        raise TypeError(f"{flag(field.name)} {error}") from None
    except ValueError as error:
        raise ValueError(f"{flag(field.name)} {error}") from None


def validate_config(config: Any) -> None:
    """Raise :class:`ValueError` (:class:`TypeError` for a wrong type) naming the flag and the
    value of the first setting of ``config`` (a ``TrainConfig``) that cannot train as asked.

    Checks every setting on its own, then those that depend on each other: the weights name
    transforms of the run, the scale transform has a size, a local ``--pretrained`` file exists,
    ``--out`` and ``--data-root`` are folders.
    """
    for field in dataclasses.fields(config):
        _check(field, getattr(config, field.name))
    unknown = [name for name in config.weights if name not in config.transforms]
    if unknown:
        run = ", ".join(config.transforms) or "none"
        raise ValueError(
            f"--weights names {', '.join(map(repr, unknown))}, which is not a transform of this run "
            f"(--transforms: {run}): its weight would be ignored"
        )
    if "scale" in config.transforms and config.scale_size is None:
        raise ValueError("the scale transform needs --scale-size")
    _check_stage_settings(config)
    if config.pretrained not in (None, "imagenet") and not Path(config.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained names no file: {config.pretrained}")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise ValueError(f"--out {config.out} is a file, not a folder")
    if config.tensorboard is not None and Path(config.tensorboard).exists() and not Path(config.tensorboard).is_dir():
        raise ValueError(f"--tensorboard {config.tensorboard} is a file, not a folder")
    if config.data_root is not None and not Path(config.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {config.data_root} is not a folder")


def _check_stage_settings(config: Any) -> None:
    """The multi-scale settings name the run's stages (``output``: the model's own logits)."""
    heads = (*config.stages, "output")
    unused = [flag(name) for name in ("supervision", "stage_weights") if getattr(config, name)]
    unused += ["--fusion"] if config.fusion != "mean" else []
    if unused and not config.stages:
        raise ValueError(f"{unused[0]} sets the side heads, but --stages names none")
    for name, known in (("supervision", heads), ("stage_weights", config.stages)):
        unknown = [key for key in getattr(config, name) if key not in known]
        if unknown:
            raise ValueError(f"{flag(name)} names {unknown[0]!r}, which is not one of {', '.join(known)}")
    if config.stages and config.fusion not in ("mean", "last", *heads):
        raise ValueError(f"--fusion must be 'mean', 'last', 'output' or a stage of --stages, got {config.fusion!r}")


def check_training_set(config: Any, size: int, world: int = 1) -> None:
    """Refuse a batch larger than each replica's share of the training set: with ``drop_last``
    an epoch would take no step, and the run would write a checkpoint having trained nothing."""
    share = math.ceil(size / world)
    if share < config.batch_size:
        where = f" ({share} per process of {world})" if world > 1 else ""
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the training set of {size} samples{where}: "
            "an epoch would take no step"
        )


# --------------------------------------------------------------------------- argparse types


def _converter(parse: Callable[[str], Any], rule: Rule | None) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KINDS.get(parse, 'a value')}, got {text!r}") from None
        if rule is not None:
            try:
                rule(value)
            except (TypeError, ValueError) as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return convert


_KINDS: dict[Callable[[str], Any], str] = {int: "an integer", float: "a number"}
# Settings given as several values (nargs): the type sees one value at a time.
_ONE_OF_SEVERAL: dict[str, Rule] = {
    "transforms": _transform_name,
    "synthetic_sizes": _real,
    "stages": _text,
    "freeze": _text,
}
# Checked by validate_config only: an unknown name is a ValueError of train(), as it always was.
_NOT_AT_PARSE = {"dataset", "arch"}


def argument_type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` for setting ``name``: ``parse`` the text, then apply its rule
    (a number parsed with ``float`` must be finite even without a rule of its own)."""
    rule = _ONE_OF_SEVERAL.get(name) or _RULES.get(name) or (_real if parse is float else None)
    if name in _NOT_AT_PARSE:
        rule = None
    return _converter(parse, rule)


def json_value(text: str) -> Any:
    """``json.loads`` for argparse: a parse error says what was expected."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f'expected JSON such as {{"flip": 0.6}}, got {text!r} ({error})') from None


def count_type(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse ``type=`` for an integer of at least ``low``."""
    return _converter(int, _count(low, why=why))


def device_type(text: str) -> str:
    """An argparse ``type=`` for ``--device``: a device torch knows, and that this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch.cuda.is_available() is False on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text
