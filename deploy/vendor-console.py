"""Fetch the console's vendored libraries again and check them against server/console_static/vendor/manifest.json.

The console renders answers as markdown with `marked` and sanitizes the HTML with `DOMPurify`, both served by the
gateway itself (no CDN). The manifest pins each package's version and the npm registry's integrity (sha512 of the
package tarball, as `npm view NAME@VERSION dist.integrity` shows) and the sha256 of every file taken from it. This
script runs `npm pack NAME@VERSION` (npm itself checks the tarball against the registry's integrity), checks the
tarball's sha512 against the manifest, takes the listed files out of it in memory, checks their sha256, and writes
them; any mismatch stops it before anything is written.

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
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

VENDOR = Path(__file__).resolve().parent.parent / "server" / "console_static" / "vendor"
MANIFEST = VENDOR / "manifest.json"


def pack(name: str, version: str) -> bytes:
    """The package's tarball, as the npm client fetches and verifies it."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is needed (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as directory:
        made = subprocess.run(
            [npm, "pack", f"{name}@{version}", "--ignore-scripts", "--json", "--pack-destination", directory],
            capture_output=True, text=True, check=False,
        )
        if made.returncode != 0:
            sys.exit(f"npm pack {name}@{version} failed:\n{made.stderr.strip()}")
        (packed,) = json.loads(made.stdout)
        return (Path(directory) / str(packed["filename"])).read_bytes()


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
