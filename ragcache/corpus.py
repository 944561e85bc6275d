"""Corpus -> documents: which files are read, and how each becomes documents with a title and text."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RagcacheError

TEXT_SUFFIXES = {".txt", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}
# A bigger file is skipped (--max-file-mb raises the limit): it is read whole, and GritLM-7B stores
# about 30 GB of KV cache per MB of text, so a file this large is far more often a mistake than a corpus.
MAX_FILE_MB = 20.0


@dataclass
class Document:
    doc_id: str
    title: str
    text: str


@dataclass
class Discovery:
    files: list[Path]
    skipped: list[tuple[Path, str]]  # (path, why)


def roots(paths: list[str | Path]) -> list[Path]:
    """The corpus roots as given, each of which must exist."""
    roots = [Path(raw).expanduser() for raw in paths]
    for raw, root in zip(paths, roots):
        if root.is_symlink() and not root.exists():
            raise RagcacheError(f"'{raw}' is a broken symbolic link, or a loop of them", param="corpus")
        if not root.exists():
            raise RagcacheError(f"no such file or folder: '{raw}'", param="corpus")
    return roots


def discover(paths: list[str | Path]) -> Discovery:
    """Expand files and folders (recursively, symlink loops cut) into the supported files, in order.

    Files are returned by their resolved real path, which the index identifies them by.
    """
    files, skipped, seen = [], [], set()
    for root in roots(paths):
        candidates = _walk(root) if root.is_dir() else [root]
        for path in candidates:
            try:
                real = path.resolve()
            except (OSError, RuntimeError):  # Python before 3.13 raises RuntimeError on a loop
                skipped.append((path, "a loop of symbolic links"))
                continue
            if real in seen:
                continue
            seen.add(real)
            if path.suffix.lower() not in TEXT_SUFFIXES | JSON_SUFFIXES:
                skipped.append((path, f"unsupported file type '{path.suffix or '(none)'}'"))
            elif not path.is_file():  # reading a pipe or a device would block or never end
                skipped.append((path, "not a regular file" if path.exists() else "a broken symbolic link"))
            else:
                files.append(real)  # one file, however the path to it was spelt
    return Discovery(files, skipped)


def _walk(root: Path) -> list[Path]:
    out, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop, or a folder reached twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return out


def read(path: Path, max_mb: float = MAX_FILE_MB) -> bytes:
    """A file's bytes; a file over `max_mb` is refused before it is read."""
    size = path.stat().st_size
    if size > max_mb * 2**20:
        raise RagcacheError(f"{size / 2**20:.1f} MB, over the {max_mb:g} MB limit", param="max_file_mb")
    return path.read_bytes()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse(path: Path, data: bytes) -> tuple[list[Document], list[str]]:
    """Documents in one file's bytes, and warnings for the records that were skipped.

    Raises RagcacheError when the file as a whole cannot be read as text.
    """
    if b"\x00" in data[:8192]:
        raise RagcacheError("binary content")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RagcacheError(f"not UTF-8 (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return ([Document(path.stem, _md_title(text) if suffix == ".md" else "", text)] if text.strip() else []), []
    if suffix == ".jsonl":
        docs, warnings = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                warnings.append(f"{path}:{n}: not valid JSON, line skipped")
                continue
            _add_record(record, f"{path.stem}:{n}", docs, warnings, f"{path}:{n}")
        return docs, warnings
    try:
        data = json.loads(text)
    except ValueError as e:
        raise RagcacheError(f"not valid JSON ({e})") from None
    docs, warnings = [], []
    for n, record in enumerate(data if isinstance(data, list) else [data]):
        _add_record(record, f"{path.stem}:{n}", docs, warnings, f"{path}[{n}]")
    return docs, warnings


def _add_record(record, default_id: str, docs: list[Document], warnings: list[str], where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        warnings.append(f"{where}: record has no 'text' string, skipped")
        return
    if not record["text"].strip():
        return
    doc_id = record.get("_id", record.get("id", default_id))
    docs.append(Document(str(doc_id), str(record.get("title") or ""), record["text"]))


def _md_title(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""
