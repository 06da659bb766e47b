"""The simulator's Ollama scheduler: slots per model, loads, eviction, keep_alive, as Ollama behaves."""

import json
import threading
import time

import httpx
import pytest

from tests.helpers import Sim, wait_for


def generate(sim, model, **body):
    resp = httpx.post(f"{sim.url}/api/generate", json={"model": model, "prompt": "q", "stream": False, **body},
                      timeout=30)
    return resp.json()


def loaded(sim):
    return [m["name"] for m in httpx.get(f"{sim.url}/api/ps").json()["models"]]


def test_a_cold_model_loads_and_load_duration_counts_the_wait():
    with Sim(models=["llama3", "mistral"], tokens=2, load_ms=300) as sim:
        cold = generate(sim, "llama3")
        warm = generate(sim, "llama3")
        assert cold["load_duration"] >= 0.3e9 > warm["load_duration"]
        assert loaded(sim) == ["llama3:latest"] and sim.stats()["loads"] == 1
        expires = httpx.get(f"{sim.url}/api/ps").json()["models"][0]["expires_at"]
        assert expires.endswith("Z") and expires > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 200))


def test_max_loaded_evicts_the_least_recently_used_idle_model():
    with Sim(models=["a", "b", "c"], tokens=1, max_loaded=2) as sim:
        for model in ("a", "b", "a", "c"):
            generate(sim, model)
        assert sorted(loaded(sim)) == ["a:latest", "c:latest"]  # b was used least recently
        assert sim.stats()["loads"] == 3


def test_a_model_waits_when_every_loaded_model_is_busy():
    with Sim(models=["a", "b"], tokens=2, delay=0.3, max_loaded=1) as sim:
        busy = threading.Thread(target=generate, args=(sim, "a"))
        busy.start()
        time.sleep(0.1)
        began = time.monotonic()
        generate(sim, "b")  # a is running: b cannot be loaded until it ends
        busy.join()
        assert time.monotonic() - began > 0.4
        assert loaded(sim) == ["b:latest"]


def test_slots_are_per_model_and_keep_alive_zero_unloads():
    with Sim(models=["a", "b"], tokens=2, delay=0.3, num_parallel=1) as sim:
        other = threading.Thread(target=generate, args=(sim, "a"))
        other.start()
        time.sleep(0.1)
        began = time.monotonic()
        generate(sim, "b", keep_alive=0)  # a's one slot is a's: b runs at once
        other.join()
        assert time.monotonic() - began < 0.9
        assert loaded(sim) == ["a:latest"]


def stream(sim, prompt, path="/api/generate", **body):
    payload = {"model": "llama3", "prompt": prompt, **body}
    if path == "/v1/chat/completions":
        payload = {"model": "llama3", "messages": [{"role": "user", "content": prompt}], "stream": True}
    try:
        with httpx.stream("POST", f"{sim.url}{path}", json=payload, timeout=10) as resp:
            return [line for line in resp.iter_lines() if line], True
    except httpx.RemoteProtocolError:
        return [], False


def test_crash_rate_cuts_that_share_of_streams_and_record_counts_what_each_was_sent():
    """The chaos benchmark's Ollama: some streams cut at a random place; what each prompt was sent."""
    with Sim(tokens=6, crash_rate=0.5, record=True) as sim:
        whole = cut = 0
        for i in range(40):
            lines, ended = stream(sim, f"p{i}", "/v1/chat/completions" if i % 2 else "/api/generate")
            whole, cut = whole + ended, cut + (not ended)
        sent = httpx.get(f"{sim.url}/_sim/sent").json()
        assert 8 <= cut <= 32 and whole + cut == 40
        assert set(sent) <= {f"p{i}" for i in range(40)} and sum(v == 6 for v in sent.values()) == whole
        assert all(1 <= v <= 6 for v in sent.values())  # a cut stream was sent at least one token


def test_queued_counts_requests_beyond_num_parallel():
    with Sim(tokens=3, num_parallel=2, hold_last=True) as sim:  # each holds its slot until released
        threads = [threading.Thread(target=stream, args=(sim, f"p{i}")) for i in range(3)]
        for t in threads:
            t.start()
        # the third is waiting for a slot before any is freed (under load it could arrive only after)
        wait_for(lambda: sim.stats()["requests"] == 3 and sim.stats()["active"] == 2 and sim.stats()["queued"] == 1)
        sim.release()
        for t in threads:
            t.join()
        assert sim.stats()["queued"] == 1 and sim.stats()["completed"] == 3
        stream(sim, "alone")
        assert sim.stats()["queued"] == 1


def test_each_slot_caches_its_last_prompt_and_a_turn_reads_only_what_is_new():
    """As Ollama's runner: a request takes the free slot with the longest shared prefix, and reads the rest."""
    chat = lambda sim, messages: httpx.post(f"{sim.url}/api/chat", json={  # noqa: E731
        "model": "llama3", "messages": messages, "stream": False}).json()
    with Sim(tokens=5, num_parallel=2, prompt_ms_per_token=1.0) as sim:
        first = [{"role": "system", "content": "rules " * 200}, {"role": "user", "content": "hello " * 50}]
        answer = chat(sim, first)
        assert answer["prompt_eval_count"] == 252 and answer["prompt_eval_duration"] >= 252_000_000 * 0.99
        second = first + [answer["message"], {"role": "user", "content": "more " * 20}]
        again = chat(sim, second)
        assert again["prompt_eval_count"] == 21  # "user:" and 20 words: the rest was cached
        other = chat(sim, [{"role": "user", "content": "elsewhere " * 30}])  # the other, empty slot
        assert other["prompt_eval_count"] == 31
        third = second + [again["message"], {"role": "user", "content": "last"}]
        assert chat(sim, third)["prompt_eval_count"] == 2  # still cached in its own slot
        stats = sim.stats()
        assert stats["prompt_tokens"] == 252 + 279 + 31 + 287 and stats["cached_tokens"] == 258 + 285


def test_a_trailing_assistant_message_is_continued_where_it_stops():
    """As Ollama's /api/chat continues a trailing assistant message: the answer picks up after it, so an
    answer resumed at any token boundary (or inside a token) ends as the unbroken one does."""
    with Sim(models=["llama3"], tokens=8, seeded=True) as sim:
        def chat(messages, **options):
            body = {"model": "llama3", "messages": messages, "stream": False, "options": {"seed": 5, **options}}
            return httpx.post(f"{sim.url}/api/chat", json=body, timeout=10).json()

        ask = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]
        whole = chat(ask)["message"]["content"]
        words = whole.split(" ")
        for cut in (len(words[0]), len(words[0]) + 3, len(" ".join(words[:5]))):
            rest = chat([*ask, {"role": "assistant", "content": whole[:cut]}], num_predict=20)
            assert whole[:cut] + rest["message"]["content"] == whole, cut
        capped = chat([*ask, {"role": "assistant", "content": " ".join(words[:2])}], num_predict=3)
        assert capped["eval_count"] == 3 and capped["message"]["content"] == " " + " ".join(words[2:5])
        generated = httpx.post(f"{sim.url}/api/generate", json={"model": "llama3", "prompt": "why?", "system": "be brief",
                                                              "stream": False, "options": {"seed": 5}}, timeout=10)
        assert generated.json()["response"] == whole  # a generate resumed as the equivalent chat goes on alike


def test_fail_error_and_stall_after_cut_a_stream_after_k_tokens():
    with Sim(models=["llama3"], tokens=6, crash_after=2) as sim:
        with httpx.stream("POST", f"{sim.url}/api/generate", json={"model": "llama3", "prompt": "q"}, timeout=10) as resp:
            lines = []
            with pytest.raises(httpx.HTTPError):
                for line in resp.iter_lines():
                    lines.append(line)
            assert len(lines) == 2
        sim.configure(crash_after=None, error_after=2)
        lines = httpx.post(f"{sim.url}/api/chat", json={"model": "llama3", "messages": [{"role": "user", "content": "q"}]},
                           timeout=10).text.splitlines()
        assert len(lines) == 3 and json.loads(lines[-1]) == {"error": sim.sim.b.error_message}
        sim.configure(error_after=None, stall_after=2)
        with httpx.stream("POST", f"{sim.url}/v1/chat/completions", timeout=httpx.Timeout(5, read=0.5), json={
                "model": "llama3", "messages": [{"role": "user", "content": "q"}], "stream": True}) as resp:
            events = resp.iter_lines()
            got = [next(events) for _ in range(4)]  # two events, each a data line and a blank one
            assert [line.startswith("data: {") for line in got] == [True, False, True, False]
            with pytest.raises(httpx.ReadTimeout):  # then nothing, until the client leaves
                next(events)
        wait_for(lambda: sim.stats()["stalled"] == 1 and sim.stats()["active"] == 0)


def test_pulls_stream_ollama_s_progress_fill_the_disk_and_stop_when_the_client_leaves():
    with Sim(models=["llama3"], pull_rate=2e10, disk=10_000_000_000) as sim:
        lines = [json.loads(line) for line in httpx.post(f"{sim.url}/api/pull", json={"model": "mistral"},
                                                         timeout=10).text.splitlines()]
        assert lines[0] == {"status": "pulling manifest"} and lines[-3:] == [
            {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        layers = {line["digest"]: line for line in lines if "digest" in line}
        assert len(layers) == 3 and all(line["completed"] == line["total"] for line in layers.values())
        assert all(line["status"] == f"pulling {digest[7:19]}" for digest, line in layers.items())
        assert "mistral:latest" in [m["name"] for m in httpx.get(f"{sim.url}/api/tags").json()["models"]]
        full = httpx.post(f"{sim.url}/api/pull", json={"model": "phi3"}, timeout=10).text.splitlines()
        assert "no space left on device" in json.loads(full[-1])["error"]  # 4.7 + 4.1 + 2.2 GB > 10 GB
        assert httpx.post(f"{sim.url}/api/pull", json={"model": "llama9", "stream": False}).json() == {
            "error": "pull model manifest: file does not exist"}
        sim.configure(pull_rate=1e6)
        with httpx.stream("POST", f"{sim.url}/api/pull", json={"model": "tinyllama"}, timeout=10) as resp:
            next(resp.iter_lines())  # the client leaves mid-pull
        wait_for(lambda: sim.stats()["pulls_cut"] == 1)
        assert "tinyllama:latest" not in [m["name"] for m in httpx.get(f"{sim.url}/api/tags").json()["models"]]
        assert httpx.post(f"{sim.url}/api/copy", json={"source": "mistral", "destination": "m2"}).status_code == 200
        assert httpx.request("DELETE", f"{sim.url}/api/delete", json={"model": "m2"}).status_code == 200
        assert httpx.request("DELETE", f"{sim.url}/api/delete", json={"model": "m2"}).json() == {
            "error": "model 'm2' not found"}
