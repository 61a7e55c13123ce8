"""The ``airlock`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import runtime
from .audit import AuditError
from .cli_auth import CommandError, SecretSafeParser
from .cli_auth import add_commands as add_auth_commands
from .config import ConfigError, Settings, load_settings
from .logs import configure_logging
from .supervisor import EngineStartFailed

if TYPE_CHECKING:
    from .runner import EnginesPlan

EXIT_CONFIG = 2
# Every engine replica was given up (engine.max_start_attempts): a service manager must not start it all again.
EXIT_ENGINES_GAVE_UP = 3


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    gateway = {key: value for key in ("host", "port") if (value := getattr(args, key, None)) is not None}
    if gateway:
        overrides["gateway"] = gateway
    engine = {key: value for key in ("model", "replicas") if (value := getattr(args, key, None)) is not None}
    if getattr(args, "tensor_parallel", None) is not None:
        engine["tensor_parallel_size"] = args.tensor_parallel
    if engine:
        overrides["engine"] = engine
    return load_settings(args.config, **overrides)


def _cmd_up(args: argparse.Namespace) -> None:
    from .runner import run_up

    settings = _settings(args)
    settings.check_own_engines()
    _configure_logging(settings)
    runtime.run(run_up(settings))


def _cmd_engine(args: argparse.Namespace) -> None:
    from .runner import plan_engines, run_engines, runtime_directory

    settings = _settings(args)
    _configure_logging(settings)
    if args.dry_run:
        if settings.engine.manifest_public_key is not None:  # the key, not the model's files: that is the start's
            from .signing import SignatureError, load_public_key

            try:
                load_public_key(settings.engine.manifest_public_key)
            except SignatureError as exc:
                raise CommandError(f"engine.manifest_public_key: {exc}") from exc
        with runtime_directory(settings) as runtime_dir:
            planned = plan_engines(settings, runtime_dir)
        print(json.dumps(_dry_run(planned), indent=2))
        return
    asyncio.run(run_engines(settings))


def _dry_run(planned: EnginesPlan) -> dict[str, Any]:
    """What `airlock engine --dry-run` prints: the choice, its sizing and every replica's command line."""
    from .engine import PRIVACY_ENV

    choice, plan = planned.choice, planned.plan
    return {
        "model": str(choice.path), "served_model_name": choice.served_name, "demo": choice.is_demo,
        "profile": choice.profile.name, "reason": choice.reason,
        "device": planned.device,
        "gpus": None if planned.gpu_groups is None else [
            [{"device": gpu.device, "name": gpu.name, "total_mib": gpu.total_mib} for gpu in group]
            for group in planned.gpu_groups
        ],
        "sizing": {
            "dtype": plan.dtype, "max_model_len": plan.max_model_len, "max_num_seqs": plan.max_num_seqs,
            "gpu_memory_utilization": plan.gpu_memory_utilization, "kv_cache_tokens_estimate": plan.kv_cache_tokens,
            "max_pixels": plan.max_pixels, "min_pixels": plan.min_pixels,
            "max_images_per_request": plan.max_images_per_request, "reason": plan.reason,
        },
        "replicas": [
            {
                "url": launch.url,
                "argv": shlex.join(launch.argv),
                # Only what Airlock sets; the rest is the caller's own environment.
                "env": {k: v for k, v in launch.env.items()
                        if k in PRIVACY_ENV or k == "VLLM_LOGGING_CONFIG_PATH" or k.startswith(("VLLM_CPU_", "CUDA_"))},
            }
            for launch in planned.launches
        ],
    }


def _cmd_gateway(args: argparse.Namespace) -> None:
    from .runner import run_gateway

    settings = _settings(args)
    _configure_logging(settings)
    runtime.run(run_gateway(settings))


def _cmd_limits_server(args: argparse.Namespace) -> None:
    from .limits_server import run_limits_server

    settings = load_settings(args.config)
    _configure_logging(settings)
    runtime.run(run_limits_server(settings, args.host))


def _cmd_demo_model(args: argparse.Namespace) -> None:
    from .demo_model import build_demo_model, is_built

    if is_built(args.directory) and not args.force:
        print(f"demo model already at {args.directory} (use --force to rebuild)")
        return
    build_demo_model(args.directory)
    print(f"demo model written to {args.directory} (random weights: its answers are noise)")


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit.run import AuditOptions, audit

    if args.attach and args.netns:
        raise CommandError("--attach audits a running stack; --netns starts one: choose one")
    if args.no_wire and args.wire_interface:
        raise CommandError("--no-wire and --wire-interface: choose one")
    if args.wire_max_mb < 1:
        raise CommandError("--wire-max-mb must be at least 1")
    if args.config is not None:
        _settings(args)  # a bad file fails here, before anything is started
    ca_file = args.ca_file or (Path(os.environ["SSL_CERT_FILE"]) if os.environ.get("SSL_CERT_FILE") else None)
    return audit(AuditOptions(
        config=args.config, attach=tuple(args.attach or ()), url=args.url, netns=args.netns,
        inside_netns=args.inside_netns, rounds=args.rounds, start_timeout_s=args.start_timeout, json_path=args.json,
        wire=not args.no_wire, wire_interface=args.wire_interface, wire_max_mb=args.wire_max_mb, ca_file=ca_file,
    ))


def _progress_bar(total: int, description: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, file=sys.stderr,
                disable=None)


def _cmd_verify_model(args: argparse.Namespace) -> int:
    from .manifest import ManifestError, listed_bytes, verify_model
    from .signing import SignatureError, load_public_key

    try:
        public_key = load_public_key(args.public_key) if args.public_key is not None else None
        with _progress_bar(listed_bytes(args.directory), "verifying") as bar:
            result = verify_model(args.directory, bar.update, public_key)
    except (ManifestError, SignatureError) as exc:
        raise CommandError(str(exc)) from exc
    signed = f"; the manifest's signature verifies with {args.public_key}" if args.public_key else ""
    print(("ok: " if result.ok else "MISMATCH: ") + result.summary() + (signed if result.ok else ""))
    return 0 if result.ok else 1


def _cmd_keygen(args: argparse.Namespace) -> None:
    from .signing import SignatureError, generate_keypair

    try:
        generate_keypair(args.out_key, args.out_public)
    except SignatureError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or args.out_key}: {exc.strerror}") from exc
    print(f"signing key written to {args.out_key} (0600: keep it on this machine, never on the transfer medium); "
          f"public key written to {args.out_public} (carry it to the far side separately)")


def _cmd_verify_bundle(args: argparse.Namespace) -> int:
    from .bundle import verify_bundle
    from .manifest import ManifestError
    from .signing import SignatureError, load_public_key

    try:
        result = verify_bundle(args.directory, load_public_key(args.public_key))
    except (ManifestError, SignatureError) as exc:
        raise CommandError(str(exc)) from exc
    if result.ok:
        print(f"ok: SHA256SUMS signed by {args.public_key}; {result.checked} files match it")
        return 0
    print("MISMATCH: " + result.summary().replace("not in the manifest", "not in SHA256SUMS"))
    return 1


def _cmd_bundle(args: argparse.Namespace) -> None:
    from .bundle import BundleOptions, make_bundle
    from .manifest import ManifestError, model_files, total_bytes

    options = BundleOptions(out=args.out, model=args.model, wheels=not args.no_wheels, engine=args.engine,
                            platform=args.platform, python_version=args.python_version, project=args.project,
                            index_url=args.index_url)
    try:
        size = total_bytes(args.model, model_files(args.model)) if args.model else 0
    except ManifestError:
        size = 0  # make_bundle says what is wrong with the directory
    with _progress_bar(size, "hashing the model") as bar:
        description = make_bundle(options, bar.update, sign_key=args.sign_key)
    print(f"bundle written to {args.out}: {json.dumps(description)}")


def _cmd_config(args: argparse.Namespace) -> None:
    settings = _settings(args)
    print(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False), end="")


def _cmd_gpu_table(args: argparse.Namespace) -> None:
    from .profiles import load_profiles
    from .sizing import card_table

    settings = _settings(args)
    print(card_table(load_profiles(settings.engine.profiles_dir), settings.engine,
                     settings.admission.expected_tokens_per_request), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = SecretSafeParser(
        prog="airlock",
        description="Private, multi-user vision-language model server (vLLM behind an OpenAI-compatible gateway).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", type=Path, help="YAML settings file (see configs/airlock.example.yaml)")
        return sub

    up = with_config(commands.add_parser("up", help="start the engines and the gateway"))
    up.add_argument("--host", help="gateway address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up.add_argument("--model", help="auto | demo | profile name | local model directory")
    up.add_argument("--replicas", type=int, help="engine replicas (one per GPU or tensor-parallel group)")
    up.add_argument("--tensor-parallel", type=int, metavar="K", help="GPUs per replica (tensor parallel)")
    up.set_defaults(func=_cmd_up)

    engine = with_config(commands.add_parser("engine", help="start only the engines"))
    engine.add_argument("--model", help="auto | demo | profile name | local model directory")
    engine.add_argument("--replicas", type=int, help="engine replicas")
    engine.add_argument("--tensor-parallel", type=int, metavar="K", help="GPUs per replica (tensor parallel)")
    engine.add_argument("--dry-run", action="store_true", help="print the vLLM command lines and exit")
    engine.set_defaults(func=_cmd_engine)

    gateway = with_config(commands.add_parser("gateway", help="start only the gateway (engines from 'upstreams')"))
    gateway.add_argument("--host", help="gateway address (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="gateway port (default 8000)")
    gateway.set_defaults(func=_cmd_gateway)

    limits = with_config(commands.add_parser(
        "limits-server", help="count users' own limits for several gateways (admission.shared_limits)",
        description="Count users' own limits (admission.max_concurrent_per_user, requests_per_minute_per_user) once "
                    "for every gateway whose settings name this server in admission.shared_limits.url; listens "
                    "there (unix socket, or TCP with mutual TLS off loopback). README: \"Several gateways, one "
                    "count\"."))
    limits.add_argument("--host", help="address to listen on for a tcp:// url (default: the url's host)")
    limits.set_defaults(func=_cmd_limits_server)

    demo = commands.add_parser("demo-model", help="build the tiny random-weight Qwen3-VL used for demos and tests")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--force", action="store_true", help="rebuild even if it exists")
    demo.set_defaults(func=_cmd_demo_model)

    audit = with_config(commands.add_parser(
        "audit", help="trace a stack while canary requests go through it; report egress, DNS, files, logs and "
                      "anything sent in clear on the wire",
    ))
    audit.add_argument("--netns", action="store_true", help="run the stack in a loopback-only network namespace")
    audit.add_argument("--attach", type=int, action="append", metavar="PID",
                       help="audit a running stack: the pid of 'airlock up' (or of 'airlock gateway', and again "
                            "for 'airlock engine')")
    audit.add_argument("--url", help="with --attach: the gateway's address, e.g. https://airlock.example:8000")
    audit.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA that signed the gateway's certificate (default: $SSL_CERT_FILE, else the system's)")
    audit.add_argument("--no-wire", action="store_true",
                       help="do not capture the stack's TCP traffic (the report says the wire was not watched)")
    audit.add_argument("--wire-interface", metavar="IFACE",
                       help="interface tcpdump listens on (default: lo when every hop is on loopback, else any)")
    audit.add_argument("--wire-max-mb", type=int, default=256, metavar="MB",
                       help="most capture held in memory; past it the wire is not verified (default 256)")
    audit.add_argument("--rounds", type=int, default=2, help="rounds of canary requests (default 2)")
    audit.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the stack (default 900)")
    audit.add_argument("--inside-netns", action="store_true", help=argparse.SUPPRESS)  # set by --netns itself
    audit.add_argument("--json", metavar="PATH", help="write the full report as JSON ('-': to stdout)")
    audit.set_defaults(func=_cmd_audit)

    verify = commands.add_parser("verify-model", help="check a model directory against its airlock-manifest.sha256")
    verify.add_argument("directory", type=Path)
    verify.add_argument("--public-key", type=Path, metavar="PUB",
                        help="also require airlock-manifest.sha256.sig to verify with this key (from airlock keygen)")
    verify.set_defaults(func=_cmd_verify_model)

    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    keygen.add_argument("--out-key", type=Path, required=True, metavar="KEY",
                        help="the private key (PEM, written 0600; refuses to overwrite)")
    keygen.add_argument("--out-public", type=Path, required=True, metavar="PUB", help="the public key (PEM)")
    keygen.set_defaults(func=_cmd_keygen)

    verify_bundle = commands.add_parser("verify-bundle", help="check a bundle's signature, then every checksum")
    verify_bundle.add_argument("directory", type=Path)
    verify_bundle.add_argument("--public-key", type=Path, required=True, metavar="PUB",
                               help="the public key SHA256SUMS.sig must verify with")
    verify_bundle.set_defaults(func=_cmd_verify_bundle)

    from .bundle import DEFAULT_PLATFORM, DEFAULT_PYTHON, PYPI

    bundle = commands.add_parser("bundle", help="gather wheels, a model and checksums for an air-gapped install")
    bundle.add_argument("--out", type=Path, required=True,
                        help="directory to write the bundle to (must not exist yet, or be empty)")
    bundle.add_argument("--model", type=Path, help="a model directory to carry along (a manifest is written)")
    bundle.add_argument("--engine", choices=["gpu", "cpu", "none"], default="gpu",
                        help="engine build (default gpu; none: only the gateway's wheels, for the gateway image)")
    bundle.add_argument("--index-url", default=PYPI, help=f"package index to download from ({PYPI})")
    bundle.add_argument("--platform", default=DEFAULT_PLATFORM, help=f"target wheel platform ({DEFAULT_PLATFORM})")
    bundle.add_argument("--python-version", default=DEFAULT_PYTHON, help=f"target Python ({DEFAULT_PYTHON})")
    bundle.add_argument("--no-wheels", action="store_true", help="only the model and checksums")
    bundle.add_argument("--project", type=Path, default=Path.cwd(), help="the Airlock checkout (default: here)")
    bundle.add_argument("--sign-key", type=Path, metavar="KEY",
                        help="sign SHA256SUMS and the model's manifest with this key (from airlock keygen)")
    bundle.set_defaults(func=_cmd_bundle)

    config = with_config(commands.add_parser("config", help="validate the settings and print them"))
    config.set_defaults(func=_cmd_config)
    gpu_table = with_config(commands.add_parser(
        "gpu-table", help="print what model: auto starts on common GPUs (the README's table, for these settings)"))
    gpu_table.set_defaults(func=_cmd_gpu_table)
    add_auth_commands(commands, with_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except (ConfigError, AuditError) as exc:
        print(f"airlock: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EngineStartFailed as exc:
        print(f"airlock: {exc}", file=sys.stderr)
        return EXIT_ENGINES_GAVE_UP
    except CommandError as exc:
        print(f"airlock: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
