"""Scale-out: the process group, ranks, the data sampler and the wrapped training model.

``torchrun --nproc_per_node=N -m cmae pretrain ...`` sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous address; the same code without them is one process and no
process group. Everything here is a no-op for a single process, so the training loop has one
path. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from cmae.errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that prints, logs and writes files."""
    return rank() == 0


def setup_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device.

    ``device``: the resolved ``train.device``. On CUDA each rank takes GPU ``LOCAL_RANK`` and
    the backend is NCCL; on CPU it is gloo (for testing: the same code, slowly). Without
    ``WORLD_SIZE`` > 1 in the environment nothing happens and ``device`` is returned.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"train.device: {device} pins one GPU, but under torchrun LOCAL_RANK picks "
                "the GPU of each rank; use auto or cuda"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def teardown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


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
