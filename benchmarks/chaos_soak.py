"""Chaos soak: a run killed at random moments and restarted ends bitwise equal to an
uninterrupted run of the same command.

    python benchmarks/chaos_soak.py --data /path/cifar_slice --faults 5 --seed 0 \\
        --work /tmp/soak --steps-per-epoch 31 [key.sub=value ...]
    python benchmarks/chaos_soak.py --command finetune --faults 5 --work /tmp/soak-ft [...]
    python benchmarks/chaos_soak.py --command segment --faults 5 --work /tmp/soak-seg [...]

First the command runs once without faults (the reference, ``WORK/ref``), then again
(``WORK/chaos``) while this script sends ``--faults`` signals, each SIGKILL or SIGTERM at a
random moment: at a random step, while rank 0 writes a checkpoint (its temp file exists), or
during an evaluation. ``pretrain`` runs as 2 ranks under ``torchrun --max-restarts`` (a random
rank is signalled; torchrun restarts the job; the evaluation is the epoch-end kNN monitor);
``finetune`` and ``segment`` run as one process, rerun by this script after each fault until it
exits 0, as a user or a scheduler would (their evaluation is marked by ``soak_entry.py``). The
run resumes from its newest checkpoint. At the end the tensors of ``checkpoint.pt`` (model,
optimizer, RNG states) and the losses and metrics of ``log.jsonl`` (the last record of each
step) must equal the reference's bit for bit.

Prints one JSON line per fault, then one summary line: faults injected, restarts, steps
redone, bytes lost (tensor bytes and loss records that differ: 0 expected) and the time
overhead. Exits 1 if the runs differ or the chaos run fails.

A command is an entry of ``COMMANDS``: its argv after ``-m cmae`` (given the run directory, the
data and the overrides), its ranks, and, for one process, the function that evaluates (a new
command such as ``detect`` is one more entry); the fault moments read ``log.jsonl`` and
``checkpoints/`` as every cmae training command writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from compare_runs import final_checkpoint, losses, tensors


@dataclass(frozen=True)
class Command:
    """A command under test. ``argv(out, data, overrides)``: its arguments after ``-m cmae``;
    ``world``: 2 runs it under ``torchrun --max-restarts``, 1 as one process this script
    reruns; ``evaluation``: for one process, the ``module:function`` whose calls are the
    "evaluation" moment (``soak_entry.py`` marks them)."""

    argv: Callable[[Path, str | None, list[str]], list[str]]
    world: int
    evaluation: str | None = None

    @property
    def moments(self) -> tuple[str, ...]:
        return ("step", "checkpoint-write", "knn-monitor" if self.world > 1 else "evaluation")


def one_process(command: str, *fixed: str) -> Callable[[Path, str | None, list[str]], list[str]]:
    def argv(out: Path, data: str | None, extra: list[str]) -> list[str]:
        source = ["--data", data] if data else []
        return [command, "--checkpoint", "random", "--out", str(out), *fixed, *source, *extra]

    return argv


COMMANDS = {
    "pretrain": Command(
        lambda out, data, extra: [
            "pretrain",
            "--config",
            "quick",
            *(["--data", data] if data else []),
            "--out",
            str(out),
            "train.threads=1",
            "train.log_every=1",
            "train.save_every_steps=5",
            "train.knn_every=1",
            "train.knn_at_end=false",
            *extra,
        ],
        world=2,
    ),
    # a random-initialised encoder: the soak tests the run, not what it starts from
    "finetune": Command(
        one_process("finetune", "encoder.preset=quick", "eval_every=1", "save_every=1"),
        world=1,
        evaluation="cmae.train.finetune:evaluate",
    ),
    "segment": Command(
        one_process("segment", "threads=1", "log_every=1"),
        world=1,
        evaluation="cmae.train.segment:evaluate_model",
    ),
    "detect": Command(
        one_process("detect", "threads=1", "log_every=1"),
        world=1,
        evaluation="cmae.train.detect:evaluate",
    ),
}
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


@dataclass
class Fault:
    moment: str
    signal: str
    rank: int
    step: int  # "step": at this step; others: the first such moment after this step
    injected: bool = False
    at_step: int | None = None
    note: str = ""


@dataclass
class Watch:
    """What the injector sees of the running job."""

    out: Path
    torchrun: subprocess.Popen | Reruns
    world: int
    generations: list[tuple[int, ...]] = field(default_factory=list)  # pids of each attempt

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of torchrun's current workers (one process: its current attempt)."""
        found = {}
        if isinstance(self.torchrun, Reruns):
            pid = self.torchrun.current()
            if pid is not None:
                found[0] = pid
                if not self.generations or self.generations[-1] != (pid,):
                    self.generations.append((pid,))
            return found
        try:
            children = Path(f"/proc/{self.torchrun.pid}/task/{self.torchrun.pid}/children")
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            return {}
        for pid in pids:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
        pids = tuple(sorted(found.values()))
        # a full set of new workers is an attempt (not the moments when one has died)
        if len(pids) == self.world and (not self.generations or self.generations[-1] != pids):
            self.generations.append(pids)
        return found

    def last_step(self) -> tuple[int, bool]:
        """The newest step in log.jsonl (0 before any), and whether this attempt trained it
        (False: it is the step a resume started from)."""
        step, trained = 0, False
        try:
            lines = (self.out / "log.jsonl").read_text().splitlines()
        except OSError:
            return 0, False
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if "resumed_from" in rec:
                step, trained = rec["step"], False
            elif "loss" in rec:
                step, trained = rec["step"], True
        return step, trained

    def writing_checkpoint(self) -> bool:
        return any((self.out / "checkpoints").glob(".*.tmp")) or any(self.out.glob(".*.pt.*.tmp"))


def torchrun(out: Path, argv: list[str], restarts: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        "-m",
        "cmae",
        *argv,
    ]
    log = open(out.parent / f"{out.name}.out", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


class Reruns:
    """One process, started again after each failure (a fault), as a user or a scheduler
    would, until it exits 0 or ``restarts`` reruns are spent; ``poll`` as a Popen's."""

    def __init__(self, out: Path, cmd: list[str], env: dict, mark: Path, restarts: int) -> None:
        self.restarts, self.failed = restarts, 0
        self._proc: subprocess.Popen | None = None
        self._rc: int | None = None
        self._lock = threading.Lock()
        self._stopped = False
        log = open(out.parent / f"{out.name}.out", "w")

        def loop() -> None:
            while True:
                mark.unlink(missing_ok=True)  # a kill during an evaluation leaves it
                with self._lock:
                    if self._stopped:
                        self._rc = -9
                        return
                    self._proc = subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                rc = self._proc.wait()
                log.write(f"[soak] attempt exited {rc}\n")
                log.flush()
                if rc == 0 or self.failed >= self.restarts:
                    self._rc = rc
                    return
                self.failed += 1

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def current(self) -> int | None:
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def poll(self) -> int | None:
        return self._rc

    def wait(self) -> int:
        self._thread.join()
        return self._rc

    def kill(self) -> None:
        with self._lock:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


def one_process_run(out: Path, argv: list[str], command: Command, restarts: int) -> Reruns:
    mark = out.parent / f"{out.name}.evaluating"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CMAE_SOAK_EVALUATION": command.evaluation or "",
        "CMAE_SOAK_MARK": str(mark),
    }
    entry = str(Path(__file__).with_name("soak_entry.py"))
    return Reruns(out, [sys.executable, entry, *argv], env, mark, restarts)


def start(command: Command, out: Path, argv: list[str], restarts: int):
    if command.world > 1:
        return torchrun(out, argv, restarts)
    return one_process_run(out, argv, command, restarts)


def inject(watch: Watch, fault: Fault, steps_per_epoch: int | None, deadline: float) -> None:
    """Wait for ``fault``'s moment, then send its signal (or give up at the run's end)."""
    while watch.torchrun.poll() is None and time.monotonic() < deadline:
        ranks = watch.ranks()
        step, trained = watch.last_step()
        if len(ranks) < watch.world or step < fault.step:
            time.sleep(0.02)
            continue
        if fault.moment == "step":
            due = True
            if watch.world == 1:  # the one-process commands log per epoch (finetune): land inside
                time.sleep(random.uniform(0.0, 1.0))
        elif fault.moment == "evaluation":
            due = (watch.out.parent / f"{watch.out.name}.evaluating").exists()
        elif fault.moment == "checkpoint-write":
            due = watch.writing_checkpoint()
        else:  # the monitor runs on rank 0 right after an epoch's last step is logged
            due = trained and step % steps_per_epoch == 0
            if due:
                time.sleep(random.uniform(0.0, 0.3))
        if not due:
            time.sleep(0.005)
            continue
        pid = ranks.get(fault.rank)
        if pid is None:
            continue
        try:
            os.kill(pid, SIGNALS[fault.signal])
        except ProcessLookupError:
            continue
        fault.injected, fault.at_step = True, step
        return
    fault.note = "the run ended before this moment came"


def wait_restarted(watch: Watch, before: tuple[int, ...], deadline: float) -> None:
    """Until torchrun has started the next attempt (new worker pids) and it logged a step."""
    while watch.torchrun.poll() is None and time.monotonic() < deadline:
        ranks = watch.ranks()
        if len(ranks) == watch.world and tuple(sorted(ranks.values())) != before:
            return
        time.sleep(0.05)


def steps_redone(out: Path) -> int:
    """Steps logged before a resume that the resume trained again."""
    redone, newest = 0, 0
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "resumed_from" in rec:
            redone += max(0, newest - rec["step"])
            newest = rec["step"]
        elif "loss" in rec:
            newest = max(newest, rec["step"])
    return redone


def compare(ref: Path, chaos: Path) -> dict:
    la, lb = losses(ref), losses(chaos)
    steps_differ = sorted(s for s in la.keys() | lb.keys() if la.get(s) != lb.get(s))
    # RUN/checkpoint.pt, else (finetune) the newest periodic one: the end-of-run save
    load = lambda run: torch.load(final_checkpoint(run), map_location="cpu", weights_only=True)
    ta, tb = tensors(load(ref)), tensors(load(chaos))
    bytes_differ = 0
    for k in ta.keys() | tb.keys():
        a, b = ta.get(k), tb.get(k)
        if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
            bytes_differ += max(x.numel() * x.element_size() for x in (a, b) if x is not None)
        elif not torch.equal(a, b):
            differ = (a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).sum()
            bytes_differ += int(differ)
    return {
        "log_steps": len(la),
        "loss_records_differ": len(steps_differ),
        "tensors": len(ta),
        "tensor_bytes_differ": bytes_differ,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--command", choices=sorted(COMMANDS), default="pretrain")
    p.add_argument("--data", default=None, help="image folder (train/ + val/); default built-in")
    p.add_argument("--work", type=Path, required=True, help="folder for the two runs (emptied)")
    p.add_argument("--faults", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps-per-epoch", type=int, default=None, help="pretrain: to find the epoch ends"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the chaos run")
    p.add_argument("--moments", default=None, help="comma-separated subset of the moments")
    p.add_argument(
        "--plan",
        default=None,
        help="fixed faults instead of random kinds: MOMENT/SIGNAL/RANK,... (steps stay random)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value for the command")
    args = p.parse_args()
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    ref, chaos = args.work / "ref", args.work / "chaos"
    for run in (ref, chaos):
        subprocess.run(["rm", "-rf", str(run)], check=True)
    command = COMMANDS[args.command]
    build = command.argv
    if command.world > 1 and args.steps_per_epoch is None:
        p.error(f"{args.command} needs --steps-per-epoch (its kNN monitor runs at epoch ends)")

    t0 = time.monotonic()
    job = start(command, ref, build(ref, args.data, args.overrides), restarts=0)
    if job.wait() != 0:
        print(json.dumps({"error": f"the reference run failed (rc {job.returncode})"}))
        return 1
    ref_wall = time.monotonic() - t0
    total = max(step for step, _ in losses(ref))

    # faults at increasing random steps, spread over the run (not the very last steps)
    moments = args.moments.split(",") if args.moments else list(command.moments)
    at = sorted(rng.sample(range(2, max(3, total - 2)), k=min(args.faults, total - 4)))
    faults = [
        Fault(rng.choice(moments), rng.choice(sorted(SIGNALS)), rng.randrange(command.world), s)
        for s in at
    ]
    for f in faults:
        if f.moment == "checkpoint-write":
            f.rank = 0  # the rank that writes, killed mid-write
    for f, kind in zip(faults, args.plan.split(",") if args.plan else [], strict=False):
        moment, sig, rank = kind.split("/")
        f.moment, f.signal, f.rank = moment, sig, int(rank)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    job = start(command, chaos, build(chaos, args.data, args.overrides), len(faults) + 1)
    watch = Watch(chaos, job, command.world)
    for f in faults:
        before = tuple(sorted(watch.ranks().values()))
        inject(watch, f, args.steps_per_epoch, deadline)
        print(json.dumps({"fault": f.__dict__}), flush=True)
        if f.injected:
            wait_restarted(watch, before, deadline)
    while job.poll() is None and time.monotonic() < deadline:
        watch.ranks()
        time.sleep(0.1)
    if job.poll() is None:
        job.kill()
    chaos_wall = time.monotonic() - t0
    rc = job.wait()
    result = {
        "command": args.command,
        "rc": rc,
        "faults_injected": sum(f.injected for f in faults),
        "by_kind": sorted(f"{f.moment}/{f.signal}/rank{f.rank}" for f in faults if f.injected),
        # torchrun logs each failed attempt; a signal that reached a process already on its
        # way out (e.g. after the last step) fails none
        "restarts": job.failed
        if isinstance(job, Reruns)
        else (chaos.parent / f"{chaos.name}.out")
        .read_text(errors="replace")
        .count("failed (exitcode"),
        "attempts_seen": len(watch.generations),
        "steps": total,
        "steps_redone": steps_redone(chaos) if (chaos / "log.jsonl").exists() else None,
        "ref_wall_s": round(ref_wall, 1),
        "chaos_wall_s": round(chaos_wall, 1),
        "time_overhead": round(chaos_wall / ref_wall - 1, 3),
    }
    if rc == 0:
        diff = compare(ref, chaos)
        result.update(diff)
        result["bytes_lost"] = diff["tensor_bytes_differ"]
        result["bitwise_equal"] = (
            diff["tensor_bytes_differ"] == 0 and not diff["loss_records_differ"]
        )
    print(json.dumps(result), flush=True)
    return 0 if rc == 0 and result["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
