"""`cmae segment`: the pyramid, UperNet, metrics, data checks, sliding windows, resume, CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmae.cli import main
from cmae.config import ConfigError, load_segment_config
from cmae.data import dense_shapes
from cmae.data.datasets import DataError
from cmae.data.segmentation import (
    IGNORE,
    GeneratedSegmentation,
    SegFolder,
    SegValSet,
    TrainPipeline,
    normalize_255,
    reduce_zero_label,
    segmentation_splits,
)
from cmae.eval.segment import (
    confusion_matrix,
    evaluate,
    predict_logits,
    seg_metrics,
    slide_logits,
)
from cmae.interop.encoders import (
    EncoderWeights,
    load_encoder_weights,
    load_pyramid,
    segmentor_for,
)
from cmae.models.upernet import (
    ViTPyramid,
    default_out_indices,
    resample_pos_embed,
)
from cmae.models.vit import ViTEncoder
from cmae.runtime.optim import layer_decay_groups, poly_lr
from cmae.train.segment import seg_loss
from tests.helpers import SEGMENT_SMALL, free_port

# a 4-block ViT of width 32 (patch 4): the smallest encoder with 4 pyramid taps
DIM, DEPTH, HEADS = 32, 4, 2


def small_weights(img_size=16, patch=4, seed=0):
    torch.manual_seed(seed)
    enc = ViTEncoder(img_size, patch, DIM, DEPTH, HEADS)
    enc.init_weights()
    with torch.no_grad():  # a non-sin-cos position embedding: its resampling must be visible
        enc.pos_embed.add_(0.1 * torch.randn_like(enc.pos_embed))
    name = f"vit_{DIM}x{DEPTH}h{HEADS}"
    return enc, EncoderWeights(enc.state_dict(), name, img_size, patch, None, None, "t")


def small_segmentor(weights, crop=32, **kw):
    """UperNet (5 classes, narrow heads) on the width-32 ViT, no drop path."""
    return segmentor_for(weights, 5, crop, channels=16, aux_channels=8, drop_path=0.0, **kw)


def test_vit_pyramid_levels_and_strides():
    backbone = ViTPyramid(DIM, DEPTH, HEADS, 16, 64, drop_path=0.0)
    feats = backbone(torch.randn(2, 3, 64, 96))  # not square: both sides follow the strides
    assert backbone.strides == (4, 8, 16, 32)
    assert [tuple(f.shape) for f in feats] == [
        (2, DIM, 16, 24),
        (2, DIM, 8, 12),
        (2, DIM, 4, 6),
        (2, DIM, 2, 3),
    ]
    assert default_out_indices(12) == (3, 5, 7, 11)  # ViT-B, the reference's taps
    assert default_out_indices(24) == (7, 11, 15, 23)


def test_convvit_pyramid_levels_and_strides():
    weights = load_encoder_weights("random", "convvit_tiny")  # patch 4 at 32 px
    model = segmentor_for(weights, 3, 32, channels=8, aux_channels=4)
    feats = model.backbone(torch.randn(1, 3, 32, 32))
    s = model.backbone.strides
    assert s == (1, 2, 4, 8)
    assert [f.shape[-1] for f in feats] == [32 // x for x in s]
    assert [f.shape[1] for f in feats] == list(model.backbone.channels)
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3, 32, 32) and aux.shape == (2, 3, 8, 8)


def test_position_embedding_exact_at_the_trained_grid():
    enc, weights = small_weights(img_size=32)
    backbone = ViTPyramid(DIM, DEPTH, HEADS, 4, 32, drop_path=0.0)
    load_pyramid(backbone, weights)
    assert torch.equal(backbone.pos_embed.data, enc.pos_embed.data)
    same = resample_pos_embed(enc.pos_embed, (8, 8))
    assert same is enc.pos_embed
    # the tapped blocks' tokens equal the pretrained encoder's (no final norm) at that size
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        level3 = backbone(x)[2]
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        tokens = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), tokens], 1)
        for blk in enc.blocks[: backbone.out_indices[2] + 1]:
            tokens = blk(tokens)
    assert torch.equal(level3, tokens[:, 1:].transpose(1, 2).reshape(2, DIM, 8, 8))
    # another crop: resampled once, to the crop's grid
    big = ViTPyramid(DIM, DEPTH, HEADS, 4, 64, drop_path=0.0)
    load_pyramid(big, weights)
    assert big.pos_embed.shape == (1, 1 + 16 * 16, DIM)
    assert torch.equal(big.pos_embed[:, :1], enc.pos_embed[:, :1])  # the cls position kept


def test_rel_pos_bias_and_layer_scale_start_as_the_plain_encoder():
    _, weights = small_weights(img_size=32)
    plain = ViTPyramid(DIM, DEPTH, HEADS, 4, 32, drop_path=0.0)
    load_pyramid(plain, weights)
    extra = ViTPyramid(DIM, DEPTH, HEADS, 4, 32, drop_path=0.0, rel_pos_bias=True, layer_scale=1.0)
    load_pyramid(extra, weights)
    extra.fpn1.load_state_dict(plain.fpn1.state_dict())
    extra.fpn2.load_state_dict(plain.fpn2.state_dict())
    x = torch.randn(1, 3, 32, 32)
    plain.eval(), extra.eval()
    with torch.no_grad():
        for a, b in zip(plain(x), extra(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    names = dict(extra.named_parameters())
    assert "blocks.0.attn.relative_position_bias_table" in names and "blocks.0.ls1.gamma" in names


def test_metrics_from_a_hand_computed_confusion_matrix():
    # 4 classes; class 3 never occurs in the labels and is never predicted; class 2 occurs
    # only as a prediction; IGNORE pixels must not count
    label = torch.tensor([[0, 0, 0, 1], [1, 1, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 3, 0]])
    conf = confusion_matrix(pred, label, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    res = seg_metrics(conf, ["a", "b", "c", "d"])
    # IoU: a 2/3, b 2/(3+3-2)=1/2, c 0/1 = 0 (predicted, absent), d none (neither)
    assert res["per_class"]["a"]["iou"] == pytest.approx(200 / 3)
    assert res["per_class"]["b"]["iou"] == pytest.approx(50.0)
    assert res["per_class"]["c"]["iou"] == 0.0
    assert res["per_class"]["d"]["iou"] is None
    assert res["mIoU"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    # accuracy: a 2/3, b 2/3; c and d have no labelled pixels
    assert res["per_class"]["c"]["acc"] is None
    assert res["mAcc"] == pytest.approx(200 / 3)
    assert res["aAcc"] == pytest.approx(400 / 6)


def test_reduce_zero_label():
    raw = torch.tensor([0, 1, 2, 150, 255], dtype=torch.uint8)
    assert reduce_zero_label(raw).tolist() == [IGNORE, 0, 1, 149, IGNORE]


def test_sliding_window_equals_whole_image_when_it_fits_one_window():
    _, weights = small_weights()
    model = small_segmentor(weights, crop=32).eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        whole = predict_logits(model, img)
        slide = slide_logits(model, img, crop=32, stride=21)
    assert torch.equal(whole, slide)
    # larger than a window: every pixel covered, the overlaps averaged
    with torch.no_grad():
        out = slide_logits(model, torch.randn(1, 3, 40, 75), crop=32, stride=21)
    assert out.shape == (1, 5, 40, 75) and torch.isfinite(out).all()


def test_layer_decay_groups_cover_every_parameter_once():
    for weights in (small_weights()[1], load_encoder_weights("random", "convvit_tiny")):
        if weights.encoder.startswith("vit"):
            model = small_segmentor(weights, crop=32, rel_pos_bias=True, layer_scale=1.0)
        else:
            model = segmentor_for(weights, 3, 32, channels=8, aux_channels=4)
        groups = layer_decay_groups(model, 0.05, 0.65)
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(ids) == len(set(ids)) == len(trainable)
        assert set(ids) == {id(p) for p in trainable}
        scales = sorted({g["lr_scale"] for g in groups})
        assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.65 ** (model.num_layers - 1))
        # heads and pyramid at the top layer, with weight decay on their kernels
        head = model.decode_head.conv_seg.weight
        g = next(g for g in groups if any(p is head for p in g["params"]))
        assert g["lr_scale"] == 1.0 and g["weight_decay"] == 0.05


def test_lr_schedule_warmup_then_poly():
    def lr(step, power=1.0):
        return poly_lr(step, 1e-3, 10, 100, power, 0.0)

    assert lr(0) == pytest.approx(1e-9)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(0.5e-3)
    assert lr(55, power=2.0) == pytest.approx(0.25e-3)
    assert lr(100) == 0.0


def test_loss_average_over_labelled_or_all_pixels():
    logits = torch.zeros(1, 4, 2, 2)  # uniform: log(4) per labelled pixel
    labels = torch.tensor([[[0, 1], [IGNORE, IGNORE]]])
    labelled, _ = seg_loss(logits, None, labels, 0.4, avg_non_ignore=True)
    everything, _ = seg_loss(logits, None, labels, 0.4, avg_non_ignore=False)
    assert labelled.item() == pytest.approx(np.log(4))
    assert everything.item() == pytest.approx(np.log(4) / 2)  # mmsegmentation's default
    total, aux = seg_loss(logits, torch.zeros(1, 4, 1, 1), labels, 0.4)
    assert total.item() == pytest.approx(1.4 * np.log(4)) and aux is not None


def test_train_pipeline_switches():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 3, (24, 32), dtype=torch.uint8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    def pipe(crop=32, **kw):
        args = {"hflip": 0.0, "photometric": False, "cat_max_ratio": 1.0, **kw}
        return TrainPipeline((32, 24), (1.0, 1.0), crop, mean=mean, std=std, **args)

    torch.manual_seed(0)
    x, y = pipe()(img, label)  # no rescale (ratio 1 fits exactly), crop 32 keeps 24 x 32 whole
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert torch.equal(x[:, :24], normalize_255(img, mean, std)) and torch.equal(y[:24], label)
    assert (x[:, 24:] == 0).all() and (y[24:] == IGNORE).all()  # padding: 0 and ignored
    torch.manual_seed(0)
    flipped = pipe(hflip=1.0)(img, label)
    assert torch.equal(flipped[1][:24], label.flip(-1))
    changed = []
    for seed in range(4):
        torch.manual_seed(seed)
        changed.append(not torch.equal(pipe(photometric=True)(img, label)[0], x))
    assert any(changed)
    # cat_max_ratio: a crop where one class fills 3/4 or more is redrawn (up to 10 times)
    lab = torch.zeros(24, 32, dtype=torch.uint8)
    lab[:, 24:] = 1  # class 1 only in the right quarter
    counts = {1.0: 0, 0.75: 0}
    for ratio in counts:
        for seed in range(20):
            torch.manual_seed(seed)
            _, y = pipe(crop=8, cat_max_ratio=ratio)(img, lab)
            counts[ratio] += int(len(y.unique()) > 1)
    assert counts[0.75] > counts[1.0]


# ---------------------------------------------------------------------------------------------
# data


def write_ade(root, n_train=3, n_val=2, size=(24, 32), classes=("sky", "road", "car")):
    """A tiny ADE20K-layout tree with labels 0..len(classes)."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.jpg")
            lab = rng.integers(0, len(classes) + 1, size, dtype=np.uint8)
            Image.fromarray(lab).save(root / "annotations" / split / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_ade_layout_reads_classes_and_reduces_labels(tmp_path):
    root = write_ade(tmp_path / "ade")
    train, val, names = segmentation_splits(str(root), None, True, {})
    assert names == ["sky", "road", "car"] and len(train) == 3 and len(val) == 2
    img, label = train.raw(0)
    raw = torch.from_numpy(np.array(Image.open(root / "annotations/training/000.png")))
    assert img.shape == (3, 24, 32) and label.shape == (24, 32)
    assert torch.equal(label, reduce_zero_label(raw))
    x, y, _ = SegValSet(val, (64, 16), (0.5,) * 3, (0.5,) * 3)[0]
    assert x.shape == (3, 16, 21) and y.shape == (24, 32)  # labels stay at the original size


@pytest.mark.parametrize("problem", ["size", "label", "missing", "empty"])
def test_bad_segmentation_data_names_the_file(tmp_path, problem):
    root = write_ade(tmp_path / "ade")
    ann = root / "annotations" / "training" / "001.png"
    if problem == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann)
        expect = ["001.png", "10x10", "32x24"]
    elif problem == "label":
        Image.fromarray(np.full((24, 32), 7, np.uint8)).save(ann)
        expect = ["001.png", "label 7", "3 classes"]
    elif problem == "missing":
        ann.unlink()
        expect = ["001.jpg", "missing annotation", "001.png"]
    else:
        for f in (root / "images" / "validation").iterdir():
            f.unlink()
        expect = ["validation", "empty split"]
    with pytest.raises(DataError) as e:
        train = SegFolder(root, "training", 3, True)
        SegFolder(root, "validation", 3, True)
        train.raw(1)
    for part in expect:
        assert part in str(e.value)


def test_generated_segmentation_labels_match_the_shapes():
    data = GeneratedSegmentation(4, 32, seed=3)
    img, label = data.raw(1)
    img2, label2 = data.raw(1)
    assert torch.equal(img, img2) and torch.equal(label, label2)  # a pure function of (seed, i)
    assert img.shape == (3, 32, 32) and label.dtype == torch.uint8
    scene = dense_shapes.sample(32, 3, 1)
    assert torch.equal(img, torch.from_numpy(np.array(scene.image)).permute(2, 0, 1))
    for cls, mask in scene.instances:  # each visible shape carries its class, the rest is 0
        assert (label[torch.from_numpy(mask)] == cls).all()
    assert int((label > 0).sum()) == sum(int(m.sum()) for _, m in scene.instances)
    assert data.classes == ["background", *dense_shapes.CLASSES]


# ---------------------------------------------------------------------------------------------
# the command


def test_short_run_on_generated_data_learns(tmp_path):
    out = tmp_path / "seg"
    args = ["segment", "--out", str(out), *SEGMENT_SMALL]  # no --checkpoint: a random-init encoder
    assert main([*args, "iters=40", "warmup_iters=4", "lr=0.001", "eval_every=20"]) == 0
    res = json.loads((out / "results.json").read_text())
    for name in ("config.yaml", "log.jsonl", "predictions.png", "curves.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    evals = [
        r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval" in r
    ]
    assert [r["step"] for r in evals] == [20, 40]
    assert set(res["per_class"]) == set(GeneratedSegmentation.classes)
    # the same model with its heads untrained (random pyramid and heads)
    cfg = load_segment_config(None, [*SEGMENT_SMALL])
    weights = load_encoder_weights("random", "quick")
    torch.manual_seed(0)
    fresh = segmentor_for(
        weights, len(GeneratedSegmentation.classes), 32, channels=16, aux_channels=8
    )
    _, val, classes = segmentation_splits(None, None, False, cfg.data.synthetic())
    conf = evaluate(
        fresh, SegValSet(val, (64, 32), res["mean"], res["std"]), 32, 21, "cpu", None, 0
    )
    untrained = seg_metrics(conf, classes)["mIoU"]
    print(
        f"generated data: mIoU {res['mIoU']:.2f} after 40 iterations vs {untrained:.2f} untrained"
    )
    assert res["mIoU"] > untrained + 3


def test_resume_is_exact(tmp_path):
    base = ["--checkpoint", "random", *SEGMENT_SMALL, "iters=6", "warmup_iters=2", "eval_every=0"]
    base += ["data.vis_images=0", "save_every=3"]
    assert main(["segment", "--out", str(tmp_path / "a"), *base]) == 0
    assert main(["segment", "--out", str(tmp_path / "b"), *base, "max_iters=3"]) == 0
    assert main(["segment", "--out", str(tmp_path / "b"), *base]) == 0  # resume=auto
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["confusion"] == rb["confusion"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    root = write_ade(tmp_path / "ade")
    (root / "annotations" / "training" / "002.png").unlink()
    args = ["segment", "--checkpoint", "random", "--data", str(root), "--out", str(tmp_path / "o")]
    assert main([*args, *SEGMENT_SMALL]) == 2
    err = capsys.readouterr().err
    assert "002.jpg: missing annotation" in err and "Traceback" not in err
    assert main([*args, "--config", "no_such_preset"]) == 2
    assert "unknown segment preset" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.stride"):
        load_segment_config(None, ["data.stride=100", "data.crop=64"])


@pytest.mark.slow
def test_torchrun_two_ranks_reduce_one_confusion_matrix(tmp_path):
    """``torchrun --nproc_per_node=2 -m cmae segment``: each rank evaluates half of the
    validation images; the matrix in results.json counts every labelled pixel of the split."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cmae", "segment"]
    cmd += ["--checkpoint", "random", "--out", str(out), *SEGMENT_SMALL]
    cmd += ["iters=2", "warmup_iters=1"]
    cmd += ["data.synthetic_val=5", "data.vis_images=0", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cmae segment:") == 2  # rank 0 alone: the start and end lines
    res = json.loads((out / "results.json").read_text())
    val = GeneratedSegmentation(5, 32, seed=1)  # data.synthetic_seed + 1
    labelled = sum(int((val.raw(i)[1] != IGNORE).sum()) for i in range(len(val)))
    assert sum(map(sum, res["confusion"])) == labelled


def test_stop_signal_saves_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from cmae.runtime.faults import EXIT_PREEMPTED, StopSignals

    args = ["segment", "--checkpoint", "random", "--out", str(tmp_path / "run"), *SEGMENT_SMALL]
    args += ["iters=3", "warmup_iters=1", "eval_every=0", "data.vis_images=0"]
    with monkeypatch.context() as m:
        m.setattr(StopSignals, "requested", lambda self: True)  # a SIGTERM before step 1 ends
        assert main(args) == EXIT_PREEMPTED
    assert "stopped by" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "step-000000001.pt").is_file()
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["iteration"] == 3
