"""`cmae detect` data: the COCO layout (masks, crowd, negatives, category ids, the 2017 names),
each bad input named or left out and counted, and the pipelines keeping boxes and masks on
their pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cmae.data.coco import (
    Categories,
    CocoSplit,
    DetTrainSet,
    GeneratedInstances,
    LargeScaleJitter,
    detection_splits,
    eval_view,
    split_paths,
)
from cmae.errors import DataError

MEAN = (0.25, 0.5, 0.75)


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rle(m):
    r = mask_utils.encode(np.asfortranarray(m))
    r["counts"] = r["counts"].decode()
    return r


def write_coco(root, split="train", images=None, anns=None, cats=None, names="short", absent=()):
    """A small COCO-layout split: 40x30 images (one blank), categories 3 and 7 (not contiguous):
    a polygon, a compressed RLE, an uncompressed RLE and a crowd region."""
    h, w = 30, 40
    folder = split if names == "short" else f"{split}2017"
    img_dir = root / "images" / folder
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    if images is None:
        images = [
            {"id": 10, "file_name": "a.png", "height": h, "width": w},
            {"id": 11, "file_name": "b.png", "height": h, "width": w},
            {"id": 12, "file_name": "empty.png", "height": h, "width": w},
        ]
    for im in images:
        if im["file_name"] not in absent and not (img_dir / im["file_name"]).exists():
            Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(
                img_dir / im["file_name"]
            )
    if anns is None:
        uncompressed = run_lengths(rect_mask(h, w, 20, 2, 30, 12))
        anns = [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 8],
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]], "iscrowd": 0, "area": 80},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 15, 10, 10],
             "segmentation": rle(rect_mask(h, w, 20, 15, 30, 25)), "iscrowd": 0, "area": 100},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [20, 2, 10, 10],
             "segmentation": {"size": [h, w], "counts": uncompressed},
             "iscrowd": 0, "area": 100},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [0, 15, 15, 15],
             "segmentation": rle(rect_mask(h, w, 0, 15, 15, 30)), "iscrowd": 1, "area": 225},
        ]  # fmt: skip
    cats = cats or [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    ann_name = f"instances_{folder}.json"
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / ann_name).write_text(json.dumps(data))
    return img_dir, root / "annotations" / ann_name


def run_lengths(mask):
    """COCO's uncompressed RLE counts of a mask (column-major runs, starting with zeros)."""
    m = mask.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in m:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


def test_coco_split_masks_crowd_negatives_and_category_round_trip(tmp_path):
    split = CocoSplit(*write_coco(tmp_path))
    assert len(split) == 3 and split.image_ids == [10, 11, 12]
    cats = split.categories
    assert cats.ids == (3, 7) and cats.names == ("three", "seven")
    assert [cats.cat_id(cats.label(i)) for i in (3, 7)] == [3, 7]  # round trip
    assert cats.label(5) is None

    img, t = split.raw(0)
    assert img.shape == (3, 30, 40) and img.dtype == torch.uint8
    assert t["labels"].tolist() == [1, 2]
    assert t["boxes"].tolist() == [[2, 3, 12, 11], [20, 15, 30, 25]]  # xywh -> xyxy
    assert t["masks"].shape == (2, 30, 40)
    assert t["masks"][0, 3:11, 2:12].all() and t["masks"][1].sum() == 100  # polygon, RLE
    _, t = split.raw(1)  # the uncompressed RLE; the crowd region is not a training target
    assert t["labels"].tolist() == [2] and t["masks"][0].sum() == 100
    _, t = split.raw(2)  # no annotations: kept as a negative
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 30, 40)
    gt = split.coco_json()  # the evaluation's ground truth keeps the crowd region
    assert sorted(a["iscrowd"] for a in gt["annotations"]) == [0, 0, 0, 1]


def test_coco_2017_names_and_missing_layout(tmp_path):
    write_coco(tmp_path, "train", names="2017")
    img_dir, ann = split_paths(tmp_path, "train")
    assert img_dir.name == "train2017" and ann.name == "instances_train2017.json"
    with pytest.raises(DataError, match="instances_val.json: not found"):
        split_paths(tmp_path, "val")


def test_val_categories_must_match(tmp_path):
    write_coco(tmp_path, "train")
    write_coco(tmp_path, "val", cats=[{"id": 3, "name": "three"}])
    with pytest.raises(DataError, match="instances_val.json: categories differ"):
        detection_splits(str(tmp_path), {})


def bad_case(tmp_path, case):
    """A split with one bad input of kind ``case``; returns (paths, expected message)."""
    images, anns = None, None
    img_dir = tmp_path / "images" / "train"
    img_dir.mkdir(parents=True)
    good = {"id": 9, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 8],
            "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]], "iscrowd": 0}  # fmt: skip
    base = [{"id": 10, "file_name": "a.png", "height": 30, "width": 40}]
    if case == "missing image":
        images = [*base, {"id": 11, "file_name": "gone.png", "height": 30, "width": 40}]
        msg = "gone.png: image not found"
    elif case == "unreadable image":
        (img_dir / "bad.png").write_bytes(b"not a png")
        images = [*base, {"id": 11, "file_name": "bad.png", "height": 30, "width": 40}]
        msg = "bad.png: cannot read image"
    elif case == "size differs":
        Image.new("RGB", (20, 30)).save(img_dir / "small.png")
        images = [*base, {"id": 11, "file_name": "small.png", "height": 30, "width": 40}]
        msg = "small.png: image is 20x30 but the json says 40x30"
    elif case == "box outside":
        anns = [good, {**good, "id": 5, "bbox": [35, 3, 10, 8]}]
        msg = "annotation 5: box .* outside its 40x30 image"
    elif case == "empty mask":
        empty = rle(np.zeros((30, 40), np.uint8))
        anns = [good, {**good, "id": 5, "segmentation": empty}]
        msg = "annotation 5: a mask that is empty after decoding"
    elif case == "unknown category":
        anns = [good, {**good, "id": 5, "category_id": 99}]
        msg = "annotation 5: unknown category 99"
    else:
        raise AssertionError(case)
    paths = write_coco(tmp_path, images=images or base, anns=anns or [good], absent={"gone.png"})
    return paths, msg


CASES = [
    "missing image",
    "unreadable image",
    "size differs",
    "box outside",
    "empty mask",
    "unknown category",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named(tmp_path, case):
    paths, msg = bad_case(tmp_path, case)
    with pytest.raises(DataError, match=msg) as e:
        CocoSplit(*paths)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing image", "unknown category"])
def test_bad_input_left_out_and_counted_within_max_bad_fraction(tmp_path, case):
    paths, _ = bad_case(tmp_path, case)
    split = CocoSplit(*paths, max_bad_fraction=0.5)
    kind = "images" if "image" in case else "annotations"
    assert split.bad[kind] == 1 and sum(split.bad.values()) == 1
    assert len(split) == 1 and len(split.raw(0)[1]["labels"]) == 1


def test_unreadable_image_body_is_named_when_read(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    data = (img_dir / "b.png").read_bytes()
    (img_dir / "b.png").write_bytes(data[: len(data) // 2])  # header intact, body cut
    split = CocoSplit(img_dir, ann)
    with pytest.raises(DataError, match="b.png"):
        split.raw(1)


def two_instance_scene():
    """A 60x80 grey image with a red 20x10 bar and a blue 10x30 bar, their masks and boxes."""
    img = torch.full((3, 60, 80), 128, dtype=torch.uint8)
    masks = torch.zeros(2, 60, 80, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:50, 50:60] = 1
    img[:, masks[0].bool()] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None]
    img[:, masks[1].bool()] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None]
    boxes = torch.tensor([[10.0, 5, 30, 15], [50, 20, 60, 50]])
    return img, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}


def test_jitter_crop_flip_keep_boxes_and_masks_on_their_pixels():
    img, target = two_instance_scene()
    pipeline = LargeScaleJitter(48, (0.5, 3.0), 0.5, MEAN)
    flips, dropped = set(), 0
    for seed in range(24):
        torch.manual_seed(seed)
        x, t = pipeline(img, target)
        assert x.shape == (3, 48, 48) and t["masks"].shape[1:] == (48, 48)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        dropped += 2 - len(t["labels"])
        centres = {}
        for box, label, m in zip(t["boxes"], t["labels"], t["masks"], strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in tight]  # the box is the mask's
            # the mask covers its own bar's colour, red (label 1) or blue (label 2), not the
            # grey around it (edge pixels blend: the image is antialiased, the mask is not)
            r, _, b = x[:, m.bool()].mean(1).tolist()
            assert (r - b if label == 1 else b - r) > 0.4, (seed, label.item(), r, b)
            centres[int(label)] = xs.float().mean()
        if len(centres) == 2:  # the red bar is left of the blue one unless flipped
            flips.add(bool(centres[1] > centres[2]))
    assert flips == {True, False}  # both flipped and unflipped draws happened
    assert dropped > 0  # some crops left an instance out (and its label with it)


def test_jitter_pads_bottom_right_with_the_mean():
    img, target = two_instance_scene()
    pipeline = LargeScaleJitter(128, (0.5, 0.5), 0.0, MEAN)  # 80x60 -> 64x48: padded
    x, t = pipeline(img, target)
    assert torch.allclose(x[:, 100:, :], torch.tensor(MEAN).view(3, 1, 1).expand(3, 28, 128))
    assert torch.allclose(x[:, :, 100:], torch.tensor(MEAN).view(3, 1, 1).expand(3, 128, 28))
    assert t["boxes"][0].tolist() == [8.0, 4.0, 24.0, 12.0]  # the red bar at half size


def test_eval_view_long_side_and_padding():
    img = torch.zeros(3, 30, 60, dtype=torch.uint8)
    x, factor = eval_view(img, 96, MEAN)
    assert x.shape == (3, 96, 96) and factor == 96 / 60
    assert (x[:, :48] == 0).all()  # the image: 30 x 1.6 = 48 rows
    assert torch.allclose(x[:, 48:], torch.tensor(MEAN).view(3, 1, 1).expand(3, 48, 96))


def test_train_samples_are_seeded_by_key():
    base = GeneratedInstances(4, 32, 0)
    ds = DetTrainSet(base, LargeScaleJitter(32, (0.5, 1.5), 0.5, MEAN), seed=3)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    assert not torch.equal(a[0], ds[(2, 2)][0])


def test_generated_instances():
    base = GeneratedInstances(6, 32, 0)
    img, t = base.raw(0)
    assert img.shape == (3, 32, 32) and 1 <= len(t["labels"]) <= 3
    assert set(t["labels"].tolist()) <= {1, 2, 3}
    for box, m in zip(t["boxes"], t["masks"], strict=True):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    gt = base.coco_json()
    assert len(gt["images"]) == 6
    assert len(gt["annotations"]) == sum(len(base.raw(i)[1]["labels"]) for i in range(6))
    assert isinstance(base.categories, Categories) and len(base.categories.ids) == 3
