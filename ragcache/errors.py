"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations


class RagcacheError(Exception):
    """A problem the user can fix: its message is printed as one line, without a traceback.

    The message says what is wrong in the library's own terms. `param` names the argument at fault
    (`mode`, `model`, `dtype`, ...) so that the CLI can add its flag and the server its field.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
