"""What a framework job runs: batches of messages from the incoming queue (QMSF's jobs).

Every message of a batch is taken through the first half of its pass (copies, forwards and
notices written, nothing fsynced), then one group commit makes all of it durable, then each
message completes (journaled, off the incoming queue). Journal entries ride on the sync
request and on WorkDone.
"""

from __future__ import annotations

import functools
import logging
import time

from mailpool.directory import DirectoryError, open_job_directory
from mailpool.directory.cached import JobDirectory
from mailpool.framework.filters import Filters
from mailpool.framework.notice_queue import NoticeSettings
from mailpool.framework.passes import TAG_NONDEL, Framework, FrameworkPass
from mailpool.framework.spool import Spool
from mailpool.jobs.runtime import JobContext, WorkResult, run_job
from mailpool.storage import SpaceCheck
from mailpool.supervisor.channel import OutboundItem

log = logging.getLogger("mailpool.framework")


async def work(framework: Framework, space: SpaceCheck, directory: JobDirectory,
               ctx: JobContext, items: list[tuple[str, bool]]) -> WorkResult:
    passes = []
    entries: list[tuple[str, dict[str, object]]] = []
    results: list[tuple[str, bool]] = []
    if space.low():
        # The storage threshold: park the batch on the busy queue; the supervisor puts it
        # back (7M) when there is room again.
        parked = [(qid, framework.park(qid)) for qid, _ in items]
        if not await ctx.group_sync([entry for _, entry in parked if entry]):
            return WorkResult([(qid, False) for qid, _ in items], [], [])
        return WorkResult([(qid, True) for qid, _ in parked], [], [])
    try:
        # A remote directory: every recipient of the batch in one round trip, before the
        # (synchronous) passes resolve them.
        await directory.prefetch(recipients(framework, items) if directory.remote else [])
    except DirectoryError as exc:
        return postponed(items, exc)
    for queue_id, again in items:
        try:
            fp = framework.deliver(queue_id, again=again)
        except DirectoryError as exc:
            # Who a recipient is cannot be known now: not "user unknown". The message
            # stays on the incoming queue and the supervisor offers it again later.
            await directory.report(exc)
            results += postponed([(queue_id, again)], exc).results
            continue
        if fp is None:
            results.append((queue_id, True))  # an earlier pass finished it
        else:
            passes.append(fp)
            entries += fp.take_entries()
    if passes and not await ctx.group_sync(entries):
        # Nothing is lost: the queue files stay and are tried again.
        return WorkResult(results + [(fp.queue_id, False) for fp in passes], [], [])
    done: list[tuple[str, dict[str, object]]] = []
    handed: list[OutboundItem] = []
    for fp in passes:
        framework.complete(fp)
        count(ctx, fp)
        done += fp.take_entries()
        handed += fp.handed
        results.append((fp.queue_id, True))
    return WorkResult(results, done, handed)


def recipients(framework: Framework, items: list[tuple[str, bool]]) -> list[str]:
    """The recipients of a batch that the directory resolves (those in local domains)."""
    out: list[str] = []
    for queue_id, _ in items:
        try:
            envelope = framework.spool.load_envelope("incoming", queue_id)
        except FileNotFoundError:
            continue  # done by an earlier pass
        out += [r for r in envelope.recipients
                if r.rpartition("@")[2].lower().rstrip(".") in framework.local_domains]
    return out


def postponed(items: list[tuple[str, bool]], exc: Exception) -> WorkResult:
    """The directory cannot be read: nothing is resolved, nothing bounced. Each message
    stays on the incoming queue and the supervisor offers it again after its retry delay
    (supervisor.dispatch.WORK_RETRY_DELAY), as long as the outage lasts; each try costs
    one query bounded by the directory's timeouts."""
    log.warning("%d message(s) stay on the incoming queue, to be tried again: %s",
                len(items), exc)
    return WorkResult([(queue_id, False) for queue_id, _ in items], [], [])


def count(ctx: JobContext, fp: FrameworkPass) -> None:
    """Local deliveries and non-deliveries for /metrics and the console."""
    delay = time.time() - fp.envelope.received_ns / 1e9
    for _rcpt, tag, box in fp.outcome:
        if box is not None:
            ctx.activity.delivered(remote=False, delay=delay)
        elif tag == TAG_NONDEL:
            ctx.activity.bounced()


async def run(ctx: JobContext) -> None:
    cfg = ctx.config
    directory = open_job_directory(ctx.loaded, ctx.journal)
    framework = Framework(
        spool=Spool(ctx.loaded.spool_dir), directory=directory.resolver,
        mailbox_root=ctx.loaded.mailbox_dir, hostname=cfg.host.name,
        local_domains=cfg.host.local_domains, postmaster=cfg.host.postmaster,
        router=cfg.outbound.router, notices=NoticeSettings.from_config(cfg),
        filters=Filters(cfg.filter) if cfg.filter else None)
    space = SpaceCheck(ctx.loaded.data_dir, cfg.storage.min_free_mb)
    await run_job(ctx, work=functools.partial(work, framework, space, directory))
