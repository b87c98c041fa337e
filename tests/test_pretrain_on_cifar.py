"""Pretrains on a small slice of CIFAR-10 (JPEG) from ../shared/data; skips when it is absent."""

import json
import tarfile

import pytest

from cmae.cli import main
from tests.helpers import CIFAR_TAR


def extract_slice(dest, per_class: dict[str, int]) -> None:
    """Stream the archive once and keep the first n images per class of each split."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] not in per_class:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) >= per_class[parts[1]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dest / parts[1] / parts[2] / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"CIFAR-10 (JPEG) not found at {CIFAR_TAR}")
def test_pretrain_on_cifar_slice(tmp_path):
    data = tmp_path / "cifar10"
    extract_slice(data, {"train": 20, "test": 5})
    out = tmp_path / "run"
    rc = main(
        [
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(out),
            "model.decoder_depth=1",
            "data.num_workers=0",
            "train.batch_size=32",
            "train.max_steps=4",
            "train.log_every=2",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["knn"]["n_bank"] == 200 and summary["knn"]["n_query"] == 50
    # 10 classes, so chance is 10%; this run (seeded, 4 steps) measured 20.0 (random init: 18.0).
    # A broken pipeline (labels detached from images, collapsed features) lands near chance.
    assert summary["knn"]["top1"] >= 16.0
    assert summary["knn_random_init"]["n_query"] == 50
