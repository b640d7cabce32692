"""User-facing errors.

Every problem caused by the user's input (a file, a config key, a missing run) is raised as a
:class:`TmergeError` subclass whose message names the offending file or key and says what was
expected. The CLI prints the message alone (no traceback) and exits with status 2.
"""

from __future__ import annotations


class TmergeError(Exception):
    """Base class of errors whose message is meant for the user, not a traceback."""

    exit_code = 2


class ConfigError(TmergeError):
    """An unknown or mistyped configuration key, or an invalid value."""


class DataError(TmergeError):
    """A dataset file or folder that is missing, unreadable or not what was expected."""


class RunError(TmergeError):
    """A run folder or artefact (checkpoint, Fisher, alphas) that is missing or inconsistent."""
