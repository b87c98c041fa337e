"""Exact resume: the random number generator states and the choice of the resume checkpoint.

A training checkpoint holds the model (online + target), the optimizer, the grad scaler, the
step (the schedules and the sampler position follow from it) and every rank's RNG states
(python, numpy, torch CPU and CUDA). The data needs none: each sample's augmentation is seeded
from (seed, epoch, index) (``cmae.data.sampling``). Together a run stopped at any step and resumed
ends bitwise equal to an uninterrupted one (CPU; on GPU with ``train.deterministic``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cmae.runtime.checkpoint import (
    CheckpointError,
    check_weights,
    latest_checkpoint,
    load_checkpoint,
    warn,
)

RESUME_KEYS = ("model", "optimizer", "step", "rng", "config")


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as builtins and tensors (``weights_only``-loadable)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order), gathered on all ranks: rank 0 saves them."""
    mine = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)  # in-memory objects of our own processes, not a file
    return out


def restore_rng(states: list[dict[str, Any]], rank: int, device: torch.device) -> bool:
    """Set this rank's RNG states; False (and nothing set) if the checkpoint has no state for
    this rank, i.e. the world size changed: the run goes on, but not bitwise as before."""
    if rank >= len(states):
        return False
    set_rng_state(states[rank], device)
    return True


def find_resume(
    resume: str, run_dir: str | Path, command: str = "cmae pretrain", prefix: str = "train."
) -> tuple[Path, dict] | None:
    """The ``resume`` setting -> (checkpoint path, state) or None for a fresh start.

    ``never``: fresh. ``auto``: the newest valid checkpoint of ``run_dir`` (a corrupt one is
    reported and skipped), fresh if there is none. Else a path, which must load and be a
    training checkpoint (not an exported or imported model). ``command`` and ``prefix`` (of
    the config keys: ``train.`` for pretraining, none for finetune / segment) name the
    command's own setting in the error.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir, RESUME_KEYS)
    path = Path(resume).expanduser()
    state = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"{prefix}resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
            f"resume needs a RUN/checkpoints/*.pt or RUN/checkpoint.pt of `{command}`"
        )
    return path, state


def check_same_model(
    saved: dict[str, Any], current: dict[str, Any], path: Path, prefix: str = "train."
) -> None:
    """The checkpoint's model config must equal this run's (a run directory reused for another
    model would otherwise fail deep inside load_state_dict). ``prefix``: as in find_resume."""
    diff = sorted(k for k in current if saved.get(k) != current[k])
    if diff:
        keys = ", ".join(f"model.{k}" for k in diff)
        raise CheckpointError(
            f"{path} was trained with a different model ({keys} differ); use another "
            f"{prefix}out or {prefix}resume=never"
        )


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    step: int,
    epoch: int,
    config: dict[str, Any],
    bad_images: tuple[int, int],
    device: torch.device,
) -> dict[str, Any]:
    """The checkpoint dict; call it on every rank (it gathers their RNG states), save on one.
    ``bad_images``: (run total, this epoch's count)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "epoch": epoch,
        "config": config,
        "rng": all_rng_states(device),
        "bad_images": list(bad_images),
    }


def restore_training(
    path: Path,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    model_config: dict[str, Any],
    rank: int,
    device: torch.device,
    prefix: str = "train.",
) -> tuple[int, tuple[int, int]]:
    """Load ``state`` into the run; return (step, bad_images). ``prefix``: as in find_resume."""
    check_same_model(state["config"]["model"], model_config, path, prefix)
    check_weights(path, state["model"], model.state_dict(), "this run's model")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if not restore_rng(state["rng"], rank, device):
        warn(
            f"{path} holds RNG states for {len(state['rng'])} rank(s), not rank {rank}: "
            "the world size changed, so this rank keeps its fresh seed (not bitwise resumable)"
        )
    total, in_epoch = state.get("bad_images", (0, 0))
    return int(state["step"]), (int(total), int(in_epoch))


def set_deterministic(on: bool) -> None:
    """``train.deterministic``: deterministic kernels (bitwise-reproducible runs and resumes on
    GPU; CPU kernels already are), at some speed cost."""
    if on:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA initialises
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
