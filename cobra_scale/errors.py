"""User-facing errors.

Anything a user can cause (a bad path, a missing column, a wrong config value)
raises :class:`CobraError`. The CLI prints its message on one line and exits
with status 2 instead of showing a traceback.
"""


class CobraError(Exception):
    """An error caused by user input; its message is shown as-is, on one line."""


class DataError(CobraError):
    """Input data is malformed (missing/mistyped column, bad ids, unreadable file)."""


class ConfigError(CobraError):
    """A config file or a ``key=value`` override is invalid."""
