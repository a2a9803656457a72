"""Readers for the datasets of the paper's experiments, each reading the files as distributed.

Every reader is a :class:`torch.utils.data.Dataset` of ``(image, target)`` pairs with:

- ``label_names``: the label names in the order of the target columns;
- ``targets``: an ``(N, L)`` float tensor of every sample's labels, parsed from the annotation
  file alone (no image is opened), so that the positive ratio :math:`p_j` of the weighted
  cross-entropy (paper Eq. 2-3) can be computed before training;
- ``encoding``: ``"binary"`` for 0/1 labels, ``"signed"`` for 1 / -1 / 0 labels where 0 means
  *unspecified* (WIDER Attribute). Metrics must know which: dropping the zeros of a binary target
  drops every negative;
- ``image_paths``: the image file of every sample, and ``entries``: the annotation entry that
  names it (``"<annotation file>: <entry>"``);
- ``skipped``: the entries left out when the dataset was built (see below).

``__getitem__`` opens the image, converts it to RGB (greyscale, palette, RGBA, CMYK and 16-bit
files included), passes it through ``transform`` (the PIL image itself when ``transform`` is
None) and returns it with a copy of its target row. Images are only opened there: a missing
image raises :class:`FileNotFoundError`, an unreadable one (empty, truncated, not an image)
:class:`ValueError`, each naming the image's path and the entry that points to it.

Annotation files are validated when the dataset is built. A missing file raises
:class:`FileNotFoundError`; a malformed file or entry (not UTF-8, not valid JSON or CSV, a
missing key, a value of the wrong type, a label vector of the wrong length, a label value
outside the encoding) raises :class:`ValueError` whose message starts with the file's path and
names the entry, e.g.
``.../wider_attribute_trainval.json: images[3].targets[1].attribute has 13 values, expected 14``.

An entry that is well-formed but cannot be used as it is follows the authors' reader where it
has a rule (WIDER Attribute: a box that covers no pixel stands for the whole image). Otherwise it
is skipped: an image path leaving the dataset's folder (absolute or through ``..``), a repeated
entry, a box too large for any image. The skipped entries are listed in ``skipped`` and reported
once by a :class:`UserWarning` when the dataset is built; ``strict=True`` raises the
:class:`ValueError` of the first one instead. A split left with no sample raises.

Example:
    >>> from torchvision import transforms
    >>> train = WiderAttribute("data/WIDER", "trainval", transform=transforms.Compose(
    ...     [transforms.Resize((224, 224)), transforms.ToTensor()]))  # doctest: +SKIP
    >>> positive_ratio = (train.targets == 1).float().mean(0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset

from attn_consistency._validation import check_positive_int
from examples._files import malformed, not_found, open_image, read_csv_rows, read_json, read_lines, read_xml

__all__ = ["COCO2014", "ImageFolderCSV", "PA100K", "VG500", "VOC2007", "VOC_CLASSES", "WiderAttribute"]

StrPath = str | os.PathLike[str]
ImageTransform = Callable[[Image.Image], Any]

_LISTED = 5  # skipped entries quoted in the warning; all of them are in `skipped`


class _Samples:
    """What a reader collects from one annotation file: its samples and the entries it skips."""

    def __init__(self, path: Path, strict: bool) -> None:
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.path, self.strict = path, strict
        self.image_paths: list[Path] = []
        self.entries: list[str] = []
        self.labels: list[Any] = []
        self.skipped: list[str] = []
        self._first: dict[Hashable, str] = {}

    def skip(self, entry: str, problem: str) -> None:
        """Leave ``entry`` out (``strict``: raise) because of ``problem``."""
        if self.strict:
            raise malformed(self.path, f"{entry} {problem}")
        self.skipped.append(f"{self.path}: {entry} {problem}")

    def image(self, entry: str, folder: Path, name: str) -> Path | None:
        """``folder / name``; ``None``, the entry skipped, when ``name`` leads out of ``folder``."""
        # Lexical, so that a folder of symbolic links to the images (a common layout) still works.
        if "\x00" in name:
            raise malformed(self.path, f"{entry} names the image {name!r}, which holds a NUL character")
        parts = PurePath(name)
        if parts.is_absolute() or parts.drive or ".." in parts.parts:
            self.skip(entry, f"names the image {name!r}, which leads out of {folder}")
            return None
        return folder / name

    def first(self, key: Hashable, entry: str, what: str) -> bool:
        """Whether ``entry`` is the first with ``key``; a later one is skipped as a repeat."""
        first = self._first.setdefault(key, entry)
        if first != entry:
            self.skip(entry, f"repeats {first} ({what})")
            return False
        return True

    def add(self, entry: str, image_path: Path, labels: Any) -> None:
        self.entries.append(f"{self.path}: {entry}")
        self.image_paths.append(image_path)
        self.labels.append(labels)

    def report(self) -> None:
        """Warn once about the skipped entries; raise when no sample is left."""
        if self.skipped:
            listed = "; ".join(s.removeprefix(f"{self.path}: ") for s in self.skipped[:_LISTED])
            more = f"; and {len(self.skipped) - _LISTED} more" if len(self.skipped) > _LISTED else ""
            warnings.warn(
                f"{self.path}: skipped {len(self.skipped)} of {len(self.skipped) + len(self.entries)} entries "
                f"(listed in the dataset's .skipped; strict=True raises instead): {listed}{more}",
                stacklevel=4,
            )
        if not self.entries:
            raise malformed(self.path, "holds no sample" + (" that could be used" if self.skipped else ""))


class _MultiLabelImages(Dataset):
    """Images with one label vector each: subclasses parse the annotations, this class loads."""

    def __init__(
        self,
        samples: _Samples,
        targets: torch.Tensor,
        label_names: list[str],
        encoding: str,
        transform: ImageTransform | None,
    ) -> None:
        samples.report()
        self.image_paths = samples.image_paths
        self.entries = samples.entries
        self.skipped = samples.skipped
        self.targets = targets
        self.label_names = label_names
        self.encoding = encoding
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image = self._load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        # A copy, so that a caller editing the target in place cannot change the dataset.
        return image, self.targets[index].clone()

    def _load_image(self, index: int) -> Image.Image:
        return open_image(self.image_paths[index], self.entries[index])


def _check_split(split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"split must be one of {', '.join(map(repr, valid))}; got {split!r}")


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise malformed(path, f"the top level is a JSON {type(data).__name__}, expected an object")
    return data


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _get(path: Path, entry: str, container: Any, key: str, kind: type) -> Any:
    """``container[key]`` checked to be a ``kind``; ``entry`` names ``container`` in errors."""
    where = f"{entry}.{key}" if entry else key
    if not isinstance(container, dict):
        raise malformed(path, f"{entry} is a {type(container).__name__}, expected an object")
    if key not in container:
        raise malformed(path, f"missing {where}")
    value = container[key]
    # bool is an int subclass; true/false where a number belongs is a malformed entry.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise malformed(path, f"{where} is {value!r}, expected {_JSON_KINDS[kind]}")
    if kind is str and not value.strip():
        raise malformed(path, f"{where} is empty")
    return value


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)  # math.isfinite overflows on huge ints


def _check_labels(path: Path, where: str, values: Sequence[Any], allowed: tuple[int, ...]) -> None:
    for value in values:
        if not _is_finite_number(value) or value not in allowed:
            raise malformed(path, f"{where} contains {value!r}; values must be {', '.join(map(str, allowed))}")


def _check_names(path: Path, where: str, names: list[str]) -> list[str]:
    """Label names, each given once: a repeated name would make two columns indistinguishable."""
    if not names:
        raise malformed(path, f"{where} holds no label")
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            raise malformed(path, f"{where}[{k}] {name!r} repeats {where}[{seen[name]}]")
        seen[name] = k
    return names


class WiderAttribute(_MultiLabelImages):
    """WIDER Attribute: one sample per annotated person box, the image being the box's crop.

    Reads ``root/Anno/wider_attribute_{trainval,test}.json``; images lie under ``root/Image/``.
    Targets are the 14 ``attribute`` values kept raw (``encoding == "signed"``): 1 present,
    -1 absent, 0 unspecified. Label names come from ``attribute_id_map`` in id order.

    Cropping follows the authors' reader: ``bbox = [x, y, w, h]`` becomes the PIL box
    ``(x, y, x + w, y + h)`` cropped with :meth:`PIL.Image.Image.crop`, which rounds each
    coordinate to the nearest integer (Python's ``round``, half to even) and fills the part of the
    box outside the image with black. The authors take the whole image for a box "not annotated
    well": one starting beyond the image (``x > width`` or ``y > height``), and here also one that
    covers no pixel once rounded (zero or negative width or height), which their crop could not
    resize. The latter are known from the annotation file: they are listed in ``whole_image``
    and reported by a warning when the dataset is built (``strict=True`` raises instead). A box
    whose crop would exceed PIL's image size limit (``PIL.Image.MAX_IMAGE_PIXELS``) is skipped.
    A person repeated with the same file and box is skipped.

    Args:
        root: the dataset folder holding ``Anno/`` and ``Image/``.
        split: ``"trainval"`` (the paper's training set) or ``"test"``.
        transform: applied to the cropped PIL RGB image.
        strict: raise on the first entry that would be skipped or read as the whole image.

    Attributes:
        boxes: the ``[x, y, w, h]`` box of every sample, as in the annotation file.
        whole_image: the entries whose box covers no pixel, read as the whole image.

    Example:
        >>> data = WiderAttribute("data/WIDER", "test")  # doctest: +SKIP
        >>> crop, target = data[0]  # doctest: +SKIP
        >>> data.label_names[:3], target.shape  # doctest: +SKIP
        (['male', 'longhair', 'sunglass'], torch.Size([14]))
    """

    splits = ("trainval", "test")

    def __init__(
        self, root: StrPath, split: str = "trainval", transform: ImageTransform | None = None, *, strict: bool = False
    ) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "Anno" / f"wider_attribute_{split}.json"
        samples = _Samples(path, strict)
        data = _read_json(path)
        label_names = self._label_names(path, _get(path, "", data, "attribute_id_map", dict))
        self.boxes: list[tuple[float, float, float, float]] = []
        self.whole_image: list[str] = []
        for i, image in enumerate(_get(path, "", data, "images", list)):
            file_name = _get(path, f"images[{i}]", image, "file_name", str)
            people = _get(path, f"images[{i}]", image, "targets", list)
            image_path = samples.image(f"images[{i}]", root / "Image", file_name) if people else None
            for j, person in enumerate(people):
                entry = f"images[{i}].targets[{j}]"
                attribute = _get(path, entry, person, "attribute", list)
                if len(attribute) != len(label_names):
                    raise malformed(path, f"{entry}.attribute has {len(attribute)} values, expected {len(label_names)}")
                _check_labels(path, f"{entry}.attribute", attribute, (1, -1, 0))
                bbox = _get(path, entry, person, "bbox", list)
                box = self._box(samples, f"{entry}.bbox", bbox)
                if image_path is None or box is None:
                    continue
                if not samples.first((PurePath(file_name), box), entry, "the same file and bbox"):
                    continue
                if _covers_no_pixel(box):
                    self.whole_image.append(f"{path}: {entry}")
                self.boxes.append(box)
                samples.add(entry, image_path, attribute)
        if self.whole_image:
            warnings.warn(
                f"{path}: {len(self.whole_image)} of {len(samples.entries)} boxes cover no pixel once rounded; "
                f"each stands for the whole "
                f"image, as the authors' reader does for boxes not annotated well (listed in .whole_image): "
                + "; ".join(e.removeprefix(f"{path}: ") for e in self.whole_image[:_LISTED])
                + (" ..." if len(self.whole_image) > _LISTED else ""),
                stacklevel=2,
            )
        labels = samples.labels
        targets = torch.tensor(labels, dtype=torch.float32).reshape(len(labels), len(label_names))
        super().__init__(samples, targets, label_names, "signed", transform)

    @staticmethod
    def _label_names(path: Path, id_map: dict[str, Any]) -> list[str]:
        try:
            names = {int(key): name for key, name in id_map.items()}
        except ValueError:
            raise malformed(path, f"attribute_id_map keys must be integer ids, got {list(id_map)}") from None
        valid = len(names) == len(id_map) and sorted(names) == list(range(len(names)))  # "1" and "01" are one id
        if not valid or not all(isinstance(n, str) and n.strip() for n in names.values()):
            raise malformed(path, f"attribute_id_map must map ids 0..K-1 to names, got {id_map!r}")
        return _check_names(path, "attribute_id_map", [names[i] for i in range(len(names))])

    @staticmethod
    def _box(samples: _Samples, where: str, bbox: list[Any]) -> tuple[float, float, float, float] | None:
        """The box as a tuple; ``None`` (skipped) when its crop could not be taken."""
        if len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
            raise malformed(samples.path, f"{where} is {bbox!r}, expected 4 finite numbers [x, y, w, h]")
        x, y, w, h = bbox
        width, height = _crop_size(x, y, w, h)
        if width <= 0 or height <= 0:
            if samples.strict:
                raise malformed(samples.path, f"{where} {bbox!r} covers no pixel once rounded")
            return x, y, w, h
        limit = Image.MAX_IMAGE_PIXELS or 2**31
        if width * height > limit or max(abs(v) for v in bbox) >= 2**31:
            samples.skip(where, f"{bbox!r} is larger than any image PIL opens ({limit} pixels)")
            return None
        return x, y, w, h

    def _load_image(self, index: int) -> Image.Image:
        image = super()._load_image(index)
        box = self.boxes[index]
        x, y, w, h = box
        width, height = image.size
        if x > width or y > height or _covers_no_pixel(box):
            return image
        return image.crop((x, y, x + w, y + h))


def _crop_size(x: float, y: float, w: float, h: float) -> tuple[float, float]:
    """Width and height of PIL's crop of ``[x, y, w, h]`` (coordinates rounded), inf on overflow."""
    try:
        left, top, right, bottom = (round(v) for v in (x, y, x + w, y + h))
    except OverflowError:  # a sum beyond the float range
        return math.inf, math.inf
    return right - left, bottom - top


def _covers_no_pixel(box: tuple[float, float, float, float]) -> bool:
    width, height = _crop_size(*box)
    return width <= 0 or height <= 0


class PA100K(_MultiLabelImages):
    """PA-100K pedestrian attributes: 26 binary labels per image.

    Reads ``root/annotation.mat`` (MATLAB v5) with :func:`scipy.io.loadmat`: ``attributes``
    (26x1 cell of names), ``{split}_images_name`` (Kx1 cell of file names) and ``{split}_label``
    (Kx26 matrix of 0/1). Images lie under ``root/data/``. ``encoding == "binary"``. A repeated
    image name, or one leading out of ``data/``, is skipped (see the module's docstring).

    Args:
        root: the dataset folder holding ``annotation.mat`` and ``data/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to the PIL RGB image.
        strict: raise on the first entry that would be skipped.
    """

    splits = ("train", "val", "test")

    def __init__(
        self, root: StrPath, split: str = "train", transform: ImageTransform | None = None, *, strict: bool = False
    ) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "annotation.mat"
        samples = _Samples(path, strict)
        mat = self._read(path)
        label_names = _check_names(path, "attributes", self._cell_strings(path, mat, "attributes"))
        names_key = f"{split}_images_name"
        file_names = self._cell_strings(path, mat, names_key)
        key = f"{split}_label"
        labels = np.asarray(self._variable(path, mat, key))
        if labels.dtype.kind not in "biuf":
            raise malformed(path, f"{key} is a {labels.dtype} array, expected a matrix of 0/1")
        if labels.ndim != 2 or labels.shape[1] != len(label_names):
            raise malformed(
                path,
                f"{key} has shape {labels.shape}, expected ({len(file_names)}, {len(label_names)}): "
                f"one column per entry of attributes",
            )
        if labels.shape[0] != len(file_names):
            raise malformed(path, f"{key} has {labels.shape[0]} rows but {names_key} has {len(file_names)} names")
        bad = np.argwhere(~np.isin(labels, (0, 1)))
        if len(bad):
            row, column = bad[0]
            raise malformed(path, f"{key}[{row}, {column}] is {labels[row, column].item()!r}; values must be 0 or 1")
        for k, name in enumerate(file_names):
            entry = f"{names_key}[{k}]"
            image_path = samples.image(entry, root / "data", name)
            if image_path is not None and samples.first(PurePath(name), entry, f"the image {name!r}"):
                samples.add(entry, image_path, k)
        targets = torch.from_numpy(labels[samples.labels].astype(np.float32)).reshape(-1, len(label_names))
        super().__init__(samples, targets, label_names, "binary", transform)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if not path.exists():
            raise FileNotFoundError(not_found("annotation file", path))
        try:
            return scipy.io.loadmat(path)
        except OSError as error:
            if error.errno is not None:  # the system's error; scipy's truncated-file error has none
                raise OSError(error.errno, f"cannot read annotation file {path}: {error.strerror}") from error
            raise malformed(path, f"not a readable MATLAB v5 file ({error})") from error
        except Exception as error:  # scipy's parser fails with ValueError, MatReadError, zlib and struct errors...
            raise malformed(path, f"not a readable MATLAB v5 file ({type(error).__name__}: {error})") from error

    @staticmethod
    def _variable(path: Path, mat: dict[str, Any], key: str) -> Any:
        if key not in mat:
            raise malformed(path, f"missing variable {key}")
        return mat[key]

    @classmethod
    def _cell_strings(cls, path: Path, mat: dict[str, Any], key: str) -> list[str]:
        cells = np.asarray(cls._variable(path, mat, key))
        if cells.dtype != object:
            raise malformed(path, f"{key} is a {cells.dtype} array, expected a cell array of strings")
        strings = []
        for k, cell in enumerate(cells.ravel()):
            cell = np.asarray(cell)
            if cell.dtype.kind != "U" or cell.size != 1 or not str(cell.item()).strip():
                raise malformed(path, f"{key}[{k}] is {cell!r}, expected a string")
            strings.append(str(cell.item()))
        return strings


class COCO2014(_MultiLabelImages):
    """MS-COCO 2014 as multi-label classification: label j is 1 when the image has an instance of
    the j-th category.

    Reads ``root/annotations/instances_{split}2014.json`` without pycocotools; images lie under
    ``root/{split}2014/``. Every entry of ``images`` is a sample, in the order listed, including
    images without annotations (all-zero target): that is how train2014 counts 82,783 images and
    val2014 40,504. Columns follow ``categories`` as listed (80 entries, ids 1..90 with gaps).
    Crowd annotations (``iscrowd == 1``) count as presence: the category is visible in the image.
    ``encoding == "binary"``. An image whose ``file_name`` repeats an earlier one's, or leads out
    of the image folder, is skipped with its annotations (see the module's docstring).

    Args:
        root: the dataset folder holding ``annotations/`` and ``{train,val}2014/``.
        split: ``"train"`` or ``"val"``.
        transform: applied to the PIL RGB image.
        strict: raise on the first entry that would be skipped.
    """

    splits = ("train", "val")

    def __init__(
        self, root: StrPath, split: str = "train", transform: ImageTransform | None = None, *, strict: bool = False
    ) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "annotations" / f"instances_{split}2014.json"
        samples = _Samples(path, strict)
        data = _read_json(path)
        column = self._index(path, data, "categories", "name")
        _check_names(path, "categories", [name for _, name in column.values()])
        row: dict[int, int | None] = {}  # image id -> sample, None for a skipped image
        for image_id, (k, file_name) in self._index(path, data, "images", "file_name").items():
            entry = f"images[{k}]"
            image_path = samples.image(entry, root / f"{split}2014", file_name)
            if image_path is None or not samples.first(PurePath(file_name), entry, f"the file_name {file_name!r}"):
                row[image_id] = None
                continue
            row[image_id] = len(samples.entries)
            samples.add(entry, image_path, None)
        rows, columns = [], []
        for a, annotation in enumerate(_get(path, "", data, "annotations", list)):
            entry = f"annotations[{a}]"
            image_id = _get(path, entry, annotation, "image_id", int)
            category_id = _get(path, entry, annotation, "category_id", int)
            if image_id not in row:
                raise malformed(path, f"{entry}.image_id {image_id} is the id of no entry of images")
            if category_id not in column:
                raise malformed(path, f"{entry}.category_id {category_id} is the id of no entry of categories")
            if row[image_id] is not None:
                rows.append(row[image_id])
                columns.append(column[category_id][0])
        targets = torch.zeros(len(samples.entries), len(column))
        targets[rows, columns] = 1.0
        label_names = [name for _, name in column.values()]
        super().__init__(samples, targets, label_names, "binary", transform)

    @staticmethod
    def _index(path: Path, data: dict[str, Any], key: str, field: str) -> dict[int, tuple[int, str]]:
        """Maps the ``id`` of each entry of ``data[key]`` to its position and its ``field``."""
        index: dict[int, tuple[int, str]] = {}
        for k, item in enumerate(_get(path, "", data, key, list)):
            entry = f"{key}[{k}]"
            item_id = _get(path, entry, item, "id", int)
            if item_id in index:
                raise malformed(path, f"{entry}.id {item_id} repeats {key}[{index[item_id][0]}].id")
            index[item_id] = (k, _get(path, entry, item, field, str))
        return index


class ImageFolderCSV(_MultiLabelImages):
    """A user's own multi-label data: a CSV file of labels and a folder of images.

    The CSV starts with the header ``filename,<label name 1>,<label name 2>,...``; every other
    non-blank line holds an image path relative to ``root`` and one value per label, in {0, 1}, or
    in {1, -1, 0} with 0 meaning unspecified. ``encoding`` is ``"signed"`` when some value is -1,
    ``"binary"`` otherwise. The file is read as UTF-8; a byte-order mark (as spreadsheet programs
    write) is ignored. A line repeating an earlier line's image, or whose path leads out of
    ``root`` (absolute, or through ``..``), is skipped (see the module's docstring).

    Args:
        root: the folder the image paths are relative to.
        csv_file: path of the CSV file (not relative to ``root``).
        transform: applied to the PIL RGB image.
        strict: raise on the first line that would be skipped.

    Example:
        >>> data = ImageFolderCSV("photos", "photos/labels.csv")  # doctest: +SKIP
        >>> data.label_names, data.encoding  # doctest: +SKIP
        (['cat', 'dog'], 'binary')
    """

    def __init__(
        self, root: StrPath, csv_file: StrPath, transform: ImageTransform | None = None, *, strict: bool = False
    ) -> None:
        root, path = Path(root), Path(csv_file)
        samples = _Samples(path, strict)
        lines = read_csv_rows(path, "label file")
        _, header = next(lines, (1, []))
        label_names = [name.strip() for name in header[1:]]
        if not header or header[0].strip() != "filename" or not label_names or not all(label_names):
            raise malformed(
                path, f"line 1: header must be 'filename,<label name 1>,<label name 2>,...', got {header!r}"
            )
        if len(set(label_names)) != len(label_names):
            raise malformed(path, f"line 1: repeated label names in {label_names}")
        for line, fields in lines:
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise malformed(path, f"line {line} has {len(fields)} fields, expected {len(header)}")
            if not fields[0].strip():
                raise malformed(path, f"line {line} has an empty filename")
            values = []
            for name, field in zip(label_names, fields[1:], strict=True):
                try:
                    values.append(float(field))
                except ValueError:
                    raise malformed(path, f"line {line}: {name} is {field!r}, not a number") from None
            _check_labels(path, f"line {line}", values, (1, -1, 0))
            entry = f"line {line}"
            image_path = samples.image(entry, root, fields[0])
            if image_path is not None and samples.first(PurePath(fields[0]), entry, f"the image {fields[0]!r}"):
                samples.add(entry, image_path, values)
        labels = samples.labels
        targets = torch.tensor(labels, dtype=torch.float32).reshape(len(labels), len(label_names))
        encoding = "signed" if bool((targets == -1).any()) else "binary"
        super().__init__(samples, targets, label_names, encoding, transform)


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 PASCAL VOC classes in the devkit's order (the target columns of :class:`VOC2007`)."""


class VOC2007(_MultiLabelImages):
    """PASCAL VOC 2007 classification, as the devkit distributes it (``VOCdevkit/VOC2007``).

    Samples are the image ids of ``ImageSets/Main/<split>.txt`` in that order; images are
    ``JPEGImages/<id>.jpg``. Labels come from one of the two sources of the devkit:

    - ``source="imagesets"`` (default): ``ImageSets/Main/<class>_<split>.txt`` for each of the 20
      classes, lines ``<id> <value>`` with 1 (present), -1 (absent) or 0 (present only as
      *difficult* objects). Each file must list exactly the ids of ``<split>.txt``.
    - ``source="annotations"``: ``Annotations/<id>.xml``; a class is 1 when the image has an
      ``<object>`` of it whose ``<difficult>`` is not 1, 0 when all its objects are difficult,
      -1 otherwise: the rule by which the devkit wrote the class files.

    Targets keep the three values (``encoding == "signed"``): a difficult entry is
    *unspecified*, like WIDER's 0. The multi-label literature (ML-GCN, SSGRL and their
    successors) ignores difficult entries in the test AP; with ``encoding="signed"`` the metrics
    of :mod:`attn_consistency.metrics` drop them from AP, and ``--ignore-unspecified`` leaves
    them out of the loss. An id repeated in ``<split>.txt`` is skipped.

    Args:
        root: the folder holding ``VOCdevkit/VOC2007`` (or that folder itself).
        split: ``"trainval"`` (5,011 images, the literature's training set), ``"test"`` (4,952),
            ``"train"`` or ``"val"``.
        transform: applied to the PIL RGB image.
        source: ``"imagesets"`` or ``"annotations"`` (see above).
        strict: raise on the first entry that would be skipped.
    """

    splits = ("trainval", "test", "train", "val")

    def __init__(
        self,
        root: StrPath,
        split: str = "trainval",
        transform: ImageTransform | None = None,
        *,
        source: str = "imagesets",
        strict: bool = False,
    ) -> None:
        _check_split(split, self.splits)
        if source not in ("imagesets", "annotations"):
            raise ValueError(f"source must be 'imagesets' or 'annotations', got {source!r}")
        root = Path(root)
        base = root / "VOCdevkit" / "VOC2007" if (root / "VOCdevkit" / "VOC2007").is_dir() else root
        main = base / "ImageSets" / "Main"
        path = main / f"{split}.txt"
        samples = _Samples(path, strict)
        ids: list[str] = []  # the samples; `listed`: every id of the set file, skipped ones too
        listed: set[str] = set()
        for line, text in read_lines(path, "image set file"):
            fields = text.split()
            if not fields:
                continue
            if len(fields) != 1:
                raise malformed(path, f"line {line} is {text!r}, expected one image id")
            listed.add(fields[0])
            if samples.first(fields[0], f"line {line}", f"the id {fields[0]!r}"):
                image_path = samples.image(f"line {line}", base / "JPEGImages", f"{fields[0]}.jpg")
                if image_path is not None:
                    ids.append(fields[0])
                    samples.add(f"line {line}", image_path, None)
        if not ids:  # the split file is at fault, not the first class file that lists an id
            samples.report()
        if source == "imagesets":
            columns = [self._class_file(main / f"{name}_{split}.txt", ids, listed) for name in VOC_CLASSES]
        else:
            columns = self._annotations(base / "Annotations", ids)
        targets = torch.tensor(columns, dtype=torch.float32).reshape(len(VOC_CLASSES), len(ids)).t().contiguous()
        super().__init__(samples, targets, list(VOC_CLASSES), "signed", transform)

    @staticmethod
    def _class_file(path: Path, ids: list[str], listed: set[str]) -> list[int]:
        """The column of one class: its value for every id, in the order of ``ids``."""
        values: dict[str, int] = {}
        for line, text in read_lines(path, "class file"):
            fields = text.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
                raise malformed(path, f"line {line} is {text!r}, expected '<image id> <1, -1 or 0>'")
            if fields[0] in values:
                raise malformed(path, f"line {line} repeats the id {fields[0]!r}")
            values[fields[0]] = int(fields[1])
        missing = [i for i in ids if i not in values]
        if missing:
            raise malformed(
                path, f"has no line for the image id {missing[0]!r} of the image set ({len(missing)} missing)"
            )
        extra = next((i for i in values if i not in listed), None)
        if extra is not None:
            raise malformed(path, f"lists the id {extra!r}, which is not in the image set")
        return [values[i] for i in ids]

    @staticmethod
    def _annotations(folder: Path, ids: list[str]) -> list[list[int]]:
        columns = [[-1] * len(ids) for _ in VOC_CLASSES]
        index = {name: k for k, name in enumerate(VOC_CLASSES)}
        for row, image_id in enumerate(ids):
            path = folder / f"{image_id}.xml"
            for k, obj in enumerate(read_xml(path, "annotation file").iter("object")):
                name = (obj.findtext("name") or "").strip()
                if name not in index:
                    raise malformed(path, f"object[{k}] has the name {name!r}, expected one of the 20 VOC classes")
                difficult = (obj.findtext("difficult") or "0").strip()
                if difficult not in ("0", "1"):
                    raise malformed(path, f"object[{k}].difficult is {difficult!r}, expected 0 or 1")
                column = columns[index[name]]
                column[row] = 1 if difficult == "0" else max(column[row], 0)
        return columns


class VG500(_MultiLabelImages):
    """Visual Genome's 500 most frequent object categories, in the split that SSGRL introduced.

    SSGRL (Chen et al., ICCV 2019; github.com/HCPLab-SYSU/SSGRL, ``data/VG/`` and
    ``datasets/vgdataset.py``), reused by C-Tran, ML-Decoder and their successors, distributes
    the split as three files, read here from ``root``:

    - ``train_list_500.txt`` and ``test_list_500.txt``: one image file name per line
      (``2328403.jpg``); about 98k training and 10k test images;
    - ``vg_category_500_labels_index.json``: one object mapping every file name to the list of its
      label indices in 0..499.

    Images are Visual Genome's ``VG_100K/<name>`` (``VG_100K_2/<name>`` for those found only
    there: the two parts of the distributed images). The files carry no category names: the label
    names are the indices (``"0"`` ... ``"499"``). ``encoding == "binary"``. A repeated file name
    in a list is skipped.

    Args:
        root: the folder holding the three files and the image folders.
        split: ``"train"`` or ``"test"``.
        transform: applied to the PIL RGB image.
        strict: raise on the first entry that would be skipped.
        num_labels: the number of categories (500).
    """

    splits = ("train", "test")

    def __init__(
        self,
        root: StrPath,
        split: str = "train",
        transform: ImageTransform | None = None,
        *,
        strict: bool = False,
        num_labels: int = 500,
    ) -> None:
        _check_split(split, self.splits)
        num_labels = check_positive_int("num_labels", num_labels)
        root = Path(root)
        path = root / f"{split}_list_500.txt"
        labels_path = root / "vg_category_500_labels_index.json"
        samples = _Samples(path, strict)
        labels = _read_json(labels_path)
        rows, columns = [], []
        for line, text in read_lines(path, "image list"):
            name = text.strip()
            entry = f"line {line}"
            if not name:
                continue
            image_path = samples.image(entry, root / "VG_100K", name)
            if image_path is None or not samples.first(PurePath(name), entry, f"the image {name!r}"):
                continue
            if name not in labels:
                raise malformed(labels_path, f"has no entry for {name!r} ({path}: {entry})")
            indices = labels[name]
            if not isinstance(indices, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_labels for i in indices
            ):
                raise malformed(
                    labels_path, f"{name!r} is {indices!r}, expected a list of label indices in 0..{num_labels - 1}"
                )
            if not image_path.exists() and (root / "VG_100K_2" / name).exists():
                image_path = root / "VG_100K_2" / name
            rows += [len(samples.entries)] * len(indices)
            columns += indices
            samples.add(entry, image_path, None)
        targets = torch.zeros(len(samples.entries), num_labels)
        targets[rows, columns] = 1.0
        super().__init__(samples, targets, [str(i) for i in range(num_labels)], "binary", transform)
