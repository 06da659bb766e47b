"""The operator (``server.py``): registry, scheduler, relay, its client to the nodes, the Ollama and
OpenAI doors, dial-out links, shared state on Redis, receipts, metrics and the dashboard."""
