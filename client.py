"""ODLA client: prompts and conversations on an ODLA network, and a look at the network.

    python client.py run llama3 "Why is the sky blue?"    (as 'ollama run': a prompt, answered; none, a chat)
    python client.py "Explain quantum entanglement" --model llama3
    python client.py infer "prompt" --model llama3 --operator remote-host:8000
    cat notes.txt | python client.py run llama3
    python client.py -- "-1 is a number"                 (a prompt that starts with -)
    python client.py run llama3 "Why?" --verbose          (Ollama's stats after the answer, on stderr)
    python client.py chat --model llama3                  (also: python client.py, on a terminal)
    python client.py list | ps | show MODEL | nodes | jobs | pull MODEL | rm MODEL | version
    python client.py verify JOB_ID                        (check a job's proof; --file proof.json offline)
    python client.py login | logout | balance             (sign in with a wallet: --key-file or ODLA_WALLET_KEY)
    python client.py deposit AMOUNT | allow AMOUNT | withdraw   (the escrow on chain, in wei)

Exit codes: 0 done; 1 the network answered with an error; 2 the operator could not
be reached or the command line is wrong; 130 interrupted (Ctrl-C).

Only typer and the client's own light modules are imported at start; each command imports
what it needs (httpx, the wire protocol) when it runs, so ``--version`` and ``--help`` are quick.
"""

import contextlib
import json
import os
import signal
import sys
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from odla import __version__
from odla.client.errors import EXIT_INTERRUPTED, EXIT_USAGE, Failure, operator_url
from odla.client.terminal import Spinner, colour_wanted, is_terminal, width

COMMANDS = {"run", "infer", "chat", "list", "ls", "ps", "show", "nodes", "jobs", "verify", "pull", "rm", "cp", "version",
            "login", "logout", "balance", "deposit", "allow", "withdraw"}

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run prompts and chats on an ODLA network, and look at its models, nodes and jobs.")

OperatorOpt = Annotated[Optional[str], typer.Option(
    "--operator", envvar="ODLA_OPERATOR_URL", show_envvar=True, show_default="operator_url in config.json",
    help="The operator: http://host:port, or host:port")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="ODLA_API_KEY", show_envvar=True, help="API key, when the operator asks for one")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", show_default="default_model in config.json",
                                                 help="Model")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the operator's raw JSON")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", metavar="", help="After each answer, Ollama's stats "
                                          "on stderr as 'ollama run --verbose' prints them, then the node and job")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt, instead of the model's own")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="json, or a JSON schema the answer must follow")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="Ollama's temperature option")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="An Ollama option as key=value "
                                                        "(repeatable), e.g. -o num_ctx=8192 -o seed=42")]
KeepaliveOpt = Annotated[Optional[str], typer.Option("--keepalive", help="How long the model stays loaded "
                                                     "afterwards: a duration such as 10m, or seconds")]
ShowNodeOpt = Annotated[bool, typer.Option("--show-node", metavar="", help="Say on stderr which node answers")]


def version_text() -> str:
    return f"client.py (ODLA) {__version__}"


def version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def main_options(version: Annotated[bool, typer.Option("--version", "-v", metavar="", callback=version_callback,
                                                       is_eager=True, help="Print the version and exit")] = False,
                 ) -> None:
    """Run prompts and chats on an ODLA network, and look at its models, nodes and jobs."""


def settings() -> Any:
    from odla.core.config import ConfigError, load_settings

    try:
        return load_settings(role="client")
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc


def ask(operator: Optional[str], api_key: Optional[str], method: str, path: str, **kw) -> Any:
    """One JSON answer from the operator (``--operator``, else config.json's)."""
    from odla.client.calls import call, http_client

    url = operator_url(operator or settings().operator_url)
    with http_client(url, api_key) as http:
        return call(http, url, method, path, **kw)


@contextlib.contextmanager
def exit_at_once_on_ctrl_c(answering: Callable[[], bool]) -> Iterator[None]:
    """Ctrl-C while streaming leaves at once, with exit code 130, and what was printed of the
    answer stays on screen (``answering()``: part of it was printed; else the spinner's line goes).

    A KeyboardInterrupt unwinding through httpx's connection pool can deadlock on the
    pool's lock (encode/httpcore#990: seen here as a client that never exited). Exiting
    closes the socket, which is what tells the operator, the node and Ollama to stop.
    """
    def leave(signum: int, frame: object) -> None:
        if answering():
            os.write(1, b"\n")  # the partial answer keeps its last line
            os.write(2, b"interrupted\n")
        else:
            os.write(2, b"\r\x1b[K\ninterrupted\n" if is_terminal(sys.stderr) else b"\ninterrupted\n")
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
        raise Failure("the prompt is empty", EXIT_USAGE)
    return text


def run_action(action: Callable[[], None]) -> None:
    """Turn Failures and Ctrl-C into a message on stderr and an exit code."""
    try:
        action()
    except Failure as exc:
        prefix = "\x1b[1;31merror:\x1b[0m" if colour_wanted(sys.stderr) else "error:"
        typer.echo(f"{prefix} {exc}", err=True)
        raise typer.Exit(exc.code) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def answer(prompt: str, model: Optional[str], operator: Optional[str], api_key: Optional[str], *,
           show_node: bool = False, verbose: bool = False, extras: Optional[dict] = None) -> None:
    """Stream one answer to ``prompt`` to stdout (queue places and the node on stderr)."""
    from odla.client.calls import http_client, receipt, stream_inference
    from odla.client.tables import verbose_stats
    from odla.core import protocol as p

    conf = settings()
    url = operator_url(operator or conf.operator_url)
    request = p.InferenceRequest(model=model or conf.default_model, prompt=prompt, **(extras or {}))
    printed = False
    job_ids: list[str] = []
    spinner = Spinner()

    told: list[str] = []

    def on_node(node: str) -> None:
        told.append(node)
        if show_node:
            spinner.stop()
            typer.echo(f"[node {node}]", err=True)

    def on_queued(place: int) -> None:
        words = f"queued: place {place} in line" if place > 1 else "queued: next in line"
        if spinner.active:
            spinner.say(words)
        else:
            typer.echo(f"[{words}]", err=True)

    try:
        with exit_at_once_on_ctrl_c(lambda: printed), http_client(url, api_key) as http:
            with spinner:
                for token in stream_inference(http, url, request, on_node, on_queued, job_ids.append):
                    spinner.stop()
                    typer.echo(token, nl=False)
                    printed = True
            typer.echo()  # the answer ends its line, even an empty answer
            printed = False
            job = None
            if show_node and not told and job_ids:  # it waited in the queue: its node was chosen after the headers
                with contextlib.suppress(Failure):  # (the answer stands without it)
                    job = receipt(http, url, job_ids[0])
                if job is not None and job.node:
                    typer.echo(f"[node {job.node}]", err=True)
            if verbose:
                stats = verbose_stats(job or receipt(http, url, job_ids[0])) if job_ids else "(no job receipt)"
                typer.echo("\n" + stats, err=True)
    finally:
        if printed:  # the answer's line ends before any error is printed below it
            typer.echo()


def converse(model: Optional[str], operator: Optional[str], api_key: Optional[str], *, verbose: bool,
             system: Optional[str], extras: dict) -> None:
    import httpx

    from odla.client.calls import auth_headers, unreachable
    from odla.client.chat import run_chat

    conf = settings()
    url = operator_url(operator or conf.operator_url)
    try:
        run_chat(url, auth_headers(api_key, url), model or conf.default_model, extras, system, verbose)
    except httpx.HTTPError as exc:
        raise unreachable(url, exc) from exc


def extras_of(system: Optional[str], fmt: Optional[str], temperature: Optional[float], option: Optional[list[str]],
              keepalive: Optional[str]) -> dict:
    from odla.client.calls import job_extras

    return job_extras(system, fmt, temperature, option or [], keepalive)


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="The model")],
    prompt: Annotated[Optional[list[str]], typer.Argument(help="The prompt (its words are joined); none: a chat, "
                                                               "or standard input when it is not a terminal")] = None,
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    verbose: VerboseOpt = False,
    fmt: FormatOpt = None,
    keepalive: KeepaliveOpt = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    option: OptionOpt = None,
    show_node: ShowNodeOpt = False,
) -> None:
    """Run MODEL as 'ollama run' does: with a PROMPT, answer it and exit; without one, chat."""

    def action() -> None:
        text = " ".join(prompt or [])
        if not is_terminal(sys.stdin) and not text:
            text = sys.stdin.read()
        if text.strip():
            extras = extras_of(system, fmt, temperature, option, keepalive)
            answer(text, model, operator, api_key, show_node=show_node, verbose=verbose, extras=extras)
        elif is_terminal(sys.stdin):
            converse(model, operator, api_key, verbose=verbose, system=system,
                     extras=extras_of(None, fmt, temperature, option, keepalive))
        else:
            raise Failure("the prompt is empty", EXIT_USAGE)

    run_action(action)


@app.command()
def infer(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input; "
                                               "one that starts with '-' goes after --")],
    model: ModelOpt = None,
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    show_node: ShowNodeOpt = False,
    verbose: VerboseOpt = False,
    system: SystemOpt = None,
    fmt: FormatOpt = None,
    temperature: TemperatureOpt = None,
    option: OptionOpt = None,
    keepalive: KeepaliveOpt = None,
) -> None:
    """Stream a model's answer to PROMPT (the default command)."""
    run_action(lambda: answer(read_prompt(prompt), model, operator, api_key, show_node=show_node, verbose=verbose,
                              extras=extras_of(system, fmt, temperature, option, keepalive)))


@app.command()
def chat(
    model: ModelOpt = None,
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    verbose: VerboseOpt = False,
    system: SystemOpt = None,
    fmt: FormatOpt = None,
    temperature: TemperatureOpt = None,
    option: OptionOpt = None,
    keepalive: KeepaliveOpt = None,
) -> None:
    """Chat with a model, as 'ollama run MODEL' does: /? for commands, /bye or Ctrl-D leaves, Ctrl-C stops an answer."""
    run_action(lambda: converse(model, operator, api_key, verbose=verbose, system=system,
                                extras=extras_of(None, fmt, temperature, option, keepalive)))


@app.command("list")
def list_models(operator: OperatorOpt = None, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """The models the network has, and how many healthy nodes have each (also: ls)."""

    def action() -> None:
        from collections import Counter

        from odla.client.tables import table
        from odla.core import protocol as p

        listing = p.NodesResponse.model_validate(ask(operator, api_key, "GET", "/nodes"))
        counts = Counter(m for n in listing.nodes if n.healthy for m in n.models)
        loaded = Counter(m for n in listing.nodes if n.healthy for m in n.loaded)
        where = {m: [n.node_id for n in listing.nodes if n.healthy and m in n.models] for m in counts}
        builds = {m for n in listing.nodes for m in n.other_builds}  # one name, several digests
        if as_json:
            typer.echo(json.dumps({"models": [{"name": m, "nodes": c, "loaded_on": loaded[m], "where": where[m],
                                               "builds_differ": m in builds}
                                              for m, c in sorted(counts.items())]}, indent=2))
            return
        rows = [("NAME", "NODES", "LOADED ON", "WHERE")] + [
            (m, str(c), str(loaded[m]), ",".join(where[m]) + (" (builds differ)" if m in builds else ""))
            for m, c in sorted(counts.items())]
        typer.echo(table(rows, colour_wanted(), width()) if counts else "no models: no healthy node has joined")

    run_action(action)


app.command("ls", hidden=True)(list_models)


@app.command()
def ps(operator: OperatorOpt = None, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """The models in memory now, node by node."""

    def action() -> None:
        from odla.client.tables import table
        from odla.core import protocol as p

        listing = p.NodesResponse.model_validate(ask(operator, api_key, "GET", "/nodes"))
        rows = [(m, n.node_id, str(n.active_jobs)) for n in listing.nodes for m in n.loaded]
        if as_json:
            typer.echo(json.dumps({"models": [{"name": m, "node": node, "active_jobs": int(a)}
                                              for m, node, a in rows]}, indent=2))
            return
        heading = ("NAME", "NODE", "NODE'S ACTIVE JOBS")
        typer.echo(table([heading, *rows], colour_wanted(), width()) if rows else "no model is loaded")

    run_action(action)


@app.command()
def show(model: Annotated[str, typer.Argument(help="The model")], operator: OperatorOpt = None,
         api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """A model's details, from a node that has it (Ollama's /api/show)."""

    def action() -> None:
        from odla.client.tables import model_details

        info = ask(operator, api_key, "POST", "/api/show", body={"model": model})
        typer.echo(json.dumps(info, indent=2) if as_json else model_details(info))

    run_action(action)


ReplicasOpt = Annotated[Optional[str], typer.Option("--replicas", metavar="N", help="Nodes to pull onto: a count, "
                                                  "or 'all' (default: the operator's default_replicas)")]
NodeListOpt = Annotated[Optional[list[str]], typer.Option("--node", metavar="ID", help="This node (again for more)")]


@app.command()
def pull(model: Annotated[str, typer.Argument(help="The model")], replicas: ReplicasOpt = None,
         node: NodeListOpt = None, operator: OperatorOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Pull MODEL onto the network's nodes, through the operator, with Ollama's progress."""

    def action() -> None:
        from odla.client.calls import http_client
        from odla.client.models import Progress, placement, pulled

        url = operator_url(operator or settings().operator_url)
        progress = Progress()
        with http_client(url, api_key) as http:
            for part in pulled(http, url, model, placement(replicas, node or [])):
                progress.show(part)

    run_action(action)


@app.command()
def rm(model: Annotated[str, typer.Argument(help="The model")], node: NodeListOpt = None,
       operator: OperatorOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Remove MODEL from every node that has it (or the --node ones), through the operator."""
    run_action(lambda: (_managed(operator, api_key, "DELETE", "/api/delete", {"model": model}, node),
                        typer.echo(f"deleted '{model}'")))


@app.command()
def cp(source: Annotated[str, typer.Argument(help="The model to copy")],
       destination: Annotated[str, typer.Argument(help="Its new name")], node: NodeListOpt = None,
       operator: OperatorOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Copy SOURCE to DESTINATION on every node that has it (or the --node ones), through the operator."""
    run_action(lambda: (_managed(operator, api_key, "POST", "/api/copy",
                                 {"source": source, "destination": destination}, node),
                        typer.echo(f"copied '{source}' to '{destination}'")))


def _managed(operator: Optional[str], api_key: Optional[str], method: str, path: str, body: dict,
             nodes: Optional[list[str]]) -> None:
    """A model-management call that answers nothing but its status; its refusal as a Failure."""
    import httpx

    from odla.client.calls import http_client, refused, unreachable
    from odla.client.models import placement

    url = operator_url(operator or settings().operator_url)
    with http_client(url, api_key) as http:
        try:
            resp = http.request(method, path, json=body, headers=placement(None, nodes or []))
        except httpx.HTTPError as exc:
            raise unreachable(url, exc) from exc
        if resp.status_code != 200:
            raise refused(resp, url)


@app.command()
def nodes(operator: OperatorOpt = None, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """List the nodes registered with the operator."""

    def action() -> None:
        from odla.client.tables import nodes_table
        from odla.core import protocol as p

        listing = ask(operator, api_key, "GET", "/nodes")
        typer.echo(json.dumps(listing, indent=2) if as_json else
                   nodes_table(p.NodesResponse.model_validate(listing), bold=colour_wanted(), width=width()))

    run_action(action)


@app.command()
def jobs(
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="How many, newest first")] = 20,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only this model")] = None,
    node: Annotated[Optional[str], typer.Option("--node", help="Only this node")] = None,
    outcome: Annotated[Optional[str], typer.Option("--outcome", help="Only this outcome (ok, node_error, ...)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent jobs: their receipts, newest first."""

    def action() -> None:
        from odla.client.tables import jobs_table
        from odla.core import protocol as p

        query = {k: v for k, v in (("limit", limit), ("model", model), ("node", node), ("outcome", outcome)) if v}
        listing = ask(operator, api_key, "GET", "/jobs", params=query)
        typer.echo(json.dumps(listing, indent=2) if as_json else
                   jobs_table(p.JobsResponse.model_validate(listing).jobs, bold=colour_wanted(), width=width()))

    run_action(action)


@app.command()
def verify(
    job_id: Annotated[Optional[str], typer.Argument(help="The job (its X-ODLA-Job header); or --file")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="A proof saved from GET /jobs/{id}/proof: "
                                                "checked offline")] = None,
    operator: OperatorOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Check a job's proof: the node's and the operator's signatures of its receipt, the Merkle
    path to its epoch's root, and the operator's signature of the epoch. Exit 0 when it holds, 1
    when it does not (saying which part failed), 2 on bad usage."""

    def action() -> None:
        if (job_id is None) == (file is None):
            raise Failure("give a JOB_ID, or --file proof.json (one of them)", EXIT_USAGE)
        if file is not None:
            try:
                with open(file, encoding="utf-8") as source:
                    document = json.load(source)
            except (OSError, ValueError) as exc:
                raise Failure(f"cannot read a proof from {file}: {exc}", EXIT_USAGE) from None
        else:
            document = ask(operator, api_key, "GET", f"/jobs/{job_id}/proof")
        from odla.proofs.verify import check

        results = check(document)
        for part, problem in results:
            typer.echo(f"{'ok' if problem is None else 'FAILED':6} {part}" + (f": {problem}" if problem else ""))
        failed = [part for part, problem in results if problem is not None]
        if failed:
            raise Failure(f"the proof does not hold: {', '.join(failed)}", 1)
        receipt, epoch = document["receipt"]["message"], document["epoch"]["message"]
        typer.echo(f"job {receipt['jobId']}: run by node {receipt['node']}, countersigned by operator "
                   f"{receipt['operator']}, in epoch {epoch['number']} (root {epoch['root']})")
        if document.get("disputed"):
            typer.echo(f"note: the operator disputed this receipt: {document['disputed']}")

    run_action(action)


KeyFileOpt = Annotated[Optional[str], typer.Option(
    "--key-file", help="The wallet's private key file (64 hex digits, mode 0600); else ODLA_WALLET_KEY")]


@app.command()
def login(operator: OperatorOpt = None, key_file: KeyFileOpt = None) -> None:
    """Sign in to the operator with a wallet (Sign-In with Ethereum): the token it gives is kept and
    sent by every command to that operator, as an API key would be, until it expires."""

    def action() -> None:
        from odla.client.wallet import keep, wallet
        from odla.settlement.signin import SignIn
        import time

        me = wallet(key_file)
        url = operator_url(operator or settings().operator_url)
        message = SignIn.to(url, me.address, ask(url, None, "GET", "/auth/nonce"), time.time(), lasts=7 * 86400)
        session = ask(url, None, "POST", "/auth/verify", body={"message": message.text(), "signature": message.sign(me)})
        keep(url, session)
        typer.echo(f"signed in to {url} as {session['account']} until {session['expires_at']}")

    run_action(action)


@app.command()
def logout(operator: OperatorOpt = None) -> None:
    """Forget the wallet sign-in kept for the operator (and tell it to)."""

    def action() -> None:
        from odla.client.wallet import forget

        url = operator_url(operator or settings().operator_url)
        session = forget(url)
        if session is None:
            typer.echo(f"not signed in to {url}")
            return
        try:
            ask(url, session["token"], "POST", "/auth/logout")
        except Failure:  # forgotten here all the same; the token expires there
            pass
        typer.echo(f"signed out of {url}")

    run_action(action)


@app.command()
def balance(operator: OperatorOpt = None, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Your account on the operator's ledger: what you spent, and with settlement on chain what you
    deposited, what running jobs hold and what is available."""

    def action() -> None:
        account = ask(operator, api_key, "GET", "/accounts/me", params={"limit": 10})
        if as_json:
            typer.echo(json.dumps(account, indent=2))
            return
        typer.echo(f"account    {account['account']}")
        chain = account.get("chain")
        if chain is None:
            typer.echo(f"balance    {account['balance']}")
        else:
            for name in ("deposited", "signed_off", "spent", "held", "available"):
                typer.echo(f"{name:10} {chain[name]} wei")
            if chain.get("withdrawable_at"):
                typer.echo(f"withdrawal requested: python client.py withdraw again from block time {chain['withdrawable_at']}")
        for entry in account["entries"]:
            typer.echo(f"  {entry['kind']:8} {entry['amount']:>14}  job {entry['job_id']}")

    run_action(action)


def wei(amount: str) -> int:
    """AMOUNT as given on the command line: a positive whole number of the smallest unit."""
    if not amount.isdigit() or int(amount) <= 0:
        raise Failure(f"AMOUNT is a positive whole number of wei, not {amount!r}", EXIT_USAGE)
    return int(amount)


def escrow() -> Any:
    """The escrow contract the config names (chain_rpc_url, chain_id, escrow_address)."""
    conf = settings()
    if not (conf.chain_rpc_url and conf.chain_id and conf.escrow_address):
        raise Failure("no chain: set chain_rpc_url, chain_id and escrow_address in config.json (or "
                      "ODLA_CHAIN_RPC_URL, ODLA_CHAIN_ID, ODLA_ESCROW_ADDRESS)", EXIT_USAGE)
    from odla.settlement.chain import Escrow

    return Escrow(conf.chain_rpc_url, conf.chain_id, conf.escrow_address, timeout=30)


def on_chain(step: Callable[[], str]) -> str:
    from odla.settlement.chain import ChainError

    try:
        return step()
    except ChainError as exc:
        raise Failure(str(exc), 1) from None


@app.command()
def deposit(amount: Annotated[str, typer.Argument(help="How much, in wei (or the settlement token's smallest unit)")],
            key_file: KeyFileOpt = None) -> None:
    """Deposit into the escrow, to pay for jobs with. The last line is the transaction's hash."""

    def action() -> None:
        from odla.client.wallet import wallet

        value = wei(amount)
        me, contract = wallet(key_file), escrow()
        token = on_chain(contract.token)
        tx = on_chain(lambda: contract.deposit(me, value))
        typer.echo(f"deposited {value} {'wei' if token is None else 'units of the token ' + token} from {me.address} "
                   f"into {contract.address}")
        typer.echo(tx)

    run_action(action)


@app.command()
def allow(amount: Annotated[str, typer.Argument(help="How much more the operator may charge you, in wei")],
          operator: OperatorOpt = None, key_file: KeyFileOpt = None) -> None:
    """Sign off that the operator may charge you AMOUNT more (a spend voucher, kept by the operator):
    it can never charge you more than you signed off, whatever it posts on chain."""

    def action() -> None:
        from odla.client.wallet import wallet
        from odla.settlement.vouchers import Voucher

        more = wei(amount)
        me = wallet(key_file)
        account = ask(operator, None, "GET", "/accounts/me", params={"limit": 1})
        chain = account.get("chain")
        if chain is None:
            raise Failure("this operator does not settle on chain, or you are not signed in with a wallet "
                          "(python client.py login)", 1)
        if account["account"] != me.address:
            raise Failure(f"signed in as {account['account']}, but the key is {me.address}: log in with it", EXIT_USAGE)
        cumulative = chain["signed_off"] + more
        voucher = Voucher(me.address, cumulative)
        done = ask(operator, None, "POST", "/accounts/me/allowance", body={
            "cumulative": cumulative, "signature": voucher.sign(me, chain["chain_id"], chain["escrow"])})
        typer.echo(f"signed off {cumulative} wei in all for escrow {chain['escrow']}; {done['available']} available")

    run_action(action)


@app.command()
def withdraw(key_file: KeyFileOpt = None) -> None:
    """Take back what you deposited and did not spend: the first call asks (the operator then has
    the contract's delay to post what you spent), a call after the delay pays. The last line is
    the transaction's hash."""

    def action() -> None:
        from odla.client.wallet import wallet

        me, contract = wallet(key_file), escrow()
        standing = on_chain(lambda: contract.standing(me.address))
        if not standing.withdrawable_at:
            tx = on_chain(lambda: contract.request_withdrawal(me))
            at = on_chain(lambda: contract.standing(me.address)).withdrawable_at
            typer.echo(f"withdrawal of up to {standing.available} wei requested; run withdraw again from block time {at}")
        else:
            wait = standing.withdrawable_at - on_chain(contract.now)
            if wait > 0:
                from odla.core.times import iso
                raise Failure(f"the withdrawal can be made from {iso(standing.withdrawable_at)} (the chain's "
                              f"time; {wait} s from now): run withdraw again then", 1)
            tx = on_chain(lambda: contract.withdraw(me))
            typer.echo(f"withdrew {standing.available} wei to {me.address}")
        typer.echo(tx)

    run_action(action)


@app.command()
def version() -> None:
    """Print the version (as --version and -v do)."""
    typer.echo(version_text())


def with_default_command(argv: list[str], interactive: bool = False) -> list[str]:
    """``client.py "prompt"`` means ``client.py infer "prompt"``; no arguments on a terminal, a chat."""
    if not argv:
        return ["chat"] if interactive else argv
    if argv[0].startswith("-") and any(c.isspace() for c in argv[0]):
        return ["infer", *argv[1:], "--", argv[0]]  # a prompt that starts with "-": no option has a space in it
    if argv[0] not in COMMANDS and argv[0] not in ("--help", "-h", "--version", "-v"):
        return ["infer", *argv]
    return argv


def main() -> None:
    app(args=with_default_command(sys.argv[1:], is_terminal(sys.stdin) and is_terminal(sys.stdout)),
        prog_name="client.py")


if __name__ == "__main__":
    main()
