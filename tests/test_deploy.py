"""Bare-metal and offline installation: the bundle and model manifests (a tampered model is caught, and the engine
launcher refuses it), the systemd units (checked by systemd's own analyzer), and the Containerfiles."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from server.manifest import MANIFEST_NAME

from .conftest import AIRLOCK, ROOT, write_config

SYSTEMD = ROOT / "deploy" / "systemd"
CONTAINERS = ROOT / "deploy" / "containers"
# systemd's own score, 0 (locked down) to 10 (unprotected); "OK" is below 4.
MAX_EXPOSURE = 2.0


def airlock(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bundle(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    made = airlock("bundle", "--out", str(out), "--model", str(demo_model_dir), "--no-wheels")
    assert made.returncode == 0, made.stderr
    return out


def test_a_bundle_carries_the_model_with_its_manifest_and_checksums(bundle: Path, demo_model_dir: Path) -> None:
    model = bundle / "models" / demo_model_dir.name
    listed = [line.split("  ", 1)[1] for line in (model / MANIFEST_NAME).read_text().splitlines()]
    assert sorted(listed) == sorted(str(p.relative_to(demo_model_dir)) for p in demo_model_dir.rglob("*")
                                    if p.is_file())
    # Standard tools check both on the far side.
    for directory, sums in ((model, MANIFEST_NAME), (bundle, "SHA256SUMS")):
        checked = subprocess.run(["sha256sum", "--check", "--strict", sums], cwd=directory, capture_output=True,
                                 text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    verified = airlock("verify-model", str(model))
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stdout + verified.stderr


@pytest.fixture
def tampered(bundle: Path, demo_model_dir: Path, tmp_path: Path) -> Path:
    model = tmp_path / demo_model_dir.name
    shutil.copytree(bundle / "models" / demo_model_dir.name, model)
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the weights
    weights.write_bytes(bytes(data))
    return model


def test_verify_model_catches_a_tampered_file_and_an_added_one(tampered: Path) -> None:
    (tampered / "chat_template.jinja.bak").write_text("{{ messages }}")
    result = airlock("verify-model", str(tampered))
    assert result.returncode == 1
    weights = next(tampered.glob("*.safetensors")).name
    assert result.stdout.startswith("MISMATCH") and f"changed: {weights}" in result.stdout
    assert "not in the manifest: chat_template.jinja.bak" in result.stdout


def test_the_engine_launcher_refuses_a_model_that_does_not_match(tampered: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "engine.yaml", {"engine": {
        "model": str(tampered), "profile": "airlock-demo", "device": "cpu", "socket_dir": str(tmp_path / "sockets"),
    }})
    result = airlock("engine", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "does not match its manifest" in result.stderr and "refusing to start it" in result.stderr
    assert "vllm" not in result.stderr.lower().replace("airlock", "")  # nothing was started


def test_the_launcher_can_require_a_manifest(bundle: Path, demo_model_dir: Path, tmp_path: Path) -> None:
    unlisted = tmp_path / "model"
    shutil.copytree(demo_model_dir, unlisted)
    config = write_config(tmp_path / "engine.yaml", {"engine": {
        "model": str(unlisted), "profile": "airlock-demo", "device": "cpu", "verify_model": "require",
        "socket_dir": str(tmp_path / "sockets"),
    }})
    result = airlock("engine", "--config", str(config))
    assert result.returncode == 2 and f"has no {MANIFEST_NAME}" in result.stderr, result.stderr


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed to check the systemd units (Debian: apt install systemd)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unit", ["airlock-gateway.service", "airlock-engines.service", "airlock-limits.service"])
def test_systemd_units_verify_and_are_locked_down(unit: str, tmp_path: Path) -> None:
    text = (SYSTEMD / unit).read_text()
    # The analyzer checks that ExecStart exists: point it at this checkout's airlock.
    local = tmp_path / unit
    local.write_text(text.replace("/opt/airlock/bin/airlock", str(ROOT / ".venv" / "bin" / "airlock")))
    verified = systemd_analyze("verify", "--man=no", str(local))
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    security = systemd_analyze("security", "--offline=yes", str(local))
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout).group(1))  # type: ignore[union-attr]
    assert exposure <= MAX_EXPOSURE, security.stdout
    directives = set(text.splitlines())
    for required in ("IPAddressDeny=any", "IPAddressAllow=localhost", "PrivateTmp=yes", "ProtectSystem=strict",
                     "LimitCORE=0", "NoNewPrivileges=yes", "CapabilityBoundingSet="):
        assert required in directives, required
    if unit == "airlock-engines.service":
        assert "PrivateNetwork=yes" in directives  # loopback only, in a network namespace of their own


@pytest.mark.parametrize("name", ["Containerfile.gateway", "Containerfile.engine", "Containerfile.engine-cpu",
                                  "Containerfile.model"])
def test_containerfiles_use_pinned_bases_a_plain_user_and_only_the_bundle(name: str) -> None:
    """A base is Airlock's own Debian base (made from the site's Debian mirror, no registry digest), or pinned by
    digest, or required (a build without --build-arg BASE stops): never a public tag that can move."""
    with (CONTAINERS / name).open("rb") as stream:
        parsed = DockerfileParser(fileobj=stream)
        instructions = [(step["instruction"], step["value"]) for step in parsed.structure]
    arg = next(value for instruction, value in instructions if instruction == "ARG" and value.startswith("BASE"))
    default = arg.partition("=")[2]
    assert default in {"", "localhost/airlock/debian-base:bookworm"} or re.search(r"@sha256:[0-9a-f]{64}$", default)
    if not default:
        base = next(value for instruction, value in instructions if instruction == "FROM")
        # podman/buildah stop: "no FROM statement found" after "missing BASE build argument"
        assert base == "${BASE}" and "@sha256:<digest>" in (CONTAINERS / name).read_text(), base
    users = [value for instruction, value in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    for instruction, value in instructions:
        if instruction == "RUN":
            assert not re.search(r"\b(curl|wget|apt-get|apk|git)\b", value), value
            for install in re.findall(r"pip install[^&]*", value):
                assert "--no-index" in install, install  # only the bundle's wheels
        assert instruction != "ADD", "ADD can fetch URLs; COPY or a bind mount only"
