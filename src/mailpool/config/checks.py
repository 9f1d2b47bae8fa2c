"""Consistency checks of a decoded configuration: every problem as (key path, value, why),
so the loader can print one line that names them."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from mailpool.config.schema import (
    DIRECTORY_BACKENDS,
    LOG_LEVELS,
    SYSLOG_FACILITIES,
    TLS_POLICIES,
    Config,
    OutboundConfig,
    redact_dsn,
)
from mailpool.roles import ROLE_NAMES

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


def problems_of(cfg: Config) -> list[tuple[str, Any, str]]:
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
    problems += _check_directory(cfg)
    for name, params in cfg.pool.items():
        if name not in ROLE_NAMES:
            problems.append((f"pool.{name}", name,
                             f"is not a pool entry (known: {', '.join(ROLE_NAMES)})"))
        for key, value, why in params.problems():
            problems.append((f"pool.{name}.{key}", value, why))
    return problems


def _check_directory(cfg: Config) -> list[tuple[str, Any, str]]:
    d = cfg.directory
    problems: list[tuple[str, Any, str]] = []
    if d.backend not in DIRECTORY_BACKENDS:
        problems.append(("directory.backend", d.backend,
                         f"must be one of {', '.join(DIRECTORY_BACKENDS)}"))
    if d.backend == "postgresql" and not d.dsn.strip():
        problems.append(("directory.dsn", d.dsn, "backend postgresql needs a connection "
                         "string (e.g. \"host=db.example.test dbname=mailpool user=mailpool\")"))
    elif d.backend == "postgresql" and (dsn_problem := _dsn_problem(d.dsn)):
        problems.append(("directory.dsn", d.redacted_dsn, dsn_problem))
    for key in ("cache_ttl", "connect_timeout", "query_timeout"):
        value = getattr(d, key)
        if not value > 0:
            problems.append((f"directory.{key}", value, "must be above 0"))
    if d.pool_size < 1:
        problems.append(("directory.pool_size", d.pool_size, "must be at least 1"))
    return problems


def _dsn_problem(dsn: str) -> str | None:
    """libpq's own parse of the connection string (psycopg is imported only for this)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        return f"not a valid connection string: {redact_dsn(str(exc))}"
    return None


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


