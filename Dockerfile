# One image for the operator and the node agent; the command picks the role:
#   docker run odla python server.py      docker run odla python node.py
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer stays cached until requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY odla/ odla/
COPY sim/ sim/
COPY scripts/healthcheck.py scripts/
COPY server.py node.py client.py config.json ./

# The operator's job receipts and each program's key (made on first start, mode 0600) live in /data
# (a volume in docker-compose.yml), writable by the app's user: a node's id belongs to its key.
RUN groupadd --gid 10001 odla && useradd --create-home --uid 10001 --gid 10001 odla \
    && mkdir /data && chown 10001:10001 /data
ENV ODLA_JOBS_DB=/data/jobs.db \
    ODLA_NODE_KEY_FILE=/data/node.key \
    ODLA_OPERATOR_KEY_FILE=/data/operator.key
VOLUME ["/data"]
USER 10001:10001

EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "scripts/healthcheck.py"]
CMD ["python", "server.py"]
