"""Where data lives and which defaults the environment sets (RAGCACHE_HOME, RAGCACHE_INDEX, RAGCACHE_MODEL)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "GritLM/GritLM-7B"


def home() -> Path:
    """The folder that holds built indexes (and models converted from GGUF): $RAGCACHE_HOME, else ./indexes."""
    return Path(os.environ.get("RAGCACHE_HOME", "indexes")).expanduser()


def default_index() -> Path:
    """$RAGCACHE_INDEX, else <home>/default."""
    env = os.environ.get("RAGCACHE_INDEX")
    return Path(env).expanduser() if env else home() / "default"


def resolve_index(name: str | None) -> Path:
    """-i takes a path; a bare name with no slash that is not an existing folder lives under home()."""
    if not name:
        return default_index()
    path = Path(name).expanduser()
    if "/" not in name and not path.exists():
        return home() / name
    return path


def kv_cache_folder() -> Path:
    """The local disk cache of chunk caches read from object stores: <home>/kv-cache (shared by indexes:
    objects are content-addressed)."""
    return home() / "kv-cache"


DEFAULT_LOCAL_CACHE_GB = 10.0  # the local disk cache in front of an object store, when none is named


def default_model() -> str:
    return os.environ.get("RAGCACHE_MODEL", DEFAULT_MODEL)
