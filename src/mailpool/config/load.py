"""Loading: where the file is, TOML decoded by msgspec into the schema, the checks, the pool
overlay `pool change` keeps, the effective configuration as TOML (`config check`) and the
snapshot jobs start from.

Every error names the file, the key path and the bad value, so `mailpool serve` can print
one line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from mailpool.config.checks import problems_of
from mailpool.config.overlay import apply_overlay, overlay_path, read_overlay
from mailpool.config.schema import (
    Config,
    ConfigError,
    LoadedConfig,
    _default_pools,
    redact_dsn,
)
from mailpool.roles import BY_NAME

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


def _msgspec_path(message: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.pool[...].x`" into (key, why)."""
    why, _, where = message.partition(" - at `")
    key = where.rstrip("`").removeprefix("$").lstrip(".").replace("[...]", ".\0")
    key = re.sub(r"\[\"?([^\]\"]+)\"?\]", r".\1", key).lstrip(".")
    return key, why


def _name_dict_keys(raw: Any, key: str) -> str:
    """msgspec writes a dict key as `[...]` (pool.....initial): name the key whose value
    holds the rest of the path (pool.smtp-server.initial)."""
    parts = [p for p in key.split(".") if p]
    node, out = raw, []
    for i, part in enumerate(parts):
        if part == "\0" and isinstance(node, dict):
            rest = parts[i + 1] if i + 1 < len(parts) else None
            part = next((k for k, v in node.items()
                         if rest is None or (isinstance(v, dict) and rest in v)), "...")
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(out)


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
    overlay_file = overlay_path(path)
    overlay = read_overlay(overlay_file)

    def origin(key: str) -> Path:
        """The file a bad key came from: the overlay for a value it set."""
        for entry, table in overlay.items():
            capacity = BY_NAME[entry].capacity_key
            for k in table:
                spelled = ".".join(capacity) if capacity and k == capacity[1] else \
                    f"pool.{entry}.{k}"
                if key == spelled:
                    return overlay_file
        return path

    raw = merge_pool_defaults(apply_overlay(raw, overlay))
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key, why = _msgspec_path(str(exc))
        if why.startswith("Object contains unknown field"):
            field = why.split("`")[1]
            full = _name_dict_keys(raw, f"{key}.{field}" if key else field)
            raise ConfigError(f"{path}: {full}: {_lookup(raw, full)!r}: unknown key") from None
        if why.startswith("Object missing required field"):
            field = why.split("`")[1]
            full = _name_dict_keys(raw, f"{key}.{field}" if key else field)
            raise ConfigError(f"{path}: {full}: missing required key") from None
        key = _name_dict_keys(raw, key)
        value = _lookup(raw, key)
        raise ConfigError(f"{origin(key)}: {key}: {value!r}: {why}") from None
    problems = problems_of(cfg)
    if problems:
        key, value, why = problems[0]
        raise ConfigError(f"{origin(key)}: {key}: {value!r}: {why}")
    data = Path(cfg.paths.data)
    if not data.is_absolute():
        data = (path.resolve().parent / data).resolve()
    return LoadedConfig(config=cfg, path=path.resolve(), data_dir=data, overlay=overlay)


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
            if name == "directory" and field == "dsn":
                v = redact_dsn(v)  # a password is never printed
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
    overlay: dict[str, dict[str, Any]] = {}


def dump_snapshot(loaded: LoadedConfig) -> bytes:
    """The effective config as JSON: jobs start from exactly what the supervisor validated."""
    return msgspec.json.encode(_Snapshot(loaded.config, str(loaded.path), str(loaded.data_dir),
                                         loaded.overlay))


def load_snapshot(data: bytes) -> LoadedConfig:
    snap = msgspec.json.decode(data, type=_Snapshot)
    return LoadedConfig(config=snap.config, path=Path(snap.path), data_dir=Path(snap.data_dir),
                        overlay=snap.overlay)
