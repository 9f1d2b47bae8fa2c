"""CLI errors a user can cause: one line naming what is wrong, exit 1, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hosthelp import MAILPOOL

CONFIG = """\
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


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILPOOL, *args], capture_output=True, text=True, timeout=60)


def test_unusable_data_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "mailpool.toml"
    config.write_text(CONFIG.format(data=blocker / "var"))
    for args in (["serve"], ["user", "add", "bob", "--address", "bob@example.test"]):
        res = run(*args, "--config", str(config))
        assert res.returncode == 1, res
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert str(blocker) in res.stderr


def test_bad_user_name_and_foreign_address_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "mailpool.toml"
    config.write_text(CONFIG.format(data=tmp_path / "var"))
    res = run("user", "add", "../evil", "--address", "x@example.test", "--config", str(config))
    assert res.returncode == 1 and "Traceback" not in res.stderr and "../evil" in res.stderr
    res = run("user", "add", "bob", "--address", "bob@elsewhere.test", "--config", str(config))
    assert res.returncode == 1 and "elsewhere.test" in res.stderr
    res = run("pool", "show", "--config", str(config))
    assert res.returncode == 1 and "no running mailpool" in res.stderr
