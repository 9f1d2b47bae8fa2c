"""`pool change` is kept (the source's CHGPJE changes the entry's description): stored as an
overlay beside the configuration, applied on reload and restart, shown by `config check`,
taken out by `pool reset`; made with the host stopped, it applies at the next start."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from hosthelp import Host, wait_for

from mailpool.config import ConfigError, load_config
from mailpool.config.overlay import (
    apply_overlay,
    changed_params,
    overlay_path,
    read_overlay,
    update_overlay,
)
from mailpool.config.schema import PoolParams

SMTP = "smtp-server"


def maximum(h: Host, entry: str = SMTP) -> int:
    return int(h.pool_stats()[entry]["parameters"]["maximum_jobs"])


def test_a_change_survives_reload_and_restart_until_reset(host: Any) -> None:
    h: Host = host()
    overlay = overlay_path(h.config_path)
    res = h.cli("pool", "change", SMTP, "--maximum-jobs", "7")
    assert "maximum_jobs=7" in res.stdout and f"kept in {overlay}" in res.stdout
    assert "maximum_jobs = 7" in overlay.read_text()
    res = h.cli("pool", "change", "smtp-client", "--deliveries-per-job", "3")
    assert maximum(h) == 7
    assert h.pool_stats()["smtp-client"]["parameters"]["deliveries_per_job"] == 3

    assert h.proc is not None
    h.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in h.log_path.read_text(), what="the reload")
    assert maximum(h) == 7
    assert h.pool_stats()["smtp-client"]["parameters"]["deliveries_per_job"] == 3

    shown = h.cli("config", "check").stdout
    assert f"# with `pool change` values from {overlay}" in shown
    assert "#   pool.smtp-server.maximum_jobs = 7" in shown
    assert "#   pool.smtp-client.deliveries_per_job = 3" in shown

    h.stop()
    h.start()
    assert maximum(h) == 7

    res = h.cli("pool", "reset", SMTP, "maximum_jobs")
    assert "configuration file's values apply" in res.stdout
    assert maximum(h) == 20  # the default, as the configuration file has no value
    assert "maximum_jobs" not in overlay.read_text()
    h.cli("pool", "reset", "smtp-client")
    assert not overlay.exists()
    assert "pool change` values" not in h.cli("config", "check").stdout


def test_a_change_made_while_stopped_applies_at_start(host: Any) -> None:
    h: Host = host(start=False)
    res = h.cli("pool", "change", SMTP, "--maximum-jobs", "9", "--initial-jobs", "1")
    assert "the host is not running: applies when it starts" in res.stdout
    bad = h.cli("pool", "change", SMTP, "--threshold", "50", check=False)
    assert bad.returncode == 1 and "smtp-server: threshold: 50: must not exceed" in bad.stderr
    h.start()
    params = h.pool_stats()[SMTP]["parameters"]
    assert (params["maximum_jobs"], params["initial_jobs"]) == (9, 1)


def test_a_bad_hand_edited_overlay_names_its_file(host: Any) -> None:
    h: Host = host(start=False)
    overlay = overlay_path(h.config_path)
    overlay.write_text("[pool.smtp-server]\nmaximum_jobs = 0\n")
    res = h.cli("config", "check", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{overlay}: pool.smtp-server.maximum_jobs: 0: must be at least 1" in res.stderr
    overlay.write_text("[pool.smtp-server]\nmaximum_job = 3\n")
    res = h.cli("config", "check", check=False)
    assert f"{overlay}: pool.smtp-server.maximum_job: 3: unknown key" in res.stderr


# --- the pure parts ----------------------------------------------------------------------


def test_read_refuses_what_is_not_a_pool_entry(tmp_path: Path) -> None:
    path = tmp_path / "x.pool-overlay.toml"
    path.write_text("[smtp]\nmax_recipients = 5\n")
    with pytest.raises(ConfigError, match=r"x.pool-overlay.toml: smtp: only \[pool.ENTRY\]"):
        read_overlay(path)
    path.write_text("[pool.nope]\nmaximum_jobs = 5\n")
    with pytest.raises(ConfigError, match=r"pool\.nope: .*not a pool entry"):
        read_overlay(path)
    path.write_text("[pool.smtp-client]\nsessions_per_job = 5\n")
    with pytest.raises(ConfigError, match=r"pool\.smtp-client\.sessions_per_job: 5: unknown key"):
        read_overlay(path)
    assert read_overlay(tmp_path / "missing.toml") == {}


def test_apply_puts_a_capacity_in_its_own_section() -> None:
    raw = {"pool": {SMTP: {"threshold": 1}}, "outbound": {"router": "x"}}
    out = apply_overlay(raw, {SMTP: {"maximum_jobs": 5}, "smtp-client": {"deliveries_per_job": 4}})
    assert out["pool"][SMTP] == {"threshold": 1, "maximum_jobs": 5}
    assert out["outbound"] == {"router": "x", "deliveries_per_job": 4}
    assert raw == {"pool": {SMTP: {"threshold": 1}}, "outbound": {"router": "x"}}  # untouched


def test_changed_params_names_entry_key_and_value() -> None:
    current = PoolParams()
    assert changed_params(SMTP, current, {"maximum_jobs": 30}).maximum_jobs == 30
    with pytest.raises(ValueError, match="smtp-server: initial_jobs: 99: must not exceed"):
        changed_params(SMTP, current, {"initial_jobs": 99})
    with pytest.raises(ValueError, match=r"smtp-client: sessions_per_job: .* change "
                                         "deliveries_per_job"):
        changed_params("smtp-client", current, {"sessions_per_job": 2})
    with pytest.raises(ValueError, match="unknown pool entry 'x'"):
        changed_params("x", current, {})


def test_update_and_reset_round_trip(tmp_path: Path) -> None:
    config = tmp_path / "mailpool.toml"
    config.write_text('[host]\nname = "mail.example.test"\nlocal_domains = ["example.test"]\n')
    update_overlay(config, SMTP, changes={"maximum_jobs": 6, "wait": False})
    assert load_config(config).config.pool[SMTP].maximum_jobs == 6
    assert load_config(config).overlay == {SMTP: {"maximum_jobs": 6, "wait": False}}
    update_overlay(config, SMTP, reset=["wait"])
    assert read_overlay(overlay_path(config)) == {SMTP: {"maximum_jobs": 6}}
    update_overlay(config, SMTP, reset=[])
    assert not overlay_path(config).exists()
