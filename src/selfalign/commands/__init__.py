"""Subcommands of the ``selfalign`` CLI, one module each (see :mod:`selfalign.cli`)."""
