"""What both hops share about the answers they read with aiohttp (the operator a node's, the node
its Ollama's)."""

from __future__ import annotations

from aiohttp import ClientResponse


def done_with(resp: ClientResponse) -> None:
    """A body read to its end gives its connection back to the pool; any other is closed, which
    tells the other end to stop (a node stops its job, Ollama its generation)."""
    if resp.content.at_eof() and resp.content.exception() is None:
        resp.release()
    else:
        resp.close()
