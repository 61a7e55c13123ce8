"""Continuous batching survives the gateway, and a client that leaves frees its batch slot in the engine."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import LONG_ANSWER, Stack
from .servers import wait_until_ready

pytestmark = pytest.mark.engine

REQUESTS = 32
SEQUENTIAL_REFERENCE = 4
# A gateway that serialised requests would make every decode step a single-token one. With this tiny CPU model vLLM's
# own API server admits a burst over a second or two, so the first and last requests decode alone for a while (seen:
# 2 to 1423 single-token steps of 4064 at 128 tokens); long answers make that head and tail a smaller share.
BATCH_TOKENS = 256
MAX_UNBATCHED_SHARE = 0.5
BATCH_ROUNDS = 3
CHUNKS_BEFORE_LEAVING = 5
DISCONNECT_ATTEMPTS = 3


async def one_request(client: openai.AsyncOpenAI, model: str, tokens: int) -> int:
    # Text only: vLLM preprocesses images in its single API-server process, which on a 2-core machine is starved
    # by the engine itself and lets requests in one by one. That would measure this machine, not batching.
    answer = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Read this receipt and list every line item."}],
        max_tokens=tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert answer.usage is not None
    return answer.usage.completion_tokens


def single_token_steps(stack: Stack) -> float:
    """Engine steps that produced one token: a request decoding alone (vLLM's iteration_tokens histogram)."""
    with stack.engine_client() as engine:
        lines = engine.get("/metrics").text.splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("vllm:iteration_tokens_total_bucket{") and 'le="1.0"' in line]
    assert values, "vllm:iteration_tokens_total is missing from the engine's metrics"
    return sum(values)


def test_concurrent_requests_through_the_gateway_share_engine_steps(stack: Stack) -> None:
    # Speed belongs in the benchmarks; what is asserted here is the mechanism. Requests that reach the engine one
    # at a time decode alone: one token per engine step. Batched, the steps carry many tokens each.
    async def steps_of_one(client: openai.AsyncOpenAI, sequential: int, concurrent: int) -> float:
        stack.wait_for_running(0, 120)
        # A burst straight to vLLM slows its /health past the gateway's patience, and the gateway, which saw none of
        # that traffic, may have taken the replica out for a moment: it is back once /health answers again.
        wait_until_ready(stack.base_url, 60)
        before = single_token_steps(stack)
        async with client:
            for _ in range(sequential):
                assert await one_request(client, stack.model, BATCH_TOKENS) == BATCH_TOKENS
            counts = await asyncio.gather(*(one_request(client, stack.model, BATCH_TOKENS) for _ in range(concurrent)))
            assert counts == [BATCH_TOKENS] * concurrent
        stack.wait_for_running(0, 120)
        return single_token_steps(stack) - before

    def through_gateway() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=300)

    def straight_to_engine() -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(stack.engine_socket)), timeout=300)
        return openai.AsyncOpenAI(base_url="http://engine/v1", api_key="unused", max_retries=0, http_client=http)

    alone = asyncio.run(steps_of_one(through_gateway(), sequential=SEQUENTIAL_REFERENCE, concurrent=0))
    # The yardstick works: requests one by one decode in single-token steps, one per token after the first.
    assert alone >= SEQUENTIAL_REFERENCE * (BATCH_TOKENS - 1) * 0.9, alone
    unbatched = REQUESTS * (BATCH_TOKENS - 1)
    # vLLM's own API server on this 2-core machine sometimes lets a burst in one request at a time (seen: 0 to 4845
    # of 8160 steps decoding alone, straight to vLLM, in consecutive bursts). So each round measures vLLM alone
    # next to the gateway; a gateway that serialised requests would show no batching in any round.
    rounds = []
    for _ in range(BATCH_ROUNDS):
        direct = asyncio.run(steps_of_one(straight_to_engine(), sequential=0, concurrent=REQUESTS))
        gateway = asyncio.run(steps_of_one(through_gateway(), sequential=0, concurrent=REQUESTS))
        rounds.append((direct, gateway))
        print(f"\nsingle-token engine steps for {REQUESTS} at once ({unbatched} if none were batched): "
              f"{direct:.0f} straight to vLLM, {gateway:.0f} through the gateway")
        if gateway < unbatched * MAX_UNBATCHED_SHARE:
            break
    assert rounds[-1][1] < unbatched * MAX_UNBATCHED_SHARE, f"no batching through the gateway in any round: {rounds}"


def test_client_disconnect_mid_stream_aborts_the_engine_request(client: openai.OpenAI, stack: Stack) -> None:
    # Only ordering is asserted. With this tiny model the CPU engine outruns vLLM's own API server, whose output loop
    # then starves its HTTP side (its /metrics included): now and then no chunk leaves vLLM until the whole answer is
    # generated. Such an attempt looks like a failed abort (the whole answer generated), so it is retried; if every
    # attempt generates the whole answer, the test fails.
    for _attempt in range(DISCONNECT_ATTEMPTS):
        stack.wait_for_running(0, 120)  # nothing left over from earlier tests or attempts
        wait_until_ready(stack.base_url, 60)
        generated_before, finished_before = stack.generated_tokens(), stack.finished_requests()
        with client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Write a very long story."}],
            max_tokens=LONG_ANSWER,  # a minute or more of generation on this CPU
            stream=True,
            extra_body={"ignore_eos": True},
        ) as stream:
            chunks = iter(stream)
            for _ in range(CHUNKS_BEFORE_LEAVING):
                assert next(chunks).choices
        # Left: the metrics are read only now, as reading them mid-stream can wait for the answer's end.
        stack.wait_for_running(0, 120)  # vLLM aborted it and freed the batch slot
        generated = stack.generated_tokens() - generated_before
        if generated >= LONG_ANSWER:
            continue  # the chunks came only after the engine had finished (or nothing aborted it): try again
        assert stack.finished_requests() == finished_before, "the answer ran to its end: nothing aborted it"
        return
    pytest.fail(f"in {DISCONNECT_ATTEMPTS} attempts the engine generated the whole answer for a departed client")
