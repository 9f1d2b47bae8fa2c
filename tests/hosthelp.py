"""A real mailpool host for end-to-end tests: a `mailpool serve` process on free ports.

Listeners are configured on port 0; the supervisor writes the bound addresses to
<data>/run/listen.json, so no port is guessed. Each host runs in its own session so the
whole process group (supervisor and jobs) is killed at cleanup.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailpool.journal.reader import iter_records
from mailpool.supervisor.control import ControlError, ControlUnavailable, request

MAILPOOL = [sys.executable, "-m", "mailpool.cli"]

BASE_CONFIG = f"""\
[host]
name = "mail.example.test"
local_domains = ["example.test", "other.test"]
# Whoever runs the suite (root included) stays who they are: the privilege tests set it.
user = "{getpass.getuser()}"

[listen]
smtp = "127.0.0.1:0"
pop3 = "127.0.0.1:0"
admin = "127.0.0.1:0"

[paths]
data = "var"

[smtp]
command_timeout = 20.0
data_timeout = 20.0

[relay]
# No client may relay unless a test says so (the default lets loopback clients relay).
networks = []
"""


# The smallest configuration for CLI tests that start no host: `.format(data=DIR)`.
CLI_CONFIG = """\
[host]
name = "mail.example.test"
local_domains = ["example.test"]

[listen]
smtp = "127.0.0.1:0"
pop3 = "127.0.0.1:0"
admin = "127.0.0.1:0"

[paths]
data = "{data}"
"""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _key(key: str) -> str:
    """A TOML key: bare when it can be, else quoted ("tls.example" is one key, not two)."""
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml(table: dict[str, Any], name: str = "") -> list[str]:
    lines = [f"{_key(k)} = {_toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_tables(v)]
    if name and lines:
        lines = ["", f"[{name}]", *lines]
    for key, value in table.items():
        full = f"{name}.{_key(key)}" if name else _key(key)
        if isinstance(value, dict):
            lines += _toml(value, full)
        elif _is_tables(value):  # an array of tables: [[full]] each
            for item in value:
                lines += ["", f"[[{full}]]", *(f"{_key(k)} = {_toml_value(v)}"
                                               for k, v in item.items())]
    return lines


def config_text(extra_config: str = "") -> str:
    """BASE_CONFIG with `extra_config` laid over it: a table the base has too (e.g. [smtp])
    changes only the keys it names, so tests can set `[smtp] max_recipients = 3` freely."""
    lines = _toml(_merge(tomllib.loads(BASE_CONFIG), tomllib.loads(extra_config)))
    return "\n".join(lines).lstrip("\n") + "\n"


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Host:
    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "mailpool.toml"
        self.config_path.write_text(config_text(extra_config))
        self.data = root / "var"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listen: dict[str, Any] = {}
        self.log_path = root / "serve.log"

    # --- process --------------------------------------------------------------------

    def start(self, wait_jobs: dict[str, int] | None = None) -> Host:
        listen_file = self.data / "run" / "listen.json"
        listen_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*MAILPOOL, "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"mailpool serve exited {self.proc.returncode}: "
                                     + self.log_path.read_text()[-2000:])
            try:
                info = json.loads(listen_file.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == self.proc.pid else None

        self.listen = wait_for(ready, what="listen.json")
        self.wait_jobs(wait_jobs or {"smtp-server": 1, "framework": 1})
        return self

    def wait_jobs(self, counts: dict[str, int], timeout: float = 30.0) -> None:
        """Until each entry has at least N jobs ready to take work, and every job of the
        host has been started (its JS record is written).

        `pool show` has no count of jobs that said Ready, so "started" is the best outside
        view. It matters for a stop() right after start(): a job still being spawned when
        SIGTERM arrives misses its Drain and holds the shutdown for drain_timeout + 5 s.
        """
        journal_on = tomllib.loads(self.config_path.read_text()).get(
            "journal", {}).get("enabled", True)

        def ok() -> bool:
            try:
                entries = self.pool_stats()
            except (ControlUnavailable, ControlError, OSError, ValueError):
                return False
            if journal_on:
                started = self.started_jobs()
                if any(started.get(name, 0) < e["jobs"]["current"]
                       for name, e in entries.items()):
                    return False
            return all(entries[name]["jobs"]["current"] - entries[name]["in_use"]["current"]
                       >= n and entries[name]["ready"] >= n
                       for name, n in counts.items())

        wait_for(ok, timeout, what=f"jobs {counts}")

    def started_jobs(self) -> dict[str, int]:
        """Per pool entry, the running supervisor's live jobs that have a JS record."""
        live: dict[Any, str] = {}
        for rec in iter_records(self.data / "journal"):
            if rec.code == "JS":
                live[rec.fields.get("pid")] = str(rec.fields.get("entry"))
            elif rec.code == "JE":
                live.pop(rec.fields.get("pid"), None)
        counts: dict[str, int] = {}
        for pid, entry in live.items():
            if self.proc is not None and isinstance(pid, int) and _ppid(pid) == self.proc.pid:
                counts[entry] = counts.get(entry, 0) + 1
        return counts

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.kill_group()
        return code

    def kill(self) -> None:
        """kill -9 of everything: the supervisor and every job (a host crash)."""
        self.kill_group()
        if self.proc is not None:
            self.proc.wait(10)

    def kill_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- addresses ------------------------------------------------------------------

    def addr(self, name: str) -> tuple[str, int]:
        host, _, port = self.listen[name].rpartition(":")
        return host, int(port)

    @property
    def smtp(self) -> tuple[str, int]:
        return self.addr("smtp")

    @property
    def pop3(self) -> tuple[str, int]:
        return self.addr("pop3")

    # --- CLI ------------------------------------------------------------------------

    def cli(self, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*MAILPOOL, *args, "--config", str(self.config_path)],
                             input=input, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"mailpool {' '.join(args)} failed: {res.stderr}{res.stdout}")
        return res

    def add_user(self, name: str, *addresses: str, password: str | None = None) -> None:
        args = ["user", "add", name]
        for a in addresses:
            args += ["--address", a]
        if password is not None:
            args.append("--password-stdin")
        self.cli(*args, input=(password + "\n") if password is not None else None)

    def pool_stats(self) -> dict[str, Any]:
        """`pool show --json` without the CLI's ~0.5 s start-up: straight to the control
        socket (polling loops call this many times)."""
        return request(self.data / "run" / "control.sock", {"op": "pool-show"},
                       timeout=5.0)["entries"]

    def pool_show(self) -> dict[str, Any]:
        res = self.cli("pool", "show", "--json", check=False)
        if res.returncode != 0:
            raise AssertionError(res.stderr)
        return json.loads(res.stdout)["entries"]

    def journal(self, *args: str) -> list[dict[str, Any]]:
        res = self.cli("journal", "dump", "--format", "json", *args)
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    # --- mailboxes ------------------------------------------------------------------

    def maildir_files(self, user: str) -> list[Path]:
        box = self.data / "mailboxes" / user
        return sorted([*(box / "new").glob("*"), *(box / "cur").glob("*")])

    def wait_delivered(self, user: str, count: int, timeout: float = 20.0) -> list[Path]:
        return wait_for(lambda: len(self.maildir_files(user)) >= count
                        and self.maildir_files(user), timeout,
                        what=f"{count} message(s) in {user}'s Maildir")

    def queue_files(self, queue: str = "incoming") -> list[Path]:
        return sorted((self.data / "spool" / queue).glob("*"))
