"""Forward one request to an engine and relay its answer, byte for byte.

The whole exchange, including the wait for the engine's first byte, runs under a watch for the client going
away: when it does, the upstream request is closed at once, vLLM aborts it, and its batch slot is freed.

Streaming commits late: the engine's status is read before the client's response starts, so an engine error
becomes a proper OpenAI error with the right status. A connection that fails before any byte came back is
retried once on another replica. Once a stream has started, a failure is reported as a final SSE error event,
never as a silent truncation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .admission import Admission
from .auth import Principal
from .errors import (
    NO_STORE,
    AirlockError,
    EngineFailed,
    EngineTimeout,
    EngineUnavailable,
    error_body,
    translate_engine_error,
)
from .metrics import GatewayMetrics, RequestRecord
from .upstream import Replica, ReplicaPool
from .usage import StreamUsage, whole_answer_usage

log = logging.getLogger(__name__)

# Error answers from an engine are small; anything longer is cut (and then not parsed as JSON).
MAX_ENGINE_ERROR_BYTES = 64 * 1024
# Engine answers that say "not now" rather than "not this request": tried once more on another replica.
RETRIED_STATUSES = frozenset({502, 503, 504})
ATTEMPTS = 2
# Headers worth passing from the engine to the client; everything else (server, date, ...) is dropped.
RELAYED_HEADERS = frozenset({"content-type"})
# What the gateway sends the engine: nothing of the client's headers. identity: bytes are relayed as they are.
UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed the gateway's checks, ready to forward as is."""

    body: bytes
    model: str
    principal: Principal
    # The tenant's cache salt: requests with the same one share a prefix cache, so routing keeps them together.
    cache_salt: str
    # Estimated tokens, for the fair queue.
    cost: float
    # The gateway asked the engine for a usage event the client did not ask for: it is removed from the stream.
    remove_usage_event: bool = False


class _TryElsewhere(Exception):
    """The engine failed before any byte went to the client: another replica may take the request."""


class EngineExchange(Response):
    """An ASGI response that performs the upstream call itself, so a disconnect can cancel all of it (waiting in
    the queue included)."""

    def __init__(self, pool: ReplicaPool, admission: Admission, path: str, request: EngineRequest,
                 retry_after_s: int, metrics: GatewayMetrics, record: RequestRecord) -> None:
        self.pool = pool
        self.admission = admission
        self.path = path
        self.request = request
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.record = record
        self.status_code = 0
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A plain task and Task.cancel rather than an anyio task group: the same watch at a fraction of the cost
        # per request (py-spy under `make bench`).
        exchange = asyncio.current_task()
        assert exchange is not None
        client_left = False

        async def cancel_on_disconnect() -> None:
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left = True
            exchange.cancel()

        watch = asyncio.create_task(cancel_on_disconnect(), name="airlock-disconnect-watch")
        try:
            request = self.request
            queued = time.perf_counter()
            async with self.admission.enter(request.principal, request.model, request.cost):
                self.record.queue_wait = time.perf_counter() - queued
                await self._exchange(send)
        except AirlockError as error:
            self.metrics.rejected(error)
            await self._send_error(error.to_response(), send)
        except asyncio.CancelledError:
            # Every await of the exchange is inside this block, so the watch's cancellation always lands here.
            # Anything else that cancels this task (a shutdown) is passed on.
            if not client_left or exchange.uncancel() > 0:
                raise
        finally:
            watch.cancel()

    async def _exchange(self, send: Send) -> None:
        tried: Replica | None = None
        model, tenant = self.request.model, self.request.cache_salt
        for attempt in range(ATTEMPTS):
            # Prefer a replica not tried yet; the same one again only if it is still in the pool.
            replica = self.pool.pick(model, tenant, exclude=tried) or self.pool.pick(model, tenant)
            if replica is None:
                break
            if tried is not None:
                self.metrics.retries.inc()
            tried = replica
            replica.outstanding += 1
            try:
                upstream = await self._open(replica)
                if upstream is None:
                    continue
                await self._relay(replica, upstream, send, last=attempt == ATTEMPTS - 1)
                return
            except _TryElsewhere:
                continue
            finally:
                replica.outstanding -= 1
        raise EngineUnavailable(
            "no engine for this model is available right now; try again shortly",
            headers={"retry-after": str(self.retry_after_s)},
        )

    async def _open(self, replica: Replica) -> aiohttp.ClientResponse | None:
        """Send the request; None when it failed before the engine answered (so it may be retried)."""
        assert replica.session is not None, "the pool opens every replica's session when it starts"
        self.record.forwarded = time.perf_counter()
        errors = self.metrics.upstream_errors
        try:
            return await replica.session.post(replica.endpoint(self.path), data=self.request.body,
                                              headers=UPSTREAM_HEADERS)
        except aiohttp.ClientConnectorError:
            # Refused or no socket: the engine is down. Out of the pool until a health check says otherwise.
            errors.labels("connect_failed").inc()
            self.pool.mark_failed(replica)
        except (aiohttp.ServerDisconnectedError, aiohttp.ConnectionTimeoutError, aiohttp.ClientOSError):
            # Dropped before any answer (a kept-alive connection the engine had just closed, an engine too busy to
            # accept, or one that died): nothing reached the client yet, so another try is safe.
            errors.labels("dropped").inc()
            log.info("replica %d dropped a request before answering; retrying it", replica.index)
            self.pool.check_soon(replica)
        except TimeoutError as exc:
            # No answer within read_timeout_s (a long non-streaming answer), or no free connection: not retried,
            # the work may still be under way.
            errors.labels("timeout").inc()
            raise EngineTimeout("the model engine did not answer in time; try a smaller request or streaming") from exc
        except aiohttp.ClientError as exc:
            errors.labels("transport").inc()
            raise EngineFailed("the model engine failed to answer this request; try again") from exc
        return None

    async def _relay(self, replica: Replica, upstream: aiohttp.ClientResponse, send: Send, *, last: bool) -> None:
        try:
            if upstream.status >= 500:
                self.metrics.upstream_errors.labels("error_status").inc()
                self.pool.check_soon(replica)  # passive detection: a sick engine leaves the pool at once
                if upstream.status in RETRIED_STATUSES and not last:
                    raise _TryElsewhere
            if upstream.status >= 400:
                raw = await _read_bounded(upstream, MAX_ENGINE_ERROR_BYTES)
                await self._send_error(translate_engine_error(upstream.status, raw), send)
            elif upstream.headers.get("content-type", "").startswith("text/event-stream"):
                await self._relay_stream(replica, upstream, send, last=last)
            else:
                await self._relay_whole(replica, upstream, send, last=last)
        finally:
            # A whole answer leaves its connection for the next request; anything else (an answer cut short, a
            # client that left) closes it, and vLLM aborts the request.
            if upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()

    def _relayed_headers(
        self, upstream: aiohttp.ClientResponse, extra: dict[str, str] | None = None
    ) -> list[tuple[bytes, bytes]]:
        headers = {name: value for name, value in upstream.headers.items() if name.lower() in RELAYED_HEADERS}
        headers.update(NO_STORE)
        headers.update(extra or {})
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def _failed_before_first_byte(self, replica: Replica, send: Send, *, last: bool) -> None:
        """The engine broke before anything went to the client: another replica may take it, unless this was
        the last try."""
        self.metrics.upstream_errors.labels("broken_answer").inc()
        self.pool.check_soon(replica)
        if not last:
            raise _TryElsewhere
        await self._send_error(EngineFailed("the model engine stopped while answering").to_response(), send)

    async def _relay_whole(self, replica: Replica, upstream: aiohttp.ClientResponse, send: Send, *,
                           last: bool) -> None:
        # A non-streaming answer arrives at once; reading it whole lets an engine failure still become a retry or
        # a 502.
        try:
            content = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            await self._failed_before_first_byte(replica, send, last=last)
            return
        self.record.first_byte_now()
        replica.made_progress()
        counts = whole_answer_usage(content)
        if counts is not None:
            self.record.prompt_tokens, self.record.completion_tokens = counts
        self.status_code = upstream.status
        headers = self._relayed_headers(upstream, {"content-length": str(len(content))})
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _relay_stream(self, replica: Replica, upstream: aiohttp.ClientResponse, send: Send, *,
                            last: bool) -> None:
        # Commit late: the client's response starts only with the engine's first chunk, so an engine that fails
        # before it is replaced by another replica and the client never notices.
        read = upstream.content.readany  # b"" at the end (plain calls: an async iterator costs more per chunk)
        try:
            first = await read()
        except (aiohttp.ClientError, TimeoutError):
            await self._failed_before_first_byte(replica, send, last=last)
            return
        record = self.record
        record.first_byte_now()
        replica.made_progress()
        self.status_code = upstream.status
        headers = self._relayed_headers(upstream, {"x-accel-buffering": "no"})
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        usage = StreamUsage(self.request.remove_usage_event)

        async def pass_on(chunk: bytes) -> None:
            arrived = time.perf_counter()
            await self._pass_on(usage.feed(chunk), send)
            record.relay_s += time.perf_counter() - arrived
            record.chunks += 1

        try:
            await pass_on(first)
            while chunk := await read():
                replica.made_progress()
                await pass_on(chunk)
            await self._pass_on(usage.rest(), send)
        except (aiohttp.ClientError, TimeoutError):
            self.metrics.upstream_errors.labels("broken_stream").inc()
            log.warning("replica %d: a stream broke before its end", replica.index)
            self.pool.check_soon(replica)
            event = error_body("the model engine stopped while answering", "server_error", "engine_error")
            # Only whole events went on, so the error event starts cleanly (a half-received event is dropped).
            await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": True})
        finally:
            if usage.counts is not None:
                record.prompt_tokens, record.completion_tokens = usage.counts
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _pass_on(body: bytes, send: Send) -> None:
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _send_error(self, response: Response, send: Send) -> None:
        self.status_code = response.status_code
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": bytes(response.body), "more_body": False})


async def _read_bounded(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in upstream.content.iter_any():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
    except (aiohttp.ClientError, TimeoutError):
        pass
    return b"".join(chunks)[:limit]

