"""The files of a run of :func:`examples.train.train`: its checkpoint ``last.pt`` and its metrics.

Every epoch writes ``metrics.json`` / ``metrics.csv`` (:func:`_write_metrics`) and the checkpoint
(:func:`save_train_checkpoint`, atomic: :func:`save_atomic`) to ``--out``; ``--resume`` reads the
checkpoint back (:func:`load_train_checkpoint`), checks that it is the same run
(:func:`_check_same_run`: the same settings and pretrained weights) and restores its modules
(:func:`_load_entry`). Every failure names the file (:mod:`examples._files`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from examples._files import (
    load_torch,
    make_folder,
    malformed,
    remove_empty_folders,
    save_torch_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from examples.train import TrainConfig

__all__ = ["load_checkpoint", "load_train_checkpoint", "save_atomic", "save_train_checkpoint"]


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, then rename it
    (:func:`examples._files.write_atomic`: a failure names ``path`` and leaves it as it was)."""
    save_torch_atomic(obj, path, "checkpoint")


def _write_text_atomic(text: str, path: Path) -> None:
    write_text_atomic(text, path, "metrics file")


_CHECKPOINT = {"model": dict, "optimizer": dict, "epoch": int, "config": str, "history": str, "label_names": list}


def load_checkpoint(path: str | Path) -> Any:
    """Read a file written by :func:`save_atomic` (tensors and plain types only).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path``, for a file torch cannot read or that holds other objects.
    """
    return load_torch(path, "checkpoint")


def load_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`examples.train.train`, checked to be one.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path``, for a file that is not such a checkpoint: unreadable,
            holding other objects, or a plain state dict (which ``--pretrained`` takes).
    """
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "config" not in state:
        hint = " (a state dict of weights? --pretrained takes those)" if isinstance(state, dict) else ""
        raise malformed(path, f"not a checkpoint written by examples.train: no 'config'{hint}")
    for key, kind in _CHECKPOINT.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise malformed(
                path, f"not a checkpoint written by examples.train: {key!r} is {type(state.get(key)).__name__}"
            )
    try:
        config, history = json.loads(state["config"]), json.loads(state["history"])
    except json.JSONDecodeError as error:
        raise malformed(path, f"the checkpoint's settings or history are not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(history, list) or len(history) != state["epoch"] + 1:
        raise malformed(path, f"the checkpoint's settings, history and epoch {state['epoch']} disagree")
    return state


def _write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    # the run's first write creates --out: a run that fails before it (a bad argument, a missing
    # file) leaves no empty folder, and neither does a first write that fails
    created = make_folder(out)
    try:
        _write_text_atomic(json.dumps(history, indent=2), out / "metrics.json")
        keys = list(dict.fromkeys(k for row in history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        _write_text_atomic(buffer.getvalue(), out / "metrics.csv")
    except BaseException:
        remove_empty_folders(created)
        raise


def _load_entry(module: nn.Module, state: dict[str, Any], key: str, path: Path, what: str) -> None:
    """``module.load_state_dict(state[key])``; a missing or unfitting entry names the file and the entry."""
    if key not in state:
        raise malformed(path, f"has no {key!r} entry ({what}), which this run needs")
    entry = state[key]
    if not isinstance(entry, dict):
        raise malformed(path, f"its {key!r} entry ({what}) is a {type(entry).__name__}, expected a state dict")
    try:
        module.load_state_dict(entry)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise malformed(path, f"its {key!r} entry ({what}) does not fit this run: {error}") from None


def save_train_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
    history: list[dict[str, Any]],
    label_names: list[str],
    pretrained_digest: str | None,
    consistency: nn.Module,
    heads: nn.Module | None,
) -> None:
    """Write the checkpoint of a run after ``epoch`` (0-based), as :func:`load_train_checkpoint` reads it."""
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "config": json.dumps(dataclasses.asdict(config)),
            "history": json.dumps(history),
            "label_names": label_names,
            "pretrained_sha256": pretrained_digest,
            "consistency": consistency.state_dict(),
            **({"heads": heads.state_dict()} if heads is not None else {}),
        },
        path,
    )


# Settings a resumed run may change: they do not alter what the finished epochs computed.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "out", "progress", "log", "workers", "test_batch_size", "tensorboard", "tensorboard_images"}
)


def _older_default(key: str, config: TrainConfig) -> Any:
    """A setting missing from a checkpoint was added later: the value that run behaved as.

    That is the setting's default (a field of ``config``'s class), except ``scale_source``, whose
    default now means ``'original'`` for files; runs before it resampled the batch.
    """
    if key == "scale_source":
        return "resize"
    field = {f.name: f for f in dataclasses.fields(config)}.get(key)
    if field is None:
        return None
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return json.loads(json.dumps(default))


def _file_digest(path: str | None) -> str | None:
    """SHA-256 of a local weights file (``None`` for no file or ``"imagenet"``)."""
    if path in (None, "imagenet"):
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_same_run(state: dict[str, Any], config: TrainConfig, pretrained_digest: str | None, path: Path) -> None:
    """Refuse to resume a checkpoint written with other settings or weights (it would mix two runs)."""
    saved = json.loads(state["config"])
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    # the warm-up is a fraction of the run's steps: more epochs would move it under a running run
    resumable = _RESUMABLE_CHANGES - (
        {"epochs"} if config.warmup or config.warmup_delay or config.warmup_trigger else set()
    )
    changed = [
        f"{key}: {saved.get(key, _older_default(key, config))!r} there, {value!r} here"
        for key, value in current.items()
        if key not in resumable and saved.get(key, _older_default(key, config)) != value
    ]
    if state.get("pretrained_sha256") != pretrained_digest:
        changed.append(f"the file {config.pretrained} changed since the run started")
    if changed:
        raise ValueError(
            f"cannot resume {path}: it was written with other settings ({'; '.join(changed)}). "
            "Resume with the same settings, or write to another --out."
        )
