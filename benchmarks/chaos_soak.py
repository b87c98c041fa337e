"""Chaos soak: a ``torchrun --max-restarts`` run killed at random moments ends bitwise equal to
an uninterrupted run of the same command.

    python benchmarks/chaos_soak.py --data /path/cifar_slice --faults 5 --seed 0 \\
        --work /tmp/soak [key.sub=value ...]

First the command runs once without faults (the reference, ``WORK/ref``), then again
(``WORK/chaos``) under ``torchrun --max-restarts`` while this script sends ``--faults`` signals,
each SIGKILL or SIGTERM to a random rank at a random moment: at a random step, while rank 0
writes a checkpoint (its temp file exists), or while rank 0 runs the epoch-end kNN monitor.
torchrun restarts the job after each; the run resumes from its newest checkpoint. At the end
the tensors of ``checkpoint.pt`` (model, optimizer, every rank's RNG state) and the losses of
``log.jsonl`` (the last record of each step) must equal the reference's bit for bit.

Prints one JSON line per fault, then one summary line: faults injected, restarts, steps
redone, bytes lost (tensor bytes and loss records that differ: 0 expected) and the time
overhead. Exits 1 if the runs differ or the chaos run fails.

A command is an entry of ``COMMANDS``: how to start it (its argv after ``-m cmae``) and the
run directory it writes; the fault moments read ``log.jsonl`` and ``checkpoints/`` as every
cmae training command writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from compare_runs import losses, tensors

# the command under test: argv after `python -m cmae`, given the run directory and the data
COMMANDS = {
    "pretrain": lambda out, data, extra: [
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
    ]
}
WORLD = 2  # ranks of the job
MOMENTS = ("step", "checkpoint-write", "knn-monitor")
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
    torchrun: subprocess.Popen
    generations: list[tuple[int, ...]] = field(default_factory=list)  # pids of each attempt

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of torchrun's current workers."""
        found = {}
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
        if len(pids) == WORLD and (not self.generations or self.generations[-1] != pids):
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
        f"--nproc_per_node={WORLD}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        "-m",
        "cmae",
        *argv,
    ]
    log = open(out.parent / f"{out.name}.out", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def inject(watch: Watch, fault: Fault, steps_per_epoch: int, deadline: float) -> None:
    """Wait for ``fault``'s moment, then send its signal (or give up at the run's end)."""
    while watch.torchrun.poll() is None and time.monotonic() < deadline:
        ranks = watch.ranks()
        step, trained = watch.last_step()
        if len(ranks) < WORLD or step < fault.step:
            time.sleep(0.02)
            continue
        if fault.moment == "step":
            due = True
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
        if len(ranks) == WORLD and tuple(sorted(ranks.values())) != before:
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
    load = lambda run: torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
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
    p.add_argument("--steps-per-epoch", type=int, required=True, help="to find epoch ends")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the chaos run")
    p.add_argument("--moments", default=",".join(MOMENTS), help="comma-separated subset")
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
    build = COMMANDS[args.command]

    start = time.monotonic()
    job = torchrun(ref, build(ref, args.data, args.overrides), restarts=0)
    if job.wait() != 0:
        print(json.dumps({"error": f"the reference run failed (rc {job.returncode})"}))
        return 1
    ref_wall = time.monotonic() - start
    total = max(s for s in losses(ref))

    # faults at increasing random steps, spread over the run (not the very last steps)
    moments = args.moments.split(",")
    at = sorted(rng.sample(range(2, max(3, total - 2)), k=min(args.faults, total - 4)))
    faults = [
        Fault(rng.choice(moments), rng.choice(sorted(SIGNALS)), rng.randrange(WORLD), s) for s in at
    ]
    for f in faults:
        if f.moment == "checkpoint-write":
            f.rank = 0  # the rank that writes, killed mid-write
    for f, kind in zip(faults, args.plan.split(",") if args.plan else [], strict=False):
        moment, sig, rank = kind.split("/")
        f.moment, f.signal, f.rank = moment, sig, int(rank)
    start = time.monotonic()
    deadline = start + args.timeout
    job = torchrun(chaos, build(chaos, args.data, args.overrides), restarts=len(faults) + 1)
    watch = Watch(chaos, job)
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
    chaos_wall = time.monotonic() - start
    rc = job.wait()
    result = {
        "command": args.command,
        "rc": rc,
        "faults_injected": sum(f.injected for f in faults),
        "by_kind": sorted(f"{f.moment}/{f.signal}/rank{f.rank}" for f in faults if f.injected),
        # torchrun logs each failed attempt; a signal that reached a process already on its
        # way out (e.g. after the last step) fails none
        "restarts": (chaos.parent / f"{chaos.name}.out")
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
