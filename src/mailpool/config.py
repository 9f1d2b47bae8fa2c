"""Configuration: TOML decoded by msgspec into frozen, typed Structs.

Every error names the file, the key path and the bad value, so `mailpool serve`
can print one line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from mailpool.roles import BY_NAME, ROLE_NAMES, ROLES

DEFAULT_CONFIG = Path("config/mailpool.toml")
SYSTEM_CONFIG = Path("/etc/mailpool/mailpool.toml")


def default_config_path() -> Path:
    """Where the configuration is when --config is not given: $MAILPOOL_CONFIG, else
    config/mailpool.toml in the current directory, else /etc/mailpool/mailpool.toml (the
    first that exists; the relative one when none does, so the error names it)."""
    env = os.environ.get("MAILPOOL_CONFIG")
    if env:
        return Path(env)
    for candidate in (DEFAULT_CONFIG, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return DEFAULT_CONFIG


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
    pool: dict[str, PoolParams] = msgspec.field(default_factory=_default_pools)


class LoadedConfig(msgspec.Struct, frozen=True):
    """The decoded config plus where it came from and the resolved data directory."""

    config: Config
    path: Path
    data_dir: Path

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mailbox_dir(self) -> Path:
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


RELAY_MODES = ("all", "none", "near", "list", "both")
_MAILBOX = re.compile(r"^[^@\s<>]+@[A-Za-z0-9.-]+$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' -> (host, port); ValueError on anything else."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535")
    return host, int(port)


def _check(cfg: Config) -> list[tuple[str, Any, str]]:
    problems: list[tuple[str, Any, str]] = []
    if not _DOMAIN.match(cfg.host.name):
        problems.append(("host.name", cfg.host.name, "is not a valid host name"))
    if not cfg.host.local_domains:
        problems.append(("host.local_domains", cfg.host.local_domains, "must name a domain"))
    for i, dom in enumerate(cfg.host.local_domains):
        if not _DOMAIN.match(dom):
            problems.append((f"host.local_domains[{i}]", dom, "is not a valid domain"))
    for key in ("smtp", "pop3", "admin", "submission", "smtps", "pop3s"):
        value = getattr(cfg.listen, key)
        if not value and key in ("submission", "smtps", "pop3s"):
            continue  # optional, off
        try:
            parse_hostport(value)
        except ValueError as exc:
            problems.append((f"listen.{key}", value, str(exc)))
            continue
        if key in ("submission", "smtps", "pop3s") and not cfg.tls.enabled:
            problems.append((f"listen.{key}", value, "needs [tls] certificate and key"))
    for key in ("max_message_size", "max_recipients", "max_command_line", "max_text_line",
                "hard_error_limit"):
        value = getattr(cfg.smtp, key)
        if value < 1:
            problems.append((f"smtp.{key}", value, "must be at least 1"))
    if cfg.smtp.max_command_line < 512:
        problems.append(("smtp.max_command_line", cfg.smtp.max_command_line,
                         "must be at least 512 (RFC 5321 4.5.3.1.4)"))
    if cfg.smtp.max_text_line < 1000:
        problems.append(("smtp.max_text_line", cfg.smtp.max_text_line,
                         "must be at least 1000 (RFC 5321 4.5.3.1.6)"))
    for key in ("command_timeout", "data_timeout", "spool_timeout"):
        value = getattr(cfg.smtp, key)
        if value <= 0:
            problems.append((f"smtp.{key}", value, "must be above 0"))
    if cfg.pop3.inactivity_timeout <= 0:
        problems.append(("pop3.inactivity_timeout", cfg.pop3.inactivity_timeout,
                         "must be above 0"))
    if cfg.pop3.auth_cache_ttl < 0:
        problems.append(("pop3.auth_cache_ttl", cfg.pop3.auth_cache_ttl,
                         "must be 0 (off) or above"))
    if cfg.pop3.message_split_size != 0:
        # The source itself recommends "no maximum": split messages confuse clients.
        problems.append(("pop3.message_split_size", cfg.pop3.message_split_size,
                         "message splitting is not supported; 0 (no maximum) is the only value"))
    if cfg.journal.receiver_max_bytes < 4096:
        problems.append(("journal.receiver_max_bytes", cfg.journal.receiver_max_bytes,
                         "must be at least 4096"))
    if cfg.log.level not in LOG_LEVELS:
        problems.append(("log.level", cfg.log.level, f"must be one of {', '.join(LOG_LEVELS)}"))
    if cfg.log.syslog_facility not in SYSLOG_FACILITIES:
        problems.append(("log.syslog_facility", cfg.log.syslog_facility,
                         f"must be one of {', '.join(SYSLOG_FACILITIES)}"))
    problems += _check_outbound(cfg)
    problems += _check_plugins(cfg)
    problems += _check_hardening(cfg)
    problems += _check_tls(cfg)
    for name, params in cfg.pool.items():
        if name not in ROLE_NAMES:
            problems.append((f"pool.{name}", name,
                             f"is not a pool entry (known: {', '.join(ROLE_NAMES)})"))
        for key, value, why in params.problems():
            problems.append((f"pool.{name}.{key}", value, why))
    return problems


def _check_plugins(cfg: Config) -> list[tuple[str, Any, str]]:
    """[[check]]: each plug-in is imported here, so a typo fails `serve` at start-up rather
    than every SMTP job as it starts."""
    from mailpool.plugins import ON_ERROR, load_check  # only when checks are configured

    problems: list[tuple[str, Any, str]] = []
    for i, chk in enumerate(cfg.check):
        if not chk.timeout > 0:
            problems.append((f"check[{i}].timeout", chk.timeout, "must be above 0"))
        if chk.on_error not in ON_ERROR:
            problems.append((f"check[{i}].on_error", chk.on_error,
                             f"must be one of {', '.join(ON_ERROR)}"))
        try:
            load_check(chk.function, chk.options)
        except ValueError as exc:
            problems.append((f"check[{i}].function", chk.function, str(exc)))
    if cfg.check and sum(c.timeout for c in cfg.check) + cfg.smtp.spool_timeout >= 600:
        problems.append(("check", [c.timeout for c in cfg.check],
                         "timeouts plus smtp.spool_timeout must stay under the client's "
                         "10-minute wait for the reply to the final dot (RFC 5321 4.5.3.2.6)"))
    return problems


def _check_outbound(cfg: Config) -> list[tuple[str, Any, str]]:
    """The relay, DNS, client, retry, notice and ETRN sections."""
    problems: list[tuple[str, Any, str]] = []
    relay = cfg.relay
    if relay.mode not in RELAY_MODES:
        problems.append(("relay.mode", relay.mode, f"must be one of {', '.join(RELAY_MODES)}"))
    for i, net in enumerate(relay.networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append((f"relay.networks[{i}]", net, "is not an IP network (CIDR)"))
    for key, domains in (("relay.near_domains", relay.near_domains),
                         ("etrn.domains", cfg.etrn.domains),
                         ("etrn.request_domains", cfg.etrn.request_domains)):
        for i, dom in enumerate(domains):
            if not _DOMAIN.match(dom.rstrip(".")):
                problems.append((f"{key}[{i}]", dom, "is not a valid domain"))
    for i, ns in enumerate(cfg.dns.nameservers):
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            problems.append((f"dns.nameservers[{i}]", ns, "is not an IP address"))
    out = cfg.outbound
    for key, value in (("dns.port", cfg.dns.port), ("outbound.port", out.port)):
        if not 1 <= value <= 65535:
            problems.append((key, value, "must be a port from 1 to 65535"))
    positive = [("dns.timeout", cfg.dns.timeout), ("dns.lifetime", cfg.dns.lifetime)]
    positive += [(f"outbound.{key}", getattr(out, key)) for key in OutboundConfig.__struct_fields__
                 if key.endswith("_timeout") or key in ("dead_destination_pause",)]
    for key, value in positive:
        if value <= 0:
            problems.append((key, value, "must be above 0"))
    for key in ("deliveries_per_job", "initial_destination_concurrency",
                "destination_concurrency_limit", "connection_reuse_limit"):
        if getattr(out, key) < 1:
            problems.append((f"outbound.{key}", getattr(out, key), "must be at least 1"))
    if out.destination_concurrency_limit < out.initial_destination_concurrency:
        problems.append(("outbound.destination_concurrency_limit",
                         out.destination_concurrency_limit,
                         "must not be below initial_destination_concurrency "
                         f"({out.initial_destination_concurrency})"))
    if out.connection_cache_time < 0:
        problems.append(("outbound.connection_cache_time", out.connection_cache_time,
                         "must be 0 (off) or above"))
    if out.router:
        try:
            parse_router(out.router)
        except ValueError as exc:
            problems.append(("outbound.router", out.router, str(exc)))
    elif out.firewall:
        problems.append(("outbound.firewall", True, "needs outbound.router (the firewall host)"))
    if out.bind_address:
        try:
            ipaddress.ip_address(out.bind_address)
        except ValueError:
            problems.append(("outbound.bind_address", out.bind_address, "is not an IP address"))
    for key, value in (("first_interval", cfg.retry.first_interval),
                       ("second_interval", cfg.retry.second_interval),
                       ("max_lifetime", cfg.retry.max_lifetime)):
        if value <= 0:
            problems.append((f"retry.{key}", value, "must be above 0"))
    if cfg.retry.first_count < 0:
        problems.append(("retry.first_count", cfg.retry.first_count, "must not be negative"))
    if cfg.notices.from_ and not _MAILBOX.match(cfg.notices.from_):
        problems.append(("notices.from", cfg.notices.from_, "is not a mail address (user@domain)"))
    if cfg.notices.max_original_size < 1024:
        problems.append(("notices.max_original_size", cfg.notices.max_original_size,
                         "must be at least 1024"))
    if cfg.etrn.interval < 0:
        problems.append(("etrn.interval", cfg.etrn.interval, "must be 0 (off) or above"))
    elif cfg.etrn.interval > 0 and not out.router:
        problems.append(("etrn.interval", cfg.etrn.interval,
                         "the scheduler connects to outbound.router: set it too"))
    return problems


def _check_hardening(cfg: Config) -> list[tuple[str, Any, str]]:
    """Access, per-client limits, connection restrictions, filters, storage."""
    problems: list[tuple[str, Any, str]] = []
    if not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", cfg.host.user):
        problems.append(("host.user", cfg.host.user, "is not a user name"))
    smtp = cfg.smtp
    for key in ("session_timeout",):
        if getattr(smtp, key) <= 0:
            problems.append((f"smtp.{key}", getattr(smtp, key), "must be above 0"))
    for key in ("min_data_rate", "max_connections_per_client", "max_connection_rate"):
        if getattr(smtp, key) < 1:
            problems.append((f"smtp.{key}", getattr(smtp, key), "must be at least 1"))
    if smtp.greet_pause < 0:
        problems.append(("smtp.greet_pause", smtp.greet_pause, "must be 0 (off) or above"))
    for key, nets in (("smtp.client_limit_exceptions", smtp.client_limit_exceptions),
                      ("restrictions.deny", cfg.restrictions.deny)):
        for i, net in enumerate(nets):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problems.append((f"{key}[{i}]", net, "is not an IP network (CIDR)"))
    for i, zone in enumerate(cfg.restrictions.dnsbl):
        if not _DOMAIN.match(zone.rstrip(".")):
            problems.append((f"restrictions.dnsbl[{i}]", zone, "is not a DNS zone name"))
    if cfg.restrictions.dnsbl_timeout <= 0:
        problems.append(("restrictions.dnsbl_timeout", cfg.restrictions.dnsbl_timeout,
                         "must be above 0"))
    for i, rule in enumerate(cfg.filter):
        if rule.action not in ("keep", "discard"):
            problems.append((f"filter[{i}].action", rule.action, "must be keep or discard"))
        if not (rule.originator or rule.subject or rule.attachment or rule.mime_type):
            problems.append((f"filter[{i}]", "", "names no criterion (originator, subject, "
                                                 "attachment or mime_type)"))
    if cfg.storage.min_free_mb < 0:
        problems.append(("storage.min_free_mb", cfg.storage.min_free_mb,
                         "must be 0 (off) or above"))
    if cfg.storage.check_interval <= 0:
        problems.append(("storage.check_interval", cfg.storage.check_interval,
                         "must be above 0"))
    try:
        host, _ = parse_hostport(cfg.listen.admin)
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = True  # the listen check above names the bad value
    if not loopback and not cfg.admin.token:
        problems.append(("listen.admin", cfg.listen.admin,
                         "the console beyond loopback needs admin.token (changes need it)"))
    elif cfg.admin.token and len(cfg.admin.token) < 16:
        problems.append(("admin.token", "(hidden)", "must be at least 16 characters"))
    return problems


def _check_tls(cfg: Config) -> list[tuple[str, Any, str]]:
    """[tls] files must be readable PEM at start (one clear error naming key and path)."""
    import ssl

    problems: list[tuple[str, Any, str]] = []
    tls = cfg.tls
    if bool(tls.certificate) != bool(tls.key):
        key = "tls.key" if tls.certificate else "tls.certificate"
        problems.append((key, "", "tls.certificate and tls.key go together"))
    elif tls.enabled:
        for key, path in (("tls.certificate", tls.certificate), ("tls.key", tls.key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append((key, path, f"cannot read: {exc.strerror}"))
        if not problems:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    tls.certificate, tls.key)
            except (ssl.SSLError, ValueError) as exc:
                problems.append(("tls.certificate", tls.certificate,
                                 f"not a usable certificate and key: {exc}"))
    if tls.handshake_timeout <= 0:
        problems.append(("tls.handshake_timeout", tls.handshake_timeout, "must be above 0"))
    out = cfg.outbound.tls
    if out.policy not in TLS_POLICIES:
        problems.append(("outbound.tls.policy", out.policy,
                         f"must be one of {', '.join(TLS_POLICIES)}"))
    for domain, policy in out.destinations.items():
        if policy not in TLS_POLICIES:
            problems.append((f"outbound.tls.destinations.{domain}", policy,
                             f"must be one of {', '.join(TLS_POLICIES)}"))
    if out.ca_file:
        try:
            with open(out.ca_file, "rb"):
                pass
        except OSError as exc:
            problems.append(("outbound.tls.ca_file", out.ca_file, f"cannot read: {exc.strerror}"))
    if cfg.smtp.max_auth_failures < 1:
        problems.append(("smtp.max_auth_failures", cfg.smtp.max_auth_failures,
                         "must be at least 1"))
    return problems


def cleartext_login_allowed(cfg: Config) -> bool:
    """POP3 USER/PASS and AUTH without TLS: as configured, else only while TLS is not set up."""
    allowed = cfg.pop3.allow_cleartext_login
    return not cfg.tls.enabled if allowed is None else allowed


def parse_router(value: str) -> tuple[str, int | None]:
    """'mail.isp.test', 'mail.isp.test:2525', '[192.0.2.1]:25' -> (host, port or None)."""
    host, port = value, None
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError("expected HOST[:PORT]")
        host = inner
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError("expected [ADDRESS]:PORT")
            port = int(rest[1:])
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("a bracketed router must be an IP address") from None
    else:
        if value.count(":") == 1:
            host, _, tail = value.partition(":")
            if not tail.isdigit():
                raise ValueError("expected HOST[:PORT]")
            port = int(tail)
        if not _DOMAIN.match(host.rstrip(".")):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError("expected HOST[:PORT] with a valid host name") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("the port must be from 1 to 65535")
    return host, port


def pool_params(cfg: Config, name: str) -> PoolParams:
    """An entry's effective rules: a role whose capacity is configured elsewhere (smtp-client:
    outbound.deliveries_per_job) gets it as its per-job slot count."""
    params = cfg.pool[name]
    key = BY_NAME[name].capacity_key
    if key is not None:
        params = msgspec.structs.replace(params,
                                         sessions_per_job=getattr(getattr(cfg, key[0]), key[1]))
    return params


def _msgspec_path(message: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.pool[...].x`" into (key, why)."""
    why, _, where = message.partition(" - at `")
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    key = re.sub(r"\[\"?([^\]\"]+)\"?\]", r".\1", key).lstrip(".")
    return key, why


def _lookup(raw: Any, key: str) -> Any:
    node = raw
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def merge_pool_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A [pool.NAME] table changes only the keys it names; the rest keep that entry's defaults."""
    pools = raw.get("pool")
    if not isinstance(pools, dict):
        return raw
    defaults = _default_pools()
    merged: dict[str, Any] = {}
    for name, table in pools.items():
        if name in defaults and isinstance(table, dict):
            base = msgspec.structs.asdict(defaults[name])
            base.update(table)
            merged[name] = base
        else:
            merged[name] = table
    for name, params in defaults.items():
        merged.setdefault(name, msgspec.structs.asdict(params))
    return {**raw, "pool": merged}


def load_config(path: Path | str) -> LoadedConfig:
    """Read, decode and check one config file; raise ConfigError with one clear line."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, table in (raw.get("pool") or {}).items():
        role = BY_NAME.get(name)
        if role and role.capacity_key and isinstance(table, dict) and "sessions_per_job" in table:
            section, key = role.capacity_key
            raise ConfigError(f"{path}: pool.{name}.sessions_per_job: "
                              f"{table['sessions_per_job']!r}: {name} jobs run deliveries, "
                              f"not sessions: set {section}.{key}")
    raw = merge_pool_defaults(raw)
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key, why = _msgspec_path(str(exc))
        if why.startswith("Object contains unknown field"):
            field = why.split("`")[1]
            full = f"{key}.{field}" if key else field
            raise ConfigError(f"{path}: {full}: {_lookup(raw, full)!r}: unknown key") from None
        if why.startswith("Object missing required field"):
            field = why.split("`")[1]
            full = f"{key}.{field}" if key else field
            raise ConfigError(f"{path}: {full}: missing required key") from None
        value = _lookup(raw, key)
        raise ConfigError(f"{path}: {key}: {value!r}: {why}") from None
    problems = _check(cfg)
    if problems:
        key, value, why = problems[0]
        raise ConfigError(f"{path}: {key}: {value!r}: {why}")
    data = Path(cfg.paths.data)
    if not data.is_absolute():
        data = (path.resolve().parent / data).resolve()
    return LoadedConfig(config=cfg, path=path.resolve(), data_dir=data)


def effective_toml(cfg: Config) -> str:
    """The effective configuration (defaults filled in) as TOML text, for `config check`."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(name: str, obj: msgspec.Struct, skip: tuple[str, ...] = ()) -> None:
        lines.append(f"[{name}]")
        nested = []
        for field, key in zip(obj.__struct_fields__, obj.__struct_encode_fields__, strict=True):
            v = getattr(obj, field)
            if field in skip or v is None:  # None: unset (TOML has no null)
                continue
            if isinstance(v, msgspec.Struct):
                nested.append((f"{name}.{key}", v))
            elif isinstance(v, dict):
                inline = ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items())
                lines.append(f"{key} = {{{inline}}}")
            else:
                lines.append(f"{key} = {value(v)}")
        lines.append("")
        for sub, struct in nested:
            table(sub, struct)

    for section in Config.__struct_fields__:
        current = getattr(cfg, section)
        if isinstance(current, list):  # an array of tables: [[filter]], [[check]]
            for item in current:
                table(f"[{section}]", item)
        elif section != "pool":
            table(section, current)
    for name, params in cfg.pool.items():
        # A role whose capacity is set elsewhere (smtp-client) has no sessions_per_job.
        skip = ("sessions_per_job",) if BY_NAME[name].capacity_key else ()
        table(f"pool.{name}", params, skip)
    return "\n".join(lines)


class _Snapshot(msgspec.Struct, frozen=True):
    config: Config
    path: str
    data_dir: str


def dump_snapshot(loaded: LoadedConfig) -> bytes:
    """The effective config as JSON: jobs start from exactly what the supervisor validated."""
    return msgspec.json.encode(_Snapshot(loaded.config, str(loaded.path), str(loaded.data_dir)))


def load_snapshot(data: bytes) -> LoadedConfig:
    snap = msgspec.json.decode(data, type=_Snapshot)
    return LoadedConfig(config=snap.config, path=Path(snap.path), data_dir=Path(snap.data_dir))
