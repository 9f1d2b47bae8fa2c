"""Prometheus /metrics through prometheus_client: the supervisor's own figures, read from the
AdminSource at scrape time, beside the library's process and platform collectors.

Nothing here keeps a value between scrapes and no thread runs in the background: the
source owns every counter (monotonic since the supervisor started) and this module only
turns one reading of it into metric families. Names follow postfix_exporter's with the
`mailpool_` prefix where Postfix has a counterpart; the names of the first, hand-written
exposition are kept unchanged (scripts use them).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.from_thread
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

# Upper bounds (seconds) of the delivery delay histogram: the jobs count into these buckets.
from mailpool.activity import DELAY_BUCKETS

if TYPE_CHECKING:
    from mailpool.admin.app import AdminSource



class DelayHistogram:
    """Delivery delays since start, in the shape AdminSource.counters() reports them.

    For the supervisor to keep: observe() each delivered recipient's delay (arrival to
    delivery); snapshot() is the value of counters()["delivery_delay"].
    """

    def __init__(self, bounds: Sequence[float] = DELAY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # a wall clock stepped back must not give a negative delay
        # bisect_left: a delay equal to a bound belongs to that bound's bucket ("le").
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def merge(self, counts: Sequence[int], total: float) -> None:
        """Add a job's bucket counts (same bounds) and their sum."""
        for i, n in enumerate(counts[:len(self.counts)]):
            self.counts[i] += n
        self.sum += total

    def snapshot(self) -> dict[str, Any]:
        """{"counts": per bucket, not cumulative, the last one above every bound;
        "sum": seconds}."""
        return {"counts": list(self.counts), "sum": self.sum}


@dataclass(frozen=True, slots=True)
class Reading:
    """One scrape's worth of AdminSource answers."""

    status: dict[str, Any]
    pools: dict[str, dict[str, Any]]
    counters: dict[str, Any]
    queues: dict[str, int]
    oldest: dict[str, float]
    journal_bytes: int


Family = type[GaugeMetricFamily] | type[CounterMetricFamily]


def _one(kind: Family, name: str, help_text: str, value: float) -> Metric:
    # prometheus_client appends _total to a counter's samples (and, in text format 0.0.4,
    # to its HELP and TYPE lines): counter names go in without it.
    return kind(name, help_text, value=value)


def _by(kind: Family, name: str, help_text: str, label: str,
        values: dict[str, float]) -> Metric:
    family = kind(name, help_text, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def delay_histogram(delay: dict[str, Any],
                    bounds: Sequence[float] = DELAY_BUCKETS) -> HistogramMetricFamily:
    counts = list(delay.get("counts") or [0] * (len(bounds) + 1))
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"delivery_delay has {len(counts)} bucket counts, "
                         f"not {len(bounds) + 1} (DELAY_BUCKETS and one above them)")
    cumulative = list(itertools.accumulate(counts))
    buckets = [(floatToGoString(b), float(c)) for b, c in zip(bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    return HistogramMetricFamily(
        "mailpool_delivery_delay_seconds",
        "Time from a message's arrival to the delivery of each recipient.",
        buckets=buckets, sum_value=float(delay.get("sum", 0.0)))


def families(reading: Reading, now: float) -> list[Metric]:
    """Every mailpool_ metric family for one reading; `now` (Unix seconds) ages the queues."""
    pools, counters = reading.pools, reading.counters
    C, G = CounterMetricFamily, GaugeMetricFamily

    def per_pool(name: str, help_text: str, pick: Callable[[dict[str, Any]], float],
                 counter: bool = False) -> Metric:
        values = {entry: pick(st) for entry, st in pools.items()}
        return _by(C if counter else G, name, help_text, "entry", values)

    delivered = counters.get("delivered", {})
    return [
        _one(G, "mailpool_start_time_seconds",
             "Start time of the supervisor since the Unix epoch in seconds.",
             float(reading.status["started"])),
        # Prestart job pools (pool show --json).
        per_pool("mailpool_pool_jobs", "Prestart jobs running now.",
                 lambda st: st["jobs"]["current"]),
        per_pool("mailpool_pool_jobs_average", "Time-weighted average of running jobs.",
                 lambda st: st["jobs"]["average"]),
        per_pool("mailpool_pool_jobs_peak", "Peak number of running jobs.",
                 lambda st: st["jobs"]["peak"]),
        per_pool("mailpool_pool_in_use", "Prestart jobs serving a request now.",
                 lambda st: st["in_use"]["current"]),
        per_pool("mailpool_pool_in_use_peak", "Peak number of jobs in use.",
                 lambda st: st["in_use"]["peak"]),
        per_pool("mailpool_pool_sessions_in_use",
                 "Sessions (or deliveries) the entry's jobs are serving now.",
                 lambda st: st["sessions"]["in_use"]),
        per_pool("mailpool_pool_sessions_capacity",
                 "Sessions (or deliveries) the entry's ready jobs can take at once.",
                 lambda st: st["sessions"]["capacity"]),
        per_pool("mailpool_pool_waiting", "Requests waiting for a job now.",
                 lambda st: st["waiting"]["current"]),
        per_pool("mailpool_pool_waiting_peak", "Peak number of waiting requests.",
                 lambda st: st["waiting"]["peak"]),
        per_pool("mailpool_pool_average_wait_seconds",
                 "Average time an accepted request waited for a job.",
                 lambda st: st["waiting"]["average_wait_s"]),
        per_pool("mailpool_pool_accepted", "Requests handed to a job.",
                 lambda st: st["accepted"], counter=True),
        per_pool("mailpool_pool_rejected", "Requests refused (no job available).",
                 lambda st: st["rejected"], counter=True),
        per_pool("mailpool_pool_maximum_jobs", "Configured maximum_jobs of the entry.",
                 lambda st: st["parameters"]["maximum_jobs"]),
        # Mail flow (postfix_exporter: postfix_smtpd_connects_total,
        # postfix_smtpd_messages_rejected_total{code}, postfix_smtp_delivery_delay_seconds).
        _by(C, "mailpool_smtpd_connects", "Connections accepted by each SMTP listener.",
            "listener", counters.get("smtpd_connections", {})),
        _by(C, "mailpool_pop3d_connects", "Connections accepted by each POP3 listener.",
            "listener", counters.get("pop3d_connections", {})),
        _one(C, "mailpool_messages_received", "Messages accepted onto the incoming queue.",
             counters.get("received", 0)),
        _by(C, "mailpool_messages_delivered",
            "Recipients delivered: into a local mailbox or to a remote host.",
            "kind", {"local": delivered.get("local", 0), "remote": delivered.get("remote", 0)}),
        _one(C, "mailpool_messages_deferred",
             "Delivery attempts that failed for now (the message waits to be retried).",
             counters.get("deferred", 0)),
        _one(C, "mailpool_messages_bounced",
             "Recipients that failed for good (a non-delivery notice goes back).",
             counters.get("bounced", 0)),
        _by(C, "mailpool_smtpd_messages_rejected",
            "Refusals the SMTP service sent (connection, sender, recipient or message), "
            "by reply code.", "code", counters.get("rejects", {})),
        delay_histogram(counters.get("delivery_delay", {})),
        # Spool and journal.
        _by(G, "mailpool_queue_messages", "Messages in each spool queue.", "queue",
            dict(reading.queues)),
        _by(G, "mailpool_queue_oldest_seconds",
            "Age of the oldest message in each spool queue (0 when empty).", "queue",
            {q: max(0.0, now - reading.oldest[q]) if q in reading.oldest else 0.0
             for q in reading.queues}),
        _one(G, "mailpool_journal_bytes", "Bytes in the journal's receivers.",
             reading.journal_bytes),
    ]


class SourceCollector:
    """A prometheus_client collector that asks the AdminSource at every collect().

    collect() runs in a worker thread (the /metrics handler's): the spool and journal
    listings block there, not the event loop, while the reads of supervisor state hop back
    onto the loop through `on_loop` (anyio.from_thread.run_sync; a plain call in tests).
    """

    def __init__(self, source: AdminSource,
                 on_loop: Callable[[Callable[[], Any]], Any] = anyio.from_thread.run_sync,
                 clock: Callable[[], float] | None = None) -> None:
        self.source = source
        self.on_loop = on_loop
        self.clock = clock or time.time

    def read(self) -> Reading:
        s = self.source
        return Reading(status=self.on_loop(s.status), pools=self.on_loop(s.pool_stats),
                       counters=self.on_loop(s.counters), queues=s.queue_counts(),
                       oldest=s.queue_oldest(), journal_bytes=s.journal_bytes())

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.read(), self.clock()))


def metrics_registry(source: AdminSource, *,
                     on_loop: Callable[[Callable[[], Any]], Any] = anyio.from_thread.run_sync,
                     clock: Callable[[], float] | None = None) -> CollectorRegistry:
    """The process's registry: mailpool's figures, process_* (CPU, memory, open files:
    /proc) and python_info. Its own, not prometheus_client's global REGISTRY, so two
    consoles in one process (tests) never collide."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(SourceCollector(source, on_loop, clock))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """(body, Content-Type): text format 0.0.4, or OpenMetrics when the scraper asks for it.
    Blocks (it reads /proc and the spool): call it in a worker thread."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
