"""User-facing errors.

Every problem caused by the user's input (a file, a config key, a missing run) is raised as a
:class:`TmergeError` subclass whose message names the offending file or key and says what was
expected. The CLI prints the message alone (no traceback) and exits with status 2.
"""

from __future__ import annotations


class TmergeError(Exception):
    """Base class of errors whose message is meant for the user, not a traceback."""

    exit_code = 2
    #: The user's input caused it: a run folder the failing stage created holds nothing worth
    #: keeping and is removed. False for stops whose folder must survive (to resume, inspect).
    input_error = True


class ConfigError(TmergeError):
    """An unknown or mistyped configuration key, or an invalid value."""


class DataError(TmergeError):
    """A dataset file or folder that is missing, unreadable or not what was expected."""


class RunError(TmergeError):
    """A run folder or artefact (checkpoint, Fisher, alphas) that is missing or inconsistent."""


class NonFiniteError(RunError):
    """A loss or Fisher that became NaN/inf; the run folder is kept for inspection."""

    input_error = False


class Interrupted(TmergeError):
    """The stage was stopped by SIGTERM after saving a checkpoint to resume from (exit status 143,
    the conventional 128 + SIGTERM)."""

    exit_code = 143
    input_error = False
