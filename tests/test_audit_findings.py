"""How the audit reads strace's output: exact strace lines in, findings out (no engine, no tracing)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pypdfium2 as pdfium  # type: ignore[import-untyped, unused-ignore]
from PIL import Image

from server.audit.canary import Canaries
from server.audit.findings import Findings, program_name, storage_of
from server.audit.report import ProbeSummary, Report
from server.audit.strace import TraceReader

CANARIES = Canaries.fresh("alk_0123456789abcdef_secret")
PROMPT = CANARIES.text


def hexed(data: bytes) -> str:
    """A string the way `strace -x` prints bytes that are not all printable."""
    return "".join(f"\\x{byte:02x}" for byte in data)


def findings_of(*lines: str) -> Findings:
    findings, reader = Findings(CANARIES), TraceReader()
    for line in lines:
        for call in reader.feed(line + "\n"):
            findings.observe(call)
    return findings


def verdict(*lines: str) -> list[str]:
    return Report("started", False, ["lo"], ProbeSummary(), findings_of(*lines)).judge().violations


def test_a_file_written_with_the_prompt_is_a_violation_printable_or_hex() -> None:
    accented = hexed("café ".encode() + PROMPT.encode())
    findings = findings_of(
        '7 openat(AT_FDCWD</srv>, "/var/spool/x", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3</var/spool/x>',
        f'7 write(3</var/spool/x>, "{accented}", 60) = 60',
        f'7 write(3</var/spool/y>, "ok {PROMPT}"..., 70000) = 70000',
    )
    assert findings.files["/var/spool/x"].opens == 1
    assert findings.files["/var/spool/x"].canaries == {"prompt"}
    assert findings.files["/var/spool/y"].canaries == {"prompt"}


def test_a_spool_whose_file_is_already_gone_is_a_file_too() -> None:
    """tempfile.TemporaryFile (O_TMPFILE, or unlinked at once) as strace 6.1 prints it: "(deleted)" after the
    descriptor's path. Spooling a body that way is the leak the audit must not miss."""
    findings = findings_of(
        '7 openat(AT_FDCWD</srv>, "/tmp", O_RDWR|O_EXCL|O_NOFOLLOW|O_CLOEXEC|O_TMPFILE, 0600) '
        '= 3</tmp/#2149662>(deleted)',
        f'7 write(3</tmp/#2149662>(deleted), "body {PROMPT}", 50) = 50',
        '7 openat(AT_FDCWD</srv>, "/var/tmp/x", O_RDWR|O_CREAT|O_EXCL, 0600) = 4</var/tmp/x>',
        f'7 write(4</var/tmp/x>(deleted), "{PROMPT}", 45) = 45',
    )
    spool = findings.files["/tmp/#2149662 (deleted)"]
    assert (spool.opens, spool.writes, spool.canaries) == (1, 1, {"prompt"})
    assert findings.files["/var/tmp/x (deleted)"].canaries == {"prompt"}
    assert "/tmp" not in findings.files


def test_reads_devices_and_clean_writes_are_not_violations() -> None:
    lines = (
        '7 openat(AT_FDCWD</srv>, "/etc/hosts", O_RDONLY|O_CLOEXEC) = 3</etc/hosts>',
        '7 openat(AT_FDCWD</srv>, "/dev/null", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3</dev/null>',
        f'7 write(3</dev/null>, "{PROMPT}", 45) = 45',
        '7 openat(AT_FDCWD</srv>, "/dev/shm/psm_1", O_RDWR|O_CREAT|O_EXCL, 0600) = 4</dev/shm/psm_1>',
        '7 write(4</dev/shm/psm_1>, "\\x00\\x01", 2) = 2',
        f'7 write(5<socket:[99]>, "{PROMPT}", 45) = 45',  # to the engine: forwarding is the job
    )
    findings = findings_of(*lines)
    assert set(findings.files) == {"/dev/shm/psm_1"}
    assert verdict(*lines) == []


def test_an_interrupted_call_is_joined_before_it_is_judged() -> None:
    findings = findings_of(
        f'9 write(2<pipe:[5]>, "request {PROMPT}\\n", 54 <unfinished ...>',
        '8 write(1<pipe:[5]>, "ready\\n", 6) = 6',
        "9 <... write resumed>) = 54",
    )
    streams = {stream.fd: stream for stream in findings.logs.values()}
    assert streams[2].canaries == {"prompt"} and streams[1].canaries == set()
    assert verdict(f'9 write(2<pipe:[5]>, "request {PROMPT}\\n", 54) = 54')[0].startswith("log:")


def test_writev_pieces_are_searched_together() -> None:
    half = len(CANARIES.needles["credential"]) // 2
    key = CANARIES.needles["credential"].decode()
    findings = findings_of(
        f'3 writev(2</var/log/a.log>, [{{iov_base="key={key[:half]}", iov_len=9}}, '
        f'{{iov_base="{key[half:]}\\n", iov_len=20}}], 2) = 29',
    )
    assert findings.files["/var/log/a.log"].canaries == {"credential"}


def test_outside_addresses_are_egress_and_loopback_is_not() -> None:
    findings = findings_of(
        '4 connect(5<socket:[1]>, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("8.8.8.8")}, 16) = 0',
        '4 connect(5<socket:[2]>, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16)'
        " = 0",
        '4 connect(6<socket:[3]>, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH (Network is '
        "unreachable)",
        '4 connect(6<socket:[4]>, {sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '4 connect(7<socket:[5]>, {sa_family=AF_UNIX, sun_path="/run/airlock/replica-0.sock"}, 110) = 0',
    )
    assert sorted(findings.egress) == [("2001:db8::1", 443), ("8.8.8.8", 80)]  # a failed attempt counts too
    assert findings.dns == {}


def test_dns_by_port_53_even_on_loopback() -> None:
    findings = findings_of(
        '4 sendto(3<socket:[1]>, "\\x12\\x34", 2, MSG_NOSIGNAL, {sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("127.0.0.53")}, 16) = 2',
    )
    assert list(findings.dns) == [("127.0.0.53", 53)]


def nscd_request(kind: int) -> str:
    return hexed(struct.pack("=iii", 2, kind, 12) + b"example.org\x00")


def test_nscd_host_requests_are_lookups_but_user_lookups_are_not() -> None:
    connect = '4 connect(3<socket:[77]>, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = 0'
    getpwuid = f'4 sendto(3<socket:[77]>, "{nscd_request(1)}", 24, MSG_NOSIGNAL, NULL, 0) = 24'
    gethostbyname = f'4 sendto(3<socket:[77]>, "{nscd_request(4)}", 24, MSG_NOSIGNAL, NULL, 0) = 24'
    assert findings_of(connect, getpwuid).dns == {}
    assert list(findings_of(connect, gethostbyname).dns) == [("nscd", 0)]
    no_daemon = connect.replace("= 0", "= -1 ENOENT (No such file or directory)")
    assert findings_of(no_daemon, gethostbyname).dns == {}


def test_every_kind_of_violation_is_named() -> None:
    violations = verdict(
        '4 connect(5<socket:[1]>, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("192.0.2.1")}, 16) = 0',
        '4 sendto(3<socket:[2]>, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("10.0.0.2")}, 16) = 1',
        f'4 write(9</tmp/#123 (deleted)>, "{CANARIES.needles["image base64"].decode()}", 64) = 64',
        f'4 write(2<pipe:[1]>, "{PROMPT}", 45) = 45',
    )
    assert [violation.split(":")[0] for violation in violations] == ["egress", "dns", "file", "log"]


def test_the_canary_image_carries_its_markers_where_they_can_be_found() -> None:
    canaries = Canaries.fresh()
    image = Image.open(io.BytesIO(canaries.image_png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert image.tobytes().startswith(canaries.needles["image pixels"])  # a decoded copy shows it
    assert canaries.needles["image"] in canaries.image_png  # the raw upload shows it
    assert canaries.needles["image base64"] in canaries.data_url.encode()  # the request body shows it
    assert canaries.needles["prompt"] != Canaries.fresh().needles["prompt"]  # fresh every audit
    canaries.add_answer("short")
    canaries.add_answer("a longer answer from the model, long enough to look for")
    assert [name for name in canaries.needles if name.startswith("answer")] == ["answer 1"]


def test_the_canary_pdf_carries_its_text_and_image_where_they_can_be_found() -> None:
    canaries = Canaries.fresh()
    pdf = pdfium.PdfDocument(canaries.document_pdf)  # a valid PDF, read by the renderer the gateway uses
    assert len(pdf) == 1
    page = pdf[0]
    # The text layer the gateway extracts and forwards is the canary's text.
    assert page.get_textpage().get_text_range() == canaries.needles["document text"].decode()
    images = [obj for obj in page.get_objects() if isinstance(obj, pdfium.PdfImage)]
    assert len(images) == 1 and images[0].get_px_size() == (64, 64)
    # A decoded copy of the embedded image shows its marker, and so does the PDF itself (noise does not compress).
    assert images[0].get_bitmap().to_pil().tobytes().startswith(canaries.needles["document pixels"])
    assert canaries.needles["document pixels"] in canaries.document_pdf
    part = canaries.document_part
    assert part["type"] == "file"
    file = part["file"]
    assert isinstance(file, dict) and file["filename"].encode().startswith(canaries.needles["document name"])
    assert file["file_data"].startswith("data:application/pdf;base64,")
    # The request body shows the base64 slice; the slice is the canary's own (from its pixels), not the header
    # every PDFium file shares.
    assert canaries.needles["document base64"] in file["file_data"].encode()
    other = Canaries.fresh()
    assert other.needles["document base64"] not in file["file_data"].encode()
    assert other.document_pdf[:9] == canaries.document_pdf[:9] == b"%PDF-1.7\r"
    pdf.close()


def test_the_canary_pdf_is_found_as_bytes_as_text_and_as_base64() -> None:
    """The PDF spooled as it came, its text layer logged, the request body printed: each is found."""
    file = CANARIES.document_part["file"]
    assert isinstance(file, dict)
    pdf, body = CANARIES.document_pdf, json.dumps({"filename": file["filename"], "file_data": file["file_data"]})
    findings = findings_of(
        f'5 write(9</tmp/#7 (deleted)>, "{hexed(pdf[:4096])}", 4096) = 4096',
        f'5 write(2<pipe:[1]>, "page 1: {CANARIES.needles["document text"].decode()}\\n", 56) = 56',
        f'5 write(1<pipe:[1]>, "{hexed(body.encode()[:8000])}", 8000) = 8000',
    )
    assert findings.files["/tmp/#7 (deleted)"].canaries == {"document pixels"}
    assert {stream.fd: stream.canaries for stream in findings.logs.values()} == {
        2: {"document text"}, 1: {"document base64", "document name"}}


def test_a_forked_child_is_named_by_what_it_executes(tmp_path: Path) -> None:
    """A render worker's first calls come before its execve, when /proc still shows the gateway it was forked from;
    from its execve on it is named by what it runs (read again then, while the process lives)."""
    # A real process that first runs "python -c ..." and, on cue, executes something named server.render_worker.
    execs = ("import os, sys; sys.stdin.readline(); "
             "os.execv(sys.executable, [sys.executable, '-c', 'import sys; sys.stdin.read()', 'server.render_worker'])")
    with subprocess.Popen([sys.executable, "-c", execs, "gateway"], stdin=subprocess.PIPE) as child:
        assert child.stdin is not None
        pid = child.pid
        cmdline = Path(f"/proc/{pid}/cmdline")
        while not cmdline.read_bytes():  # set once its exec has finished (Popen may return a moment before)
            time.sleep(0.01)
        findings = findings_of(f'{pid} openat(AT_FDCWD</srv>, "/dev/null", O_RDWR|O_CLOEXEC) = 3</dev/null>')
        before = findings.program(pid)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        while not cmdline.read_bytes().endswith(b"\0server.render_worker\0"):
            time.sleep(0.01)
        for call in TraceReader().feed(f'{pid} execve("{sys.executable}", ["python3", "-c", "...", '
                                       '"server.render_worker"], 0x7ffd /* 0 vars */) = 0\n'):
            findings.observe(call)
        after = findings.program(pid)
        child.communicate(b"")
    assert before == "gateway" and after == "server.render_worker"
    assert findings.programs == ["gateway", "server.render_worker"] and findings.pids == {pid}
    assert program_name(["/usr/bin/python3", "-I", "-B", "-m", "server.render_worker", "1024"]) == \
        "server.render_worker"


def test_program_names_and_storage() -> None:
    assert program_name(["/srv/.venv/bin/python", "-m", "server.cli", "up", "--config", "a"]) == "server.cli up"
    assert program_name(["python3", "-m", "vllm.entrypoints.openai.api_server"]) == "vllm.entrypoints.openai.api_server"
    assert program_name(["/usr/bin/lscpu"]) == "lscpu"
    mounts = [("/", "ext4"), ("/dev/shm", "tmpfs"), ("/tmp", "tmpfs"), ("/tmpdata", "xfs")]
    assert storage_of("/tmp/x", mounts) == "memory"
    assert storage_of("/tmpdata/x", mounts) == "disk"
    assert storage_of("/dev/shm/psm_1", mounts) == "memory"
    assert storage_of("/proc/self/oom_score_adj", mounts) == "pseudo"
