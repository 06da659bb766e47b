from odla.core.protocol import LoadedModel
from odla.operator.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(prune_after: float = 60) -> tuple[Registry, Clock]:
    clock = Clock()
    return Registry(prune_after=prune_after, clock=clock), clock


def test_register_twice_updates_one_row():
    reg, clock = make()
    reg.register("a", "http://a:1", ["llama3:latest"])
    clock.now += 5
    reg.register("a", "http://a:2", ["mistral:latest"])
    assert len(reg) == 1
    node = reg.get("a")
    assert (node.url, node.models, node.last_seen) == ("http://a:2", ["mistral:latest"], clock.now)
    assert node.info(clock.now).last_seen.endswith("Z")


def test_candidates_are_healthy_nodes_with_the_model_by_ollamas_names():
    reg, _ = make()
    reg.register("a", "http://a", ["llama3:latest", "mistral:latest"])
    reg.register("b", "http://b", ["llama3:latest"])
    assert [n.node_id for n in reg.candidates("LLAMA3")] == ["a", "b"]
    assert [n.node_id for n in reg.candidates("library/mistral:latest")] == ["a"]


def test_what_a_node_reports_is_kept_and_shown():
    reg, clock = make()
    reg.register("a", "http://a", ["llama3:latest", "nomic-embed-text:latest"],
                 slots={"llama3:latest": 4, "nomic-embed-text:latest": 1},
                 loaded=[LoadedModel(name="llama3:latest", expires_at="2099-01-01T00:00:00.123456789Z"),
                         LoadedModel(name="nomic-embed-text:latest", expires_at="2000-01-01T00:00:00Z")],
                 tokens_per_s={"llama3:latest": 42.0})
    info = reg.get("a").info(clock.now)
    assert info.slots == {"llama3:latest": 4, "nomic-embed-text:latest": 1}
    assert info.loaded == ["llama3:latest"]  # the other one has expired
    assert info.tokens_per_s == 42.0 and info.active_jobs == 0


def test_failed_nodes_get_no_jobs_until_seen_again():
    reg, _ = make()
    reg.register("a", "http://a", ["llama3:latest"])
    reg.register("b", "http://b", ["llama3:latest"])
    reg.mark_failed("a")
    assert {n.node_id for _ in range(3) for n in reg.candidates("llama3")} == {"b"}
    reg.seen("a", healthy=True)
    assert {n.node_id for n in reg.candidates("llama3")} == {"a", "b"}
    assert reg.candidates("nope") == []


def test_prune_after_ttl():
    reg, clock = make(prune_after=60)
    reg.register("a", "http://a", ["x"])
    reg.register("b", "http://b", ["x"])
    clock.now += 59
    reg.seen("b", healthy=True)
    assert reg.prune() == []
    clock.now += 2
    assert reg.prune() == ["a"]
    assert [n.node_id for n in reg.nodes()] == ["b"]


def test_seen_updates_models():
    reg, _ = make()
    reg.register("a", "http://a", ["x:latest"])
    reg.seen("a", healthy=True, models=["y:latest"])
    assert reg.candidates("y") and not reg.candidates("x")


def test_a_change_the_operator_made_holds_against_reports_sent_before_it_for_a_while():
    """A pull and a delete through the operator: a heartbeat, link status or health check that left the
    node before them, and arrives after, does not undo them; past the hold, reports are taken again."""
    reg, clock = make()
    node = reg.register("a", "http://a", ["llama3:latest", "mistral:latest"])
    reg.changed(node, 30, added=["phi3"], removed=["mistral"])
    assert node.models == ["llama3:latest", "phi3:latest"] and [n.node_id for n in reg.candidates("phi3")] == ["a"]
    reg.register("a", "http://a", ["llama3:latest", "mistral:latest"])  # sent before the change
    reg.seen("a", healthy=True, models=["llama3:latest", "mistral:latest"])
    assert node.models == ["llama3:latest", "phi3:latest"] and reg.candidates("mistral") == []
    reg.seen("a", healthy=True, models=["llama3:latest", "phi3:latest"])  # its listing, by Ollama's name
    assert node.models == ["llama3:latest", "phi3:latest"]
    clock.now += 31  # past the hold: the node's word again (here, someone removed phi3 there by hand)
    reg.seen("a", healthy=True, models=["llama3:latest", "mistral:latest"])
    assert node.models == ["llama3:latest", "mistral:latest"] and node.changed == {}
    assert reg.candidates("phi3") == [] and [n.node_id for n in reg.candidates("mistral")] == ["a"]


def test_a_node_with_jobs_running_is_kept_out_of_rotation_not_pruned():
    """Pruned and registered again, a node would start a fresh count while its old jobs ran, and take
    more jobs than its slots: it stays (unhealthy) until they end, and keeps counting them."""
    reg, clock = make(prune_after=60)
    node = reg.register("a", "http://a", ["x:latest"], slots={"x:latest": 1})
    node.inflight["x:latest"] = 1  # a job still streaming from it
    clock.now += 61
    assert reg.prune() == [] and not node.healthy and reg.candidates("x") == []
    again = reg.register("a", "http://a", ["x:latest"], slots={"x:latest": 1})
    assert again is node and not again.free("x:latest")  # its running job still counts
    del node.inflight["x:latest"]
    clock.now += 61
    assert reg.prune() == ["a"]


def test_nodes_are_kept_in_order_of_measured_speed_per_model():
    reg = Registry(prune_after=60)
    for name in ("a", "b", "c"):
        reg.register(name, f"http://{name}", ["llama3", "mistral"])
    order = lambda key="llama3:latest": [n.node_id for n in reg.fastest(key)]  # noqa: E731
    reg.get("a").saw("llama3:latest", 11, 1.0)  # 10 tokens/s
    reg.get("b").saw("llama3:latest", 51, 1.0)  # 50
    assert order() == ["c", "b", "a"]  # not measured first, then fastest first
    reg.get("c").saw("llama3:latest", 31, 1.0)
    assert order() == ["b", "c", "a"] and order("mistral:latest") == ["a", "b", "c"]  # per model
    for _ in range(20):
        reg.get("a").saw("llama3:latest", 101, 1.0)  # 100 tokens/s now
    assert order() == ["a", "b", "c"]
    reg.register("b", "http://b", ["mistral"])  # b no longer has llama3
    assert order() == ["a", "c"]
    reg.remove("a")
    assert order() == ["c"] and order("mistral:latest") == ["b", "c"]


def test_the_slots_a_node_claims_are_given_as_it_is_seen_to_answer_with_that_many_at_once():
    reg = Registry(prune_after=30)
    node = reg.register("n1", "http://n1", ["llama3"], slots={"llama3": 1000})
    key = "llama3:latest"
    assert node.said_slots(key) == 1000 and node.slots_for(key) == 2
    node.inflight[key] = 1
    assert node.answered(key) is False and node.slots_for(key) == 2  # one at once: still two
    node.inflight[key] = 2
    assert node.answered(key) is True and node.slots_for(key) == 4  # it answers with two: four
    node.inflight[key] = 3
    node.answered(key)
    assert node.slots_for(key) == 6
    node.inflight[key] = 0
    assert node.answered(key) is False and node.slots_for(key) == 6  # the most seen at once stays
    honest = reg.register("n2", "http://n2", ["llama3"], slots={"llama3": 3})
    honest.inflight[key] = 2
    honest.answered(key)
    assert honest.slots_for(key) == 3  # never more than it says
    assert reg.register("n3", "http://n3", ["llama3"]).slots_for(key) == 1


def test_a_node_whose_loaded_model_answered_as_late_as_a_load_is_not_believed_on_it_for_a_while():
    reg = Registry(prune_after=30)
    loaded = [LoadedModel(name="llama3:latest", expires_at="2099-01-01T00:00:00Z")]
    node = reg.register("n1", "http://n1", ["llama3"], loaded=loaded)
    now = reg.clock()
    assert node.warm("llama3:latest", now)
    node.checked_warm("llama3:latest", said_warm=True, late=0.3, load=5.0, now=now)  # in time
    assert node.warm("llama3:latest", now)
    node.checked_warm("llama3:latest", said_warm=True, late=4.0, load=5.0, now=now)  # a load's time late
    reg.register("n1", "http://n1", ["llama3"], loaded=loaded)  # it says so again
    assert not node.warm("llama3:latest", now + 1) and node.warm("llama3:latest", now + 61)
    node.checked_warm("llama3:latest", said_warm=False, late=0.1, load=5.0, now=now + 2)  # a job came in time
    assert node.warm("llama3:latest", now + 2)
    node.checked_warm("llama3:latest", said_warm=False, late=9.0, load=5.0, now=now + 3)  # it was not said loaded
    assert node.warm("llama3:latest", now + 3)
