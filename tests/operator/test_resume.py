"""Resuming an answer: which jobs can be, the request for the rest, whole units, the stall watch, the shapes."""

import asyncio
import json

import pytest

from odla.core.usage import Usage
from odla.operator.resume import Failed, Plan, Shape, Units, Watch, decoded, plan_for


def plan(path, body, resume="on", headers={}):
    return plan_for(path, json.dumps(body).encode(), resume, 2, 30.0, headers)


def test_what_can_be_resumed_and_what_runs_as_before():
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    assert plan("/api/chat", chat).kind == "chat"
    assert plan("/api/chat", chat, resume="off") is None
    assert plan("/api/chat", chat, headers={"x-odla-resume": "off"}) is None
    for extra in ({"format": "json"}, {"format": {"type": "object"}}, {"tools": [{"type": "function"}]},
                  {"think": True}):
        assert plan("/api/chat", {**chat, **extra}) is None, extra
    assert plan("/api/generate", {"model": "llama3", "prompt": "hi", "raw": True}) is None
    assert plan("/api/generate", {"model": "llama3", "prompt": "hi", "context": [1, 2]}) is None
    assert plan("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}}) is None
    assert plan("/v1/chat/completions", {**chat, "response_format": {"type": "text"}}) is not None
    assert plan("/v1/chat/completions", {**chat, "n": 2}) is None
    assert plan("/api/embed", {"model": "llama3", "input": "hi"}) is None
    assert plan("/api/chat", {"model": "llama3"}) is None  # no messages: Ollama's own error, as before
    assert plan_for("/api/chat", b"{not json", "on", 2, 30.0) is None
    assert plan_for("/api/chat", json.dumps(chat).encode(), "on", 0, 30.0) is None  # resume_attempts 0


def test_a_job_opts_out_by_its_options_and_odla_s_option_never_reaches_ollama():
    body = {"model": "llama3", "prompt": "hi", "options": {"odla_resume": False, "temperature": 0}}
    assert plan_for("/inference", body, "on", 2, 30.0) is None
    kept = plan_for("/inference", {**body, "options": {"odla_resume": True, "temperature": 0}}, "on", 2, 30.0)
    assert "odla_resume" not in kept.request["options"] and kept.request["options"]["temperature"] == 0


def test_every_resumable_job_has_a_seed_and_its_first_node_streams():
    native = plan("/api/generate", {"model": "llama3", "prompt": "hi", "stream": False})
    assert isinstance(native.request["options"]["seed"], int) and native.stream is False
    assert json.loads(native.body())["stream"] is True
    given = plan("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "q"}],
                               "options": {"seed": 42}})
    assert given.request["options"]["seed"] == 42 and given.stream is True
    openai = plan("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "q"}]})
    assert openai.stream is False and isinstance(openai.request["seed"], int)
    first = json.loads(openai.body())
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}


def test_the_rest_is_asked_as_a_chat_that_continues_the_answer_so_far():
    generate = plan("/api/generate", {"model": "llama3", "prompt": "why?", "system": "be brief", "images": ["aGk="],
                                      "keep_alive": "5m", "options": {"num_predict": 10, "seed": 3, "top_k": 4}})
    rest = generate.continuation("Because it", 2)
    assert rest == {"model": "llama3", "stream": True, "keep_alive": "5m",
                    "options": {"num_predict": 8, "seed": 3, "top_k": 4},
                    "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "why?", "images": ["aGk="]},
                                 {"role": "assistant", "content": "Because it"}]}
    chat = plan("/v1/chat/completions", {"model": "llama3", "seed": 1, "temperature": 0.5, "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "q"}]})
    rest = chat.continuation("A", 1)
    assert rest["options"] == {"seed": 1, "temperature": 0.5, "num_predict": 4}
    newer = plan("/v1/chat/completions", {"model": "llama3", "max_completion_tokens": 5,
                                          "messages": [{"role": "user", "content": "q"}]})
    assert newer.continuation("A", 1)["options"]["num_predict"] == 4  # the limit the scheduler planned for
    assert rest["messages"][-1] == {"role": "assistant", "content": "A"}
    assert "num_predict" not in plan("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "q"}]}
                                     ).continuation("", 0)["options"]
    nothing_yet = generate.continuation("", 0)  # failed before its first token: the same question
    assert nothing_yet["messages"][-1]["role"] == "user"


def test_units_pass_whole_lines_and_hold_back_the_error_a_node_ends_with():
    lines = Units(b"\n")
    assert lines.take(b'{"response":"a"}\n{"resp') == b'{"response":"a"}\n'
    assert lines.take(b'onse":"b"}\n') == b'{"response":"b"}\n'
    assert lines.take(b'{"response":"c"}\n{"error":"boom"}\n') == b'{"response":"c"}\n'
    assert lines.error == b'{"error":"boom"}\n'
    events = Units(b"\n\n")
    assert events.take(b"data: {}\n") == b""  # an event is whole only at its blank line
    assert events.take(b"\ndata: {\"error\":{}}\n\n") == b"data: {}\n\n"
    assert events.error == b'data: {"error":{}}\n\n'
    with pytest.raises(Failed):
        Units(b"\n").take(b"x" * (2 << 20))


def test_the_stall_watch_cuts_a_silent_node_not_a_slow_client():
    async def main():
        cut = []
        watch = Watch(0.2, lambda: cut.append(1))
        watch.heard()
        await asyncio.sleep(0.35)  # the relay is not waiting for the node: a client slow to read
        assert not cut
        watch.asking()
        await asyncio.sleep(0.1)
        watch.heard()
        watch.asking()
        await asyncio.sleep(0.15)
        assert not cut  # 0.15 s since the node's last piece
        await asyncio.sleep(0.2)
        assert cut == [1] and watch.stalled
        watch.stop()

    asyncio.run(main())


def test_a_resumed_answer_ends_in_its_door_s_shape_counting_all_of_it():
    usage = Usage(prompt_tokens=4, output_tokens=12, total_duration=10, eval_duration=8)
    ollama = Shape(Plan("chat", {"model": "llama3"}, True, 2, 30.0))
    final = json.loads(ollama.end(usage, "length", "2026-01-01T00:00:00Z"))
    assert final["done"] is True and final["done_reason"] == "length" and final["eval_count"] == 12
    assert final["prompt_eval_count"] == 4 and final["message"] == {"role": "assistant", "content": ""}
    openai = Shape(Plan("openai_chat", {"model": "llama3", "stream_options": {"include_usage": True}}, True, 2, 30.0))
    openai.saw({"id": "chatcmpl-1", "created": 7, "model": "llama3", "choices": []})
    events = openai.end(usage, "stop", "").split(b"\n\n")
    assert [decoded(e) for e in events[:2]] == [
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "llama3",
         "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": "stop"}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "llama3",
         "system_fingerprint": "fp_ollama", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}}]
    assert events[2] == b"data: [DONE]"
    whole = json.loads(Shape(Plan("openai_completion", {"model": "llama3"}, False, 2, 30.0)).whole(
        "Hello there", usage, "stop", "", resumed=True))
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "Hello there"
    assert whole["usage"]["completion_tokens"] == 12
