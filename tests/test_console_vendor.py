"""The console's vendored markdown renderer and sanitizer are exactly what their manifest pins, and ship in the wheel.

`make vendor-console` fetches them again from the npm registry and checks the tarballs' integrity; these tests need
no network: the files must match the manifest's sha256, every file must be listed, and the built wheel (uv, as
`airlock bundle` builds it) must carry them with their licences.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

from server.console import vendored_scripts

from .conftest import ROOT

VENDOR = ROOT / "server" / "console_static" / "vendor"


def manifest_files() -> dict[str, str]:
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    for package in manifest["packages"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"]), package  # one version, no range
        assert package["integrity"].startswith("sha512-")
    return {entry["file"]: entry["sha256"] for package in manifest["packages"] for entry in package["files"]}


def test_the_vendored_files_are_the_ones_the_manifest_pins() -> None:
    listed = manifest_files()
    assert {path.name for path in VENDOR.iterdir()} == {*listed, "manifest.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert vendored_scripts() == {"marked.umd.js", "purify.js"}
    assert any(name.endswith("LICENSE") for name in listed if name.startswith("marked"))
    assert any(name.endswith("LICENSE") for name in listed if name.startswith("dompurify"))


def test_the_wheel_carries_the_console_with_its_libraries_and_licences(tmp_path: Path) -> None:
    uv = ROOT / ".tools" / "bin" / "uv"  # the project's own uv, which make install fetches
    assert uv.exists(), "uv is needed (make install)"
    built = subprocess.run([str(uv), "build", "--wheel", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("airlock-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in manifest_files():
            assert f"server/console_static/vendor/{name}" in names, name
            assert archive.read(f"server/console_static/vendor/{name}") == (VENDOR / name).read_bytes()
        assert {"server/console_static/index.html", "server/console_static/app.js",
                "server/console_static/app.css", "server/console_static/vendor/manifest.json"} <= names
