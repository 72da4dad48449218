"""Tests of cocomix_nb.data on the real coco2017-mini set and on small COCO folders written from its images."""

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocomix_nb.data import (
    CaptionDataset,
    ImageDataset,
    PairDataset,
    load_coco_split,
    load_image,
    normalize_caption,
    resolve_data_root,
)

MINI = Path(os.environ.get("COCOMIX_TEST_DATA", Path(__file__).resolve().parents[2] / "shared/data/coco2017-mini"))

pytestmark = pytest.mark.skipif(
    not (MINI / "split.json").is_file(),
    reason=f"coco2017-mini data set not found at {MINI}; set COCOMIX_TEST_DATA to its folder",
)


# ---------------------------------------------------------------- real data


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def raw():
    "The mini set's raw caption and label annotations, read with json only."
    captions = {"images": [], "annotations": []}
    labels = {"images": [], "annotations": []}
    for set_name in ("train2017", "val2017"):
        caption_file = read_json(MINI / f"annotations/captions_{set_name}.json")
        label_file = read_json(MINI / f"annotations/labels_{set_name}.json")
        for key in ("images", "annotations"):
            captions[key] += caption_file[key]
            labels[key] += label_file[key]
        labels["categories"] = label_file["categories"]
    return {"captions": captions, "labels": labels}


@pytest.fixture(scope="module")
def splits():
    return {name: load_coco_split(name, MINI) for name in ("train", "val", "test", "all")}


@pytest.mark.parametrize("name, n_images", [("train", 1775), ("val", 200), ("test", 500), ("all", 2475)])
def test_split_sizes(splits, name, n_images):
    assert splits[name].n_images == n_images
    assert splits[name].labels.shape == (n_images, 80)


def test_splits_match_split_json(splits):
    split_ids = read_json(MINI / "split.json")
    for name in ("train", "val", "test"):
        assert splits[name].image_ids == sorted(split_ids[name])


def test_test_split_has_2500_captions(splits):
    assert splits["test"].n_captions >= 2500


def test_all_split_keeps_every_caption(splits, raw):
    assert splits["all"].n_captions == len(raw["captions"]["annotations"])


def test_six_caption_images_keep_six(splits, raw):
    per_image = defaultdict(list)
    for annotation in raw["captions"]["annotations"]:
        per_image[annotation["image_id"]].append(annotation)
    six_caption_ids = sorted(i for i, annotations in per_image.items() if len(annotations) == 6)
    assert len(six_caption_ids) == 5

    split = splits["all"]
    for image_id in six_caption_ids:
        caption_indices = split.captions_of(split.image_ids.index(image_id))
        expected = sorted(per_image[image_id], key=lambda a: a["id"])
        assert len(caption_indices) == 6
        assert [split.caption_ids[k] for k in caption_indices] == [a["id"] for a in expected]
        assert [split.captions[k] for k in caption_indices] == [normalize_caption(a["caption"]) for a in expected]


def test_caption_to_image_by_hand(splits):
    # The first annotation of captions_val2017.json, read by hand:
    # {"id": 372891, "image_id": 139, "caption": "A woman stands in the dining area at the table."}
    split = splits["all"]
    k = split.caption_ids.index(372891)
    assert split.image_ids[split.caption_to_image[k]] == 139
    assert split.captions[k] == "A woman stands in the dining area at the table."
    # The first annotation of captions_train2017.json: image 790.
    k = split.caption_ids.index(576009)
    assert split.image_ids[split.caption_to_image[k]] == 790
    assert split.captions[k] == "a family is sitting down at a table to have cake"


@pytest.mark.parametrize("name", ["test", "all"])
def test_caption_to_image_matches_raw_json(splits, raw, name):
    annotation_of = {a["id"]: a for a in raw["captions"]["annotations"]}
    split = splits[name]
    assert split.caption_to_image.dtype == np.int64
    assert split.caption_to_image.shape == (split.n_captions,)
    for k, caption_id in enumerate(split.caption_ids):
        annotation = annotation_of[caption_id]
        assert split.image_ids[split.caption_to_image[k]] == annotation["image_id"], caption_id
        assert split.captions[k] == normalize_caption(annotation["caption"]), caption_id


def test_real_captions_whitespace_normalised(splits, raw):
    irregular = [a for a in raw["captions"]["annotations"] if a["caption"] != normalize_caption(a["caption"])]
    assert irregular, "the mini set should contain captions with irregular whitespace"
    for caption in splits["all"].captions:
        assert caption == caption.strip()
        assert "\n" not in caption
        assert "  " not in caption


def test_unlabelled_images_have_zero_rows(splits, raw):
    labelled = {a["image_id"] for a in raw["labels"]["annotations"]}
    unlabelled = [image["id"] for image in raw["labels"]["images"] if image["id"] not in labelled]
    assert len(unlabelled) == 4

    split = splits["all"]
    for image_id in unlabelled:
        assert not split.labels[split.image_ids.index(image_id)].any(), image_id
    assert int((split.labels.sum(axis=1) == 0).sum()) == 4


def test_label_columns_follow_category_ids(splits):
    split = splits["all"]
    assert split.labels.dtype == np.float32
    assert split.category_names[0] == "person"  # category id 1
    assert split.category_names[79] == "toothbrush"  # category id 90
    assert split.labels[split.image_ids.index(139), 0] == 1.0  # image 139 shows a person
    assert split.labels[split.image_ids.index(92091), 79] == 1.0  # image 92091 shows a toothbrush


def test_labels_match_raw_json(splits, raw):
    category_ids = sorted(c["id"] for c in raw["labels"]["categories"])
    assert len(category_ids) == 80
    column_of = {category_id: column for column, category_id in enumerate(category_ids)}
    split = splits["all"]
    expected = np.zeros((split.n_images, 80), dtype=np.float32)
    row_of = {image_id: row for row, image_id in enumerate(split.image_ids)}
    for annotation in raw["labels"]["annotations"]:
        expected[row_of[annotation["image_id"]], column_of[annotation["category_id"]]] = 1.0
    np.testing.assert_array_equal(split.labels, expected)


def test_image_paths_exist(splits):
    for path in splits["val"].image_paths:
        assert path.is_file(), path


def test_fingerprint_stable_across_loads(splits):
    assert load_coco_split("val", MINI).fingerprint() == splits["val"].fingerprint()
    assert splits["val"].fingerprint() != splits["test"].fingerprint()


def test_max_images_takes_first_by_id(splits):
    assert load_coco_split("test", MINI, max_images=4).image_ids == splits["test"].image_ids[:4]


def test_unknown_split_lists_valid_names():
    with pytest.raises(ValueError, match="unknown split 'validation'") as error:
        load_coco_split("validation", MINI)
    for name in ("train", "val", "test", "all"):
        assert name in str(error.value)


def test_datasets_yield_expected_items(splits):
    split = splits["test"]

    images = ImageDataset(split, lambda image: torch.from_numpy(np.array(image)))
    image, image_index = images[3]
    assert len(images) == split.n_images
    assert image_index == 3
    assert image.dtype == torch.uint8
    assert image.shape[2] == 3

    captions = CaptionDataset(split)
    assert len(captions) == split.n_captions
    assert captions[5] == (split.captions[5], 5)

    pairs = PairDataset(split)
    assert len(pairs) == split.n_captions
    k = split.captions_of(10)[1]
    assert pairs[k] == (10, split.captions[k], k, 10)

    loaded_pairs = PairDataset(split, lambda image: image.size)
    assert loaded_pairs[k] == (load_image(split.image_paths[10]).size, split.captions[k], k, 10)

    with pytest.raises(IndexError):
        captions[split.n_captions]


# ---------------------------------------------------------------- written fixtures


@pytest.fixture(scope="module")
def real_images():
    "Paths of three real val2017 images of the mini set."
    return sorted((MINI / "images/val2017").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def categories(raw):
    return raw["labels"]["categories"]


def write_coco(root, images, captions, labels=(), *, categories, set_name="val2017",
               image_folder=None, label_prefix="labels", split=None):
    """Write a small COCO folder under `root` and return it.

    images maps each image id to the real image file to copy, or to None to leave the file out.
    captions is a list of (annotation id, image id, caption value) and labels a list of (image id, category id).
    split, when given, is written to split.json.
    """
    root.mkdir(parents=True, exist_ok=True)
    image_folder = root / "images" / set_name if image_folder is None else root / image_folder
    image_folder.mkdir(parents=True, exist_ok=True)
    image_entries = []
    for image_id, source in images.items():
        file_name = f"{image_id:012d}.jpg"
        image_entries.append({"id": image_id, "file_name": file_name})
        if source is not None:
            (image_folder / file_name).write_bytes(Path(source).read_bytes())

    caption_annotations = [{"id": a, "image_id": i, "caption": c} for a, i, c in captions]
    label_annotations = [{"id": n + 1, "image_id": i, "category_id": c} for n, (i, c) in enumerate(labels)]
    annotations = root / "annotations"
    annotations.mkdir(exist_ok=True)
    (annotations / f"captions_{set_name}.json").write_text(
        json.dumps({"images": image_entries, "annotations": caption_annotations}, ensure_ascii=False), encoding="utf-8")
    (annotations / f"{label_prefix}_{set_name}.json").write_text(
        json.dumps({"images": image_entries, "annotations": label_annotations, "categories": categories}),
        encoding="utf-8")
    if split is not None:
        (root / "split.json").write_text(json.dumps(split))
    return root


@pytest.fixture
def small_coco(tmp_path, real_images, categories):
    "A COCO folder with three real images (ids 1, 2, 3), two captions each, and labels."
    captions = [(10 * i + j, i, f"caption {j} of image {i}") for i in (1, 2, 3) for j in (1, 2)]
    return write_coco(
        tmp_path / "coco", dict(zip((1, 2, 3), real_images)), captions, [(1, 1), (2, 90), (2, 1)],
        categories=categories, split={"train": [1, 2], "test": [3]},
    )


def test_small_coco_loads(small_coco):
    split = load_coco_split("all", small_coco)
    assert split.image_ids == [1, 2, 3]
    assert split.caption_ids == [11, 12, 21, 22, 31, 32]
    assert split.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert split.labels[0].nonzero()[0].tolist() == [0]
    assert split.labels[1].nonzero()[0].tolist() == [0, 79]
    assert not split.labels[2].any()
    assert load_coco_split("test", small_coco).image_ids == [3]


def test_png_named_jpg_loads(tmp_path, real_images):
    path = tmp_path / "really_a_png.jpg"
    Image.open(real_images[0]).save(path, format="PNG")
    assert Image.open(path).format == "PNG"
    image = load_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(real_images[0]).convert("RGB")))


def make_variant(image, mode):
    "Return `image` converted to `mode` and the file format that stores that mode."
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257), "PNG"
    if mode == "P+transparency":
        variant = image.convert("P")
        variant.info["transparency"] = 0
        return variant, "PNG"
    return image.convert(mode), ("JPEG" if mode in ("L", "CMYK") else "PNG")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "P+transparency", "I;16"])
def test_image_modes_load_as_rgb(tmp_path, real_images, mode):
    original = Image.open(real_images[0]).convert("RGB")
    variant, file_format = make_variant(original, mode)
    path = tmp_path / "variant.jpg"
    variant.save(path, format=file_format)
    assert Image.open(path).mode == mode.removesuffix("+transparency")

    image = load_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert image.size == original.size
    assert pixels.dtype == np.uint8
    assert pixels.shape == (original.height, original.width, 3)


def test_sixteen_bit_scaled_not_clipped(tmp_path, real_images):
    gray = np.asarray(Image.open(real_images[0]).convert("L"))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    pixels = np.asarray(load_image(path))
    np.testing.assert_array_equal(pixels[..., 0], gray)
    np.testing.assert_array_equal(pixels[..., 2], gray)


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    path = tmp_path / "transparent.png"
    rgba.save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert image.getpixel((1, 0)) == (255, 255, 255)


def test_missing_image_error_lists_it(small_coco):
    missing = small_coco / "images/val2017/000000000002.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_coco_split("all", small_coco)
    message = str(error.value)
    assert str(missing) in message
    assert "1 of 3 image files" in message
    assert "on_missing='skip'" in message


def test_unreadable_image_error_lists_it(small_coco):
    broken = small_coco / "images/val2017/000000000003.jpg"
    broken.write_text("not an image")
    with pytest.raises(FileNotFoundError, match="000000000003.jpg \\(not an image format PIL can read\\)"):
        load_coco_split("all", small_coco)


def test_missing_image_error_lists_first_ten(tmp_path, real_images, categories):
    images = {i: None for i in range(1, 13)}
    images[13] = real_images[0]
    root = write_coco(tmp_path, images, [(i, i, "a caption") for i in images], categories=categories)
    with pytest.raises(FileNotFoundError) as error:
        load_coco_split("all", root)
    message = str(error.value)
    assert "12 of 13 image files" in message
    assert "000000000010.jpg" in message
    assert "000000000011.jpg" not in message
    assert "(and 2 more)" in message


def test_missing_image_skip_drops_with_count(small_coco, caplog):
    (small_coco / "images/val2017/000000000002.jpg").unlink()
    caplog.set_level(logging.WARNING, logger="cocomix_nb.data")
    split = load_coco_split("all", small_coco, on_missing="skip")

    assert split.image_ids == [1, 3]
    assert split.caption_ids == [11, 12, 31, 32]
    assert split.caption_to_image.tolist() == [0, 0, 1, 1]
    assert split.labels.shape == (2, 80)
    assert not split.labels[1].any()
    assert "Skipped 1 of 3 images" in caplog.text
    assert "their 2 captions" in caplog.text


def test_invalid_on_missing_rejected(small_coco):
    with pytest.raises(ValueError, match="invalid on_missing 'ignore'"):
        load_coco_split("all", small_coco, on_missing="ignore")


def test_unknown_category_id_raises(tmp_path, real_images, categories):
    root = write_coco(tmp_path, {1: real_images[0]}, [(1, 1, "a caption")], [(1, 91)], categories=categories)
    with pytest.raises(ValueError, match="unknown category id 91") as error:
        load_coco_split("all", root)
    assert "labels_val2017.json" in str(error.value)


def test_empty_captions_dropped_with_count(tmp_path, real_images, categories, caplog):
    captions = [(1, 1, "A dog."), (2, 1, "   "), (3, 1, "\n\t"), (4, 2, "A cat.")]
    root = write_coco(tmp_path, {1: real_images[0], 2: real_images[1]}, captions, categories=categories)
    caplog.set_level(logging.WARNING, logger="cocomix_nb.data")
    split = load_coco_split("all", root)

    assert split.captions == ["A dog.", "A cat."]
    assert split.caption_ids == [1, 4]
    assert split.caption_to_image.tolist() == [0, 1]
    assert "Dropped 2 of 4 captions" in caplog.text


def test_image_without_caption_dropped_with_count(tmp_path, real_images, categories, caplog):
    # Image 2 has only an empty caption and image 3 has no caption annotation at all.
    captions = [(1, 1, "A dog."), (2, 2, " ")]
    root = write_coco(tmp_path, dict(zip((1, 2, 3), real_images)), captions, categories=categories)
    caplog.set_level(logging.WARNING, logger="cocomix_nb.data")
    split = load_coco_split("all", root)

    assert split.image_ids == [1]
    assert split.captions == ["A dog."]
    assert "Dropped 2 of 3 images" in caplog.text


def test_caption_string_normalised(tmp_path, real_images, categories):
    captions = [(1, 1, "  A man\nriding   a\thorse \n "), (2, 1, "Un café près de la fenêtre.")]
    root = write_coco(tmp_path, {1: real_images[0]}, captions, categories=categories)
    split = load_coco_split("all", root)
    assert split.captions == ["A man riding a horse", "Un café près de la fenêtre."]


def test_caption_list_gives_several_captions(tmp_path, real_images, categories):
    captions = [(1, 1, ["First caption.", "Second\ncaption.", ""]), (2, 2, "Only caption.")]
    root = write_coco(tmp_path, {1: real_images[0], 2: real_images[1]}, captions, categories=categories)
    split = load_coco_split("all", root)
    assert split.captions == ["First caption.", "Second caption.", "Only caption."]
    assert split.caption_ids == [1, 1, 2]
    assert split.caption_to_image.tolist() == [0, 0, 1]


def test_invalid_caption_value_raises(tmp_path, real_images, categories):
    root = write_coco(tmp_path, {1: real_images[0]}, [(7, 1, 42)], categories=categories)
    with pytest.raises(ValueError, match="invalid caption 42 in annotation 7"):
        load_coco_split("all", root)


def write_karpathy(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [
        {"filepath": "val2017", "filename": f"{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
         "sentences": [{"raw": "a caption"}]}
        for cocoid, split in entries
    ]
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def test_karpathy_split_restval_is_train(tmp_path, real_images, categories):
    images = {1: real_images[0], 2: real_images[1], 3: real_images[2], 4: real_images[0]}
    root = write_coco(tmp_path, images, [(i, i, "a caption") for i in images], categories=categories)
    write_karpathy(root / "annotations" / "dataset_coco.json",
                   [(4, "restval"), (1, "train"), (2, "val"), (3, "test")])

    assert load_coco_split("train", root).image_ids == [1, 4]
    assert load_coco_split("val", root).image_ids == [2]
    assert load_coco_split("test", root).image_ids == [3]
    with pytest.raises(ValueError, match="unknown split 'restval'"):
        load_coco_split("restval", root)


def test_karpathy_split_file_argument(tmp_path, real_images, categories):
    images = {1: real_images[0], 2: real_images[1]}
    root = write_coco(tmp_path / "coco", images, [(i, i, "a caption") for i in images],
                      categories=categories, split={"train": [1, 2], "test": []})
    karpathy = tmp_path / "elsewhere" / "dataset_coco.json"
    write_karpathy(karpathy, [(1, "test"), (2, "restval")])

    assert load_coco_split("train", root).image_ids == [1, 2]
    assert load_coco_split("test", root, split_file=karpathy).image_ids == [1]


def test_split_id_without_captions_raises(tmp_path, real_images, categories):
    root = write_coco(tmp_path, {1: real_images[0]}, [(1, 1, "a caption")],
                      categories=categories, split={"test": [1, 999]})
    with pytest.raises(ValueError, match="1 of the 2 image ids of split 'test'.*: 999"):
        load_coco_split("test", root)


def test_full_coco_layout(tmp_path, real_images, categories):
    # Images directly under root/<set> and labels from instances_<set>.json, as in the official release.
    root = write_coco(tmp_path, {5: real_images[0]}, [(1, 5, "a caption")], [(5, 90)], categories=categories,
                      set_name="val2014", image_folder="val2014", label_prefix="instances")
    split = load_coco_split("all", root)
    assert split.image_paths == [root / "val2014" / "000000000005.jpg"]
    assert split.labels[0, 79] == 1.0


def test_fingerprint_tracks_captions_not_root(tmp_path, real_images, categories):
    images = {1: real_images[0], 2: real_images[1]}
    first = write_coco(tmp_path / "a", images, [(1, 1, "a dog"), (2, 2, "a cat")], categories=categories)
    moved = write_coco(tmp_path / "b", images, [(1, 1, "a dog"), (2, 2, "a cat")], categories=categories)
    changed = write_coco(tmp_path / "c", images, [(1, 1, "a dog"), (2, 2, "a cow")], categories=categories)

    fingerprint = load_coco_split("all", first).fingerprint()
    assert len(fingerprint) == 64
    assert load_coco_split("all", moved).fingerprint() == fingerprint
    assert load_coco_split("all", changed).fingerprint() != fingerprint


def test_data_env_var_resolves(small_coco, monkeypatch):
    monkeypatch.setenv("COCOMIX_DATA", str(small_coco))
    assert resolve_data_root() == small_coco.resolve()
    assert load_coco_split("all").n_images == 3
    # An explicit argument wins over the environment variable.
    assert resolve_data_root(MINI) == MINI.resolve()


def test_default_data_root_is_data_coco(tmp_path, monkeypatch):
    monkeypatch.delenv("COCOMIX_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "coco").mkdir(parents=True)
    assert resolve_data_root() == (tmp_path / "data" / "coco").resolve()


def test_missing_data_root_error_names_all_three(tmp_path, monkeypatch):
    monkeypatch.delenv("COCOMIX_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_root()
    message = str(error.value)
    assert "data_root" in message
    assert "COCOMIX_DATA" in message
    assert "data/coco" in message
