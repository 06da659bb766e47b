"""Ollama's generate stream turned into protocol lines, piece by piece, as the SDK would read it."""

import asyncio
import json

import ollama
import pytest

from odla.core import protocol as p
from odla.node.generation import MAX_LINE, GenerateLines


def ollama_line(**fields) -> bytes:
    message = {"model": "llama3:latest", "created_at": "2026-12-03T00:00:00Z", **fields}
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"  # UTF-8 unescaped, as Go writes it


def test_tokens_come_as_protocol_lines_whatever_the_pieces():
    body = (ollama_line(response="Hel", done=False) + ollama_line(response='lo "yóu" 🦙\n', done=False)
            + ollama_line(response="", done=True, done_reason="stop", eval_count=2, eval_duration=10))
    for size in (1, 7, len(body)):  # split anywhere, even inside a line or a multi-byte character
        lines = GenerateLines("llama3")
        out = b"".join(lines.take(body[i:i + size]) for i in range(0, len(body), size))
        assert out == p.token_line("Hel") + p.token_line('lo "yóu" 🦙\n')
        assert lines.tokens == 2 and lines.final["eval_count"] == 2 and lines.model == "llama3:latest"
        assert lines.error is None


def test_nothing_is_read_past_the_last_line():
    lines = GenerateLines("llama3")
    assert lines.take(ollama_line(response="", done=True) + ollama_line(response="late", done=False)) == b""
    assert lines.ended and lines.tokens == 0


def test_an_error_line_ends_the_answer_as_the_sdk_raises_it():
    lines = GenerateLines("llama3")
    out = lines.take(ollama_line(response="a", done=False) + b'{"error": "model crashed"}\n'
                     + ollama_line(response="b", done=False))
    assert out == p.token_line("a")
    assert isinstance(lines.error, ollama.ResponseError) and lines.error.error == "model crashed"
    assert lines.ended and lines.final is None


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"response": 5, "done": false}\n'])
def test_what_is_not_ollamas_api_is_a_value_error(line):
    with pytest.raises(ValueError):
        GenerateLines("llama3").take(line)


def test_a_line_that_never_ends_is_not_held_without_bound():
    lines = GenerateLines("llama3")
    with pytest.raises(ValueError):
        for _ in range(MAX_LINE // 65536 + 2):
            lines.take(b"x" * 65536)


def test_a_last_line_without_its_newline_is_read_at_the_end():
    lines = GenerateLines("llama3")
    assert lines.take(ollama_line(response="a", done=False) + ollama_line(response="b", done=True)[:-1]) \
        == p.token_line("a")
    assert not lines.ended
    assert lines.end() == p.token_line("b") and lines.final is not None
    assert lines.end() == b""


def test_read_goes_on_to_the_next_piece_with_tokens_and_stops_at_the_end():
    async def body(*pieces: bytes):
        for piece in pieces:
            yield piece

    async def run() -> list[bytes]:
        lines = GenerateLines("llama3")
        chunks = body(b'{"response": "a", "do', b'ne": false}\n', b"\n", ollama_line(response="b", done=False)[:-1])
        got = [await lines.read(chunks) for _ in range(3)]
        assert not lines.ended
        return got

    assert asyncio.run(run()) == [p.token_line("a"), p.token_line("b"), b""]
