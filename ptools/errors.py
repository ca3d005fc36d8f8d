"""The one error hierarchy of ptools.

Core functions raise these; the command line turns them into ``error: …`` on stderr and
the exit code each class carries. Anything else escaping a command is a bug.
"""

from __future__ import annotations


class PtoolsError(Exception):
    """Base of every error ptools raises on purpose.

    Args:
        message: what is wrong, in one line.
        hint: what to do about it (the flag to pass, the command to run), or None.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInputError(PtoolsError):
    """The input (a file, a value, an option) is malformed or inconsistent."""


class UnsafeFileError(PtoolsError):
    """A file would need to run code to be read, and the user did not trust it."""


class RequirementNotMetError(PtoolsError):
    """Something the user asked for explicitly (e.g. ``--require 2``) is not available."""

    exit_code = 3
