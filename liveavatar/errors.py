"""User-facing errors.

`UserError` carries one sentence naming the bad input and the fix. The CLI prints it on one line
and exits non-zero without a traceback; library callers can catch it like any exception.
"""


class UserError(Exception):
    """Bad input or environment, reported to the user as one line (exit code `code`)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run stops like on Ctrl-C: cleanly, keeping its files."""
