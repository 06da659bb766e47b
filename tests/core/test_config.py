import json

import pytest

from odla.core.config import ConfigError, load_settings


def test_spec_config_json_loads_with_defaults(tmp_path):
    conf = load_settings(env={})
    assert (conf.operator_url, conf.operator_port, conf.node_port) == ("http://localhost:8000", 8000, 8001)
    assert conf.health_check_interval == 30 and conf.health_check_timeout == 5
    assert conf.prune_after == 60  # SPEC: nodes not responding for 60 seconds are pruned


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"operator_port": 9000, "node_port": 9001}))
    conf = load_settings(env={"ODLA_CONFIG": str(path), "operator_port": "9100", "NODE_ID": "gpu-1",
                              "COORDINATOR_URL": "http://op:8000/", "OLLAMA_HOST": "box:11434",
                              "ODLA_API_KEYS": "a, b"})
    assert conf.operator_port == 9100 and conf.node_port == 9001 and conf.node_id == "gpu-1"
    assert conf.operator_url == "http://op:8000" and conf.ollama_host == "box:11434"
    assert conf.api_keys == ["a", "b"]
    assert "api_keys" not in repr(conf)  # secrets stay out of logs


def test_upper_case_operator_port(tmp_path):
    assert load_settings(env={"OPERATOR_PORT": "8100"}).operator_port == 8100


@pytest.mark.parametrize("env, needle", [
    ({"NODE_PORT": "abc"}, "NODE_PORT"),
    ({"operator_port": "70000"}, "operator_port"),
    ({"COORDINATOR_URL": "ftp://op:8000"}, "COORDINATOR_URL"),
    ({"NODE_ID": "has space"}, "NODE_ID"),
])
def test_bad_values_name_their_key(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(env=env)


def test_bad_file_values_name_file_and_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"health_check_interval": -1, "helth_check": 3}))
    with pytest.raises(ConfigError) as info:
        load_settings(env={"ODLA_CONFIG": str(path)})
    assert "health_check_interval" in str(info.value) and "helth_check: unknown setting" in str(info.value)


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={"ODLA_CONFIG": str(tmp_path / "nope.json")})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings(env={"ODLA_CONFIG": str(tmp_path / "bad.json")})


def test_jobs_db_is_next_to_the_config_file(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"jobs_keep_days": 7}))
    conf = load_settings(env={"ODLA_CONFIG": str(path)})
    assert conf.jobs_db == str(path.parent / "jobs-8000.db") and conf.jobs_keep_days == 7  # named for its port
    second = load_settings(env={"ODLA_CONFIG": str(path), "OPERATOR_PORT": "8100"})
    assert second.jobs_db == str(path.parent / "jobs-8100.db")  # a second operator in the folder: its own
    assert load_settings(env={"ODLA_CONFIG": str(path), "ODLA_JOBS_DB": ":memory:"}).jobs_db == ":memory:"
    assert load_settings(env={"ODLA_CONFIG": str(path), "ODLA_JOBS_DB": "/data/jobs.db"}).jobs_db == "/data/jobs.db"
    monkeypatch.chdir(tmp_path)  # relative to the config file, not to where the operator was started
    assert load_settings(env={"ODLA_CONFIG": str(path), "ODLA_JOBS_DB": "r.db"}).jobs_db == str(path.parent / "r.db")
    with pytest.raises(ConfigError, match="jobs_keep_days"):
        load_settings(env={"ODLA_CONFIG": str(path)}, jobs_keep_days=0)


def test_the_config_file_takes_the_operator_as_host_port_as_the_cli_does(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"operator_url": "gpu-box:8100"}))
    assert load_settings(path, env={}).operator_url == "http://gpu-box:8100"
    path.write_text(json.dumps({"operator_url": "gpu-box, :8200"}))  # a node's several operators
    assert load_settings(path, env={}).operator_urls == ["http://gpu-box:8000", "http://localhost:8200"]
    path.write_text(json.dumps({"operator_url": "ftp://gpu-box"}))
    with pytest.raises(ConfigError, match="operator_url.*not an operator's address"):
        load_settings(path, env={})
