"""``airlock bundle``: everything an air-gapped site needs, gathered on a machine that can reach a package index.

The bundle holds a wheelhouse for the target platform (every locked dependency, hash-checked, plus Airlock's own
wheel), the locked requirements (``requirements.txt``: everything; ``requirements-gateway.txt``: the gateway's),
optionally a model directory with its manifest, and ``SHA256SUMS`` over all of it. It is made from a source
checkout (it reads ``uv.lock``), with ``uv`` and ``pip`` (both in ``make install``).

With a signing key (``airlock keygen``), ``SHA256SUMS.sig`` and each model's ``airlock-manifest.sha256.sig`` say who
made it (``signing.py``); ``airlock verify-bundle`` checks them on the far side. A link out of the model directory, a
dangling link or a special file stops the bundle by name (``manifest.py``): nothing outside is ever copied across. The
bundle is built in a hidden sibling of ``--out`` and renamed into place at the end (rename(2) is atomic, and replaces
an empty directory), so a failed run leaves nothing half-written and the retry starts clean; Ctrl-C, SIGTERM (kill,
timeout(1), systemd) and SIGHUP (a closed terminal) remove it too, only SIGKILL cannot.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .config import ConfigError
from .manifest import (
    MANIFEST_FILES,
    MANIFEST_NAME,
    ManifestError,
    Verification,
    check_listed,
    read_listing,
    refuse_unsafe,
    scan,
    write_listing,
    write_manifest,
)
from .regular_file import open_regular
from .signing import SIGNATURE_SUFFIX, SignatureError, load_private_key, sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

BUNDLE_SUMS = "SHA256SUMS"
# Never listed in SHA256SUMS: the file itself and its signature, at the top of the bundle.
BUNDLE_SUMS_FILES = frozenset({BUNDLE_SUMS, BUNDLE_SUMS + SIGNATURE_SUFFIX})
# glibc 2.35 (Ubuntu 22.04) and newer, which includes Debian 12 (2.36), the images' base: some locked wheels exist
# for no older glibc (llguidance 1.7.6: manylinux_2_31 at the oldest).
DEFAULT_PLATFORM = "manylinux_2_35_x86_64"
DEFAULT_PYTHON = "3.11"


@dataclass(frozen=True)
class BundleOptions:
    out: Path
    model: Path | None
    wheels: bool
    engine: str  # "cpu" | "gpu" | "none": which engine extra the wheelhouse holds (none: the gateway's wheels only)
    platform: str
    python_version: str
    project: Path
    index_url: str = "https://pypi.org/simple"  # the package index (or the site's mirror of it) pip downloads from


def _uv(project: Path) -> str:
    local = project / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        raise ConfigError("uv is needed to read the lock file (run `make install` in the checkout)")
    return found


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ConfigError(f"{Path(argv[0]).name} {argv[1]} failed:\n{tail}")


# pip's platform tags (PEP 600): a wheel built for an older glibc (manylinux_2_17, alias manylinux2014) installs on a
# newer one, and `pip download --platform` matches only the tags it is given ("pip download" docs: "the option can be
# used multiple times"), so the target's tag is given with every older manylinux tag down to 2_17.
_MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(\w+)$")
_OLDEST_MANYLINUX = 17
PYPI = "https://pypi.org/simple"


def platform_tags(platform: str) -> list[str]:
    """The target tag and every older manylinux tag it accepts (newest first), e.g. manylinux_2_28 .. 2_17, 2014."""
    match = _MANYLINUX.match(platform)
    if match is None or int(match.group(1)) < _OLDEST_MANYLINUX:
        return [platform]
    glibc_minor, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, _OLDEST_MANYLINUX - 1, -1)]
    return [*tags, f"manylinux2014_{arch}"]


_LINUX_TAG = re.compile(r"^(?:manylinux|musllinux|linux)(?:_\d+_\d+|\d+)?_(\w+)$")


def target_environment(platform: str, python_version: str) -> dict[str, str]:
    """The PEP 508 marker values of the target machine (a Linux wheel platform tag, a CPython version).

    Needed because pip evaluates a requirement's markers against the interpreter running it, not against
    ``--python-version``/``--platform`` ("Ignoring six: markers 'python_full_version >= \"3.12\"' don't match your
    environment" on a 3.11 build host): a 3.12 bundle would get the 3.11 set (uv.lock: networkx 3.6.1 below 3.12,
    3.7 from it, six only from it) and fail to install on the target."""
    match = _LINUX_TAG.match(platform)
    if match is None:
        raise ConfigError(f"--platform {platform}: a Linux wheel tag is needed, e.g. {DEFAULT_PLATFORM}")
    if re.fullmatch(r"3\.\d+(\.\d+)?", python_version) is None:
        raise ConfigError(f"--python-version {python_version}: a CPython version is needed, e.g. 3.12")
    full = python_version if python_version.count(".") == 2 else f"{python_version}.0"
    return {"python_version": ".".join(python_version.split(".")[:2]), "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full,
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": match.group(1), "platform_release": "", "platform_version": "",
            "extra": ""}


def for_target(requirements: str, environment: dict[str, str]) -> str:
    """uv's universal requirements (``name==version ; marker`` with ``--hash`` continuation lines) reduced to the
    target's: a requirement whose marker is false there is dropped with its lines, a true marker is removed. The
    wheelhouse, the SBOM and the install then all hold the same set (PEP 508 markers, evaluated by ``packaging``)."""
    from packaging.markers import Marker  # the bundle runs from a checkout (make install); the images need none

    kept: list[str] = []
    keep = True
    for line in requirements.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            continued = line.endswith("\\")
            spec, _, marker = line.removesuffix("\\").partition(";")
            keep = not marker.strip() or Marker(marker.strip()).evaluate(environment)
            line = spec.rstrip() + (" \\" if continued else "")
        elif line.startswith("#"):
            keep = True
        if keep:
            kept.append(line)
    return "\n".join(kept) + "\n"


def isolated_pip_env() -> dict[str, str]:
    """The environment for pip without this machine's pip settings: no PIP_* variable (find-links, extra indexes,
    constraints of a build host must not decide what an air-gapped site receives) and no configuration file
    (pip's docs, "Configuration": PIP_CONFIG_FILE=os.devnull loads none)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def write_sbom(requirements: Path, project: Path, target: Path) -> None:
    """A CycloneDX SBOM (JSON) of locked requirements, by CycloneDX's own tool (cyclonedx-bom's `cyclonedx-py`),
    with Airlock as the root component; reproducible (SOURCE_DATE_EPOCH is honoured as its timestamp)."""
    tool = Path(sys.executable).with_name("cyclonedx-py")
    found = str(tool) if tool.exists() else shutil.which("cyclonedx-py")
    if found is None:
        raise ConfigError("cyclonedx-py (PyPI cyclonedx-bom) is needed for the SBOM (run `make install`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _run([found, "requirements", str(requirements), "--pyproject", str(project / "pyproject.toml"),
          "--output-reproducible", "--of", "JSON", "--output-file", str(target)], project)


def gather_wheels(options: BundleOptions) -> None:
    """Locked requirements (with hashes) for the target, their wheels, Airlock's own wheel, and their SBOMs.

    ``engine="none"`` gathers the gateway's share alone (what the gateway image needs: no vLLM, no torch)."""
    project, out = options.project, options.out
    if not (project / "uv.lock").exists():
        raise ConfigError(f"{project} is not an Airlock checkout (no uv.lock): bundle from the source tree")
    uv = _uv(project)
    # Everything (the engine too), and the gateway's share alone (its image needs no vLLM and no torch).
    requirements, gateway = out / "requirements.txt", out / "requirements-gateway.txt"
    # --no-header: uv's header names the output path, here the hidden directory the bundle is built in.
    export = [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-header", "--format", "requirements-txt"]
    engine = [] if options.engine == "none" else ["--extra", options.engine]
    _run([*export, *engine, "--output-file", str(requirements)], project)
    _run([*export, "--output-file", str(gateway)], project)
    environment = target_environment(options.platform, options.python_version)
    for listed in (requirements, gateway):
        listed.write_text(for_target(listed.read_text(), environment))
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _run([uv, "build", "--wheel", "--out-dir", str(wheels)], project)
    platforms = [arg for tag in platform_tags(options.platform) for arg in ("--platform", tag)]
    # --no-deps: uv resolved the lock completely; a second resolution by pip would add packages outside it
    # (intel-openmp names intel-cmplr-lib-ur, which the lock does not hold for this target).
    _run([sys.executable, "-m", "pip", "--isolated", "download", "--require-hashes", "--no-deps", "--only-binary=:all:",
          "--index-url", options.index_url, *platforms, "--python-version", options.python_version,
          "--implementation", "cp", "--dest", str(wheels), "-r", str(requirements)], project, isolated_pip_env())
    write_sbom(gateway, project, out / "sbom" / "gateway.cdx.json")
    if options.engine != "none":
        write_sbom(requirements, project, out / "sbom" / f"engine-{options.engine}.cdx.json")


def copy_model(model: Path, out: Path, progress: Callable[[int], None] | None = None,
               sign_key: Ed25519PrivateKey | None = None) -> Path:
    """The model's files, with a manifest written from the copy (what will travel is what is hashed). Links that
    stay inside are recreated as relative links; anything else that is not a regular file stops the copy, by name,
    before a byte is copied."""
    model = model.resolve()
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model} is not a model directory (no config.json)")
    target = out / "models" / model.name
    if target.exists():
        raise ConfigError(f"{target} already exists: bundle into an empty directory")
    try:
        found = scan(model, MANIFEST_FILES)
        refuse_unsafe(found, model)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc
    target.mkdir(parents=True)
    for name in found.directories:
        (target / name).mkdir()
    for name, relative in found.links.items():
        os.symlink(relative, target / name)
    for name, source in found.files.items():
        if name not in found.links:
            try:
                _copy_regular(source, target / name)
            except OSError as exc:  # swapped for something else since the scan
                raise ConfigError(f"cannot copy {source}: {exc.strerror}") from exc
    try:
        manifest = write_manifest(target, progress)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc
    if sign_key is not None:
        sign(sign_key, target / MANIFEST_NAME, manifest)
    return target


def _copy_regular(source: Path, destination: Path) -> None:
    """Copy one file, opened once without following a link, refused unless regular."""
    with open_regular(source) as reader, destination.open("xb") as writer:
        shutil.copyfileobj(reader, writer, 8 * 1024 * 1024)
    shutil.copystat(source, destination, follow_symlinks=False)


def write_sums(out: Path, sign_key: Ed25519PrivateKey | None = None) -> Path:
    """SHA256SUMS over every file of the bundle, for `sha256sum -c` on the far side (and its signature)."""
    try:
        found = scan(out, BUNDLE_SUMS_FILES)
        refuse_unsafe(found, out)
        data = write_listing(out / BUNDLE_SUMS, found)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc
    if sign_key is not None:
        sign(sign_key, out / BUNDLE_SUMS, data)
    return out / BUNDLE_SUMS


def check_out(out: Path, model: Path | None) -> None:
    """``--out`` must not exist yet, or be an empty directory (it is replaced whole at the end); it must not hold the
    current directory (renaming onto it fails, or strands the shell in a deleted directory) nor lie inside the model
    (the model would carry the half-built bundle)."""
    if Path.cwd().is_relative_to(os.path.abspath(out)):
        raise ConfigError(f"--out {out} is the current directory or holds it: name a new directory")
    if model is not None and out.resolve().is_relative_to(model.resolve()):
        raise ConfigError(f"--out {out} is inside the model directory {model}: bundle next to it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: bundle into a new or empty directory")


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP end the bundle as Ctrl-C does: through the clean-up below (exit status 128 + signal, as a
    shell reports a process killed by it)."""
    raise SystemExit(128 + signum)


def make_bundle(options: BundleOptions, progress: Callable[[int], None] | None = None,
                sign_key: Path | None = None) -> dict[str, object]:
    """Build the bundle in a hidden sibling of ``options.out`` and rename it into place when all of it is written."""
    check_out(options.out, options.model)
    final = Path(os.path.abspath(options.out))  # "--out dir/.." has no name to make a sibling of
    try:
        key = load_private_key(sign_key) if sign_key is not None else None  # a bad key fails before any work
    except SignatureError as exc:
        raise ConfigError(str(exc)) from exc
    final.parent.mkdir(parents=True, exist_ok=True)
    building = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
    handlers = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    building.mkdir()
    try:
        description = _fill(options, building, progress, key)
        try:
            os.rename(building, final)  # replaces an empty directory
        except OSError as exc:
            raise ConfigError(f"--out {options.out}: {exc.strerror} (did another bundle write it meanwhile?)") from exc
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return description


def _fill(options: BundleOptions, out: Path, progress: Callable[[int], None] | None,
          key: Ed25519PrivateKey | None) -> dict[str, object]:
    options = replace(options, out=out)
    if options.wheels:
        gather_wheels(options)
    model = copy_model(options.model, out, progress, key) if options.model is not None else None
    # What installing needs on the far side: the systemd units, Containerfiles, dashboards and the Helm chart.
    # Links are copied as links (symlinks=True): write_sums refuses any that leads out of the bundle.
    for carried in ("deploy", "helm"):
        if (options.project / carried).is_dir():
            shutil.copytree(options.project / carried, out / carried, symlinks=True, dirs_exist_ok=True)
    description: dict[str, object] = {
        "platform": options.platform, "python": options.python_version, "engine": options.engine,
        "wheels": options.wheels, "model": str(model.relative_to(out)) if model else None,
        "signed": key is not None,
    }
    (out / "bundle.json").write_text(json.dumps(description, indent=2) + "\n")
    write_sums(out, key)
    return description


def verify_bundle(bundle: Path, public_key: Ed25519PublicKey) -> Verification:
    """``SHA256SUMS.sig`` first, then every checksum, nothing unlisted, and each carried model's manifest signature.
    A signature that fails raises ``SignatureError`` naming the file."""
    listed = read_listing(bundle / BUNDLE_SUMS, public_key)
    result = check_listed(bundle, listed, BUNDLE_SUMS_FILES)
    models = bundle / "models"
    if result.ok and models.is_dir() and not models.is_symlink():
        for model in sorted(models.iterdir()):
            if (model / MANIFEST_NAME).is_file():
                read_listing(model / MANIFEST_NAME, public_key)
    return result
