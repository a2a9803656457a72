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
    with pytest.raises(FileNotFoundError, match=re.escape(str(wider_root / "Anno" / "wider_attribute_test.json"))):
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
        (("images", 2, "targets", 0, "bbox"), DELETE, "missing images[2].targets[0].bbox"),
        (("images", 1, "file_name"), 3, "images[1].file_name is 3, expected a string"),
        (("images", 1), "x.jpg", "images[1] is a str, expected an object"),
        (("images",), DELETE, "missing images"),
        (("attribute_id_map", "5"), DELETE, "attribute_id_map must map ids 0..K-1 to names"),
        (("attribute_id_map", "x"), "extra", "attribute_id_map keys must be integer ids"),
    ],
)
def test_wider_malformed_entry_names_file_and_entry(wider_root: Path, keys: tuple, value, message: str) -> None:
    write_wider(wider_root, set_path(wider_annotation(), keys, value))
    with pytest.raises(ValueError, match=re.escape(f"wider_attribute_trainval.json: {message}")):
        WiderAttribute(wider_root)


def test_wider_missing_image_raises_at_load_naming_its_path_and_entry(wider_root: Path) -> None:
    missing = wider_root / "Image" / SOLID_JPEG
    missing.unlink()
    data = WiderAttribute(wider_root)
    assert data[0][0].size == (4, 3)
    annotation = wider_root / "Anno" / "wider_attribute_trainval.json"
    message = f"image not found: {missing} (from {annotation}: images[2].targets[0])"
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        data[6]


@pytest.mark.parametrize(
    ("bbox", "index"), [([4, 0, 0, 3], 0), ([4, 0, 4, 0.4], 0), ([3, 2, -1, 2], 1), ([2.6, 1.5, 0.2, 2.2], 1)]
)
def test_wider_box_covering_no_pixel_stands_for_the_whole_image(wider_root: Path, bbox: list, index: int) -> None:
    # The authors' reader takes the whole image for boxes "not annotated well"; one bad box
    # must not refuse the split.
    path = write_wider(wider_root, set_path(wider_annotation(), ("images", 0, "targets", index, "bbox"), bbox))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: 1 of 7 boxes cover no pixel once rounded")) as warned:
        data = WiderAttribute(wider_root)
    assert f"images[0].targets[{index}]" in str(warned[0].message)
    assert data.whole_image == [f"{path}: images[0].targets[{index}]"] and data.skipped == []
    assert len(data) == 7 and data.boxes[index] == tuple(bbox)
    crop, target = data[index]
    np.testing.assert_array_equal(pixels(crop), quadrants())
    assert torch.equal(target, torch.tensor(attribute(index), dtype=torch.float32))
    assert data[2][0].size == (4, 4)  # the other boxes are cropped as before
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: images[0].targets[{index}].bbox {bbox!r} covers no pixel once rounded")
    ):
        WiderAttribute(wider_root, strict=True)


@pytest.mark.parametrize(
    "bbox",
    [[1e308, 0, 1e308, 3], [0, 0, 1e6, 1e6], [10**400, 0, 2, 2], [-(2**40), 0, 5, 5]],
    ids=["inf", "huge", "bigint", "far"],
)
def test_wider_box_overflowing_any_image_is_skipped_and_reported(wider_root: Path, bbox: list) -> None:
    path = write_wider(wider_root, set_path(wider_annotation(), ("images", 0, "targets", 1, "bbox"), bbox))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 1 of 7 entries")) as warned:
        data = WiderAttribute(wider_root)
    assert "images[0].targets[1].bbox" in str(warned[0].message)
    assert data.skipped == [
        f"{path}: images[0].targets[1].bbox {bbox!r} is larger than any image PIL opens ({Image.MAX_IMAGE_PIXELS} pixels)"
    ]
    assert len(data) == 6 and len(data.boxes) == 6
    assert torch.equal(data.targets[1], torch.tensor(attribute(2), dtype=torch.float32))  # the next person moved up
    assert data.entries[1] == f"{path}: images[0].targets[2]"
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: images[0].targets[1].bbox {bbox!r} is larger than any image")
    ):
        WiderAttribute(wider_root, strict=True)


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


# ---------------------------------------------------------------- hostile files: every failure names the file


def test_unreadable_images_name_the_image_and_the_entry(csv_root: Path) -> None:
    jpeg = csv_root / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # the end of the scan lost, as an interrupted copy
    (csv_root / "empty.png").write_bytes(b"")
    (csv_root / "text.png").write_text("not an image")
    path = write_csv(csv_root, "filename,cat\ntruncated.jpg,1\nempty.png,0\ntext.png,1\n")
    data = ImageFolderCSV(csv_root, path)
    for index, (name, reason) in enumerate(
        [
            ("truncated.jpg", "image file is truncated"),
            ("empty.png", "cannot identify image file"),
            ("text.png", "cannot identify"),
        ]
    ):
        with pytest.raises(ValueError, match=re.escape(f"{csv_root / name}: not a readable image (")) as error:
            data[index]
        assert reason in str(error.value)
        assert str(error.value).endswith(f"from {path}: line {index + 2}")


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 0), (77, 77, 77)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as torchvision's loader
        ("P", 1, (200, 100, 50)),  # the palette's entry 1, set below
        ("1", 1, (255, 255, 255)),
        ("I;16", 40000, (156, 156, 156)),  # 40000 >> 8: PIL's own conversion would clip to white
    ],
)
def test_images_that_are_not_rgb_are_converted(csv_root: Path, mode: str, value, expected: tuple) -> None:
    image = Image.new(mode, (3, 2), value)
    if mode == "P":
        image.putpalette([0, 0, 0, 200, 100, 50])
    image.save(csv_root / "odd.png")
    image, _ = ImageFolderCSV(csv_root, write_csv(csv_root, "filename,cat\nodd.png,1\n"))[0]
    assert image.mode == "RGB" and image.size == (3, 2)
    assert (pixels(image) == expected).all()


def test_cmyk_jpeg_is_converted(csv_root: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(csv_root / "cmyk.jpg")  # red in CMYK
    image, _ = ImageFolderCSV(csv_root, write_csv(csv_root, "filename,cat\ncmyk.jpg,1\n"))[0]
    assert image.mode == "RGB"
    assert np.abs(pixels(image) - RED).max() <= 4


def test_annotation_files_that_are_not_utf8_name_the_file(wider_root: Path, coco_root: Path, csv_root: Path) -> None:
    wider = wider_root / "Anno" / "wider_attribute_trainval.json"
    wider.write_bytes(b'{"images": [{"file_name": "caf\xe9.jpg"}]}')
    with pytest.raises(ValueError, match=re.escape(f"{wider}: not UTF-8 text (byte 30: invalid continuation byte)")):
        WiderAttribute(wider_root)
    coco = coco_root / "annotations" / "instances_val2014.json"
    coco.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"{coco}: not")):
        COCO2014(coco_root, "val")
    labels = csv_root / "labels.csv"
    labels.write_bytes(b"filename,cat\na.png,1\n\xe9t\xe9.png,0\n")
    with pytest.raises(ValueError, match=re.escape(f"{labels}: line 3: not UTF-8 text")):
        ImageFolderCSV(csv_root, labels)


def test_json_top_level_and_utf8_bom(wider_root: Path) -> None:
    path = wider_root / "Anno" / "wider_attribute_trainval.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{path}: the top level is a JSON list, expected an object")):
        WiderAttribute(wider_root)
    import json

    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(wider_annotation()).encode())  # as Windows editors save
    assert len(WiderAttribute(wider_root)) == 7


@pytest.mark.parametrize("cut", [0, 100, -40])
def test_corrupt_annotation_mat_names_the_file(pa100k_root: Path, cut: int) -> None:
    path = pa100k_root / "annotation.mat"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable MATLAB v5 file")):
        PA100K(pa100k_root)


def test_pa100k_label_matrix_of_strings_or_repeated_names_is_malformed(pa100k_root: Path) -> None:
    path = pa100k_root / "annotation.mat"
    variables = pa100k_variables()
    variables["train_label"] = cell(["1", "0", "1"])
    scipy.io.savemat(path, variables)
    with pytest.raises(ValueError, match=re.escape(f"{path}: train_label is a object array, expected a matrix of 0/1")):
        PA100K(pa100k_root)
    variables = pa100k_variables()
    variables["attributes"] = cell(["Female", "Hat", "Age18-60", "Hat"])
    scipy.io.savemat(path, variables)
    with pytest.raises(ValueError, match=re.escape(f"{path}: attributes[3] 'Hat' repeats attributes[1]")):
        PA100K(pa100k_root, "test")


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    [
        (("attribute_id_map", "01"), "extra", "attribute_id_map must map ids 0..K-1 to names"),  # "1" and "01": one id
        (("attribute_id_map", "3"), "male", "attribute_id_map[3] 'male' repeats attribute_id_map[0]"),
        (("images", 0, "file_name"), " ", "images[0].file_name is empty"),
        (
            ("images", 0, "file_name"),
            "a\x00b.png",
            "images[0] names the image 'a\\x00b.png', which holds a NUL character",
        ),
        (("images", 0, "targets", 1, "bbox", 0), 10**400, "images[0].targets[1].bbox is"),
    ],
)
def test_wider_more_malformed_entries(wider_root: Path, keys: tuple, value, message: str) -> None:
    path = write_wider(wider_root, set_path(wider_annotation(), keys, value))
    if message.endswith("bbox is"):  # a huge integer is a number: the box is skipped, not malformed
        with pytest.warns(UserWarning, match="is larger than any image"):
            assert len(WiderAttribute(wider_root)) == 6
        return
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        WiderAttribute(wider_root)


def test_annotation_files_without_labels_are_malformed(wider_root: Path, coco_root: Path, pa100k_root: Path) -> None:
    path = write_wider(wider_root, set_path(wider_annotation(), ("attribute_id_map",), {}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: attribute_id_map holds no label")):
        WiderAttribute(wider_root)
    write_coco(coco_root, set_path(coco_annotation(), ("categories",), []))
    with pytest.raises(ValueError, match=r"instances_val2014\.json: categories holds no label"):
        COCO2014(coco_root, "val")
    variables = pa100k_variables()
    variables["attributes"] = np.empty((0, 1), dtype=object)
    scipy.io.savemat(pa100k_root / "annotation.mat", variables)
    with pytest.raises(ValueError, match=re.escape(f"{pa100k_root / 'annotation.mat'}: attributes holds no label")):
        PA100K(pa100k_root)


def test_coco_repeated_category_name_is_malformed(coco_root: Path) -> None:
    write_coco(coco_root, set_path(coco_annotation(), ("categories", 2, "name"), "car"))
    with pytest.raises(
        ValueError, match=re.escape("instances_val2014.json: categories[2] 'car' repeats categories[0]")
    ):
        COCO2014(coco_root, "val")


# ---------------------------------------------------------------- entries skipped, reported once


def test_wider_image_path_leading_out_of_the_folder_is_skipped(wider_root: Path) -> None:
    path = write_wider(wider_root, set_path(wider_annotation(), ("images", 2, "file_name"), "../../etc/passwd"))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 1 of 7 entries")):
        data = WiderAttribute(wider_root)
    assert data.skipped == [
        f"{path}: images[2] names the image '../../etc/passwd', which leads out of {wider_root / 'Image'}"
    ]
    assert len(data) == 6 and all(p == wider_root / "Image" / QUADRANTS for p in data.image_paths)
    with pytest.raises(ValueError, match=re.escape(f"{path}: images[2] names the image '../../etc/passwd'")):
        WiderAttribute(wider_root, strict=True)


def test_wider_repeated_person_is_skipped(wider_root: Path) -> None:
    annotation = wider_annotation()
    annotation["images"][0]["targets"].append({"attribute": attribute(9), "bbox": [2.6, 1.5, 3.0, 2.2]})
    annotation["images"].append(dict(annotation["images"][2], file_name="./" + SOLID_JPEG))
    path = write_wider(wider_root, annotation)
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 2 of 9 entries")):
        data = WiderAttribute(wider_root)
    assert data.skipped == [
        f"{path}: images[0].targets[6] repeats images[0].targets[1] (the same file and bbox)",
        f"{path}: images[3].targets[0] repeats images[2].targets[0] (the same file and bbox)",
    ]
    assert len(data) == 7


def test_coco_repeated_or_escaping_file_name_is_skipped_with_its_annotations(coco_root: Path) -> None:
    annotation = coco_annotation()
    annotation["images"].append({"id": 40, "file_name": COCO_IMAGES[0]["file_name"], "width": 7, "height": 5})
    annotation["images"].append({"id": 50, "file_name": "/etc/passwd", "width": 7, "height": 5})
    annotation["annotations"] += [{"image_id": 40, "category_id": 1}, {"image_id": 50, "category_id": 1}]
    write_coco(coco_root, annotation)
    path = coco_root / "annotations" / "instances_val2014.json"
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 2 of 5 entries")):
        data = COCO2014(coco_root, "val")
    assert data.skipped == [
        f"{path}: images[3] repeats images[0] (the file_name {COCO_IMAGES[0]['file_name']!r})",
        f"{path}: images[4] names the image '/etc/passwd', which leads out of {coco_root / 'val2014'}",
    ]
    assert torch.equal(data.targets, torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float32))
    with pytest.raises(ValueError, match=re.escape(f"{path}: images[3] repeats images[0]")):
        COCO2014(coco_root, "val", strict=True)


def test_pa100k_repeated_or_escaping_name_is_skipped(pa100k_root: Path) -> None:
    variables = pa100k_variables()
    variables["train_images_name"] = cell(["000001.jpg", "../000002.jpg", "./000001.jpg"])
    scipy.io.savemat(pa100k_root / "annotation.mat", variables)
    path = pa100k_root / "annotation.mat"
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 2 of 3 entries")):
        data = PA100K(pa100k_root)
    assert data.skipped == [
        f"{path}: train_images_name[1] names the image '../000002.jpg', which leads out of {pa100k_root / 'data'}",
        f"{path}: train_images_name[2] repeats train_images_name[0] (the image './000001.jpg')",
    ]
    assert data.image_paths == [pa100k_root / "data" / "000001.jpg"]
    assert data.entries == [f"{path}: train_images_name[0]"]
    assert torch.equal(data.targets, torch.tensor([PA_SPLITS["train"][1][0]], dtype=torch.float32))
    with pytest.raises(ValueError, match=re.escape(f"{path}: train_images_name[1] names the image")):
        PA100K(pa100k_root, strict=True)


def test_csv_repeated_or_escaping_line_is_skipped(csv_root: Path) -> None:
    path = write_csv(csv_root, "filename,cat\na.png,1\n../b.png,0\nsub/b.png,0\n./a.png,0\n/etc/passwd,1\n")
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped 3 of 5 entries")):
        data = ImageFolderCSV(csv_root, path)
    assert data.skipped == [
        f"{path}: line 3 names the image '../b.png', which leads out of {csv_root}",
        f"{path}: line 5 repeats line 2 (the image './a.png')",
        f"{path}: line 6 names the image '/etc/passwd', which leads out of {csv_root}",
    ]
    assert data.image_paths == [csv_root / "a.png", csv_root / "sub" / "b.png"]
    assert torch.equal(data.targets, torch.tensor([[1.0], [0.0]]))  # the first of the repeated lines
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3 names the image '../b.png'")):
        ImageFolderCSV(csv_root, path, strict=True)


def test_split_without_a_sample_is_refused(csv_root: Path, coco_root: Path) -> None:
    path = write_csv(csv_root, "filename,cat\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: holds no sample")):
        ImageFolderCSV(csv_root, path)
    path = write_csv(csv_root, "filename,cat\n../x.png,1\n")
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=re.escape(f"{path}: holds no sample that could be used")),
    ):
        ImageFolderCSV(csv_root, path)
    write_coco(coco_root, {"images": [], "annotations": [], "categories": coco_annotation()["categories"]})
    with pytest.raises(ValueError, match=r"instances_val2014\.json: holds no sample"):
        COCO2014(coco_root, "val")
    with pytest.raises(TypeError, match="strict must be a bool, got str"):
        COCO2014(coco_root, "val", strict="yes")


def test_a_name_with_whitespace_at_an_end_is_shown_quoted_with_the_file_meant(csv_root: Path) -> None:
    path = write_csv(csv_root, "filename,cat\na.png ,1\n")
    with pytest.raises(FileNotFoundError) as error:
        ImageFolderCSV(csv_root, f"{path} ")
    assert str(error.value) == (
        f"label file not found: {str(path) + ' '!r}; {path} exists: a name in the path has whitespace at one of its ends"
    )
    data = ImageFolderCSV(csv_root, path)  # the image's name in the file ends with a space
    with pytest.raises(FileNotFoundError) as error:
        data[0]
    assert str(error.value).startswith(f"image not found: {str(csv_root / 'a.png ')!r} (from {path}: line 2); ")
    assert str(error.value).endswith(
        f"{csv_root / 'a.png'} exists: a name in the path has whitespace at one of its ends"
    )
    tab = csv_root / "labels\t.csv"
    tab.write_text("filename,cat\n")
    with pytest.raises(ValueError, match=re.escape(f"{str(tab)!r}: holds no sample")):
        ImageFolderCSV(csv_root, tab)
