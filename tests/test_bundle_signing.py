"""Signed bundles and what a model directory may hold, through the real `airlock` command: every tampering and every
link or special file that could change what vLLM loads after the check is refused by name; nothing outside a model
directory is carried across; a failed bundle leaves nothing behind; the engine refuses a manifest its key did not
sign. OpenSSL and sha256sum check the same files as a second opinion."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.manifest import MANIFEST_NAME

from .conftest import AIRLOCK, ROOT, write_config

# A FIFO opened for reading blocks until a writer comes: a check that opens one hangs, and this timeout fails it.
FIFO_TIMEOUT_S = 60


def airlock(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The site's key pair and another one (an attacker's, or last year's), made by `airlock keygen`."""
    directory = tmp_path_factory.mktemp("keys")
    made: dict[str, Path] = {}
    for who in ("site", "other"):
        made[who], made[f"{who}.pub"] = directory / f"{who}.key", directory / f"{who}.pub"
        result = airlock("keygen", "--out-key", str(made[who]), "--out-public", str(made[f"{who}.pub"]))
        assert result.returncode == 0, output(result)
    return made


@pytest.fixture(scope="module")
def signed_bundle(demo_model_dir: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "bundle"  # does not exist yet: the bundle is renamed into place
    made = airlock("bundle", "--out", str(out), "--model", str(demo_model_dir), "--no-wheels",
                   "--sign-key", str(keys["site"]))
    assert made.returncode == 0, output(made)
    return out


@pytest.fixture
def bundle_copy(signed_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(signed_bundle, copy, symlinks=True)
    return copy


@pytest.fixture
def model_copy(signed_bundle: Path, demo_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / demo_model_dir.name
    shutil.copytree(signed_bundle / "models" / demo_model_dir.name, copy, symlinks=True)
    return copy


def test_keygen_keeps_the_private_key_to_its_owner_and_never_overwrites(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(keys["site"].stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(keys["site"].read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    public = keys["site.pub"].read_bytes()
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    before = keys["site"].read_bytes()
    again = airlock("keygen", "--out-key", str(keys["site"]), "--out-public", str(keys["site.pub"]))
    assert again.returncode == 1 and f"{keys['site']} already exists" in again.stderr
    assert keys["site"].read_bytes() == before and keys["site.pub"].read_bytes() == public
    assert "PRIVATE KEY" not in output(again)


def test_a_signed_bundle_verifies_and_openssl_and_sha256sum_agree(
    signed_bundle: Path, demo_model_dir: Path, keys: dict[str, Path],
) -> None:
    result = airlock("verify-bundle", str(signed_bundle), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 0 and result.stdout.startswith("ok: SHA256SUMS signed by"), output(result)
    model = signed_bundle / "models" / demo_model_dir.name
    result = airlock("verify-model", str(model), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 0 and "signature verifies" in result.stdout, output(result)
    for directory, signed in ((signed_bundle, "SHA256SUMS"), (model, MANIFEST_NAME)):
        checked = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys["site.pub"]),
                                  "-rawin", "-in", signed, "-sigfile", f"{signed}.sig"],
                                 cwd=directory, capture_output=True, text=True)
        assert checked.returncode == 0 and "Signature Verified Successfully" in checked.stdout, output(checked)
        checked = subprocess.run(["sha256sum", "--check", "--strict", signed], cwd=directory, capture_output=True,
                                 text=True)
        assert checked.returncode == 0, output(checked)


def test_a_signature_from_another_key_is_refused(signed_bundle: Path, demo_model_dir: Path,
                                                 keys: dict[str, Path]) -> None:
    result = airlock("verify-bundle", str(signed_bundle), "--public-key", str(keys["other.pub"]))
    assert result.returncode == 1 and "SHA256SUMS.sig does not verify" in result.stderr, output(result)
    model = signed_bundle / "models" / demo_model_dir.name
    result = airlock("verify-model", str(model), "--public-key", str(keys["other.pub"]))
    assert result.returncode == 1 and f"{MANIFEST_NAME}.sig does not verify" in result.stderr, output(result)


def test_altered_sha256sums_is_refused(bundle_copy: Path, keys: dict[str, Path]) -> None:
    # Someone changes a file and writes its new checksum into SHA256SUMS: the checksums agree, the signature not.
    sums = bundle_copy / "SHA256SUMS"
    (bundle_copy / "bundle.json").write_text('{"wheels": true}\n')
    digest = subprocess.run(["sha256sum", "bundle.json"], cwd=bundle_copy, capture_output=True, text=True,
                            check=True).stdout
    sums.write_text("".join(digest if line.endswith("  bundle.json") else f"{line}\n"
                            for line in sums.read_text().splitlines()))
    assert subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=bundle_copy,
                          capture_output=True).returncode == 0  # checksums alone are fooled
    result = airlock("verify-bundle", str(bundle_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1 and "SHA256SUMS.sig does not verify" in result.stderr, output(result)


def test_a_missing_bundle_signature_is_refused(bundle_copy: Path, keys: dict[str, Path]) -> None:
    (bundle_copy / "SHA256SUMS.sig").unlink()
    result = airlock("verify-bundle", str(bundle_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1 and "SHA256SUMS.sig is missing" in result.stderr, output(result)


def test_a_changed_and_an_unlisted_file_in_the_bundle_are_named(bundle_copy: Path, keys: dict[str, Path]) -> None:
    (bundle_copy / "bundle.json").write_text('{"wheels": true}\n')
    (bundle_copy / "deploy" / "extra.sh").write_text("#!/bin/sh\n")
    result = airlock("verify-bundle", str(bundle_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1, output(result)
    assert "changed: bundle.json" in result.stdout and "not in SHA256SUMS: deploy/extra.sh" in result.stdout


def test_an_altered_manifest_with_a_valid_looking_signature_is_refused(model_copy: Path,
                                                                       keys: dict[str, Path]) -> None:
    # The weights changed, the manifest rewritten to match them and signed, but not with the site's key.
    weights = next(model_copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    manifest = model_copy / MANIFEST_NAME
    digest = subprocess.run(["sha256sum", weights.name], cwd=model_copy, capture_output=True, text=True,
                            check=True).stdout
    manifest.write_text("".join(digest if line.endswith(f"  {weights.name}") else f"{line}\n"
                                for line in manifest.read_text().splitlines()))
    other = serialization.load_pem_private_key(keys["other"].read_bytes(), password=None)
    assert isinstance(other, Ed25519PrivateKey)
    (model_copy / f"{MANIFEST_NAME}.sig").write_bytes(other.sign(manifest.read_bytes()))
    assert airlock("verify-model", str(model_copy)).returncode == 0  # without a key, it looks fine
    result = airlock("verify-model", str(model_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1 and f"{MANIFEST_NAME}.sig does not verify" in result.stderr, output(result)
    (model_copy / f"{MANIFEST_NAME}.sig").unlink()
    result = airlock("verify-model", str(model_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1 and f"{MANIFEST_NAME}.sig is missing" in result.stderr, output(result)


def _special(kind: str, path: Path) -> Iterator[None]:
    if kind == "fifo":
        os.mkfifo(path)
        yield
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            yield
    else:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers (needs CAP_MKNOD: root here)
        yield


@pytest.mark.parametrize(("kind", "why"), [
    ("outside-link", "a symlink to outside the directory"),
    ("dangling-link", "a dangling symlink"),
    ("fifo", "a FIFO"),
    ("socket", "a socket"),
    ("device", "a device file"),
])
def test_verify_model_refuses_links_out_and_special_files_by_name(
    model_copy: Path, tmp_path: Path, kind: str, why: str,
) -> None:
    """A listed file replaced: even a link to an outside file with the very same bytes (it can change after the
    check), and never opened (a FIFO would hang the check)."""
    listed = model_copy / "tokenizer.json"
    outside = tmp_path / "outside.json"
    shutil.move(listed, outside)
    if kind == "outside-link":
        listed.symlink_to(outside)
        assert subprocess.run(["sha256sum", "--check", "--strict", MANIFEST_NAME], cwd=model_copy,
                              capture_output=True).returncode == 0  # sha256sum follows it and is satisfied
    elif kind == "dangling-link":
        listed.symlink_to(tmp_path / "gone.json")
    special = _special(kind, listed) if kind in ("fifo", "socket", "device") else iter([None])
    next(special)
    result = airlock("verify-model", str(model_copy), timeout=FIFO_TIMEOUT_S)
    assert result.returncode == 1, output(result)
    assert f"refused: tokenizer.json ({why})" in result.stdout, output(result)
    assert "missing: tokenizer.json" not in result.stdout
    next(special, None)


@pytest.fixture
def source_model(demo_model_dir: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source" / demo_model_dir.name
    shutil.copytree(demo_model_dir, source)
    return source


def test_a_link_that_stays_inside_is_carried_as_a_link_and_verifies(
    source_model: Path, keys: dict[str, Path], tmp_path: Path,
) -> None:
    # As a Hugging Face snapshot does, with an absolute link: the copy's link is relative and stays inside.
    (source_model / "blobs").mkdir()
    shutil.move(source_model / "tokenizer.json", source_model / "blobs" / "tokenizer")
    (source_model / "tokenizer.json").symlink_to(source_model / "blobs" / "tokenizer")
    out = tmp_path / "out"
    made = airlock("bundle", "--out", str(out), "--model", str(source_model), "--no-wheels",
                   "--sign-key", str(keys["site"]))
    assert made.returncode == 0, output(made)
    model = out / "models" / source_model.name
    assert os.readlink(model / "tokenizer.json") == "blobs/tokenizer"
    assert "  tokenizer.json" in (model / MANIFEST_NAME).read_text()
    result = airlock("verify-model", str(model), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 0 and result.stdout.startswith("ok: "), output(result)
    result = airlock("verify-bundle", str(out), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(("kind", "why"), [
    ("outside-link", "a symlink to outside the directory"),
    ("dangling-link", "a dangling symlink"),
    ("fifo", "a FIFO"),
])
def test_a_failed_bundle_leaves_nothing_and_the_retry_works(
    source_model: Path, tmp_path: Path, kind: str, why: str,
) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the far side")
    odd = source_model / "notes.txt"
    if kind == "outside-link":
        odd.symlink_to(outside)
    elif kind == "dangling-link":
        odd.symlink_to(tmp_path / "gone.txt")
    else:
        os.mkfifo(odd)
    parent = tmp_path / "media"
    parent.mkdir()
    out = parent / "bundle"
    failed = airlock("bundle", "--out", str(out), "--model", str(source_model), "--no-wheels",
                     timeout=FIFO_TIMEOUT_S)
    assert failed.returncode == 2 and f"notes.txt ({why})" in failed.stderr, output(failed)
    assert list(parent.iterdir()) == []  # no bundle, no half-written hidden sibling
    odd.unlink()
    retried = airlock("bundle", "--out", str(out), "--model", str(source_model), "--no-wheels")
    assert retried.returncode == 0, output(retried)
    assert [path.name for path in parent.iterdir()] == ["bundle"]
    assert not any("not for the far side" in path.read_text(errors="replace")
                   for path in out.rglob("*") if path.is_file())


def test_bundle_refuses_an_out_directory_that_is_not_empty(source_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = airlock("bundle", "--out", str(out), "--model", str(source_model), "--no-wheels")
    assert result.returncode == 2 and "is not empty" in result.stderr, output(result)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = airlock("bundle", "--out", str(empty), "--model", str(source_model), "--no-wheels")
    assert result.returncode == 0 and (empty / "SHA256SUMS").is_file(), output(result)


def _engine(model: Path, tmp_path: Path, **engine: object) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "engine.yaml", {"engine": {
        "model": str(model), "profile": "airlock-demo", "device": "cpu", "socket_dir": str(tmp_path / "sockets"),
        **engine,
    }})
    return airlock("engine", "--config", str(config))


def test_the_engine_refuses_a_manifest_its_key_did_not_sign(model_copy: Path, keys: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """engine.manifest_public_key: the check runs before vLLM is started, so a refusal starts nothing."""
    result = _engine(model_copy, tmp_path, manifest_public_key=str(keys["other.pub"]))
    assert result.returncode == 2, output(result)
    assert f"{MANIFEST_NAME}.sig does not verify" in result.stderr and "refusing to start it" in result.stderr
    assert "vllm" not in result.stderr.lower().replace("airlock", "")  # nothing was started
    (model_copy / f"{MANIFEST_NAME}.sig").unlink()
    result = _engine(model_copy, tmp_path, manifest_public_key=str(keys["site.pub"]))
    assert result.returncode == 2 and f"{MANIFEST_NAME}.sig is missing" in result.stderr, output(result)


def test_the_engine_with_a_key_refuses_a_model_without_a_manifest(source_model: Path, keys: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    # verify_model stays at its default, if_present: the key alone asks for a signed manifest.
    result = _engine(source_model, tmp_path, manifest_public_key=str(keys["site.pub"]))
    assert result.returncode == 2, output(result)
    assert f"engine.manifest_public_key is set and {source_model} has no {MANIFEST_NAME}" in result.stderr


def test_a_key_with_the_check_switched_off_is_a_configuration_error(keys: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"engine": {"verify_model": "off",
                                                           "manifest_public_key": str(keys["site.pub"])}})
    result = airlock("config", "--config", str(config))
    assert result.returncode == 2 and "engine.manifest_public_key is set but engine.verify_model is 'off'" \
        in result.stderr, output(result)


# Names sha256sum would escape (a line break), a terminal would obey (an escape sequence), Python's splitlines breaks
# (U+2028), or that are not UTF-8: the manifest cannot hold them as they are, and printing them is not safe.
ODD_NAMES = [b"a\nb.json", b"a\x1b[31mred.json", "a\u2028b.json".encode(), b"a\xffb.json"]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["newline", "escape", "line-separator", "not-utf8"])
def test_names_that_a_listing_cannot_hold_are_refused_escaped(model_copy: Path, source_model: Path,
                                                               tmp_path: Path, name: bytes) -> None:
    shown = ascii(os.fsdecode(name))[1:-1]
    with open(os.fsencode(model_copy) + b"/" + name, "wb") as added:
        added.write(b"{}")
    result = airlock("verify-model", str(model_copy))
    assert result.returncode == 1 and f"refused: {shown} (a name that is not printable text" in result.stdout, \
        output(result)
    assert "\x1b" not in output(result)
    with open(os.fsencode(source_model) + b"/" + name, "wb") as added:
        added.write(b"{}")
    out = tmp_path / "media" / "bundle"
    failed = airlock("bundle", "--out", str(out), "--model", str(source_model), "--no-wheels")
    assert failed.returncode == 2 and f"{shown} (a name that is not printable text" in failed.stderr, output(failed)
    assert "Traceback" not in failed.stderr and list(out.parent.iterdir()) == []


def test_a_manifest_that_lists_a_file_twice_is_refused(model_copy: Path) -> None:
    manifest = model_copy / MANIFEST_NAME
    manifest.write_text(f"{'0' * 64}  config.json\n" + manifest.read_text())
    result = airlock("verify-model", str(model_copy))
    assert result.returncode == 1 and "config.json is listed twice" in result.stderr, output(result)


def _configmap_mount(key: Path, directory: Path) -> Path:
    """How the kubelet mounts a ConfigMap key: <dir>/<key> -> ..data/<key>, ..data -> ..<timestamp> (atomic updates;
    see the Kubernetes docs, 'Mounted ConfigMaps are updated automatically', and pkg/volume/util/atomic_writer.go)."""
    (directory / "..2024_01_01_00_00_00.1").mkdir(parents=True)
    shutil.copy(key, directory / "..2024_01_01_00_00_00.1" / key.name)
    (directory / "..data").symlink_to("..2024_01_01_00_00_00.1")
    (directory / key.name).symlink_to(f"..data/{key.name}")
    return directory / key.name


def test_keys_mounted_as_kubernetes_does_are_read_through_their_links(
    signed_bundle: Path, model_copy: Path, keys: dict[str, Path], tmp_path: Path,
) -> None:
    public = _configmap_mount(keys["site.pub"], tmp_path / "configmap")
    result = airlock("verify-bundle", str(signed_bundle), "--public-key", str(public))
    assert result.returncode == 0, output(result)
    other = _configmap_mount(keys["other.pub"], tmp_path / "other")
    result = _engine(model_copy, tmp_path, manifest_public_key=str(other))
    assert result.returncode == 2 and f"{MANIFEST_NAME}.sig does not verify" in result.stderr, output(result)
    (tmp_path / "secret").mkdir()
    private = _configmap_mount(keys["site"], tmp_path / "secret")
    made = airlock("bundle", "--out", str(tmp_path / "b"), "--model", str(model_copy), "--no-wheels",
                   "--sign-key", str(private))
    assert made.returncode == 0, output(made)


def test_a_directory_where_a_key_or_signature_belongs_is_named(bundle_copy: Path, keys: dict[str, Path],
                                                                tmp_path: Path) -> None:
    result = airlock("verify-bundle", str(bundle_copy), "--public-key", str(tmp_path))
    assert result.returncode == 1, output(result)
    assert f"cannot read the public key {tmp_path}: not a regular file (a directory)" in result.stderr
    (bundle_copy / "SHA256SUMS.sig").unlink()
    (bundle_copy / "SHA256SUMS.sig").mkdir()
    result = airlock("verify-bundle", str(bundle_copy), "--public-key", str(keys["site.pub"]))
    assert result.returncode == 1, output(result)
    assert "SHA256SUMS.sig: not a regular file (a directory)" in result.stderr


def test_bundle_refuses_an_out_inside_the_model(source_model: Path) -> None:
    result = airlock("bundle", "--out", str(source_model / "bundle"), "--model", str(source_model), "--no-wheels")
    assert result.returncode == 2 and "is inside the model directory" in result.stderr, output(result)
    assert not [path for path in source_model.iterdir() if "bundle" in path.name]


def test_bundle_into_the_current_directory(source_model: Path, tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    result = subprocess.run([*AIRLOCK, "bundle", "--out", ".", "--model", str(source_model), "--no-wheels"],
                            cwd=here, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--out . is the current directory" in result.stderr, output(result)
    assert list(here.iterdir()) == []


def test_a_bundle_stopped_with_sigterm_leaves_nothing(source_model: Path, tmp_path: Path) -> None:
    """SIGTERM is what kill, timeout(1) and systemd send: the hidden sibling is removed as on Ctrl-C."""
    with (source_model / "large.bin").open("wb") as large:
        large.truncate(2 * 1024**3)  # sparse: copying and hashing it takes seconds
    parent = tmp_path / "media"
    parent.mkdir()
    process = subprocess.Popen([*AIRLOCK, "bundle", "--out", str(parent / "bundle"), "--model", str(source_model),
                                "--no-wheels"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(600):
        if any(parent.glob(".bundle.partial-*/models/*/large.bin")):
            break
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    else:
        pytest.fail("the bundle never started copying")
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert list(parent.iterdir()) == []


def test_keygen_and_sign_key_mistakes_get_plain_answers(keys: dict[str, Path], demo_model_dir: Path,
                                                        tmp_path: Path) -> None:
    """What a newcomer mistypes: a directory that does not exist, one name for both files, the public key given as
    the signing key (told what it is, not to chmod it)."""
    missing = airlock("keygen", "--out-key", str(tmp_path / "no" / "k.key"), "--out-public", str(tmp_path / "k.pub"))
    assert missing.returncode == 1 and f"{tmp_path / 'no'} is not a directory" in missing.stderr, output(missing)
    assert "Errno" not in output(missing) and not (tmp_path / "k.pub").exists()
    same = airlock("keygen", "--out-key", str(tmp_path / "same"), "--out-public", str(tmp_path / "same"))
    assert same.returncode == 1 and "are the same file" in same.stderr and not (tmp_path / "same").exists()
    wrong = airlock("bundle", "--out", str(tmp_path / "b"), "--model", str(demo_model_dir), "--no-wheels",
                    "--sign-key", str(keys["site.pub"]))
    assert wrong.returncode != 0 and "that is the public half" in wrong.stderr, output(wrong)
    assert "chmod" not in wrong.stderr and not (tmp_path / "b").exists()


def test_engine_dry_run_checks_the_manifest_public_key(source_model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "engine.yaml", {"engine": {
        "model": str(source_model), "profile": "airlock-demo", "device": "cpu",
        "manifest_public_key": str(tmp_path / "absent.pub"),
    }})
    result = airlock("engine", "--config", str(config), "--dry-run")
    assert result.returncode != 0 and "engine.manifest_public_key: cannot read the public key" in result.stderr, \
        output(result)
