"""Faults during training: non-finite steps and preemption signals.

Non-finite steps are detected and skipped on the device, without a host sync per step: a
non-finite loss poisons the gradients (so every rank, after DDP's all-reduce, and the fp16
GradScaler see the step as bad), the optimizer step is skipped through the ``found_inf`` flag
that fused optimizers take on device (the mechanism GradScaler uses), the EMA runs with
momentum 1 and BatchNorm buffers are restored. The counters live on the device and are read at
logging steps only; ``train.max_bad_steps`` consecutive bad steps stop the run there.

SIGTERM / SIGUSR1 (a scheduler's preemption notice) set a flag; the loop finishes its step,
saves a checkpoint and raises ``Preempted``, which ``cmae pretrain`` turns into exit code 75
(EX_TEMPFAIL: retry later). Rerunning the same command resumes (``train.resume=auto``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, rerun to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class Preempted(Exception):
    """A stop signal arrived; the state was saved to ``checkpoint``."""

    def __init__(self, message: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------
# non-finite steps


def poison_nonfinite(loss: Tensor) -> Tensor:
    """``loss`` times 1 (finite) or NaN (not): a bad loss then yields NaN gradients everywhere,
    even when its NaN sits in a term without a gradient path."""
    return loss * torch.where(torch.isfinite(loss), 1.0, torch.nan)


def grads_finite(params: Iterable[nn.Parameter]) -> Tensor:
    """0-dim bool on the device: are all gradients finite? (one fused norm, no host sync)"""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads))


def step_unless_bad(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()`` unless ``ok`` is False: a skipped step leaves the parameters and the
    optimizer state (moments, step count) as they were.

    Fused optimizers read the flag on the device (``found_inf``, as under GradScaler), so no
    host sync; the others need the value on the host, free on CPU and a sync on CUDA.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif ok.item():
        optimizer.step()


def keep_buffers_unless(buffers: Sequence[Tensor], before: Sequence[Tensor], ok: Tensor) -> None:
    """Put back the pre-step values of ``buffers`` (BatchNorm statistics) if the step is bad: a
    NaN forward must not leave NaN running statistics behind."""
    for b, old in zip(buffers, before, strict=True):
        b.copy_(torch.where(ok, b, old))


class BadSteps:
    """Device-side counters of skipped steps; ``check`` reads them (a host sync) at log steps.

    ``worst`` is the longest run of consecutive bad steps since the last check, so a run of M
    bad steps between two checks is not missed when a good step follows it.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.run, self.worst, self.total = zero.clone(), zero.clone(), zero.clone()
        self.reported = 0

    def update(self, ok: Tensor) -> None:
        bad = (~ok).long()
        self.run = (self.run + 1) * bad  # reset to 0 by a good step
        self.worst = torch.maximum(self.worst, self.run)
        self.total += bad

    def check(self, max_bad: int, step: int) -> int:
        """Raise NonFiniteError after ``max_bad`` consecutive bad steps; else return the number
        of steps skipped since the last check (and warn about them)."""
        worst, total = torch.stack([self.worst, self.total]).tolist()
        self.worst = self.run.clone()  # a run still open at this check goes on counting
        if worst >= max_bad:
            raise NonFiniteError(
                f"{worst} consecutive steps (checked at step {step}) had a non-finite loss or "
                f"gradient (train.max_bad_steps={max_bad}); their updates were skipped. Lower "
                "the lr, use amp=bf16 instead of fp16, or resume from an earlier checkpoint."
            )
        new, self.reported = total - self.reported, total
        if new:
            print(f"warning: step {step}: {new} step(s) skipped (non-finite loss or gradient)")
        return new


# ---------------------------------------------------------------------------------------------
# preemption


class StopSignals:
    """Context manager: while active, SIGTERM / SIGUSR1 only set a flag (``requested``).

    Handlers can only be installed from the main thread; elsewhere (e.g. a notebook worker
    thread) the signals keep their default action. Under torchrun ``requested()`` all-reduces
    the flag over a gloo group on the CPU, so all ranks stop at the same step and the GPU
    stream is not synchronised.
    """

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._group = None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def requested(self) -> bool:
        """Did any rank get a signal? Every rank must call it at the same steps."""
        flag = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        if self._group is None:  # created on first use: the process group exists by then
            self._group = dist.new_group(backend="gloo")
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return bool(t.item())

    @property
    def name(self) -> str:
        return self.received.name if self.received is not None else "a stop signal on another rank"


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a signal sent to the whole process group must not kill the
    workers while the main process finishes its step and saves (the loader stops them)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
