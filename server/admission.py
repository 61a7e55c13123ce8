"""Who may start a request now: the user's own limits first (429), then the model's fair queue (503 on timeout).

A request's cost for the queue is an estimate in tokens, made from what screening already knows: the prompt's
characters, the images' sizes (from their headers) as the engine's processor will resize them (the engines' image
budget: ``EngineLimits``), and the most it may generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from .auth import Principal
from .config import AdmissionSettings
from .engine_limits import EngineLimits
from .fairqueue import Capacity, FairQueue
from .limits import UserLimits
from .shared_limits import SharedLimitsClient, SharedUserLimits

CHARS_PER_TOKEN = 4


class Admission:
    def __init__(self, settings: AdmissionSettings, capacity: Callable[[str], Capacity], max_tokens_limit: int,
                 engine_limits: EngineLimits, context_of: Callable[[str], int | None] = lambda _model: None,
                 shared: SharedLimitsClient | None = None) -> None:
        """``max_tokens_limit``: what a request that names no ``max_tokens`` may generate at most (the engine's
        default, ``screening.max_tokens_limit``); ``engine_limits``: the engines' image budget; ``context_of``: a
        model's context (max_model_len) where the engines say, which also bounds what a request generates;
        ``shared``: the limits server's client, which counts users' own limits for every gateway (started and
        closed by the caller)."""
        self._context_of = context_of
        self._settings = settings
        self._engine_limits = engine_limits
        self._max_tokens_limit = max_tokens_limit
        self._capacity = capacity
        self._limits = UserLimits(settings)
        self._shared = SharedUserLimits(shared, self._limits) if shared is not None else None
        self._queues: dict[str, FairQueue] = {}

    def queue(self, model: str) -> FairQueue:
        """The model's queue (models come from the engines, so this table stays small)."""
        if model not in self._queues:
            self._queues[model] = FairQueue(self._settings, lambda: self._capacity(model))
        return self._queues[model]

    def queues(self) -> list[tuple[str, FairQueue]]:
        """Every model's queue so far, for the metrics."""
        return list(self._queues.items())

    @property
    def shared_limits(self) -> SharedLimitsClient | None:
        """The limits server's client, when users' limits are counted for every gateway."""
        return self._shared.client if self._shared is not None else None

    def capacity_changed(self) -> None:
        for queue in self._queues.values():
            queue.capacity_changed()

    def user_limits(self, principal: Principal) -> AbstractAsyncContextManager[None]:
        """Count the user's request while it runs (``async with``; 429 when over a limit), at the limits server when
        there is one, else here; checked before the body is read, so a user over their limit costs the gateway
        almost nothing.

        Everyone is one anonymous user when no sign-in is configured (loopback only): per-user limits would then
        limit the whole machine, so they apply to signed-in users only; the fair queue still applies.
        """
        if principal.source == "anonymous":
            return nullcontext()
        if self._shared is not None:
            return self._shared.admit(principal.key)
        return self._limits.admit(principal.key)

    def estimate_cost(self, payload: dict[str, Any], image_sizes: Sequence[tuple[int, int]]) -> float:
        """Tokens the request will take: prompt text, images (``image_sizes``: width and height of each), and the
        most it may generate (for each choice); a request that names no limit may generate the server's, at most the
        model's context."""
        prompt_chars = text_length(payload.get("messages")) + text_length(payload.get("prompt"))
        generated = int(payload.get("max_tokens") or payload.get("max_completion_tokens") or self._max_tokens_limit)
        context = self._context_of(payload["model"]) if isinstance(payload.get("model"), str) else None
        if context is not None:
            generated = min(generated, context)
        choices = int(payload.get("n") or 1)
        return prompt_chars / CHARS_PER_TOKEN + self.image_tokens(image_sizes) + generated * choices

    def image_tokens(self, image_sizes: Sequence[tuple[int, int]]) -> int:
        """Tokens the images become in the engine: each resized as Qwen's processor will (a photo larger than the
        budget counts as the budget, not as its own pixels), one token per ``image_pixels_per_token`` pixels."""
        if not image_sizes:  # most requests
            return 0
        per_token = self._settings.image_pixels_per_token
        return sum(self._engine_limits.resized_pixels(width, height, per_token) // per_token
                   for width, height in image_sizes)


def text_length(value: Any, measure: Callable[[str], int] = len) -> int:
    """Characters (or what ``measure`` counts) of text anywhere in a prompt or a list of messages (already screened:
    known shapes only)."""
    if isinstance(value, str):
        return measure(value)
    if isinstance(value, list):
        total = 0
        for item in value:  # a plain loop: a generator cost as much again per request
            total += text_length(item, measure)
        return total
    if isinstance(value, dict):
        return text_length(value.get("content"), measure) + text_length(value.get("text"), measure)
    return 0
