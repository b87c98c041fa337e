"""Demo only: cmae pretrain with every trained shard sample's identity appended to a trace
file (one per process, written by the loader workers as they draw the sample)."""

import os
import sys

from torch.utils.data import get_worker_info

from cmae.cli import main
from cmae.data import shards

TRACE = os.environ["TRACE_DIR"]
_views = shards.ShardStream._views


def traced(self, item, sid, offset, attempt=0):
    info = get_worker_info()
    worker = info.id if info is not None else 0
    _, _, osid, ooff = item
    with open(f"{TRACE}/rank{self.rank}-w{worker}.txt", "a") as f:
        f.write(f"{self.epoch} {osid} {ooff} {attempt}\n")
    return _views(self, item, sid, offset, attempt)


shards.ShardStream._views = traced
sys.exit(main(["pretrain", *sys.argv[1:]]))
