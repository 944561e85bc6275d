"""What an index records about itself, every format version, and the one compatibility check.

The index's `meta` record (store.py) is an IndexMeta as JSON. An index is opened only when each
format it was written in is the one this ragcache reads, and only with the model (and embedder) that
made its caches and vectors: the check lives here, nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .errors import RagcacheError
from .prompts import PROMPT_FORMAT
from .vocab import VECTOR_INDEXES, Attention, Style, VectorIndex

STORE_FORMAT = 3  # the LMDB databases and their records (store.py); 3: files commit in batches ("complete")
KV_FORMAT = 3  # the KV blob header (kv.py); 3: quantised codecs, the checksum over the stored bytes
VECTORS_FORMAT = 1  # the FAISS view and its stamp file (vectors.py)


@dataclass(frozen=True)
class ModelIdentity:
    """The generator whose caches an index holds: they are valid for it alone, in this dtype."""

    name: str
    fingerprint: str
    dtype: str
    layers: int
    kv_heads: int


@dataclass(frozen=True)
class EmbedderIdentity:
    """A separate retrieval encoder (the two-model baseline): where it lives and what it is."""

    name: str
    fingerprint: str
    dim: int
    max_tokens: int


@dataclass
class IndexMeta:
    model: ModelIdentity
    dim: int  # the retrieval vectors' dimension
    chunk_tokens: int
    kv_attention: Attention
    embedder: EmbedderIdentity | None = None  # None: the model embeds for retrieval itself
    # how KV blobs are stored: "fp8", "int8" or "int4" (quantised), or losslessly: "auto" until the
    # first batch's probe records "raw" or "zstd" (what `--kv-codec raw` asks for)
    kv_codec: str = "auto"
    layout: Style = "grit"  # how cached segments are laid out and computed (prompts.Frame)
    preamble: str = ""  # the chat style's context preamble, which every chunk's cache was computed after
    kv_store: str | None = None  # an s3:// URL holding the KV blobs (kvremote.py); None: in the index's LMDB
    vector_index: VectorIndex = "flat"  # the FAISS view's kind (vectors.py): exact, or IVF-PQ re-ranked exactly
    format_version: int = STORE_FORMAT
    kv_format_version: int = KV_FORMAT
    vectors_format_version: int = VECTORS_FORMAT
    prompt_format: str = PROMPT_FORMAT
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict:
        d = asdict(self)
        if self.embedder is None:
            del d["embedder"]
        return d

    @classmethod
    def from_json(cls, data: dict, where: str) -> "IndexMeta":
        """Parse a stored record; the format check comes first, so a future layout gets 'upgrade', not a crash."""
        check_format(data, where)
        if data.get("vector_index", "flat") not in VECTOR_INDEXES:
            raise RagcacheError(f"index '{where}' uses vector index '{data['vector_index']}', which this ragcache "
                                "does not know; upgrade ragcache")
        try:
            embedder = data.get("embedder")
            return cls(model=ModelIdentity(**data["model"]), dim=data["dim"], chunk_tokens=data["chunk_tokens"],
                       kv_attention=data["kv_attention"],
                       embedder=EmbedderIdentity(**embedder) if embedder else None,
                       kv_codec=data.get("kv_codec", "auto"), layout=data.get("layout", "grit"),
                       preamble=data.get("preamble", ""), kv_store=data.get("kv_store"),
                       vector_index=data.get("vector_index", "flat"),
                       format_version=data["format_version"], kv_format_version=data["kv_format_version"],
                       vectors_format_version=data.get("vectors_format_version", VECTORS_FORMAT),
                       prompt_format=data["prompt_format"], created=data.get("created", ""))
        except (KeyError, TypeError) as e:
            raise RagcacheError(f"index '{where}' has a damaged description ({e}); rebuild it") from None

    def check_model(self, model: ModelIdentity, where: str) -> None:
        """Stored caches are valid only for the exact model and dtype that made them."""
        built = self.model
        if built.fingerprint != model.fingerprint:
            raise RagcacheError(f"index '{where}' was built by model '{built.name}' (fingerprint {built.fingerprint}), "
                                f"not by '{model.name}' (fingerprint {model.fingerprint}); its caches are only valid "
                                "for the model that made them: use that model or build a new index", param="model")
        if built.dtype != model.dtype:
            raise RagcacheError(f"index '{where}' holds {built.dtype} caches; load the model in {built.dtype}",
                                param="dtype")

    def check_embedder(self, embedder: EmbedderIdentity | None, where: str) -> None:
        """The retrieval vectors are valid only for the encoder that made them."""
        recorded = self.embedder
        if recorded is None:
            if embedder is not None:
                raise RagcacheError(f"index '{where}' retrieves with its model's own embeddings; build a new "
                                    "index to use a separate embedder", param="embedder")
            return
        if embedder is not None and embedder.fingerprint != recorded.fingerprint:
            raise RagcacheError(f"index '{where}' was built with embedder '{recorded.name}' (fingerprint "
                                f"{recorded.fingerprint}), not '{embedder.name}' (fingerprint {embedder.fingerprint}); "
                                "its vectors are only valid for that embedder: use it or build a new index",
                                param="embedder")


def check_format(data: dict, where: str) -> None:
    """Every format the index was written in must be this ragcache's: newer says upgrade, older rebuild."""
    for name, ours in (("format_version", STORE_FORMAT), ("kv_format_version", KV_FORMAT),
                       ("vectors_format_version", VECTORS_FORMAT)):
        theirs = data.get(name, VECTORS_FORMAT if name == "vectors_format_version" else 0)
        if not isinstance(theirs, int):
            raise RagcacheError(f"index '{where}' has a damaged description ({name}); rebuild it")
        if theirs > ours:
            raise RagcacheError(f"index '{where}' has {name.replace('_', ' ')} {theirs}, newer than this ragcache "
                                f"({ours}); upgrade ragcache")
        if theirs < ours:
            raise RagcacheError(f"index '{where}' has {name.replace('_', ' ')} {theirs}, older than this ragcache "
                                f"({ours}); rebuild it with ragcache index")
    if data.get("prompt_format") != PROMPT_FORMAT:
        raise RagcacheError(f"index '{where}' uses prompt format {data.get('prompt_format')}, not {PROMPT_FORMAT}; "
                            "its caches were computed over other tokens: rebuild it with ragcache index")
