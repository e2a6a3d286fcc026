"""One error type for user mistakes: what went wrong and how to fix it (the CLI exits with its exit_code, 2)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `fix` says how; the CLI prints both on one line and exits 2."""

    exit_code = 2  # subclasses for failures that are not usage errors (a full disk) exit 1

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message
