from odla.registry import Registry


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
    assert node.info().last_seen.endswith("Z")


def test_pick_round_robin_per_model():
    reg, _ = make()
    reg.register("a", "http://a", ["llama3:latest", "mistral:latest"])
    reg.register("b", "http://b", ["llama3:latest"])
    firsts = [reg.candidates("llama3")[0].node_id for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    assert [n.node_id for n in reg.candidates("mistral")] == ["a"]
    assert reg.candidates("llama3")[0].node_id == "a"  # mistral's cursor did not move llama3's
    assert [n.node_id for n in reg.candidates("LLAMA3")] == ["b", "a"]  # the full failover order


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
