"""A separate sentence-transformers encoder for retrieval: the traditional two-model baseline.

The folder is read with plain transformers, the way sentence-transformers runs it: modules.json lists
a Transformer, a Pooling module and optionally Normalize; the pooling folder's config.json names the
pooling; sentence_bert_config.json gives max_seq_length (longer texts are truncated, as
sentence-transformers does) and do_lower_case. Vectors are always L2-normalised, because the index
scores by inner product: for them that is the cosine similarity such models are scored with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from .errors import RagcacheError
from .meta import EmbedderIdentity
from .model import resolve_device, weights_fingerprint

POOLINGS = ("cls", "max", "mean", "mean_sqrt_len")  # concatenated in this order, as sentence-transformers does
_MODULES = ("Transformer", "Pooling", "Normalize")


class Embedder:
    def __init__(self, hf, tokenizer, name: str, pooling: list[str], max_tokens: int, lowercase: bool):
        self.hf, self.tokenizer, self.name = hf.eval(), tokenizer, name
        self.pooling, self.max_tokens, self.lowercase = pooling, max_tokens, lowercase
        self.device = next(hf.parameters()).device
        self.dim = hf.config.hidden_size * len(pooling)
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Embedder":
        """Load a local sentence-transformers folder; anything else is a one-line error."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise RagcacheError(f"no embedder directory at '{path}'", param="embedder")
        modules = _read_json(root / "modules.json", f"'{path}' is not a sentence-transformers folder")
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise RagcacheError(f"'{root / 'modules.json'}' is not a list of modules")
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: root / m.get("path", "") for m in modules}
        unknown = set(kinds) - set(_MODULES)
        if unknown or "Transformer" not in kinds or "Pooling" not in kinds:
            raise RagcacheError(f"embedder '{path}' needs a Transformer and a Pooling module (and at most Normalize); "
                                f"it has {', '.join(kinds) or 'none'}")
        pooling = _pooling(_read_json(kinds["Pooling"] / "config.json", f"embedder '{path}' has no pooling config"), path)
        body = kinds["Transformer"]
        logging.getLogger(__name__).info(f"loading embedder {root} …")
        settings = _read_json(body / "sentence_bert_config.json", None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(body, local_files_only=True)
            hf = AutoModel.from_pretrained(body, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RagcacheError(f"cannot load the embedder in '{path}': {str(e).splitlines()[0]}") from None
        limit = min(tokenizer.model_max_length, getattr(hf.config, "max_position_embeddings", None) or 1 << 20)
        max_tokens = int(settings.get("max_seq_length") or limit)
        return cls(hf.to(resolve_device(device)), tokenizer, str(root.resolve()), pooling, max_tokens,
                   bool(settings.get("do_lower_case", False)))

    def fingerprint(self) -> str:
        """Weights, tokenizer and everything that shapes a vector: pooling, truncation, lowercasing."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.hf, self.tokenizer,
                                                    [self.pooling, self.max_tokens, self.lowercase])
        return self._fingerprint

    def identity(self) -> EmbedderIdentity:
        """What an index records to find and check this embedder again."""
        return EmbedderIdentity(self.name, self.fingerprint(), self.dim, self.max_tokens)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings, (n, dim) float32; each text cut to max_tokens tokens."""
        texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths pad little
        out = np.zeros((len(texts), self.dim), np.float32)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation="longest_first",
                                   max_length=self.max_tokens, return_tensors="pt").to(self.device)
            hidden = self.hf(**batch).last_hidden_state.float()
            pooled = _pool(hidden, batch["attention_mask"], self.pooling)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: list[str]) -> torch.Tensor:
    mask = mask[..., None].to(hidden.dtype)
    counts = mask.sum(1).clamp(min=1e-9)
    parts = {"cls": lambda: hidden[:, 0],
             "max": lambda: hidden.masked_fill(mask == 0, -1e9).max(1).values,
             "mean": lambda: (hidden * mask).sum(1) / counts,
             "mean_sqrt_len": lambda: (hidden * mask).sum(1) / counts.sqrt()}
    return torch.cat([parts[p]() for p in pooling], dim=-1)


def _pooling(config: dict, path) -> list[str]:
    unsupported = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if config.get(k)]
    chosen = [p for p in POOLINGS if config.get(f"pooling_mode_{p}_token" if p == "cls" else f"pooling_mode_{p}_tokens")]
    if unsupported or not chosen:
        raise RagcacheError(f"embedder '{path}': pooling must be among {', '.join(POOLINGS)}")
    return chosen


def _read_json(path: Path, missing: str | None):
    """The JSON in `path`; a missing file is an error saying `missing`, or {} when missing is None."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing is None:
            return {}
        raise RagcacheError(f"{missing} (no {path.name})") from None
    except (OSError, ValueError) as e:
        raise RagcacheError(f"cannot read '{path}': {e}") from None
