"""Entry point of a prestart job process: `python -m mailpool.jobs.main ENTRY JOB_ID FD SNAPSHOT`.

Started fresh by the supervisor (never forked from its running Trio loop); FD is the
job's end of its control channel. What the job runs comes from its row in mailpool.roles.
"""

from __future__ import annotations

import importlib
import logging
import signal
import socket
import sys
from pathlib import Path

import trio

from mailpool.activity import ProblemLog
from mailpool.config import load_snapshot, pool_params
from mailpool.fsutil import raise_fd_limit
from mailpool.jobs.runtime import JobContext
from mailpool.logs import setup as setup_logging
from mailpool.roles import role
from mailpool.supervisor.channel import Channel, ToJob


async def job_main(entry: str, job_id: int, fd: int, config_path: Path) -> None:
    loaded = load_snapshot(config_path.read_bytes())
    setup_logging(f"mailpool/{entry}/{job_id}", loaded.config.log)
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    ctx = JobContext(loaded, entry, job_id, Channel(sock, ToJob),
                     pool_params(loaded.config, entry))
    logging.getLogger("mailpool").addHandler(ProblemLog(ctx.activity))
    module, _, function = role(entry).program.partition(":")
    await getattr(importlib.import_module(module), function)(ctx)


def main() -> None:
    # The supervisor decides when jobs end; a Ctrl-C aimed at the terminal's process
    # group must not kill sessions under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    entry, job_id, fd, config_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    setup_logging(f"mailpool/{entry}/{job_id}")
    try:
        role(entry)
    except KeyError as exc:
        raise SystemExit(f"mailpool job: {exc.args[0]}") from None
    trio.run(job_main, entry, job_id, fd, Path(config_path))


if __name__ == "__main__":
    main()
