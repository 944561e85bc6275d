"""`ragcache serve` through the real `openai` client, on 127.0.0.1, with the tiny random-weight model."""

import base64
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import uvicorn

from ragcache import RagCache
from ragcache.server import Limits, StopText, create_app
from ragcache.vocab import MODES

KEY = "test-key"
LIMITS = Limits(max_body_bytes=64 * 1024, max_input_count=8, max_tokens=4000, max_top_k=4)
QUESTION = "What is the capital of France?"


@contextlib.contextmanager
def _serve(rc: RagCache):
    """A live server on a free port of 127.0.0.1, over `rc`."""
    app = create_app(rc, api_key=KEY, limits=LIMITS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    try:
        yield type("Served", (), {"base": base, "client": client, "rc": rc, "model": rc.model.name, "app": app})
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model, corpus_dir):
    """The server over a small index."""
    rc = RagCache.open(tmp_path_factory.mktemp("serve") / "idx", model=model)
    rc.index([corpus_dir])
    with _serve(rc) as served:
        yield served
    rc.close()


def test_two_model_index_serves_its_embedder(tmp_path, model, embedder_dir, corpus_dir):
    from ragcache.embedder import Embedder
    embedder = Embedder.load(embedder_dir)
    with RagCache.open(tmp_path / "idx", model=model, embedder=embedder) as rc:
        rc.index([corpus_dir])
        with _serve(rc) as served:
            got = served.client.embeddings.create(model=served.model, input=["water", "river city"])
            assert np.allclose([d.embedding for d in got.data], embedder.embed(["water", "river city"]), atol=1e-5)
            status, body = raw(served, "/v1/embeddings", json.dumps(
                {"model": served.model, "input": "x", "instruction": "Retrieve"}).encode())
            assert status == 400 and body["error"]["param"] == "instruction"
            answer = served.client.chat.completions.create(model=served.model, max_tokens=4,
                                                           messages=[{"role": "user", "content": QUESTION}],
                                                           extra_body={"rag": {"mode": "doc", "top_k": 1}})
            assert answer.choices[0].message.content


def raw(served, path, body: bytes | None = None, key: str | None = KEY):
    """(status, parsed JSON) of one request made without the openai client."""
    headers = ({"Authorization": f"Bearer {key}"} if key else {}) | {"Content-Type": "application/json"}
    req = urllib.request.Request(served.base + path, data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(served, content: str = QUESTION, **kwargs):
    return served.client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": content}],
                                                 **kwargs)


def ask_engine(served, question, **kwargs):
    with served.app.state.service.lock:  # the model is the server's: take turns with it
        return served.rc.ask(question, **kwargs)


# ---- models, health -----------------------------------------------------------------------------------
def test_models_and_health(served):
    models = served.client.models.list()
    assert models.object == "list" and len(models.data) == 1
    card = models.data[0]
    assert (card.id, card.object, card.owned_by) == (served.model, "model", "ragcache")
    assert card.created > 0 and card.max_model_len == 4096
    assert served.client.models.retrieve(served.model).id == served.model
    assert raw(served, "/health", key=None) == (200, {"status": "ok", "model": served.model, "busy": False,
                                                   "kv_tiers": {}})  # no memory tiers: the store alone


# ---- embeddings ---------------------------------------------------------------------------------------
def test_embeddings_float_and_base64(served, model):
    texts = ["Paris is the capital of France.", "A spider has eight legs."]
    floats = served.client.embeddings.create(model=served.model, input=texts, encoding_format="float")
    b64 = served.client.embeddings.create(model=served.model, input=texts, encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1] and floats.object == "list" and floats.model == served.model
    as_floats = np.array([d.embedding for d in floats.data], dtype=np.float32)
    as_bytes = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data])
    assert np.array_equal(as_floats, as_bytes)
    assert np.allclose(as_floats, model.embed(texts), atol=1e-5)
    tokens = sum(len(model.embed_tokens(t)[0]) for t in texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    default = served.client.embeddings.create(model=served.model, input=texts[0])  # the client asks for base64
    assert np.allclose(default.data[0].embedding, as_floats[0], atol=1e-6)


def test_embeddings_token_ids_dimensions_instruction(served, model):
    text = "Berlin is the capital of Germany."
    full = served.client.embeddings.create(model=served.model, input=text, encoding_format="float")
    full = np.array(full.data[0].embedding)
    ids = model.tokenize(text)
    for given in (ids, [ids, ids]):
        out = served.client.embeddings.create(model=served.model, input=given, encoding_format="float")
        assert all(np.allclose(d.embedding, full, atol=1e-5) for d in out.data)
    short = served.client.embeddings.create(model=served.model, input=text, dimensions=16, encoding_format="float")
    short = np.array(short.data[0].embedding)
    assert short.shape == (16,) and abs(np.linalg.norm(short) - 1) < 1e-5
    assert np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-5)
    instructed = served.client.embeddings.create(model=served.model, input=text, encoding_format="float",
                                                 extra_body={"instruction": "Represent the fact"})
    expected = model.embed([text], instruction="Represent the fact")[0]
    assert np.allclose(instructed.data[0].embedding, expected, atol=1e-5)
    assert not np.allclose(expected, full, atol=1e-3)


# ---- chat ---------------------------------------------------------------------------------------------
def test_chat_plain_streamed_and_not(served, model):
    reply = chat(served, max_tokens=6, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == served.model and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.message.content
    prompt = model.tokenize(f"<s><|user|>\n{QUESTION}\n<|assistant|>\n")  # GRIT's generation format
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt), 6, len(prompt) + 6)
    assert not hasattr(reply, "sources")  # only RAG replies cite

    chunks = list(chat(served, max_tokens=6, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    first, *content, last, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == first.id for c in chunks)
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in content)
    assert "".join(c.choices[0].delta.content for c in content) == choice.message.content
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    assert usage_chunk.choices == [] and usage_chunk.usage == usage
    assert all(c.usage is None for c in chunks[:-1])

    no_usage = list(chat(served, max_tokens=2, stream=True))
    assert no_usage[-1].choices[0].finish_reason is not None


def test_conversation_turns(served, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]  # text parts, as the client may send
    reply = served.client.chat.completions.create(model=served.model, messages=messages, max_tokens=2)
    prompt = model.tokenize("<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello</s>\n"
                            "<|user|>\nBye\n<|assistant|>\n")
    assert reply.usage.prompt_tokens == len(prompt)


def test_sse_framing(served):
    body = json.dumps({"model": served.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                       "stream": True}).encode()
    req = urllib.request.Request(served.base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = resp.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_strings_and_finish_reason(served):
    full = chat(served, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    reply = chat(served, max_tokens=12, stop=[stop, "never-there"], extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 12
    chunks = list(chat(served, max_tokens=12, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_text_holds_back_a_possible_stop():
    text = StopText(["END"])
    assert [text.feed(d) for d in ("abcE", "N", "x", "yEND more")] == ["ab", "c", "E", "Nxy"]
    assert text.hit and text.text == "abcENxy"
    split = StopText(["END", "STOP"])
    assert "".join(split.feed(d) for d in ("ab", "cE", "ND")) == "abc" and split.hit
    assert StopText([]).feed("anything") == "anything"


def test_seed_makes_sampling_repeatable(served):
    first, second = (chat(served, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2))
    assert first == second
    greedy = chat(served, max_tokens=8).choices[0].message.content
    assert chat(served, max_tokens=8, temperature=0).choices[0].message.content == greedy


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_rag_replies_cite_sources(served, mode):
    plain = chat(served, max_tokens=5, extra_body={"rag": {"mode": mode, "top_k": 2, "order": "query-first"}})
    assert "Sources:" not in plain.choices[0].message.content and len(plain.sources) == 2  # structured only
    rag = {"mode": mode, "top_k": 2, "order": "query-first", "sources_in_text": True}
    reply = chat(served, max_tokens=5, extra_body={"rag": rag})
    expected = ask_engine(served, QUESTION, mode=mode, top_k=2, order="query-first", max_new_tokens=5)
    content = reply.choices[0].message.content
    assert reply.sources == [s.to_dict() for s in expected.sources] and len(reply.sources) == 2
    assert content.startswith(expected.answer) and "\n\nSources:\n[1] " in content
    assert all(s["source"] in content for s in reply.sources)
    assert reply.usage.prompt_tokens == sum(len(s.token_ids) for s in expected.layout)
    chunks = list(chat(served, max_tokens=5, stream=True, extra_body={"rag": rag}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].sources == [s.to_dict() for s in expected.sources] and chunks[-1].choices[0].finish_reason


# ---- errors, limits, authentication -------------------------------------------------------------------
def _embed(**body):
    return "/v1/embeddings", {"input": "text"} | body


def _chat(**body):
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | body


@pytest.mark.parametrize("request_, status, message", [
    (_embed(encoding_format="hex"), 400, "encoding_format"),
    (_embed(input=[]), 400, "input is empty"),
    (_embed(input=["a", 1]), 400, "must be a string, a list of strings"),
    (_embed(input=["x"] * 9), 400, "more than this server's limit of 8"),
    (_embed(input=[[1, 10**9]]), 400, "outside the vocabulary"),
    (_embed(input="word " * 5000), 400, "more than the model's context of 4096"),
    (_embed(dimensions=0), 400, "dimensions"),
    (_embed(dimensions=100000), 400, "more than the model's"),
    (_chat(max_tokens=4001), 400, "more than this server's limit of 4000"),
    (_chat(messages=[]), 400, "messages"),
    (_chat(messages=[{"role": "tool", "content": "x"}]), 400, "'tool' is not supported"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "text parts"),
    (_chat(messages=[{"role": "user", "content": "word " * 5000}]), 400, "more than the model's context"),
    (_chat(messages=[{"role": "user", "content": "word " * 5000}], stream=True), 400, "model's context"),
    (_chat(n=2), 400, "n=1"),
    (_chat(stop=""), 400, "stop"),
    (_chat(temperature=-1), 400, "temperature"),
    (_chat(rag={"mode": "bogus"}), 400, "unknown mode 'bogus'"),
    (_chat(rag={"mode": "rag", "order": "sideways"}), 400, "unknown order"),
    (_chat(rag={"mode": "doc", "chunk_order": "worst-first"}), 400, "unknown chunk order 'worst-first'"),
    (_chat(rag={"top_k": 0}), 400, "top_k"),
    (_chat(rag={"top_k": 5}), 400, "more than this server's limit of 4"),
    (_chat(rag={"topk": 2}), 400, "rag.topk"),
    (_chat(rag={}, messages=[{"role": "system", "content": "x"}]), 400, "needs a user message"),
    (_chat(model="no-such-model"), 404, "does not exist"),
    (_embed(model="no-such-model"), 404, "does not exist"),
    (_chat(messages=[{"role": "user", "content": "x" * 70000}]), 413, "larger than this server's limit"),
])
def test_errors_take_openai_shape(served, request_, status, message):
    path, body = request_
    code, out = raw(served, path, json.dumps({"model": served.model} | body).encode())
    assert code == status, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert message in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error"


def test_errors_through_the_client_and_the_server_lives_on(served):
    with pytest.raises(openai.BadRequestError, match="unknown mode"):
        chat(served, max_tokens=2, extra_body={"rag": {"mode": "bogus"}})
    with pytest.raises(openai.NotFoundError) as err:
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as err:
        chat(served, content="x" * 70000, max_tokens=2)
    assert err.value.status_code == 413
    assert raw(served, "/v1/chat/completions", b"{not json")[0] == 400
    assert raw(served, "/v1/nowhere")[0] == 404
    assert raw(served, "/health", key=None)[1]["status"] == "ok"
    assert chat(served, max_tokens=2).choices[0].message.content


def test_authentication(served):
    wrong = openai.OpenAI(base_url=served.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=served.model, input="x")
    status, out = raw(served, "/v1/models", key=None)
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert raw(served, "/v1/chat/completions", b"{}", key=None)[0] == 401  # the key is checked before the body
    assert raw(served, "/health", key=None)[0] == 200


# ---- concurrency --------------------------------------------------------------------------------------
def test_twenty_concurrent_requests_each_get_their_own_result(served):
    def call(i):
        if i % 4 == 0:
            out = served.client.embeddings.create(model=served.model, input=f"fact number {i}", encoding_format="float")
            return np.round(out.data[0].embedding, 5).tolist()
        extra = {"rag": {"mode": "doc", "top_k": 1 + i % 3}} if i % 4 == 1 else {}
        kwargs = {"stream": True} if i % 4 == 2 else {}
        out = chat(served, content=f"Question {i}: what is {i} plus {i}?", max_tokens=5, extra_body=extra, **kwargs)
        if kwargs:
            return "".join(c.choices[0].delta.content or "" for c in out)
        return out.choices[0].message.content, getattr(out, "sources", None)

    expected = [call(i) for i in range(20)]
    assert len({json.dumps(e) for e in expected}) == 20  # twenty different answers, so a mix-up would show
    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(call, range(20))) == expected


def test_long_stream_leaves_health_free_and_a_disconnect_frees_the_model(served):
    """4000 tokens take tens of seconds here; closing the stream must end them within about one token."""
    stream = chat(served, max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
    pieces = iter(stream)
    next(pieces), next(pieces)
    t = time.perf_counter()
    status, health = raw(served, "/health", key=None)
    assert status == 200 and health["busy"] is True and time.perf_counter() - t < 2
    stream.close()
    t = time.perf_counter()
    while raw(served, "/health", key=None)[1]["busy"]:
        assert time.perf_counter() - t < 5, "the model was still generating for a client that left"
        time.sleep(0.05)
    assert chat(served, max_tokens=2, extra_body={"ignore_eos": True}).choices[0].finish_reason == "length"
