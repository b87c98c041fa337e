"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded safely."""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
import zlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from cmae.errors import CheckpointError, CheckpointWriteError


def _atomic_write(path: Path, write) -> None:
    # temp file in the same directory, fsync, rename: a crash never leaves a half-written file
    # under the final name, and the previous good file survives a failed save. The pid in the
    # name lets a later start tell a dead save's temp file from a live one (remove_stale_temps)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes it private and safetensors recreates it 0600; the result is a normal
        # file, readable as the umask allows (others on a shared cluster read checkpoints)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    # a full disk reaches us as torch's RuntimeError ("unexpected pos ...") or safetensors'
    # SafetensorError, not only OSError: all are a failed write of this one file
    except (OSError, RuntimeError, SafetensorError) as e:
        detail = _write_detail(e)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    else:
        return
    # out of the except clause, so the exception (whose frames hold torch's failed writer, and
    # with it the temp file open) is gone: collected, its disk space is free again, which
    # matters on a full disk where training goes on
    gc.collect()
    Path(tmp).unlink(missing_ok=True)
    raise CheckpointWriteError(f"could not write {path}: {detail}{_free_space(path)}")


def _write_detail(e: BaseException) -> str:
    detail = _first_line(e)
    if isinstance(e, RuntimeError) and "unexpected pos" in detail:
        # torch's writer checks its position after each record and names no cause
        detail = f"the write stopped short, e.g. disk full, quota or file-size limit ({detail})"
    return detail


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    return f"; {free / 2**20:.1f} MiB free on its file system"


def save_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (config.yaml, summary.json): whole or not at all."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


class RunLog:
    """``RUN/log.jsonl``, appended one JSON record per line. A failed write (disk full) is
    reported once and training goes on: the log is for reading, the checkpoints hold the
    state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "a")
        self.failed = False

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            if not self.failed:
                warn(f"could not write to {self.path} ({e}); training goes on, unlogged")
            self.failed = True

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # its buffered records could not be written: reported above
            pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


# ---------------------------------------------------------------------------------------------
# checksums: a file whose bytes changed after it was written (bit rot, a bad disk or copy)
# still unpickles -- torch's zip reader checks no record's CRC -- so a training checkpoint
# carries a CRC-32 of its whole state, computed before the write and checked on load

CHECKSUM_KEY = "checksum"


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus ``{"checksum": {"crc32": N}}`` over every tensor's bytes, dtype and
    shape and every other value, with their keys: builtins, so it loads with
    ``weights_only=True``."""
    return {**state, CHECKSUM_KEY: {"crc32": state_crc32(state)}}


def state_crc32(state: Any, crc: int = 0, key: str = "") -> int:
    """CRC-32 of a nested dict / list of tensors and builtins, in their stored order (a
    pickle round trip keeps dict order)."""
    if isinstance(state, torch.Tensor):
        crc = zlib.crc32(f"{key}:{state.dtype}:{tuple(state.shape)}".encode(), crc)
        flat = state.detach().cpu().contiguous().reshape(-1)
        return zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"", crc)
    if isinstance(state, dict):
        for k, v in state.items():
            crc = state_crc32(v, crc, f"{key}.{k!r}")
        return crc
    if isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            crc = state_crc32(v, crc, f"{key}[{i}]")
        return crc
    return zlib.crc32(f"{key}={state!r}".encode(), crc)


def verify_checksum(path: Path, state: Any) -> None:
    """Raise ``CheckpointError`` if ``state`` carries a checksum that its contents fail."""
    if not isinstance(state, dict) or not isinstance(state.get(CHECKSUM_KEY), dict):
        return  # older checkpoints and exported files carry none
    rest = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    if state[CHECKSUM_KEY].get("crc32") != state_crc32(rest):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written "
            "with it (its bytes changed on disk after it was saved)"
        )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load with ``weights_only=True``: a file that would execute code is refused, one whose
    checksum fails is refused (``CheckpointError``).

    ``mmap``: map the tensors instead of reading them (cheap to look at a few fields; the
    checksum is not checked then).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: we say what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is many lines and advises weights_only=False: never pass that on
        code = _BLOCKED_GLOBAL.search(str(e))
        if code:
            raise CheckpointError(
                f"refusing to load {path}: loading it would run code ({code[1]}), which a "
                "checkpoint of plain tensors never needs"
            ) from e
        why = _UNPICKLER_ERROR.search(str(e))
        raise CheckpointError(
            f"refusing to load {path}: it is not a checkpoint (not a file torch.save wrote"
            f"{': ' + why[1].strip() if why else ''})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        why = "it is empty" if path.stat().st_size == 0 else _first_line(e)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {why}") from e
    if not mmap:  # a mapped load only peeks at a few fields; reading all to check defeats it
        verify_checksum(path, state)
    return state


_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # torch's zip reader appends a paragraph of advice after its first sentence
    return text.splitlines()[0].split(". This is an internal")[0] if text else type(e).__name__


def check_weights(
    path: str | Path,
    found: Mapping[str, Any],
    expected: Mapping[str, torch.Tensor],
    what: str,
    ignore_missing: Collection[str] = (),
    ignore_unexpected: Collection[str] = (),
) -> None:
    """Before ``load_state_dict``: a one-line ``CheckpointError`` naming ``path``, the first
    key that is missing, unexpected or of the wrong shape (expected vs found) for ``what``
    (e.g. "a vit_tiny encoder"), and how many more there are; torch's own error lists them all
    over many lines."""
    problems = []
    for key, ref in expected.items():
        if key not in found:
            if key not in ignore_missing:
                problems.append(f"{key} is missing ({what} needs [{_shape(ref)}])")
        elif not isinstance(found[key], torch.Tensor):
            problems.append(f"{key} is a {type(found[key]).__name__}, not a tensor")
        elif found[key].shape != ref.shape:
            problems.append(f"{key} has shape [{_shape(found[key])}], {what} needs [{_shape(ref)}]")
    problems += [
        f"unexpected {key} ({what} has no such weight)"
        for key in found
        if key not in expected and key not in ignore_unexpected
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0]}{more}")


def _shape(t: torch.Tensor) -> str:
    return ", ".join(map(str, t.shape))


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
    """Delete temp files of saves that a kill interrupted (they never replaced a checkpoint).

    A temp file whose writer (the pid in its name) is still alive on this host is left alone:
    it may be a save in flight of another command writing into the directory. Call it with
    the run directory's lock held (cmae.runtime.runlock), so no other run writes there."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        for tmp in folder.glob(".*.tmp"):
            pid = _TEMP_PID.search(tmp.name)
            if pid and int(pid[1]) != os.getpid() and _pid_alive(int(pid[1])):
                continue
            tmp.unlink(missing_ok=True)


_TEMP_PID = re.compile(r"\.(\d+)\.[^.]+\.tmp$")  # .NAME.PID.RANDOM.tmp (_atomic_write)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def warn(msg: str) -> None:
    # on its own line, also while a progress bar is drawn (it is redrawn below)
    tqdm.write(f"warning: {msg}", file=sys.stderr)


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
            save_checkpoint(with_checksum(state), path)
        except CheckpointWriteError as e:
            warn(f"step {step}: {e}; {self.last_good()}; training goes on")
            return None
        self.prune()
        return path

    def save_final(self, state: dict[str, Any]) -> Path:
        """RUN/checkpoint.pt, the file the other commands read; unlike a periodic save a
        failure raises ``CheckpointWriteError`` naming the last good periodic checkpoint (they
        stay; a rerun resumes from it and writes the final one)."""
        bad = nonfinite_tensors(state)
        if bad:
            raise CheckpointError(f"refusing to save: non-finite values in {', '.join(bad[:5])}")
        path = self.dir.parent / FINAL_NAME
        try:
            save_checkpoint(with_checksum(state), path)
        except CheckpointWriteError as e:
            raise CheckpointWriteError(
                f"{e}; {self.last_good()}; free space and run the same command again"
            ) from e
        return path

    def last_good(self) -> str:
        last = periodic_checkpoints(self.dir.parent)
        return f"the last good checkpoint is {last[-1][2]}" if last else "no earlier checkpoint"

    def prune(self) -> None:
        found = periodic_checkpoints(self.dir.parent)
        for i, (_, epoch, path) in enumerate(found):
            recent = i >= len(found) - self.keep_last
            milestone = (
                epoch is not None and self.keep_every_epochs and epoch % self.keep_every_epochs == 0
            )
            if not (recent or milestone):
                path.unlink(missing_ok=True)
