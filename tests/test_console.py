"""The browser console in a real headless Chromium (Debian's, driven by Playwright) against the real stack: sign in
with a password and through the real OpenID provider, upload images, ask, read a streamed answer, get structured
output with boxes drawn, clear, sign out; and the page never talks to another origin or keeps anything in the
browser. Screenshots of each step go to test-artifacts/console/."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jsonschema
import pytest
from playwright.sync_api import Browser, Page, Request, sync_playwright

from server.console import CONTENT_SECURITY_POLICY

from .conftest import ROOT, Credentials, Stack
from .images import image_bytes
from .servers import OidcProvider

pytestmark = pytest.mark.engine

ARTIFACTS = ROOT / "test-artifacts" / "console"
WAIT_MS = 180_000
BOX_SCHEMA = {
    "type": "object",
    "properties": {"elements": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["button", "field"]},
                       "bbox_2d": {"type": "array", "minItems": 4, "maxItems": 4,
                                   "items": {"type": "integer", "enum": [100, 250, 600, 900]}}},
        "required": ["label", "bbox_2d"], "additionalProperties": False}}},
    "required": ["elements"], "additionalProperties": False,
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for the console tests (make install puts it there as root)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pictures")
    made = {"receipt.png": image_bytes("PNG", (320, 240)), "scan.jpg": image_bytes("JPEG", (3000, 2000))}
    for name, data in made.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in made}


class Recorder:
    """Every request the browser makes, with the page it was made for."""

    def __init__(self, page: Page) -> None:
        self.requests: list[tuple[str, str, bool]] = []
        page.on("request", self._seen)
        page.on("console", lambda message: print("CONSOLE", message.type, message.text))
        page.on("pageerror", lambda error: print("PAGEERROR", error))

    def _seen(self, request: Request) -> None:
        self.requests.append((request.url, request.frame.url, request.is_navigation_request()))


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def last_answer(page: Page) -> Any:
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    return page.locator("#conversation article:last-child .answer")


def count_answer_updates(page: Page) -> None:
    """Count the changes to the answer being written (each server-sent event adds to it)."""
    page.evaluate("""() => {
        if (window.__updates === undefined) {
            new MutationObserver(() => { window.__updates += 1; }).observe(
                document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
        }
        window.__updates = 0;
    }""")


def nothing_kept_in_the_browser(page: Page) -> None:
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("indexedDB.databases().then(list => list.length)") == 0
    # The only cookie is the server's HttpOnly session cookie (scripts cannot read it).
    assert page.evaluate("document.cookie") == ""


def test_the_page_and_its_assets_come_with_a_strict_policy(stack: Stack) -> None:
    types = {"/": "text/html", "/console/app.js": "text/javascript", "/console/app.css": "text/css",
             "/console/vendor/marked.umd.js": "text/javascript", "/console/vendor/purify.js": "text/javascript"}
    for path, media_type in types.items():
        response = httpx.get(f"{stack.base_url}{path}")
        assert response.status_code == 200
        assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    # Only the vendored scripts: their manifest and licences ship in the package, unserved.
    for path in ("/console/vendor/manifest.json", "/console/vendor/marked.LICENSE", "/console/vendor/..%2fapp.js"):
        assert httpx.get(f"{stack.base_url}{path}").status_code == 404
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    page = httpx.get(f"{stack.base_url}/").text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assert httpx.get(f"{stack.base_url}/console/nothing.js").status_code == 404


def test_password_sign_in_images_streamed_answer_structured_output_clear_and_sign_out(
    browser: Browser, stack: Stack, credentials: Credentials, pictures: dict[str, Path],
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    recorder = Recorder(page)
    origin = stack.base_url
    response = page.goto(f"{origin}/")
    assert response is not None and response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    page.wait_for_selector("#password-form:not([hidden])")
    assert page.locator("#privacy").inner_text().startswith("Nothing you send is kept.")
    shot(page, "01-sign-in")

    page.fill("#username", "bob")
    page.fill("#password", "not the password")
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "Wrong user name or password" in page.inner_text("#error")
    page.fill("#username", "bob")
    page.fill("#password", credentials.passwords["bob"])
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    assert page.inner_text("#who") == "Signed in as bob"
    page.wait_for_selector("#model option", state="attached")
    assert page.eval_on_selector("#model", "select => select.value") == stack.model
    # The stack serves the random-weight demo model: the page says its answers are noise.
    assert page.is_visible("#demo-banner") and "answers are noise" in page.inner_text("#demo-banner")

    # Two images: a small one as it is, a 6 MP scan scaled down in the browser before it is sent.
    page.set_input_files("#files", [str(pictures["receipt.png"]), str(pictures["scan.jpg"])])
    page.locator("#thumbnails li").nth(1).wait_for()
    captions = page.locator("#thumbnails li span").all_inner_texts()
    times = "\N{MULTIPLICATION SIGN}"
    assert captions[0] == f"320{times}240" and captions[1].endswith("(scaled down)")
    width, height = (int(n) for n in captions[1].split(" ")[0].split(times))
    assert width * height <= 4_000_000 and abs(width / height - 1.5) < 0.01
    shot(page, "02-images")

    page.select_option("#length", "256")
    page.fill("#question", "What is written on this receipt?")
    count_answer_updates(page)
    with page.expect_response(f"{origin}/v1/chat/completions") as asked:
        page.click("#send")
    sent = json.loads(asked.value.request.post_data or "{}")
    assert sent["stream"] is True and sent["max_tokens"] == 256
    assert [part["type"] for part in sent["messages"][-1]["content"]] == ["text", "image_url", "image_url"]
    assert asked.value.headers["content-type"].startswith("text/event-stream")
    assert last_answer(page).inner_text().strip()
    assert page.locator("#thumbnails li").count() == 0  # the images went with the question
    # Written piece by piece, as the events came. vLLM on this CPU sometimes sends a short answer's events in one
    # burst, and the tiny model may end after a token or two: of up to three answers, one must come in pieces.
    updates = [page.evaluate("window.__updates")]
    while updates[-1] <= 3 and len(updates) < 3:
        count_answer_updates(page)
        page.fill("#question", "And what else is written there?")
        with page.expect_response(f"{origin}/v1/chat/completions"):
            page.click("#send")
        last_answer(page)
        updates.append(page.evaluate("window.__updates"))
    assert updates[-1] > 3, f"every answer appeared at once (changes per answer: {updates})"
    shot(page, "03-answer")

    # Structured output: a JSON answer that follows the schema, its boxes drawn over the image.
    page.check("input[name=mode][value=json]")
    page.fill("#schema", json.dumps(BOX_SCHEMA))
    page.set_input_files("#files", str(pictures["receipt.png"]))
    page.fill("#question", "Where are the buttons? Answer with their boxes.")
    # "As long as the model allows": no max_tokens at all, the engine's default (bounded by the context) applies.
    page.select_option("#length", "")
    with page.expect_response(f"{origin}/v1/chat/completions") as asked:
        page.click("#send")
    assert "max_tokens" not in json.loads(asked.value.request.post_data or "{}")
    assert asked.value.status == 200
    document = json.loads(last_answer(page).locator("pre.json").inner_text())
    jsonschema.validate(document, BOX_SCHEMA)
    assert page.locator("#conversation article:last-child figure.overlay svg rect").count() == \
        len(document["elements"])
    shot(page, "04-structured-output")

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot(page, "05-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.click("#clear")
    assert page.locator("#conversation article").count() == 0
    nothing_kept_in_the_browser(page)
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.evaluate("fetch('/console/api/session').then(r => r.json()).then(s => s.signed_in)") is False
    # (as the page asks: a request without the console's header would get a Basic challenge and a password box)
    assert page.evaluate("fetch('/v1/models', {headers: {'x-airlock-console': '1'}}).then(r => r.status)") == 401
    shot(page, "06-signed-out")

    # blob: URLs are the page's own thumbnails, made in the browser from the chosen files.
    elsewhere = [url for url, _, _ in recorder.requests if not url.startswith((origin, f"blob:{origin}/"))]
    assert not elsewhere, elsewhere
    context.close()


def test_oidc_sign_in_with_pkce_ask_and_sign_out(browser: Browser, stack: Stack, oidc_provider: OidcProvider) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    recorder = Recorder(page)
    origin = stack.base_url
    page.goto(f"{origin}/")
    page.wait_for_selector("#oidc-sign-in:not([hidden])")
    with page.expect_request(lambda request: request.url.startswith(f"{oidc_provider.url}/oauth2/authorize")) as went:
        page.click("#oidc-link")
    query = parse_qs(urlparse(went.value.url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) >= 43
    assert query["response_type"] == ["code"] and query["client_id"] == ["airlock"]
    assert query["nonce"][0] and query["state"][0]
    assert query["redirect_uri"] == [f"{origin}/console/callback"]
    page.wait_for_selector("input[name=sub]", timeout=WAIT_MS)
    shot(page, "07-identity-provider")
    page.fill("input[name=sub]", "dana@example.org")
    page.click("form button[type=submit]:has-text('Authorize')")
    page.wait_for_selector("#workspace:not([hidden])", timeout=WAIT_MS)
    assert page.inner_text("#who") == "Signed in as dana@example.org"
    assert page.url == f"{origin}/"

    page.wait_for_selector("#model option", state="attached")
    page.select_option("#length", "256")
    page.fill("#question", "Say hello.")
    page.press("#question", "Control+Enter")
    assert last_answer(page).inner_text().strip()
    shot(page, "08-oidc-answer")
    nothing_kept_in_the_browser(page)
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")

    # The console talked only to its own origin; the provider was only ever a page the browser went to.
    console_requests = [(url, navigation) for url, frame, navigation in recorder.requests if frame.startswith(origin)]
    assert console_requests
    for url, navigation in console_requests:
        assert url.startswith((origin, f"blob:{origin}/")) or (navigation and url.startswith(oidc_provider.url)), url
    context.close()


def test_a_session_cookie_alone_cannot_send_requests(stack: Stack, credentials: Credentials) -> None:
    # Without the page's CSRF token, a request riding on the cookie is refused, whatever a hostile page tries.
    with httpx.Client(base_url=stack.base_url) as browser_like:
        signed = browser_like.post("/console/api/sign-in", json={"username": "alice",
                                                                 "password": credentials.passwords["alice"]})
        assert signed.status_code == 200
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain http here; Secure under TLS or console.public_url https
        question = {"model": stack.model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        refused = browser_like.post("/v1/chat/completions", json=question)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        answered = browser_like.post("/v1/chat/completions", json=question,
                                     headers={"x-airlock-csrf": signed.json()["csrf"]})
        assert answered.status_code == 200, answered.text
        assert browser_like.get("/v1/models").status_code == 200  # reads need no token
        browser_like.post("/console/api/sign-out", headers={"x-airlock-csrf": signed.json()["csrf"]})
        assert browser_like.get("/v1/models").status_code == 401
    # Failed sign-ins from this address are slowed down (up to 5 s each): the suite has made many.
    wrong = httpx.post(f"{stack.base_url}/console/api/sign-in", json={"username": "alice", "password": "nope"},
                       timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid or missing credentials"
    malformed = httpx.post(f"{stack.base_url}/console/api/sign-in", json={"username": ""})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
