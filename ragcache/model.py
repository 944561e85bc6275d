"""GritModel: one set of decoder weights that embeds (bidirectional attention) and generates (causal).

The attention kind is chosen per call by the 4D mask we hand the decoder, so switching costs nothing
and never reloads weights. Every forward here takes explicit position ids and an explicit mask: the
engine places cached segments at arbitrary offsets and needs the model to do exactly what it is told.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import adapter, config, prompts
from . import kv as kvlib
from .adapter import padded_allowed
from .errors import RagcacheError
from .meta import ModelIdentity
from .progress import bar
from .vocab import Attention

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RagcacheError("device cuda was asked for, but no CUDA device is available", param="device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise RagcacheError(f"unknown device '{device}': use auto, cpu or cuda", param="device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise RagcacheError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16", param="dtype")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass
class Encoded:
    """One text after an embedding pass: its formatted tokens, pooled vector and optional KV."""

    token_ids: list[int]
    embedding: np.ndarray | None  # (dim,) float32, L2-normalised; None when the pass did not embed
    kv: torch.Tensor | None  # (layers, 2, kv_heads, tokens, head_dim), on the CPU


def gguf_folder(path: Path) -> Path:
    """The model folder a GGUF file converts to, under the ragcache home; converted on first use only.

    Dequantising takes tens of seconds; the folder then loads in seconds. The folder is named by the
    file's path, size and modification time, so a replaced file is converted again.
    """
    if not path.is_file():
        raise RagcacheError(f"no GGUF file at '{path}'", param="model")
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = config.home() / "models" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise RagcacheError("reading a GGUF model needs the gguf package: pip install 'ragcache[gguf]'",
                            param="model")
    log.info(f"converting {path} once into {folder} …")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        adapter.convert_gguf(path, work)
        work.replace(folder)  # whole or not at all: a killed conversion leaves no half folder behind
    except (OSError, ValueError) as e:
        raise RagcacheError(f"cannot read the GGUF model '{path}': {str(e).splitlines()[0]}", param="model") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def weights_fingerprint(hf, tokenizer, extra: object = None) -> str:
    """Hash of a model's config, tokenizer, `extra` (JSON) and a strided sample of every weight.

    Weights are rounded to bfloat16 first, so the same model loaded in float32 or bfloat16 hashes alike.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in hf.config.to_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token]).encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    for name, p in sorted(hf.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 512)][:512].to(torch.bfloat16).float().cpu().numpy()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.tobytes())
    return h.hexdigest()[:16]


class GritModel:
    def __init__(self, hf, tokenizer, name: str):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.lm_head = hf.get_output_embeddings()
        inv_freq = adapter.rotary_inv_freq(hf)
        if inv_freq is None:
            raise RagcacheError(f"model '{name}' has no rotary position embedding; ragcache needs one to move "
                                "cached keys", param="model")
        self.inv_freq = inv_freq
        param = next(hf.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_id = tokenizer.eos_token_id
        self.max_context = int(getattr(hf.config, "max_position_embeddings", 0) or 1 << 20)
        self._fingerprint: str | None = None
        self._head: tuple[str, Encoded] | None = None  # the chat style's head and its KV, computed once

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str = config.DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> "GritModel":
        """Load from a local directory, a GGUF file or a hub id; the hub being out of reach is a one-line error."""
        if name_or_path.lower().endswith(".gguf"):
            gguf = Path(name_or_path).expanduser().resolve()
            model = cls.load(str(gguf_folder(gguf)), device=device, dtype=dtype)
            model.name = str(gguf)  # what an index records, and loads again
            return model
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        path = Path(name_or_path).expanduser()
        looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1
        if looks_local and not path.is_dir():
            raise RagcacheError(f"no model directory at '{name_or_path}'", param="model")
        source = str(path) if path.is_dir() else name_or_path
        log.info(f"loading model {source} …")
        try:
            tokenizer, hf = adapter.load_causal_lm(source, torch_dtype,
                                                   local_only=path.is_dir() or not _hub_reachable())
        except (OSError, ValueError) as e:
            if path.is_dir():
                raise RagcacheError(f"cannot load the model in '{source}': {str(e).splitlines()[0]}",
                                    param="model") from None
            raise RagcacheError(
                f"cannot load '{name_or_path}': the Hugging Face hub cannot be reached (or has no such model) "
                "and it is not in the local cache; give a local model directory instead", param="model") from None
        if not tokenizer.is_fast:
            raise RagcacheError(f"model '{name_or_path}' has no fast tokenizer; ragcache needs token offsets to "
                                "chunk text", param="model")
        return cls(hf.to(device), tokenizer, str(path.resolve()) if path.is_dir() else name_or_path)

    def fingerprint(self) -> str:
        """Hash of config, tokenizer and a strided sample of every weight (dtype-independent)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.hf, self.tokenizer)
        return self._fingerprint

    def identity(self) -> ModelIdentity:
        """What an index records of the model that made its caches."""
        cfg = self.hf.config
        return ModelIdentity(self.name, self.fingerprint(), dtype_name(self.dtype), cfg.num_hidden_layers,
                             getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def grit_trained(self) -> bool:
        """Whether the model was trained to embed (GRIT): `<|embed|>` in its vocabulary or chat template,
        or a GritLM model by name. Others can generate from caches, but their own embeddings retrieve poorly."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return ("<|embed|>" in self.tokenizer.get_vocab() or "<|embed|>" in str(template)
                or "gritlm" in self.name.lower())

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take, every layer: (layers, 2, kv_heads, 1, head_dim) in the dtype."""
        cfg = self.hf.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_hidden_layers * 2 * heads * head_dim * self.dtype.itemsize

    @property
    def dim(self) -> int:
        """The embedding dimension: the decoder's hidden size."""
        return self.hf.config.hidden_size

    # ---- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as written: special tokens in it (like <s>) count, none are added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def embed_tokens(self, text: str, instruction: str = "") -> tuple[list[int], int]:
        """Tokens of the embedding prompt, and where the pooled text begins (prompts.embed_tokens)."""
        return prompts.embed_tokens(self.tokenizer, text, instruction)

    # ---- forward passes ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None, cache=None):
        """Run the decoder. ids/positions (b, q); allowed (b, q, past+q) or None for 'see everything'.

        Returns the last hidden states (b, q, hidden) and the cache, which now holds past+q tokens.
        """
        return adapter.run_decoder(self.hf, ids, positions, allowed, cache, self.dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def encode(self, texts: list[str], instruction: str = "", kv: Attention | None = None,
               batch_size: int = 8, progress=None, embed: bool = True) -> list[Encoded]:
        """Embedding pass over `texts`, batched by length; optionally the KV of each text's tokens.

        kv=None: no cache kept. kv="bidirectional": the cache of the embedding pass itself.
        kv="causal": a second, causal pass over the same tokens for an exact generation cache.
        embed=False (a separate embedder retrieves): no embedding, and with kv="causal" only the causal pass.
        Every returned KV covers exactly its sequence's tokens: padding is cut off before it leaves.
        """
        toks = [self.embed_tokens(t, instruction) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(toks[i][0]))
        results: list[Encoded | None] = [None] * len(texts)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            lengths = [len(toks[i][0]) for i in rows]
            ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[r]] = torch.tensor(toks[i][0])
            ids = ids.to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            bidirectional = embed or kv == "bidirectional"
            hidden, cache = self.forward(ids, positions, padded_allowed(lengths, bidirectional, self.device))
            if kv == "causal" and bidirectional:
                _, cache = self.forward(ids, positions, padded_allowed(lengths, False, self.device))
            for r, i in enumerate(rows):
                start, n = toks[i][1], lengths[r]
                vector = None
                if embed:
                    pooled = hidden[r, start:n].float().mean(0) if n > start else torch.zeros(hidden.shape[-1])
                    vector = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)
                seq_kv = adapter.from_cache(cache, r, n) if kv else None
                results[i] = Encoded(toks[i][0], vector, seq_kv)
            if progress is not None:
                progress(len(rows))
        return results  # type: ignore[return-value]

    def segment_tokens(self, text: str, frame: prompts.Frame, role: str = "doc") -> list[int]:
        """The tokens of `text`'s cached segment (a chunk's passage, or the question) in `frame`'s style."""
        return prompts.segment_tokens(self.tokenizer, frame, text, role)

    @torch.inference_mode()
    def encode_segments(self, texts: list[str], frame: prompts.Frame, kv: Attention, role: str = "doc",
                        batch_size: int = 8) -> list[Encoded]:
        """The tokens and KV of each text's cached segment as `frame` reads it; no embedding.

        grit: the embedding prompt's pass. chat: the segment computed after the frame's head, whose
        tokens it sees whole, with its own tokens seen as `kv` says. The head's KV is computed once and
        read as every row's past: for a question it would otherwise be most of the pass. Keys are turned
        back to positions 0.., as every stored KV is held.
        """
        if frame.style == "grit":
            return self.encode(texts, kv=kv, batch_size=batch_size, embed=False)
        head = self.head_kv(frame)
        after = len(head.token_ids)
        toks = [self.segment_tokens(t, frame, role) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(toks[i]))
        results: list[Encoded | None] = [None] * len(texts)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            lengths = [len(toks[i]) for i in rows]
            ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[r]] = torch.tensor(toks[i])
            ids = ids.to(self.device)
            positions = torch.arange(after, after + ids.shape[1], device=self.device).expand_as(ids)
            allowed = torch.ones(len(rows), ids.shape[1], after + ids.shape[1], dtype=torch.bool, device=self.device)
            allowed[:, :, after:] = padded_allowed(lengths, kv == "bidirectional", self.device)  # (b, q, head + q)
            _, cache = self.forward(ids, positions, allowed, adapter.prefix_cache(head.kv, len(rows)))
            for r, i in enumerate(rows):
                seg_kv = adapter.from_cache(cache, r, lengths[r], start=after)  # (layers, 2, kv_heads, n, head_dim)
                seg_kv[:, 0] = kvlib.rotate_keys(seg_kv[:, 0], -after, self.inv_freq)
                results[i] = Encoded(toks[i], None, seg_kv)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def head_kv(self, frame: prompts.Frame) -> Encoded:
        """The tokens and causal KV of the chat style's head, from position 0: computed once per head text."""
        if self._head is None or self._head[0] != frame.head:
            ids = self.tokenize(frame.head)
            n = len(ids)
            _, cache = self.forward(torch.tensor([ids], device=self.device),
                                    torch.arange(n, device=self.device)[None], padded_allowed([n], False, self.device))
            self._head = (frame.head, Encoded(ids, None, adapter.from_cache(cache, 0, n)))
        return self._head[1]

    def embed(self, texts: list[str] | str, instruction: str = "", batch_size: int = 8,
              show_progress_bar: bool = False, convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """L2-normalised embeddings, shape (n, dim), float32 numpy by default."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        with bar(show_progress_bar, "embedding", total=len(texts)) as advance:
            vectors = [e.embedding for e in self.encode(texts, instruction, None, batch_size, progress=advance)]
        out = np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        out = out[0] if single else out
        return out if convert_to_numpy else torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"GritModel({self.name!r}, device={self.device}, dtype={dtype_name(self.dtype)})"

