"""The operator's Prometheus metrics (``GET /metrics``), on prometheus_client, one registry per app.

What the network *is* is read when Prometheus scrapes, from the registry and the scheduler, so
nothing on the hot path keeps it: whether each node is up, its slots, the jobs it runs for this
operator, its loaded models, each model's queue, and the version. What *happened* is counted
once per job, when it ends (``RequestMetrics.observe``): its outcome, duration, time to first
token, time per output token, tokens in and out (Ollama's counts) and failovers. One ``odla_`` prefix, seconds, no per-request labels.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from odla import __version__
from odla.serving.jobs import JOB_PATHS, Job, door_of
from odla.operator.registry import Registry
from odla.operator.scheduler import Scheduler
from odla.core.times import iso

CONTENT_TYPE = CONTENT_TYPE_LATEST
MODELS_PER_NODE = 64
"Models per node in the per-model gauges (running and loaded ones first): 4,096 long names on each of a few nodes made 20 MB pages."


class NetworkCollector(Collector):
    """The nodes and queues as they are at scrape time."""

    def __init__(self, registry: Registry, scheduler: Scheduler) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.auditor: Any = None
        "The operator's auditor (``odla.operator.audits``), once its lifespan has made it."

    def collect(self) -> Iterator:
        now = self.registry.clock()
        up = GaugeMetricFamily("odla_node_up", "1 when the node answers and is given jobs", labels=["node"])
        slots = GaugeMetricFamily("odla_node_slots", "Requests the node's Ollama runs at once", labels=["node", "model"])
        inflight = GaugeMetricFamily("odla_node_inflight_requests", "Jobs this operator has running on the node",
                                     labels=["node", "model"])
        loaded = GaugeMetricFamily("odla_node_model_loaded", "1 when the model is in the node's memory",
                                   labels=["node", "model"])
        for node in self.registry.nodes():
            up.add_metric([node.node_id], 1.0 if node.healthy and not node.resting(now) else 0.0)
            keys = sorted(node.keys, key=lambda k: (not node.inflight.get(k), not node.warm(k, now), k))
            for key in keys[:MODELS_PER_NODE]:  # a node's list of models must not grow the page without end
                slots.add_metric([node.node_id, key], node.said_slots(key))
                inflight.add_metric([node.node_id, key], node.inflight.get(key, 0))
                loaded.add_metric([node.node_id, key], 1.0 if node.warm(key, now) else 0.0)
        depth = GaugeMetricFamily("odla_queue_depth", "Jobs waiting for a free slot", labels=["model"])
        for key, waiting in self.scheduler.depth().items():
            depth.add_metric([key], waiting)
        info = InfoMetricFamily("odla", "The operator's version")
        info.add_metric([], {"version": __version__})
        yield from (up, slots, inflight, loaded, depth, info)
        reputation = GaugeMetricFamily("odla_node_reputation", "0 to 1, from the node's audits and disputed receipts",
                                       labels=["node"])
        for node in self.registry.nodes():
            reputation.add_metric([node.node_id], node.reputation)
        yield reputation
        if self.auditor is not None:  # audit traffic, apart from the clients'
            audits = CounterMetricFamily("odla_audits", "Audits of sampled jobs, by result", labels=["result"])
            for result, count in self.auditor.counts.items():
                audits.add_metric([result], count)
            tokens = CounterMetricFamily("odla_audit_tokens", "Tokens the audits' re-runs cost")
            tokens.add_metric([], self.auditor.audit_tokens)
            yield from (audits, tokens)


# Inference takes from milliseconds to minutes: buckets to match.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A token takes from a millisecond (a small model on a big GPU) to a second (a big one on a CPU).
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)


ERRORS = (-30, -10, -5, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
"Buckets of prediction errors, in seconds: as many early as late."


class RequestMetrics:
    """Counts every job once, when it ends."""

    def __init__(self, prom: CollectorRegistry) -> None:
        self.requests = Counter("odla_requests", "Jobs by how they ended", ["model", "node", "door", "outcome"],
                                registry=prom)
        self.duration = Histogram("odla_request_duration_seconds", "From the request to the job's end",
                                  ["model", "node"], buckets=SECONDS, registry=prom)
        self.ttft = Histogram("odla_time_to_first_token_seconds", "From the request to the first token sent",
                              ["model", "node"], buckets=SECONDS, registry=prom)
        self.tpot = Histogram("odla_time_per_output_token_seconds",
                              "From the first token to the end, per further output token", ["model", "node"],
                              buckets=PER_TOKEN, registry=prom)
        self.output_tokens = Counter("odla_output_tokens", "Tokens generated (Ollama's eval_count)", ["model", "node"],
                                     registry=prom)
        self.input_tokens = Counter("odla_input_tokens", "Prompt tokens read (Ollama's prompt_eval_count)",
                                    ["model", "node"], registry=prom)
        self.failovers = Counter("odla_failovers", "Nodes that did not take a job another node then ran",
                                 registry=prom)
        self.queue_wait = Histogram("odla_queue_wait_seconds", "How long jobs that found no free slot waited",
                                    ["model"], buckets=SECONDS, registry=prom)
        self.resumes = Counter("odla_resumes", "Nodes that failed mid-answer, by what came of it: ok (another node "
                               "finished the answer), failed (that one failed too), no_node, no_digest, exhausted, "
                               "unresumable, shutting_down", ["outcome"], registry=prom)
        self.prediction_error = Histogram(
            "odla_prediction_error_seconds", "A completed job's duration minus the scheduler's prediction of it "
            "(positive: it took longer than predicted)", ["model"], buckets=ERRORS, registry=prom)

    def refused(self, path: str) -> None:
        """A job's request refused before it was routed (a body over the limit)."""
        if path in JOB_PATHS:
            self.requests.labels("", "", door_of(path), "bad_request").inc()

    def observe(self, job: Job) -> None:
        if not job.door or job.outcome is None:
            return
        # a model no node has is whatever a caller typed: one label value for all of them, so no
        # caller can grow the metrics without bound
        model = job.model if job.node or job.outcome not in ("no_node", "bad_request", "unpaid") else ""
        self.requests.labels(model, job.node, job.door, job.outcome).inc()
        if job.finished is not None:
            self.duration.labels(model, job.node).observe(job.finished - job.started)
        if job.first_token is not None:
            self.ttft.labels(model, job.node).observe(job.first_token - job.started)
        output, prompt = job.usage.output_tokens, job.usage.prompt_tokens
        if output:
            self.output_tokens.labels(model, job.node).inc(output)
            if output > 1 and job.outcome == "ok" and job.first_token is not None and job.finished is not None:
                self.tpot.labels(model, job.node).observe((job.finished - job.first_token) / (output - 1))
        if prompt:
            self.input_tokens.labels(model, job.node).inc(prompt)
        if job.failovers:
            self.failovers.inc(job.failovers)
        for outcome in job.resumes:
            self.resumes.labels(outcome).inc()
        if job.queue_wait is not None:
            self.queue_wait.labels(model).observe(job.queue_wait)
        if job.prediction is not None and job.outcome == "ok" and job.finished is not None:
            self.prediction_error.labels(model).observe(job.finished - job.started - job.prediction.finish_s)


def metrics_registry(network: NetworkCollector) -> CollectorRegistry:
    """One Prometheus registry per app (never the global one: tests build many apps)."""
    prom = CollectorRegistry(auto_describe=False)
    prom.register(network)
    return prom


def exposition(prom: CollectorRegistry) -> bytes:
    return generate_latest(prom)


class Activity:
    """Jobs and output tokens per ``step`` seconds over the last ``span``: the dashboard's chart.

    A ring of buckets, advanced as jobs end and as it is read; each ended job adds to one."""

    def __init__(self, step: int = 5, span: int = 600, clock: Callable[[], float] = time.time) -> None:
        self.step, self.size, self.clock = step, span // step, clock
        self.requests = [0] * self.size
        self.tokens = [0] * self.size
        self.last = int(clock() // step)  # the bucket now being filled

    def add(self, job: Job) -> None:
        self._advance()
        self.requests[self.last % self.size] += 1
        self.tokens[self.last % self.size] += job.usage.output_tokens or 0

    def series(self) -> dict:
        """Oldest first; the last bucket is still filling."""
        self._advance()
        order = [(self.last + 1 + i) % self.size for i in range(self.size)]
        return {"step_s": self.step, "until": iso((self.last + 1) * self.step),
                "requests": [self.requests[i] for i in order], "output_tokens": [self.tokens[i] for i in order]}

    def _advance(self) -> None:
        now = int(self.clock() // self.step)
        for bucket in range(self.last + 1, min(now, self.last + self.size) + 1):
            self.requests[bucket % self.size] = self.tokens[bucket % self.size] = 0
        self.last = max(self.last, now)
