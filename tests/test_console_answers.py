"""The console's answers in the real headless Chromium, through the real gateway: markdown rendered and sanitized,
copied, errors shown beside their question with the question and its attachments put back, the view following a
stream until the user scrolls up, and the messages for a user the rules allow no model and for models not ready yet.

The one fake: the engine. The real demo model answers noise, and these tests need answers they can check (a table,
a hostile payload, an error, a long stream that ends on cue), so ``ScriptedEngine`` is a small real HTTP server
speaking vLLM's OpenAI API (health, models, streamed chat completions) on a unix socket, behind the real gateway
(``create_gateway``, real uvicorn); its answer is chosen by the question asked. Screenshots go to
test-artifacts/console/.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.app import create_gateway
from server.config import load_settings

from . import test_console
from .conftest import Credentials
from .images import image_bytes
from .servers import ThreadedServer, free_port, wait_until_ready
from .test_console import ARTIFACTS, Recorder

browser = test_console.browser  # the same Chromium fixture (Debian's, headless)

MODEL = "scripted-vl"
WAIT_MS = 30_000
MARKDOWN = """Here is the **summary**:

| Item | Amount |
|:-----|-------:|
| Paper | 12.50 |
| Ink | 40.00 |

- first point
- second point

1. one
2. two

```python
print("hello")
```

See [the docs](https://example.org/docs), [write](mailto:someone@example.org) or [this server](/v1/models).
"""
# Each line tries to run script or load something; window.__pwned is what any of them would set.
HOSTILE = """Look: <img src=x onerror="window.__pwned = 'img'"> and <script>window.__pwned = 'script'</script>

[click me](javascript:window.__pwned='link') and ![a picture](/console/app.css?image) and
<a href="javascript:window.__pwned='a'">raw link</a> <a href="/v1/models" onclick="window.__pwned='click'">here</a>

<svg onload="window.__pwned='svg'"><image href="/console/app.css?svg"/></svg><iframe src="/?frame"></iframe>
<form action="/?form"><input name="q"><button>go</button></form><style>body { display: none }</style>
<math><mi xlink:href="javascript:window.__pwned='math'">m</mi></math>
"""
ENGINE_REFUSAL = "the scripted engine refuses this question"
MAX_BODY_BYTES = 2 * 1024 * 1024


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _delta(text: str) -> bytes:
    return _event({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def _pieces(text: str, size: int = 12) -> list[str]:
    return [text[start:start + size] for start in range(0, len(text), size)]


@dataclass
class ScriptedEngine:
    """A stand-in for vLLM whose answer depends on the question (the text of the last user message)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    # The long answer goes on until the test sets this.
    release: threading.Event = field(default_factory=threading.Event)
    # Answers a test chooses: the question (whole) -> the answer streamed back.
    answers: dict[str, str] = field(default_factory=dict)

    def app(self) -> Starlette:
        async def health(_: Request) -> Response:
            return JSONResponse({})

        async def models(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1,
                                                             "owned_by": "vllm", "max_model_len": 8192}]})

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            question = question_of(body)
            if question.startswith("fail"):
                return JSONResponse({"error": {"message": ENGINE_REFUSAL, "type": "BadRequestError", "param": None,
                                               "code": 400}}, status_code=400)
            return StreamingResponse(self.stream(question), media_type="text/event-stream")

        return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                                 Route("/v1/chat/completions", chat, methods=["POST"])])

    async def stream(self, question: str) -> AsyncIterator[bytes]:
        if question.startswith("long"):
            for number in range(1, 5000):
                if self.release.is_set():
                    break
                yield _delta(f"Line {number} of a long answer that the view should follow.\n")
                await asyncio.sleep(0.01)
        elif question.startswith("break"):
            yield _delta("The first words")
            await asyncio.sleep(0.3)  # relayed to the browser before the engine dies: an SSE error event follows
            raise RuntimeError("the scripted engine dies mid-answer")
        else:
            text = self.answers.get(question) or (HOSTILE if question.startswith("hostile") else MARKDOWN)
            for piece in _pieces(text):
                yield _delta(piece)
                await asyncio.sleep(0.005)
        yield _event({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                      "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield b"data: [DONE]\n\n"


def question_of(body: dict[str, Any]) -> str:
    content = [message for message in body["messages"] if message["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part["type"] == "text")


@dataclass
class Scripted:
    url: str
    engine: ScriptedEngine


def serve_gateway(upstream: str, credentials: Credentials) -> tuple[ThreadedServer, str]:
    port = free_port()
    settings = load_settings(
        # A request's bytes kept small: the console's tests of documents fill it with a few megabytes.
        gateway={"port": port, "health_interval_s": 0.5, "max_body_bytes": MAX_BODY_BYTES},
        auth={"htpasswd_file": str(credentials.htpasswd), "local_groups": {"vision": ["alice"]}},
        # The scripted model is for the vision group: bob may use no model at all.
        authorization={"rules": [{"models": ["scripted-*"], "groups": ["vision"]}]},
        # Fewer images a request than the default (16), so a 10-page document meets the limit in the console tests.
        screening={"max_images_per_request": 8},
    )
    return ThreadedServer(create_gateway(settings, [upstream]).api, host="127.0.0.1", port=port), \
        f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[Scripted]:
    engine = ScriptedEngine()
    socket = tmp_path_factory.mktemp("scripted") / "engine.sock"
    server, url = serve_gateway(f"unix:{socket}", credentials)
    with ThreadedServer(engine.app(), uds=str(socket)), server:
        try:
            yield Scripted(wait_until_ready(url), engine)
        finally:
            engine.release.set()  # a long answer still streaming ends, and the servers can stop


def signed_in(browser: Browser, url: str, user: str, password: str, **options: Any) -> tuple[BrowserContext, Page,
                                                                                             Recorder]:
    context = browser.new_context(viewport={"width": 1000, "height": 700}, **options)
    # Any Content-Security-Policy violation (a script or style the policy stopped) is noted for the test.
    context.add_init_script("""window.__violations = [];
        document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));""")
    page = context.new_page()
    recorder = Recorder(page)
    page.goto(f"{url}/")
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    return context, page, recorder


def ask(page: Page, question: str) -> Any:
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    return page.locator("#conversation article:last-child")


def shot(page: Page, name: str) -> None:
    """What the window shows (a full-page capture would paint the pinned question box over the conversation)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def only_own_origin(recorder: Recorder, origin: str) -> None:
    elsewhere = [url for url, _, _ in recorder.requests if not url.startswith((origin, f"blob:{origin}/"))]
    assert not elsewhere, elsewhere


def test_answers_are_markdown_sanitized_and_copied(browser: Browser, scripted: Scripted,
                                                  credentials: Credentials) -> None:
    context, page, recorder = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"],
                                        permissions=["clipboard-read", "clipboard-write"])
    page.wait_for_selector("#model option", state="attached")
    assert page.is_hidden("#demo-banner")  # not the demo model here

    reply = ask(page, "markdown please")
    answer = reply.locator(".answer")
    assert answer.locator("table tr").count() == 3
    assert answer.locator("table th").all_inner_texts() == ["Item", "Amount"]
    assert answer.locator("td[align=right]").first.inner_text() == "12.50"
    assert answer.locator("ul > li").all_inner_texts() == ["first point", "second point"]
    assert answer.locator("ol > li").count() == 2
    assert answer.locator("pre > code").inner_text().strip() == 'print("hello")'
    assert answer.locator("strong").inner_text() == "summary"
    links = answer.locator("a")
    assert links.nth(0).get_attribute("href") == "https://example.org/docs"
    assert links.nth(0).get_attribute("rel") == "noopener noreferrer"
    assert links.nth(0).get_attribute("target") == "_blank"
    assert links.nth(1).get_attribute("href") == "mailto:someone@example.org"
    assert links.nth(2).get_attribute("href") is None  # only http(s) and mailto links survive
    shot(page, "10-markdown")

    # Copy gives the markdown source, and says so on the button.
    reply.locator("button.copy").click()
    page.wait_for_selector("#conversation article:last-child button.copy:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN
    # Neither library needs what the policy forbids (eval, inline script or style).
    assert page.evaluate("window.__violations") == []

    reply = ask(page, "hostile please")
    shot(page, "11-sanitized")
    answer = reply.locator(".answer")
    assert "Look:" in answer.inner_text()
    assert answer.locator("img, script, svg, iframe, form, input, style, math").count() == 0
    assert answer.locator("[onerror], [onclick], [onload]").count() == 0
    assert page.evaluate("[...document.querySelectorAll('#conversation a')].every(a => !a.href || "
                         "/^(https?|mailto):/.test(a.href))")
    answer.locator("a", has_text="click me").click()
    answer.locator("a", has_text="raw link").click()
    assert page.evaluate("window.__pwned") is None
    assert page.is_visible("#conversation")  # no hostile style hid the page
    # Nothing the answer named was fetched, not even from this server (the session cookie would go along).
    fetched = [url for url, _, _ in recorder.requests if "?" in url or url.endswith("/x")]
    assert not fetched, fetched
    # (The policy reports the payload's inline handlers as DOMPurify parses it in its inert document: were the
    # sanitizer ever to let one through, the policy would still stop it.)
    # The conversation so far went with the next question: two answers, as their markdown source.
    reply = ask(page, "markdown please")
    history = scripted.engine.requests[-1]["messages"]
    assert [message["content"] for message in history if message["role"] == "assistant"] == [MARKDOWN, HOSTILE]
    only_own_origin(recorder, scripted.url)
    context.close()


def test_an_error_is_shown_beside_its_question_which_comes_back_for_another_try(
    browser: Browser, scripted: Scripted, credentials: Credentials, tmp_path: Path,
) -> None:
    context, page, recorder = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")
    picture = tmp_path / "receipt.png"
    picture.write_bytes(image_bytes("PNG", (320, 240)))

    # The engine refuses (an HTTP error before the answer): the message beside the question, question and image back.
    page.set_input_files("#files", str(picture))
    page.locator("#thumbnails li").first.wait_for()
    reply = ask(page, "fail this one, please")
    assert reply.locator(".turn-error").inner_text().startswith(ENGINE_REFUSAL.capitalize() + ". ")
    assert "back in the question box" in reply.locator(".turn-error").inner_text()
    assert page.input_value("#question") == "fail this one, please"
    assert page.locator("#thumbnails li").count() == 1
    assert page.is_hidden("#error")  # the top of the page is for the page's own problems
    shot(page, "12-error-beside-question")

    # The engine dies mid-answer (an SSE error event after the first words): the words stay, the error follows.
    page.locator("#thumbnails li button").click()
    page.fill("#question", "")
    reply = ask(page, "break off, please")
    assert reply.locator(".answer").inner_text().startswith("The first words")
    assert reply.locator(".turn-error").is_visible()
    assert page.input_value("#question") == "break off, please"

    # Asked again, it goes through, with the image that came back.
    page.set_input_files("#files", str(picture))
    page.locator("#thumbnails li").first.wait_for()
    page.fill("#question", "markdown please")
    with page.expect_request(f"{scripted.url}/v1/chat/completions") as sent:
        page.click("#send")
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    body = json.loads(sent.value.post_data or "{}")
    # The failed turns are not part of the conversation sent.
    assert [message["role"] for message in body["messages"]] == ["user"]
    assert [part["type"] for part in body["messages"][0]["content"]] == ["text", "image_url"]
    assert page.locator("#conversation article:last-child .answer table").count() == 1
    only_own_origin(recorder, scripted.url)
    context.close()


def test_the_view_follows_the_stream_until_the_user_scrolls_up(browser: Browser, scripted: Scripted,
                                                               credentials: Credentials) -> None:
    context, page, _ = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")
    scripted.engine.release.clear()
    page.fill("#question", "long answer, please")
    page.click("#send")
    lines = "document.querySelector('#conversation article:last-child .answer').innerText.split('\\n').length"
    at_bottom = "scrollY + innerHeight >= document.documentElement.scrollHeight - 4"
    page.wait_for_function(f"() => {lines} > 80", timeout=WAIT_MS)
    page.wait_for_function(f"() => scrollY > 0 && {at_bottom}", timeout=WAIT_MS)
    # The question box stays in view, at the bottom of the window.
    box = page.locator("#ask-form").bounding_box()
    assert box is not None and abs(box["y"] + box["height"] - 700) < 2

    page.mouse.move(500, 200)
    page.mouse.wheel(0, -100_000)
    page.wait_for_function("() => scrollY === 0", timeout=WAIT_MS)
    so_far = page.evaluate(lines)
    page.wait_for_function(f"() => {lines} > {so_far + 40}", timeout=WAIT_MS)
    assert page.evaluate("scrollY") == 0  # the answer grew; the view stayed where the user put it
    shot(page, "13-scrolled-up")

    page.mouse.wheel(0, 1_000_000)  # back to the bottom: following again
    page.wait_for_function(f"() => {at_bottom}", timeout=WAIT_MS)
    scrolled = page.evaluate("scrollY")
    page.wait_for_function(f"() => scrollY > {scrolled + 200} && {at_bottom}", timeout=WAIT_MS)
    scripted.engine.release.set()
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the question box still at the bottom
    box = page.locator("#ask-form").bounding_box()
    assert box is not None and abs(box["y"] + box["height"] - 844) < 2
    shot(page, "14-phone-following")
    context.close()


def test_a_user_allowed_no_model_is_told_so_and_whom_to_ask(browser: Browser, scripted: Scripted,
                                                            credentials: Credentials, tmp_path: Path) -> None:
    context, page, recorder = signed_in(browser, scripted.url, "bob", credentials.passwords["bob"])
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "may not use any of the models" in message and "Ask whoever runs Airlock" in message
    assert page.locator("#model option").count() == 0
    # Nothing the page learnt names the model bob may not use.
    answers = page.evaluate("""Promise.all(['/console/api/session', '/v1/models'].map(path =>
        fetch(path, {headers: {'x-airlock-console': '1'}}).then(r => r.text())))""")
    assert all(MODEL not in answer for answer in answers), answers
    shot(page, "15-no-model-allowed")
    only_own_origin(recorder, scripted.url)
    context.close()

    # A gateway whose engine is not there yet: the models are not ready, which is another message.
    server, url = serve_gateway(f"unix:{tmp_path / 'nothing.sock'}", credentials)
    with server:
        context, page, _ = signed_in(browser, url, "alice", credentials.passwords["alice"])
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error") == "No model is ready yet. Try again in a minute."
        context.close()


def test_a_session_that_ends_takes_its_conversation_with_it(browser: Browser, scripted: Scripted,
                                                            credentials: Credentials) -> None:
    """The session ends behind the page's back (expired, revoked, signed out in another tab): the next question meets
    a 401, and the sign-in form that follows holds nothing of the conversation, for whoever signs in next."""
    context, page, _ = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")
    ask(page, "alice-private-question-7f3a")
    assert "alice-private-question-7f3a" in page.inner_text("#conversation")
    ended = page.evaluate("""async () => {
        const session = await (await fetch('/console/api/session', {headers: {'x-airlock-console': '1'}})).json();
        const out = await fetch('/console/api/sign-out', {method: 'POST', body: '{}', headers: {
            'x-airlock-console': '1', 'x-airlock-csrf': session.csrf, 'content-type': 'application/json'}});
        return out.status;
    }""")
    assert ended in (200, 204)
    page.fill("#question", "alice-second-question-9c1d")
    page.click("#send")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.inner_text("#conversation") == ""
    assert page.input_value("#question") == ""
    page.fill("#username", "bob")
    page.fill("#password", credentials.passwords["bob"])
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    shown = page.inner_text("body")
    assert "alice-private-question-7f3a" not in shown and "alice-second-question-9c1d" not in shown
    context.close()
