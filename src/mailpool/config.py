"""Configuration: TOML decoded by msgspec into frozen, typed Structs.

Every error names the file, the key path and the bad value, so `mailpool serve`
can print one line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

DEFAULT_CONFIG = Path("config/mailpool.toml")


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file: key: value: why)."""


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class HostConfig(Base):
    name: str
    local_domains: list[str]
    # Mail to "Postmaster" (RFC 5321 4.5.1) always goes to this user's mailbox.
    postmaster: str = "postmaster"


class ListenConfig(Base):
    smtp: str = "127.0.0.1:2525"
    pop3: str = "127.0.0.1:1110"
    admin: str = "127.0.0.1:8025"


class PathsConfig(Base):
    # Spool, mailboxes, journal and directory live under here; relative to the config file.
    data: str = "var"


class SmtpConfig(Base):
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    hard_error_limit: int = 20
    # RFC 5321 4.5.3.2 suggests minutes; a silent client is dropped with 421 4.4.2.
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # Time allowed to make a message durable before the session gives up (451).
    spool_timeout: float = 60.0


class Pop3Config(Base):
    # The source raises this for slow dial-up clients (RFC 1939 asks for >= 10 minutes).
    inactivity_timeout: float = 600.0
    allow_cleartext_login: bool = True
    # The source's "message split size": 0 means no maximum, the only value offered.
    message_split_size: int = 0
    # Growing delay after failed logins from one address (seconds: base, cap).
    auth_fail_delay: float = 1.0
    auth_fail_delay_max: float = 30.0
    # Seconds a verified login is remembered (keyed digest only), as Dovecot's auth_cache;
    # 0 turns it off and every login pays the memory-hard hash.
    auth_cache_ttl: float = 300.0


class JournalConfig(Base):
    enabled: bool = True
    receiver_max_bytes: int = 64 * 1024 * 1024
    sync_interval: float = 1.0


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
        for key in ("wait_timeout", "idle_timeout", "heartbeat_timeout", "drain_timeout"):
            value = getattr(self, key)
            if value <= 0:
                out.append((key, value, "must be above 0"))
        return out


POOL_NAMES = ("smtp-server", "pop-server", "framework")


def _default_pools() -> dict[str, PoolParams]:
    return {
        # The source's CHGPJE values for QTMSSRCP: 4 / 2 / 2 / 20.
        "smtp-server": PoolParams(),
        "pop-server": PoolParams(initial_jobs=2, threshold=1, additional_jobs=1, maximum_jobs=10),
        "framework": PoolParams(initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=4,
                                sessions_per_job=8, max_use=100000),
    }


class Config(Base):
    host: HostConfig
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)
    pop3: Pop3Config = msgspec.field(default_factory=Pop3Config)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
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
    for key in ("smtp", "pop3", "admin"):
        value = getattr(cfg.listen, key)
        try:
            parse_hostport(value)
        except ValueError as exc:
            problems.append((f"listen.{key}", value, str(exc)))
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
    for name, params in cfg.pool.items():
        if name not in POOL_NAMES:
            problems.append((f"pool.{name}", name,
                             f"is not a pool entry (known: {', '.join(POOL_NAMES)})"))
        for key, value, why in params.problems():
            problems.append((f"pool.{name}.{key}", value, why))
    return problems


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

    def table(name: str, obj: msgspec.Struct) -> None:
        lines.append(f"[{name}]")
        for field in obj.__struct_fields__:
            lines.append(f"{field} = {value(getattr(obj, field))}")
        lines.append("")

    for section in ("host", "listen", "paths", "smtp", "pop3", "journal"):
        table(section, getattr(cfg, section))
    for name, params in cfg.pool.items():
        table(f"pool.{name}", params)
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
