"""CLI errors a user can cause: one line naming what is wrong, exit 1, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from hosthelp import CLI_CONFIG, MAILPOOL

from mailpool.cli import build_parser


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILPOOL, *args], capture_output=True, text=True, timeout=60)


def test_unusable_data_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "mailpool.toml"
    config.write_text(CLI_CONFIG.format(data=blocker / "var"))
    for args in (["serve"], ["user", "add", "bob", "--address", "bob@example.test"]):
        res = run(*args, "--config", str(config))
        assert res.returncode == 1, res
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert str(blocker) in res.stderr


def test_bad_user_name_and_foreign_address_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "mailpool.toml"
    config.write_text(CLI_CONFIG.format(data=tmp_path / "var"))
    res = run("user", "add", "../evil", "--address", "x@example.test", "--config", str(config))
    assert res.returncode == 1 and "Traceback" not in res.stderr and "../evil" in res.stderr
    res = run("user", "add", "bob", "--address", "bob@elsewhere.test", "--config", str(config))
    assert res.returncode == 1 and "elsewhere.test" in res.stderr
    res = run("pool", "show", "--config", str(config))
    assert res.returncode == 1 and "no running mailpool" in res.stderr


def _leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _leaves(sub, [*path, name])
        else:
            found.append((" ".join(path), action))
    return found


def test_every_option_and_argument_has_help_text() -> None:
    missing = [f"{where}: {action.option_strings or action.dest}"
               for where, action in _leaves(build_parser(), ["mailpool"])
               if not action.help and not isinstance(action, argparse._HelpAction)]
    assert missing == []


def test_version_and_the_default_config_search(tmp_path: Path) -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("mailpool ")
    config = tmp_path / "elsewhere.toml"
    config.write_text(CLI_CONFIG.format(data=tmp_path / "var"))
    # Outside the project directory, $MAILPOOL_CONFIG names the file.
    res = subprocess.run([*MAILPOOL, "config", "check"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={**os.environ, "MAILPOOL_CONFIG":
                                                        str(config)})
    assert res.returncode == 0 and f"# {config}: OK" in res.stdout
    # Without it, config/mailpool.toml relative to the current directory.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mailpool.toml").write_text(CLI_CONFIG.format(data=tmp_path / "var"))
    env = {k: v for k, v in os.environ.items() if k != "MAILPOOL_CONFIG"}
    res = subprocess.run([*MAILPOOL, "config", "check"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert res.returncode == 0 and f"# {tmp_path / 'config' / 'mailpool.toml'}: OK" in res.stdout


def test_a_password_without_a_terminal_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mailpool.toml"
    config.write_text(CLI_CONFIG.format(data=tmp_path / "var"))
    run("user", "add", "bob", "--address", "bob@example.test", "--config", str(config))
    res = subprocess.run([*MAILPOOL, "user", "passwd", "bob", "--config", str(config)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
