"""What the training loader draws, as a pure function of (seed, epoch, position).

- ``EpochSampler`` wraps the (distributed) shuffling sampler: it yields ``(epoch, index)`` keys
  and can start an epoch at an offset, so a resumed run skips the batches it already trained
  on without loading their images.
- ``SeededSamples`` seeds torch's RNG per sample from (seed, epoch, index) before the
  augmentation (torchvision v2 draws from torch's RNG). The views do not depend on the number
  of workers, on which worker loads a sample, or on what the process did before, and the main
  process's RNG (masking, drop-path) is left untouched. With ``global_rngs=True`` Python's and
  NumPy's global generators are seeded the same way (timm's RandomResizedCrop and RandAugment
  draw from those: ``cmae finetune``), and restored after the sample.
- An image that cannot be decoded (``DataError``) is replaced by another index drawn from the
  same seed, and the sample carries a flag that the main process sums into ``bad_images``
  (counts made inside worker processes would be lost).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cmae.data.datasets import DataError

MAX_SUBSTITUTES = 10  # replacements tried for one unreadable sample before giving up


class EpochSampler(Sampler):
    """``(epoch, index)`` keys from ``base`` (any sampler with ``set_epoch``, e.g. a
    DistributedSampler), starting ``start`` samples into the epoch."""

    def __init__(self, base: Sampler) -> None:
        self.base, self.epoch, self.start = base, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in islice(iter(self.base), self.start, None):
            yield self.epoch, int(i)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    """A 63-bit seed mixed from the key (SeedSequence: nearby keys give unrelated streams)."""
    state = np.random.SeedSequence([seed, epoch, index, attempt]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: returns ``(*item, bad)`` where ``bad`` is 1 if
    the image at ``index`` could not be read and a substitute was returned. A plain ``index``
    means epoch 0 (for code that indexes a data set directly, e.g. the reconstruction grid).
    ``global_rngs``: also seed Python's ``random`` and NumPy's global generator per sample."""

    def __init__(self, dataset: Dataset, seed: int, global_rngs: bool = False) -> None:
        self.dataset, self.seed, self.global_rngs = dataset, seed, global_rngs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = (0, key) if isinstance(key, int) else key
        n = len(self.dataset)
        current, errors = index, []
        for attempt in range(MAX_SUBSTITUTES + 1):
            if attempt:
                rng = np.random.default_rng(sample_seed(self.seed, epoch, index, attempt))
                current = int(rng.integers(n))
            try:
                seed = sample_seed(self.seed, epoch, index)
                with torch.random.fork_rng(devices=[]), global_rngs_seeded(seed, self.global_rngs):
                    # the CPU generator only, which the views draw from: torch.manual_seed
                    # would also reseed the accelerators' generators (not restored by
                    # fork_rng(devices=[])) and costs ~0.15 ms here
                    torch.default_generator.manual_seed(seed)
                    item = self.dataset[current]
                return (*item, int(attempt > 0))
            except DataError as e:
                errors.append(str(e))
                if attempt == 0:
                    warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
        raise DataError(
            f"sample {index} and {MAX_SUBSTITUTES} substitutes could not be read; most of the "
            f"data may be unreadable. Last errors: {'; '.join(errors[-3:])}"
        )


@contextmanager
def global_rngs_seeded(seed: int, on: bool = True) -> Iterator[None]:
    """Python's ``random`` and NumPy's global generator seeded with ``seed`` inside, restored
    after (nothing when ``on`` is False)."""
    if not on:
        yield
        return
    py, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)  # NumPy's legacy seed is 32-bit
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


class BadImages:
    """Running count of unreadable samples; more than ``max_fraction`` of an epoch is an error."""

    def __init__(
        self,
        max_fraction: float,
        epoch_size: int,
        total: int = 0,
        in_epoch: int = 0,
        key: str = "data.max_bad_fraction",
    ) -> None:
        self.max_fraction, self.epoch_size, self.key = max_fraction, epoch_size, key
        self.total, self.in_epoch = total, in_epoch  # non-zero when resuming

    def new_epoch(self) -> None:
        self.in_epoch = 0

    def add(self, flags: torch.Tensor, where: str) -> None:
        n = int(flags.sum())  # a CPU tensor from the loader: no device sync
        self.total += n
        self.in_epoch += n
        if self.in_epoch > self.max_fraction * self.epoch_size:
            raise DataError(
                f"{self.in_epoch} unreadable images in this epoch of {self.epoch_size} from "
                f"{where}: more than {self.key}={self.max_fraction} (see the "
                "warnings above for the files and reasons)"
            )
