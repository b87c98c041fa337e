"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded safely."""

from __future__ import annotations

import os
import pickle
import re
import sys
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is a normal file
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


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load with ``weights_only=True``: a file that would execute code is refused.

    ``mmap``: map the tensors instead of reading them (cheap to look at a few fields).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


# ---------------------------------------------------------------------------------------------
# the checkpoints of a run directory: RUN/checkpoints/step-NNNNNNNNN[-epochE].pt + RUN/checkpoint.pt

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "checkpoint.pt"  # written at the end of a run; the file the other commands read
_PERIODIC = re.compile(r"^step-(\d+)(?:-epoch(\d+))?\.pt$")


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Keys (dotted) of the floating-point tensors in ``state`` that hold a NaN or an Inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix] if bad else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [k for key, v in items for k in nonfinite_tensors(v, f"{prefix}{key}.")]


def periodic_name(step: int, epoch: int | None = None) -> str:
    """``step-000000120.pt``; ``epoch``: written at the end of that many epochs."""
    return f"step-{step:09d}" + (f"-epoch{epoch}" if epoch is not None else "") + ".pt"


def periodic_checkpoints(run_dir: str | Path) -> list[tuple[int, int | None, Path]]:
    """(step, epoch or None, path) of RUN/checkpoints/step-*.pt, oldest first."""
    found = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"):
        m = _PERIODIC.match(path.name)
        if m:
            found.append((int(m[1]), int(m[2]) if m[2] else None, path))
    return sorted(found, key=lambda x: x[0])


def remove_stale_temps(run_dir: str | Path) -> None:
    """Delete temp files of saves that a kill interrupted (they never replaced a checkpoint)."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | Path, required: tuple[str, ...]) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that loads and holds the ``required`` keys, and its
    state; None if there is none. Corrupt or incomplete files are reported and skipped."""
    run_dir = Path(run_dir)
    candidates = [(step, path) for step, _, path in periodic_checkpoints(run_dir)]
    final = run_dir / FINAL_NAME
    if final.is_file():
        try:  # its step is inside: a memory-mapped load reads it without the tensors
            candidates.append((int(load_checkpoint(final, mmap=True)["step"]), final))
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            warn(f"skipping {final} as a resume point: {e}")
    for _, path in sorted(candidates, key=lambda x: x[0], reverse=True):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping {e}")
            continue
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        if missing:
            warn(f"skipping {path}: not a resumable training checkpoint (no {', '.join(missing)})")
            continue
        return path, state
    return None


class RunCheckpoints:
    """Periodic checkpoints of a run: keep the newest ``keep_last`` plus, for good, those written
    at the end of every ``keep_every_epochs``-th epoch (0: none).

    A save first refuses non-finite values, writes atomically and only then deletes older
    files, so the last good checkpoint is never lost. A failed write (disk full, quota, I/O
    error) is reported and training goes on: stopping would not save the progress either,
    and the next save may succeed once space is freed.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, keep_every_epochs: int) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last, self.keep_every_epochs = keep_last, keep_every_epochs

    def save(self, state: dict[str, Any], step: int, epoch: int | None = None) -> Path | None:
        """Write ``state``; return its path, or None if the write failed (reported)."""
        bad = nonfinite_tensors(state)
        if bad:
            raise CheckpointError(
                f"refusing to save step {step}: non-finite values in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; the checkpoints in {self.dir} are unchanged"
            )
        path = self.dir / periodic_name(step, epoch)
        try:
            save_checkpoint(state, path)
        except OSError as e:
            last = periodic_checkpoints(self.dir.parent)
            kept = f"the last good one is {last[-1][2]}" if last else "no earlier checkpoint"
            warn(f"could not save the step-{step} checkpoint ({e}); {kept}; training goes on")
            return None
        self.prune()
        return path

    def save_final(self, state: dict[str, Any]) -> Path:
        """RUN/checkpoint.pt, the file the other commands read; unlike a periodic save a
        failure raises (the periodic checkpoints stay)."""
        bad = nonfinite_tensors(state)
        if bad:
            raise CheckpointError(f"refusing to save: non-finite values in {', '.join(bad[:5])}")
        path = self.dir.parent / FINAL_NAME
        save_checkpoint(state, path)
        return path

    def prune(self) -> None:
        found = periodic_checkpoints(self.dir.parent)
        for i, (_, epoch, path) in enumerate(found):
            recent = i >= len(found) - self.keep_last
            milestone = (
                epoch is not None and self.keep_every_epochs and epoch % self.keep_every_epochs == 0
            )
            if not (recent or milestone):
                path.unlink(missing_ok=True)
