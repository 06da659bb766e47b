import json

import pytest
from pydantic import ValidationError

from odla.core import protocol as p
from odla.core.names import display_name, model_key


@pytest.mark.parametrize("token", ["Hello", " world", "", "quote \" and \\ back", "naïve 東京 🚀", "line\nbreak\t"])
def test_hand_encoded_token_line_equals_the_model(token):
    line = p.token_line(token)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == p.TokenLine(token=token).model_dump()
    assert line == (json.dumps({"token": token, "done": False}, ensure_ascii=False) + "\n").encode()


def test_final_lines_match_the_spec():
    assert p.DONE_LINE == (json.dumps(p.DoneLine().model_dump()) + "\n").encode()
    assert json.loads(p.error_line("Model not found")) == {"error": "Model not found", "done": True}


def test_parse_line_tells_the_three_kinds_apart():
    assert p.parse_line(b'{"token": "a", "done": false}') == p.TokenLine(token="a")
    assert p.parse_line('{"done": true}') == p.DoneLine()
    assert p.parse_line('{"error": "x", "done": true}') == p.ErrorLine(error="x")
    with pytest.raises(ValueError):
        p.parse_line("[1, 2]")
    assert p.final_line(b'{"done": true}\n') == {"done": True}
    assert p.final_line(b'{"token": "a", "done": false}') is None and p.final_line(b'{"done": tr') is None
    assert p.final_line(b'[{"done": true}]') is None


@pytest.mark.parametrize("body", [
    {"node_id": "bad id", "url": "http://x:1", "models": []},
    {"node_id": "x" * 129, "url": "http://x:1", "models": []},
    {"node_id": "n", "url": "ftp://x", "models": []},
    {"node_id": "n", "url": "http://", "models": []},
    {"node_id": "n", "url": "http://x:1", "models": [""]},
    {"node_id": "n", "url": "http://x:1", "models": [], "extra": 1},
])
def test_register_rejects_bad_bodies(body):
    with pytest.raises(ValidationError):
        p.RegisterRequest.model_validate(body)


def test_register_normalises_url():
    body = p.RegisterRequest(node_id="a.b-c_1", url="http://10.0.0.2:8001/", models=["llama3"])
    assert body.url == "http://10.0.0.2:8001"


@pytest.mark.parametrize("name", ["llama3", "llama3:latest", "library/llama3", "Llama3",
                                  "registry.ollama.ai/library/llama3:latest"])
def test_model_names_resolve_like_ollama(name):
    assert model_key(name) == "llama3:latest"


def test_model_names_keep_namespaces_and_tags():
    assert model_key("user/model") == "user/model:latest"
    assert model_key("llama3:8b") != model_key("llama3")
    assert model_key("host:5000/ns/m") == "host:5000/ns/m:latest"
    assert display_name("library/Llama3") == "Llama3:latest"
