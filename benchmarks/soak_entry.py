"""``python -m cmae`` for the chaos soak's one-process commands, with the command's evaluation
marked: while the function named by ``CMAE_SOAK_EVALUATION`` (``module:attribute``) runs, the
file ``CMAE_SOAK_MARK`` exists, so that the soak can kill the run during an evaluation. Nothing
else changes: the reference run starts the same way."""

import importlib
import os
import signal
import sys
from pathlib import Path

from cmae import __main__ as entry


def marked(fn, mark: Path):
    def run(*args, **kwargs):
        mark.touch()
        try:
            return fn(*args, **kwargs)
        finally:
            mark.unlink(missing_ok=True)

    return run


if __name__ == "__main__":
    # a stop signal during the imports below ends the run as during cmae's own
    for s in entry.STOP_SIGNALS:
        signal.signal(s, entry._stopped_while_importing)
    module, attr = os.environ["CMAE_SOAK_EVALUATION"].split(":")
    mod = importlib.import_module(module)
    setattr(mod, attr, marked(getattr(mod, attr), Path(os.environ["CMAE_SOAK_MARK"])))
    sys.argv = ["cmae", *sys.argv[1:]]
    sys.exit(entry.main())
