"""The pool overlay: what `mailpool pool change` set, kept beside the configuration file.

The source's CHGPJE changes the prestart job entry's description itself, so a change
outlives the subsystem's restart. Here the configuration file stays the administrator's:
changes go to `<config stem>.pool-overlay.toml` next to it, laid over its [pool.*] tables
on every load (start, reload, `config check`, which shows them), and `pool reset` takes
them out again.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from mailpool.config.schema import ConfigError, PoolParams
from mailpool.roles import BY_NAME

# entry -> {key: value}; for an entry whose per-job capacity has its own name
# (smtp-client: deliveries_per_job) the key is that name, as the user wrote it.
Overlay = dict[str, dict[str, Any]]

_HEADER = """\
# Written by `mailpool pool change` (the source's CHGPJE): laid over the [pool.*] tables of
# {config} on every load. `mailpool pool reset ENTRY [KEY ...]` takes values out again.
"""


def overlay_path(config_path: Path) -> Path:
    return config_path.with_name(config_path.stem + ".pool-overlay.toml")


def _keys(entry: str) -> set[str]:
    keys = set(PoolParams.__struct_fields__)
    capacity = BY_NAME[entry].capacity_key
    if capacity is not None:
        keys = (keys - {"sessions_per_job"}) | {capacity[1]}
    return keys


def read_overlay(path: Path) -> Overlay:
    """The overlay file's changes ({} when there is none); ConfigError naming the file, key
    and value for anything that is not a known entry's known key."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    pools = raw.pop("pool", {})
    if raw or not isinstance(pools, dict):
        first = next(iter(raw), "pool")
        raise ConfigError(f"{path}: {first}: only [pool.ENTRY] tables belong here")
    for entry, table in pools.items():
        if entry not in BY_NAME or not isinstance(table, dict):
            raise ConfigError(f"{path}: pool.{entry}: {table!r}: not a pool entry "
                              f"(known: {', '.join(BY_NAME)})")
        for key, value in table.items():
            if key not in _keys(entry):
                raise ConfigError(f"{path}: pool.{entry}.{key}: {value!r}: unknown key")
    return pools


def apply_overlay(raw: dict[str, Any], overlay: Overlay) -> dict[str, Any]:
    """The raw (decoded TOML) configuration with the overlay's values laid over it."""
    raw = dict(raw)
    pools = dict(raw.get("pool") or {})
    for entry, table in overlay.items():
        merged = dict(pools.get(entry) or {})
        capacity = BY_NAME[entry].capacity_key
        for key, value in table.items():
            if capacity is not None and key == capacity[1]:
                section = dict(raw.get(capacity[0]) or {})
                section[key] = value
                raw[capacity[0]] = section
            else:
                merged[key] = value
        pools[entry] = merged
    raw["pool"] = pools
    return raw


def changed_params(entry: str, current: PoolParams, changes: dict[str, Any]) -> PoolParams:
    """An entry's rules after `changes` (keys as the user names them); ValueError naming the
    entry, key and value when one is unknown or the result is inconsistent."""
    if entry not in BY_NAME:
        raise ValueError(f"unknown pool entry {entry!r} (known: {', '.join(BY_NAME)})")
    capacity = BY_NAME[entry].capacity_key
    changes = dict(changes)
    if capacity is not None:
        # smtp-client jobs run deliveries: their slot count has its own name.
        if "sessions_per_job" in changes:
            raise ValueError(f"{entry}: sessions_per_job: {entry} jobs run deliveries, not "
                             f"sessions: change {capacity[1]}")
        if capacity[1] in changes:
            changes["sessions_per_job"] = changes.pop(capacity[1])
    now = msgspec.structs.asdict(current)
    unknown = set(changes) - set(now)
    if unknown:
        raise ValueError(f"{entry}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        params = msgspec.convert({**now, **changes}, PoolParams)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{entry}: {exc}") from None
    problems = params.problems()
    if problems:
        key, value, why = problems[0]
        if capacity is not None and key == "sessions_per_job":
            key = capacity[1]
        raise ValueError(f"{entry}: {key}: {value!r}: {why}")
    return params


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def format_overlay(overlay: Overlay, config_path: Path) -> str:
    lines = [_HEADER.format(config=config_path.name)]
    for entry in sorted(overlay):
        if overlay[entry]:
            lines.append(f"[pool.{entry}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(overlay[entry].items())]
            lines.append("")
    return "\n".join(lines)


def write_overlay(config_path: Path, overlay: Overlay) -> Path:
    """Replace the overlay file atomically and durably (removed when nothing is left)."""
    path = overlay_path(config_path)
    if not any(overlay.values()):
        path.unlink(missing_ok=True)
    else:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(format_overlay(overlay, config_path))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def update_overlay(config_path: Path, entry: str, changes: dict[str, Any] | None = None,
                   reset: list[str] | None = None) -> Overlay:
    """Add `changes` to an entry's overlay, or take `reset` keys out (all of the entry's when
    the list is empty); the new overlay, written. OSError when the file cannot be written."""
    path = overlay_path(config_path)
    overlay = read_overlay(path)
    table = dict(overlay.get(entry) or {})
    if changes:
        table.update(changes)
    if reset is not None:
        table = {k: v for k, v in table.items() if reset and k not in reset}
    overlay[entry] = table
    overlay = {e: t for e, t in overlay.items() if t}
    write_overlay(config_path, overlay)
    return overlay
