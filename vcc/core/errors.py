"""Errors the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name if the message is empty), cut at `limit`."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] if limit else text


class VccError(Exception):
    """An expected failure: bad input, missing file, unreachable target. Printed as one line."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(VccError):
    """Bad arguments (unknown arch, option out of range): exit code 2."""

    exit_code = 2


class ArtefactError(VccError):
    """A file that is not a vcc artefact, is truncated, or does not fit its arch."""
