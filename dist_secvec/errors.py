"""Errors a user can cause, and how the CLI reports them.

A `UserError` ends the command with one line naming the file, key or row and what to do, exit
code 2. Anything else is a bug: exit code 1 with a traceback (or one line without --debug).
"""


class UserError(Exception):
    """Bad input from the user: config, data, paths, a mismatched security vector."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, mistyped, out of range, or in an impossible combination."""


class DataError(UserError):
    """A data file is missing, unreadable or has a malformed row."""


class SecurityVectorError(UserError):
    """A security vector is missing, corrupted, or made for another base model."""


class Stopped(Exception):
    """Training stopped on request (SIGTERM/SIGINT) after writing a checkpoint: not an error, the
    CLI prints the message and exits 0."""
