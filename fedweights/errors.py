"""Errors that fedweights reports to users without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad option, missing file, unreachable target).

    The CLI prints its message and exits with a non-zero code; no traceback.
    """

    exit_code = 2


class ConfigError(UserError):
    """A run-config key has an unknown name, a wrong type, or an impossible value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: '{key}' {message}")
        self.key = key


class RunFailed(UserError):
    """A federated run could not complete (e.g. a round got no usable update)."""

    exit_code = 1
