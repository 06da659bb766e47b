"""The client: its streaming core alone, then the CLI against a real operator and node."""

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

import client
from odla import protocol as p
from odla.streaming import StreamError, tokens
from sim.ollama_sim import sim_tokens
from tests.helpers import ROOT, node_ids, wait_for

runner = CliRunner()


def cli(*args, input=None, env=None):
    return runner.invoke(client.app, client.with_default_command(list(args)), input=input,
                         env={"ODLA_API_KEY": "", **(env or {})})


# --- the pure core ---------------------------------------------------------------

def test_tokens_stop_at_the_final_line():
    lines = [p.token_line("a"), b"", p.token_line(" b"), p.DONE_LINE, p.token_line("never")]
    assert list(tokens(lines)) == ["a", " b"]


def test_a_queued_place_is_heard_not_printed():
    places = []
    lines = ['{"queued": 3, "done": false}', '{"queued": 1, "done": false}', '{"token": "a", "done": false}',
             '{"done": true}']
    assert list(tokens(lines, places.append)) == ["a"]
    assert places == [3, 1]


def test_tokens_raise_the_error_line():
    got = []
    with pytest.raises(StreamError, match="boom"):
        for t in tokens([p.token_line("a"), p.error_line("boom")]):
            got.append(t)
    assert got == ["a"]  # what came before the error was still shown


def test_tokens_refuse_a_stream_without_final_line_or_garbage():
    with pytest.raises(StreamError, match="before its final line"):
        list(tokens([p.token_line("a")]))
    with pytest.raises(StreamError, match="not ODLA's protocol"):
        list(tokens([b"<html>"]))


def test_default_command_is_infer():
    assert client.with_default_command(["hi", "--model", "x"]) == ["infer", "hi", "--model", "x"]
    assert client.with_default_command(["nodes"]) == ["nodes"]
    assert client.with_default_command(["infer", "hi"]) == ["infer", "hi"]
    assert client.with_default_command(["--help"]) == ["--help"]


def test_nodes_table_reads_well():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    listing = p.NodesResponse(nodes=[
        p.NodeInfo(node_id="gpu1", url="http://10.0.0.2:8001", models=["llama3:latest", "mistral:latest"],
                   last_seen=(now - timedelta(seconds=7)).isoformat(), healthy=True, active_jobs=2),
        p.NodeInfo(node_id="lap", url="http://10.0.0.3:8001", models=[], last_seen="2025-12-31T23:55:00Z",
                   healthy=False),
    ])
    table = client.nodes_table(listing, now).splitlines()
    assert table[0].split() == ["NODE", "URL", "MODELS", "SEEN", "HEALTH", "JOBS"]
    assert "llama3:latest, mistral:latest" in table[1] and "7s ago" in table[1] and table[1].endswith("2")
    assert "5m ago" in table[2] and "UNHEALTHY" in table[2]
    assert client.nodes_table(p.NodesResponse(nodes=[])) == "no nodes registered"


# --- the CLI against real servers -------------------------------------------------

@pytest.fixture
def network(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    return op


def test_prompt_with_default_command(network):
    result = cli("Explain quantum entanglement", "--model", "llama3", "--operator", network.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(sim_tokens("Explain quantum entanglement", 6)) + "\n"


def test_explicit_infer_and_operator_from_environment(network):
    result = cli("infer", "hi", "--model", "llama3", env={"ODLA_OPERATOR_URL": network.url})
    assert result.exit_code == 0 and result.stdout.strip() == "".join(sim_tokens("hi", 6))


def test_prompt_from_stdin(network):
    result = cli("-", "--model", "llama3", "--operator", network.url, input="from a pipe\n")
    assert result.exit_code == 0 and result.stdout.strip() == "".join(sim_tokens("from a pipe\n", 6))


def test_show_node_names_the_serving_node_on_stderr(network):
    result = cli("hi", "--model", "llama3", "--operator", network.url, "--show-node")
    assert result.exit_code == 0 and result.stderr.strip() == "[node n1]"
    assert result.stdout.strip() == "".join(sim_tokens("hi", 6))  # stdout stays the answer alone


def test_nodes_table_and_json(network):
    result = cli("nodes", "--operator", network.url)
    assert result.exit_code == 0 and "n1" in result.stdout and "healthy" in result.stdout
    result = cli("nodes", "--operator", network.url, "--json")
    assert result.exit_code == 0 and '"node_id": "n1"' in result.stdout


def test_error_line_exits_1_with_the_message(network, sim):
    sim.configure(error_after=1, error_message="CUDA out of memory")
    result = cli("hi", "--model", "llama3", "--operator", network.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: CUDA out of memory"
    assert result.stdout == sim_tokens("hi", 6)[0] + "\n"  # what came, on a line of its own
    assert "Traceback" not in result.output


def test_no_node_exits_1_with_the_operators_message(network):
    result = cli("hi", "--model", "llama9", "--operator", network.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: No node available with model: llama9"


def test_unreachable_operator_exits_2_and_says_how_to_start_it():
    result = cli("hi", "--operator", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "http://127.0.0.1:9" in result.stderr and "python server.py" in result.stderr
    assert cli("nodes", "--operator", "http://127.0.0.1:9").exit_code == 2


def test_help_lists_both_commands():
    result = cli("--help")
    assert result.exit_code == 0 and "infer" in result.stdout and "nodes" in result.stdout


def _client_process(network, prompt):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ODLA_API_KEY": ""}
    return subprocess.Popen([sys.executable, "client.py", prompt, "--model", "llama3", "--operator", network.url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_tokens_reach_stdout_before_the_stream_ends(network, sim):
    sim.configure(hold_last=True)
    expected = sim_tokens("live", 6)
    proc = _client_process(network, "live")
    try:
        first = proc.stdout.read(len(expected[0]))  # blocks until printed: held last token or not
        assert first.decode() == expected[0]
        assert proc.poll() is None  # still streaming
        sim.release()
        rest = proc.stdout.read()  # through the same buffered reader that read the first token
        assert (first + rest).decode() == "".join(expected) + "\n" and proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_exits_130_and_closes_the_connection(network, sim):
    sim.configure(hold_last=True)
    proc = _client_process(network, "stop me")
    try:
        assert proc.stdout.read(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 130 and b"Traceback" not in err
        wait_for(lambda: sim.stats()["cancelled"] == 1, timeout=5)
    finally:
        proc.kill()
        proc.wait()


def test_a_queued_job_shows_its_place_on_stderr(network, sim):
    """The node has one slot (num_parallel 1 by default); a second job waits and says so."""
    import threading

    import httpx

    sim.configure(hold_last=True)
    with httpx.stream("POST", f"{network.url}/inference", json={"model": "llama3", "prompt": "first"},
                      timeout=10) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes its connection
        next(lines)
        threading.Timer(1.5, sim.release).start()
        result = cli("second", "--model", "llama3", "--operator", network.url)
    assert result.exit_code == 0, result.output
    assert "[queued: next in line]" in result.stderr
    assert result.stdout == "".join(sim_tokens("second", 6)) + "\n"
