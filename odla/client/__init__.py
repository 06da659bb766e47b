"""The client CLI (``client.py``): its calls to the operator, the chat, tables, the terminal."""
