"""A node that fails mid-answer does not end the answer: another node with the same model finishes it.

Real processes: a simulator that cuts every answer at its Kth token (``--fail-after``, ``--error-after``,
``--stall-after``: a continuation that starts there goes on), two nodes in front of it, an operator.
Whichever node a job starts on fails it, and the other finishes it. The answer a client reads is
compared with the one an Ollama gives unbroken for the same request and seed.
"""

import json
import signal
import time

import httpx
import pytest

from odla.operator.resume import KINDS, content_of, decoded
from sim.ollama_sim import sim_tokens
from tests.helpers import wait_for

PROMPT = "why is the sky blue"
CASES = [  # path, body, streamed
    ("/inference", {"prompt": PROMPT, "options": {"seed": 7}}, True),
    ("/api/generate", {"prompt": PROMPT, "options": {"seed": 7}}, True),
    ("/api/generate", {"prompt": PROMPT, "options": {"seed": 7}, "stream": False}, False),
    ("/api/chat", {"messages": [{"role": "user", "content": PROMPT}], "options": {"seed": 7}}, True),
    ("/api/chat", {"messages": [{"role": "user", "content": PROMPT}], "options": {"seed": 7}, "stream": False}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "seed": 7, "stream": True}, True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "seed": 7}, False),
    ("/v1/completions", {"prompt": PROMPT, "seed": 7, "stream": True}, True),
    ("/v1/completions", {"prompt": PROMPT, "seed": 7}, False),
]


def text_of(path: str, resp: httpx.Response) -> str:
    """The answer's text as a client of that door reads it."""
    kind = KINDS[path]
    units = resp.content.split(b"\n\n" if kind.startswith("openai") else b"\n")
    text = []
    for unit in units:
        part = decoded(unit)
        if part is None:
            continue
        assert "error" not in part, part
        if "message" in part and kind == "openai_chat":  # a whole OpenAI answer
            part = {"choices": [{"delta": part["choices"][0]["message"]}]}
        elif "choices" in part and part["choices"] and "message" in part["choices"][0]:
            part = {"choices": [{"delta": part["choices"][0]["message"]}]}
        text.append(content_of(kind, part))
    return "".join(text)


def unbroken(sim: str, path: str, body: dict) -> str:
    """The answer the good node's Ollama gives to the same request in one piece."""
    direct = "/api/generate" if path == "/inference" else path
    resp = httpx.post(sim + direct, json={"model": "llama3", **body}, timeout=10)
    return text_of(direct, resp)


def ask(net, path: str, body: dict, headers: dict = {}) -> httpx.Response:
    """A job's answer, once every node is back in service (one that failed is checked again first)."""
    wait_for(lambda: all(n["healthy"] for n in net.listing().values()), timeout=20)
    return httpx.post(net.op_url + path, json={"model": "llama3", **body}, headers=headers, timeout=30)


def job_of(net, resp: httpx.Response) -> dict:
    return httpx.get(f"{net.op_url}/jobs/{resp.headers['x-odla-job']}", timeout=5).json()


def resumes(net) -> dict:
    text = httpx.get(f"{net.op_url}/metrics", timeout=5).text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("odla_resumes_total{")}


@pytest.mark.parametrize("failure", ["--fail-after", "--error-after", "--stall-after"])
def test_an_answer_cut_mid_stream_is_finished_by_another_node_on_every_door(net, failure):
    sim = net.sim("--tokens", "12", "--delay", "0.01", "--seeded", failure, "3")
    reference = net.sim("--tokens", "12", "--seeded")
    net.operator(stall_timeout=1)
    net.node("n1", sim)
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    cases = [c for c in CASES if failure != "--error-after" or not c[0].startswith("/v1/")]  # (its OpenAI API has none)
    for path, body, streamed in cases:
        resp = ask(net, path, body)
        assert resp.status_code == 200, resp.text
        whole = unbroken(reference, path, body)
        assert text_of(path, resp) == whole and len(whole.split()) == 12, (path, streamed)
        job = job_of(net, resp)
        first = resp.headers["x-odla-node"]
        other = ({"n1", "n2"} - {first}).pop()
        assert job["outcome"] == "ok" and job["node"] == other, job
        assert job["legs"] == [{"node": first, "tokens": 3, "job": job["id"]},  # the second node's receipt is
                               {"node": other, "tokens": 9, "job": job["id"] + ".1"}]  # a record of its own
        assert job["output_tokens"] == 12
        if path in ("/api/generate", "/api/chat") and streamed:  # one final line counting the whole answer
            last = json.loads(resp.text.strip().splitlines()[-1])
            assert last["done"] is True and last["eval_count"] == 12
        if path.startswith("/v1/") and not streamed:
            assert resp.json()["usage"]["completion_tokens"] == 12
    assert resumes(net) == {"ok": len(cases)}


def test_a_resume_that_fails_too_is_resumed_again_or_ends_with_the_error(net):
    sim = net.sim("--tokens", "12", "--fail-after", "3")
    later = net.sim("--tokens", "12", "--fail-after", "6")  # the same answers, cut further on
    net.operator(resume_attempts=1)
    net.node("a", sim)
    net.node("b", sim)
    net.wait_nodes("a", "b")
    with httpx.stream("POST", f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": PROMPT},
                      timeout=30) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    whole = "".join(sim_tokens(PROMPT, 12))
    assert "".join(line["response"] for line in lines[:-1]) == whole  # resumed once: whole
    net.node("c", later)
    net.wait_nodes("a", "b", "c")
    outcomes = []
    for _ in range(6):  # a job that starts on c is cut at 6, and goes on on a or b; one that starts on a
        resp = ask(net, "/api/chat", {"messages": [{"role": "user", "content": PROMPT}]})  # or b, at 3
        job = job_of(net, resp)
        if job["outcome"] == "ok":
            assert text_of("/api/chat", resp) == "".join(sim_tokens(PROMPT, 12))
            assert sum(leg["tokens"] for leg in job["legs"]) == 12
        else:  # ...and when it goes on on c, that is cut too, at 6, and resume_attempts (1) is spent
            assert job["legs"] == [{"node": resp.headers["x-odla-node"], "tokens": 3, "job": job["id"]},
                                   {"node": "c", "tokens": 3, "job": job["id"] + ".1"}]
            last = json.loads(resp.text.splitlines()[-1])
            assert "error" in last and len(resp.text.splitlines()) == 7
        outcomes.append(job["outcome"])
    counted = resumes(net)
    assert counted["ok"] == 1 + outcomes.count("ok") and counted.get("exhausted", 0) == outcomes.count("node_error")


@pytest.mark.parametrize("link", ["http", "dial"])
def test_a_node_killed_mid_answer_is_resumed_on_a_node_with_the_same_model(net, link):
    sim = net.sim("--tokens", "10", "--delay", "0.2")
    net.operator()
    net.node("victim", sim, NODE_LINK=link)
    net.node("other", sim)
    net.wait_nodes("victim", "other")
    for _ in range(12):  # until a job starts on the victim (jobs take turns)
        wait_for(lambda: all(n["healthy"] for n in net.listing().values()), timeout=20)
        with httpx.stream("POST", f"{net.op_url}/api/chat", timeout=30, json={
                "model": "llama3", "messages": [{"role": "user", "content": PROMPT}]}) as resp:
            if resp.headers["x-odla-node"] != "victim":
                resp.read()
                continue
            lines = resp.iter_lines()
            got = [json.loads(next(lines))["message"]["content"] for _ in range(2)]
            net.nodes["victim"].send_signal(signal.SIGKILL)
            began = time.monotonic()
            rest = [json.loads(line) for line in lines if line.strip()]
            gap = time.monotonic() - began
            break
    else:
        raise AssertionError("no job went to the victim")
    text = "".join(got) + "".join(line["message"]["content"] for line in rest)
    assert text == "".join(sim_tokens(PROMPT, 10))
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 10
    assert gap < 3, gap  # a connection lost: at once (8 more tokens 0.2 s apart take 1.6 s)


@pytest.mark.parametrize("how", ["resume off", "header", "option", "json format"])
def test_without_resume_the_answer_ends_with_the_failure_as_before(net, how):
    sim = net.sim("--tokens", "8", "--error-after", "3")
    net.operator(resume="off" if how == "resume off" else "on")
    net.node("n1", sim)
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    body = {"prompt": PROMPT, **({"format": "json"} if how == "json format" else {}),
            **({"options": {"odla_resume": False}} if how == "option" else {})}
    path = "/inference" if how == "option" else "/api/generate"
    resp = ask(net, path, body, headers={"X-ODLA-Resume": "off"} if how == "header" else {})
    lines = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    assert len(lines) == 4 and "error" in lines[-1], lines
    if path == "/api/generate":  # Ollama's own error line, byte for byte
        assert resp.text.splitlines()[-1] == httpx.post(sim + "/api/generate", json={
            "model": "llama3", "prompt": "x"}, timeout=10).text.splitlines()[-1]
    job = job_of(net, resp)
    assert job["outcome"] == "node_error" and job["legs"] is None
    assert resumes(net) == {}
    assert "odla_resume" not in json.dumps(httpx.get(sim + "/_sim/last", timeout=5).json())


def test_an_answer_is_never_resumed_on_another_build_of_its_model(net):
    """Two nodes whose Ollamas list llama3 under different digests: the answer ends with its node's
    error as before, rather than go on with another model's words."""
    net.operator()
    net.node("a", net.sim("--tokens", "8", "--error-after", "3"))
    net.node("b", net.sim("--tokens", "8", "--error-after", "3", "--build", "q4_K_M"))
    net.wait_nodes("a", "b")
    for _ in range(2):
        resp = ask(net, "/api/chat", {"messages": [{"role": "user", "content": PROMPT}]})
        lines = [json.loads(line) for line in resp.text.splitlines()]
        assert len(lines) == 4 and "error" in lines[-1]
        job = job_of(net, resp)
        assert job["legs"] == [{"node": resp.headers["x-odla-node"], "tokens": 3, "job": job["id"]}]
    assert resumes(net) == {"no_node": 2}
