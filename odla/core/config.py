"""Settings: config.json, then environment overrides, validated once at start-up.

``load_settings()`` is called by each script's ``main()``, never at import. A bad value
raises ``ConfigError`` with a message that names the key it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit
from typing import Literal, Mapping, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, ValidationError, field_validator,
                      model_validator)
from odla.core.protocol import Address

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.json"

# environment variable -> settings key; SPEC.md's names first, then ODLA's own.
ENV_KEYS: dict[str, str] = {
    "operator_port": "operator_port",
    "OPERATOR_PORT": "operator_port",
    "OPERATOR_HOST": "operator_host",
    "NODE_ID": "node_id",
    "NODE_PORT": "node_port",
    "NODE_HOST": "node_host",
    "NODE_URL": "node_url",
    "COORDINATOR_URL": "operator_url",
    "ODLA_OPERATOR_URL": "operator_url",
    "OLLAMA_HOST": "ollama_host",
    "ODLA_JOIN_TOKEN": "join_token",
    "ODLA_API_KEYS": "api_keys",
    "ODLA_ADMIN_KEYS": "admin_keys",
    "ODLA_LOG_LEVEL": "log_level",
    "ODLA_JOBS_DB": "jobs_db",
    "NODE_LINK": "link",
    "ODLA_NODE_TOKENS": "node_tokens",
    "ODLA_REDIS_URL": "redis_url",
    "NODE_PRIVATE_KEY": "node_private_key",
    "ODLA_NODE_KEY_FILE": "node_key_file",
    "OPERATOR_PRIVATE_KEY": "operator_private_key",
    "ODLA_OPERATOR_KEY_FILE": "operator_key_file",
    "ODLA_CHAIN_RPC_URL": "chain_rpc_url",
    "ODLA_CHAIN_ID": "chain_id",
    "ODLA_ESCROW_ADDRESS": "escrow_address",
}


# What each script uses: a script validates only these, so a bad node-only value (NODE_PORT=abc)
# does not stop the client. Keys outside every role are still errors.
CHAIN = {"chain_rpc_url", "chain_id", "escrow_address", "settlement_token"}
SHARED = {"operator_url", "log_level", "connect_timeout", "health_check_timeout", "join_token", "max_prompt_chars",
          "allowed_hosts", "allowed_origins", "request_timeout", "header_timeout"}
ROLES: dict[str, set[str]] = {
    "client": {"operator_url", "default_model"} | CHAIN,
    "operator": SHARED | {"operator_host", "operator_port", "health_check_interval", "prune_after", "api_keys",
                          "admin_keys", "start_timeout", "max_queue", "max_queue_per_key", "queue_timeout", "affinity", "jobs_db", "jobs_keep_days", "max_nodes",
                          "max_connections", "node_tokens", "redis_url", "lease_seconds", "operator_key_file",
                          "operator_private_key", "require_signed_nodes", "node_addresses", "epoch_seconds", "audit_rate",
                          "audit_tokens", "audit_seed", "quarantine_below", "prices", "operator_fee_bps",
                          "settlement", "max_job_tokens", "wallet_signin", "signin_ttl", "signin_domain", "chain_poll",
                          "resume", "resume_attempts", "stall_timeout", "default_replicas"} | CHAIN,
    "node": SHARED | {"node_host", "node_port", "node_id", "node_url", "ollama_host", "heartbeat_interval",
                      "num_parallel", "max_slots", "health_check_interval", "link", "min_keep_alive",
                      "max_keep_alive", "node_key_file", "node_private_key", "manage_models"} | CHAIN,
}


HOW = "give http://host:port or host:port"


def operator_address(value: str) -> str:
    """An operator's URL from what a user wrote: ``http://host:8000``, or, as Ollama's
    ``OLLAMA_HOST`` takes them, ``host:8000``, ``host`` or ``:8000`` (port 8000, host localhost).
    A path (``http://host:8000/odla``: an operator behind a proxy) is kept. ValueError: not an address."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + (("localhost" + text) if text.startswith(":") else text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"is not an operator's address: {HOW}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"is not an operator's address ({parts.scheme}:// is not http:// or https://): {HOW}")
    if not parts.hostname or parts.query or parts.fragment or any(c.isspace() for c in text):
        raise ValueError(f"is not an operator's address: {HOW}")
    netloc = parts.netloc if port is not None or "://" in value else f"{parts.netloc}:8000"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


class Price(BaseModel):
    """A model's price per million tokens, in the settlement unit's smallest denomination (wei)."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictInt = Field(ge=0)
    output: StrictInt = Field(ge=0)


class ConfigError(Exception):
    """A config file or environment value that cannot be used."""


class Settings(BaseModel):
    """Every knob of the operator, the node agent and the client."""

    # The string under each field is its description: the docs' settings table is made from them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    operator_url: str = "http://localhost:8000"
    "Where nodes and the client reach the operator; a node may be given several (a JSON list, or comma-separated)."
    _more_operators: list[str] = PrivateAttr(default_factory=list)
    operator_host: str = "0.0.0.0"
    "Address the operator listens on."
    operator_port: int = Field(8000, ge=1, le=65535)
    "Port the operator listens on."
    node_host: str = "0.0.0.0"
    "Address a node agent listens on."
    node_port: int = Field(8001, ge=1, le=65535)
    "Port a node agent listens on."
    node_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    """The node's name, ``[A-Za-z0-9._-]{1,128}``; default the hostname (``hostname-PORT`` on a port other
    than 8001). A second live node with the same id is refused and does not start."""
    node_url: Optional[str] = None
    """Address the operator uses to reach this node; default the node's address on the interface that
    routes to the operator (never 0.0.0.0)."""
    ollama_host: str = "http://localhost:11434"
    "The node's Ollama, in any form the ollama SDK takes (``host``, ``host:port``, ``:port``, a URL)."
    health_check_interval: float = Field(30, gt=0)
    "Seconds between the operator's health checks of its nodes."
    health_check_timeout: float = Field(5, gt=0)
    "Seconds a health check may take."
    prune_after: Optional[float] = Field(None, gt=0)
    "Seconds without contact before a node is dropped; default 2 x health_check_interval."
    heartbeat_interval: float = Field(10, gt=0)
    "How often a node re-registers."
    connect_timeout: float = Field(5, gt=0)
    "Seconds to open a connection to a node or to Ollama."
    default_model: str = "llama3"
    "The client's --model when none is given."
    max_prompt_chars: int = Field(1_000_000, gt=0)
    "Longer prompts get 413; request bodies are bounded from it."
    join_token: Optional[str] = Field(None, repr=False)
    "When set, nodes must present it to the operator, and the operator to nodes."
    api_keys: list[str] = Field(default_factory=list, repr=False)
    "Client API keys (in the environment, comma-separated); when set, clients send one as ``Authorization: Bearer``."
    admin_keys: list[str] = Field(default_factory=list, repr=False)
    "API keys that read every key's job receipts (any other key reads its own); they are API keys too."
    log_level: str = "info"
    "``debug``, ``info``, ``warning`` or ``error``."
    max_nodes: int = Field(1000, ge=1)
    "Nodes the operator keeps at once; a new one past it gets 503."
    header_timeout: float = Field(10, gt=0)
    "Seconds a request's head (its line and headers) may take to arrive; a slower connection is closed."
    request_timeout: float = Field(30, gt=0)
    "Seconds a request may take to arrive whole (headers and body); a slower one's connection is closed."
    link: Literal["http", "dial"] = "http"
    "How the operator reaches a node: ``http`` (at its URL) or ``dial`` (the node dials out and listens on no port)."
    node_tokens: Union[dict[str, str], str, None] = Field(None, repr=False)
    "Per-node join tokens (node id -> token), or a JSON file of them; a node listed must use its own."
    redis_url: Optional[str] = Field(None, repr=False)
    "Several operators share their nodes and slots through this Redis (``redis://host:6379/0``); none: alone."
    lease_seconds: float = Field(30, gt=0)
    "With Redis: how long a job's claim on a slot lasts unless renewed (an operator that died frees its slots so)."
    max_connections: int = Field(10_000, ge=1)
    "Connections and requests the operator holds at once (uvicorn's limit_concurrency); past it, 503."
    start_timeout: float = Field(300, gt=0)
    """Seconds a node may take to begin answering a job (Ollama's own limit on loading a model is 5
    minutes); past it the job goes to another node, and the node counts as failing it, however
    healthy it says it is."""
    max_queue: int = Field(512, ge=0)
    "Jobs that may wait for a free slot, all models together; past it, 503 with Retry-After."
    max_queue_per_key: Optional[int] = Field(None, ge=1)
    """Of those, jobs one API key may have waiting; past it, that key's new jobs get 503 while the others'
    still queue. Default half of ``max_queue`` (so no key fills the queue for the rest); none without API keys."""
    queue_timeout: float = Field(300, gt=0)
    "Seconds a job waits for a free slot before 504."
    affinity: bool = True
    """Count, in the scheduler's prediction, the prompt a node has cached: a conversation's next turn on
    the node that served its last one skips reading its history again (off: every node reads it all)."""
    allowed_hosts: Optional[list[str]] = None
    "Host names a request may be addressed to; default: any, or only localhost's when listening on loopback."
    allowed_origins: list[str] = Field(default_factory=list)
    "Web origins (https://app.example) whose pages may call the API from a browser; the dashboard is same-origin."
    jobs_db: Optional[str] = Field(None, min_length=1)
    """The operator's SQLite file of job receipts; default ``jobs-<operator_port>.db``, so that operators
    started in one folder keep apart; a relative path is next to the config file; ``:memory:`` keeps none."""
    jobs_keep_days: float = Field(30, gt=0)
    "Days a job's receipt is kept."
    manage_models: bool = True
    """Let the operator pull, remove and copy models on this node's Ollama (``/api/pull``, ``/api/delete``,
    ``/api/copy`` through the operator); off: the node answers those with 403."""
    min_keep_alive: float = Field(60, ge=0)
    "Seconds at least that a client's ``keep_alive`` keeps a model loaded on this node (its 0 would unload it under everyone)."
    max_keep_alive: float = Field(3600, ge=0)
    "Seconds at most (a client's -1 would pin a model on this node for ever)."
    num_parallel: Optional[int] = Field(None, ge=1, le=65536)
    """Requests each model runs at once on this node's Ollama; default OLLAMA_NUM_PARALLEL as Ollama reads
    it; neither set: the node learns it from its jobs, up to ``max_slots``."""
    max_slots: int = Field(16, ge=1, le=65536)
    "Most slots a node learns for a model when its Ollama's parallelism is not configured (``num_parallel``)."
    node_key_file: str = Field("node.key", min_length=1)
    """The node's secp256k1 key (its identity, and what signs its reports and receipts): made on first start,
    readable only by its owner (mode 0600); a relative path is next to the config file."""
    node_private_key: Optional[str] = Field(None, repr=False)
    "The node's key as 64 hex digits (``NODE_PRIVATE_KEY``), instead of ``node_key_file``; never written anywhere."
    operator_key_file: str = Field("operator.key", min_length=1)
    "The operator's key (what countersigns receipts), as ``node_key_file`` is the node's."
    operator_private_key: Optional[str] = Field(None, repr=False)
    "The operator's key as 64 hex digits (``OPERATOR_PRIVATE_KEY``), instead of ``operator_key_file``."
    epoch_seconds: float = Field(3600, gt=0)
    """Every so often the operator closes an epoch: a Merkle root over the receipts it countersigned since
    the last, signed by it (``GET /epochs``); a job's proof is ready once its epoch is closed."""
    audit_rate: float = Field(0.02, ge=0, le=1)
    """The share of jobs the operator re-runs, unannounced, on another node with the same model digest to
    check the answer (0: none)."""
    audit_tokens: int = Field(32, ge=1, le=4096)
    "How many first words of the two answers must match."
    default_replicas: int = Field(1, ge=1, le=4096)
    """Nodes a model is pulled onto through the operator (``POST /api/pull``) when the request does not
    say (``X-ODLA-Replicas: N`` or ``all``, or ``X-ODLA-Nodes: id,id``)."""
    resume: Literal["on", "off"] = "on"
    """When a node fails mid-answer, finish the answer on another node with the same model digest: the
    client reads one unbroken answer (``odla_resume: false`` in a job's options, or the header
    ``X-ODLA-Resume: off``, opts one job out)."""
    resume_attempts: int = Field(2, ge=0, le=16)
    "Resumes of one job at most; past them the answer ends with the last node's error."
    stall_timeout: float = Field(30, gt=0)
    """Seconds a resumable answer may send nothing after its first token before its node counts as
    failed (Ollama never pauses that long mid-answer, and may still pass health checks while it hangs)."""
    audit_seed: bool = True
    """Give every job that set no seed a random one, so that a re-run on another node can match it (the
    answers still vary as before)."""
    quarantine_below: float = Field(0.5, ge=0, le=1)
    "A node whose reputation (from its audits and disputed receipts) falls under this gets no jobs."
    require_signed_nodes: bool = False
    "Refuse (401) a node whose registration is not signed by a key."
    node_addresses: dict[str, Address] = Field(default_factory=dict)
    """Node id -> the address (key) it must sign with; an id not listed is bound to the first key that
    signs for it, and kept so across restarts."""

    prices: dict[str, Price] = Field(default_factory=dict)
    """Per model (``"*"``: any other), per million prompt and output tokens, in the smallest unit:
    ``{"llama3": {"prompt": 100000, "output": 400000}}``. Integers only. Set, it runs the ledger."""
    operator_fee_bps: StrictInt = Field(0, ge=0, le=10_000)
    "The operator's share of each job's cost, in basis points (100 = 1 %)."
    settlement: Optional[Literal["evm"]] = None
    """``"evm"``: clients pay from deposits in the escrow contract (``escrow_address`` on ``chain_rpc_url``);
    a job that could overdraw its client's deposit is refused with 402."""
    chain_rpc_url: Optional[str] = Field(None, repr=False)
    "The chain's JSON-RPC endpoint (Arbitrum One, Arbitrum Sepolia, or a local anvil)."
    chain_id: Optional[int] = Field(None, ge=1)
    "The chain that endpoint must be (42161 Arbitrum One, 421614 Arbitrum Sepolia, 31337 anvil)."
    escrow_address: Optional[Address] = None
    "The escrow contract (``python scripts/escrow.py deploy`` prints it)."
    settlement_token: Optional[Address] = None
    """The ERC-20 the escrow settles in (its address; ``scripts/escrow.py deploy`` deploys for it); unset: the
    chain's native currency. Prices are then in the token's smallest unit."""
    chain_poll: float = Field(10, gt=0)
    "How long the operator trusts a deposit it read from the chain, in seconds."
    max_job_tokens: StrictInt = Field(4096, ge=1)
    """The output a job that sets no limit (``num_predict``, ``max_tokens``) is held for against its
    client's balance, with ``settlement``."""
    wallet_signin: Optional[bool] = None
    """Let clients sign in with an Ethereum wallet (EIP-4361) instead of an API key. Unset: on with
    ``settlement`` "evm" (strangers pay from their deposits) or without ``api_keys`` (anyone may ask
    anyway); off on an operator that keeps its clients to its API keys."""
    signin_ttl: float = Field(86400, gt=0, le=30 * 86400)
    "How long a wallet sign-in's bearer token works, in seconds."
    signin_domain: Optional[str] = None
    """The domain a sign-in message must name (EIP-4361); unset: the host the client reached
    (its ``Host`` header, e.g. ``localhost:8000``)."""

    @field_validator("chain_rpc_url")
    @classmethod
    def _rpc_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("operator_url")
    @classmethod
    def _operator_url(cls, value: str) -> str:
        return operator_address(value)

    @field_validator("node_url")
    @classmethod
    def _http_url(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("join_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def operator_urls(self) -> list[str]:
        """Every operator a node registers with (or dials): ``operator_url`` first."""
        return [self.operator_url, *self._more_operators]

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading: a longest prompt in UTF-8 (<= 4 bytes a
        character) plus room for the other fields."""
        return self.max_prompt_chars * 4 + 65536

    @model_validator(mode="after")
    def _default_prune(self) -> "Settings":
        if self.prune_after is None:
            self.prune_after = 2 * self.health_check_interval
        if self.jobs_db is None:
            self.jobs_db = f"jobs-{self.operator_port}.db"
        self.api_keys += [key for key in self.admin_keys if key not in self.api_keys]  # an admin is a client too
        if self.settlement == "evm" and not (self.chain_rpc_url and self.escrow_address and self.chain_id):
            raise ValueError("settlement \"evm\" needs chain_rpc_url, chain_id and escrow_address "
                             "(python scripts/escrow.py deploy prints the address)")
        if self.wallet_signin is None:
            self.wallet_signin = self.settlement == "evm" or not self.api_keys
        if self.settlement == "evm" and not self.prices:
            raise ValueError("settlement \"evm\" needs prices: what would clients pay for?")
        if self.min_keep_alive > self.max_keep_alive:
            raise ValueError(f"min_keep_alive ({self.min_keep_alive:g}) is more than max_keep_alive "
                             f"({self.max_keep_alive:g})")
        return self


def load_settings(
    path: Optional[os.PathLike | str] = None,
    env: Optional[Mapping[str, str]] = None,
    role: Optional[str] = None,
    **overrides: object,
) -> Settings:
    """Read ``path`` (default ``$ODLA_CONFIG`` or config.json), then ``env``, then ``overrides``.
    With a ``role`` (``ROLES``), only that script's settings are read; the rest keep their defaults."""
    env = os.environ if env is None else env
    path = Path(path or env.get("ODLA_CONFIG") or DEFAULT_CONFIG)
    values: dict[str, object] = _read_file(path) if path.exists() or "ODLA_CONFIG" in env else {}
    origin = {key: f"{path}: {key}" for key in values}
    for var, key in ENV_KEYS.items():
        if env.get(var) not in (None, ""):
            values[key] = env[var]
            origin[key] = f"environment {var}"
    values.update(overrides)
    urls = values.get("operator_url")
    if isinstance(urls, list) or isinstance(urls, str) and "," in urls:  # several operators (a node's)
        urls = [str(u).strip() for u in (urls if isinstance(urls, list) else urls.split(",")) if str(u).strip()]
        values["operator_url"] = urls[0] if urls else ""
    else:
        urls = []
    if role is not None:
        known = set(Settings.model_fields)
        values = {k: v for k, v in values.items() if k in ROLES[role] or k not in known}
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc
    for url in urls[1:]:
        try:
            settings._more_operators.append(operator_address(url))
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {origin.get('operator_url', 'operator_url')}: {url!r} {exc}") from None
    if settings.jobs_db != ":memory:" and not Path(settings.jobs_db).is_absolute():
        settings.jobs_db = str(path.resolve().parent / settings.jobs_db)  # next to config.json
    for key in ("node_key_file", "operator_key_file"):
        if not Path(getattr(settings, key)).is_absolute():
            setattr(settings, key, str(path.resolve().parent / getattr(settings, key)))  # next to config.json
    if settings.node_tokens is not None:
        settings.node_tokens = _node_tokens(settings.node_tokens, path.resolve().parent, origin.get("node_tokens", "node_tokens"))
    return settings


def _node_tokens(value: "dict[str, str] | str", folder: Path, origin: str) -> dict[str, str]:
    """Per-node tokens, node id -> token: as given, or read from a JSON file (relative: next to the config)."""
    data = _read_file(folder / value) if isinstance(value, str) else value
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", k)]
    if bad:
        raise ConfigError(f"{origin}: node ids must be node ids and tokens non-empty strings (not {bad[:3]})")
    return data  # type: ignore[return-value]


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def _describe(exc: ValidationError, origin: Mapping[str, str]) -> str:
    problems = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else "?"
        where = origin.get(key, key)
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown setting")
        else:
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(problems)


SCRIPTS = {"operator": ("server.py", "The ODLA operator: the node registry, the scheduler and the relay."),
           "node": ("node.py", "The ODLA node agent: joins this machine's Ollama to the operator's network.")}


def script_settings(role: str, argv: Optional[list[str]] = None) -> Settings:
    """The settings of ``python server.py`` or ``python node.py``: the config file, the environment,
    then the command line (``--config``, ``--host``, ``--port``). ``--help`` prints the usage; a bad
    value ends the process with a message that names it."""
    prog, description = SCRIPTS[role]
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Every setting is in config.json and the environment: see README.md.")
    parser.add_argument("--config", metavar="FILE", help="the config file (default: $ODLA_CONFIG, else config.json)")
    parser.add_argument("--host", help=f"the address to listen on (default: {role}_host)")
    parser.add_argument("--port", type=int, help=f"the port to listen on (default: {role}_port)")
    args = parser.parse_args(argv)
    overrides = {f"{role}_{k}": v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    env = {**os.environ, "ODLA_CONFIG": args.config} if args.config else None
    try:
        return load_settings(env=env, role=role, **overrides)
    except ConfigError as exc:
        sys.exit(f"{role}: {exc}")
