"""Forward one screened request to an engine and relay its answer, byte for byte.

Streaming commits late: the engine's status and first chunk are read before the client's response starts, so an
engine that fails before its first token (a refused connection, a dropped one, a 5xx such as vLLM's
``EngineDeadError``, or a stream whose first event is an error) is replaced by another replica and the client never
notices; the failing replica's health is checked at once, and it leaves the rotation until a check passes. Once the
client's response has started, a failure is raised and the error boundary ends the stream with an SSE error event,
never a silent truncation. An engine's own error text never reaches the client.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import NoReturn

from starlette.types import Send

from .auth import Principal
from .direct_chunks import DirectChunks
from .engine_http import EngineDropped, EngineHttpError, EngineRefused, EngineResponse
from .errors import (
    NO_STORE,
    AirlockError,
    EngineFailed,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    translate_engine_error,
)
from .metrics import GatewayMetrics, RequestRecord
from .upstream import Replica, ReplicaPool
from .usage import StreamUsage, whole_answer_usage

log = logging.getLogger(__name__)

# Error answers from an engine are small; anything longer is cut (and then not parsed as JSON).
MAX_ENGINE_ERROR_BYTES = 64 * 1024
# The first replica and one other: a second failure is the client's answer (the SDKs retry it with a backoff).
ATTEMPTS = 2
# Headers worth passing from the engine to the client; everything else (server, date, ...) is dropped.
RELAYED_HEADERS = frozenset({"content-type"})
# How vLLM reports a failure inside a stream (vllm/entrypoints/openai/engine/serving.py, create_streaming_error_
# response): an event whose data is an OpenAI error object. Inside an answer's text the quotes would be escaped.
ERROR_EVENT = b'data: {"error"'
STOPPED = "the model engine stopped while answering"
FAILED = "the model engine failed to answer this request; try again"
# How vLLM refuses a prompt longer than its context ("This model's maximum context length is N tokens. However, ...",
# vllm/renderers/params.py; "Input length (N) exceeds model's maximum context length (M).", vllm/entrypoints/serve/
# utils/api_utils.py).
CONTEXT_REFUSAL = "maximum context length"
# vLLM's answer to a request its engine ended with an error (GenerationError: vllm/exceptions.py, raised by
# vllm/entrypoints/generate/base/serving.py when the finish reason is "error").
BARE_INTERNAL_ERROR = "Internal server error"


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed the gateway's checks, ready to forward as is."""

    path: str
    body: bytes
    model: str
    principal: Principal
    # The tenant's cache salt: requests with the same one share a prefix cache, so routing keeps them together.
    cache_salt: str
    # Estimated tokens, for the fair queue.
    cost: float
    # The gateway asked the engine for a usage event the client did not ask for: it is removed from the stream.
    remove_usage_event: bool = False
    # Pages of documents were rendered into it: an engine's "too long for the context" refusal is the pages' doing.
    documents: bool = False
    # It carries structured_outputs.grammar: an engine's bare internal error is then the grammar's doing.
    grammar: bool = False


class _TryElsewhere(Exception):
    """The engine failed before any byte went to the client: another replica may take the request. ``failure`` is
    what the client is told if none can."""

    def __init__(self, failure: AirlockError, *, same_replica_may_retry: bool = False) -> None:
        super().__init__(failure.message)
        self.failure = failure
        # A kept-alive connection the engine had just closed says nothing about the engine: it may take the retry.
        self.same_replica_may_retry = same_replica_may_retry


class Forwarder:
    """Routes a request to a replica, sends it, and relays the answer; one retry on another replica."""

    def __init__(self, pool: ReplicaPool, metrics: GatewayMetrics, retry_after_s: int) -> None:
        self.pool = pool
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    async def forward(self, request: EngineRequest, record: RequestRecord, send: Send,
                      chunk_send: Send | None = None) -> None:
        """Answer ``request`` through ``send``; a stream's chunks between its start and its end through
        ``chunk_send`` if given (the server's own: ``metrics_middleware.server_send``). Raises an ``AirlockError``
        (before or after the response started: the boundary tells which) when no replica could answer."""
        tried: Replica | None = None
        failure: AirlockError | None = None  # made when needed: most requests never need it
        pool, model, tenant = self.pool, request.model, request.cache_salt
        same_may_retry = False
        for _ in range(ATTEMPTS):
            # Prefer a replica not tried yet; the same one again only after a dropped connection, if still in the pool.
            replica = pool.pick(model, tenant, exclude=tried) or (pool.pick(model, tenant) if same_may_retry else None)
            if replica is None:
                break
            if tried is not None:
                self.metrics.retries.inc()
            tried = replica
            with pool.lease(replica):
                try:
                    await _Exchange(self, replica, request, record, send, chunk_send or send).run()
                    return
                except _TryElsewhere as attempt_failed:
                    failure, same_may_retry = attempt_failed.failure, attempt_failed.same_replica_may_retry
        raise self.unavailable() if failure is None else failure

    def unavailable(self) -> EngineUnavailable:
        return EngineUnavailable("no engine for this model is available right now; try again shortly",
                                 retry_after_s=self.retry_after_s)

    def failed(self, replica: Replica, reason: str) -> None:
        """An engine failure: counted, and the replica's health checked at once. It leaves the rotation if the check
        fails (vLLM's /health is 503 within milliseconds of its engine core's death), but not on the failure alone:
        one client's request that makes an engine answer 500 must not take a healthy replica away from everyone."""
        self.metrics.upstream_errors.labels(reason).inc()
        self.pool.check_soon(replica)


class _Exchange:
    """One attempt on one replica."""

    def __init__(self, forwarder: Forwarder, replica: Replica, request: EngineRequest, record: RequestRecord,
                 send: Send, chunk_send: Send) -> None:
        self.forwarder = forwarder
        self.replica = replica
        self.request = request
        self.record = record
        self.send = send
        self.chunk_send = chunk_send

    async def run(self) -> None:
        upstream = await self._open()
        try:
            if upstream.status >= 500:
                if self.request.grammar and upstream.status == 500:
                    await self._refuse_unfollowable_grammar(upstream)
                # vLLM's EngineDeadError (an engine core killed by the OOM killer, a CUDA error) is a 500 while
                # its API server still answers: another replica may answer, and this one's health is checked.
                self._give_up("error_status")
            if upstream.status >= 400:
                error = translate_engine_error(upstream.status, await _read_bounded(upstream, MAX_ENGINE_ERROR_BYTES))
                if self.request.documents and CONTEXT_REFUSAL in error.message:
                    raise document_too_long(error.message) from None
                raise error
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                await self._relay_stream(upstream)
            else:
                await self._relay_whole(upstream)
        finally:
            # A whole answer leaves its connection for the next request; anything else (an answer cut short, a
            # client that left) closes it, and vLLM aborts the request.
            if upstream.at_eof():
                upstream.release()
            else:
                upstream.close()

    async def _refuse_unfollowable_grammar(self, upstream: EngineResponse) -> None:
        """A grammar that derives no finite text (``root ::= root root``) passes vLLM's checks, and then xgrammar
        rejects the first token: the engine ends the request with its bare "Internal server error" (vLLM's
        scheduler: "grammar rejected tokens ... Terminating request"). Every replica would do the same, so that
        answer to a request with a grammar is the client's 400, not a failure to try elsewhere nor an engine error
        in the metrics (a client could raise the alert on those); the replica's health is still checked.
        EngineDeadError, the other 500 vLLM sends, says so in its message and is an engine failure as before."""
        raw = await _read_bounded(upstream, MAX_ENGINE_ERROR_BYTES)
        if _error_message(raw) != BARE_INTERNAL_ERROR:
            self._give_up("error_status")
        self.forwarder.pool.check_soon(self.replica)
        raise InvalidRequest("the model engine could not generate any text that structured_outputs.grammar "
                             "allows; a grammar must derive a finite text (root ::= root root derives none)",
                             param="structured_outputs", code="invalid_grammar")

    def _give_up(self, reason: str) -> NoReturn:
        """The engine failed before anything went to the client: another replica may take the request."""
        self.forwarder.failed(self.replica, reason)
        raise _TryElsewhere(EngineFailed(FAILED))

    async def _open(self) -> EngineResponse:
        """Send the request; a failure before the engine answered may be retried elsewhere."""
        replica = self.replica
        assert replica.connections is not None, "every replica of a serving pool has its connections"
        self.record.forwarded()
        errors = self.forwarder.metrics.upstream_errors
        try:
            return await replica.connections.post(self.request.path, self.request.body)
        except EngineRefused:
            # Refused or no socket: the engine is down.
            errors.labels("connect_failed").inc()
            self.forwarder.pool.mark_failed(replica)
            raise _TryElsewhere(self.forwarder.unavailable()) from None
        except EngineDropped:
            # Dropped before any answer (a kept-alive connection the engine had just closed, an engine too busy to
            # accept, or one that died): nothing reached the client yet, so another try is safe.
            errors.labels("dropped").inc()
            log.info("replica %d dropped a request before answering; retrying it", replica.index)
            self.forwarder.pool.check_soon(replica)
            raise _TryElsewhere(EngineFailed(FAILED), same_replica_may_retry=True) from None
        except TimeoutError as exc:
            # No answer within read_timeout_s: not retried, the work may be under way.
            raise self._timed_out() from exc
        except EngineHttpError as exc:
            errors.labels("transport").inc()
            raise EngineFailed(FAILED) from exc

    def _timed_out(self) -> EngineTimeout:
        """No answer within read_timeout_s (a long non-streaming answer): not retried, the work may still be under
        way."""
        self.forwarder.metrics.upstream_errors.labels("timeout").inc()
        return EngineTimeout("the model engine did not answer in time; try a smaller request or streaming")

    def _headers(self, upstream: EngineResponse, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
        headers = {name: value for name, value in upstream.headers.items() if name in RELAYED_HEADERS}
        headers.update(NO_STORE)
        headers.update(extra)
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def _relay_whole(self, upstream: EngineResponse) -> None:
        # A non-streaming answer arrives at once; reading it whole lets an engine failure still become a retry.
        try:
            content = await upstream.read()
        except TimeoutError as exc:
            raise self._timed_out() from exc
        except EngineHttpError:
            self._give_up("broken_answer")
        self.record.first_byte()
        self.replica.made_progress()
        self.record.counted(whole_answer_usage(content))
        headers = self._headers(upstream, {"content-length": str(len(content))})
        await self.send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": content, "more_body": False})

    async def _relay_stream(self, upstream: EngineResponse) -> None:
        # Commit late: the client's response starts only once the engine's first events are in and are not an
        # error, so an engine that fails before its first token is replaced by another replica.
        read = upstream.readany  # b"" at the end (plain calls: an async iterator costs more per chunk)
        usage = StreamUsage(self.request.remove_usage_event)
        first = b""
        try:
            while not first:
                chunk = await read()
                if not chunk:
                    break
                first = usage.feed(chunk)  # whole events only, so an error event is seen whole
        except TimeoutError as exc:
            raise self._timed_out() from exc
        except EngineHttpError:
            self._give_up("broken_answer")
        if not first or ERROR_EVENT in first:  # nothing went to the client yet: another replica may answer
            self._give_up("error_event" if first else "broken_answer")
        record, replica = self.record, self.replica
        record.first_byte()
        replica.made_progress()
        headers = self._headers(upstream, {"x-accel-buffering": "no"})
        # The start and the end go through every layer; the chunks in between straight to the server.
        await self.send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        send = self.chunk_send
        try:
            arrived = time.perf_counter()
            await send({"type": "http.response.body", "body": first, "more_body": True})
            record.relayed(arrived)
            direct = DirectChunks.of(send)
            if direct is not None:
                await self._relay_direct(upstream, usage, direct)
            else:
                while chunk := await read():
                    arrived = time.perf_counter()
                    replica.made_progress()
                    events = usage.feed(chunk)
                    if events:
                        if ERROR_EVENT in events:
                            await self._stop_at_error_event(events)
                        await send({"type": "http.response.body", "body": events, "more_body": True})
                    record.relayed(arrived)
            rest = usage.rest()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except (EngineHttpError, TimeoutError) as exc:
            self.forwarder.failed(replica, "broken_stream")
            raise EngineFailed(STOPPED) from exc
        finally:
            record.counted(usage.counts)
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_direct(self, upstream: EngineResponse, usage: StreamUsage, client: DirectChunks) -> None:
        """The chunks after the first, written by the engine connection's callback (``direct_chunks``): the same
        steps as the loop in ``_relay_stream``, without a task step per chunk. This task wakes at the end, at an
        error event, when the client's buffer is full (it waits for it to drain) and when the client has left (the
        stream ends; the disconnect watch cancels the request as before)."""
        record, replica = self.record, self.replica
        stopped_at: list[bytes] = []  # the events holding an error event
        failed: list[Exception] = []

        def sink(chunk: bytes) -> bool:
            if stopped_at or failed:
                return False
            try:
                arrived = time.perf_counter()
                replica.made_progress()
                events = usage.feed(chunk)
                more = True
                if events:
                    if ERROR_EVENT in events:
                        stopped_at.append(events)
                        return False
                    more = client.write(events)
                record.relayed(arrived)
                return more
            except Exception as error:  # raised in the task below, not in the engine connection's callback
                failed.append(error)
                return False

        upstream.relay_to(sink)
        while not await upstream.relayed():
            if failed:
                raise failed[0]
            if stopped_at:
                await self._stop_at_error_event(stopped_at[0])
            if client.gone:
                return
            await client.drain()
            upstream.resume()

    async def _stop_at_error_event(self, events: bytes) -> None:
        """The engine failed mid-stream and says so in an event: what came before it goes on, its own text does not
        (it names the engine's internals); the boundary ends the stream with the gateway's error event."""
        before = events[:events.index(ERROR_EVENT)]
        if before:
            await self.send({"type": "http.response.body", "body": before, "more_body": True})
        self.forwarder.failed(self.replica, "error_event")
        raise EngineFailed(STOPPED)


def document_too_long(engine_message: str) -> InvalidRequest:
    """The pages were sized from an estimate of the request's text (``page_budget``: UTF-8 bytes / 3), which a
    tokenizer that splits finer (digits one by one, a small vocabulary) can exceed: the engine's refusal, numbers
    included, in the documents' terms."""
    return InvalidRequest(
        f"the document pages and their text do not fit the model's context ({engine_message.rstrip('.')}): choose "
        "fewer pages (\"pages\"), send \"text_layer\": false, or ask for fewer max_tokens",
        code="document_too_long",
    )


async def _read_bounded(upstream: EngineResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit and (chunk := await upstream.readany()):
            chunks.append(chunk)
            size += len(chunk)
    except (EngineHttpError, TimeoutError):
        pass
    return b"".join(chunks)[:limit]


def _error_message(raw: bytes) -> object:
    """The ``error.message`` of an engine's JSON error answer, or None."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error.get("message") if isinstance(error, dict) else None
