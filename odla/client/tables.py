"""The client's plain-text views: the nodes, the jobs, and one job's stats as ``ollama run --verbose`` prints them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional, Sequence

from odla.core.protocol import JobReceipt, NodesResponse
from odla.core.times import epoch


def go_duration(ns: int) -> str:
    """A duration as Go's ``time.Duration`` prints it, as Ollama's ``--verbose`` does:
    ``512ns``, ``18.5µs``, ``61.145167ms``, ``7.945641583s``, ``1m2.5s``, ``1h0m0s``."""
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _trim(ns, 1_000) + "µs"
    if ns < 1_000_000_000:
        return _trim(ns, 1_000_000) + "ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _trim(rest, 1_000_000_000) + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def _trim(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    digits = len(str(unit)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0").rstrip(".") if frac else str(whole)


def verbose_stats(job: JobReceipt) -> str:
    """What ``ollama run --verbose`` prints after an answer (its words and formats), then the
    node and the job; a count or duration Ollama did not give is left out, as Ollama does."""
    lines = []
    if job.total_duration:
        lines.append(f"total duration:       {go_duration(job.total_duration)}")
    if job.load_duration:
        lines.append(f"load duration:        {go_duration(job.load_duration)}")
    if job.prompt_tokens:
        lines.append(f"prompt eval count:    {job.prompt_tokens} token(s)")
    if job.prompt_eval_duration:
        lines.append(f"prompt eval duration: {go_duration(job.prompt_eval_duration)}")
        lines.append(f"prompt eval rate:     {(job.prompt_tokens or 0) / (job.prompt_eval_duration / 1e9):.2f} tokens/s")
    if job.output_tokens:
        lines.append(f"eval count:           {job.output_tokens} token(s)")
    if job.eval_duration:
        lines.append(f"eval duration:        {go_duration(job.eval_duration)}")
        lines.append(f"eval rate:            {(job.output_tokens or 0) / (job.eval_duration / 1e9):.2f} tokens/s")
    lines.append(f"node:                 {job.node or '-'}")
    if job.legs:  # a node failed mid-answer and another finished it
        lines.append("resumed:              " + ", then ".join(f"{leg.node} ({leg.tokens} tokens)" for leg in job.legs))
    lines.append(f"job:                  {job.id}")
    return "\n".join(lines)


def table(rows: Sequence[Sequence[str]], bold_heading: bool = False, width: Optional[int] = None) -> str:
    """Columns padded to their widest cell; the heading in bold when asked (a terminal with colour);
    lines cut to ``width`` with an ellipsis (a terminal's width; never when piped)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if width is not None and width > 10:
        lines = [line if len(line) <= width else line[:width - 1] + "…" for line in lines]
    if bold_heading:
        lines[0] = f"\x1b[1m{lines[0]}\x1b[0m"
    return "\n".join(lines)


def nodes_table(listing: NodesResponse, now: Optional[datetime] = None, bold: bool = False,
                width: Optional[int] = None) -> str:
    """The network as a plain-text table."""
    if not listing.nodes:
        return "no nodes registered"
    now = now or datetime.now(timezone.utc)
    rows = [("NODE", "URL", "MODELS", "SEEN", "HEALTH", "ACTIVE", "TOTAL", "KEY", "REPUTATION")]  # new ones go last
    for n in listing.nodes:
        rows.append((n.node_id, n.url, ", ".join(n.models) or "-", ago(n.last_seen, now),
                     "healthy" if n.healthy else "UNHEALTHY", str(n.active_jobs), str(n.jobs_total),
                     short_address(n.address), f"{n.reputation:.2f}" + (" QUARANTINED" if n.quarantined else "")))
    return table(rows, bold, width)


def short_address(address: Optional[str]) -> str:
    """``0x5B38…ddC4``, as wallets show an address; ``-`` for an unsigned node."""
    return f"{address[:6]}…{address[-4:]}" if address else "-"


def jobs_table(jobs: Sequence[JobReceipt], now: Optional[datetime] = None, bold: bool = False,
               width: Optional[int] = None) -> str:
    """Receipts as a plain-text table, as listed (newest first)."""
    if not jobs:
        return "no jobs"
    now = now or datetime.now(timezone.utc)
    rows = [("JOB", "STARTED", "MODEL", "NODE", "OUTCOME", "TOKENS IN/OUT", "FIRST TOKEN", "TOTAL")]
    for j in jobs:
        tokens = f"{j.prompt_tokens if j.prompt_tokens is not None else '?'}/{j.output_tokens}" \
            if j.output_tokens is not None else "-"
        rows.append((j.id[:12], ago(j.started_at, now), j.model, j.node or "-", j.outcome or "running", tokens,
                     _between(j.started_at, j.first_token_at), _between(j.started_at, j.finished_at)))
    return table(rows, bold, width)


def _between(start: str, end: Optional[str]) -> str:
    began, ended = epoch(start), epoch(end)
    if began is None or ended is None:
        return "-"
    seconds = ended - began
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def ago(stamp: str, now: datetime) -> str:
    seen = epoch(stamp)
    if seen is None:
        return stamp
    secs = max(0, int(now.timestamp() - seen))
    return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago" if secs < 7200 else f"{secs // 3600}h ago"


def model_details(info: dict) -> str:
    """A model's details as ``ollama show`` prints them, from Ollama's ``/api/show`` answer."""
    details = info.get("details") or {}
    rows = [(k.replace("_", " "), str(details[k])) for k in ("family", "parameter_size", "quantization_level",
                                                               "format") if details.get(k)]
    rows += [("capabilities", ", ".join(info["capabilities"]))] if info.get("capabilities") else []
    pad = max((len(k) for k, _ in rows), default=0) + 2  # two spaces at least after the longest name
    lines = ["  Model\n" + "\n".join(f"    {k:<{pad}}{v}" for k, v in rows)]
    if info.get("parameters"):
        lines.append("  Parameters\n" + "\n".join(f"    {line}" for line in info["parameters"].splitlines()))
    return "\n\n".join(lines)
