"""The client: its streaming core alone, then the CLI against a real operator and node."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from typer.testing import CliRunner

import client
from odla.core import protocol as p
from odla.client.streaming import StreamError, tokens
from odla.client.tables import nodes_table
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
    assert client.with_default_command([], interactive=True) == ["chat"]  # as `ollama run` opens a chat
    assert client.with_default_command([]) == []  # piped: the help


def test_nodes_table_reads_well():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    listing = p.NodesResponse(nodes=[
        p.NodeInfo(node_id="gpu1", url="http://10.0.0.2:8001", models=["llama3:latest", "mistral:latest"],
                   last_seen=(now - timedelta(seconds=7)).isoformat(), healthy=True, active_jobs=2, jobs_total=40,
                   address="0x5B38Da6a701c568545dCfcB03FcB875f56beddC4", reputation=0.2, quarantined=True),
        p.NodeInfo(node_id="lap", url="http://10.0.0.3:8001", models=[], last_seen="2025-12-31T23:55:00Z",
                   healthy=False),
    ])
    table = nodes_table(listing, now).splitlines()
    # the columns a script may read stay where they were; new ones go last
    assert table[0].split() == ["NODE", "URL", "MODELS", "SEEN", "HEALTH", "ACTIVE", "TOTAL", "KEY", "REPUTATION"]
    assert "llama3:latest, mistral:latest" in table[1] and "7s ago" in table[1]
    assert table[1].split()[-5:] == ["2", "40", "0x5B38…ddC4", "0.20", "QUARANTINED"]
    assert "5m ago" in table[2] and "UNHEALTHY" in table[2] and table[2].split()[-2:] == ["-", "1.00"]  # unsigned
    assert nodes_table(p.NodesResponse(nodes=[])) == "no nodes registered"


# --- the CLI against real servers -------------------------------------------------

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
    assert result.stderr.strip() == "error: No node available with model: llama9 (the network has llama3:latest, mistral:latest)"


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
    """The node has one slot (num_parallel 1 by default); a second job waits and says so, and
    ``--show-node`` names its node after the answer (it was chosen after the headers left)."""
    import threading

    import httpx

    sim.configure(hold_last=True)
    with httpx.stream("POST", f"{network.url}/inference", json={"model": "llama3", "prompt": "first"},
                      timeout=10) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes its connection
        next(lines)
        threading.Timer(1.5, sim.release).start()
        result = cli("second", "--model", "llama3", "--operator", network.url, "--show-node")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["[queued: next in line]", "[node n1]"], result.stderr
    assert result.stdout == "".join(sim_tokens("second", 6)) + "\n"


# --- as good as ollama run (issue 14) ----------------------------------------------

def test_the_operator_can_be_given_as_ollama_host_is():
    from odla.client.errors import Failure, operator_url
    assert operator_url("localhost:8100") == "http://localhost:8100"
    assert operator_url(":8100") == "http://localhost:8100"
    assert operator_url("gpu-box") == "http://gpu-box:8000"  # no scheme: ODLA's port, as Ollama's 11434
    assert operator_url("https://odla.example/") == "https://odla.example"  # a scheme: its own port
    assert operator_url("https://odla.example/odla/") == "https://odla.example/odla"  # behind a proxy
    assert operator_url("http://10.0.0.2:9000") == "http://10.0.0.2:9000"
    for bad in ("ftp://x:1", "http://", "host:port", "http://h:1?x=1", "http://a b:1"):
        with pytest.raises(Failure) as caught:
            operator_url(bad)
        assert caught.value.code == 2 and "not an operator's address" in str(caught.value)


def test_host_port_without_a_scheme_reaches_the_operator(network):
    port = network.url.rsplit(":", 1)[1]
    result = cli("hi", "--model", "llama3", "--operator", f"127.0.0.1:{port}")
    assert result.exit_code == 0 and result.stdout.strip() == "".join(sim_tokens("hi", 6))
    result = cli("hi", "--operator", "ftp://nowhere")
    assert result.exit_code == 2 and "not an operator's address" in result.stderr


def test_prompt_options_reach_ollama(network, sim):
    result = cli("hi", "--model", "llama3", "--operator", network.url, "--system", "be brief", "--format", "json",
                 "--temperature", "0.2", "-o", "num_ctx=8192", "-o", "stop=[\"\\n\"]", "--option", "mirostat_tau=x",
                 "--keepalive", "10m")
    assert result.exit_code == 0, result.output
    last = httpx.get(f"{sim.url}/_sim/last").json()
    assert last["system"] == "be brief" and last["format"] == "json" and last["keep_alive"] == "10m"
    assert isinstance(last["options"].pop("seed"), int)  # the operator's (audit_seed)
    assert last["options"] == {"num_ctx": 8192, "stop": ["\n"], "mirostat_tau": "x", "temperature": 0.2}
    result = cli("hi", "--operator", network.url, "--option", "novalue")
    assert result.exit_code == 2 and "key=value" in result.stderr


def test_a_prompt_that_starts_with_a_dash(network):
    result = cli("-1 is a number", "--model", "llama3", "--operator", network.url)
    assert result.exit_code == 0 and result.stdout.strip() == "".join(sim_tokens("-1 is a number", 6))
    result = cli("--model", "llama3", "--operator", network.url, "--", "-x")
    assert result.exit_code == 0 and result.stdout.strip() == "".join(sim_tokens("-x", 6))


def test_a_missing_api_key_names_the_option(sim, operator, node):
    op = operator(api_keys=["k"])
    result = cli("hi", "--operator", op.url)
    assert result.exit_code == 1 and "--api-key" in result.stderr and "ODLA_API_KEY" in result.stderr


def test_something_that_is_not_an_operator_is_called_so(sim):
    for args in (("hi",), ("nodes",), ("list",)):
        result = cli(*args, "--operator", sim.url)  # Ollama itself
        assert result.exit_code == 2 and "is not an ODLA operator" in result.stderr, args


def test_list_ps_and_show(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    node(op.url, sim.url, "n2")
    wait_for(lambda: node_ids(op.url) == {"n1", "n2"})
    assert cli("hi", "--model", "llama3", "--operator", op.url).exit_code == 0
    listed = cli("list", "--operator", op.url)
    assert listed.exit_code == 0
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["NAME", "NODES", "LOADED", "ON", "WHERE"] and ["llama3:latest", "2"] == rows[1][:2]
    assert ["mistral:latest", "2", "0", "n1,n2"] == rows[2]
    wait_for(lambda: "llama3:latest" in cli("ps", "--operator", op.url).stdout)  # after the node's next report
    ps = cli("ps", "--operator", op.url, "--json")
    assert {m["name"] for m in json.loads(ps.stdout)["models"]} == {"llama3:latest"}
    shown = cli("show", "llama3", "--operator", op.url)
    assert shown.exit_code == 0 and "Model" in shown.stdout and "quantization level" in shown.stdout
    missing = cli("show", "llama9", "--operator", op.url)
    assert missing.exit_code == 1 and "llama9" in missing.stderr


def test_help_version_and_defaults_shown():
    assert cli("-h").exit_code == 0 and "chat" in cli("-h").stdout
    assert cli("--version").stdout.startswith("client.py (ODLA) ")
    text = runner.invoke(client.app, ["infer", "--help"], env={"COLUMNS": "200"}).stdout
    assert "default_model in config.json" in text and "operator_url in config.json" in text
    assert "<bool>" not in next(line for line in text.splitlines() if "--show-node" in line)


def test_a_bad_node_setting_does_not_break_the_client(network):
    result = cli("hi", "--model", "llama3", "--operator", network.url, env={"NODE_PORT": "abc"})
    assert result.exit_code == 0, result.output


def test_the_scripts_have_a_small_cli(tmp_path):
    for script in ("server.py", "node.py"):
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0 and "--port" in done.stdout and "--config" in done.stdout
        bad = subprocess.run([sys.executable, script, "--port", "x"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode == 2 and "invalid int value" in bad.stderr
    from tests.helpers import Proc, free_port
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"operator_host": "127.0.0.1", "jobs_db": ":memory:"}))
    port = free_port()
    with Proc("server.py", "--config", str(config), "--port", str(port)):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, timeout=15)


def chat(args, lines: str, *, env=None, timeout=60, signal_after=None):
    proc = subprocess.Popen([sys.executable, "client.py", "chat", *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        return proc.communicate(lines, timeout=timeout) + (proc.returncode,)
    finally:
        proc.kill()
        proc.wait()


def test_chat_keeps_the_conversation_and_leaves_on_bye(network, sim):
    out, err, code = chat(["--model", "llama3", "--operator", network.url, "--system", "short"],
                          "first question\nsecond\n/bye\nnever asked\n")
    assert code == 0, err
    last = httpx.get(f"{sim.url}/_sim/last").json()
    assert [(m["role"], m["content"]) for m in last["messages"]] == [
        ("system", "short"), ("user", "first question"), ("assistant", "".join(sim_tokens("first question", 6))),
        ("user", "second")]
    assert out.count("\n\n") >= 2 and "never asked" not in json.dumps(last)


def test_chat_clear_forgets_and_ctrl_d_leaves(network, sim):
    out, err, code = chat(["--model", "llama3", "--operator", network.url], "one\n/clear\ntwo\n/nope\n")
    assert code == 0 and "Cleared session context" in err and "Unknown command '/nope'" in err
    assert [m["content"] for m in httpx.get(f"{sim.url}/_sim/last").json()["messages"]] == ["two"]


@pytest.mark.solo  # a signal's timing against a stream: alone, not beside a busy worker
def test_ctrl_c_stops_one_answer_and_the_chat_goes_on(network, sim):
    sim.configure(delay=0.3, tokens=20)
    proc = subprocess.Popen([sys.executable, "client.py", "chat", "--model", "llama3", "--operator", network.url],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("a long one\n")
        proc.stdin.flush()
        wait_for(lambda: httpx.get(f"{network.url}/nodes").json()["nodes"][0]["active_jobs"] == 1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        # the answer stopped: the job ends at the operator (and so at the node and Ollama)
        wait_for(lambda: httpx.get(f"{network.url}/nodes").json()["nodes"][0]["active_jobs"] == 0, timeout=10)
        sim.configure(delay=0.0, tokens=6)
        out, err = proc.communicate("after\n", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "[stopped]" in err
    assert out.rstrip().endswith("".join(sim_tokens("after", 6)))
    # the stopped exchange is forgotten: the model sees only what was answered
    assert [m["content"] for m in httpx.get(f"{sim.url}/_sim/last").json()["messages"]] == ["after"]


def test_the_spinner_spins_on_a_terminal_only():
    import io

    from odla.client.terminal import Spinner

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    with Spinner(tty, interval=0.01) as spinner:
        spinner.say("queued: next in line")
        time.sleep(0.1)
    assert "queued: next in line" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    with Spinner(pipe, interval=0.01):
        time.sleep(0.05)
    assert pipe.getvalue() == ""


def test_colour_on_a_terminal_only_and_never_with_no_color(monkeypatch):
    import io

    from odla.client.tables import table
    from odla.client.terminal import colour_wanted

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert colour_wanted(Tty()) and not colour_wanted(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colour_wanted(Tty())
    assert table([("A", "B"), ("1", "2")], bold_heading=True).startswith("\x1b[1mA  B\x1b[0m\n")
    assert "\x1b" not in table([("A", "B"), ("1", "2")])
    cut = table([("NAME", "MODELS"), ("n1", "x" * 100)], width=40).splitlines()
    assert len(cut[1]) == 40 and cut[1].endswith("…")  # a terminal's width; never cut when piped
    piped = cli("nodes", "--operator", "http://127.0.0.1:9")  # not a terminal: no colour in the error either
    assert piped.stderr.startswith("error: ")

