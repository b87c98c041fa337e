"""One run per run directory: an exclusive lock on ``RUN/.lock`` for as long as a run trains.

The lock is an advisory ``flock`` on the file, so the kernel releases it when its process
ends, however it ends (SIGKILL and out-of-memory kills included): a lock file left behind by a
dead run is stale and is taken over, never waited for. The file holds the holder's pid, host
and start time, which a refused run names. Network file systems that implement ``flock``
(Linux NFS does, through POSIX locks) lock across hosts; where it is unsupported the run is
refused with that reason rather than run unprotected.

A second lock, on this host, is keyed by the run directory's absolute path (a file under
``$TMPDIR/cmae-locks-UID/``): it outlives the directory, so removing and recreating the run
directory under a live run does not let a second run in beside it on the same host.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
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
        self.host_path = host_lock_path(run_dir)
        self._fds: list[tuple[Path, int]] = []

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            for path in (self.path, self.host_path):
                fd = self._lock(path)
                os.ftruncate(fd, 0)
                os.pwrite(
                    fd, (json.dumps({**info, "run": str(self.path.parent)}) + "\n").encode(), 0
                )
                self._fds.append((path, fd))
        except BaseException:
            self.release()
            raise

    def _lock(self, path: Path) -> int:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(
                        f"{self.path.parent} is in use by another run ({self.holder(path)}); "
                        "wait for it to end or use another --out / train.out"
                    ) from e
                raise RunDirBusy(
                    f"cannot lock {path} ({os.strerror(e.errno or 0)}): this file system "
                    "does not support file locks; use a run directory on another one"
                ) from e
            # a releasing run unlinks the file: if ours was unlinked between open and lock,
            # we hold a lock on a deleted file; start again on the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        # unlink while still holding the lock, so no one else holds a lock on this file
        while self._fds:
            path, fd = self._fds.pop()
            path.unlink(missing_ok=True)
            os.close(fd)

    def holder(self, path: Path | None = None) -> str:
        """'pid N on host H since T' from the lock file (best effort: it may be mid-write)."""
        path = self.path if path is None else path
        try:
            info = json.loads(path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"pid {int(info['pid'])} on host {info['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"see {path}"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def host_lock_path(run_dir: str | Path) -> Path:
    """This host's lock file for ``run_dir``, named by a hash of its absolute path."""
    key = hashlib.sha256(str(Path(run_dir).expanduser().resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"cmae-locks-{os.getuid()}" / f"{key}.lock"


def lock_run_dir(run_dir: str | Path) -> AbstractContextManager:
    """The lock of ``run_dir`` for the process that writes it: rank 0 (``RANK`` of torchrun,
    read before the process group exists); a no-op on the other ranks."""
    return RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
