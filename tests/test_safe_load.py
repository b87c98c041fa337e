"""Safe loading: a checkpoint whose unpickling would run code is refused (and the code does not
run), also when it sits in a run directory as the newest resume point; invalid config values
are errors that name their key."""

import os
import pickle
import random

import pytest
import torch

from cmae.config import ConfigError, load_config
from cmae.runtime.checkpoint import CheckpointError, load_checkpoint, periodic_name, save_checkpoint
from cmae.runtime.resume import find_resume


class Exploit:
    """Unpickling calls os.system, which creates the file ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(2)}, "x": Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=f"refusing to load {path}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        find_resume(str(path), tmp_path)
    assert not marker.exists(), "the pickle ran code"


@pytest.mark.parametrize(
    "content, why",
    [
        (random.Random(0).randbytes(4096), "it is not a checkpoint"),
        (b"", "corrupt or truncated: it is empty"),
        (b"PK\x03\x04 zip header only", "corrupt or truncated"),
    ],
)
def test_random_bytes_are_not_a_checkpoint_in_one_line(tmp_path, content, why):
    path = tmp_path / "noise.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "arbitrary code" not in msg
    assert why in msg


def test_malicious_newest_checkpoint_is_skipped_on_auto_resume(tmp_path, capsys):
    good = {"model": {}, "optimizer": {}, "step": 2, "rng": [], "config": {}}
    save_checkpoint(good, tmp_path / "checkpoints" / periodic_name(2))
    marker = tmp_path / "pwned"
    torch.save({**good, "step": 9, "x": Exploit(marker)}, tmp_path / "checkpoints" / "step-9.pt")
    path, state = find_resume("auto", tmp_path)
    assert state["step"] == 2 and "refusing to load" in capsys.readouterr().err
    assert path.name == periodic_name(2) and not marker.exists()


INVALID = [
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.mask_ratio=-0.1", "model.mask_ratio"),
    ("model.img_size=18", "model.img_size"),  # not a multiple of the patch (4)
    ("model.patch_size=0", "model.patch_size"),
    ("data.max_shift=16", "data.max_shift"),  # not smaller than the 16 px image
    ("data.max_shift=-1", "data.max_shift"),
    ("model.temperature=0", "model.temperature"),
    ("model.drop_path=1.0", "model.drop_path"),
    ("model.pixel_weight=-1", "model.pixel_weight"),
    ("model.contrast_weight=-0.5", "model.contrast_weight"),
    ("data.hflip=1.5", "data.hflip"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
    ("data.std=[0.2,0,0.2]", "data.std"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("data.knn_bank=0", "data.knn_bank"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=1", "train.batch_size"),  # contrastive loss needs 2
    ("train.batch_size=10", "train.batch_size"),  # not divisible by accum_steps=4
    ("train.epochs=0", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("train.min_lr=-1e-6", "train.min_lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.betas=[0.9,1.0]", "train.betas"),
    ("train.momentum=1.5", "train.momentum"),
    ("train.log_every=0", "train.log_every"),
    ("train.amp=fp8", "train.amp"),
    ("train.device=tpu", "train.device"),
    ("train.resume=", "train.resume"),
    ("train.save_every_steps=-1", "train.save_every_steps"),
    ("train.save_every_epochs=-1", "train.save_every_epochs"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.keep_every_epochs=-2", "train.keep_every_epochs"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.deterministic=maybe", "train.deterministic"),
    ("train.unknown_key=1", "train.unknown_key"),
]


@pytest.mark.parametrize("override, key", INVALID, ids=[o for o, _ in INVALID])
def test_invalid_config_value_names_its_key(override, key):
    base = [
        "model.img_size=16",
        "model.patch_size=4",
        "data.max_shift=4",
        "train.accum_steps=4",
        "train.batch_size=8",
    ]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [*base, override])
