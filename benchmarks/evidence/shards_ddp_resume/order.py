"""Training order per rank from the traces: batches of B=8 taken from the workers in turn."""

import sys

B, W, SPE = 8, 2, 30


def read(path):
    return [tuple(map(int, line.split())) for line in open(path)]


def interleave(streams, steps, first=0):
    """steps batches, round robin over the workers' sample lists starting at worker `first`."""
    out, pos = [], [0] * W
    for i in range(steps):
        w = (first + i) % W
        out.append(streams[w][pos[w] : pos[w] + B])
        pos[w] += B
    return out


def by_epoch(lines, e):
    return [x for x in lines if x[0] == e]


for rank in (0, 1):
    A = [read(f"/tmp/F/ddp/A-trace/rank{rank}-w{w}.txt") for w in range(W)]
    full = []
    for e in (0, 1):
        full += interleave([by_epoch(A[w], e) for w in range(W)], SPE)
    before = [read(f"/tmp/F/ddp/B-trace-before/rank{rank}-w{w}.txt") for w in range(W)]
    allB = [read(f"/tmp/F/ddp/B-trace/rank{rank}-w{w}.txt") for w in range(W)]
    after = [allB[w][len(before[w]) :] for w in range(W)]
    stop = int(sys.argv[1])
    resumed = interleave([by_epoch(before[w], 0) for w in range(W)], stop)
    # after the resume worker 0 plays the stream that was next (stop % 2); epoch 0's rest
    rest0 = [by_epoch(after[w], 0) for w in range(W)]
    resumed += interleave(rest0, SPE - stop)
    resumed += interleave([by_epoch(after[w], 1) for w in range(W)], SPE)
    same = [a == b for a, b in zip(full, resumed, strict=True)]
    print(
        f"rank {rank}: {len(full)} steps uninterrupted, {len(resumed)} with the stop; "
        f"steps with identical samples (shard, offset, in order): {sum(same)}/{len(same)}"
    )
    fmt = lambda batch: " ".join(f"{s}:{o}" for _, s, o, _ in batch)
    for i in (stop - 2, stop - 1, stop, stop + 1):
        tag = "before stop" if i < stop else "after resume"
        print(f"  step {i + 1:2d} ({tag:12s}) uninterrupted: {fmt(full[i])}")
        print(f"  step {i + 1:2d} ({tag:12s}) stop+resume:   {fmt(resumed[i])}")
