"""ragcache: retrieval-augmented generation on one GRIT model, reusing the KV caches of its embedding pass."""

from .engine import Answer, RagCache
from .errors import RagcacheError
from .model import GritModel
from .prompts import Segment, Templates

__all__ = ["Answer", "GritModel", "RagCache", "RagcacheError", "Segment", "Templates"]
__version__ = "0.1.0"
