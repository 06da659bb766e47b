"""The operator's Ollama and OpenAI doors, driven by the real ollama and openai SDKs, over two nodes."""

import asyncio
import json

import httpx
import ollama
import openai
import pytest

from sim.ollama_sim import sim_tokens
from tests.helpers import Sim, node_ids, wait_for

KEY = "door-key"


@pytest.fixture
def two(operator, node):
    """An operator (with an API key) and two nodes, each with its own simulator."""
    with Sim(models=["llama3:latest", "nomic-embed-text"], tokens=5) as a, \
            Sim(models=["llama3:latest", "mistral"], tokens=5) as b:
        op = operator(api_keys=[KEY])
        node(op.url, a.url, "n1")
        node(op.url, b.url, "n2")
        wait_for(lambda: node_ids(op.url, headers={"authorization": f"Bearer {KEY}"}) == {"n1", "n2"})
        yield op, a, b


def warm_both(op, *sims) -> None:
    """Load llama3 at each simulator, and wait until the operator hears it: equal nodes take turns."""
    for s in sims:
        httpx.post(f"{s.url}/api/generate", json={"model": "llama3", "prompt": "warm", "stream": False})
    auth = {"authorization": f"Bearer {KEY}"}
    wait_for(lambda: all(n["loaded"] == ["llama3:latest"]
                         for n in httpx.get(f"{op.url}/nodes", headers=auth).json()["nodes"]))


def sdk(op) -> ollama.Client:
    return ollama.Client(host=op.url, headers={"authorization": f"Bearer {KEY}"})


def oai(op) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{op.url}/v1", api_key=KEY, max_retries=0)


def test_ollama_sdk_list_show_ps_version(two):
    op, _, _ = two
    client = sdk(op)
    names = sorted(m.model for m in client.list().models)
    assert names == ["llama3:latest", "mistral:latest", "nomic-embed-text:latest"]  # one entry per model
    assert client.show("mistral").details.format == "gguf"
    client.generate(model="llama3", prompt="warm")
    assert [m.model for m in client.ps().models] == ["llama3:latest"]
    assert httpx.get(f"{op.url}/api/version").json() == {"version": "0.12.6"}
    assert httpx.get(op.url).text == "Ollama is running" and httpx.head(op.url).status_code == 200


def test_ollama_sdk_generate_and_chat_stream_and_not(two):
    op, _, _ = two
    client = sdk(op)
    expected = "".join(sim_tokens("hi", 5))
    parts = list(client.generate(model="llama3", prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == expected and parts[-1].done
    assert client.generate(model="llama3", prompt="hi").response == expected
    chunks = list(client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True,
                              options={"temperature": 0}, keep_alive="5m"))
    assert "".join(c.message.content for c in chunks) == expected
    assert client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}]).message.content == expected


def test_ollama_sdk_embed(two):
    op, _, _ = two
    client = sdk(op)
    assert len(client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
    assert len(client.embeddings(model="nomic-embed-text", prompt="a").embedding) == 8


def test_ollama_sdk_missing_model_is_404_response_error(two):
    op, _, _ = two
    with pytest.raises(ollama.ResponseError) as info:
        sdk(op).generate(model="llama9", prompt="x")
    assert info.value.status_code == 404 and info.value.error == "model 'llama9' not found"
    with pytest.raises(ollama.ResponseError) as info:
        list(sdk(op).chat(model="llama9", messages=[{"role": "user", "content": "x"}], stream=True))
    assert info.value.status_code == 404


def test_ollama_door_needs_the_api_key(two):
    op, _, _ = two
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=op.url).list()
    assert info.value.status_code == 401
    resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "x"})
    assert resp.status_code == 401 and "API key" in resp.json()["error"]


def test_ollama_door_turns_and_failover(two):
    op, a, b = two
    warm_both(op, a, b)
    client = sdk(op)
    for i in range(4):
        client.generate(model="llama3", prompt=f"rr{i}")
    assert a.stats()["requests"] == 3 and b.stats()["requests"] == 3  # one warm-up each, then turns
    b.configure(busy=True)
    for i in range(4):
        assert client.generate(model="llama3", prompt=f"fo{i}").response == "".join(sim_tokens(f"fo{i}", 5))
    assert a.stats()["requests"] == 7


def test_ollama_async_sdk_stream_disconnect_reaches_the_simulator(two):
    op, a, b = two
    a.configure(hold_last=True)
    b.configure(hold_last=True)

    async def go():
        client = ollama.AsyncClient(host=op.url, headers={"authorization": f"Bearer {KEY}"})
        stream = await client.generate(model="llama3", prompt="leave", stream=True)
        async for part in stream:
            assert part.response
            break
        await stream.aclose()
        await client.close()

    asyncio.run(go())
    wait_for(lambda: a.stats()["cancelled"] + b.stats()["cancelled"] == 1, timeout=5)


def test_openai_sdk_models_chat_completions_embeddings(two):
    op, _, _ = two
    client = oai(op)
    assert sorted(m.id for m in client.models.list()) == ["llama3:latest", "mistral:latest",
                                                           "nomic-embed-text:latest"]
    expected = "".join(sim_tokens("hello", 5))
    chat = client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.content == expected and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hello"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    text = client.completions.create(model="mistral", prompt="hello")
    assert text.choices[0].text == expected
    emb = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8


def test_openai_sdk_errors_have_openai_shape(two):
    op, _, _ = two
    with pytest.raises(openai.NotFoundError) as info:
        oai(op).chat.completions.create(model="llama9", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "not_found_error" and "llama9" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{op.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_door_turns_and_failover(two):
    op, a, b = two
    warm_both(op, a, b)
    client = oai(op)
    for i in range(4):
        client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": f"r{i}"}])
    assert a.stats()["requests"] == 3 and b.stats()["requests"] == 3
    a.configure(busy=True)
    for i in range(3):
        client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": f"f{i}"}])
    assert b.stats()["requests"] == 6


def test_bad_bodies_get_ollamas_400(two):
    op, _, _ = two
    headers = {"authorization": f"Bearer {KEY}"}
    resp = httpx.post(f"{op.url}/api/generate", content=b"{nope", headers=headers)
    assert resp.status_code == 400 and "invalid JSON" in resp.json()["error"]
    resp = httpx.post(f"{op.url}/api/chat", json={"messages": []}, headers=headers)
    assert resp.status_code == 400 and resp.json() == {"error": "model is required"}
    resp = httpx.post(f"{op.url}/v1/chat/completions", json={"messages": []}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"prompt": "q", "stream": False}),
    ("/api/chat", {"messages": [{"role": "user", "content": "q"}], "stream": False}),
])
def test_a_whole_answer_cut_mid_body_is_never_a_clean_200(two, path, body):
    """Not resumed (``X-ODLA-Resume: off``; with it, the other node would finish the answer)."""
    op, a, b = two
    a.configure(crash_after=1)
    b.configure(crash_after=1)
    try:
        resp = httpx.post(op.url + path, json={"model": "llama3", **body},
                          headers={"authorization": f"Bearer {KEY}", "x-odla-resume": "off"})
    except httpx.RemoteProtocolError:
        return  # cut after the first bytes: the body stops short, and the client sees it broken
    assert resp.status_code == 502 and resp.json()["error"]  # cut before them: a status that says so


def test_a_stream_cut_mid_body_ends_with_an_ollama_error_line(two):
    op, a, b = two
    a.configure(crash_after=2)
    b.configure(crash_after=2)
    resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "q"},
                      headers={"authorization": f"Bearer {KEY}", "x-odla-resume": "off"})  # (else b finishes it)
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert resp.status_code == 200 and lines[-1] == {"error": lines[-1]["error"]}
    assert "lost connection to Ollama" in lines[-1]["error"]
    # aiohttp raises a broken connection's error before the bytes that came with it, so the
    # tokens before the crash may or may not arrive; those that do are whole and in order
    assert [line["response"] for line in lines[:-1]] == sim_tokens("q", 5)[:len(lines) - 1]
