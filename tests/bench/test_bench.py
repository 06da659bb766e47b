"""The benchmark runs end to end (tiny loads; figures come from `make bench`, not from tests).

Each starts a dozen processes and waits for them with deadlines, so they run alone (``solo``): beside
busy test workers, nodes took longer than the relay run's 30 s to register.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def bench_run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python bench/… args`` in a process group of its own: should it be stopped (its deadline, or
    the test's), the whole group goes with it, the processes it started too, not only the script."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def smoke_run(tmp_path, script: str, timeout: float = 180) -> tuple[dict, str]:
    """``bench/<script> --smoke``: what it wrote, and what it printed."""
    out = tmp_path / "result.json"
    result = bench_run([f"bench/{script}", "--smoke", "--out", str(out)], timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


@pytest.mark.solo
def test_benchmark_smoke_run(tmp_path):
    data, printed = smoke_run(tmp_path, "relay_bench.py")
    assert set(data["shapes"]) == {"serial", "paced-100", "saturation-50", "open-1000", "burst-100"}
    for shape in data["shapes"].values():
        assert shape["odla"]["failures"] == shape["odla-dial"]["failures"] == shape["direct"]["failures"] == 0
        assert shape["odla"]["tokens"] == shape["odla-dial"]["tokens"] == shape["direct"]["tokens"] > 0
        assert shape["odla"]["cpu_us_per_token_operator"] > 0 and shape["odla-dial"]["cpu_us_per_token_operator"] > 0
        assert shape["odla"]["cpu_us_per_request_operator"] >= shape["odla"]["cpu_us_per_token_operator"]
    assert "dial link / http link" in printed
    assert "ttft p50 ms" in printed and data["peak_rss_mb"]["operator"] > 0


@pytest.mark.solo
def test_floors_benchmark_smoke_run(tmp_path):
    data, printed = smoke_run(tmp_path, "floors.py")
    assert set(data["servers_us_per_request"]) == {"ASGI", "FastAPI", "LineStream"}
    assert all(cost > 0 for cost in data["servers_us_per_request"].values())
    assert set(data["clients_us_per_request"]) == {"aiohttp", "httpx, keeping all", "httpx, keeping 2"}
    assert all(cost > 0 for by in data["clients_us_per_request"].values() for cost in by.values())
    assert set(data["relays_us_per_token_and_request"]) == {"ASGI relay", "FastAPI relay"}
    assert all(cost > 0 for by in data["relays_us_per_token_and_request"].values() for cost in by)
    assert "LineStream on uvicorn" in printed and "FastAPI relay" in printed


@pytest.mark.solo
def test_cluster_benchmark_smoke_run(tmp_path):
    """Every router is driven with the same arrivals, ODLA and the router told the truth lose none of
    them, and ODLA is judged against the truth."""
    data, printed = smoke_run(tmp_path, "cluster_bench.py", timeout=240)
    odla, truth = data["results"]["odla"], data["results"]["truth"]
    assert odla["sent"] == data["requests"] > 0
    for router in (odla, truth):
        assert router["completed"] == router["sent"] and router["errors"] == router["gave_up"] == 0
        assert sum(router["share"].values()) >= router["sent"]
    assert all(r["sent"] == data["requests"] for r in data["results"].values())
    assert data["against_truth"]["runs"]["odla"]["all_completed"] and "the truth's" in printed
    assert set(data["scheduling_us_per_job"]) == {"4", "100"}


def test_multiturn_benchmark_smoke_run(tmp_path):
    """Both runs answer every turn; with affinity the simulators find the conversations cached."""
    data, printed = smoke_run(tmp_path, "multiturn_bench.py")
    plan, on, off = data["plan"], data["results"]["affinity"], data["results"]["no affinity"]
    for run in (on, off):
        assert run["turns"] == plan["conversations"] * plan["turns"] and run["errors"] == 0
    assert on["cached_share"] > off["cached_share"] and "lower with affinity" in printed


@pytest.mark.solo
def test_hostile_benchmark_smoke_run(tmp_path):
    """Every attack runs, the honest client is served throughout, and the targets are checked."""
    data, _ = smoke_run(tmp_path, "hostile_bench.py")
    attackers, load = data["attackers"], data["load"]
    assert attackers["registrations_401"] == load["registrations"]
    assert attackers["never_reading_open"] == attackers["never_reading_streaming"] == load["readers"]
    assert attackers["silent_open_max"] == load["silent"]
    assert attackers["fat_health_answers"] >= 2
    assert data["honest_under_attack_s"]["count"] >= 5 and all(data["targets"].values())


@pytest.mark.solo
def test_chaos_benchmark_smoke_run(tmp_path):
    """A short chaos run: faults happen, every request is accounted for, and the counts agree."""
    data, printed = smoke_run(tmp_path, "chaos_bench.py")
    assert data["requests"] == data["plan"]["requests"] == sum(data["finals"].values())
    assert data["faults"] and "target 0 tokens lost" in printed
    assert data["no_final_line"] == data["lines_after_final"] == 0
    assert not any(data["slots_held"].values())
    assert data["receipts_output_tokens"] == data["metrics_output_tokens"] > 0
    assert data["tokens_lost"] == data["receipts_missing"] == data["receipt_vs_client_mismatches"] == 0


@pytest.mark.solo
def test_capacity_benchmark_smoke_run(tmp_path):
    """A learning node in front of a simulator of 3: every request answered, from one slot up."""
    out = tmp_path / "capacity.json"
    result = bench_run(["bench/capacity_bench.py", "--smoke", "--parallel", "3", "--out", str(out)], 180)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    run = data["results"]["learned"]
    assert run["answered"] == data["plan"]["requests"] and run["gave_up"] == 0, run
    assert data["results"]["learned"]["slots_over_time"][0][1] == 1  # it started at one slot
    assert "reached 2 slots" in result.stdout


def test_proofs_benchmark_smoke_run(tmp_path):
    """In one process, no network: not solo. Its figures (1,000,000 receipts) come from make bench."""
    data, printed = smoke_run(tmp_path, "proofs_bench.py")
    assert data["countersign_us_per_job"] > 0 and data["merkle_leaves"] == 10_000 and data["proof_steps"] == 14
    assert "client.py verify --file" in printed and "target" in printed


@pytest.mark.solo
def test_audits_benchmark_smoke_run(tmp_path):
    """Thirteen processes: alone. Its figures (20 runs of up to 300 jobs) come from make bench."""
    data, printed = smoke_run(tmp_path, "audits_bench.py")
    run = data["runs"][0]
    assert run["client_jobs"] >= 6 and run["failed_requests"] == 0 and set(run["jobs_per_node"]) >= {"honest-1"}
    assert "honest nodes quarantined" in printed and "every cheater quarantined" in printed


@pytest.mark.solo
@pytest.mark.timeout(180)
def test_settlement_benchmark_smoke_run(tmp_path):
    """A chain, an operator and eight processes: alone. Its figures (10,000 jobs) come from make bench."""
    data, printed = smoke_run(tmp_path, "settlement_bench.py", timeout=300)
    assert data["books"]["agree"], data["books"]["problems"]
    assert data["books"]["charges"] > 0 and data["books"]["charged_on_chain"] == data["books"]["paid_out"] > 0
    assert "ledger, chain and receipts agree after 200 jobs: yes" in printed


@pytest.mark.solo
def test_resume_benchmark_smoke_run(tmp_path):
    """Nodes killed, stopped and erring under load: every answer whole, every kind of fault resumed."""
    data, printed = smoke_run(tmp_path, "resume_bench.py")
    assert data["jobs"] == data["whole"] == data["plan"]["jobs"] and data["lost"] == data["repeated"] == 0
    assert {"kill", "stop", "error"} <= set(data["gaps"]) and data["resumes_total"]["ok"] == data["resumed"]
    assert "gap p95" in printed
