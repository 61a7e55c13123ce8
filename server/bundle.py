"""``airlock bundle``: everything an air-gapped site needs, gathered on a machine that can reach a package index.

The bundle holds a wheelhouse for the target platform (every locked dependency, hash-checked, plus Airlock's own
wheel), the locked requirements (``requirements.txt``: everything; ``requirements-gateway.txt``: the gateway's),
optionally a model directory with its manifest, and ``SHA256SUMS`` over all of it. It is made from a source
checkout (it reads ``uv.lock``), with ``uv`` and ``pip`` (both in ``make install``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .manifest import sha256_of, write_manifest

BUNDLE_SUMS = "SHA256SUMS"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
DEFAULT_PYTHON = "3.11"


@dataclass(frozen=True)
class BundleOptions:
    out: Path
    model: Path | None
    wheels: bool
    engine: str  # "cpu" | "gpu": which engine extra the wheelhouse holds
    platform: str
    python_version: str
    project: Path


def _uv(project: Path) -> str:
    local = project / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        raise ConfigError("uv is needed to read the lock file (run `make install` in the checkout)")
    return found


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ConfigError(f"{Path(argv[0]).name} {argv[1]} failed:\n{tail}")


def gather_wheels(options: BundleOptions) -> None:
    """Locked requirements (with hashes) for the target, their wheels, and Airlock's own wheel."""
    project, out = options.project, options.out
    if not (project / "uv.lock").exists():
        raise ConfigError(f"{project} is not an Airlock checkout (no uv.lock): bundle from the source tree")
    uv = _uv(project)
    # Everything (the engine too), and the gateway's share alone (its image needs no vLLM and no torch).
    requirements = out / "requirements.txt"
    export = [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--format", "requirements-txt"]
    _run([*export, "--extra", options.engine, "--output-file", str(requirements)], project)
    _run([*export, "--output-file", str(out / "requirements-gateway.txt")], project)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _run([uv, "build", "--wheel", "--out-dir", str(wheels)], project)
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--require-hashes",
          "--only-binary=:all:", "--platform", options.platform, "--python-version", options.python_version,
          "--implementation", "cp", "--dest", str(wheels), "-r", str(requirements)], project)


def copy_model(model: Path, out: Path, progress: Callable[[int], None] | None = None) -> Path:
    """The model's files, with a manifest written from the copy (what will travel is what is hashed)."""
    model = model.resolve()
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model} is not a model directory (no config.json)")
    target = out / "models" / model.name
    if target.exists():
        raise ConfigError(f"{target} already exists: bundle into an empty directory")
    shutil.copytree(model, target)
    write_manifest(target, progress)
    return target


def write_sums(out: Path) -> Path:
    """SHA256SUMS over every file of the bundle, for `sha256sum -c` on the far side."""
    names = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file() and path.name != BUNDLE_SUMS)
    sums = out / BUNDLE_SUMS
    sums.write_text("".join(f"{sha256_of(out / name)}  {name}\n" for name in names))
    return sums


def make_bundle(options: BundleOptions, progress: Callable[[int], None] | None = None) -> dict[str, object]:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    if options.wheels:
        gather_wheels(options)
    model = copy_model(options.model, out, progress) if options.model is not None else None
    # What installing needs on the far side: the systemd units, Containerfiles, dashboards and the Helm chart.
    for carried in ("deploy", "helm"):
        if (options.project / carried).is_dir():
            shutil.copytree(options.project / carried, out / carried, dirs_exist_ok=True)
    description: dict[str, object] = {
        "platform": options.platform, "python": options.python_version, "engine": options.engine,
        "wheels": options.wheels, "model": str(model.relative_to(out)) if model else None,
    }
    (out / "bundle.json").write_text(json.dumps(description, indent=2) + "\n")
    write_sums(out)
    return description
