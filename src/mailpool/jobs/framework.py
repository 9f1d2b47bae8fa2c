"""What a framework job runs: batches of messages from the incoming queue (QMSF's jobs).

Every message of a batch is taken through the first half of its pass (copies, forwards and
notices written, nothing fsynced), then one group commit makes all of it durable, then each
message completes (journaled, off the incoming queue). Journal entries ride on the sync
request and on WorkDone.
"""

from __future__ import annotations

import functools
import time

from mailpool.directory import Directory
from mailpool.framework.filters import Filters
from mailpool.framework.notice_queue import NoticeSettings
from mailpool.framework.passes import TAG_NONDEL, Framework, FrameworkPass
from mailpool.framework.spool import Spool
from mailpool.jobs.runtime import JobContext, WorkResult, run_job
from mailpool.storage import SpaceCheck
from mailpool.supervisor.channel import OutboundItem


async def work(framework: Framework, space: SpaceCheck, ctx: JobContext,
               items: list[tuple[str, bool]]) -> WorkResult:
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
    for queue_id, again in items:
        fp = framework.deliver(queue_id, again=again)
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
    framework = Framework(
        spool=Spool(ctx.loaded.spool_dir), directory=Directory(ctx.loaded.directory_file),
        mailbox_root=ctx.loaded.mailbox_dir, hostname=cfg.host.name,
        local_domains=cfg.host.local_domains, postmaster=cfg.host.postmaster,
        router=cfg.outbound.router, notices=NoticeSettings.from_config(cfg),
        filters=Filters(cfg.filter) if cfg.filter else None)
    space = SpaceCheck(ctx.loaded.data_dir, cfg.storage.min_free_mb)
    await run_job(ctx, work=functools.partial(work, framework, space))
