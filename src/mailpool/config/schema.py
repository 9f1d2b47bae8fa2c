"""The configuration's shape: TOML tables as frozen, typed msgspec Structs with their
defaults, and the values derived from them (an entry's effective pool rules)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from mailpool.roles import BY_NAME, ROLES


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file: key: value: why)."""


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class HostConfig(Base):
    name: str
    local_domains: list[str]
    # Mail to "Postmaster" (RFC 5321 4.5.1) always goes to this user's mailbox.
    postmaster: str = "postmaster"
    # Started as root (to bind ports below 1024), the supervisor and every job run as this
    # user; started as anyone else, they stay who they are.
    user: str = "mailpool"


class ListenConfig(Base):
    smtp: str = "127.0.0.1:2525"
    pop3: str = "127.0.0.1:1110"
    admin: str = "127.0.0.1:8025"
    # Optional ("" = off), RFC 8314: submission (587, STARTTLS and AUTH required), implicit
    # TLS submission (465) and POP3 over TLS (995). All need [tls].
    submission: str = ""
    smtps: str = ""
    pop3s: str = ""


# The listeners a session can come from, and whether TLS starts at once on them.
SMTP_LISTENERS = ("smtp", "submission", "smtps")
POP_LISTENERS = ("pop3", "pop3s")
IMPLICIT_TLS = ("smtps", "pop3s")


class TlsConfig(Base):
    # PEM files; reloaded with the configuration (SIGHUP: new jobs use the new ones).
    certificate: str = ""
    key: str = ""
    handshake_timeout: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


class PathsConfig(Base):
    # Spool, mailboxes, journal and directory live under here; relative to the config file.
    data: str = "var"
    # The mailbox root, when it is not <data>/mailboxes: shared storage that several hosts
    # deliver into (each host keeps its own spool). Relative to the config file.
    mailboxes: str = ""


DIRECTORY_BACKENDS = ("file", "postgresql")


class DirectoryConfig(Base):
    """Where users live: the file under the data directory (one host), or PostgreSQL
    (several hosts sharing one directory)."""

    backend: str = "file"
    # libpq connection string, key=value or postgresql:// URI; `config check` hides the
    # password (redacted_dsn).
    dsn: str = ""
    # Seconds a job keeps a user it found (RCPT, login) before asking the database again:
    # how long a removed user may still receive mail. The file backend needs no cache.
    cache_ttl: float = 10.0
    pool_size: int = 2             # connections per job process (at most)
    connect_timeout: float = 5.0   # seconds to connect, and to wait for a pooled connection
    query_timeout: float = 5.0     # statement_timeout of every statement, seconds

    @property
    def redacted_dsn(self) -> str:
        return redact_dsn(self.dsn)


_DSN_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)")


def redact_dsn(dsn: str) -> str:
    """The connection string with any password replaced by ***."""
    if "://" in dsn:
        scheme, _, rest = dsn.partition("://")
        netloc, sep, tail = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = userinfo.partition(":")[0] + ":***@" + hosts
        dsn = f"{scheme}://{netloc}{sep}{tail}"
        return re.sub(r"([?&]password=)[^&]*", r"\1***", dsn)
    return _DSN_PASSWORD.sub(lambda m: m.group(1) + "***", dsn)


class SmtpConfig(Base):
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    hard_error_limit: int = 20
    # The source's "Support Delivery Status Notification": DSN advertised and honoured.
    dsn: bool = True
    # Deadlines a client cannot stretch (a silent or slow one gets 421 4.4.2): one whole
    # command line (and greeting to first command), the time to DATA's first bytes plus the
    # message at min_data_rate bytes per second, and the whole session.
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    min_data_rate: int = 500
    session_timeout: float = 3600.0
    # Seconds to wait before the greeting: a client that talks first is refused (pregreet).
    greet_pause: float = 0.0
    # Time allowed to make a message durable before the session gives up (451).
    spool_timeout: float = 60.0
    # Per client address (Postfix's anvil): open connections and new ones per minute; over
    # either, 421 4.7.0. Addresses in client_limit_exceptions are not counted.
    # AUTH on the smtp listener (port 25): off unless configured; always on submission.
    auth: bool = False
    # A client is disconnected after this many failed AUTH attempts in one session.
    max_auth_failures: int = 3
    # An authenticated client's envelope sender must be one of its addresses (553 5.7.1),
    # as Postfix's reject_sender_login_mismatch.
    reject_sender_login_mismatch: bool = True
    max_connections_per_client: int = 10
    max_connection_rate: int = 60
    client_limit_exceptions: list[str] = msgspec.field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"])


class AdminConfig(Base):
    # Bearer token the console's changing endpoints require ("" = changes only through the
    # control socket). A console bound beyond loopback needs one.
    token: str = ""


class RestrictionsConfig(Base):
    """The source's connection restrictions: addresses refused outright, and DNS blocklists."""

    deny: list[str] = msgspec.field(default_factory=list)       # CIDR networks
    dnsbl: list[str] = msgspec.field(default_factory=list)      # blocklist zones
    dnsbl_timeout: float = 2.0   # a list that does not answer in time lists nobody


class FilterRule(Base):
    """One of the source's virus filters: every criterion given must match; `*` is a wildcard."""

    action: str = "keep"         # keep (to the quarantine queue) or discard
    originator: str = ""
    subject: str = ""
    attachment: str = ""          # an attachment's file name
    mime_type: str = ""           # a part's type/subtype


class StorageConfig(Base):
    """The source's storage threshold: below min_free_mb free on the data directory, RCPT
    and DATA get 452 4.3.1 and the framework parks mail on the busy queue."""

    min_free_mb: int = 100
    check_interval: float = 5.0


class Pop3Config(Base):
    # The source raises this for slow dial-up clients (RFC 1939 asks for >= 10 minutes).
    inactivity_timeout: float = 600.0
    # USER/PASS and AUTH without TLS; unset: allowed only while no [tls] is configured.
    allow_cleartext_login: bool | None = None
    # The source's "message split size": 0 means no maximum, the only value offered.
    message_split_size: int = 0
    # Growing delay after failed logins from one address (seconds: base, cap).
    auth_fail_delay: float = 1.0
    auth_fail_delay_max: float = 30.0
    # Seconds a verified login is remembered (keyed digest only), as Dovecot's auth_cache;
    # 0 turns it off and every login pays the memory-hard hash.
    auth_cache_ttl: float = 300.0


class RelayConfig(Base):
    """The source's relay restrictions: who may send mail out through this host."""

    # all | none | near (recipients in near_domains) | list (clients in networks) | both
    mode: str = "list"
    networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    near_domains: list[str] = msgspec.field(default_factory=list)
    # The source's "interpret percent sign as routing character": user%host@local -> user@host.
    percent_hack: bool = False


class DnsConfig(Base):
    # Empty: the nameservers of /etc/resolv.conf. Tests point this at their own server.
    nameservers: list[str] = msgspec.field(default_factory=list)
    port: int = 53
    timeout: float = 5.0    # per query to one server
    lifetime: float = 10.0  # per lookup, all servers and retries together
    # Answers are kept for their TTL in each client job (as a local caching resolver would).
    cache: bool = True


TLS_POLICIES = ("none", "may", "encrypt", "verify")


class OutboundTlsConfig(Base):
    """STARTTLS towards next hops: none, may (opportunistic, the default), encrypt (TLS or
    no delivery), verify (TLS with a certificate valid for the MX name)."""

    policy: str = "may"
    destinations: dict[str, str] = msgspec.field(default_factory=dict)  # domain -> policy
    ca_file: str = ""   # CAs for verify ("" = the system's)


class OutboundConfig(Base):
    """The SMTP client (QTMSCLCP): where non-local mail goes and how long each step may take."""

    # The source's mail router: all non-local mail goes to "host[:port]". Its MX records are
    # used like Postfix's relayhost; with firewall = true only its own addresses (never MX).
    router: str = ""
    firewall: bool = False
    bind_address: str = ""   # source address of outgoing connections ("" = any)
    port: int = 25           # the port of every MX host (tests use another)
    deliveries_per_job: int = 50
    # Per-stage timeouts, RFC 5321 4.5.3.2 defaults (connect as Postfix's smtp_connect_timeout).
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    helo_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0        # DATA initiation (354)
    data_block_timeout: float = 180.0  # each block of content sent
    data_done_timeout: float = 600.0   # the reply after the final dot
    quit_timeout: float = 300.0
    # Per destination (Postfix's initial_destination_concurrency / ..._concurrency_limit).
    initial_destination_concurrency: int = 5
    destination_concurrency_limit: int = 20
    dead_destination_pause: float = 60.0
    # An idle connection is kept this long for the next message to the same destination.
    connection_cache_time: float = 2.0
    connection_reuse_limit: int = 100
    tls: OutboundTlsConfig = msgspec.field(default_factory=OutboundTlsConfig)


class RetryConfig(Base):
    """The source's first and second level retry queues."""

    first_interval: float = 1800.0
    first_count: int = 3
    second_interval: float = 7200.0
    max_lifetime: float = 5 * 86400.0   # RFC 5321 4.5.4.1: give up after 4-5 days


class NoticesConfig(Base):
    # The source's DSN "responsible person": the From of notices ("" = MAILER-DAEMON@host).
    from_: str = msgspec.field(default="", name="from")
    # The source's NONDELIVERY tracking user: gets a copy of every non-delivery notice.
    nondelivery_user: str = ""
    # Notices carry the original message up to this size, else only its headers.
    max_original_size: int = 64 * 1024
    # A "delayed" notice when a message enters the 2nd level retry queue (unless NOTIFY says no).
    delay_notice: bool = True


class EtrnConfig(Base):
    # Domains whose queued mail a client may release with ETRN (RFC 1985).
    domains: list[str] = msgspec.field(default_factory=list)
    # The source's scheduler: every `interval` seconds (0 = off) flush the queue to the router
    # and send it ETRN for `request_domains` (default: host.local_domains).
    interval: float = 0.0
    request_domains: list[str] = msgspec.field(default_factory=list)


class JournalConfig(Base):
    enabled: bool = True
    receiver_max_bytes: int = 64 * 1024 * 1024
    sync_interval: float = 1.0


LOG_LEVELS = ("debug", "info", "warning", "error")
SYSLOG_FACILITIES = ("mail", "daemon", "user", *(f"local{i}" for i in range(8)))


class LogConfig(Base):
    # info: one line per connection, rejection, accepted message, delivery, deferral and
    # bounce (what an administrator greps for); warning: problems only.
    level: str = "info"
    # The same lines also to syslog (a Unix socket path, or "host:port" for UDP).
    syslog: bool = False
    syslog_address: str = "/dev/log"
    syslog_facility: str = "mail"


class CheckConfig(Base):
    """A content-check plug-in: an asyncio coroutine function run at the end of DATA."""

    function: str                 # "package.module:function"
    timeout: float = 10.0         # seconds; past it, on_error decides
    on_error: str = "accept"      # accept | tempfail (451 4.3.0) on a timeout or a failure
    # Keyword arguments for every call (checked against the function's signature).
    options: dict[str, str | int | float | bool | list[str]] = msgspec.field(
        default_factory=dict)


class PoolParams(Base):
    """One prestart job entry (the source's CHGPJE parameters plus what users need)."""

    start_jobs: bool = True
    initial_jobs: int = 4
    threshold: int = 2
    additional_jobs: int = 2
    maximum_jobs: int = 20
    # Sessions before a job is replaced. The source's jobs are cheap to start; a Python
    # job costs ~0.3 s of CPU to start, so the default recycles rarely (Postfix: 100).
    max_use: int = 10000
    wait: bool = True
    wait_timeout: float = 30.0
    sessions_per_job: int = 1
    # Surplus idle jobs above initial_jobs end after this long, one at a time.
    idle_timeout: float = 60.0
    # A job silent for this long is killed and replaced.
    heartbeat_timeout: float = 30.0
    # Bounded time for open sessions to finish on drain (SIGTERM, reload, max_use).
    drain_timeout: float = 30.0
    # Connections held waiting for a job, at most (each holds a socket): beyond, refused.
    max_waiting: int = 1000

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, why) for every inconsistent value; empty when valid."""
        out: list[tuple[str, Any, str]] = []
        if self.maximum_jobs < 1:
            out.append(("maximum_jobs", self.maximum_jobs, "must be at least 1"))
        if self.initial_jobs < 0:
            out.append(("initial_jobs", self.initial_jobs, "must not be negative"))
        elif self.initial_jobs > self.maximum_jobs:
            out.append(("initial_jobs", self.initial_jobs,
                        f"must not exceed maximum_jobs ({self.maximum_jobs})"))
        if self.threshold < 0:
            out.append(("threshold", self.threshold, "must not be negative"))
        elif self.threshold > self.maximum_jobs:
            out.append(("threshold", self.threshold,
                        f"must not exceed maximum_jobs ({self.maximum_jobs})"))
        if self.additional_jobs < 0:
            out.append(("additional_jobs", self.additional_jobs, "must not be negative"))
        elif self.threshold > 0 and self.additional_jobs == 0:
            out.append(("additional_jobs", self.additional_jobs,
                        "must be at least 1 when threshold is above 0"))
        if self.max_use < 1:
            out.append(("max_use", self.max_use, "must be at least 1"))
        if self.sessions_per_job < 1:
            out.append(("sessions_per_job", self.sessions_per_job, "must be at least 1"))
        if self.max_waiting < 0:
            out.append(("max_waiting", self.max_waiting, "must not be negative"))
        for key in ("wait_timeout", "idle_timeout", "heartbeat_timeout", "drain_timeout"):
            value = getattr(self, key)
            if value <= 0:
                out.append((key, value, "must be above 0"))
        return out


def _default_pools() -> dict[str, PoolParams]:
    # smtp-server keeps the source's CHGPJE values for QTMSSRCP: 4 / 2 / 2 / 20.
    return {role.name: PoolParams(**role.pool_defaults) for role in ROLES}


class Config(Base):
    host: HostConfig
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)
    pop3: Pop3Config = msgspec.field(default_factory=Pop3Config)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    notices: NoticesConfig = msgspec.field(default_factory=NoticesConfig)
    etrn: EtrnConfig = msgspec.field(default_factory=EtrnConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    restrictions: RestrictionsConfig = msgspec.field(default_factory=RestrictionsConfig)
    filter: list[FilterRule] = msgspec.field(default_factory=list)
    check: list[CheckConfig] = msgspec.field(default_factory=list)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    directory: DirectoryConfig = msgspec.field(default_factory=DirectoryConfig)
    pool: dict[str, PoolParams] = msgspec.field(default_factory=_default_pools)


class LoadedConfig(msgspec.Struct, frozen=True):
    """The decoded config plus where it came from and the resolved data directory."""

    config: Config
    path: Path
    data_dir: Path
    # What `pool change` set, laid over the file's [pool.*] (entry -> key -> value).
    overlay: dict[str, dict[str, Any]] = {}

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mailbox_dir(self) -> Path:
        shared = self.config.paths.mailboxes
        if shared:
            return self.path.parent / shared  # an absolute path stays as it is
        return self.data_dir / "mailboxes"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def directory_file(self) -> Path:
        return self.data_dir / "directory.json"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"



def cleartext_login_allowed(cfg: Config) -> bool:
    """POP3 USER/PASS and AUTH without TLS: as configured, else only while TLS is not set up."""
    allowed = cfg.pop3.allow_cleartext_login
    return not cfg.tls.enabled if allowed is None else allowed


def pool_params(cfg: Config, name: str) -> PoolParams:
    """An entry's effective rules: a role whose capacity is configured elsewhere (smtp-client:
    outbound.deliveries_per_job) gets it as its per-job slot count."""
    params = cfg.pool[name]
    key = BY_NAME[name].capacity_key
    if key is not None:
        params = msgspec.structs.replace(params,
                                         sessions_per_job=getattr(getattr(cfg, key[0]), key[1]))
    return params


