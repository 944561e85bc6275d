"""`ragcache verify`: every kind of damage found, and --repair mending what can be mended."""

import json

from conftest import damage_kv

from ragcache import RagCache
from ragcache.store import key
from ragcache.verify import verify

QUESTION = "What is the capital of France?"


def test_verify_finds_every_kind_of_damage_and_repair_mends_it(tmp_path, model, corpus_dir, capsys):
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        assert verify(rc).ok and not verify(rc).problems
        before = rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=6, ignore_eos=True)
        ids = sorted(rc.store.embeddings()[0].tolist())
        files = rc.store.files()
        lost = next(source for source, rec in files.items() if len(rec.chunks) == 1)  # loses its only chunk
        lost_id = files[lost].chunks[0]
        flip, cut, junk, no_emb = [i for i in ids if i != lost_id][:4]
        retok = ids[-1]  # its record's tokens no longer match its text, so its cache cannot be recomputed
        owner = {cid: source for source, rec in files.items() for cid in rec.chunks}
        assert owner[retok] not in {owner[i] for i in (lost_id, flip, cut, junk, no_emb)}
        for cid, how in ((flip, "flip"), (cut, "truncate"), (junk, "header")):
            damage_kv(rc, cid, how)
        record = rc.store.chunk(retok)
        with rc.store.env.begin(write=True) as txn:
            txn.delete(key(no_emb), db=rc.store.db["emb"])
            txn.delete(key(lost_id), db=rc.store.db["chunks"])
            txn.put(key(999), json.dumps(record.to_json() | {"text": "stray", "token_ids": [1]}).encode(), db=rc.store.db["chunks"])
            txn.put(key(retok), json.dumps(record.to_json() | {"token_ids": record.token_ids + [5]}).encode(),
                    db=rc.store.db["chunks"])

        found = {(p.chunk_id, p.part) for p in verify(rc).problems}
        assert found == {(flip, "kv"), (cut, "kv"), (junk, "kv"), (no_emb, "embedding"), (lost_id, "record"),
                         (retok, "kv"), (999, "embedding"), (999, "kv"), (999, "file"), (None, "faiss")}
        report = verify(rc, repair=True)
        assert not report.ok  # two files must be read again
        left = [p for p in report.problems if not p.repaired]
        assert [p.chunk_id for p in left] == [lost_id, retok]
        assert all("run ragcache index on it" in p.fix for p in left)
        assert not rc.store.writing  # repair let go of the writer lock
        assert rc.index([corpus_dir]).files_indexed == 2
        assert verify(rc).ok and not verify(rc).problems
        capsys.readouterr()
        after = rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=6, ignore_eos=True)
        assert "damaged" not in capsys.readouterr().err  # mended on disk, not recomputed on the fly
        assert after.token_ids == before.token_ids


def test_verify_cli(tmp_path, model, model_dir, corpus_dir):
    from typer.testing import CliRunner

    from ragcache.cli import app
    idx = tmp_path / "idx"
    with RagCache.open(idx, model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        cid = rc.store.embeddings()[0][0]
        damage_kv(rc, int(cid), "flip")
    runner = CliRunner()
    result = runner.invoke(app, ["verify", "-i", str(idx)])
    assert result.exit_code == 1
    assert f"chunk {cid}: kv: KV blob fails its checksum" in result.output
    result = runner.invoke(app, ["verify", "-i", str(idx), "--repair", "--json"])
    out = json.loads(result.stdout)
    assert result.exit_code == 0 and out["ok"] and {p["chunk_id"] for p in out["problems"]} == {cid, None}
    result = runner.invoke(app, ["verify", "-i", str(idx)])
    assert result.exit_code == 0 and result.stdout.strip().endswith("no problems")
    other = tmp_path / "other"
    from conftest import build_model
    build_model(other, seed=7)
    result = runner.invoke(app, ["verify", "-i", str(idx), "-m", str(other)])
    said = [line for line in result.output.strip().splitlines() if not line.startswith("loading ")]
    assert result.exit_code == 1 and "fingerprint" in result.output and len(said) == 1
