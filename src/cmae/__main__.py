"""``python -m cmae`` and the ``cmae`` command.

A stop signal (SIGTERM / SIGUSR1) that arrives while Python imports torch and cmae (a second or
more) ends the process with the start-up message and exit 75, as one later in the start-up
does: the handler is installed first and the imports follow, inside ``main``. Only the
interpreter's own start, before this file runs (tens of milliseconds), keeps the default.
"""

import signal
import sys

EXIT_PREEMPTED = (
    75  # cmae.runtime.faults.EXIT_PREEMPTED; not imported from there: that imports torch
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _stopped_while_importing(signum: int, frame) -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    sys.stderr.write(
        f"cmae {command}: stopped by {signal.Signals(signum).name} during start-up, before "
        "training (nothing to save); run the same command again\n"
    )
    raise SystemExit(EXIT_PREEMPTED)


def main() -> int:
    for s in STOP_SIGNALS:
        signal.signal(s, _stopped_while_importing)
    # imported after the handlers on purpose (not to hide a circle): it takes seconds
    from cmae.cli import main as cli_main

    code = cli_main()
    # the command is over and its exit code decided: a signal now (torchrun stops the other
    # ranks of a failed job with SIGTERM) would only replace it, or raise inside atexit hooks
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
