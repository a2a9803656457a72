"""The command line of :mod:`examples.train`: ``python -m examples.train --preset NAME ...``.

Every field of :class:`~examples.train.TrainConfig` is an option (``scale_size`` is
``--scale-size``); ``--preset`` starts from the settings of a preset (:mod:`examples.presets`),
which the options given override; ``--resume`` continues from ``OUT/last.pt``, ``--device``
picks the device. The help is the training script's own (``python -m examples.train --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import examples.train as script
from examples.presets import PRESETS
from examples.train import TrainConfig, train
from examples.validation import argument_type, device_type, json_value

__all__ = ["JSON_EXAMPLES", "main", "parse_args"]


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# settings that take a list of names on the command line, with their help
_NAME_LISTS = {
    "transforms": "views: flip scale rotate translate",
    "stages": "side heads (MSAC), e.g. layer2 layer3 layer4",
    "freeze": "modules whose weights are not trained (batch-norm statistics still adapt), e.g. _conv_stem _bn0 _blocks.0",
}


#: the help of the JSON flags: an example each accepts (with --stages layer2 layer3 layer4, as ResNets name them)
JSON_EXAMPLES = {
    "weights": 'transform name -> weight, JSON, e.g. {"flip": 0.6, "scale": 0.8}',
    "supervision": 'head (a stage of --stages, or "output") -> classification weight, JSON, '
    'e.g. {"layer2": 0.5, "output": 1.0}',
    "stage_weights": 'stage of --stages -> weight of its consistency terms, JSON, e.g. {"layer2": 0.5, "layer4": 1.0}',
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The settings of the command line ``argv`` (``sys.argv`` without it) and all its arguments."""
    parser = argparse.ArgumentParser(description=script.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings for a table row")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    parser.add_argument("--device", type=device_type, help="cpu, cuda, cuda:1 (default: cuda if available)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if field.name in _NAME_LISTS:
            parser.add_argument(
                flag, nargs="*", type=argument_type(field.name, str), default=None, help=_NAME_LISTS[field.name]
            )
        elif field.name == "synthetic_sizes":
            parser.add_argument(
                flag, nargs=2, type=argument_type(field.name, float), default=None, metavar=("MIN", "MAX")
            )
        elif field.name in JSON_EXAMPLES:
            parser.add_argument(
                flag, type=argument_type(field.name, json_value), default=None, help=JSON_EXAMPLES[field.name]
            )
        elif isinstance(value, bool) or field.type in ("bool | None", "bool"):
            parser.add_argument(flag, type=argument_type(field.name, _parse_bool), default=None, metavar="BOOL")
        elif isinstance(value, int) or "int" in str(field.type):
            parser.add_argument(flag, type=argument_type(field.name, int), default=None)
        elif isinstance(value, float):
            parser.add_argument(flag, type=argument_type(field.name, float), default=None)
        else:
            parser.add_argument(flag, type=argument_type(field.name, str), default=None)
    args = parser.parse_args(argv)
    settings = dict(PRESETS.get(args.preset, {}))
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name)
        if given is not None:
            settings[field.name] = tuple(given) if field.name in (*_NAME_LISTS, "synthetic_sizes") else given
    return TrainConfig(**settings), args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train (or resume) as the command line ``argv`` says; returns the per-epoch metrics."""
    config, args = parse_args(argv)
    return train(config, device=args.device, resume=args.resume)
