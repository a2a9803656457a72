"""Tests of examples.datasets on tiny fixtures written in each dataset's real file format."""

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from fixtures import WIDER_NAMES, attribute, cell, save, solid, write_coco, write_wider
from PIL import Image
from torch.utils.data import DataLoader

from examples.datasets import COCO2014, PA100K, ImageFolderCSV, WiderAttribute

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def quadrants() -> np.ndarray:
    """An 8x6 (width x height) RGB image: red, green / blue, white quadrants of 4x3 pixels."""
    pixels = np.empty((6, 8, 3), dtype=np.uint8)
    pixels[:3, :4], pixels[:3, 4:], pixels[3:, :4], pixels[3:, 4:] = RED, GREEN, BLUE, WHITE
    return pixels


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def to_chw_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


# ---------------------------------------------------------------- WIDER Attribute

QUADRANTS = "train/0--Parade/0_Parade_marchingband_1_1.png"
SOLID_JPEG = "val/1--Handshaking/1_Handshaking_1_2.jpg"
NO_PEOPLE = "train/0--Parade/0_Parade_marchingband_1_3.png"


def wider_annotation() -> dict:
    return {
        "images": [
            {
                "file_name": QUADRANTS,
                "scene_id": 0,
                "targets": [
                    {"attribute": attribute(0), "bbox": [4, 0, 4, 3]},
                    {"attribute": attribute(1), "bbox": [2.6, 1.5, 3.0, 2.2]},
                    {"attribute": attribute(2), "bbox": [-2, 4, 4, 4]},
                    {"attribute": attribute(3), "bbox": [9, 1, 3, 3]},
                    {"attribute": attribute(4), "bbox": [1, 7, 2, 2]},
                    {"attribute": attribute(5), "bbox": [8, 0, 2, 2]},
                ],
            },
            {"file_name": NO_PEOPLE, "scene_id": 0, "targets": []},
            {
                "file_name": SOLID_JPEG,
                "scene_id": 1,
                "targets": [{"attribute": attribute(6), "bbox": [0.0, 0.0, 10.0, 10.0]}],
            },
        ],
        "attribute_id_map": {str(i): name for i, name in enumerate(WIDER_NAMES)},
        "scene_id_map": {"0": "Parade", "1": "Handshaking"},
    }


@pytest.fixture
def wider_root(tmp_path: Path) -> Path:
    save(tmp_path / "Image" / QUADRANTS, Image.fromarray(quadrants()))
    save(tmp_path / "Image" / NO_PEOPLE, solid((4, 4), RED))
    save(tmp_path / "Image" / SOLID_JPEG, solid((10, 10), (200, 30, 30)))
    write_wider(tmp_path, wider_annotation())
    return tmp_path


def test_wider_samples_labels_and_names(wider_root: Path) -> None:
    data = WiderAttribute(wider_root, "trainval")
    assert len(data) == 7
    assert data.label_names == WIDER_NAMES
    assert data.encoding == "signed"
    assert data.image_paths == [wider_root / "Image" / QUADRANTS] * 6 + [wider_root / "Image" / SOLID_JPEG]
    expected = torch.tensor([attribute(k) for k in range(7)], dtype=torch.float32)
    assert data.targets.dtype == torch.float32
    assert torch.equal(data.targets, expected)
    assert set(data.targets.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert data.boxes[1] == (2.6, 1.5, 3.0, 2.2)
    for k in range(7):
        assert torch.equal(data[k][1], expected[k])


def test_wider_crop_inside_image(wider_root: Path) -> None:
    crop, _ = WiderAttribute(wider_root)[0]
    assert crop.mode == "RGB" and crop.size == (4, 3)
    assert (pixels(crop) == GREEN).all()


def test_wider_float_bbox_is_rounded_half_to_even(wider_root: Path) -> None:
    # (2.6, 1.5, 5.6, 3.7) rounds to (3, 2, 6, 4): one column of the left quadrants, two of the right.
    crop, _ = WiderAttribute(wider_root)[1]
    assert crop.size == (3, 2)
    expected = np.array([[RED, GREEN, GREEN], [BLUE, WHITE, WHITE]])
    np.testing.assert_array_equal(pixels(crop), expected)


def test_wider_bbox_partly_outside_is_filled_with_black(wider_root: Path) -> None:
    # (-2, 4, 2, 8): x in [-2, 2), y in [4, 8) on an 8x6 image.
    crop, _ = WiderAttribute(wider_root)[2]
    assert crop.size == (4, 4)
    expected = np.zeros((4, 4, 3), dtype=np.int16)
    expected[:2, 2:] = BLUE
    np.testing.assert_array_equal(pixels(crop), expected)


@pytest.mark.parametrize("index", [3, 4])
def test_wider_bbox_starting_beyond_the_image_gives_the_whole_image(wider_root: Path, index: int) -> None:
    # [9, 1, 3, 3] starts right of the 8x6 image, [1, 7, 2, 2] below it.
    crop, _ = WiderAttribute(wider_root)[index]
    np.testing.assert_array_equal(pixels(crop), quadrants())


def test_wider_bbox_starting_on_the_image_edge_is_cropped(wider_root: Path) -> None:
    # x == width is not beyond the image: the crop is taken, and it is all black.
    crop, _ = WiderAttribute(wider_root)[5]
    assert crop.size == (2, 2)
    assert (pixels(crop) == BLACK).all()


def test_wider_jpeg_and_transform(wider_root: Path) -> None:
    image, target = WiderAttribute(wider_root, transform=to_chw_tensor)[6]
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    # JPEG is lossy: a solid colour comes back within a few levels.
    assert (image.int() - torch.tensor([200, 30, 30]).view(3, 1, 1)).abs().max() <= 4
    assert torch.equal(target, torch.tensor(attribute(6), dtype=torch.float32))


def test_wider_test_split_reads_the_test_file(wider_root: Path) -> None:
    annotation = wider_annotation()
    annotation["images"] = annotation["images"][2:]
    write_wider(wider_root, annotation, "test")
    data = WiderAttribute(wider_root, "test")
    assert len(data) == 1
    assert data.image_paths == [wider_root / "Image" / SOLID_JPEG]


def test_wider_target_is_a_copy(wider_root: Path) -> None:
    data = WiderAttribute(wider_root)
    _, target = data[0]
    target.fill_(7.0)
    assert torch.equal(data.targets[0], torch.tensor(attribute(0), dtype=torch.float32))


def test_wider_bad_split(wider_root: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of 'trainval', 'test'; got 'train'"):
        WiderAttribute(wider_root, "train")


def test_wider_missing_annotation_file(wider_root: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(wider_root / "Anno" / "wider_attribute_test.json"))
    ):
        WiderAttribute(wider_root, "test")


def test_wider_invalid_json(wider_root: Path) -> None:
    (wider_root / "Anno" / "wider_attribute_trainval.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"wider_attribute_trainval\.json: not valid JSON"):
        WiderAttribute(wider_root)


DELETE = object()


def set_path(annotation: dict, keys: tuple, value) -> dict:
    """``annotation`` with the entry at ``keys`` replaced by ``value`` (or deleted)."""
    node = annotation
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return annotation


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (
            ("images", 2, "targets", 0, "attribute"),
            [1] * 13,
            "images[2].targets[0].attribute has 13 values, expected 14",
        ),
        (("images", 0, "targets", 1, "attribute", 5), 2, "images[0].targets[1].attribute contains 2;"),
        (("images", 0, "targets", 1, "attribute", 0), True, "images[0].targets[1].attribute contains True;"),
        (
            ("images", 0, "targets", 3, "bbox"),
            [1, 2, 3],
            "images[0].targets[3].bbox is [1, 2, 3], expected 4",
        ),
        (("images", 0, "targets", 2, "bbox", 1), "4", "images[0].targets[2].bbox is [-2, '4', 4, 4]"),
        (("images", 0, "targets", 0, "bbox", 2), 0, "images[0].targets[0].bbox [4, 0, 0, 3] covers no pixel"),
        (
            ("images", 0, "targets", 0, "bbox", 3),
            0.4,
            "images[0].targets[0].bbox [4, 0, 4, 0.4] covers no pixel",
        ),
        (("images", 2, "targets", 0, "bbox"), DELETE, "missing images[2].targets[0].bbox"),
        (("images", 1, "file_name"), 3, "images[1].file_name is 3, expected a string"),
        (("images", 1), "x.jpg", "images[1] is a str, expected an object"),
        (("images",), DELETE, "missing images"),
        (("attribute_id_map", "5"), DELETE, "attribute_id_map must map ids 0..K-1 to names"),
        (("attribute_id_map", "x"), "extra", "attribute_id_map keys must be integer ids"),
    ],
)
def test_wider_malformed_entry_names_file_and_entry(
    wider_root: Path, keys: tuple, value, message: str
) -> None:
    write_wider(wider_root, set_path(wider_annotation(), keys, value))
    with pytest.raises(ValueError, match=re.escape(f"wider_attribute_trainval.json: {message}")):
        WiderAttribute(wider_root)


def test_wider_missing_image_raises_at_load_naming_its_path(wider_root: Path) -> None:
    missing = wider_root / "Image" / SOLID_JPEG
    missing.unlink()
    data = WiderAttribute(wider_root)
    assert data[0][0].size == (4, 3)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        data[6]


# ---------------------------------------------------------------- PA-100K

PA_NAMES = ["Female", "AgeOver60", "Age18-60", "Hat"]
PA_SPLITS = {
    "train": (["000001.jpg", "000002.jpg", "000003.jpg"], [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 1]]),
    "val": (["080001.jpg"], [[0, 0, 1, 1]]),
    "test": (["090001.jpg", "090002.jpg"], [[1, 1, 0, 0], [0, 0, 0, 1]]),
}
PA_COLOURS = {"000002.jpg": (30, 160, 90), "090002.jpg": (10, 20, 240)}


def pa100k_variables() -> dict[str, np.ndarray]:
    variables = {"attributes": cell(PA_NAMES)}
    for split, (names, labels) in PA_SPLITS.items():
        variables[f"{split}_images_name"] = cell(names)
        variables[f"{split}_label"] = np.array(labels, dtype=np.uint8)
    return variables


@pytest.fixture
def pa100k_root(tmp_path: Path) -> Path:
    scipy.io.savemat(tmp_path / "annotation.mat", pa100k_variables())
    for name, colour in PA_COLOURS.items():
        save(tmp_path / "data" / name, solid((6, 12), colour))
    return tmp_path


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_pa100k_samples_labels_and_names(pa100k_root: Path, split: str) -> None:
    data = PA100K(pa100k_root, split)
    names, labels = PA_SPLITS[split]
    assert data.label_names == PA_NAMES
    assert data.encoding == "binary"
    assert data.image_paths == [pa100k_root / "data" / name for name in names]
    assert data.targets.dtype == torch.float32
    assert torch.equal(data.targets, torch.tensor(labels, dtype=torch.float32))


@pytest.mark.parametrize(("split", "index", "name"), [("train", 1, "000002.jpg"), ("test", 1, "090002.jpg")])
def test_pa100k_image(pa100k_root: Path, split: str, index: int, name: str) -> None:
    image, target = PA100K(pa100k_root, split)[index]
    assert image.mode == "RGB" and image.size == (6, 12)
    assert np.abs(pixels(image) - PA_COLOURS[name]).max() <= 4
    assert torch.equal(target, torch.tensor(PA_SPLITS[split][1][index], dtype=torch.float32))


NOT_A_NAME = cell(["000001.jpg", "000002.jpg", "000003.jpg"])
NOT_A_NAME[1, 0] = np.array([[1.0]])


@pytest.mark.parametrize(
    ("split", "key", "value", "message"),
    [
        ("train", "train_label", np.ones((3, 3)), "train_label has shape (3, 3), expected (3, 4)"),
        ("val", "val_label", np.ones((2, 4)), "val_label has 2 rows but val_images_name has 1 names"),
        (
            "train",
            "train_label",
            np.array([[1, 0, 1, 0], [0, 1, 2, 0], [1, 0, 1, 1]]),
            "train_label[1, 2] is 2;",
        ),
        (
            "test",
            "attributes",
            np.array(PA_NAMES),
            "attributes is a <U9 array, expected a cell array of strings",
        ),
        (
            "train",
            "train_images_name",
            NOT_A_NAME,
            "train_images_name[1] is array([[1.]]), expected a string",
        ),
    ],
)
def test_pa100k_malformed_variable_names_file_and_entry(
    pa100k_root: Path, split: str, key: str, value, message: str
) -> None:
    variables = pa100k_variables()
    variables[key] = value
    scipy.io.savemat(pa100k_root / "annotation.mat", variables)
    with pytest.raises(ValueError, match=re.escape(f"annotation.mat: {message}")):
        PA100K(pa100k_root, split)


def test_pa100k_missing_variable(pa100k_root: Path) -> None:
    variables = pa100k_variables()
    del variables["test_label"]
    scipy.io.savemat(pa100k_root / "annotation.mat", variables)
    assert len(PA100K(pa100k_root, "val")) == 1
    with pytest.raises(ValueError, match=r"annotation\.mat: missing variable test_label"):
        PA100K(pa100k_root, "test")


def test_pa100k_unreadable_and_missing_file(pa100k_root: Path) -> None:
    path = pa100k_root / "annotation.mat"
    path.write_bytes(b"not a MATLAB file" * 20)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable MATLAB v5 file")):
        PA100K(pa100k_root)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        PA100K(pa100k_root)


def test_pa100k_bad_split_and_missing_image(pa100k_root: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val', 'test'; got 'trainval'"):
        PA100K(pa100k_root, "trainval")
    with pytest.raises(FileNotFoundError, match=re.escape(str(pa100k_root / "data" / "000001.jpg"))):
        PA100K(pa100k_root)[0]


# ---------------------------------------------------------------- MS-COCO 2014

COCO_IMAGES = [  # listed out of id order on purpose: samples follow the listing
    {"id": 20, "file_name": "COCO_val2014_000000000020.jpg", "width": 7, "height": 5},
    {"id": 30, "file_name": "COCO_val2014_000000000030.jpg", "width": 4, "height": 9},
    {"id": 10, "file_name": "COCO_val2014_000000000010.jpg", "width": 3, "height": 3},
]


def coco_annotation() -> dict:
    def instance(k: int, image_id: int, category_id: int, iscrowd: int = 0) -> dict:
        return {
            "id": k,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [0, 0, 1, 1],
            "iscrowd": iscrowd,
        }

    return {
        "info": {"year": 2014},
        "images": [dict(image) for image in COCO_IMAGES],
        "annotations": [
            instance(1, 10, 1),
            instance(2, 20, 3),
            instance(3, 20, 3),  # a second car in the same image
            instance(4, 20, 90, iscrowd=1),
        ],
        "categories": [  # gapped ids, listed out of id order
            {"supercategory": "vehicle", "id": 3, "name": "car"},
            {"supercategory": "person", "id": 1, "name": "person"},
            {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
        ],
    }


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    write_coco(tmp_path, coco_annotation())
    for image in COCO_IMAGES:
        save(tmp_path / "val2014" / image["file_name"], solid((image["width"], image["height"]), GREEN))
    return tmp_path


def test_coco_samples_labels_and_names(coco_root: Path) -> None:
    data = COCO2014(coco_root, "val")
    assert len(data) == 3
    assert data.label_names == ["car", "person", "toothbrush"]
    assert data.encoding == "binary"
    assert data.image_paths == [coco_root / "val2014" / image["file_name"] for image in COCO_IMAGES]
    expected = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert torch.equal(data.targets, expected)
    for k, image in enumerate(COCO_IMAGES):
        picture, target = data[k]
        assert picture.size == (image["width"], image["height"])
        assert torch.equal(target, expected[k])


def test_coco_batches_through_a_dataloader(coco_root: Path) -> None:
    data = COCO2014(coco_root, "val", transform=lambda image: to_chw_tensor(image.resize((4, 4))))
    images, targets = next(iter(DataLoader(data, batch_size=3)))
    assert images.shape == (3, 3, 4, 4) and (images[:, 1] == 255).all()
    assert torch.equal(targets, data.targets)


def test_coco_train_split_reads_train_files(coco_root: Path) -> None:
    annotation = coco_annotation()
    annotation["images"], annotation["annotations"] = COCO_IMAGES[2:], [{"image_id": 10, "category_id": 90}]
    write_coco(coco_root, annotation, "train")
    data = COCO2014(coco_root, "train")
    assert data.image_paths == [coco_root / "train2014" / COCO_IMAGES[2]["file_name"]]
    assert torch.equal(data.targets, torch.tensor([[0.0, 0.0, 1.0]]))
    with pytest.raises(FileNotFoundError, match=re.escape(str(data.image_paths[0]))):
        data[0]


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (
            ("annotations", 1, "category_id"),
            2,
            "annotations[1].category_id 2 is the id of no entry of categories",
        ),
        (("annotations", 3, "image_id"), 40, "annotations[3].image_id 40 is the id of no entry of images"),
        (("annotations", 0, "image_id"), "10", "annotations[0].image_id is '10', expected an integer"),
        (("images", 1, "id"), 20, "images[1].id 20 repeats images[0].id"),
        (("categories", 2, "id"), 1, "categories[2].id 1 repeats categories[1].id"),
        (("categories", 0, "name"), DELETE, "missing categories[0].name"),
        (("annotations",), DELETE, "missing annotations"),
    ],
)
def test_coco_malformed_entry_names_file_and_entry(coco_root: Path, keys: tuple, value, message: str) -> None:
    write_coco(coco_root, set_path(coco_annotation(), keys, value))
    with pytest.raises(ValueError, match=re.escape(f"instances_val2014.json: {message}")):
        COCO2014(coco_root, "val")


def test_coco_bad_split_and_missing_file(coco_root: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val'; got 'test'"):
        COCO2014(coco_root, "test")
    with pytest.raises(FileNotFoundError, match=r"instances_train2014\.json"):
        COCO2014(coco_root, "train")


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    save(tmp_path / "a.png", Image.fromarray(quadrants()))
    save(tmp_path / "sub" / "b.png", Image.new("L", (2, 3), 128))
    return tmp_path


def write_csv(root: Path, text: str, encoding: str = "utf-8") -> Path:
    path = root / "labels.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_csv_binary(csv_root: Path) -> None:
    # A byte-order mark and blank lines, as spreadsheet exports have.
    path = write_csv(csv_root, "filename,cat, dog\n\na.png,1,0\n  \nsub/b.png,0,1\n\n", encoding="utf-8-sig")
    data = ImageFolderCSV(csv_root, path)
    assert data.label_names == ["cat", "dog"]
    assert data.encoding == "binary"
    assert data.image_paths == [csv_root / "a.png", csv_root / "sub" / "b.png"]
    assert torch.equal(data.targets, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    first, _ = data[0]
    np.testing.assert_array_equal(pixels(first), quadrants())
    grey, target = data[1]
    assert grey.mode == "RGB" and grey.size == (2, 3) and (pixels(grey) == 128).all()
    assert torch.equal(target, torch.tensor([0.0, 1.0]))


def test_csv_signed(csv_root: Path) -> None:
    data = ImageFolderCSV(csv_root, write_csv(csv_root, "filename,a,b,c\na.png,1,-1,0\n"))
    assert data.encoding == "signed"
    assert torch.equal(data.targets, torch.tensor([[1.0, -1.0, 0.0]]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filename,cat,dog\na.png,1,0\nsub/b.png,1\n", "line 3 has 2 fields, expected 3"),
        ("filename,cat,dog\n\na.png,1,yes\n", "line 3: dog is 'yes', not a number"),
        ("filename,cat,dog\na.png,1,0\n ,0,1\n", "line 3 has an empty filename"),
        ("filename,cat,dog\na.png,1,2\n", "line 2 contains 2.0; values must be 1, -1, 0"),
        ("filename,cat,dog\na.png,nan,0\n", "line 2 contains nan"),
        ("file,cat,dog\na.png,1,0\n", "line 1: header must be 'filename,<label name 1>"),
        ("filename\na.png\n", "line 1: header must be"),
        ("", "line 1: header must be"),
        ("filename,cat,cat\na.png,1,0\n", "line 1: repeated label names in ['cat', 'cat']"),
    ],
)
def test_csv_malformed_names_file_and_line(csv_root: Path, text: str, message: str) -> None:
    path = write_csv(csv_root, text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        ImageFolderCSV(csv_root, path)


def test_csv_missing_file_and_image(csv_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(csv_root / "labels.csv"))):
        ImageFolderCSV(csv_root, csv_root / "labels.csv")
    data = ImageFolderCSV(csv_root, write_csv(csv_root, "filename,cat\nmissing.jpg,1\n"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(csv_root / "missing.jpg"))):
        data[0]
