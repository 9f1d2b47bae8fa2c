"""Entry point of a prestart job process: `python -m mailpool.jobs.main ENTRY JOB_ID FD SNAPSHOT`.

Started fresh by the supervisor (never forked from its running Trio loop); FD is the
job's end of its control channel.
"""

from __future__ import annotations

import functools
import signal
import socket
import sys
from pathlib import Path

import trio

from mailpool.config import load_snapshot
from mailpool.framework.local_delivery import LocalFramework
from mailpool.fsutil import raise_fd_limit
from mailpool.jobs.runtime import JobContext, run_job
from mailpool.supervisor.channel import Channel, ToJob


async def _framework_work(framework: LocalFramework, ctx: JobContext,
                          items: list[tuple[str, bool]]
                          ) -> tuple[list[tuple[str, bool]], list[tuple[str, dict[str, object]]]]:
    """One batch: every message's copies written, one group commit for all, then each taken
    off the queue. Runs in the job's loop: without per-file fsyncs the file work is short.
    Journal entries ride on the sync request and on WorkDone."""
    passes = []
    entries: list[tuple[str, dict[str, object]]] = []
    results: list[tuple[str, bool]] = []
    for queue_id, again in items:
        fp = framework.deliver(queue_id, again=again)
        if fp is None:
            results.append((queue_id, True))  # an earlier pass finished it
        else:
            passes.append(fp)
            entries += fp.take_entries()
    if passes and not await ctx.group_sync(entries):
        # Nothing is lost: the queue files stay and are tried again.
        return results + [(fp.queue_id, False) for fp in passes], []
    done: list[tuple[str, dict[str, object]]] = []
    for fp in passes:
        framework.complete(fp)
        done += fp.take_entries()
        results.append((fp.queue_id, True))
    return results, done


async def job_main(entry: str, job_id: int, fd: int, config_path: Path) -> None:
    loaded = load_snapshot(config_path.read_bytes())
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    ctx = JobContext(loaded, entry, job_id, Channel(sock, ToJob))
    if entry == "smtp-server":
        from mailpool.jobs.smtp_session import SmtpServerRole

        await run_job(ctx, session=SmtpServerRole(ctx).session)
    elif entry == "pop-server":
        from mailpool.jobs.pop_session import PopServerRole

        await run_job(ctx, session=PopServerRole(ctx).session)
    elif entry == "framework":
        from mailpool.directory import Directory
        from mailpool.framework.spool import Spool

        cfg = loaded.config
        framework = LocalFramework(
            spool=Spool(loaded.spool_dir), directory=Directory(loaded.directory_file),
            mailbox_root=loaded.mailbox_dir, hostname=cfg.host.name,
            local_domains=cfg.host.local_domains, postmaster=cfg.host.postmaster)
        await run_job(ctx, work=functools.partial(_framework_work, framework))
    else:
        raise SystemExit(f"mailpool job: unknown entry {entry!r}")


def main() -> None:
    # The supervisor decides when jobs end; a Ctrl-C aimed at the terminal's process
    # group must not kill sessions under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    entry, job_id, fd, config_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    trio.run(job_main, entry, job_id, fd, Path(config_path))


if __name__ == "__main__":
    main()
