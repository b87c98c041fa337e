"""`cmae detect` end to end on a tiny model: the outputs, exact resume, the presets and config
checks, the lr schedule, bad data reported by the CLI as one line."""

import json

import pytest
import torch

from cmae.cli import main
from cmae.config.detect import load_detect_config
from cmae.errors import ConfigError
from cmae.runtime.optim import multistep_lr
from cmae.train.detect import default_window
from tests.test_detect_data import write_coco


def tiny(tmp_path, out, *extra):
    """A 2-block, 32-wide ViT on 4 generated 32 px images, 16-wide heads: seconds per run."""
    preset = tmp_path / "enc.yaml"
    preset.write_text("extends: quick\nmodel:\n  encoder: vit_32x2h2\n")
    return [
        "detect",
        "--out",
        str(out),
        f"encoder.preset={preset}",
        "data.size=32",
        "data.synthetic_size=32",
        "data.synthetic_train=4",
        "data.synthetic_val=2",
        "data.num_workers=0",
        "data.vis_images=1",
        "model.channels=16",
        "model.rois_per_image=8",
        "model.proposals=20",
        "model.detections_per_image=5",
        "batch_size=2",
        "iters=4",
        "warmup_iters=1",
        "eval_every=0",
        "save_every=2",
        "log_every=1",
        "threads=1",
        *extra,
    ]


def test_run_writes_results_predictions_log_and_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny(tmp_path, straight)) == 0
    res = json.loads((straight / "results.json").read_text())
    for t in ("bbox", "segm"):
        assert set(res[t]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(res["per_category"]["bbox"]) == set(res["categories"])
    assert res["config"]["model"]["channels"] == 16 and res["iteration"] == 4
    assert (straight / "predictions.png").is_file() and (straight / "curves.png").is_file()
    lines = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss_mask" in r] == [1, 2, 3, 4]
    assert any(r.get("eval") and "bbox_AP50" in r for r in lines)

    assert main(tiny(tmp_path, split, "max_iters=2")) == 0  # stops at 2 (schedule of 4)
    assert main(tiny(tmp_path, split)) == 0  # resume=auto: from iteration 2 to 4
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in last if r.get("step") == 4 and "loss" in r] == [
        r["loss"] for r in lines if r["step"] == 4 and "loss" in r
    ]


def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    root = tmp_path / "coco"
    images = [{"id": 1, "file_name": "gone.jpg", "height": 30, "width": 40}]
    write_coco(root, "train", images=images, anns=[], absent={"gone.jpg"})
    write_coco(root, "val")
    assert main(tiny(tmp_path, tmp_path / "out", f"data.path={root}")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "gone.jpg: image not found" in err


def test_presets_and_config_checks():
    coco = load_detect_config("coco_vit_base")
    assert coco.data.size == 1024 and coco.data.scale_range == (0.1, 2.0)
    assert coco.lr_steps == (163889, 177546) and coco.iters == 184375
    assert coco.model.global_blocks == (2, 5, 8, 11) and coco.batch_size == 64
    assert load_detect_config("pennfudan_cpu").iters == 200
    with pytest.raises(ConfigError, match="unknown detect preset 'nope'"):
        load_detect_config("nope")
    with pytest.raises(ConfigError, match="unknown config key 'model.anchors'"):
        load_detect_config(None, ["model.anchors=[1]"])
    with pytest.raises(ConfigError, match="model.anchor_sizes: 5 positive"):
        load_detect_config(None, ["model.anchor_sizes=[8,16]"])
    with pytest.raises(ConfigError, match="lr_steps: increasing"):
        load_detect_config(None, ["lr_steps=[20,10]"])
    with pytest.raises(ConfigError, match="data.max_bad_fraction"):
        load_detect_config(None, ["data.max_bad_fraction=1.5"])


def test_multistep_lr_and_default_window():
    lr = [multistep_lr(s, 1.0, 10, 0.001, (100, 150), 0.1) for s in (0, 5, 10, 99, 100, 150)]
    assert lr == pytest.approx([0.001, 0.5005, 1.0, 1.0, 0.1, 0.01])
    assert default_window(1024, 16) == 14  # ViTDet's
    assert default_window(64, 4) == 4


def test_anchor_sizes_override_reaches_the_model(tmp_path):
    from cmae.interop.encoders import load_encoder_weights
    from cmae.train.detect import build_model

    preset = tmp_path / "enc.yaml"
    preset.write_text("extends: quick\nmodel:\n  encoder: vit_32x2h2\n")
    over = [f"encoder.preset={preset}", "data.size=32", "model.channels=16"]
    weights = load_encoder_weights("random", str(preset))
    cpu = torch.device("cpu")
    sizes = []
    for extra in ([], ["model.anchor_sizes=[8,16,32,64,128]"]):
        cfg = load_detect_config(None, over + extra)
        model = build_model(cfg, weights, 3, (0.5,) * 3, (0.25,) * 3, cpu)
        sizes.append(model.rpn.anchor_generator.sizes)
    assert sizes == [((32,), (64,), (128,), (256,), (512,)), ((8,), (16,), (32,), (64,), (128,))]
