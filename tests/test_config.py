"""Configuration: every bad value of the outbound sections is one error naming file, key and
value; the effective configuration printed by `config check` loads back as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailpool.config import ConfigError, effective_toml, load_config, pool_params

BASE = '[host]\nname = "mail.example.test"\nlocal_domains = ["example.test"]\n'


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "mailpool.toml"
    path.write_text(BASE + extra)
    return path


@pytest.mark.parametrize(("extra", "key", "value"), [
    ('[relay]\nmode = "some"\n', "relay.mode", "'some'"),
    ('[relay]\nnetworks = ["10.0.0.0/33"]\n', "relay.networks[0]", "'10.0.0.0/33'"),
    ('[relay]\nnear_domains = ["bad domain"]\n', "relay.near_domains[0]", "'bad domain'"),
    ('[dns]\nnameservers = ["resolver.test"]\n', "dns.nameservers[0]", "'resolver.test'"),
    ("[dns]\nport = 0\n", "dns.port", "0"),
    ("[dns]\ntimeout = 0\n", "dns.timeout", "0"),
    ('[outbound]\nrouter = "mx.test:99999"\n', "outbound.router", "'mx.test:99999'"),
    ('[outbound]\nrouter = "[mx.test]:25"\n', "outbound.router", "'[mx.test]:25'"),
    ("[outbound]\nfirewall = true\n", "outbound.firewall", "True"),
    ('[outbound]\nbind_address = "here"\n', "outbound.bind_address", "'here'"),
    ("[outbound]\ndeliveries_per_job = 0\n", "outbound.deliveries_per_job", "0"),
    ("[outbound]\ndata_done_timeout = -1\n", "outbound.data_done_timeout", "-1"),
    ("[outbound]\ninitial_destination_concurrency = 30\n",
     "outbound.destination_concurrency_limit", "20"),
    ("[retry]\nfirst_count = -1\n", "retry.first_count", "-1"),
    ("[retry]\nmax_lifetime = 0\n", "retry.max_lifetime", "0"),
    ('[notices]\nfrom = "nobody"\n', "notices.from", "'nobody'"),
    ("[etrn]\ninterval = 60\n", "etrn.interval", "60"),
    ("[outbound]\nretries = 3\n", "outbound.retries", "3"),
    ("[pool.smtp-client]\nsessions_per_job = 4\n", "pool.smtp-client.sessions_per_job", "4"),
])
def test_bad_values_name_file_key_and_value(tmp_path: Path, extra: str, key: str,
                                            value: str) -> None:
    path = write(tmp_path, extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: {key}: {value}"), text
    assert "\n" not in text


def test_effective_configuration_loads_back(tmp_path: Path) -> None:
    path = write(tmp_path, '[notices]\nfrom = "postmaster@example.test"\n'
                          '[outbound]\nrouter = "[192.0.2.1]:2525"\nfirewall = true\n'
                          "deliveries_per_job = 7\n")
    loaded = load_config(path)
    again = tmp_path / "again.toml"
    again.write_text(effective_toml(loaded.config))
    reloaded = load_config(again)
    assert reloaded.config == loaded.config
    assert reloaded.config.notices.from_ == "postmaster@example.test"
    # The client pool's per-job capacity is its deliveries, not sessions.
    assert pool_params(reloaded.config, "smtp-client").sessions_per_job == 7
    assert pool_params(reloaded.config, "smtp-server").sessions_per_job == 4096  # the default


@pytest.mark.parametrize(("extra", "key", "value"), [
    ('user = "Bad User"\n', "host.user", "'Bad User'"),
    ("[smtp]\nmin_data_rate = 0\n", "smtp.min_data_rate", "0"),
    ('[smtp]\nclient_limit_exceptions = ["x"]\n', "smtp.client_limit_exceptions[0]", "'x'"),
    ('[restrictions]\ndeny = ["300.0.0.0/8"]\n', "restrictions.deny[0]", "'300.0.0.0/8'"),
    ('[restrictions]\ndnsbl = ["not a zone"]\n', "restrictions.dnsbl[0]", "'not a zone'"),
    ('[[filter]]\naction = "bounce"\nsubject = "x"\n', "filter[0].action", "'bounce'"),
    ('[[filter]]\naction = "keep"\n', "filter[0]", "''"),
    ('[listen]\nadmin = "0.0.0.0:8025"\n', "listen.admin", "'0.0.0.0:8025'"),
    ('[admin]\ntoken = "short"\n', "admin.token", "'(hidden)'"),
])
def test_hardening_values_name_file_key_and_value(tmp_path: Path, extra: str, key: str,
                                                  value: str) -> None:
    path = write(tmp_path, extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {key}: {value}"), str(err.value)


def test_filters_print_as_an_array_of_tables(tmp_path: Path) -> None:
    path = write(tmp_path, '[[filter]]\naction = "discard"\nsubject = "ILOVEYOU"\n'
                           '[[filter]]\nattachment = "*.vbs"\n')
    loaded = load_config(path)
    text = effective_toml(loaded.config)
    assert text.count("[[filter]]") == 2
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_config(again).config.filter == loaded.config.filter


def test_tls_files_are_checked_at_start(tmp_path: Path) -> None:
    path = write(tmp_path, f'[tls]\ncertificate = "{tmp_path}/nope.pem"\n'
                           f'key = "{tmp_path}/nope.key"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: tls.certificate: '{tmp_path}/nope.pem': cannot read: "
                              "No such file or directory")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    path.write_text(BASE + f'[tls]\ncertificate = "{garbage}"\nkey = "{garbage}"\n')
    with pytest.raises(ConfigError, match=r"tls\.certificate: .*not a usable certificate"):
        load_config(path)
    path.write_text(BASE + '[listen]\nsmtps = "127.0.0.1:4650"\n')
    with pytest.raises(ConfigError, match=r"listen.smtps: .*needs \[tls\]"):
        load_config(path)
