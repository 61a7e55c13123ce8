"""Token counts read from engine answers, and the usage event the gateway asked for removed again."""

from __future__ import annotations

import json

from server.usage import MAX_PARTIAL_BYTES, StreamUsage, ask_for_usage, whole_answer_usage

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"Total: 42"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":31,"completion_tokens":7,"total_tokens":38}}\n\n'
DONE = b"data: [DONE]\n\n"


def relay(usage: StreamUsage, pieces: list[bytes]) -> bytes:
    return b"".join(usage.feed(piece) for piece in pieces) + usage.rest()


def test_the_usage_event_is_removed_even_when_it_arrives_split() -> None:
    stream = CHUNK + CHUNK + USAGE + DONE
    for cut in range(1, len(stream)):
        usage = StreamUsage(remove_usage_event=True)
        assert relay(usage, [stream[:cut], stream[cut:]]) == CHUNK + CHUNK + DONE, cut
        assert usage.counts == (31, 7)


def test_a_client_that_asked_for_usage_keeps_it() -> None:
    usage = StreamUsage(remove_usage_event=False)
    assert relay(usage, [CHUNK, USAGE, DONE]) == CHUNK + USAGE + DONE
    assert usage.counts == (31, 7)


def test_content_that_mentions_usage_is_passed_on_untouched() -> None:
    talk = b'data: {"choices":[{"index":0,"delta":{"content":"\\"usage\\": 3"}}]}\n\n'
    usage = StreamUsage(remove_usage_event=True)
    assert relay(usage, [talk, DONE]) == talk + DONE
    assert usage.counts is None


def test_an_event_that_never_ends_is_not_held_back() -> None:
    usage = StreamUsage(remove_usage_event=True)
    assert usage.feed(b"data: x") == b""
    big = b"y" * (MAX_PARTIAL_BYTES + 1)
    assert usage.feed(big) == b"data: x" + big


def test_streams_are_asked_for_usage_unless_the_client_chose() -> None:
    plain = {"stream": True}
    assert ask_for_usage(plain) and plain["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert not ask_for_usage(asked) and asked["stream_options"] == {"include_usage": True}
    continuous = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert not ask_for_usage(continuous) and "include_usage" not in continuous["stream_options"]
    assert not ask_for_usage({"stream": False})
    odd = {"stream": True, "stream_options": "yes"}
    assert not ask_for_usage(odd) and odd["stream_options"] == "yes"  # the engine says what is wrong with it


def test_whole_answers_say_their_usage() -> None:
    answer = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
    assert whole_answer_usage(json.dumps(answer).encode()) == (5, 9)
    assert whole_answer_usage(b'{"usage": "none"}') is None
    assert whole_answer_usage(b"not json, with \"usage\"") is None
