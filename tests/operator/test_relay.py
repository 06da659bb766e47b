"""odla.operator.relay's reading of a node's /run stream: whole lines, the final line's counts taken off."""

from odla.core import protocol as p
from odla.serving.jobs import Job
from odla.operator.relay import _Lines
from odla.core.usage import Usage

FINAL = p.node_done_line({"prompt_tokens": 3, "output_tokens": 2, "eval_duration": 40})


def passed_on(*chunks: bytes) -> tuple[list[bytes], _Lines, Job]:
    job = Job(door="inference")
    lines = _Lines(job)
    return [out for chunk in chunks if (out := lines.take(chunk))], lines, job


def test_the_final_lines_counts_go_to_the_job_not_to_the_client():
    out, lines, job = passed_on(p.token_line("a") + p.token_line("b") + FINAL)
    assert out == [p.token_line("a") + p.token_line("b") + p.DONE_LINE]
    assert lines.ended and job.usage == Usage(prompt_tokens=3, output_tokens=2, eval_duration=40)
    assert job.first_token is not None


def test_a_line_split_across_pieces_waits_for_its_end():
    whole = p.token_line("a") + FINAL
    for cut in range(1, len(whole)):
        out, lines, job = passed_on(whole[:cut], whole[cut:])
        assert b"".join(out) == p.token_line("a") + p.DONE_LINE, cut
        assert all(piece.endswith(b"\n") for piece in out) and lines.ended
        assert job.usage.output_tokens == 2


def test_an_error_line_is_passed_on_and_noted():
    out, lines, job = passed_on(p.token_line("a"), p.error_line("Ollama crashed"))
    assert out[-1] == p.error_line("Ollama crashed") and lines.ended and job.error == "Ollama crashed"


def test_a_stream_without_its_final_line_has_not_ended():
    out, lines, job = passed_on(p.token_line("a"), b'{"done": tr')
    assert out == [p.token_line("a")] and not lines.ended


def test_an_older_nodes_plain_final_line_is_enough():
    out, lines, job = passed_on(p.token_line("a"), p.DONE_LINE)
    assert out[-1] == p.DONE_LINE and lines.ended and not job.usage


def test_a_token_that_looks_like_a_final_line_is_a_token():
    tricky = p.token_line('{"done": true, "stats": {}}')
    out, lines, job = passed_on(tricky)
    assert out == [tricky] and not lines.ended and job.first_token is not None


def test_a_stream_that_fails_before_any_token_has_no_first_token():
    out, lines, job = passed_on(p.error_line("no"))
    assert lines.ended and job.first_token is None
