"""The audits' parts: seeds, reading an answer's words on every door, the verdict and reputation."""

import json

from odla.operator.audits import Standing, agreement, seeded, words_of


def test_a_job_without_a_seed_gets_one_and_one_with_a_seed_keeps_it():
    given = json.loads(seeded("/api/generate", b'{"model": "m", "prompt": "p", "options": {"top_k": 3}}', lambda: 42))
    assert given == {"model": "m", "prompt": "p", "options": {"top_k": 3, "seed": 42}}
    assert json.loads(seeded("/v1/chat/completions", b'{"model": "m", "messages": []}', lambda: 5))["seed"] == 5
    own = b'{"model": "m", "prompt": "p", "options": {"seed": 1}}'
    assert seeded("/api/generate", own, lambda: 42) == own
    for untouched in (b"not json", b"[1]", b'{"options": 3}'):
        assert seeded("/api/chat", untouched) == untouched
    assert seeded("/api/embed", b'{"model": "m", "input": "x"}') == b'{"model": "m", "input": "x"}'  # runs no sampling


def test_words_are_read_from_every_doors_answer():
    assert words_of(b'{"token": "Hello", "done": false}\n{"token": " world", "done": false}\n{"done": true}\n') == \
        ["Hello", "world"]
    assert words_of(b'{"response": "a b", "done": false}\n{"response": " c", "done": true}\n') == ["a", "b", "c"]
    assert words_of(b'{"message": {"role": "assistant", "content": "x y"}, "done": true}') == ["x", "y"]
    assert words_of(b'data: {"choices": [{"delta": {"content": "p"}}]}\n\ndata: {"choices": [{"delta": '
                    b'{"content": " q"}}]}\n\ndata: [DONE]\n\n') == ["p", "q"]
    assert words_of(b'{"response": "cut at the captu') == []  # a line cut short is no answer


def test_agreement_and_reputation():
    assert agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"], 32) == 0.75
    assert agreement(["a"], ["a", "b"], 32) == 1.0 and agreement([], [], 32) == 1.0  # a cut answer: its length judges it
    assert Standing().reputation == 1.0
    assert Standing(failed=1).reputation == 0.2 and Standing(disputed=1).reputation == 0.2
    assert Standing(passed=9, failed=1).reputation > 0.5  # one wrong verdict among many does not quarantine


def test_a_nodes_outcomes_weigh_on_its_reputation_but_never_quarantine_it_alone():
    from odla.operator.registry import Node

    node = Node("n1", "http://127.0.0.1:1", ["llama3"], 0.0)
    for ok in [True, False] * 50:
        node.outcome(ok, 0.0)
    assert 0.85 < node.reputation < 0.9  # half its jobs failed: at most 7/8 of what was found of it
    for _ in range(1000):
        node.outcome(False, 0.0)
    assert node.reputation > 0.75 > 0.5 and not node.quarantined
    node.standing = Standing(failed=1)
    node.rate()
    assert node.reputation < 0.2
