"""ODLA client: send a prompt into the network and stream the answer to the terminal.

    python client.py "Explain quantum entanglement" --model llama3
    python client.py infer "prompt" --model llama3 --operator http://remote-host:8000
    cat notes.txt | python client.py - --model llama3
    python client.py "Why is the sky blue?" --verbose     (Ollama's stats after the answer, on stderr)
    python client.py nodes [--json]
    python client.py jobs [--limit 20] [--json]

Exit codes: 0 done; 1 the network answered with an error; 2 the operator could not
be reached or the command line is wrong; 130 interrupted (Ctrl-C).
"""

import contextlib
import json
import os
import signal
import sys
import time
from typing import Annotated, Callable, Iterator, Optional

import httpx
import typer

from odla import protocol as p
from odla.config import ConfigError, Settings, load_settings
from odla.report import jobs_table, nodes_table, verbose_stats
from odla.streaming import StreamError, tokens

COMMANDS = {"infer", "nodes", "jobs"}
EXIT_ERROR, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 130

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run prompts on an ODLA network and look at its nodes.")

OperatorOpt = Annotated[Optional[str], typer.Option(
    "--operator", envvar="ODLA_OPERATOR_URL", show_envvar=True,
    help="Operator URL [default: operator_url in config.json]")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="ODLA_API_KEY", show_envvar=True, help="API key, when the operator asks for one")]


class Failure(Exception):
    """A one-sentence error for stderr, with the exit code it calls for."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_UNREACHABLE) from exc


def _headers(api_key: Optional[str]) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _http(operator: str, api_key: Optional[str]) -> httpx.Client:
    return httpx.Client(base_url=operator, headers=_headers(api_key),
                        timeout=httpx.Timeout(10, read=None))


def _refused(resp: httpx.Response) -> Failure:
    resp.read()
    try:
        message = resp.json().get("error") or resp.text
    except (ValueError, AttributeError):
        message = resp.text.strip() or f"HTTP {resp.status_code}"
    return Failure(f"{message} (HTTP {resp.status_code})" if resp.status_code >= 500 else message)


def _unreachable(operator: str, exc: httpx.HTTPError) -> Failure:
    if isinstance(exc, httpx.ConnectError):
        return Failure(f"cannot reach the operator at {operator}: is it running? Start it with "
                       "'python server.py', or point --operator / ODLA_OPERATOR_URL at it.", EXIT_UNREACHABLE)
    if isinstance(exc, httpx.TimeoutException):
        return Failure(f"the operator at {operator} did not answer in time", EXIT_UNREACHABLE)
    return Failure(f"lost the connection to the operator at {operator} ({type(exc).__name__})", EXIT_ERROR)


def get_json(http: httpx.Client, operator: str, path: str, params: Optional[dict] = None) -> dict:
    """GET one of the operator's listings; its refusal or absence as a ``Failure``."""
    try:
        resp = http.get(path, params=params)
    except httpx.HTTPError as exc:
        raise _unreachable(operator, exc) from exc
    if resp.status_code != 200:
        raise _refused(resp)
    return resp.json()


def stream_inference(http: httpx.Client, operator: str, model: str, prompt: str,
                     on_node: Callable[[str], None] = lambda node: None,
                     on_queued: Callable[[int], None] = lambda place: None,
                     on_job: Callable[[str], None] = lambda job_id: None) -> Iterator[str]:
    """Tokens of one inference, as they arrive; ``on_node`` hears which node serves it (when the
    job did not wait in the queue), ``on_queued`` its place while it waits, ``on_job`` its id."""
    body = p.InferenceRequest(model=model, prompt=prompt).model_dump_json()
    try:
        with http.stream("POST", "/inference", content=body, headers={"content-type": "application/json"}) as resp:
            if resp.status_code != 200:
                raise _refused(resp)
            if p.JOB_HEADER in resp.headers:
                on_job(resp.headers[p.JOB_HEADER])
            if "x-odla-node" in resp.headers:
                on_node(resp.headers["x-odla-node"])
            yield from tokens(resp.iter_lines(), on_queued)
    except httpx.HTTPError as exc:
        raise _unreachable(operator, exc) from exc
    except StreamError as exc:
        raise Failure(str(exc)) from exc


@contextlib.contextmanager
def exit_at_once_on_ctrl_c() -> Iterator[None]:
    """Ctrl-C while streaming leaves at once, with exit code 130.

    A KeyboardInterrupt unwinding through httpx's connection pool can deadlock on the
    pool's lock (encode/httpcore#990: seen here as a client that never exited). Exiting
    closes the socket, which is what tells the operator, the node and Ollama to stop.
    """
    def leave(signum: int, frame: object) -> None:
        os.write(2, b"\ninterrupted\n")
        os._exit(EXIT_INTERRUPTED)

    try:
        previous = signal.signal(signal.SIGINT, leave)
    except ValueError:  # not the main thread: keep Python's KeyboardInterrupt
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_prompt(prompt: str) -> str:
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise Failure("the prompt is empty", EXIT_UNREACHABLE)
    return text


def run(action) -> None:
    """Turn Failures and Ctrl-C into a message on stderr and an exit code."""
    try:
        action()
    except Failure as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def infer(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model [default: default_model in config.json]")] = None,
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    show_node: Annotated[bool, typer.Option("--show-node", help="Say on stderr which node answers")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="After the answer, Ollama's stats on stderr, "
                                          "as 'ollama run --verbose' prints them, then the node and the job")] = False,
) -> None:
    """Stream a model's answer to PROMPT (the default command)."""

    def action() -> None:
        conf = settings()
        url = (operator or conf.operator_url).rstrip("/")
        text = read_prompt(prompt)
        printed = False
        on_node = (lambda node: typer.echo(f"[node {node}]", err=True)) if show_node else (lambda node: None)

        def on_queued(place: int) -> None:
            typer.echo(f"[queued: place {place} in line]" if place > 1 else "[queued: next in line]", err=True)

        job_ids: list[str] = []
        try:
            with exit_at_once_on_ctrl_c(), _http(url, api_key) as http:
                for token in stream_inference(http, url, model or conf.default_model, text, on_node, on_queued,
                                              job_ids.append):
                    typer.echo(token, nl=False)
                    printed = True
                typer.echo()  # the answer ends its line, even an empty answer
                printed = False
                if verbose:
                    stats = verbose_stats(receipt(http, url, job_ids[0])) if job_ids else "(no job receipt)"
                    typer.echo("\n" + stats, err=True)
        finally:
            if printed:  # the answer's line ends before any error is printed below it
                typer.echo()

    run(action)


@app.command()
def nodes(
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the operator's raw JSON")] = False,
) -> None:
    """List the nodes registered with the operator."""

    def action() -> None:
        url = (operator or settings().operator_url).rstrip("/")
        with _http(url, api_key) as http:
            listing = get_json(http, url, "/nodes")
        typer.echo(json.dumps(listing, indent=2) if as_json else nodes_table(p.NodesResponse.model_validate(listing)))

    run(action)


@app.command()
def jobs(
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="How many, newest first")] = 20,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only this model")] = None,
    node: Annotated[Optional[str], typer.Option("--node", help="Only this node")] = None,
    outcome: Annotated[Optional[str], typer.Option("--outcome", help="Only this outcome (ok, node_error, ...)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the operator's raw JSON")] = False,
) -> None:
    """List recent jobs: their receipts, newest first."""

    def action() -> None:
        url = (operator or settings().operator_url).rstrip("/")
        query = {k: v for k, v in (("limit", limit), ("model", model), ("node", node), ("outcome", outcome)) if v}
        with _http(url, api_key) as http:
            listing = get_json(http, url, "/jobs", query)
        typer.echo(json.dumps(listing, indent=2) if as_json else jobs_table(p.JobsResponse.model_validate(listing).jobs))

    run(action)


def receipt(http: httpx.Client, operator: str, job_id: str, wait: float = 2.0) -> p.JobReceipt:
    """A job's receipt once it has ended (the operator records the end just after the last line)."""
    deadline = time.monotonic() + wait
    while True:
        job = p.JobReceipt.model_validate(get_json(http, operator, f"/jobs/{job_id}"))
        if job.outcome is not None or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def with_default_command(argv: list[str]) -> list[str]:
    """``client.py "prompt"`` means ``client.py infer "prompt"``."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("--help", "-h"):
        return ["infer", *argv]
    return argv


def main() -> None:
    app(args=with_default_command(sys.argv[1:]), prog_name="client.py")


if __name__ == "__main__":
    main()
