"""Geometry of frozen features: why one encoder's kNN accuracy differs from another's.

    python benchmarks/feature_stats.py runs/eval/knn_mae runs/eval/knn_cmae ...

Each argument is the output directory of a ``cmae knn`` run; its ``config.yaml`` names the
encoder, the data and the feature cache, so the features are read from the cache (extracted
again only if the cache is gone). One JSON line per run:

- ``knn_raw`` / ``knn_centred`` / ``knn_standardised``: kNN top-1 (the run's k and T) on the
  features as ``cmae knn`` uses them (float32, so ``knn_raw`` is its top-1), after subtracting
  the bank mean, and after also dividing by the bank's per-dimension std: if centring changes
  the ranking a lot, a shared offset direction dominated the cosine similarities;
- ``mean_pair_cos``: mean cosine similarity between two different bank images (5,000 sampled):
  near 1 means every image maps to almost the same direction;
- ``effective_rank``: exp(entropy) of the bank covariance's normalised eigenvalues, and
  ``top10_eig_share``: the share of the variance in its 10 largest directions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cmae.config import KnnConfig, load_eval_config
from cmae.data.datasets import loader_workers
from cmae.eval.frozen import frozen_features, frozen_setup, topk_accuracy
from cmae.eval.knn import knn_predict
from cmae.interop.encoders import build_vit_encoder


def knn_top1(bank, bank_y, q, q_y, num_classes: int, k: int, t: float) -> float:
    bank, q = F.normalize(bank, dim=1), F.normalize(q, dim=1)
    return topk_accuracy(knn_predict(bank, bank_y, q, num_classes, k, t), q_y, ks=(1,))[0]


def geometry(bank: torch.Tensor, n_pairs: int = 5000) -> dict:
    g = torch.Generator().manual_seed(0)
    sample = bank[torch.randperm(len(bank), generator=g)[:n_pairs]]
    unit = F.normalize(sample, dim=1)
    sim = unit @ unit.t()
    n = len(unit)
    mean_cos = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    centred = bank - bank.mean(dim=0)
    eig = torch.linalg.eigvalsh(centred.t() @ centred / (len(bank) - 1)).clamp(min=0).flip(0)
    p = eig / eig.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "mean_pair_cos": round(mean_cos.item(), 4),
        "effective_rank": round(entropy.exp().item(), 2),
        "top10_eig_share": round(p[:10].sum().item(), 4),
        "dim": bank.shape[1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="output directories of `cmae knn`")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    for run_dir in args.runs:
        cfg = load_eval_config(KnnConfig, str(Path(run_dir) / "config.yaml"))
        setup = frozen_setup(cfg)
        encoder = build_vit_encoder(setup.weights)
        bank, bank_y, q, q_y = frozen_features(
            encoder,
            setup.train_set,
            setup.val_set,
            torch.device("cpu"),
            setup.mean,
            setup.std,
            cfg.encoder.pool,
            cfg.batch_size,
            loader_workers(cfg.data.num_workers),
            setup.cache_dir,
            setup.key,
        )
        c, k, t = len(setup.classes), cfg.k, cfg.temperature
        mu, sd = bank.mean(dim=0), bank.std(dim=0).clamp(min=1e-8)
        rec = {
            "run": str(run_dir),
            "checkpoint": cfg.encoder.checkpoint,
            "pool": cfg.encoder.pool,
            "n_bank": len(bank),
            "n_query": len(q),
            "knn_raw": knn_top1(bank, bank_y, q, q_y, c, k, t),
            "knn_centred": knn_top1(bank - mu, bank_y, q - mu, q_y, c, k, t),
            "knn_standardised": knn_top1((bank - mu) / sd, bank_y, (q - mu) / sd, q_y, c, k, t),
            **geometry(bank.double()),
        }
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
