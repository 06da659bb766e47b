"""The ODLA wire protocol: every body and stream line that crosses a hop.

Streams are JSON lines (``application/x-ndjson``)::

    {"token": "Hello", "done": false}
    {"token": " world", "done": false}
    {"done": true}

A job that waits for a free slot first hears its place: ``{"queued": 3, "done": false}``.

or, as the one last line of a failed stream, ``{"error": "...", "done": true}``.
Every stream ends with exactly one final line (``"done": true``).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # C-accelerated string quoting
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from odla.core.names import MAX_MODEL_NAME

NDJSON = "application/x-ndjson"
JOB_HEADER = "x-odla-job"
"Every job's answer names its id here (``GET /jobs/{id}``); the operator tells its node the same way."

NodeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
"An Ethereum address: a node's or an operator's key (``odla.proofs``)."
# No control characters: a name is written into log lines, which it must not be able to forge.
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME, strip_whitespace=True,
                                             pattern=r"^[^\x00-\x1f\x7f]+$")]


def node_url(value: str) -> str:
    """A node's base URL as the operator will use it: ``http(s)://host[:port][/base]``, nothing else
    (no query, fragment or credentials, a real port, an ASCII host); ValueError otherwise."""
    from urllib.parse import urlsplit  # noqa: PLC0415 - only for registrations

    text = value.strip().rstrip("/")
    try:
        text.encode("ascii")
        parts = urlsplit(text)
        port = parts.port  # raises for :99999 or :8x
    except (UnicodeEncodeError, ValueError):
        raise ValueError("url must be an http:// or https:// URL with an ASCII host and a port 1-65535") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ValueError("url must be an http:// or https:// URL")
    if parts.query or parts.fragment or "@" in parts.netloc or "?" in text or "#" in text:
        raise ValueError("url must be scheme://host:port with an optional base path: no query, fragment or user")
    if port == 0:
        raise ValueError("url must have a port 1-65535")
    return text


class _Body(BaseModel):
    """Request bodies reject unknown fields, so typos fail loudly with a 422."""

    model_config = ConfigDict(extra="forbid")


class LoadedModel(BaseModel):
    """A model in the memory of a node's Ollama (its ``/api/ps``)."""

    name: ModelName
    expires_at: Optional[str] = None
    "RFC 3339, when Ollama unloads it unless used again."


OPERATOR_HEADER = "x-odla-operator"
"The operator's address on each job it sends a node: whom the node's receipt for it is made out to."
MAX_RECEIPTS = 1024
"Receipts one report carries at most (a node keeps the rest for its next one)."


class SignedReceipt(_Body):
    """A job's receipt as its node signed it (``odla.proofs.receipts.Receipt``, by its EIP-712 names)."""

    receipt: dict[str, Union[str, int]] = Field(max_length=16)
    signature: str = Field(max_length=132)
    "EIP-712 signature by the receipt's ``node``: 0x and 130 hex digits."


class NodeReport(_Body):
    """What a node says about itself: in a registration (its heartbeat) and on a dial-out link."""

    node_id: NodeId
    "Unique name of the node, ``[A-Za-z0-9._-]{1,128}``."
    models: list[ModelName] = Field(default_factory=list, max_length=4096)
    "Model names as the node's Ollama lists them (``llama3:latest``)."
    healthy: bool = True
    "False when the node is up but its Ollama is not answering."
    slots: dict[ModelName, Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=dict, max_length=4096)
    "Requests each model runs at once (OLLAMA_NUM_PARALLEL; 1 for embedding models); absent: 1."
    loaded: list[LoadedModel] = Field(default_factory=list, max_length=4096)
    "Models Ollama holds in memory now."
    max_models: Optional[Annotated[int, Field(ge=1, le=4096)]] = None
    """Models Ollama holds in memory at once (OLLAMA_MAX_LOADED_MODELS, as the node's owner set it);
    absent: the operator learns it from what it sees the node hold."""
    tokens_per_s: dict[ModelName, Annotated[float, Field(ge=0)]] = Field(default_factory=dict, max_length=4096)
    "Moving average of eval tokens per second per model, from Ollama's final messages."
    slots_learned: bool = False
    "True: the node learns ``slots`` from its jobs (its Ollama's parallelism is not configured)."
    digests: dict[ModelName, Annotated[str, StringConstraints(max_length=80)]] = Field(default_factory=dict,
                                                                                       max_length=4096)
    "Each model's digest as the node's Ollama lists it: audits re-run a job on a node with the same one."
    disk_free: Optional[Annotated[int, Field(ge=0)]] = None
    "Bytes free where the node's Ollama keeps its models (``OLLAMA_MODELS``): where a pull can go."
    address: Optional[Address] = None
    "The node's key (``node_key_file``); with ``signed_at`` and ``signature``, the report is signed."
    signed_at: Optional[float] = None
    "Unix seconds when the node signed the report: the operator takes it within 5 minutes of its clock."
    receipts: list[SignedReceipt] = Field(default_factory=list, max_length=MAX_RECEIPTS)
    "Receipts the node signed for jobs of the operator it reports to, since its last report."
    signature: Optional[str] = Field(None, max_length=132)
    """EIP-191 signature by ``address`` of the report's bytes before this member, which comes last
    (``odla.proofs.reports``)."""


class RegisterRequest(NodeReport):
    """``POST /register`` on the operator: a node announces itself (also its heartbeat)."""

    url: str = Field(max_length=2048)
    "Base URL where the operator reaches the node, http(s) only."

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return node_url(value)


# --- the dial-out link (``/nodes/link``): JSON text frames, each with its type in ``t`` ---------------

LINK_PATH = "/nodes/link"
WINDOW = 16
"Chunks of one job the node may send ahead of the operator's credit (granted by halves)."
REFUSED, REPLACED, TAKEN, BAD_FRAME, SILENT = 4401, 4000, 4409, 4400, 4408
"""How the operator closes a link: no or a wrong credential; replaced by the node's new link; the id
is live on another link; a frame it cannot read; silent too long."""


class LinkHello(NodeReport):
    """Node -> operator, the link's first frame."""

    t: Literal["hello"]
    version: str = Field(max_length=64)
    heartbeat_interval: float = Field(gt=0, le=3600)
    "The node sends a ``status`` at least this often; the operator drops a link silent for 3 x this."
    error: Optional[str] = Field(None, max_length=4096)
    "Why the node is unhealthy (its Ollama does not answer)."


class LinkStatus(NodeReport):
    """Node -> operator, every ``heartbeat_interval`` and when something changed."""

    t: Literal["status"]
    seq: int = Field(ge=0)
    "Increases with each status: an older one arriving late is dropped."
    error: Optional[str] = Field(None, max_length=4096)


class RegisterResponse(BaseModel):
    """Answer to ``POST /register``."""

    status: Literal["registered"] = "registered"
    node_id: str
    models: list[str]
    operator_address: Optional[str] = None
    "The operator's key: the node makes its receipts for this operator's jobs out to it."


class DeregisterRequest(_Body):
    """``POST /deregister`` on the operator: a node leaving the network on shutdown."""

    node_id: NodeId
    url: Optional[str] = Field(None, max_length=2048)
    "The leaving node's URL: the row is removed only if it is still this node's."


class NodeInfo(BaseModel):
    """One row of ``GET /nodes``."""

    node_id: str
    url: str
    models: list[str]
    last_seen: str
    "ISO 8601, UTC."
    healthy: bool = True
    active_jobs: int = 0
    "Jobs this operator has running on the node now."
    jobs_total: int = 0
    "Jobs relayed since the node registered with this operator."
    slots: dict[str, int] = Field(default_factory=dict)
    "Requests each model runs at once."
    slots_learned: bool = False
    "True: the node learns its slots from its jobs; false: they are configured."
    loaded: list[str] = Field(default_factory=list)
    "Models in memory."
    tokens_per_s: Optional[float] = None
    "Measured: a moving average of eval tokens per second."
    resting_until: Optional[str] = None
    "ISO 8601, UTC: after failing several jobs in a row the node gets none until then."
    link: Literal["http", "dial"] = "http"
    "``dial``: the node dialled in (``/nodes/link``) and is reached through that link."
    address: Optional[str] = None
    "The node's key (Ethereum address) that signed its registration; none: an unsigned node."
    reputation: float = 1.0
    "0 to 1, from its audits and disputed receipts (1 until something counts against it)."
    audits: dict[str, int] = Field(default_factory=lambda: {"passed": 0, "failed": 0})
    "Audits of its answers: passed, failed."
    disputed: int = 0
    "Its receipts this operator disputed."
    quarantined: bool = False
    "Its reputation fell under ``quarantine_below``: it gets no jobs."
    disk_free: Optional[int] = None
    "Bytes free where its Ollama keeps models, as the node says (where a pull can go)."
    other_builds: list[str] = Field(default_factory=list)
    """Its models that another node lists under the same name with another digest (another build or
    quantisation): a job's resume or audit never mixes them."""


class NodesResponse(BaseModel):
    """Answer to ``GET /nodes``."""

    nodes: list[NodeInfo]


class GenerateOptions(_Body):
    """What ``/inference`` passes to Ollama's ``/api/generate`` unchanged (all optional)."""

    options: Optional[dict[str, Any]] = Field(None, max_length=256)
    """Ollama's model options, e.g. ``{"num_predict": 64, "temperature": 0.2}``."""
    system: Optional[str] = None
    "A system prompt, instead of the model's own."
    format: Optional[Union[Literal["json"], dict[str, Any]]] = None
    """``"json"``, or a JSON schema the answer must follow."""
    keep_alive: Optional[Union[float, str]] = None
    """How long Ollama keeps the model loaded afterwards: seconds, or a duration such as ``"10m"``."""

    def ollama_fields(self) -> dict[str, Any]:
        return {k: v for k, v in ((f, getattr(self, f)) for f in OLLAMA_FIELDS) if v is not None}


OLLAMA_FIELDS = tuple(GenerateOptions.model_fields)  # once: pydantic builds the mapping on each access


class InferenceRequest(GenerateOptions):
    """``POST /inference`` on the operator."""

    model: ModelName
    prompt: str = Field(min_length=1)


class RunRequest(GenerateOptions):
    """``POST /run`` on a node (sent by the operator)."""

    job_id: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1)
    model: Optional[ModelName] = None
    "The model to run; when absent, the node's first model."


class HealthResponse(BaseModel):
    """Answer to a node's ``GET /health``."""

    status: Literal["healthy", "unhealthy"]
    node_id: str = Field(max_length=128)
    models: list[ModelName] = Field(max_length=4096)
    "Bounded like a registration's: a node cannot make the operator hold millions of names."
    error: Optional[str] = Field(None, max_length=4096)


class ModelsResponse(BaseModel):
    """Answer to a node's ``GET /models``."""

    node_id: str
    models: list[str]


Outcome = Literal["ok", "client_cancel", "node_error", "no_node", "queue_full", "queue_timeout", "bad_request",
                  "unpaid"]
"How a job ended: the values of ``odla_requests_total``'s ``outcome`` and of a receipt's."


class JobPrediction(BaseModel):
    """When the scheduler predicted the job would finish, on the node it picked first, when it asked."""

    node: str
    finish_s: float
    "Seconds from the request to the job's end: ``wait_s + load_s + prompt_s + run_s``."
    wait_s: float
    "For a free slot on the node (or for a loaded model to be idle, to make room for this one)."
    load_s: float
    "To load the model into memory (0: it was loaded)."
    prompt_s: float = 0.0
    "To read the prompt, but for what the node has cached of its conversation."
    run_s: float
    "To produce ``tokens`` at the node's measured speed."
    tokens: int
    "The answer's predicted length: what it asked for at most, else the model's mean."


class JobLeg(BaseModel):
    """One node's part of a resumed answer."""

    node: str
    tokens: int
    "Output tokens it gave that the client was sent."
    job: Optional[str] = None
    """The record that holds this node's signed receipt and charge: the job itself for the first node,
    ``{id}.{n}`` (``GET /jobs/{id}.{n}``) for the n-th node after it (null from an operator older than that)."""


class JobReceipt(BaseModel):
    """One job as the operator saw it: ``GET /jobs/{id}``, and the rows of ``GET /jobs``."""

    id: str
    "Also the ``X-ODLA-Job`` header of the job's answer."
    model: str
    node: Optional[str] = None
    "The node that ran it (after any failover); null when none did."
    door: Literal["inference", "ollama", "openai"]
    outcome: Optional[Outcome] = None
    "How it ended; null while it runs."
    error: Optional[str] = None
    caller: Optional[str] = None
    "Who asked: a hash of the API key (never the key); null without keys."
    started_at: str
    "ISO 8601, UTC, like the other times."
    first_token_at: Optional[str] = None
    finished_at: Optional[str] = None
    failovers: int = 0
    "Nodes that did not take the job before one did."
    queue_wait_s: Optional[float] = None
    "Seconds it waited for a free slot, when it had to."
    prompt_tokens: Optional[int] = None
    "Ollama's count (``prompt_eval_count``), as are ``output_tokens`` (``eval_count``) and the durations."
    output_tokens: Optional[int] = None
    total_duration: Optional[int] = None
    "Nanoseconds, as Ollama gives them; so are the other durations."
    load_duration: Optional[int] = None
    prompt_eval_duration: Optional[int] = None
    eval_duration: Optional[int] = None
    prediction: Optional[JobPrediction] = None
    "The scheduler's prediction for the job (null when it reached no node)."
    legs: Optional[list[JobLeg]] = None
    """When a node failed mid-answer (resumable or not): each node in turn that gave part of the answer,
    and the tokens it gave (null: no node failed it mid-answer). ``node`` is the last of them; ``receipt``
    is the first one's."""
    part_of: Optional[str] = None
    """Set on the record of a resumed answer's later leg (``legs[n].job``): the job it is part of. Such
    records are read by id; listings show the jobs clients asked for."""
    receipt: Optional[dict[str, Any]] = None
    """The job's receipt as its node and this operator signed it: EIP-712 typed data (``types``,
    ``primaryType``, ``domain``, ``message``); null until the node's signed receipt has come (with its
    next report), or when the node has no key."""
    node_signature: Optional[str] = None
    "The node's signature of ``receipt`` (0x-hex)."
    operator_signature: Optional[str] = None
    "This operator's countersignature of ``receipt`` (0x-hex)."
    disputed: Optional[str] = None
    "Why the node's receipt does not match what this operator relayed; null when it does."


class JobsResponse(BaseModel):
    """Answer to ``GET /jobs``: newest first."""

    jobs: list[JobReceipt]


class TokenLine(BaseModel):
    """A piece of the answer."""

    token: str
    done: Literal[False] = False


class QueuedLine(BaseModel):
    """Before any token: every node with the model is busy, and the job is ``queued``-th in line.

    Sent first and again when the place changes (at most once a second); only on ``/inference``."""

    queued: int = Field(ge=1)
    done: Literal[False] = False


class DoneLine(BaseModel):
    """The final line of a stream that succeeded."""

    done: Literal[True] = True


class NodeDoneLine(DoneLine):
    """A node's final line to the operator: also Ollama's counts, which the operator keeps
    for the job's receipt and takes off the line before the client sees it."""

    stats: dict[str, int] = Field(default_factory=dict)


class ErrorLine(BaseModel):
    """The final line of a stream that failed, or an error body before any stream."""

    error: str
    done: Literal[True] = True


StreamLine = Union[TokenLine, QueuedLine, ErrorLine, DoneLine]


# The hot path encodes lines by hand: byte-for-byte what json.dumps gives for the
# models above (tests/test_protocol.py holds them equal), without a model per token.

DONE_LINE = b'{"done": true}\n'
NODE_DONE = b'{"done": true, "stats": '
"How a node's final line with Ollama's counts starts (``node_done_line``)."


def node_done_line(stats: dict[str, int]) -> bytes:
    """Encode one ``NodeDoneLine``; without counts it is the plain final line."""
    return NODE_DONE + json.dumps(stats).encode() + b"}\n" if stats else DONE_LINE


def token_line(token: str) -> bytes:
    """Encode one ``TokenLine``."""
    return b'{"token": ' + encode_basestring(token).encode() + b', "done": false}\n'


def queued_line(place: int) -> bytes:
    """Encode one ``QueuedLine``."""
    return b'{"queued": %d, "done": false}\n' % place


def error_line(message: str) -> bytes:
    """Encode one final ``ErrorLine``."""
    return b'{"error": ' + encode_basestring(message).encode() + b', "done": true}\n'


def parse_line(line: Union[str, bytes]) -> StreamLine:
    """Decode one stream line; raises ``ValueError`` when it is not a protocol line."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"not a stream line: {line!r}")
    if data.get("done") is True:
        if "error" in data:
            return ErrorLine(error=str(data["error"]))
        return DoneLine()
    if "queued" in data and "token" not in data:
        return QueuedLine.model_validate(data)
    return TokenLine.model_validate(data)


def final_line(line: Union[str, bytes]) -> Optional[dict[str, Any]]:
    """``line`` decoded when it is a complete final line (``"done": true``), else None."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("done") is True else None
