"""Settings: YAML file, environment, precedence, and clear refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from server.config import (
    AdmissionSettings,
    AuthorizationSettings,
    AuthSettings,
    ConfigError,
    DocumentSettings,
    EngineSettings,
    FailedLoginSettings,
    GatewaySettings,
    GatewayTlsSettings,
    OidcSettings,
    PrivacySettings,
    RoutingSettings,
    ScreeningSettings,
    Settings,
    load_settings,
)

from .conftest import AIRLOCK, ROOT

EXAMPLE = ROOT / "configs" / "airlock.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "airlock.yaml"
    path.write_text(text)
    return path


def test_defaults_are_safe() -> None:
    settings = load_settings()
    assert settings.gateway.host == "127.0.0.1"
    assert settings.gateway.port == 8000
    assert settings.engine.bind == "unix"
    assert settings.engine.mm_processor_cache_gb == 0


def test_yaml_file_is_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "gateway:\n  port: 9100\nengine:\n  replicas: 3\n"))
    assert settings.gateway.port == 9100
    assert settings.engine.replicas == 3


def test_environment_beats_file_and_flags_beat_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "gateway:\n  port: 9100\n  max_body_bytes: 4096\n")
    monkeypatch.setenv("AIRLOCK_GATEWAY__PORT", "9200")
    settings = load_settings(config)
    assert settings.gateway.port == 9200
    assert settings.gateway.max_body_bytes == 4096  # untouched keys of the same section survive
    assert load_settings(config, gateway={"port": 9300}).gateway.port == 9300


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "gateway:\n  prot: 9100\n"))
    assert "gateway.prot: unknown setting" in str(caught.value)


def test_misspelt_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_GATEWY__PORT", "9000")
    with pytest.raises(ConfigError, match="AIRLOCK_GATEWY__PORT: unknown setting"):
        load_settings()


def test_unparsable_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_UPSTREAMS", "not json")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_settings()


def test_wrong_value_is_named_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "gateway:\n  port: 70000\n"))
    message = str(caught.value)
    assert "gateway.port" in message
    assert "70000" not in message  # values may be secrets: never repeated back


def test_broken_yaml_says_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_settings(write(tmp_path, "gateway:\n  port: [9100\n"))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "airlock.internal"])
def test_listening_beyond_loopback_without_auth_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="refusing to listen"):
        load_settings(gateway={"host": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_are_fine(host: str) -> None:
    assert load_settings(gateway={"host": host}).gateway.host == host


def test_the_loud_opt_out_allows_a_remote_address() -> None:
    # The proxy that authenticates every request terminates TLS too.
    settings = load_settings(gateway={"host": "0.0.0.0", "insecure_allow_unauthenticated_remote": True,
                                      "tls_terminated_by_proxy": True, "trusted_proxies": ["10.0.0.5"]})
    assert settings.gateway.host == "0.0.0.0"


def test_home_is_expanded_in_paths() -> None:
    settings = load_settings(engine={"models_dir": "~/models"})
    assert "~" not in str(settings.engine.models_dir)


def test_example_file_documents_every_setting_and_loads_as_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    example = yaml.safe_load(EXAMPLE.read_text())
    sections = {"gateway": GatewaySettings, "engine": EngineSettings, "auth": AuthSettings,
                "authorization": AuthorizationSettings, "screening": ScreeningSettings, "privacy": PrivacySettings,
                "routing": RoutingSettings, "admission": AdmissionSettings, "documents": DocumentSettings}
    assert set(example) == set(Settings.model_fields)
    for name, model in sections.items():
        assert set(example[name]) == set(model.model_fields), f"{name}: example and settings differ"
    for name, model in {"oidc": OidcSettings, "failed_logins": FailedLoginSettings}.items():
        assert set(example["auth"][name]) == set(model.model_fields), f"auth.{name}: example and settings differ"
    assert set(example["gateway"]["tls"]) == set(GatewayTlsSettings.model_fields), "gateway.tls: example differs"
    assert load_settings(EXAMPLE) == load_settings()


def test_cli_reports_config_errors_with_exit_status_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [*AIRLOCK, "config", "--config", str(write(tmp_path, "engine:\n  replicas: 0\n"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "engine.replicas" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("algorithm", ["HS256", "none", "HS512"])
def test_oidc_never_accepts_none_or_hmac(algorithm: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.oidc\.algorithms"):
        load_settings(auth={"oidc": {"issuer": "https://idp", "audience": "a", "algorithms": ["RS256", algorithm]}})


def test_oidc_needs_an_audience_and_an_issuer() -> None:
    with pytest.raises(ConfigError, match="audience is required"):
        load_settings(auth={"oidc": {"issuer": "https://idp"}})
    with pytest.raises(ConfigError, match="issuer is required"):
        load_settings(auth={"oidc": {"audience": "airlock", "jwks_file": "/etc/airlock/jwks.json"}})


@pytest.mark.parametrize("auth", [{"htpasswd_file": "/etc/airlock/htpasswd"}, {"api_keys_file": "/k.json"},
                                  {"oidc": {"issuer": "https://idp", "audience": "airlock"}}])
def test_any_auth_method_allows_a_remote_address(auth: dict[str, object]) -> None:
    assert load_settings(gateway={"host": "0.0.0.0", "tls": TLS_FILES}, auth=auth).gateway.host == "0.0.0.0"


@pytest.mark.parametrize("name", ["auth-basic.yaml", "auth-apikeys.yaml", "auth-oidc.yaml"])
def test_auth_examples_are_valid_settings(name: str) -> None:
    settings = load_settings(ROOT / "configs" / name)
    assert settings.auth.configured and settings.gateway.host == "0.0.0.0" and settings.gateway.tls.enabled


@pytest.mark.parametrize("realm", ['Air"lock', "Airlock\r\nX-Injected: 1", "Büro", ""])
def test_realm_must_be_safe_in_a_header(realm: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.realm"):
        load_settings(auth={"realm": realm})


# TLS on the gateway's listener (the files themselves are read at start-up: tests/test_gateway_tls.py).
TLS_FILES = {"cert_file": "/etc/airlock/tls/airlock.crt", "key_file": "/etc/airlock/tls/airlock.key"}
API_KEYS = {"api_keys_file": "/etc/airlock/api-keys.json"}


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "airlock.internal"])
def test_listening_beyond_loopback_without_tls_is_refused_naming_the_settings(host: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(gateway={"host": host}, auth=API_KEYS)
    message = str(refused.value)
    assert f"refusing to listen on {host!r} without TLS" in message
    for setting in ("gateway.tls.cert_file", "gateway.tls.key_file", "gateway.tls_terminated_by_proxy",
                    "gateway.trusted_proxies"):
        assert setting in message


def test_without_auth_and_without_tls_the_auth_refusal_still_speaks() -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        load_settings(gateway={"host": "0.0.0.0", "tls": TLS_FILES})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_tls(host: str) -> None:
    settings = load_settings(gateway={"host": host})
    assert not settings.gateway.tls.enabled and not settings.gateway.tls_terminated_by_proxy


def test_tls_files_allow_a_remote_address_and_home_is_expanded() -> None:
    settings = load_settings(gateway={"host": "0.0.0.0", "tls": {**TLS_FILES, "chain_file": "~/chain.pem"}},
                             auth=API_KEYS)
    tls = settings.gateway.tls
    assert tls.enabled and tls.hsts_max_age_s == 31_536_000 and "~" not in str(tls.chain_file)


@pytest.mark.parametrize("files", [{"cert_file": "/c.pem"}, {"key_file": "/k.pem"}, {"chain_file": "/chain.pem"}])
def test_certificate_and_key_go_together(files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls: gateway\.tls\.(cert_file|chain_file)"):
        load_settings(gateway={"tls": files})


def test_hsts_max_age_is_not_negative() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls\.hsts_max_age_s"):
        load_settings(gateway={"tls": {**TLS_FILES, "hsts_max_age_s": -1}})
    assert load_settings(gateway={"tls": {**TLS_FILES, "hsts_max_age_s": 0}}).gateway.tls.hsts_max_age_s == 0


def test_tls_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_GATEWAY__HOST", "0.0.0.0")
    monkeypatch.setenv("AIRLOCK_GATEWAY__TLS__CERT_FILE", TLS_FILES["cert_file"])
    monkeypatch.setenv("AIRLOCK_GATEWAY__TLS__KEY_FILE", TLS_FILES["key_file"])
    monkeypatch.setenv("AIRLOCK_AUTH__API_KEYS_FILE", API_KEYS["api_keys_file"])
    assert str(load_settings().gateway.tls.cert_file) == TLS_FILES["cert_file"]


def test_a_proxy_terminating_tls_allows_a_remote_address() -> None:
    settings = load_settings(gateway={"host": "0.0.0.0", "tls_terminated_by_proxy": True,
                                      "trusted_proxies": ["10.0.0.5", " 10.42.0.0/16", "fd00::/8", "192.168.1.7/24"]},
                             auth=API_KEYS)
    # Normalised to networks, as uvicorn's proxy-headers layer reads them.
    assert settings.gateway.trusted_proxies == ["10.0.0.5/32", "10.42.0.0/16", "fd00::/8", "192.168.1.0/24"]


def test_a_proxy_terminating_tls_must_be_named() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls_terminated_by_proxy needs gateway\.trusted_proxies"):
        load_settings(gateway={"host": "0.0.0.0", "tls_terminated_by_proxy": True}, auth=API_KEYS)


@pytest.mark.parametrize("entry", ["*", "proxy.internal", "10.0.0.300", "10.0.0.0/33", ""])
def test_trusted_proxies_are_addresses_or_networks(entry: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(gateway={"tls_terminated_by_proxy": True, "trusted_proxies": ["10.0.0.5", entry]})
    message = str(refused.value)
    assert "gateway.trusted_proxies: entry 2 is not an IP address or network" in message
    if entry:
        assert entry not in message  # the value is not echoed


@pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0"])
def test_trusted_proxies_cannot_be_everyone(everyone: str) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.trusted_proxies: entry 1 trusts every address"):
        load_settings(gateway={"tls_terminated_by_proxy": True, "trusted_proxies": [everyone]})


ENGINE_TLS = {"cert_file": "~/engine.pem", "key_file": "~/engine.key", "client_ca_file": "~/gateway-ca.pem"}
UPSTREAM_TLS = {"ca_file": "~/engine-ca.pem", "cert_file": "~/gateway.pem", "key_file": "~/gateway.key"}


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "engine-0.internal"])
def test_engines_beyond_loopback_without_tls_are_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"without engine\.tls") as refused:
        load_settings(engine={"bind": "tcp", "host": host})
    message = str(refused.value)
    assert host not in message
    assert all(f"engine.tls.{name}" in message for name in ENGINE_TLS)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "engine-0.internal"])
def test_engines_beyond_loopback_with_tls_are_fine(host: str) -> None:
    settings = load_settings(engine={"bind": "tcp", "host": host, "tls": ENGINE_TLS})
    assert settings.engine.tls is not None
    # Paths are expanded like every other path setting.
    assert settings.engine.tls.cert_file == Path("~/engine.pem").expanduser()
    assert "~" not in str(settings.engine.tls.client_ca_file)


def test_engines_on_loopback_tcp_need_no_tls() -> None:
    assert load_settings(engine={"bind": "tcp", "host": "127.0.0.1"}).engine.tls is None


@pytest.mark.parametrize("missing", sorted(ENGINE_TLS))
def test_engine_tls_needs_all_three_files(missing: str) -> None:
    partial = {name: path for name, path in ENGINE_TLS.items() if name != missing}
    with pytest.raises(ConfigError, match=rf"engine\.tls\.{missing}: Field required"):
        load_settings(engine={"bind": "tcp", "tls": partial})


def test_engine_tls_on_unix_sockets_is_refused_as_meaningless() -> None:
    with pytest.raises(ConfigError, match=r"engine\.tls is set but engine\.bind is 'unix'"):
        load_settings(engine={"tls": ENGINE_TLS})


@pytest.mark.parametrize("url", ["http://10.1.2.3:8100", "http://engine-0.internal:8100", "http://0.0.0.0:8100",
                                 "http://[fd00::1]:8100"])
def test_plain_http_upstreams_beyond_loopback_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.0\.url: http:// to another host") as refused:
        load_settings(upstreams=[{"url": url}])
    assert url.split("//")[1].split(":")[0] not in str(refused.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8100", "http://localhost:8100", "http://[::1]:8100"])
def test_plain_http_upstreams_on_loopback_are_fine(url: str) -> None:
    assert load_settings(upstreams=[{"url": url}]).upstreams[0].url == url


def test_https_upstreams_need_the_gateways_client_certificate() -> None:
    with pytest.raises(ConfigError, match="https:// upstreams need upstream_tls") as refused:
        load_settings(upstreams=[{"url": "https://engine-0.internal:8100"}])
    assert all(name in str(refused.value) for name in UPSTREAM_TLS)
    settings = load_settings(upstreams=[{"url": "https://engine-0.internal:8100"}], upstream_tls=UPSTREAM_TLS)
    assert settings.upstream_tls is not None
    assert settings.upstream_tls.key_file == Path("~/gateway.key").expanduser()


@pytest.mark.parametrize("missing", sorted(UPSTREAM_TLS))
def test_upstream_tls_needs_ca_certificate_and_key_together(missing: str) -> None:
    partial = {name: path for name, path in UPSTREAM_TLS.items() if name != missing}
    with pytest.raises(ConfigError, match=rf"upstream_tls\.{missing}: Field required"):
        load_settings(upstream_tls=partial)


def test_tls_settings_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in UPSTREAM_TLS.items():
        monkeypatch.setenv(f"AIRLOCK_UPSTREAM_TLS__{name.upper()}", path)
    for name, path in ENGINE_TLS.items():
        monkeypatch.setenv(f"AIRLOCK_ENGINE__TLS__{name.upper()}", path)
    monkeypatch.setenv("AIRLOCK_ENGINE__BIND", "tcp")
    settings = load_settings()
    assert settings.upstream_tls is not None and settings.engine.tls is not None
    assert settings.engine.tls.client_ca_file == Path("~/gateway-ca.pem").expanduser()


def test_up_with_engine_tls_needs_upstream_tls(tmp_path: Path) -> None:
    config = write(tmp_path, yaml.safe_dump({"engine": {"bind": "tcp", "tls": ENGINE_TLS}}))
    result = subprocess.run([*AIRLOCK, "up", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "engine.tls is set, so `airlock up`" in result.stderr
    assert all(f"upstream_tls.{name}" in result.stderr for name in UPSTREAM_TLS)
    # The settings themselves are valid: the engines alone (`airlock engine`) need no client certificate.
    with pytest.raises(ConfigError, match=r"upstream_tls"):
        load_settings(config).check_own_engines()
    load_settings(config, upstream_tls=UPSTREAM_TLS).check_own_engines()


def test_metrics_include_engines_is_still_read_as_engine_series(tmp_path: Path) -> None:
    """Configs written before the rename keep working: metrics.include_engines is the old name of engine_series."""
    path = tmp_path / "airlock.yaml"
    path.write_text("metrics:\n  include_engines: false\n")
    assert load_settings(path).metrics.engine_series is False


@pytest.mark.parametrize(("gateway_host", "metrics_host"), [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0"), ("::", "127.0.0.1"),
    ("localhost", "127.0.0.1"),
])
def test_a_separate_metrics_listener_on_the_gateways_own_port_is_refused(gateway_host: str, metrics_host: str) -> None:
    """Two listeners on one port of overlapping addresses: the second would fail to bind at start (EADDRINUSE; a
    wildcard address takes the port on every address, and "::" on Linux takes IPv4's too unless IPV6_V6ONLY)."""
    with pytest.raises(ConfigError, match=r"metrics\.port 9000 is gateway\.port: .*metrics\.listener: separate"):
        load_settings(gateway={"host": gateway_host, "port": 9000, "insecure_allow_unauthenticated_remote": True,
                               "tls_terminated_by_proxy": True, "trusted_proxies": ["10.0.0.5"]},
                      metrics={"listener": "separate", "host": metrics_host, "port": 9000})


@pytest.mark.parametrize(("listener", "metrics_host", "port"), [
    ("main", "127.0.0.1", 9000), ("off", "127.0.0.1", 9000), ("separate", "127.0.0.2", 9000),
    ("separate", "127.0.0.1", 9464),
])
def test_metrics_on_the_gateways_port_is_fine_when_nothing_binds_it_twice(listener: str, metrics_host: str,
                                                                         port: int) -> None:
    settings = load_settings(gateway={"host": "127.0.0.1", "port": 9000},
                             metrics={"listener": listener, "host": metrics_host, "port": port})
    assert settings.metrics.port == port
