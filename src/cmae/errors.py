"""The errors a user sees as one line (``cmae`` prints them and exits 2), in a leaf module: every
room of the package raises them, and this file imports nothing of ``cmae``, so the lowest rooms
(``models``, ``config``, ``runtime``) need nothing above them to raise one."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key."""


class DataError(ValueError):
    """The data path or its content is unusable; the message names the path."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or unsafe; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A file could not be written (disk full, quota, I/O error); the older files are intact."""
