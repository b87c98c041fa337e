"""End to end: `cmae knn / linprobe / finetune` on a tiny pretraining run, the built-in data and
a generated ImageFolder directory; checkpoint loading; the online monitor of `cmae pretrain`."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from cmae.cli import main
from cmae.config import (
    ConfigError,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    load_config,
    load_eval_config,
    to_dict,
)
from cmae.eval import knn
from cmae.interop.encoders import build_vit_encoder, load_encoder_weights
from cmae.models.cmae import build_encoder
from tests.helpers import tiny_overrides

# tiny built-in data: 16 px shapes, 40 train / 20 held-out images
DATA = [
    "data.synthetic_train=40",
    "data.synthetic_val=20",
    "data.synthetic_size=16",
    "data.num_workers=0",
]
TRAIN = ["batch_size=8", "epochs=2", "warmup_epochs=1"]


def pretrain_args(out, *extra):
    return [
        "pretrain",
        "--out",
        str(out),
        *tiny_overrides(),
        "data.synthetic_train=32",
        "data.synthetic_val=16",
        "data.synthetic_size=16",
        "data.num_workers=0",
        "data.knn_bank=32",
        "data.knn_queries=16",
        "train.batch_size=8",
        "train.epochs=2",
        "train.warmup_epochs=1",
        "train.log_every=2",
        "train.knn_at_end=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    assert main(pretrain_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A pretraining YAML describing the tiny model, for `--checkpoint random`."""
    path = tmp_path_factory.mktemp("preset") / "tiny16.yaml"
    cfg = load_config(None, tiny_overrides())
    path.write_text(yaml.safe_dump({"model": to_dict(cfg.model), "data": to_dict(cfg.data)}))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ROOT/train and ROOT/val with 3 class folders of generated PNGs (distinct colours)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for split, n in (("train", 8), ("val", 4)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(rgb, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i}.png")
    return root


def results(out):
    return json.loads((out / "results.json").read_text())


# --- checkpoint loading ----------------------------------------------------------------------


def test_checkpoint_safetensors_and_random_give_the_same_weights(run_dir, tiny_preset):
    from_ckpt = load_encoder_weights(str(run_dir / "checkpoint.pt"))
    from_st = load_encoder_weights(str(run_dir / "encoder.safetensors"))
    assert from_ckpt.state.keys() == from_st.state.keys()
    for k in from_ckpt.state:
        assert torch.equal(from_ckpt.state[k], from_st.state[k]), k
    arch = ("encoder", "img_size", "patch_size")
    assert [getattr(from_ckpt, a) for a in arch] == [getattr(from_st, a) for a in arch]
    assert [getattr(from_ckpt, a) for a in arch] == ["vit_tiny", 16, 4]
    assert from_ckpt.mean is not None and from_st.mean is None  # only the .pt has the config
    assert from_ckpt.source_id != from_st.source_id

    rand = load_encoder_weights("random", str(tiny_preset), seed=3)
    again = load_encoder_weights("random", str(tiny_preset), seed=3)
    torch.manual_seed(3)
    ref = build_encoder(load_config(str(tiny_preset)).model)
    for k, v in ref.state_dict().items():
        assert torch.equal(rand.state[k], v) and torch.equal(again.state[k], v), k
    other_seed = load_encoder_weights("random", str(tiny_preset), seed=4)
    assert not torch.equal(other_seed.state["cls_token"], rand.state["cls_token"])
    assert not torch.equal(rand.state["cls_token"], from_ckpt.state["cls_token"])
    # the loaded encoder is the trained online encoder, not the momentum copy
    model_state = torch.load(run_dir / "checkpoint.pt", "cpu", weights_only=True)["model"]
    enc = build_vit_encoder(from_ckpt)
    assert torch.equal(
        enc.blocks[0].attn.qkv.weight, model_state["encoder.blocks.0.attn.qkv.weight"]
    )


def test_exported_safetensors_layouts_are_read(run_dir, tmp_path):
    """A timm export with mean/std metadata and a whole-model export (`encoder.` keys + config
    JSON) give the checkpoint's encoder and normalisation."""
    ckpt = torch.load(run_dir / "checkpoint.pt", "cpu", weights_only=True)
    ref = load_encoder_weights(str(run_dir / "checkpoint.pt"))
    full = tmp_path / "full.safetensors"
    tensors = {k: v.contiguous() for k, v in ckpt["model"].items()}
    save_file(tensors, full, metadata={"format": "full", "config": json.dumps(ckpt["config"])})
    timm_file = tmp_path / "timm.safetensors"
    stats = {"mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([0.4, 0.5, 0.6])}
    save_file({k: v.contiguous() for k, v in ref.state.items()}, timm_file, metadata=stats)
    for path, mean in ((full, ref.mean), (timm_file, (0.1, 0.2, 0.3))):
        w = load_encoder_weights(str(path))
        assert w.state.keys() == ref.state.keys() and w.mean == mean, path
        assert all(torch.equal(w.state[k], ref.state[k]) for k in ref.state)
        assert (w.encoder, w.img_size, w.patch_size) == ("vit_tiny", 16, 4)


def test_bad_checkpoints_are_reported(tmp_path, capsys):
    assert main(["knn", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    assert main(["knn", "--checkpoint", str(bogus), "--out", str(tmp_path)]) == 2
    assert "not a cmae pretraining checkpoint" in capsys.readouterr().err


# --- commands --------------------------------------------------------------------------------


@pytest.mark.slow
def test_knn_command_caches_features(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "knn"
    args = ["knn", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out), *DATA]
    assert main(args) == 0
    first = results(out)
    assert 0 <= first["top1"] <= first["top5"] <= 100
    assert first["n_train"] == 40 and first["n_val"] == 20 and first["num_classes"] == 10
    assert first["config"]["k"] == 20 and first["config"]["encoder"]["pool"] == "mean"
    assert sorted(p.name.split("-")[1] for p in (out / "features").iterdir()) == [
        "train.pt",
        "val.pt",
    ]

    def no_extraction(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(knn, "extract_features", no_extraction)
    assert main(args + ["k=3"]) == 0  # same features, another k: cache hit
    assert results(out)["config"]["k"] == 3
    monkeypatch.undo()

    # pool=cls is other features: a new cache entry; cache=false writes none
    assert main(args + ["encoder.pool=cls"]) == 0
    assert len(list((out / "features").iterdir())) == 4
    off = tmp_path / "off"
    assert main(["knn", "--checkpoint", "random", "--out", str(off), *DATA, "cache=false"]) == 0
    assert not (off / "features").exists()
    shared = tmp_path / "shared-cache"
    assert main(args + [f"cache_dir={shared}", "encoder.pool=cls"]) == 0
    assert len(list(shared.iterdir())) == 2


@pytest.mark.slow
def test_knn_random_baseline_and_saved_config(tiny_preset, tmp_path):
    out = tmp_path / "rand"
    args = ["knn", "--checkpoint", "random", "--out", str(out), *DATA]
    assert main([*args, f"encoder.preset={tiny_preset}", "data.mean=[0.5,0.5,0.5]"]) == 0
    res = results(out)
    assert res["mean"] == [0.5, 0.5, 0.5] and res["std"] == [0.229, 0.224, 0.225]
    # the written config.yaml is a valid --config: same result again
    again = tmp_path / "again"
    assert (
        main(
            [
                "knn",
                "--checkpoint",
                "random",
                "--out",
                str(again),
                "--config",
                str(out / "config.yaml"),
            ]
        )
        == 0
    )
    assert results(again)["top1"] == res["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linprobe_command(run_dir, tmp_path, mode):
    out = tmp_path / mode
    args = ["linprobe", "--checkpoint", str(run_dir / "encoder.safetensors"), "--out", str(out)]
    overrides = [*DATA, *TRAIN, f"mode={mode}", "blrs=[0.01,0.5]"]
    assert main(args + overrides + ["optimizer=lars"]) == 0
    res = results(out)
    assert [h["blr"] for h in res["heads"]] == [0.01, 0.5]
    assert res["top1"] == max(h["top1"] for h in res["heads"])
    assert res["best_blr"] in (0.01, 0.5) and res["config"]["mode"] == mode
    assert all(np.isfinite(h["train_loss"]) for h in res["heads"])
    assert len(list((out / "features").iterdir())) == (2 if mode == "fast" else 1)


def test_linprobe_can_choose_its_lr_on_train(run_dir, tmp_path):
    # lr_from=train: the lr is the best of the heads scored on a held-out part of train; that
    # one lr is retrained on all of train and scored once on the held-out split
    out = tmp_path / "lp"
    args = ["linprobe", "--checkpoint", str(run_dir / "encoder.safetensors"), "--out", str(out)]
    overrides = [*DATA, *TRAIN, "blrs=[1e-4,0.05,0.5]", "lr_from=train", "lr_holdout=0.25"]
    assert main(args + overrides) == 0
    res = results(out)
    sel = res["selection"]
    assert [h["blr"] for h in sel["heads"]] == [1e-4, 0.05, 0.5]
    assert (sel["n_fit"], sel["n_holdout"]) == (30, 10)  # 40 train images, 10 classes of 4
    chosen = max(sel["heads"], key=lambda h: h["top1"])["blr"]
    assert [h["blr"] for h in res["heads"]] == [chosen] and res["best_blr"] == chosen
    assert res["top1"] == res["heads"][0]["top1"] and res["lr_from"] == "train"


@pytest.mark.slow
def test_finetune_command(run_dir, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out)]
    assert main(args + [*DATA, *TRAIN]) == 0
    res = results(out)
    assert 0 <= res["top1"] <= 100 and res["best_top1"] >= res["top1"]
    assert res["best_epoch"] in (0, 1) and np.isfinite(res["final_loss"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["top1"] == res["top1"]
    full_params = res["trainable_params"]
    # partial fine-tuning, plain CE (no mixup / cutmix / erasing / RandAugment)
    part = tmp_path / "part"
    plain = ["mixup=0", "cutmix=0", "reprob=0", "rand_augment=''", "smoothing=0"]
    args = ["finetune", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(part)]
    every = ["epochs=3", "eval_every=2"]  # evaluated after epoch 2 and the last (3)
    assert main(args + [*DATA, *TRAIN, *plain, "trainable_blocks=1", *every]) == 0
    res = results(part)
    assert res["trainable_params"] < full_params / 5
    log = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and "top1" not in log[0]
    assert [r["epoch"] for r in log if "top1" in r] == [1, 2] and log[2]["top1"] == res["top1"]
    assert res["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_commands_on_an_image_folder(run_dir, image_folder, tmp_path):
    ckpt = str(run_dir / "checkpoint.pt")
    common = ["--data", str(image_folder), "data.num_workers=0"]
    assert main(["knn", "--checkpoint", ckpt, "--out", str(tmp_path / "k"), *common, "k=3"]) == 0
    res = results(tmp_path / "k")
    assert res["n_train"] == 24 and res["n_val"] == 12 and res["num_classes"] == 3
    lp = ["linprobe", "--checkpoint", ckpt, "--out", str(tmp_path / "l"), *common, *TRAIN]
    assert main(lp + ["epochs=20", "blrs=[0.1,1.0]"]) == 0
    assert results(tmp_path / "l")["top1"] == 100.0  # three flat colours: linearly separable
    ft = ["finetune", "--checkpoint", ckpt, "--out", str(tmp_path / "f"), *common, *TRAIN]
    assert main(ft) == 0
    assert results(tmp_path / "f")["num_classes"] == 3


def test_image_folder_without_val_split_is_an_error(image_folder, tmp_path, capsys):
    args = ["knn", "--checkpoint", "random", "--data", str(image_folder / "train")]
    assert main(args + ["--out", str(tmp_path)]) == 2
    assert "train/ and val/" in capsys.readouterr().err


# --- config ----------------------------------------------------------------------------------


def test_eval_configs_validate_and_name_keys():
    cfg = load_eval_config(LinprobeConfig, None, ["blrs=[0.1, 1]", "mode=full"])
    assert cfg.blrs == (0.1, 1.0) and cfg.mode == "full"
    assert load_eval_config(FinetuneConfig, None, ["trainable_blocks=2"]).trainable_blocks == 2
    bad = [
        (KnnConfig, "k=0", "k:"),
        (KnnConfig, "encoder.pool=max", "encoder.pool"),
        (KnnConfig, "encoder.preset=nope", "unknown preset"),
        (KnnConfig, "data.crop_pct=1.5", "data.crop_pct"),
        (KnnConfig, "nonsense=1", "unknown config key 'nonsense'"),
        (LinprobeConfig, "blrs=0.1", "blrs"),
        (LinprobeConfig, "blrs=[]", "blrs"),
        (LinprobeConfig, "optimizer=adam", "optimizer"),
        (LinprobeConfig, "warmup_epochs=100", "warmup_epochs"),
        (LinprobeConfig, "lr_from=test", "lr_from"),
        (LinprobeConfig, "lr_holdout=1", "lr_holdout"),
        (FinetuneConfig, "batch_size=7", "batch_size"),
        (FinetuneConfig, "layer_decay=0", "layer_decay"),
        (FinetuneConfig, "device=tpu", "device"),
        (FinetuneConfig, "eval_every=0", "eval_every"),
    ]
    for cls, override, key in bad:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            load_eval_config(cls, None, [override])
    with pytest.raises(ConfigError, match="lr_from: 'train' needs mode=fast"):
        load_eval_config(LinprobeConfig, None, ["lr_from=train", "mode=full"])
    assert to_dict(load_eval_config(KnnConfig))["encoder"]["checkpoint"] == "random"


# --- online monitor in pretraining -------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_logs_knn_and_contrastive_health(tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    # on the CPU: two CUDA runs need not agree bit for bit, monitor or not
    assert main(pretrain_args(off, "train.device=cpu", "train.knn_every=0")) == 0
    assert main(pretrain_args(on, "train.device=cpu", "train.knn_every=1")) == 0
    logs = {
        name: [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        for name, d in (("off", off), ("on", on))
    }
    knn_lines = [r for r in logs["on"] if "knn_top1" in r]
    assert [r["epoch"] for r in knn_lines] == [0, 1] and all("loss" not in r for r in knn_lines)
    assert not any("knn_top1" in r for r in logs["off"])
    losses = [r for r in logs["on"] if "loss" in r]
    # the monitor does not perturb training: identical losses with and without it
    assert [r["loss"] for r in losses] == [r["loss"] for r in logs["off"]]
    for r in losses:
        assert -1 <= r["neg_cos"] <= 1 and -1 <= r["pos_cos"] <= 1 and r["key_std"] > 0
