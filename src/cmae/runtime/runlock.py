"""One run per run directory: an exclusive lock on ``RUN/.lock`` for as long as a run trains.

The lock is an advisory ``flock`` on the file, so the kernel releases it when its process
ends, however it ends (SIGKILL and out-of-memory kills included): a lock file left behind by a
dead run is stale and is taken over, never waited for. The file holds the holder's pid, host
and start time, which a refused run names. Network file systems that implement ``flock``
(Linux NFS does, through POSIX locks) lock across hosts; where it is unsupported the run is
refused with that reason rather than run unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """The run directory is locked by another live run (or cannot be locked)."""


class RunLock:
    """Context manager: hold the lock of ``run_dir`` (created if missing) or raise
    ``RunDirBusy`` naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(
                        f"{self.path.parent} is in use by another run ({self.holder()}); wait "
                        "for it to end or use another --out / train.out"
                    ) from e
                raise RunDirBusy(
                    f"cannot lock {self.path} ({os.strerror(e.errno or 0)}): this file system "
                    "does not support file locks; use a run directory on another one"
                ) from e
            # a releasing run unlinks the file: if ours was unlinked between open and lock,
            # we hold a lock on a deleted file; start again on the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding the lock, so no one else holds a lock on this file
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def holder(self) -> str:
        """'pid N on host H since T' from the lock file (best effort: it may be mid-write)."""
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"pid {int(info['pid'])} on host {info['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"see {self.path}"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path) -> AbstractContextManager:
    """The lock of ``run_dir`` for the process that writes it: rank 0 (``RANK`` of torchrun,
    read before the process group exists); a no-op on the other ranks."""
    return RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
