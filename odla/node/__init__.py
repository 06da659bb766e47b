"""The node agent (``node.py``): its clients of the local Ollama, what it can run, and dialling out."""
