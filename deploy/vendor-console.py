"""Fetch the console's vendored libraries again and check them against server/console_static/vendor/manifest.json.

The console renders answers as markdown with `marked` and sanitizes the HTML with `DOMPurify`, both served by the
gateway itself (no CDN). The manifest pins each package's version and the npm registry's integrity (sha512 of the
package tarball, as `npm view NAME@VERSION dist.integrity` shows) and the sha256 of every file taken from it. This
script reads the version's metadata from the npm registry (``NPM_CONFIG_REGISTRY``, default
https://registry.npmjs.org: a site's mirror works too), downloads its tarball in memory (no npm client needed:
Debian's nodejs has none), checks the tarball's sha512 against the registry's integrity and the manifest, takes the
listed files out of it in memory, checks their sha256, and writes them; any mismatch stops it before anything is
written.

To move to another version: edit the version in the manifest, run with ``--update`` (records the new integrity and
sha256 values), read the diff of the vendored files, and run the console tests.

Run: ``make vendor-console`` (or ``python deploy/vendor-console.py [--update]``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

VENDOR = Path(__file__).resolve().parent.parent / "server" / "console_static" / "vendor"
MANIFEST = VENDOR / "manifest.json"


def pack(name: str, version: str) -> bytes:
    """The package's tarball from the registry, checked against the integrity the registry publishes for it
    (the npm registry's version document, ``dist.integrity`` and ``dist.tarball``)."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    try:
        with urllib.request.urlopen(f"{registry}/{name}/{version}", timeout=60) as answer:
            dist = json.load(answer)["dist"]
        with urllib.request.urlopen(dist["tarball"], timeout=120) as answer:
            tarball: bytes = answer.read()
    except (OSError, KeyError, ValueError) as error:
        sys.exit(f"{name}@{version} could not be fetched from {registry}: {error}")
    if integrity(tarball) != dist.get("integrity"):
        sys.exit(f"{name}@{version}: the tarball does not match the registry's own integrity")
    return tarball


def integrity(tarball: bytes) -> str:
    """Subresource-integrity form of the tarball's sha512, as the npm registry publishes it."""
    return "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()


def vendor(package: dict[str, Any], update: bool) -> dict[str, bytes]:
    name, version = package["name"], package["version"]
    tarball = pack(name, version)
    found = integrity(tarball)
    if update:
        package["integrity"] = found
    elif found != package["integrity"]:
        sys.exit(f"{name}@{version}: the tarball's integrity is {found}, the manifest says {package['integrity']}")
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for entry in package["files"]:
            member = archive.extractfile(entry["from"])
            if member is None:
                sys.exit(f"{name}@{version}: {entry['from']} is not a file in the package")
            data = member.read()
            digest = hashlib.sha256(data).hexdigest()
            if update:
                entry["sha256"] = digest
            elif digest != entry["sha256"]:
                sys.exit(f"{name}@{version}: {entry['from']} has sha256 {digest}, the manifest says {entry['sha256']}")
            files[entry["file"]] = data
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true",
                        help="record the fetched versions' integrity and sha256 values in the manifest")
    args = parser.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    files: dict[str, bytes] = {}
    for package in manifest["packages"]:
        files |= vendor(package, args.update)
    for file_name, data in files.items():
        (VENDOR / file_name).write_bytes(data)
        print(f"{file_name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if args.update:
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{MANIFEST.name} updated")
    stale = sorted(path.name for path in VENDOR.iterdir() if path.name not in files and path != MANIFEST)
    if stale:
        sys.exit(f"files in {VENDOR} that the manifest does not list: {', '.join(stale)}")


if __name__ == "__main__":
    main()
