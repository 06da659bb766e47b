"""The client's tests run against a real operator and node (in threads) on the simulator."""

import pytest

from tests.helpers import node_ids, wait_for


@pytest.fixture
def network(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    return op
