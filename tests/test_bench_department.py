"""The department benchmark (tests/bench/department.py) runs end to end at a tiny scale, so that `make
bench-department` is known to work on a fresh machine: the real `airlock gateway` in front of two paced stand-in
replicas, the same arrivals straight to them and through it. No speed is asserted here (the benchmark prints it);
what is asserted is that every stream was served along both paths and that the figures count what was sent.

The paced stand-in (tests/bench/paced_upstream.py, the one accepted fake) is also checked on its own, over a real
unix socket: its events at vLLM's ``--stream-interval`` (the first token at once, then every N tokens joined in
one delta, the rest with the last), and, at N = 1, the very bytes it sent before the option existed."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import psutil
import pytest
import uvloop

from tests.bench.department import GATEWAY_CORES, STOLEN_PERCENT_LIMIT, Processes, Scale, arrivals, department, report
from tests.bench.host import core_count, cpu_model
from tests.bench.paced_upstream import PROMPT_TOKENS, WORDS, Answers, Connection, Counts
from tests.bench.run import Layout, machine
from tests.servers import free_port

# At a stream interval of 3 (12 tokens: events at tokens 1, 4, 7, 10 and 12), so that events and tokens differ and
# the harness's counts can be told apart; N = 1 is the stand-in's old behaviour, checked byte for byte below.
TINY = Scale(replicas=2, streams_per_replica=3, tokens=12, interval_ms=10.0, duration_s=1.5, image_share=0.5,
             users=3, rounds=1, stream_interval=3)


def test_department_harness_serves_every_stream_and_counts_every_token(tmp_path: Path) -> None:
    expected = arrivals(TINY, seed=0)
    assert len(expected) > 5 and any(arrival.image for arrival in expected)
    result = department(TINY, Layout(None, None), tmp_path, port=free_port())
    figures = result.figures()
    for path in ("direct", "gateway"):
        assert figures[f"requests_{path}"] == len(expected), path
        assert figures[f"errors_{path}"] == 0, path
        # Every token event the stand-ins sent reached the client as one counted event, along both paths.
        assert figures[f"{path}_token_events_sent"] == len(expected) * TINY.events_per_stream, path
        assert figures[f"{path}_token_events_counted"] == figures[f"{path}_token_events_sent"], path
        assert figures[f"{path}_tokens_sent"] == len(expected) * TINY.tokens, path
        assert figures[f"{path}_chunks_per_s"] > 0, path
        assert figures[f"{path}_streams_open_max"] >= 1, path
    assert sum(sample.image for run in result.gateway for sample in run.samples) == sum(
        arrival.image for arrival in expected)
    # The gateway did the relaying: it used CPU in its own run, and every latency figure is a number.
    assert figures["gateway_cpu_percent"] > 0
    assert figures["stream_interval"] == 3 and figures["events_per_stream"] == 5
    for name in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"):
        assert math.isfinite(figures[f"added_{name}_ms"]), name
        assert figures[f"gateway_{name}_ms"] > 0, name
    # Paced: no stream ended before its tokens' time had passed (less one interval: timers fire to the millisecond).
    assert all(sample.e2e_s >= TINY.stream_s - TINY.interval_ms / 1000
               for run in [*result.direct, *result.gateway] for sample in run.samples)
    # What the hypervisor took from the cores is a share of their time, printed next to the verdict it qualifies.
    for path in ("direct", "gateway"):
        for cores in ("gateway_cores", "other_cores"):
            assert 0 <= figures[f"{path}_{cores}_stolen_percent"] <= 100, (path, cores)
    assert all(0 <= run.stolen_percent[GATEWAY_CORES] <= 100 for run in result.gateway)
    assert figures["host_quiet"] == (figures["most_stolen_percent"] < STOLEN_PERCENT_LIMIT)
    # A run with every core nearly its own has every round quiet, and its quiet rounds' figures are the run's.
    assert set(figures["quiet_rounds"]) <= set(range(TINY.rounds))
    if figures["host_quiet"]:
        assert figures["quiet_rounds"] == list(range(TINY.rounds))
        assert figures["added_ttft_p99_ms_quiet_rounds"] == figures["added_ttft_p99_ms"]
    printed = report(result)
    assert "taken by the hypervisor" in printed and "target: added TTFT p99" in printed


def test_steal_is_summed_over_the_named_cores_only() -> None:
    """One reading of /proc/stat for both sets: a core's steal never exceeds that of all the cores with it."""
    stolen = Processes({}, {"first core": {0}, "every core": None}).stolen()
    assert 0 <= stolen["first core"] <= stolen["every core"]
    assert core_count(None) == len(psutil.cpu_times(percpu=True)) and core_count({0}) == 1


def test_the_processor_is_named_as_the_kernel_names_it() -> None:
    """Figures from different hosts differ twofold here: every report names the processor it ran on, and its clock
    (a virtual machine's name alone can be as plain as "Intel(R) Xeon(R) Processor")."""
    fields = [line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line]
    named = [value.strip() for name, value in fields if name.strip() == "model name"]
    clock = [value.strip() for name, value in fields if name.strip() == "cpu MHz"]
    assert cpu_model() and machine()["cpu"]
    if named:
        assert cpu_model().startswith(named[0]) and machine()["cpu"].startswith(named[0])
    if clock:
        assert re.search(r", \d+ MHz$", cpu_model())


# -- the stand-in on its own -----------------------------------------------------------------------------------

def _stream(tmp_path: Path, answers: Answers, usage: bool) -> tuple[bytes, Counts]:
    """One streamed chat completion from the stand-in's protocol on a real unix socket: the raw response, and
    the stand-in's counts after it."""
    counts = Counts()

    async def exchange() -> bytes:
        socket = tmp_path / "standin.sock"
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(answers, counts), str(socket))
        body = b'{"model":"m","stream":true' + (b',"stream_options":{"include_usage":true}}' if usage else b"}")
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the stand-in closed the connection mid-stream"
            raw += data
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return raw

    return uvloop.run(exchange()), counts


def _chunks(raw: bytes) -> list[bytes]:
    """The HTTP/1.1 chunks of a chunked response (RFC 9112, 7.1), without the last, empty one."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    chunks: list[bytes] = []
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            assert rest == b"\r\n"
            return chunks
        chunks.append(rest[:int(size, 16)])
        assert rest[int(size, 16):int(size, 16) + 2] == b"\r\n"
        rest = rest[int(size, 16) + 2:]


@pytest.mark.parametrize("tokens", [12, 10])  # 12 = 1 + 3 x 3 + 2 (the rest fewer than N), 10 = 1 + 3 x 3
def test_stand_in_at_stream_interval_3_sends_one_event_per_three_tokens_with_their_words_joined(
        tmp_path: Path, tokens: int) -> None:
    answers = Answers(tokens, 0.001, stream_interval=3)
    ends = [1, 4, 7, 10] + ([12] if tokens == 12 else [])
    # Timers are set at these tokens' times, and nowhere else: vLLM's rule (output_processor.py, vLLM 0.32).
    assert [end for end, _, _ in answers.events] == ends
    raw, counts = _stream(tmp_path, answers, usage=True)
    events = [json.loads(chunk.removeprefix(b"data: ")) for chunk in _chunks(raw)[:-1]]
    assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"data: ") == 1
               for chunk in _chunks(raw)), "one SSE event an HTTP chunk"
    assert _chunks(raw)[-1] == b"data: [DONE]\n\n"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_events = events[1:1 + len(ends)]
    words = [WORDS[number % len(WORDS)] for number in range(tokens)]  # token n's word is WORDS[(n - 1) % 12]
    assert [event["choices"][0]["delta"]["content"] for event in token_events] == [
        "".join(words[before:end]) for before, end in zip([0, *ends[:-1]], ends, strict=True)]
    assert "".join(event["choices"][0]["delta"]["content"] for event in token_events) == "".join(words)
    finish, usage = events[1 + len(ends):]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert usage["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens,
                              "total_tokens": PROMPT_TOKENS + tokens}
    assert (counts.token_events, counts.tokens) == (len(ends), tokens)
    assert (counts.streams_started, counts.streams_ended) == (1, 1)


def _old_framing(tokens: int, usage: bool) -> bytes:
    """What the stand-in sent before --stream-interval existed, written out again: vLLM's chunk shape
    (ChatCompletionStreamResponse), one event a token with the words in turn, then finish, usage, [DONE]."""
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def event(choices: list[object], **extra: object) -> bytes:
        payload = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                   "model": "airlock-demo-qwen3-vl", "choices": choices, **extra}
        return chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    out = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
           + event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]))
    for number in range(tokens):
        out += event([{"index": 0, "delta": {"content": WORDS[number % len(WORDS)]}, "logprobs": None,
                       "finish_reason": None}])
    out += event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None}])
    if usage:
        out += event([], usage={"prompt_tokens": 900, "completion_tokens": tokens, "total_tokens": 900 + tokens})
    return out + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


@pytest.mark.parametrize("usage", [True, False])
def test_stand_in_at_stream_interval_1_sends_the_bytes_it_sent_before(tmp_path: Path, usage: bool) -> None:
    answers = Answers(14, 0.001)  # 14: the words' cycle of 12 wraps
    assert [(end, tokens) for end, tokens, _ in answers.events] == [(number, 1) for number in range(1, 15)]
    raw, counts = _stream(tmp_path, answers, usage)
    assert raw == _old_framing(14, usage)
    assert (counts.token_events, counts.tokens) == (14, 14)
