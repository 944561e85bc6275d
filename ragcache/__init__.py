"""ragcache: retrieval-augmented generation on one GRIT model, reusing the KV caches of its embedding pass."""

import logging
import sys

from .engine import Answer, RagCache
from .errors import RagcacheError
from .model import GritModel
from .prompts import Segment, Templates

__all__ = ["Answer", "GritModel", "RagCache", "RagcacheError", "Segment", "Templates"]
__version__ = "0.1.0"


class _Stderr(logging.Handler):
    """ragcache's messages on stderr, looked up at each line so redirection applies: `warning: ...` for
    warnings, progress notes (INFO, which the CLI turns on) as they are.

    Applications that route logging themselves can remove it: logging.getLogger("ragcache").handlers.clear().
    """

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        print(prefix + record.getMessage(), file=sys.stderr)


_log = logging.getLogger("ragcache")
_log.setLevel(logging.WARNING)
_log.addHandler(_Stderr())
