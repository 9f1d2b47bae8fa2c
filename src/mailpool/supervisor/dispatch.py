"""Queue feeding: message ids from the incoming queue to framework jobs.

Whatever waits by the time a framework job is free goes to it in one batch (one Work message,
one group commit, one WorkDone). A message whose job died goes back on the queue; a pass that
failed (e.g. a sync error) is tried again after a delay. The outbound queue has a dispatcher of
its own (mailpool.supervisor.outbound): per-destination limits make it a different animal.
"""

from __future__ import annotations

import trio

from mailpool.supervisor.channel import ChannelClosed, Work, WorkDone
from mailpool.supervisor.jobs import EntryRuntime, JobHandle, JobPools
from mailpool.supervisor.workqueue import WorkQueue

# A framework pass that failed (e.g. a sync error) is tried again after this long.
WORK_RETRY_DELAY = 30.0
# At most this many messages go to a framework job at once (they share one group commit).
WORK_BATCH = 32


class WorkDispatcher:
    def __init__(self, pools: JobPools, entry: EntryRuntime) -> None:
        self.pools = pools
        self.entry = entry
        self.queue = WorkQueue()

    def put(self, queue_id: str, *, again: bool = False) -> None:
        self.queue.put(queue_id, again=again)

    def done(self, job: JobHandle, msg: WorkDone, nursery: trio.Nursery) -> None:
        if any(queue_id in job.work for queue_id, _ in msg.results):
            self.entry.rules.release(job.id)  # one batch, one slot
            self.entry.poke()
        for queue_id, ok in msg.results:
            job.work.discard(queue_id)
            self.queue.done(queue_id)
            if not ok:
                nursery.start_soon(self.retry_later, queue_id)

    def job_exited(self, job: JobHandle) -> None:
        for queue_id in job.work:
            # The message is still in its queue: hand it to another job.
            self.queue.put(queue_id, again=True)

    async def retry_later(self, queue_id: str) -> None:
        await trio.sleep(WORK_RETRY_DELAY)
        self.queue.put(queue_id, again=True)

    async def run(self) -> None:
        entry = self.entry
        while True:
            first = await self.queue.get()
            while True:
                job_id, _, _ = await self.pools.acquire(entry, None)
                if job_id is None:
                    await entry.changed.wait()
                    continue
                job = self.pools.job(entry, job_id)
                if job is None:
                    continue
                assert job.channel is not None
                # Whatever else is waiting by now goes in the same batch: one message,
                # one group commit and one answer for all of them.
                items = [first, *self.queue.take(WORK_BATCH - 1)]
                job.work.update(queue_id for queue_id, _ in items)
                try:
                    await job.channel.send(Work(items=items))
                except ChannelClosed:
                    job.work.difference_update(queue_id for queue_id, _ in items)
                    entry.rules.cancel(job_id)
                    for queue_id, _ in items[1:]:
                        self.queue.put(queue_id, again=True)
                    first = (first[0], True)
                    continue
                break
