"""Seeing the network (odla/operator/watch.py): metrics, job receipts, the dashboard's data, the client's views."""

import json
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from odla.core import protocol as p
from odla.serving.jobs import Job
from odla.operator.metrics import Activity
from odla.operator.receipts import Receipts
from odla.client.tables import go_duration, jobs_table, verbose_stats
from odla.core.usage import Tail, Usage
from sim.ollama_sim import sim_tokens
from tests.helpers import ROOT, infer, node_ids, read_stream, wait_for


def samples(url: str, **kw) -> dict:
    """Every sample of ``/metrics`` by (name, labels)."""
    text = httpx.get(f"{url}/metrics", **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_metrics_show_the_network_as_it_is(sim, operator, node):
    op = operator(api_keys=["k"])
    node(op.url, sim.url, "n1", num_parallel=2)
    auth = {"authorization": "Bearer k"}
    wait_for(lambda: node_ids(op.url, headers=auth) == {"n1"})
    assert httpx.get(f"{op.url}/metrics").status_code == 401  # behind the API keys, like /nodes
    assert infer(op.url, headers=auth)[0] == 200
    wait_for(lambda: "odla_node_model_loaded" in httpx.get(f"{op.url}/metrics", headers=auth).text)
    resp = httpx.get(f"{op.url}/metrics", headers=auth)  # no /metrics -> /metrics/ redirect
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(resp.text) for s in family.samples}
    assert samples[("odla_node_up", (("node", "n1"),))] == 1
    assert samples[("odla_node_slots", (("model", "llama3:latest"), ("node", "n1")))] == 2
    assert samples[("odla_node_inflight_requests", (("model", "llama3:latest"), ("node", "n1")))] == 0
    assert samples[("odla_node_model_loaded", (("model", "llama3:latest"), ("node", "n1")))] == 1
    assert samples[("odla_node_model_loaded", (("model", "mistral:latest"), ("node", "n1")))] == 0
    assert samples[("odla_info", (("version", "0.1.0"),))] == 1


def test_metrics_count_every_job_once_by_how_it_ended(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    for i in range(3):
        assert infer(op.url, prompt=f"ok {i}")[0] == 200  # ok
    assert httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "q", "stream": False}).status_code == 200
    assert infer(op.url, model="llama9")[0] == 404  # no_node
    assert httpx.post(f"{op.url}/inference", content=b"{not json").status_code == 400  # bad_request
    sim.configure(load_delay=3)
    with pytest.raises(httpx.TimeoutException):  # client_cancel
        httpx.post(f"{op.url}/inference", json={"model": "llama3", "prompt": "gone"}, timeout=0.5)
    sim.configure(load_delay=0, error_after=2)
    status, lines = infer(op.url, prompt="breaks")  # Ollama fails mid-stream: node_error
    assert status == 200 and "error" in lines[-1]

    def counts() -> dict:
        text = httpx.get(f"{op.url}/metrics").text
        return {(s.labels.get("door"), s.labels.get("outcome")): s.value
                for f in text_string_to_metric_families(text) if f.name == "odla_requests"
                for s in f.samples if s.name == "odla_requests_total"}

    assert 'model="llama9"' not in httpx.get(f"{op.url}/metrics").text  # a caller's typo is not a series
    expected = {("inference", "ok"): 3, ("ollama", "ok"): 1, ("inference", "no_node"): 1,
                ("inference", "bad_request"): 1, ("inference", "client_cancel"): 1, ("inference", "node_error"): 1}
    wait_for(lambda: counts() == expected)  # the cancelled one ends when the operator sees the client gone
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{op.url}/metrics").text)}
    ttft = sum(s.value for s in families["odla_time_to_first_token_seconds"].samples
               if s.name.endswith("_count"))
    assert ttft == 5  # every job that sent a token: 3 + 1 door + the one that broke after two
    outcomes = {}
    for job in httpx.get(f"{op.url}/jobs", params={"limit": 100}).json()["jobs"]:
        outcomes[(job["door"], job["outcome"])] = outcomes.get((job["door"], job["outcome"]), 0) + 1
    assert outcomes == expected  # a receipt for every job, saying how it ended


def test_a_body_refused_for_its_size_is_counted_too(operator):
    op = operator(max_prompt_chars=10)
    too_big = b'{"model": "llama3", "prompt": "' + b"x" * 70_000 + b'"}'
    assert httpx.post(f"{op.url}/inference", content=too_big).status_code == 413
    assert httpx.post(f"{op.url}/api/chat", content=too_big).status_code == 413
    text = httpx.get(f"{op.url}/metrics").text
    assert 'odla_requests_total{door="inference",model="",node="",outcome="bad_request"} 1.0' in text
    assert 'odla_requests_total{door="ollama",model="",node="",outcome="bad_request"} 1.0' in text


def test_a_known_mix_is_counted_exactly_and_receipts_survive_a_restart(net):
    """ok, unknown model, a client that leaves, a node killed mid-stream: /metrics and /jobs agree
    with what was sent; the receipts are still there after the operator restarts."""
    sim = net.sim("--tokens", "6")
    operator = net.operator(resume="off")  # a node killed mid-stream ends its job (else another finishes it)
    net.node("n1", sim)
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    sent: dict[str, str] = {}  # job id -> the outcome it must have

    for i in range(3):
        with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": f"ok {i}"}) as resp:
            assert [line.get("token") for line in read_stream(resp)][:-1] == sim_tokens(f"ok {i}", 6)
            sent[resp.headers[p.JOB_HEADER]] = "ok"
    resp = httpx.post(f"{net.op_url}/inference", json={"model": "llama9", "prompt": "typo"})
    assert resp.status_code == 404
    sent[resp.headers[p.JOB_HEADER]] = "no_node"

    httpx.post(f"{sim}/_sim/config", json={"delay": 0.2})
    with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "leaves"}) as resp:
        lines = resp.iter_lines()
        assert json.loads(next(lines))["token"]  # one token, then the client leaves
        sent[resp.headers[p.JOB_HEADER]] = "client_cancel"

    wait_for(lambda: all(n["active_jobs"] == 0 for n in net.listing().values()))  # the one that left has ended
    httpx.post(f"{sim}/_sim/config", json={"delay": 0.0, "hold_last": True})
    cli = subprocess.Popen([sys.executable, "client.py", "held", "--model", "llama3", "--operator", net.op_url,
                            "--show-node"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        busy = [cli.stderr.readline().strip().removeprefix("[node ").removesuffix("]")]  # the node serving it
        net.nodes[busy[0]].send_signal(signal.SIGKILL)
        out, err = cli.communicate(timeout=15)
        assert cli.returncode == 1 and "failed mid-stream" in err
    finally:
        cli.kill()
        cli.wait()
    killed = httpx.get(f"{net.op_url}/jobs", params={"outcome": "node_error"}).json()["jobs"]
    assert len(killed) == 1 and killed[0]["node"] == busy[0] and "mid-stream" in killed[0]["error"]
    sent[killed[0]["id"]] = "node_error"

    def receipts() -> dict:
        return {j["id"]: j for j in httpx.get(f"{net.op_url}/jobs", params={"limit": 1000}).json()["jobs"]}

    wait_for(lambda: {k: j["outcome"] for k, j in receipts().items()} == sent)
    found = samples(net.op_url)
    assert total(found, "odla_requests_total") == len(sent) == 6
    for outcome in ("ok", "no_node", "client_cancel", "node_error"):
        assert total(found, "odla_requests_total", outcome=outcome) == list(sent.values()).count(outcome)
    # every streamed job that sent a token: the three ok, the one that left after one, the one killed
    assert total(found, "odla_time_to_first_token_seconds_count") == 5
    # Ollama's counts of the jobs that ended ok, and what the others delivered (the one that left had one)
    delivered = sum(j["output_tokens"] or 0 for j in receipts().values())
    assert total(found, "odla_output_tokens_total") == delivered >= 3 * 6 + 1
    assert total(found, "odla_input_tokens_total") == 3  # the simulator counts 1 per prompt
    assert total(found, "odla_time_per_output_token_seconds_count") == 3

    ok = [j for j in receipts().values() if j["outcome"] == "ok"]
    for job in ok:
        assert job["output_tokens"] == 6 and job["prompt_tokens"] == 1 and job["node"] in ("n1", "n2")
        assert job["total_duration"] > 0 and job["eval_duration"] > 0 and job["door"] == "inference"
        assert job["started_at"] <= job["first_token_at"] <= job["finished_at"]
        assert job["finished_at"].endswith("Z") and job["caller"] is None

    operator.stop()  # SIGTERM: what has ended is written before the operator exits
    net.operator()
    after = {k: j["outcome"] for k, j in receipts().items()}
    assert after == sent
    one = ok[0]["id"]
    assert httpx.get(f"{net.op_url}/jobs/{one}").json() == receipts()[one]


def test_receipts_on_the_ollama_and_openai_doors(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    ids = {}
    for path, body in (("/api/generate", {"model": "llama3", "prompt": "a"}),
                       ("/api/generate", {"model": "llama3", "prompt": "b", "stream": False}),
                       ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "c"}]}),
                       ("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "d"}]}),
                       ("/v1/chat/completions", {"model": "llama3", "stream": True,
                                                 "stream_options": {"include_usage": True},
                                                 "messages": [{"role": "user", "content": "e"}]})):
        resp = httpx.post(f"{op.url}{path}", json=body)
        assert resp.status_code == 200
        ids[resp.headers[p.JOB_HEADER]] = path
    sim.configure(error_after=2)
    resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "breaks"})
    assert resp.status_code == 200 and '"error"' in resp.text.splitlines()[-1]  # Ollama's own error line
    broken = resp.headers[p.JOB_HEADER]

    jobs = {j["id"]: j for j in httpx.get(f"{op.url}/jobs").json()["jobs"]}
    for job_id, path in ids.items():
        job = jobs[job_id]
        assert (job["outcome"], job["node"]) == ("ok", "n1"), path
        assert job["door"] == ("openai" if path.startswith("/v1/") else "ollama")
        assert job["output_tokens"] == 6 and job["prompt_tokens"] == 1, path
        if not path.startswith("/v1/"):  # Ollama's durations; OpenAI's answers have none
            assert job["total_duration"] > 0 and job["eval_duration"] > 0
    assert jobs[broken]["outcome"] == "node_error" and "unexpected EOF" in jobs[broken]["error"]


def test_a_job_can_be_looked_up_while_it_runs(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    sim.configure(delay=0.1)
    with httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": "slow"}) as resp:
        job_id = resp.headers[p.JOB_HEADER]
        running = httpx.get(f"{op.url}/jobs/{job_id}").json()
        assert running["outcome"] is None and running["finished_at"] is None and running["node"] == "n1"
        read_stream(resp)
    wait_for(lambda: httpx.get(f"{op.url}/jobs/{job_id}").json()["outcome"] == "ok")


def test_jobs_filters_paging_and_bad_queries(sim, operator, node):
    op = operator(api_keys=["k1", "k2"], admin_keys=["root"])
    node(op.url, sim.url, "n1")
    auth = {"authorization": "Bearer k1"}
    wait_for(lambda: node_ids(op.url, headers=auth) == {"n1"})
    assert httpx.get(f"{op.url}/jobs").status_code == 401  # behind the API keys, like inference
    assert httpx.get(f"{op.url}/jobs/x").status_code == 401
    for i in range(5):
        assert infer(op.url, prompt=f"p{i}", model="llama3" if i % 2 else "mistral", headers=auth)[0] == 200
    assert infer(op.url, model="llama9", headers={"authorization": "Bearer k2"})[0] == 404

    def ids(**params) -> list[str]:  # every key's: an admin key's view
        resp = httpx.get(f"{op.url}/jobs", params=params, headers={"authorization": "Bearer root"})
        assert resp.status_code == 200, resp.text
        return [j["model"] for j in resp.json()["jobs"]]

    llama3, mistral, llama9 = "llama3:latest", "mistral:latest", "llama9:latest"  # canonical names
    assert ids() == [llama9, mistral, llama3, mistral, llama3, mistral]  # newest first
    assert ids(model="llama3") == ids(model="Library/Llama3:latest") == [llama3, llama3]
    assert ids(outcome="no_node") == [llama9] and ids(node="n1", limit=2) == [mistral, llama3]
    assert ids(limit=2, offset=4) == [llama3, mistral]
    assert ids(since=(datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()) == []
    assert len(ids(since="2020-01-01T00:00:00Z")) == 6
    callers = {j["caller"] for j in httpx.get(f"{op.url}/jobs", headers={"authorization": "Bearer root"}).json()["jobs"]}
    assert len(callers) == 2 and all(c and "k1" not in c and "k2" not in c for c in callers)  # a hash, never the key
    own = {j["caller"] for j in httpx.get(f"{op.url}/jobs", headers=auth).json()["jobs"]}
    assert len(own) == 1 and own < callers  # a key reads its own receipts only
    for params in ({"since": "yesterday"}, {"outcome": "fine"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}):
        resp = httpx.get(f"{op.url}/jobs", params=params, headers=auth)
        assert resp.status_code == 422 and resp.json()["error"], params
    resp = httpx.get(f"{op.url}/jobs/nope", headers=auth)
    assert resp.status_code == 404 and resp.json() == {"error": "unknown job: nope", "done": True}


def test_an_unusable_jobs_db_stops_the_operator_with_a_clear_message(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"operator_host": "127.0.0.1", "jobs_db": str(tmp_path / "no" / "such" / "jobs.db")}))
    from tests.helpers import Proc, free_port

    with Proc("server.py", env={"ODLA_CONFIG": str(config), "operator_port": str(free_port())}) as proc:
        wait_for(lambda: proc.proc.poll() is not None, timeout=15)
        assert proc.proc.returncode != 0
        assert "cannot open jobs_db" in proc.output() and "Traceback" not in proc.output()


def test_receipts_and_metrics_show_the_schedulers_prediction(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    asks = (("/inference", {"model": "llama3", "prompt": "a", "options": {"num_predict": 4}}, 4),
            ("/api/generate", {"model": "llama3", "prompt": "b", "options": {"num_predict": 5}}, 5),
            ("/v1/chat/completions", {"model": "llama3", "max_tokens": 3, "messages": [{"role": "user", "content": "c"}]},
             3))
    for path, body, tokens in asks:
        resp = httpx.post(f"{op.url}{path}", json=body)
        assert resp.status_code == 200
        guess = httpx.get(f"{op.url}/jobs/{resp.headers[p.JOB_HEADER]}").json()["prediction"]
        assert guess["node"] == "n1" and guess["tokens"] == tokens, path  # the limit it asked for
        parts = guess["wait_s"] + guess["load_s"] + guess["prompt_s"] + guess["run_s"]
        assert guess["finish_s"] == pytest.approx(parts, abs=0.003)
    found = samples(op.url)
    assert total(found, "odla_prediction_error_seconds_count", model="llama3:latest") == 3
    assert total(found, "odla_prediction_error_seconds_bucket", model="llama3:latest", le="+Inf") == 3


def test_receipts_made_before_predictions_are_read_and_gain_them(tmp_path):
    import asyncio
    import sqlite3

    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)  # the table as ODLA 0.x made it, with one receipt
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, started REAL NOT NULL, model TEXT NOT NULL, node TEXT, "
                "door TEXT NOT NULL, outcome TEXT, error TEXT, caller TEXT, first_token REAL, finished REAL, "
                "failovers INTEGER NOT NULL, queue_wait REAL, prompt_tokens INTEGER, output_tokens INTEGER, "
                "total_duration INTEGER, load_duration INTEGER, prompt_eval_duration INTEGER, eval_duration INTEGER)")
    old.execute("INSERT INTO jobs (id, started, model, door, outcome, failovers) VALUES ('old', 1.0, 'm', 'inference', "
                "'ok', 0)")
    old.commit()
    old.close()

    async def main():
        receipts = Receipts(str(path), keep_days=1e6)
        await receipts.open()
        try:
            job = Job(door="inference", model="m", node="n1",
                      prediction=p.JobPrediction(node="n1", finish_s=1.5, wait_s=0.5, load_s=0.0, run_s=1.0, tokens=9))
            job.end("ok")
            receipts.ended(job)
            return await receipts.get("old"), (await receipts.find(node="n1"))[0]
        finally:
            await receipts.aclose()

    before, after = asyncio.run(main())
    assert before.prediction is None and before.outcome == "ok"
    assert after.prediction == p.JobPrediction(node="n1", finish_s=1.5, wait_s=0.5, load_s=0.0, run_s=1.0, tokens=9)
    assert after.prediction.prompt_s == 0.0


def test_receipts_are_kept_for_jobs_keep_days():
    import asyncio

    async def main() -> list[str]:
        now = [1_000_000.0]
        receipts = Receipts(":memory:", keep_days=1, clock=lambda: now[0])
        await receipts.open()
        try:
            for started, name in ((now[0] - 2 * 86400, "old"), (now[0] - 3600, "new")):
                job = Job(door="inference", model=name, started=started)
                job.end("ok")
                receipts.ended(job)
            await receipts.flush()
            receipts.PRUNE_S = 0  # prune at the next round
            receipts.FLUSH_S = 0.01
            task = asyncio.ensure_future(receipts.run())
            await asyncio.sleep(0.1)
            task.cancel()
            return [j.model for j in await receipts.find()]
        finally:
            await receipts.aclose()

    assert asyncio.run(main()) == ["new"]


# --- the pieces ---------------------------------------------------------------------------------

def test_a_tail_reads_ollamas_counts_and_errors_from_the_end_of_any_answer():
    stream = [b'{"model":"m","response":"a \\"eval_count\\":99","done":false}\n',
              b'{"model":"m","response":"","done":true,"context":[1,2,3],"total_duration":500,"load_duration":5,'
              b'"prompt_eval_count":7,"prompt_eval_duration":20,"eval_count":12,"eval_duration":300}\n']
    tail = Tail(limit=64)
    for piece in stream:
        tail.add(piece)
    assert tail.usage() == Usage(7, 12, 500, 5, 20, 300) and tail.error() is None
    sse = Tail()
    sse.add(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    sse.add(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
            b'data: [DONE]\n\n')
    assert sse.usage() == Usage(prompt_tokens=3, output_tokens=4) and sse.error() is None
    failed = Tail()
    failed.add(b'{"response":"a","done":false}\n{"error":"model runner crashed"}\n')
    assert failed.error() == "model runner crashed" and not failed.usage()
    openai_failed = Tail()
    openai_failed.add(b'data: {"error":{"message":"boom","type":"api_error"}}\n\n')
    assert openai_failed.error() == "boom"


def test_a_tail_keeps_only_its_limit():
    tail = Tail(limit=10)
    for i in range(100):
        tail.add(b"%03d" % i)
    assert tail.size < 10 + 3 and tail.bytes().endswith(b"099")


def test_usage_from_a_nodes_stats_drops_what_is_not_a_count():
    assert Usage.from_stats({"prompt_tokens": 3, "output_tokens": -1, "eval_duration": "x", "other": 5}) == \
        Usage(prompt_tokens=3)
    assert Usage.from_stats(None) == Usage() and not Usage()
    assert p.node_done_line({"output_tokens": 2}) == \
        (json.dumps(p.NodeDoneLine(stats={"output_tokens": 2}).model_dump()) + "\n").encode()
    assert p.node_done_line({}) == p.DONE_LINE


def test_durations_print_as_go_prints_them():
    assert [go_duration(ns) for ns in (0, 512, 18_500, 61_145_167, 7_945_641_583, 62_500_000_000,
                                       3_600_000_000_000, 1_000_000)] == \
        ["0s", "512ns", "18.5µs", "61.145167ms", "7.945641583s", "1m2.5s", "1h0m0s", "1ms"]


def test_verbose_stats_in_ollamas_words():
    job = p.JobReceipt(id="abc", model="llama3", node="gpu-1", door="inference", outcome="ok",
                       started_at="2026-11-28T10:00:00.000Z", prompt_tokens=26, output_tokens=290,
                       total_duration=4_500_000_000, load_duration=12_000_000, prompt_eval_duration=100_000_000,
                       eval_duration=4_000_000_000)
    assert verbose_stats(job).splitlines() == [
        "total duration:       4.5s",
        "load duration:        12ms",
        "prompt eval count:    26 token(s)",
        "prompt eval duration: 100ms",
        "prompt eval rate:     260.00 tokens/s",
        "eval count:           290 token(s)",
        "eval duration:        4s",
        "eval rate:            72.50 tokens/s",
        "node:                 gpu-1",
        "job:                  abc"]


def test_jobs_table_reads_well():
    now = datetime(2026, 11, 28, 10, 1, tzinfo=timezone.utc)
    jobs = [p.JobReceipt(id="0123456789abcdef", model="llama3", node="n1", door="inference", outcome="ok",
                         started_at="2026-11-28T10:00:00.000Z", first_token_at="2026-11-28T10:00:00.250Z",
                         finished_at="2026-11-28T10:00:02.500Z", prompt_tokens=5, output_tokens=40),
            p.JobReceipt(id="fedcba9876543210", model="llama9", door="ollama", outcome="no_node",
                         started_at="2026-11-28T10:00:30.000Z", finished_at="2026-11-28T10:00:30.001Z")]
    lines = jobs_table(jobs, now).splitlines()
    assert lines[0].split() == ["JOB", "STARTED", "MODEL", "NODE", "OUTCOME", "TOKENS", "IN/OUT", "FIRST", "TOKEN", "TOTAL"]
    assert lines[1].split() == ["0123456789ab", "60s", "ago", "llama3", "n1", "ok", "5/40", "250ms", "2.50s"]
    assert lines[2].split() == ["fedcba987654", "30s", "ago", "llama9", "-", "no_node", "-", "-", "1ms"]
    assert jobs_table([]) == "no jobs"


def test_activity_counts_jobs_and_tokens_per_step_and_forgets_the_old():
    now = [1000.0]
    activity = Activity(step=5, span=30, clock=lambda: now[0])
    job = Job(door="inference", usage=Usage(output_tokens=7))
    activity.add(job)
    activity.add(job)
    now[0] += 10
    activity.add(job)
    series = activity.series()
    assert series["requests"] == [0, 0, 0, 2, 0, 1] and series["output_tokens"] == [0, 0, 0, 14, 0, 7]
    now[0] += 100  # longer than the span: all gone
    assert activity.series()["requests"] == [0] * 6


def test_the_client_prints_stats_with_verbose_and_lists_jobs(net):
    sim = net.sim("--tokens", "5")
    net.operator()
    net.node("n1", sim)
    net.wait_nodes("n1")
    done = subprocess.run([sys.executable, "client.py", "why?", "--verbose", "--operator", net.op_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(sim_tokens("why?", 5)) + "\n"  # stdout is the answer, nothing else
    stats = dict(line.split(":", 1) for line in done.stderr.strip().splitlines())
    assert stats["eval count"].strip() == "5 token(s)" and stats["prompt eval count"].strip() == "1 token(s)"
    assert stats["eval rate"].strip().endswith("tokens/s") and stats["total duration"].strip()
    assert stats["node"].strip() == "n1"
    job_id = stats["job"].strip()
    listed = subprocess.run([sys.executable, "client.py", "jobs", "--operator", net.op_url], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:6] == [job_id[:12], *listed.stdout.splitlines()[1].split()[1:3],
                                                         "llama3:latest", "n1", "ok"]
    as_json = subprocess.run([sys.executable, "client.py", "jobs", "--json", "--operator", net.op_url], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["jobs"][0]["id"] == job_id
