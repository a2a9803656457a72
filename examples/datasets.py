"""Readers for the datasets of the paper's experiments, each reading the files as distributed.

Every reader is a :class:`torch.utils.data.Dataset` of ``(image, target)`` pairs with:

- ``label_names``: the label names in the order of the target columns;
- ``targets``: an ``(N, L)`` float tensor of every sample's labels, parsed from the annotation
  file alone (no image is opened), so that the positive ratio :math:`p_j` of the weighted
  cross-entropy (paper Eq. 2-3) can be computed before training;
- ``encoding``: ``"binary"`` for 0/1 labels, ``"signed"`` for 1 / -1 / 0 labels where 0 means
  *unspecified* (WIDER Attribute). Metrics must know which: dropping the zeros of a binary target
  drops every negative;
- ``image_paths``: the image file of every sample.

``__getitem__`` opens the image, converts it to RGB, passes it through ``transform`` (the PIL image
itself when ``transform`` is None) and returns it with a copy of its target row. Images are only
opened there: a missing image raises :class:`FileNotFoundError` naming its path at load time.

Annotation files are validated when the dataset is built. A missing file raises
:class:`FileNotFoundError`; a malformed file or entry raises :class:`ValueError` whose message starts
with the file's path and names the entry, e.g.
``.../wider_attribute_trainval.json: images[3].targets[1].attribute has 13 values, expected 14``.

Example:
    >>> from torchvision import transforms
    >>> train = WiderAttribute("data/WIDER", "trainval", transform=transforms.Compose(
    ...     [transforms.Resize((224, 224)), transforms.ToTensor()]))  # doctest: +SKIP
    >>> positive_ratio = (train.targets == 1).float().mean(0)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image
from scipy.io.matlab import MatReadError
from torch.utils.data import Dataset

__all__ = ["COCO2014", "ImageFolderCSV", "PA100K", "WiderAttribute"]

StrPath = str | os.PathLike[str]
ImageTransform = Callable[[Image.Image], Any]


class _MultiLabelImages(Dataset):
    """Images with one label vector each: subclasses parse the annotations, this class loads."""

    def __init__(
        self,
        image_paths: Sequence[Path],
        targets: torch.Tensor,
        label_names: list[str],
        encoding: str,
        transform: ImageTransform | None,
    ) -> None:
        self.image_paths = list(image_paths)
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
        path = self.image_paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None


def _malformed(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _check_split(split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"split must be one of {', '.join(map(repr, valid))}; got {split!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _malformed(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise _malformed(path, f"the top level is a JSON {type(data).__name__}, expected an object")
    return data


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _get(path: Path, entry: str, container: Any, key: str, kind: type) -> Any:
    """``container[key]`` checked to be a ``kind``; ``entry`` names ``container`` in errors."""
    where = f"{entry}.{key}" if entry else key
    if not isinstance(container, dict):
        raise _malformed(path, f"{entry} is a {type(container).__name__}, expected an object")
    if key not in container:
        raise _malformed(path, f"missing {where}")
    value = container[key]
    # bool is an int subclass; true/false where a number belongs is a malformed entry.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _malformed(path, f"{where} is {value!r}, expected {_JSON_KINDS[kind]}")
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_labels(path: Path, where: str, values: Sequence[Any], allowed: tuple[int, ...]) -> None:
    for value in values:
        if not _is_finite_number(value) or value not in allowed:
            raise _malformed(
                path, f"{where} contains {value!r}; values must be {', '.join(map(str, allowed))}"
            )


class WiderAttribute(_MultiLabelImages):
    """WIDER Attribute: one sample per annotated person box, the image being the box's crop.

    Reads ``root/Anno/wider_attribute_{trainval,test}.json``; images lie under ``root/Image/``.
    Targets are the 14 ``attribute`` values kept raw (``encoding == "signed"``): 1 present,
    -1 absent, 0 unspecified. Label names come from ``attribute_id_map`` in id order.

    Cropping follows the authors' reader: ``bbox = [x, y, w, h]`` becomes the PIL box
    ``(x, y, x + w, y + h)`` cropped with :meth:`PIL.Image.Image.crop`, which rounds each
    coordinate to the nearest integer (Python's ``round``, half to even) and fills the part of the
    box outside the image with black. A box starting beyond the image (``x > width`` or
    ``y > height``) stands for the whole image. A box covering no pixel after rounding is rejected
    as malformed when the dataset is built.

    Args:
        root: the dataset folder holding ``Anno/`` and ``Image/``.
        split: ``"trainval"`` (the paper's training set) or ``"test"``.
        transform: applied to the cropped PIL RGB image.

    Attributes:
        boxes: the ``[x, y, w, h]`` box of every sample, as in the annotation file.

    Example:
        >>> data = WiderAttribute("data/WIDER", "test")  # doctest: +SKIP
        >>> crop, target = data[0]  # doctest: +SKIP
        >>> data.label_names[:3], target.shape  # doctest: +SKIP
        (['male', 'longhair', 'sunglass'], torch.Size([14]))
    """

    splits = ("trainval", "test")

    def __init__(
        self, root: StrPath, split: str = "trainval", transform: ImageTransform | None = None
    ) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "Anno" / f"wider_attribute_{split}.json"
        data = _read_json(path)
        label_names = self._label_names(path, _get(path, "", data, "attribute_id_map", dict))
        image_paths: list[Path] = []
        labels: list[list[int | float]] = []
        self.boxes: list[tuple[float, float, float, float]] = []
        for i, image in enumerate(_get(path, "", data, "images", list)):
            file_name = _get(path, f"images[{i}]", image, "file_name", str)
            for j, person in enumerate(_get(path, f"images[{i}]", image, "targets", list)):
                entry = f"images[{i}].targets[{j}]"
                attribute = _get(path, entry, person, "attribute", list)
                if len(attribute) != len(label_names):
                    raise _malformed(
                        path,
                        f"{entry}.attribute has {len(attribute)} values, expected {len(label_names)}",
                    )
                _check_labels(path, f"{entry}.attribute", attribute, (1, -1, 0))
                self.boxes.append(self._box(path, f"{entry}.bbox", _get(path, entry, person, "bbox", list)))
                image_paths.append(root / "Image" / file_name)
                labels.append(attribute)
        targets = torch.tensor(labels, dtype=torch.float32).reshape(len(labels), len(label_names))
        super().__init__(image_paths, targets, label_names, "signed", transform)

    @staticmethod
    def _label_names(path: Path, id_map: dict[str, Any]) -> list[str]:
        try:
            names = {int(key): name for key, name in id_map.items()}
        except ValueError:
            raise _malformed(path, f"attribute_id_map keys must be integer ids, got {list(id_map)}") from None
        if sorted(names) != list(range(len(names))) or not all(isinstance(n, str) for n in names.values()):
            raise _malformed(path, f"attribute_id_map must map ids 0..K-1 to names, got {id_map!r}")
        return [names[i] for i in range(len(names))]

    @staticmethod
    def _box(path: Path, where: str, bbox: list[Any]) -> tuple[float, float, float, float]:
        if len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
            raise _malformed(path, f"{where} is {bbox!r}, expected 4 finite numbers [x, y, w, h]")
        x, y, w, h = bbox
        if round(x + w) <= round(x) or round(y + h) <= round(y):
            raise _malformed(path, f"{where} {bbox!r} covers no pixel once rounded")
        return x, y, w, h

    def _load_image(self, index: int) -> Image.Image:
        image = super()._load_image(index)
        x, y, w, h = self.boxes[index]
        width, height = image.size
        if x > width or y > height:
            return image
        return image.crop((x, y, x + w, y + h))


class PA100K(_MultiLabelImages):
    """PA-100K pedestrian attributes: 26 binary labels per image.

    Reads ``root/annotation.mat`` (MATLAB v5) with :func:`scipy.io.loadmat`: ``attributes``
    (26x1 cell of names), ``{split}_images_name`` (Kx1 cell of file names) and ``{split}_label``
    (Kx26 matrix of 0/1). Images lie under ``root/data/``. ``encoding == "binary"``.

    Args:
        root: the dataset folder holding ``annotation.mat`` and ``data/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to the PIL RGB image.
    """

    splits = ("train", "val", "test")

    def __init__(self, root: StrPath, split: str = "train", transform: ImageTransform | None = None) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "annotation.mat"
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        try:
            mat = scipy.io.loadmat(path)
        except (ValueError, NotImplementedError, MatReadError) as error:
            raise _malformed(path, f"not a readable MATLAB v5 file ({error})") from error
        label_names = self._cell_strings(path, mat, "attributes")
        file_names = self._cell_strings(path, mat, f"{split}_images_name")
        key = f"{split}_label"
        labels = np.asarray(self._variable(path, mat, key))
        if labels.ndim != 2 or labels.shape[1] != len(label_names):
            raise _malformed(
                path,
                f"{key} has shape {labels.shape}, expected ({len(file_names)}, {len(label_names)}): "
                f"one column per entry of attributes",
            )
        if labels.shape[0] != len(file_names):
            raise _malformed(
                path,
                f"{key} has {labels.shape[0]} rows but {split}_images_name has {len(file_names)} names",
            )
        bad = np.argwhere(~np.isin(labels, (0, 1)))
        if len(bad):
            row, column = bad[0]
            raise _malformed(
                path, f"{key}[{row}, {column}] is {labels[row, column].item()!r}; values must be 0 or 1"
            )
        targets = torch.from_numpy(labels.astype(np.float32))
        super().__init__(
            [root / "data" / name for name in file_names], targets, label_names, "binary", transform
        )

    @staticmethod
    def _variable(path: Path, mat: dict[str, Any], key: str) -> Any:
        if key not in mat:
            raise _malformed(path, f"missing variable {key}")
        return mat[key]

    @classmethod
    def _cell_strings(cls, path: Path, mat: dict[str, Any], key: str) -> list[str]:
        cells = np.asarray(cls._variable(path, mat, key))
        if cells.dtype != object:
            raise _malformed(path, f"{key} is a {cells.dtype} array, expected a cell array of strings")
        strings = []
        for k, cell in enumerate(cells.ravel()):
            cell = np.asarray(cell)
            if cell.dtype.kind != "U" or cell.size != 1:
                raise _malformed(path, f"{key}[{k}] is {cell!r}, expected a string")
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
    ``encoding == "binary"``.

    Args:
        root: the dataset folder holding ``annotations/`` and ``{train,val}2014/``.
        split: ``"train"`` or ``"val"``.
        transform: applied to the PIL RGB image.
    """

    splits = ("train", "val")

    def __init__(self, root: StrPath, split: str = "train", transform: ImageTransform | None = None) -> None:
        _check_split(split, self.splits)
        root = Path(root)
        path = root / "annotations" / f"instances_{split}2014.json"
        data = _read_json(path)
        column = self._index(path, data, "categories", "name")
        row = self._index(path, data, "images", "file_name")
        rows, columns = [], []
        for a, annotation in enumerate(_get(path, "", data, "annotations", list)):
            entry = f"annotations[{a}]"
            image_id = _get(path, entry, annotation, "image_id", int)
            category_id = _get(path, entry, annotation, "category_id", int)
            if image_id not in row:
                raise _malformed(path, f"{entry}.image_id {image_id} is the id of no entry of images")
            if category_id not in column:
                raise _malformed(
                    path, f"{entry}.category_id {category_id} is the id of no entry of categories"
                )
            rows.append(row[image_id][0])
            columns.append(column[category_id][0])
        targets = torch.zeros(len(row), len(column))
        targets[rows, columns] = 1.0
        image_paths = [root / f"{split}2014" / file_name for _, file_name in row.values()]
        label_names = [name for _, name in column.values()]
        super().__init__(image_paths, targets, label_names, "binary", transform)

    @staticmethod
    def _index(path: Path, data: dict[str, Any], key: str, field: str) -> dict[int, tuple[int, str]]:
        """Maps the ``id`` of each entry of ``data[key]`` to its position and its ``field``."""
        index: dict[int, tuple[int, str]] = {}
        for k, item in enumerate(_get(path, "", data, key, list)):
            entry = f"{key}[{k}]"
            item_id = _get(path, entry, item, "id", int)
            if item_id in index:
                raise _malformed(path, f"{entry}.id {item_id} repeats {key}[{index[item_id][0]}].id")
            index[item_id] = (k, _get(path, entry, item, field, str))
        return index


class ImageFolderCSV(_MultiLabelImages):
    """A user's own multi-label data: a CSV file of labels and a folder of images.

    The CSV starts with the header ``filename,<label name 1>,<label name 2>,...``; every other
    non-blank line holds an image path relative to ``root`` and one value per label, in {0, 1}, or
    in {1, -1, 0} with 0 meaning unspecified. ``encoding`` is ``"signed"`` when some value is -1,
    ``"binary"`` otherwise. A UTF-8 byte-order mark (as spreadsheet programs write) is ignored.

    Args:
        root: the folder the image paths are relative to.
        csv_file: path of the CSV file (not relative to ``root``).
        transform: applied to the PIL RGB image.

    Example:
        >>> data = ImageFolderCSV("photos", "photos/labels.csv")  # doctest: +SKIP
        >>> data.label_names, data.encoding  # doctest: +SKIP
        (['cat', 'dog'], 'binary')
    """

    def __init__(self, root: StrPath, csv_file: StrPath, transform: ImageTransform | None = None) -> None:
        root, path = Path(root), Path(csv_file)
        try:
            handle = path.open(newline="", encoding="utf-8-sig")
        except FileNotFoundError:
            raise FileNotFoundError(f"label file not found: {path}") from None
        with handle:
            lines = csv.reader(handle)
            header = next(lines, [])
            label_names = [name.strip() for name in header[1:]]
            if not header or header[0].strip() != "filename" or not label_names or not all(label_names):
                raise _malformed(
                    path,
                    f"line 1: header must be 'filename,<label name 1>,<label name 2>,...', got {header!r}",
                )
            if len(set(label_names)) != len(label_names):
                raise _malformed(path, f"line 1: repeated label names in {label_names}")
            image_paths, labels = [], []
            for fields in lines:
                if not any(field.strip() for field in fields):
                    continue
                line = lines.line_num
                if len(fields) != len(header):
                    raise _malformed(path, f"line {line} has {len(fields)} fields, expected {len(header)}")
                if not fields[0].strip():
                    raise _malformed(path, f"line {line} has an empty filename")
                values = []
                for name, field in zip(label_names, fields[1:], strict=True):
                    try:
                        values.append(float(field))
                    except ValueError:
                        raise _malformed(path, f"line {line}: {name} is {field!r}, not a number") from None
                _check_labels(path, f"line {line}", values, (1, -1, 0))
                image_paths.append(root / fields[0])
                labels.append(values)
        targets = torch.tensor(labels, dtype=torch.float32).reshape(len(labels), len(label_names))
        encoding = "signed" if bool((targets == -1).any()) else "binary"
        super().__init__(image_paths, targets, label_names, encoding, transform)
