"""Scale-out: the process group, ranks, the data sampler and the wrapped training model.

``torchrun --nproc_per_node=N -m cmae pretrain ...`` sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous address; the same code without them is one process and no
process group. Everything here is a no-op for a single process, so the training loop has one
path. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from cmae.errors import ConfigError
from cmae.runtime.checkpoint import periodic_checkpoints


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that prints, logs and writes files."""
    return rank() == 0


# the process-group timeout when none is given: torch's default for gloo (NCCL's is 10 min)
DEFAULT_TIMEOUT_S = 1800.0

_store: dist.Store | None = None  # this attempt's store: the ranks' exit records (peer_report)


def setup_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device.

    ``device``: the resolved ``train.device``. On CUDA each rank takes GPU ``LOCAL_RANK`` and
    the backend is NCCL; on CPU it is gloo (for testing: the same code, slowly). Without
    ``WORLD_SIZE`` > 1 in the environment nothing happens and ``device`` is returned.
    ``timeout_s`` (``train.dist_timeout``): how long a collective waits for a silent peer
    before it fails; with NCCL the failed collective then ends the process
    (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, docs/DISTRIBUTED.md).
    """
    global _store
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank_, world = attempt_store(timeout)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"train.device: {device} pins one GPU, but under torchrun LOCAL_RANK picks "
                "the GPU of each rank; use auto or cuda"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        # a collective that fails or outlives the timeout tears the process down (torch's
        # default, 3); 0 would leave the survivors of a dead rank waiting forever
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group(
            "nccl", store=store, rank=rank_, world_size=world, timeout=timeout, device_id=device
        )
    else:
        dist.init_process_group("gloo", store=store, rank=rank_, world_size=world, timeout=timeout)
    _store = store
    _register(store, rank_)
    return device


def attempt_store(timeout: datetime.timedelta) -> tuple[dist.Store, int, int]:
    """The rendezvous store of ``env://`` (torchrun's), scoped to this restart attempt.

    torchrun (c10d rendezvous) keeps one store server for all restart attempts of a job, and
    the process group's rendezvous keys (each rank's listening address) are the same names in
    every attempt. A restarted rank that asks for its peer's address before the peer has
    written the new one reads the address of the previous attempt's process: its connect is
    refused (the process is gone) or, worse, accepted by a dying process that inherited the
    socket, and waits until the timeout (pytorch/pytorch#135712). A prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) leaves the old keys unread.
    """
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None:
        store = dist.PrefixStore(f"cmae/attempt-{attempt}/", store)
    return store, rank_, world


def teardown_distributed() -> None:
    global _store
    if is_distributed():
        dist.destroy_process_group()
    _store = None


def exit_with_parent() -> None:
    """In a data-loader worker: die with SIGKILL as soon as the rank that forked it dies.

    A forked worker inherits its rank's sockets, the process group's included. When the rank
    is killed, a worker still alive keeps them open for seconds (until its own check notices
    the parent is gone): the peers' collectives and a restarted group's rendezvous then talk
    to a process that never answers, instead of failing at once on a closed connection.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl: too late to be told
        os._exit(0)


# ---------------------------------------------------------------------------------------------
# a peer rank failed: what to tell the user


def _register(store: dist.Store, rank_: int) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    store.set(f"rank/{rank_}", json.dumps(me))


def record_exit(reason: str) -> None:
    """Tell the other ranks why this rank is leaving (``peer_report`` reads it); best effort."""
    if _store is None:
        return
    try:
        _store.set(f"exit/{rank()}", reason)
    except Exception:  # noqa: BLE001 -- the store's server may be gone with the job
        pass


def is_peer_failure(e: BaseException) -> bool:
    """Is ``e`` a collective that failed because another rank is gone (or silent)?"""
    if not is_distributed():
        return False
    if isinstance(e, dist.DistError):  # NCCL and store errors, timeouts
        return True
    # gloo raises plain RuntimeErrors from its transport, naming its source file:
    # "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ..."
    return isinstance(e, RuntimeError) and "gloo" in str(e).lower()


def stopped_peers() -> dict[int, str]:
    """{rank: what happened} for the other ranks that are known to have stopped: those that
    said why (``record_exit``), and those on this host whose process is gone ("killed")."""
    if _store is None:
        return {}
    found = {}
    for r in range(world_size()):
        if r == rank():
            continue
        try:
            if _store.check([f"exit/{r}"]):
                found[r] = _store.get(f"exit/{r}").decode()
                continue
            key = f"rank/{r}"
            me = json.loads(_store.get(key).decode()) if _store.check([key]) else None
        except Exception:  # noqa: BLE001 -- the store's server may be gone with the job
            continue
        if me and me["host"] == socket.gethostname() and not _alive(int(me["pid"])):
            found[r] = "killed"
    return found


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie waiting for its parent)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_batch_size(global_batch: int, world: int, accum_steps: int, contrastive: bool) -> int:
    """Per-rank loader batch for the GLOBAL ``train.batch_size``; errors name the key."""
    if global_batch % (world * accum_steps):
        raise ConfigError(
            f"train.batch_size: {global_batch} must be divisible by world size x "
            f"train.accum_steps = {world} x {accum_steps}"
        )
    local = global_batch // world
    # BatchNorm in training mode needs 2 samples per micro-batch (per rank without SyncBN)
    if contrastive and local // accum_steps < 2:
        raise ConfigError(
            f"train.batch_size: {global_batch} leaves {local // accum_steps} sample per "
            f"micro-batch on each of {world} ranks; the projector's BatchNorm needs >= 2"
        )
    return local


def build_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """This rank's shard of a seeded shuffle; call ``set_epoch(epoch)`` every epoch.

    Used for one process too (one shard), so a step's global batch is the same set of images
    whatever the number of ranks. ``drop_last``: every rank runs the same number of steps.
    """
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True
    )


def wrap_model(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """The module the training step calls; ``model`` stays the plain module for checkpoints,
    the EMA update and evaluation (it shares its parameters with the wrapper).

    With several ranks: BatchNorm -> SyncBatchNorm in place (CUDA only: PyTorch's
    SyncBatchNorm has no CPU kernel, so gloo runs keep per-rank statistics), including the
    target projector, as the reference does; then DDP, which broadcasts rank 0's parameters
    (the frozen target branch too) and buffers. The target branch has ``requires_grad=False``,
    so every trainable parameter gets a gradient and ``find_unused_parameters`` stays False.
    """
    wrapped = model
    if world_size() > 1:
        if device.type == "cuda":
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            assert converted is model  # the root is not a BatchNorm: children replaced in place
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )
    if compile:
        # after DDP: dynamo splits the graph at DDP's buckets so all-reduce overlaps backward
        wrapped = torch.compile(wrapped)
    return wrapped


def no_sync(wrapped: nn.Module, skip: bool) -> AbstractContextManager:
    """DDP's ``no_sync()`` when ``skip`` (a micro-batch before the last one): gradients only
    accumulate locally and are all-reduced once, in the last micro-batch's backward."""
    if skip and world_size() > 1:
        return wrapped.no_sync()  # a compiled wrapper forwards the attribute to DDP
    return nullcontext()


class PeerFailed(RuntimeError):
    """Another rank stopped (killed, failed or silent) while this one needed it; the message
    names it, the last checkpoint and what to do. ``report``: this rank is the lowest of those
    still here, the one that prints it (one line for the job, not one per rank)."""

    def __init__(self, message: str, report: bool) -> None:
        super().__init__(message)
        self.report = report


LEFT_AFTER_PEER = "left after another rank stopped"


def peer_failure(e: BaseException, run_dir: str | Path, command: str) -> PeerFailed:
    """``e`` (a failed collective, ``is_peer_failure``) as a one-line ``PeerFailed``; its
    details go to ``RUN/errors/rank-R.log``, which the line names."""
    record_exit(LEFT_AFTER_PEER)
    stopped: dict[int, str] = {}
    deadline = time.monotonic() + 3.0  # a killed rank is a zombie until torchrun reaps it
    while time.monotonic() < deadline:
        stopped = {r: why for r, why in stopped_peers().items() if why != LEFT_AFTER_PEER}
        if stopped:
            break
        time.sleep(0.1)
    if stopped:
        who = "; ".join(f"rank {r} stopped ({why})" for r, why in sorted(stopped.items()))
    else:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = f"another rank stopped or stopped answering ({detail[:200]})"
    log = Path(run_dir) / "errors" / f"rank-{rank()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {command}, rank {rank()}: {who}\n")
            f.write("".join(traceback.format_exception(e)))
        details = f"; details in {log}"
    except OSError:
        details = ""
    saved = periodic_checkpoints(run_dir)
    where = (
        f"the run saved at step {saved[-1][0]} ({saved[-1][2]})"
        if saved
        else "the run has no checkpoint yet"
    )
    here = [r for r in range(world_size()) if r not in stopped]
    return PeerFailed(
        f"{who}; {where}; run the same command to resume (torchrun --max-restarts does it "
        f"by itself){details}",
        # nothing known of the others: each survivor says what it saw
        report=not stopped or rank() == min(here, default=rank()),
    )
