"""The run lifecycle every training command shares: what a run promises, written once.

A command (``train/pretrain.py``, ``finetune.py``, ``segment.py``, ``detect.py``) keeps its own
step, evaluation and outputs and writes its loop in plain Python; a ``TrainingJob`` gives that
loop everything else, with the same behaviour for every command:

- one run per run directory (``RUN/.lock``; a second run is refused with one line naming the
  first), stale temp files of killed saves removed;
- SIGTERM / SIGUSR1: the loop finishes its step, saves a checkpoint and ``stop`` raises
  ``Preempted`` (``cmae`` exits 75; the same command resumes); SIGINT: ``KeyboardInterrupt``
  (exit 130); the data-loader workers started with ``worker_init_fn`` ignore the stop signals
  while the run goes on (a signal sent to the whole process group must not kill them mid-save);
- resume: ``resume=auto`` loads the newest valid checkpoint of the run directory (model,
  optimizer, scaler, RNG states; the command's own extras are in ``Resumed.state``); a run
  already at its last step is reported, and the command writes the end-of-run outputs that
  are missing (``missing``), else reads back its results;
- atomic outputs: ``config.yaml``, ``results.json``, summaries (``write_text``, ``write_json``)
  are whole or absent; ``log.jsonl`` goes on (warning once) when the disk is full;
- checkpoints: ``RUN/checkpoints/step-*.pt`` (newest ``keep_last`` kept, plus every
  ``keep_every_epochs``-th epoch's), ``RUN/checkpoint.pt`` at the end; a failed periodic save
  is reported and training goes on;
- non-finite steps: the step functions skip them on the device (``cmae.runtime.faults``) and
  count them in ``bad_steps``; ``check_bad_steps`` (at log steps) stops the run after
  ``max_bad_steps`` in a row or once the weights are non-finite;
- a progress bar and the training throughput (evaluation time excluded, ``paused``).

How a command uses it (the order matters where it says so)::

    def run(cfg: MyConfig) -> dict:
        with TrainingJob(cfg.out, "cmae mine", keep_last=cfg.keep_last,
                         max_bad_steps=cfg.max_bad_steps) as job:  # lock + stop signals
            device = setup_distributed(resolve_device(cfg.device))
            loader = DataLoader(..., **worker_options(workers, job.worker_init_fn))
            model, optimizer = ...
            resumed = job.resume(cfg.resume, model, optimizer, None, model_config, device)
            step = resumed.step
            if job.already_trained(step, last):
                if job.missing_outputs("results.json"):
                    return write_my_outputs(...)  # what a kill kept the run from writing
                return job.read_json("results.json")
            job.begin(to_dict(cfg), total=last, initial=step, batch_size=cfg.batch_size,
                      device=device, resumed_from=resumed.path)
            while step < last:
                for batch in loader:
                    loss = my_step(..., bad_steps=job.bad_steps)  # skip_nonfinite_step
                    step += 1
                    job.advance()
                    if step % cfg.log_every == 0:
                        skipped = job.check_bad_steps(step)
                        job.log({"step": step, "loss": loss.item(), "skipped_steps": skipped,
                                 "img_per_s": job.img_per_s(step)}, loss=loss.item())
                    if step < last and job.stop_requested():  # every rank, every step
                        job.stop(snapshot(step), step)  # saves, raises Preempted
                    if step % cfg.save_every == 0 and step < last:
                        job.save(snapshot(step), step)
                    if step >= last:
                        break
            job.close()  # the progress bar and log.jsonl
            job.save_final(snapshot(step))  # RUN/checkpoint.pt
            job.write_json("results.json", results)
            return results

``snapshot`` is the command's ``training_state(...)`` (every rank calls it: it gathers the RNG
states) plus its own extras. Only rank 0 writes files; on the other ranks the writing methods
do nothing, and ``TrainingJob`` leaves the process group on exit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
import yaml
from torch import nn

from cmae.runtime.checkpoint import RunCheckpoints, RunLog, remove_stale_temps, save_text
from cmae.runtime.distributed import (
    is_main,
    is_peer_failure,
    peer_failure,
    rank,
    teardown_distributed,
)
from cmae.runtime.faults import STOP_SIGNALS, BadSteps, StopSignals
from cmae.runtime.progress import Progress
from cmae.runtime.resume import find_resume, restore_training
from cmae.runtime.runlock import lock_run_dir


class Resumed(NamedTuple):
    """Where the run starts: step 0 (``path`` None) or a checkpoint's."""

    step: int
    path: Path | None
    state: dict[str, Any]  # the whole checkpoint: a command reads its own extras from it
    bad_images: tuple[int, int]  # unreadable images replaced: run total, this epoch


class TrainingJob:
    """The lifecycle of one training run in ``out_dir`` (see the module docstring).

    ``command``: e.g. ``"cmae segment"`` (in messages); ``key_prefix``: the prefix of the
    command's config keys (``"train."`` for pretraining, ``""`` for the others), so messages
    name ``train.resume`` or ``resume``; ``unit``: what a step is called (``"iteration"``).
    """

    def __init__(
        self,
        out_dir: str | Path,
        command: str,
        *,
        key_prefix: str = "",
        unit: str = "step",
        keep_last: int = 2,
        keep_every_epochs: int = 0,
        max_bad_steps: int = 20,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.command, self.key_prefix, self.unit = command, key_prefix, unit
        self.max_bad_steps = max_bad_steps
        self.checkpoints = RunCheckpoints(self.out_dir, keep_last, keep_every_epochs)
        self.signals = StopSignals()
        self.bad_steps: BadSteps | None = None  # on the training device: made by ``begin``
        self.log_file: RunLog | None = None
        self.bar: Progress | None = None
        self._stack = ExitStack()
        self._closers: list[Callable[[], None]] = []
        self._start = self._tick = 0.0
        self._start_step = self._tick_step = 0
        self._batch_size = 0

    # -----------------------------------------------------------------------------------------
    # start: lock, signals, resume

    def __enter__(self) -> TrainingJob:
        with ExitStack() as stack:
            # one run per directory: a second one is refused, naming the first
            stack.enter_context(lock_run_dir(self.out_dir))
            stack.enter_context(self.signals)
            stack.callback(teardown_distributed)  # however the run ends (a no-op alone)
            # before the process group exists: rank 0 is torchrun's RANK (as for the lock)
            if int(os.environ.get("RANK", "0")) == 0:  # the lock is held: no other run writes
                self.out_dir.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(self.out_dir)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # a collective that failed because another rank is gone: named while the process group
        # and its store still exist (they say which rank stopped); the exit tears them down
        peer = None
        if isinstance(exc, RuntimeError) and is_peer_failure(exc):
            peer = peer_failure(exc, self.out_dir, self.command)
        self.close()
        self._stack.close()
        if peer is not None:
            # torchrun signals the survivors next: nothing is left to save, leave at once
            if threading.current_thread() is threading.main_thread():
                for s in STOP_SIGNALS:
                    signal.signal(s, signal.SIG_IGN)
            raise peer from None

    @property
    def worker_init_fn(self) -> Callable[[int], None]:
        """For every DataLoader of the run, always through
        ``cmae.runtime.faults.worker_options(num_workers, job.worker_init_fn)`` (which adds the
        context that starts the workers with the stop signals blocked): its workers ignore the
        stop signals until the run ends (``cmae.runtime.faults.WorkerStopSignals``)."""
        return self.signals.worker_init_fn

    def resume(
        self,
        setting: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        model_config: dict[str, Any],
        device: torch.device,
    ) -> Resumed:
        """Load the checkpoint ``setting`` picks (``auto``: the newest valid one in the run
        directory; ``never``; a path) into the model, optimizer, scaler and this process's RNG
        states. The checkpoint's ``config["model"]`` must equal ``model_config``."""
        found = find_resume(setting, self.out_dir, self.command, self.key_prefix)
        if found is None:
            return Resumed(0, None, {}, (0, 0))
        path, state = found
        step, bad_images = restore_training(
            path, state, model, optimizer, scaler, model_config, rank(), device, self.key_prefix
        )
        if is_main():
            print(f"resuming from {path} at {self.unit} {step}")
        return Resumed(step, path, state, bad_images)

    def already_trained(self, step: int, last_step: int) -> bool:
        """Is the run at its last step? Says so (rank 0); the command then writes what is
        ``missing`` or reads its results back."""
        if step < last_step:
            return False
        if is_main():
            print(
                f"{self.out_dir} is already trained to {self.unit} {step} "
                f"({self.key_prefix}resume=never restarts)"
            )
        return True

    def missing_outputs(self, *names: str) -> list[str]:
        """Those of the end-of-run outputs ``names`` that are not in the run directory (a kill
        or a full disk kept the run from writing them); says so (rank 0)."""
        missing = [name for name in names if not (self.out_dir / name).is_file()]
        if missing and is_main():
            print(f"{self.out_dir}: writing the missing end-of-run outputs ({', '.join(missing)})")
        return missing

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.out_dir / name).read_text())

    # -----------------------------------------------------------------------------------------
    # the loop

    def begin(
        self,
        config: dict[str, Any],
        *,
        total: int,
        initial: int,
        batch_size: int,
        device: torch.device,
        resumed_from: Path | None = None,
        desc: str | None = None,
    ) -> None:
        """Write ``config.yaml`` (atomically: only now, so a refused run leaves the directory
        as it was), open ``log.jsonl`` (appended on resume, which it records), the progress
        bar (``total`` steps, ``initial`` done) and the clocks; ``batch_size``: the global
        batch (img/s)."""
        if is_main():
            self.write_text("config.yaml", yaml.safe_dump(config, sort_keys=False))
            self.log_file = RunLog(self.out_dir / "log.jsonl")
            if resumed_from is not None:
                self.log_file.write({"step": initial, "resumed_from": str(resumed_from)})
        self.bad_steps = BadSteps(device)
        # a bar on a terminal, plain lines with an ETA in a log (rank 0 only)
        label = desc or self.command.split()[-1]
        self.bar = Progress(total, label, unit="step", initial=initial) if is_main() else None
        self._batch_size = batch_size
        self._start = self._tick = time.perf_counter()
        self._start_step = self._tick_step = initial

    def closing(self, resource: Any) -> Any:
        """Close ``resource`` (anything with ``close()``) when the job closes: at a stop, at the
        end, on an error. Returns it."""
        self._closers.append(resource.close)
        return resource

    def advance(self, steps: int = 1) -> None:
        """``steps`` optimizer steps done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any], **postfix: Any) -> None:
        """Append ``record`` to ``log.jsonl`` (rank 0) and show ``postfix`` on the bar (floats
        with 4 decimals)."""
        if self.log_file is not None:
            self.log_file.write(record)
        if postfix and self.bar is not None:
            shown = {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()}
            self.bar.set_postfix(**shown)

    def img_per_s(self, step: int) -> float:
        """Training images per second since the last call (evaluations excluded)."""
        now = time.perf_counter()
        rate = (step - self._tick_step) * self._batch_size / max(now - self._tick, 1e-9)
        self._tick, self._tick_step = now, step
        return rate

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block (an evaluation, pictures) is not training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._tick += time.perf_counter() - start

    @property
    def wall_s(self) -> float:
        """Seconds since ``begin``."""
        return time.perf_counter() - self._start

    def run_img_per_s(self, step: int, wall_s: float) -> float:
        """Images per second over the steps this process trained, in ``wall_s`` seconds."""
        return (step - self._start_step) * self._batch_size / max(wall_s, 1e-9)

    def check_bad_steps(self, step: int) -> int:
        """Every rank, at log steps (a host sync): the non-finite steps skipped since the last
        check; raises ``NonFiniteError`` after ``max_bad_steps`` in a row."""
        assert self.bad_steps is not None, "begin() first"
        return self.bad_steps.check(self.max_bad_steps, step, f"{self.key_prefix}max_bad_steps")

    # -----------------------------------------------------------------------------------------
    # checkpoints and stopping

    def save(self, state: dict[str, Any], step: int, epoch: int | None = None) -> Path | None:
        """A periodic checkpoint (rank 0; ``epoch``: the epochs it completes, at an epoch's
        end); None if not rank 0 or its write failed (reported, training goes on)."""
        return self.checkpoints.save(state, step, epoch) if is_main() else None

    def save_final(self, state: dict[str, Any]) -> Path | None:
        """``RUN/checkpoint.pt`` (rank 0): a full training state, so a longer run resumes
        from it. A failed write raises, naming the last good periodic checkpoint."""
        return self.checkpoints.save_final(state) if is_main() else None

    def stop_requested(self) -> bool:
        """Did a stop signal arrive (on any rank)? Every rank must ask at the same steps."""
        return self.signals.requested()

    def stop(self, state: dict[str, Any], step: int, epoch: int | None = None) -> NoReturn:
        """Save ``state`` (rank 0), close the outputs, say where the run stopped and raise
        ``Preempted`` (``cmae`` exits 75; the same command resumes)."""
        path = self.save(state, step, epoch)
        self.close()
        self.signals.stop_here(path, step, self.unit, f"{self.key_prefix}resume")

    # -----------------------------------------------------------------------------------------
    # outputs

    def write_text(self, name: str, text: str) -> None:
        """``RUN/name``, atomically (rank 0)."""
        if is_main():
            save_text(self.out_dir / name, text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2))

    def close(self) -> None:
        """Close the progress bar, ``log.jsonl`` and what ``closing`` registered (idempotent)."""
        if self.bar is not None:  # "done" only when the last step was reached
            self.bar.close(done=self.bar.total is not None and self.bar.n >= self.bar.total)
            self.bar = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        while self._closers:
            self._closers.pop(0)()
