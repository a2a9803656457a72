"""Where the examples read and write files: one place, so that every failure names the file.

Readers raise :class:`FileNotFoundError` (``"<what> not found: <path>"``) for a missing file,
:class:`ValueError` whose message starts with the path for a file that is there but cannot be
parsed, and the :class:`OSError` of the system call, reworded to name the path, for anything
else (permissions, a full disk, an I/O error). Images name the annotation entry that points to
them as well.

Writers are atomic: :func:`write_atomic` writes a temporary file beside the target, flushes it
to disk and renames it over the target, so that the target is always either the old or the new
file. A process killed between the two steps leaves its temporary behind; the next write of the
same target removes the temporaries of processes that no longer exist. A write that fails (a
full disk: the system's ``ENOSPC``, or torch's writer's ``RuntimeError`` ``unexpected pos``)
removes its temporary and raises an :class:`OSError` naming the target, saying that it keeps its
previous content and how much space is left on its file system.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pickle
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import IO, Any
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image

__all__ = [
    "load_torch",
    "make_folder",
    "malformed",
    "not_found",
    "open_image",
    "read_csv_rows",
    "read_json",
    "read_lines",
    "read_xml",
    "remove_empty_folders",
    "remove_stale_temporaries",
    "save_torch_atomic",
    "shown",
    "write_atomic",
    "write_text_atomic",
]

StrPath = str | os.PathLike[str]


def shown(path: StrPath) -> str:
    """``path`` as a message shows it: as it is, or quoted (``repr``) where that would hide
    something, a name with whitespace at one of its ends (``'labels.csv '``) or a character
    that does not print."""
    text = os.fspath(path)
    if text.isprintable() and all(part == part.strip() for part in PurePath(text).parts):
        return text
    return repr(text)


def not_found(what: str, path: StrPath, suffix: str = "") -> str:
    """``"<what> not found: <path>"``, and the file meant when only whitespace at a name's end differs."""
    path = Path(path)
    message = f"{what} not found: {shown(path)}{suffix}"
    stripped = Path(*(part.strip() for part in path.parts)) if path.parts else path
    if stripped != path and stripped.exists():
        message += f"; {shown(stripped)} exists: a name in the path has whitespace at one of its ends"
    return message


def malformed(path: StrPath, problem: str) -> ValueError:
    """The error for a file that is there but does not hold what it should."""
    return ValueError(f"{shown(path)}: {problem}")


def _naming(error: OSError, action: str, what: str, path: StrPath) -> OSError:
    """``error`` reworded to name the file, keeping its errno (hence its subclass)."""
    reason = error.strerror or str(error)
    message = f"cannot {action} {what} {shown(path)}: {reason}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(not_found(what, path)) from None
    except OSError as error:
        raise _naming(error, "read", what, path) from error


def read_json(path: StrPath, what: str = "annotation file") -> Any:
    """The JSON document in ``path`` (UTF-8, or UTF-16/32 with its byte-order mark)."""
    path = Path(path)
    data = _read_bytes(path, what)
    try:
        return json.loads(data)
    except UnicodeDecodeError as error:
        raise malformed(path, f"not UTF-8 text (byte {error.start}: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise malformed(path, f"not valid JSON ({error})") from None
    except RecursionError:
        raise malformed(path, "not valid JSON (nested too deeply)") from None


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is ignored); a decoding error names the line."""
    data = _read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise malformed(path, f"line {line}: not UTF-8 text ({error.reason})") from None


def read_csv_rows(path: StrPath, what: str = "label file") -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every record of a UTF-8 CSV file (a byte-order mark is ignored)."""
    path = Path(path)
    lines = csv.reader(io.StringIO(_read_text(path, what), newline=""))
    while True:
        try:
            fields = next(lines)
        except StopIteration:
            return
        except csv.Error as error:
            raise malformed(path, f"line {lines.line_num + 1}: {error}") from None
        yield lines.line_num, fields


def read_lines(path: StrPath, what: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of every line of a UTF-8 text file, without its line ending."""
    yield from enumerate(_read_text(Path(path), what).splitlines(), 1)


def read_xml(path: StrPath, what: str) -> ElementTree.Element:
    """The root element of the XML document in ``path``."""
    path = Path(path)
    data = _read_bytes(path, what)
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise malformed(path, f"not valid XML ({error})") from None


# 16-bit greyscale files open in these modes; PIL's convert("RGB") clips their values at 255
# (a white image), so they are scaled to 8 bits first.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def open_image(path: StrPath, entry: str) -> Image.Image:
    """The image file ``path`` decoded and converted to RGB; ``entry`` (the annotation entry
    that names the image) appears in every error with the path.

    Greyscale, palette, RGBA (alpha dropped, as torchvision's loader) and CMYK images are
    converted; 16-bit greyscale is scaled to 8 bits.
    """
    try:
        with Image.open(path) as image:
            return _rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(not_found("image", path, f" (from {entry})")) from None
    except OSError as error:
        if error.errno is not None:  # the system's error (permissions, I/O), not PIL's decoder's
            raise _naming(error, "read", f"image (from {entry})", path) from error
        raise malformed(path, f"not a readable image ({error}); from {entry}") from error
    except Exception as error:  # PIL's decoders also raise SyntaxError, ValueError, EOFError...
        raise malformed(path, f"not a readable image ({type(error).__name__}: {error}); from {entry}") from error


def _refusal(error: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to load it unrestricted."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", text, re.S)
    if match:
        return f"it holds objects other than tensors and plain types ({match.group(1).strip() or 'unsupported data'})"
    if "weights_only" in text:
        return "it holds objects other than tensors and plain types"
    first = text.strip().splitlines()[0] if text.strip() else "the file ends early"
    return f"{type(error).__name__}: {first}"


def load_torch(path: StrPath, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain types only.

    A file holding anything else (a pickled object, another program's file, a truncated or
    empty file) raises :class:`ValueError` naming the file; such files are never loaded
    unrestricted, since unpickling arbitrary objects can run code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(not_found(what, path))
    if not path.is_file():
        raise malformed(path, f"not a file, expected a {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        if error.errno is not None:
            raise _naming(error, "read", what, path) from error
        raise malformed(path, f"not a readable {what} ({_refusal(error)})") from None
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as error:
        raise malformed(path, f"not a readable {what} ({_refusal(error)})") from None


# --------------------------------------------------------------------------- atomic writes

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _temporary(path: Path) -> Path:
    # The host in the name: on a shared file system a pid means nothing on another machine.
    return path.with_name(f".{path.name}.tmp{os.getpid()}@{_HOST}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return True
    return True


def remove_stale_temporaries(path: StrPath) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed; returns them.

    Only temporaries of this host whose process no longer exists are removed (names without a
    host, from earlier versions, count as this host's): a live writer's file is never touched.
    """
    path = Path(path)
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp(\d+)(?:@(.+))?")
    try:
        names = os.listdir(path.parent)
    except OSError:  # the write itself reports the folder
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or match.group(2) not in (None, _HOST):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it first
            (path.parent / name).unlink()
            removed.append(path.parent / name)
    return removed


def _sync_folder(folder: Path) -> None:
    # The rename itself reaches the disk only with the folder's entry; best effort where the
    # system does not allow opening a folder.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError  # unreachable


# less free space than this after a failed write: the disk is taken as full
_FULL = 64 * 2**20


def _write_failed(error: Exception, what: str, path: Path, tmp: Path) -> OSError:
    """The failure of a write of ``path`` (through ``tmp``), naming it and the space left."""
    written = None
    with contextlib.suppress(OSError):
        written = tmp.stat().st_size
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
    system = isinstance(error, OSError) and error.errno is not None
    reason = (error.strerror or str(error)) if isinstance(error, OSError) else str(error).strip().splitlines()[0]
    source = "" if isinstance(error, OSError) else f"{type(error).__name__}: "
    after = f" after {_size(written)}" if written else ""
    full = (system and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (free is not None and free < _FULL)
    if full:
        where = f" ({_size(free)} free on {shown(path.parent)} now)" if free is not None else ""
        space = f"the disk is full or over quota{where}"
    elif system:
        space = ""
    elif "unexpected pos" in reason:  # torch's writer's short write: a full disk or quota, most often
        where = f" ({_size(free)} free on {shown(path.parent)} now)" if free is not None else ""
        space = f"the disk may be full or over quota{where}"
    else:  # another error of the writer (e.g. an object torch cannot serialise): not the disk's
        space = ""
    kept = f"{shown(path)} keeps its previous content" if path.exists() else f"{shown(path)} was not written"
    message = f"cannot write {what} {shown(path)}{after}: {source}{reason}; " + "; ".join(filter(None, (space, kept)))
    code = error.errno if system else (errno.ENOSPC if full else None)
    return OSError(code, message) if code is not None else OSError(message)


def write_atomic(path: StrPath, write: Callable[[IO[bytes]], object], what: str) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any failure (a full disk, an interrupt) the temporary is removed and ``path`` keeps its
    previous content. An :class:`OSError`, or a :class:`RuntimeError` of the writer (torch's
    ``unexpected pos`` when the disk is full), becomes an :class:`OSError` naming ``path`` and
    ``what`` it is, and the space left when the disk is (or may be) full.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        raise _write_failed(error, what, path, tmp) from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    if os.name == "posix":
        _sync_folder(path.parent)


def make_folder(path: StrPath) -> list[Path]:
    """``mkdir -p path``; the folders it created, deepest first (for :func:`remove_empty_folders`)."""
    path = Path(path)
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are still empty: what a failed run created."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty, or gone
            folder.rmdir()


def save_torch_atomic(obj: Any, path: StrPath, what: str = "checkpoint") -> None:
    """:func:`torch.save` of ``obj`` to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda handle: torch.save(obj, handle), what)


def write_text_atomic(text: str, path: StrPath, what: str) -> None:
    """``text`` in UTF-8 to ``path`` through :func:`write_atomic`."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), what)
