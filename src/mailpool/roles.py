"""The role table: every kind of prestart job is one row here, and nothing else spells its name.

A role is fed either by listeners (the supervisor accepts and hands the connection over) or
by a spool queue (the dispatcher hands it queue ids). Its row says which, what the supervisor
answers a client when no job can take it, which function a job process runs, and the CHGPJE
defaults of its pool entry (as in the source: QTMSSRCP 4/2/2/20, QTMSCLCP 4/2/2/20).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final


@dataclass(frozen=True)
class Role:
    name: str                 # the pool entry's name, [pool.NAME]
    program: str              # "module:function" a job process runs: async def run(ctx)
    listeners: tuple[str, ...] = ()  # [listen] keys whose connections feed this role
    queue: str | None = None      # the dispatcher queue that feeds it
    busy_reply: bytes = b""       # sent by the supervisor when no job can take a connection
    pool_defaults: dict[str, Any] = field(default_factory=dict)  # PoolParams overrides
    # Where its jobs' capacity comes from when not [pool.NAME] sessions_per_job: a
    # (section, key) of the configuration (smtp-client: deliveries, not sessions).
    capacity_key: tuple[str, str] | None = None


SMTP_BUSY: Final = b"421 4.3.2 Service not available, closing transmission channel\r\n"
POP_BUSY: Final = b"-ERR [SYS/TEMP] service not available, try again later\r\n"

ROLES: Final[tuple[Role, ...]] = (
    # The source's CHGPJE values for QTMSSRCP (4 / 2 / 2 / 20), each job serving up to 4096
    # sessions on its Trio loop: 16,384 at start (10,000 idle sessions need no new job: one
    # job's memory is worth ~2,500 idle sessions), 81,920 at the maximum.
    Role("smtp-server", "mailpool.jobs.smtp_session:run",
         listeners=("smtp", "submission", "smtps"), busy_reply=SMTP_BUSY,
         pool_defaults={"sessions_per_job": 4096}),
    Role("pop-server", "mailpool.jobs.pop_session:run", listeners=("pop3", "pop3s"),
         busy_reply=POP_BUSY,
         pool_defaults={"initial_jobs": 2, "threshold": 1, "additional_jobs": 1,
                        "maximum_jobs": 10, "sessions_per_job": 128}),
    # Two batches in flight per framework job, not more: what arrives meanwhile waits and
    # goes in the next batch (one Work, one group commit, one WorkDone for all of it).
    # Against 8, in alternated bench runs: about 25 % less framework CPU per message at 100
    # messages per connection, 10 % at one.
    Role("framework", "mailpool.jobs.framework:run", queue="incoming",
         pool_defaults={"initial_jobs": 1, "threshold": 0, "additional_jobs": 1,
                        "maximum_jobs": 4, "sessions_per_job": 2, "max_use": 100000}),
    Role("smtp-client", "mailpool.jobs.smtp_client:run", queue="outbound",
         pool_defaults={"initial_jobs": 1, "threshold": 0, "additional_jobs": 1,
                        "maximum_jobs": 4, "max_use": 100000},
         capacity_key=("outbound", "deliveries_per_job")),
)

BY_NAME: Final[dict[str, Role]] = {role.name: role for role in ROLES}
ROLE_NAMES: Final[tuple[str, ...]] = tuple(BY_NAME)


def role(name: str) -> Role:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown role {name!r} (known: {', '.join(ROLE_NAMES)})") from None


def for_queue(queue: str) -> Role:
    """The role a dispatcher queue feeds."""
    for r in ROLES:
        if r.queue == queue:
            return r
    raise KeyError(f"no role is fed by queue {queue!r}")
