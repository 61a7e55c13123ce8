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
    EngineSettings,
    FailedLoginSettings,
    GatewaySettings,
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
    settings = load_settings(gateway={"host": "0.0.0.0", "insecure_allow_unauthenticated_remote": True})
    assert settings.gateway.host == "0.0.0.0"


def test_home_is_expanded_in_paths() -> None:
    settings = load_settings(engine={"models_dir": "~/models"})
    assert "~" not in str(settings.engine.models_dir)


def test_example_file_documents_every_setting_and_loads_as_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    example = yaml.safe_load(EXAMPLE.read_text())
    sections = {"gateway": GatewaySettings, "engine": EngineSettings, "auth": AuthSettings,
                "authorization": AuthorizationSettings, "screening": ScreeningSettings, "privacy": PrivacySettings,
                "routing": RoutingSettings, "admission": AdmissionSettings}
    assert set(example) == set(Settings.model_fields)
    for name, model in sections.items():
        assert set(example[name]) == set(model.model_fields), f"{name}: example and settings differ"
    for name, model in {"oidc": OidcSettings, "failed_logins": FailedLoginSettings}.items():
        assert set(example["auth"][name]) == set(model.model_fields), f"auth.{name}: example and settings differ"
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
    assert load_settings(gateway={"host": "0.0.0.0"}, auth=auth).gateway.host == "0.0.0.0"


@pytest.mark.parametrize("name", ["auth-basic.yaml", "auth-apikeys.yaml", "auth-oidc.yaml"])
def test_auth_examples_are_valid_settings(name: str) -> None:
    settings = load_settings(ROOT / "configs" / name)
    assert settings.auth.configured and settings.gateway.host == "0.0.0.0"


@pytest.mark.parametrize("realm", ['Air"lock', "Airlock\r\nX-Injected: 1", "Büro", ""])
def test_realm_must_be_safe_in_a_header(realm: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.realm"):
        load_settings(auth={"realm": realm})


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
