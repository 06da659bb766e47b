"""What the operator, the node agent and the client all use: the wire protocol, settings, errors,
model names, usage counts, times, logs. Nothing here imports a server library (FastAPI, uvicorn,
aiohttp, ollama): the client stays light."""
