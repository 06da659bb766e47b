"""The audits' parts: seeds, reading an answer's words on every door, the verdict and reputation."""

import json

import httpx

from odla.core import protocol as p
from odla.operator.audits import Standing, agreement, seeded, words_of
from tests.helpers import Sim, node_ids, wait_for


def test_a_job_without_a_seed_gets_one_and_one_with_a_seed_keeps_it():
    given = json.loads(seeded("/api/generate", b'{"model": "m", "prompt": "p", "options": {"top_k": 3}}', lambda: 42))
    assert given == {"model": "m", "prompt": "p", "options": {"top_k": 3, "seed": 42}}
    assert json.loads(seeded("/v1/chat/completions", b'{"model": "m", "messages": []}', lambda: 5))["seed"] == 5
    own = b'{"model": "m", "prompt": "p", "options": {"seed": 1}}'
    assert seeded("/api/generate", own, lambda: 42) == own
    for untouched in (b"not json", b"[1]", b'{"options": 3}'):
        assert seeded("/api/chat", untouched) == untouched
    assert seeded("/api/embed", b'{"model": "m", "input": "x"}') == b'{"model": "m", "input": "x"}'  # runs no sampling


def test_words_are_read_from_every_doors_answer():
    assert words_of(b'{"token": "Hello", "done": false}\n{"token": " world", "done": false}\n{"done": true}\n') == \
        ["Hello", "world"]
    assert words_of(b'{"response": "a b", "done": false}\n{"response": " c", "done": true}\n') == ["a", "b", "c"]
    assert words_of(b'{"message": {"role": "assistant", "content": "x y"}, "done": true}') == ["x", "y"]
    assert words_of(b'data: {"choices": [{"delta": {"content": "p"}}]}\n\ndata: {"choices": [{"delta": '
                    b'{"content": " q"}}]}\n\ndata: [DONE]\n\n') == ["p", "q"]
    assert words_of(b'{"response": "cut at the captu') == []  # a line cut short is no answer


def test_agreement_and_reputation():
    assert agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"], 32) == 0.75
    assert agreement(["a"], ["a", "b"], 32) == 1.0 and agreement([], [], 32) == 1.0  # a cut answer: its length judges it
    assert Standing().reputation == 1.0
    assert Standing(failed=1).reputation == 0.2 and Standing(disputed=1).reputation == 0.2
    assert Standing(passed=9, failed=1).reputation > 0.5  # one wrong verdict among many does not quarantine


def test_a_nodes_outcomes_weigh_on_its_reputation_but_never_quarantine_it_alone():
    from odla.operator.registry import Node

    node = Node("n1", "http://127.0.0.1:1", ["llama3"], 0.0)
    for ok in [True, False] * 50:
        node.outcome(ok, 0.0)
    assert 0.85 < node.reputation < 0.9  # half its jobs failed: at most 7/8 of what was found of it
    for _ in range(1000):
        node.outcome(False, 0.0)
    assert node.reputation > 0.75 > 0.5 and not node.quarantined
    node.standing = Standing(failed=1)
    node.rate()
    assert node.reputation < 0.2


def test_a_canary_is_never_a_request_the_audited_node_answered():
    import asyncio

    from odla.core.config import Settings
    from odla.operator.audits import Auditor
    from odla.operator.registry import Registry
    from odla.serving.jobs import Job

    registry = Registry(prune_after=30)
    for node_id in "abc":
        registry.register(node_id, f"http://{node_id}", ["llama3"])
    asked: list[bytes] = []

    class Probe(Auditor):
        async def _rerun(self, job, request, avoid):
            asked.append(request[2])
            return job.node, ["x"] * 40, 40

    auditor = Probe(Settings(), registry, router=None, rng=lambda: 0.0)
    words = ["x"] * 40
    auditor._record("llama3:latest", "sha", ("POST", "/api/generate", b"seen by a"), words, {"a", "b"})
    auditor._record("llama3:latest", "sha", ("POST", "/api/generate", b"b and c"), words, {"b", "c"})
    job = Job(door="ollama", model="llama3:latest", node="a")
    asyncio.run(auditor._canary(job, "llama3:latest", "sha"))
    assert asked == [b"b and c"] and auditor.counts["passed"] == 1
    asyncio.run(auditor._canary(job, "llama3:latest", "sha"))  # it has seen both now: no canary left for it
    assert asked == [b"b and c"] and auditor.counts["inconclusive"] == 1


def test_a_speed_a_node_made_up_counts_against_it_but_never_quarantines_it_alone():
    from odla.operator.registry import Node

    honest = Node("n1", "http://127.0.0.1:1", ["llama3"], 0.0, tokens_per_s={"llama3:latest": 50.0})
    honest.saw("llama3:latest", 41, 2.0)  # 20 tokens/s as relayed: within 3x of what it says
    assert honest.reputation == 1.0
    liar = Node("n2", "http://127.0.0.1:2", ["llama3"], 0.0, tokens_per_s={"llama3:latest": 1e12})
    liar.saw("llama3:latest", 41, 2.0)
    assert liar.reputation == 0.6
    unmeasured = Node("n3", "http://127.0.0.1:3", ["llama3"], 0.0, tokens_per_s={"llama3:latest": 1e12})
    unmeasured.rate()
    assert unmeasured.reputation == 1.0  # nothing measured yet: nothing to hold it to


def test_a_resumed_answers_later_leg_is_audited_as_a_job_of_its_own(operator, node):
    """Every job sampled; every answer cut at its 3rd token and finished by another node. The first
    node's leg, cut off, is not audited; the leg that finished it is: its request (the chat that
    continues the answer so far) re-run on a third node, and the two answers compared."""
    op = operator(audit_rate=1.0)
    with Sim(models=["llama3:latest"], tokens=12, crash_after=3, seeded=True) as sim:
        for node_id in ("n1", "n2", "n3"):
            node(op.url, sim.url, node_id)
        wait_for(lambda: node_ids(op.url) == {"n1", "n2", "n3"})
        resp = httpx.post(f"{op.url}/api/chat", timeout=30, json={
            "model": "llama3", "messages": [{"role": "user", "content": "why"}], "options": {"seed": 5}})
        assert resp.status_code == 200 and "error" not in resp.text.splitlines()[-1], resp.text
        job = httpx.get(f"{op.url}/jobs/{resp.headers[p.JOB_HEADER]}").json()
        first, last = job["legs"][0]["node"], job["legs"][1]["node"]
        audits = lambda: {n["node_id"]: n["audits"] for n in httpx.get(f"{op.url}/nodes").json()["nodes"]}  # noqa: E731
        wait_for(lambda: audits()[last]["passed"] == 1)
        assert audits()[first] == {"passed": 0, "failed": 0} and op.app.state.auditor.counts["passed"] == 1
        (request, words, seen), = [c for found in op.app.state.auditor.canaries.values() for c in found]
        method, path, body = request
        asked = json.loads(body)
        assert path == "/ollama/api/chat" and asked["messages"][-1]["role"] == "assistant" and last in seen
        pieces = [json.loads(line)["message"]["content"] for line in resp.text.splitlines()]
        assert words == "".join(pieces[3:]).split() and len(words) > 0  # the rest of the answer, as both gave it
