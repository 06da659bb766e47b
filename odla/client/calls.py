"""The client's calls to the operator, and what it tells the user when they fail.

Every failure becomes a ``Failure``: one sentence for stderr and the exit code it calls for.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any, Callable, Iterator, Optional

import httpx

from odla.core import protocol as p
from odla.core.errors import error_in
from odla.client.errors import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, Failure
from odla.client.streaming import StreamError, tokens


def http_client(operator: str, api_key: Optional[str]) -> httpx.Client:
    return httpx.Client(base_url=operator, headers=auth_headers(api_key, operator), timeout=httpx.Timeout(10, read=None))


def auth_headers(api_key: Optional[str], operator: Optional[str] = None) -> dict[str, str]:
    """The API key given, else the wallet sign-in kept for ``operator`` (``client.py login``)."""
    if not api_key and operator is not None:
        from odla.client.wallet import saved_token
        api_key = saved_token(operator)
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def refused(resp: httpx.Response, operator: str) -> Failure:
    """What a refusal means, in the user's terms."""
    message = error_in(resp.read())
    if resp.status_code == 404 and p.JOB_HEADER not in resp.headers and (message is None or message == "Not Found"):
        return not_an_operator(operator, f"it answered {resp.status_code} {resp.text.strip()[:60]!r}")
    if resp.status_code == 401:
        return Failure(f"{message or 'an API key is needed'}: pass --api-key KEY or set ODLA_API_KEY, or sign in "
                       "with a wallet (client.py login)")
    message = message or resp.text.strip() or f"HTTP {resp.status_code}"
    return Failure(f"{message} (HTTP {resp.status_code})" if resp.status_code >= 500 else message)


def not_an_operator(operator: str, why: str) -> Failure:
    """Something answers at ``operator``, but not an operator: an ODLA node (its port), or not ODLA."""
    try:
        health = httpx.get(f"{operator}/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        health = None
    if isinstance(health, dict) and "node_id" in health:
        return Failure(f"{operator} is an ODLA node ({health['node_id']}), not the operator: point --operator "
                       "or ODLA_OPERATOR_URL at the operator (port 8000 by default)", EXIT_USAGE)
    return Failure(f"{operator} is not an ODLA operator ({why}); point --operator or ODLA_OPERATOR_URL at one",
                   EXIT_USAGE)


def unreachable(operator: str, exc: httpx.HTTPError) -> Failure:
    if isinstance(exc, httpx.ConnectError) and _tls_failed(exc):
        plain = "http://" + operator.removeprefix("https://")
        return Failure(f"{operator}: the TLS handshake failed ({_reason(exc)}); if the operator serves plain "
                       f"HTTP, use {plain}", EXIT_UNREACHABLE)
    if isinstance(exc, httpx.ConnectError):
        return Failure(f"cannot reach the operator at {operator}: is it running? Start it with "
                       "'python server.py', or point --operator / ODLA_OPERATOR_URL at it.", EXIT_UNREACHABLE)
    if isinstance(exc, httpx.TimeoutException):
        return Failure(f"the operator at {operator} did not answer in time", EXIT_UNREACHABLE)
    return Failure(f"lost the connection to the operator at {operator} ({type(exc).__name__})", EXIT_ERROR)


def _tls_failed(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ssl.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text[text.find("[") + 1:text.find("]")] if "[" in text and "]" in text else text[:80]


def call(http: httpx.Client, operator: str, method: str, path: str, params: Optional[dict] = None,
         body: Optional[dict] = None) -> Any:
    """One of the operator's JSON answers; its refusal or absence as a ``Failure``."""
    try:
        resp = http.request(method, path, params=params, json=body)
    except httpx.RemoteProtocolError as exc:  # the whole answer is read: something that is not HTTP answered
        raise not_an_operator(operator, "it does not answer in HTTP") from exc
    except httpx.HTTPError as exc:
        raise unreachable(operator, exc) from exc
    if resp.status_code != 200:
        raise refused(resp, operator)
    try:
        return resp.json()
    except ValueError:
        raise Failure(f"{operator} is not an ODLA operator (its answer to {path} is not JSON)", EXIT_USAGE) from None


def stream_inference(http: httpx.Client, operator: str, request: p.InferenceRequest,
                     on_node: Callable[[str], None] = lambda node: None,
                     on_queued: Callable[[int], None] = lambda place: None,
                     on_job: Callable[[str], None] = lambda job_id: None) -> Iterator[str]:
    """Tokens of one inference, as they arrive; ``on_node`` hears which node serves it (when the
    job did not wait in the queue), ``on_queued`` its place while it waits, ``on_job`` its id."""
    body = request.model_dump_json(exclude_none=True)
    try:
        with http.stream("POST", "/inference", content=body, headers={"content-type": "application/json"}) as resp:
            if resp.status_code != 200:
                raise refused(resp, operator)
            if p.JOB_HEADER in resp.headers:
                on_job(resp.headers[p.JOB_HEADER])
            if "x-odla-node" in resp.headers:
                on_node(resp.headers["x-odla-node"])
            yield from tokens(resp.iter_lines(), on_queued)
    except httpx.HTTPError as exc:
        raise unreachable(operator, exc) from exc
    except StreamError as exc:
        raise Failure(str(exc)) from exc


def receipt(http: httpx.Client, operator: str, job_id: str, wait: float = 2.0) -> p.JobReceipt:
    """A job's receipt once it has ended (the operator records the end just after the last line)."""
    deadline = time.monotonic() + wait
    while True:
        job = p.JobReceipt.model_validate(call(http, operator, "GET", f"/jobs/{job_id}"))
        if job.outcome is not None or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def job_extras(system: Optional[str], fmt: Optional[str], temperature: Optional[float], option: list[str],
               keepalive: Optional[str]) -> dict[str, Any]:
    """The prompt options, as Ollama takes them: ``system``, ``format``, ``options``, ``keep_alive``."""
    options: dict[str, Any] = {}
    for item in option:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise Failure(f"--option {item!r}: give key=value, e.g. --option num_ctx=8192", EXIT_USAGE)
        try:
            options[key.strip()] = json.loads(raw)  # numbers, true/false, lists: as Ollama expects them
        except ValueError:
            options[key.strip()] = raw
    if temperature is not None:
        options["temperature"] = temperature
    extras: dict[str, Any] = {}
    if options:
        extras["options"] = options
    if system:
        extras["system"] = system
    if fmt:
        if fmt.strip().startswith("{"):
            try:
                extras["format"] = json.loads(fmt)
            except ValueError:
                raise Failure("--format: a JSON schema must be valid JSON", EXIT_USAGE) from None
        elif fmt == "json":
            extras["format"] = "json"
        else:
            raise Failure(f"--format {fmt!r}: give json, or a JSON schema", EXIT_USAGE)
    if keepalive:
        try:
            extras["keep_alive"] = float(keepalive)  # seconds; negative: keep it loaded
        except ValueError:
            extras["keep_alive"] = keepalive  # a duration such as "10m"
    return extras
