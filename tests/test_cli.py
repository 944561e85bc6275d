"""The CLI as a user runs it: one-line errors with a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
from conftest import Served
from typer.testing import CliRunner

from ragcache.cli import app

runner = CliRunner()


def run(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def index(tmp_path_factory, model_dir, corpus_dir):
    path = tmp_path_factory.mktemp("cli") / "idx"
    result = run("index", corpus_dir, "-i", path, "-m", model_dir, "--verbose")
    assert result.exit_code == 0, result.output
    assert "indexed 4 files" in result.output and "1 skipped" in result.output
    assert "image.png" in result.output  # --verbose names the skipped file and why
    return path


def test_index_again_is_a_no_op(index, corpus_dir):
    result = run("index", corpus_dir, "-i", index, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["files_unchanged"] == 4


@pytest.mark.parametrize("mode", ["none", "rag", "query", "doc", "query-doc", "doc-query"])
def test_ask_every_mode(index, mode):
    result = run("ask", "What is the capital of France?", "-i", index, "--mode", mode, "-k", "2",
                 "--max-new-tokens", "4", "--explain")
    assert result.exit_code == 0, result.output
    assert "Layout:" in result.output
    if mode != "none":
        assert "Sources:" in result.output and "score" in result.output


def test_ask_json(index):
    result = run("ask", "Where is Berlin?", "-i", index, "--json", "-k", "1", "--max-new-tokens", "3",
                 "--mode", "rag", "--order", "query-first")
    out = json.loads(result.stdout)
    assert len(out["sources"]) == 1 and out["layout"][0]["kind"] == "query"


def test_templates_override(index, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"answer_prefix": "Answer:"}))
    result = run("ask", "Where is Berlin?", "-i", index, "--json", "--templates", tmp_path / "t.json",
                 "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    (tmp_path / "bad.json").write_text(json.dumps({"nonsense": 1}))
    result = run("ask", "Where?", "-i", index, "--templates", tmp_path / "bad.json")
    assert result.exit_code == 1 and "keys among" in result.output


@pytest.mark.parametrize("args, message", [
    (["ask", "", ], "question is empty"),
    (["ask", "q", "--mode", "bogus"], "unknown mode"),
    (["ask", "q", "-k", "0"], "top-k must be at least 1"),
    (["ask", "q", "-k", "-3"], "top-k must be at least 1"),
    (["ask", "q", "--order", "up"], "unknown order"),
    (["ask", "q", "--chunk-order", "worst-first"], "unknown chunk order"),
])
def test_bad_ask_input(index, args, message):
    result = run(*args, "-i", index)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_paths(tmp_path, model_dir, corpus_dir):
    result = run("index", tmp_path / "missing", "-i", tmp_path / "idx", "-m", model_dir)
    assert result.exit_code == 1 and "no such file or folder" in result.output
    assert not (tmp_path / "idx" / "data.mdb").exists()
    (tmp_path / "afile").write_text("x")
    result = run("index", corpus_dir, "-i", tmp_path / "afile", "-m", model_dir)
    assert result.exit_code == 1 and "is a file" in result.output
    result = run("ask", "q", "-i", tmp_path / "nothing")
    assert result.exit_code == 1 and "no index at" in result.output
    result = run("index", corpus_dir, "-i", tmp_path / "idx2", "-m", tmp_path / "no-model")
    assert result.exit_code == 1 and "no model directory" in result.output


def test_info_prints_the_home(index, tmp_path):
    result = run("info", "-i", index, env={"RAGCACHE_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0
    assert str(tmp_path / "home") in result.output and "chunks" in result.output
    out = json.loads(run("info", "-i", index, "--json").stdout)
    assert out["index_info"]["chunks"] > 0


def test_console_script_from_a_fresh_shell(index):
    """The installed `ragcache` command, in a subprocess, as a user runs it."""
    env = dict(os.environ, RAGCACHE_INDEX=str(index))
    proc = subprocess.run([sys.executable, "-m", "ragcache.cli", "ask", "Where is Berlin?", "--max-new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Sources:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ragcache.cli", "ask", "q", "--mode", "x"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: unknown mode 'x': use one of none, rag, query, doc, query-doc, doc-query"


def test_serve_bad_input(index, tmp_path):
    result = run("serve", "-i", tmp_path / "nothing")
    assert result.exit_code == 1 and "no index at" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = run("serve", "-i", index, "--max-tokens-limit", "0")
    assert result.exit_code == 1 and "limit must be at least 1" in result.output


def test_serve_from_a_fresh_shell(index):
    """`ragcache serve` listens, takes its key from RAGCACHE_API_KEY, and stops on a signal."""
    server = Served(index, {"RAGCACHE_API_KEY": "from-env"})
    try:
        server.wait_ready()
        assert server.request("/v1/models")[0] == 401
        status, models = server.request("/v1/models", key="from-env")
        assert status == 200 and models["data"][0]["max_model_len"] == 4096
    finally:
        server.stop()
