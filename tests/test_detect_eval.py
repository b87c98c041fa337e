"""`cmae detect` evaluation: COCOeval of the ground truth fed back gives AP 100 (crowd regions
and empty images included), wrong detections lower it, the test view maps back to the image,
category ids go back to the json's."""

import torch

from cmae.data.coco import CocoSplit, DetValSet
from cmae.eval.detect import (
    IOU_TYPES,
    coco_eval,
    coco_results,
    ground_truth,
    predict,
    to_original,
)
from tests.test_detect_data import write_coco


def feed_back(split, extra=None):
    """The split's non-crowd ground truth as detections (score 0.5), plus ``extra[i]``."""
    preds = {}
    for i in range(len(split)):
        _, t = split.raw(i)
        p = {**t, "scores": torch.full((len(t["labels"]),), 0.5)}
        if extra and i in extra:
            p = {k: torch.cat([p[k], extra[i][k]]) for k in p}
        preds[i] = p
    return coco_results(preds, split.image_ids, split.categories)


def scores(split, results):
    gt = ground_truth(split.coco_json())
    return {t: coco_eval(gt, results[t], t, split.categories) for t in IOU_TYPES}


def one_detection(box, label, score, h=30, w=40):
    x0, y0, x1, y1 = box
    m = torch.zeros(1, h, w, dtype=torch.uint8)
    m[0, y0:y1, x0:x1] = 1
    return {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([label]),
        "scores": torch.tensor([score]),
        "masks": m,
    }


def test_ground_truth_fed_back_gives_ap_100(tmp_path):
    split = CocoSplit(*write_coco(tmp_path))  # with a crowd region and an empty image
    res = feed_back(split)
    assert {r["category_id"] for r in res["bbox"]} == {3, 7}  # the json's ids, not labels
    for t, (stats, per_cat) in scores(split, res).items():
        assert stats["AP"] == stats["AP50"] == stats["AP75"] == 100.0, t
        assert per_cat == {"three": 100.0, "seven": 100.0}


def test_detection_on_a_crowd_region_is_ignored_elsewhere_it_counts(tmp_path):
    split = CocoSplit(*write_coco(tmp_path))
    # image 1's crowd region (category 3) at [0, 15, 15, 30]: a detection there is no error
    on_crowd = {1: one_detection([0, 15, 15, 30], 1, 0.9)}
    stats = scores(split, feed_back(split, on_crowd))
    assert stats["bbox"][0]["AP"] == 100.0 and stats["segm"][0]["AP"] == 100.0
    # the same detection on the empty image is a false positive ranked first
    on_empty = {2: one_detection([0, 15, 15, 30], 1, 0.9)}
    stats = scores(split, feed_back(split, on_empty))
    assert stats["bbox"][0]["AP"] < 100.0 and stats["segm"][0]["AP"] < 100.0


def test_no_detections_give_zero(tmp_path):
    split = CocoSplit(*write_coco(tmp_path))
    stats, per_cat = coco_eval(ground_truth(split.coco_json()), [], "bbox", split.categories)
    assert stats["AP"] == 0.0 and per_cat["three"] == 0.0


def test_to_original_undoes_the_test_view():
    # a 30 x 40 image seen at 80 px (factor 2), padded to 80 x 80
    masks = torch.zeros(1, 1, 80, 80)
    masks[0, 0, 20:40, 10:30] = 0.9
    pred = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
        "masks": masks,
    }
    out = to_original(pred, 2.0, 30, 40)
    assert out["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0]]
    assert out["masks"].shape == (1, 30, 40) and out["masks"].dtype == torch.uint8
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 19, 5, 14)


def test_predict_maps_a_model_output_back_to_each_image(tmp_path):
    split = CocoSplit(*write_coco(tmp_path))
    val = DetValSet(split, 80, (0.5, 0.5, 0.5))

    class GroundTruthModel(torch.nn.Module):
        """Returns image 0's instances at the view's scale (factor 2) for every input."""

        def forward(self, imgs):
            _, t = split.raw(0)
            masks = torch.zeros(len(t["masks"]), 1, 80, 80)
            masks[:, 0, :60, :] = torch.nn.functional.interpolate(
                t["masks"][:, None].float(), size=(60, 80)
            )[:, 0]
            out = {"boxes": t["boxes"] * 2, "labels": t["labels"], "masks": masks}
            return [{**out, "scores": torch.ones(len(t["labels"]))} for _ in imgs]

    preds = predict(GroundTruthModel(), val, [0], torch.device("cpu"))
    stats = scores(split, coco_results(preds, split.image_ids, split.categories))
    # image 0 is found exactly (its two instances), the other images' instances are missed
    assert stats["bbox"][1]["three"] == 100.0 and stats["segm"][1]["three"] == 100.0
    assert 0 < stats["bbox"][0]["AP"] < 100.0
