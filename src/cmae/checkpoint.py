"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded safely."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or unsafe; the message names the file."""


def _atomic_write(path: Path, write) -> None:
    # temp file in the same directory, fsync, rename: a crash never leaves a half-written file
    # under the final name, and the previous good file survives a failed save
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a file that would execute code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint "
            f"(loading it would need arbitrary code; weights_only=True rejected it: {e})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from e


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The online encoder's weights with timm ``VisionTransformer`` key names."""
    prefix = "encoder."
    return {
        k[len(prefix) :]: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith(prefix)
    }


def save_encoder(
    model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    state = encoder_state_dict(model)
    _atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))
