"""The errors selfalign raises for a user's mistake.

Each message says what is wrong and how to fix it. The command line prints a
:class:`SelfalignError` as one line and exits with status 2; any other exception is a bug in
selfalign and keeps its traceback.
"""
from __future__ import annotations


class SelfalignError(Exception):
    """Bad input from the user: a config, flag, data set, checkpoint or path."""


class ConfigError(SelfalignError, ValueError):
    """A configuration problem; the message names the dotted key and says what is expected."""


class UsageError(SelfalignError):
    """A command-line flag or argument that cannot be used as given."""


class DataError(SelfalignError):
    """A data set, image folder, latent shard or reference batch that cannot be read or used."""


class CheckpointError(SelfalignError, ValueError):
    """A checkpoint or run directory that is missing, incomplete, damaged or from another run."""


class OutputError(SelfalignError):
    """An output path that cannot be written: a read-only or full file system, a file where a
    directory is needed (or the reverse), a name longer than the file system allows."""
