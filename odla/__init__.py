"""ODLA: code shared by the operator (server.py), node agent (node.py) and client CLI (client.py)."""

__version__ = "0.1.0"
