"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class RagcacheError(Exception):
    """A problem the user can fix: its message is printed as one line, without a traceback."""
