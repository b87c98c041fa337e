"""Faults during training: non-finite steps and preemption signals.

Non-finite steps are detected and skipped on the device, without a host sync per step: a
non-finite loss poisons the gradients (so every rank, after DDP's all-reduce, and the fp16
GradScaler see the step as bad), the optimizer step is skipped through the ``found_inf`` flag
that fused optimizers take on device (the mechanism GradScaler uses), the EMA runs with
momentum 1 and BatchNorm buffers are restored. The counters live on the device and are read at
logging steps only; ``max_bad_steps`` consecutive bad steps stop the run there. Pretraining
writes its own step (micro-batches, EMA, GradScaler); the other training commands use
``skip_nonfinite_step``.

SIGTERM / SIGUSR1 (a scheduler's preemption notice) set a flag; the loop finishes its step,
saves a checkpoint and raises ``Preempted``, which ``cmae`` turns into exit code 75
(EX_TEMPFAIL: retry later). Rerunning the same command resumes (``resume=auto``).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cmae.runtime.distributed import exit_with_parent, is_main, teardown_distributed

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


def weights_finite(params: Iterable[nn.Parameter]) -> Tensor:
    """0-dim bool on the device: are all ``params`` finite? (one fused max-norm, no host sync;
    the max, unlike the 2-norm, cannot overflow for finite values)"""
    params = list(params)
    if not params:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf))


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


def buffer_values(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(the buffers of ``model``, copies of their values now): what ``skip_nonfinite_step``
    puts back after a bad step. Take them before the forward."""
    buffers = list(model.buffers())
    return buffers, [b.clone() for b in buffers]


def skip_nonfinite_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    buffers: tuple[list[Tensor], list[Tensor]],
    bad_steps: BadSteps,
) -> Tensor:
    """After ``poison_nonfinite(loss).backward()``: the optimizer step unless a gradient is
    non-finite (then no update and the ``buffers`` of ``buffer_values`` put back), counted in
    ``bad_steps``; returns the device flag ``ok``. No host sync with a fused optimizer."""
    ok = grads_finite(model.parameters())
    step_unless_bad(optimizer, ok)
    keep_buffers_unless(*buffers, ok)
    weights_ok = weights_finite(p for p in model.parameters() if p.requires_grad)
    bad_steps.update(ok & weights_ok, weights_ok)
    return ok


class BadSteps:
    """Device-side counters of skipped steps; ``check`` reads them (a host sync) at log steps.

    ``worst`` is the longest run of consecutive bad steps since the last check, so a run of M
    bad steps between two checks is not missed when a good step follows it.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.run, self.worst, self.total = zero.clone(), zero.clone(), zero.clone()
        self.weights_ok = torch.ones((), dtype=torch.bool, device=device)
        self.reported = 0

    def update(self, ok: Tensor, weights_ok: Tensor | None = None) -> None:
        """``ok``: the step was good; ``weights_ok``: the weights are finite after it."""
        bad = (~ok).long()
        self.run = (self.run + 1) * bad  # reset to 0 by a good step
        self.worst = torch.maximum(self.worst, self.run)
        self.total += bad
        if weights_ok is not None:
            self.weights_ok &= weights_ok

    def check(self, max_bad: int, step: int, key: str = "train.max_bad_steps") -> int:
        """Raise NonFiniteError after ``max_bad`` consecutive bad steps, or once the weights
        are non-finite; else return the number of steps skipped since the last check (and warn
        about them). ``key``: the setting of ``max_bad`` (named in the error)."""
        worst, total, weights_ok = torch.stack(
            [self.worst, self.total, self.weights_ok.long()]
        ).tolist()
        self.worst = self.run.clone()  # a run still open at this check goes on counting
        if not weights_ok:
            # finite gradients, non-finite result: no later step can repair the weights
            raise NonFiniteError(
                f"the weights became non-finite in a step up to step {step} although its loss "
                "and gradients were finite (an lr or weight decay too large for them); nothing "
                "non-finite was saved. Lower the lr or the weight decay and resume from the "
                "last checkpoint."
            )
        if worst >= max_bad:
            raise NonFiniteError(
                f"{worst} consecutive steps (checked at step {step}) had a non-finite loss or "
                f"gradient ({key}={max_bad}); their updates were skipped. Lower "
                "the lr, use amp=bf16 instead of fp16, or resume from an earlier checkpoint."
            )
        new, self.reported = total - self.reported, total
        if new:
            print(f"warning: step {step}: {new} step(s) skipped (non-finite loss or gradient)")
        return new


# ---------------------------------------------------------------------------------------------
# preemption


class StopSignals:
    """Context manager: while active, SIGTERM / SIGUSR1 only set a flag (``requested``), and
    the data-loader workers started with ``worker_init_fn`` ignore them (released on exit).

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
        self.worker_init_fn = WorkerStopSignals()  # for the training loader's workers

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.worker_init_fn.release()
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

    def stop_here(
        self, saved: Path | None, step: int, unit: str = "step", resume_key: str = "resume"
    ) -> NoReturn:
        """Say where the run stopped (rank 0) and raise Preempted (``cmae`` exits 75). The
        caller has saved the checkpoint ``saved`` (None: its save failed, or not rank 0) and
        closed its outputs."""
        if is_main():
            where = f"saved {saved}" if saved else "its save failed (see above)"
            print(
                f"stopped by {self.name} at {unit} {step}; {where}. Run the same command again "
                f"to resume ({resume_key}=auto)"
            )
        teardown_distributed()
        raise Preempted(f"stopped by {self.name} at {unit} {step}", saved and str(saved))


class WorkerStopSignals:
    """The data-loader workers' ``worker_init_fn``: while the run goes on they ignore SIGTERM /
    SIGUSR1, so that a signal sent to the whole process group does not kill them while the
    main process finishes its step and saves. Once ``release()`` is called (``StopSignals``
    does on exit, however the run ends) those signals end them again: the loader's shutdown
    and Python's at exit terminate daemonic workers with SIGTERM and then wait for them, which
    with the signal ignored waited forever after an uncaught exception or a Ctrl-C."""

    def __init__(self) -> None:
        # an Event crosses fork, forkserver and spawn (it is pickled with the worker's args)
        self._released = multiprocessing.Event()

    def __call__(self, worker_id: int) -> None:
        exit_with_parent()  # a killed rank's workers must not keep its sockets open
        released = self._released

        def handle(signum: int, frame) -> None:
            if released.is_set():  # the run is over: die of the signal, as terminate() asks
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for s in STOP_SIGNALS:
            signal.signal(s, handle)
        # the worker started with them blocked (``worker_options``): one sent since then is
        # pending and reaches ``handle`` now, not torch's worker handler that dies of it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def release(self) -> None:
        self._released.set()


def _blocked_start_context() -> multiprocessing.context.BaseContext:
    """The default multiprocessing context, but its processes start with the stop signals
    blocked: a forked data-loader worker runs torch's own SIGTERM handler (a SIGTERM not from
    its parent kills it) until ``WorkerStopSignals`` replaces it, so a signal sent to the whole
    process group while a worker starts (Slurm, Kubernetes, ``kill -- -PGID``) killed the
    worker and the run ("DataLoader worker exited unexpectedly"). The parent's mask is
    restored as soon as the child exists; the mask is inherited across fork (and exec)."""
    base = multiprocessing.get_context()

    class Process(base.Process):  # type: ignore[name-defined,misc]
        def start(self) -> None:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    context_type = type("StopSignalsBlockedContext", (type(base),), {"Process": Process})
    return context_type()


_BLOCKED_CONTEXT: multiprocessing.context.BaseContext | None = None


def worker_options(num_workers: int, worker_init_fn: Callable[[int], None] | None) -> dict:
    """The DataLoader arguments for its workers: ``num_workers``, ``worker_init_fn`` and,
    where that is a run's ``WorkerStopSignals`` (``TrainingJob.worker_init_fn``), the
    multiprocessing context that starts the workers with the stop signals blocked until
    ``worker_init_fn`` has installed its handler. Always pass them together: the context
    without the handler leaves the signals blocked in the workers (terminate() would hang),
    the handler without the context leaves a window at each worker start."""
    global _BLOCKED_CONTEXT
    options: dict = {"num_workers": num_workers, "worker_init_fn": worker_init_fn}
    if num_workers > 0 and isinstance(worker_init_fn, WorkerStopSignals):
        if _BLOCKED_CONTEXT is None:
            _BLOCKED_CONTEXT = _blocked_start_context()
        options["multiprocessing_context"] = _BLOCKED_CONTEXT
    return options
