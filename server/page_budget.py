"""How many pages of a request's documents may be rendered, and at how many pixels: before anything is rendered, so
that a request that will be refused costs no rendering, and the pages fill the model's image budget without
overflowing its context.

Three limits, each a setting or the engine's own:

- **pages**: all documents of a request together send at most ``documents.max_pages`` pages, and pages count as
  images: with the request's other images they stay within the image limit screening applies
  (``EngineLimits.images_per_request(screening.max_images_per_request)``).
- **pixels per page**: at most ``min(engine max_pixels, screening.max_image_pixels)`` (the engine would scale a larger
  page down anyway, and screening would refuse one above its own limit), at least the engine's ``min_pixels`` (it
  would scale a smaller one up).
- **the context** (the model's ``max_model_len``, from its card: ``ReplicaPool.context_of``). Qwen3-VL turns an image
  into one token per 32x32 pixels (``admission.image_pixels_per_token``) plus its ``<|vision_start|>`` and
  ``<|vision_end|>`` tokens (the chat template of Qwen3-VL). The pages may take what is left once the rest of the
  request and the answer are counted:

      room = context - answer - text - other images - per message

  *answer*: the request's ``max_tokens`` (or ``max_completion_tokens``) when it names one, since vLLM refuses a
  prompt that leaves less than that (prompt + max_tokens <= max_model_len); else the profile's
  ``answer_reserve_tokens``, the room sizing (server/sizing.py) keeps for an answer beside one image of the budget.
  *text*: its UTF-8 bytes / 3. Qwen's tokenizer is a byte-level BPE: English prose takes about 4 characters a
  token, Chinese or Japanese about one character (3 bytes) a token, so bytes / 3 errs on the safe side for both,
  where the fair queue's characters / 4 (``admission``) would count CJK text at a quarter of its tokens. *other
  images*: each at the engine's full budget (their size is checked later, by screening; an upper bound keeps the
  pages from overflowing). *per message*: the chat template's ``<|im_start|>role ... <|im_end|>`` around each
  message.

  Each page costs, beside its pixels, its label (``[Document 'x', page 3 of 10]``, counted as text is) and a
  margin for the processor's grid: transformers' ``smart_resize`` rounds each side to the nearest multiple of
  32 (models/qwen2_vl/image_processing_qwen2_vl.py), which adds at most 16 x (width + height) + 256 pixels; width +
  height is bounded for pages up to 1:2 (every paper format: A4 is 1:1.41, legal 1:1.65), 2.2 x sqrt(pixels).
  With N the most pages the job may render (the page count is only known once the document is open), the job gets
  ``total_pixels = (room - N x page cost) x pixels per token``, which the renderer shares among the n <= N pages it
  renders (each clamped to the per-page limits): n pages then take at most ``room`` tokens. When even
  ``min_pixels`` per page cannot fit, the request is refused before rendering, saying how many pages fit.

Documents are rendered one after another in request order: each gets the room the earlier ones left (their exact
cost, from the rendered sizes, counted once they are back), less the least the later ones need (one page each, or
their chosen pages, at ``min_pixels``). A page's text layer is known only once rendered: if the text layers overflow
the room, the request is refused then, saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .engine_limits import EngineLimits
from .errors import InvalidRequest

BYTES_PER_TOKEN = 3  # UTF-8 bytes of text a token takes at least, about (see the module docstring)
# <|vision_start|> and <|vision_end|> around each image's tokens (Qwen3-VL's chat template).
IMAGE_MARKER_TOKENS = 2
# "<|im_start|>role\n" and "<|im_end|>\n" around each message (Qwen3-VL's chat template).
TOKENS_PER_MESSAGE = 6
# Longest side over shortest side of a page the grid margin is counted for (see the module docstring).
PAGE_ASPECT = 2.0
LONGEST_LABEL_NUMBER = 99_999


def label(name: str, number: int, count: int) -> str:
    """The text part before each page's image."""
    return f"[Document '{name}', page {number} of {count}]"


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def text_tokens(size: int) -> int:
    """Tokens of text of ``size`` UTF-8 bytes, at most (about)."""
    return -(-size // BYTES_PER_TOKEN)


@dataclass(frozen=True)
class PageLimits:
    """What the renderer is asked for one document."""

    max_pages: int
    max_pixels_per_page: int
    min_pixels_per_page: int
    total_pixels: int | None


class PageBudget:
    """One request's page budget, spent document by document (see the module docstring)."""

    def __init__(self, engine: EngineLimits, pixels_per_token: int, *, max_pages: int, image_limit: int,
                 other_images: int, max_image_pixels: int, room: int | None) -> None:
        """``room``: tokens the pages may take (None: the model's context is not known, so only the page and pixel
        limits apply); ``other_images``: the request's images beside its documents."""
        self._engine = engine
        self._ppt = pixels_per_token
        self._max_pages = max_pages
        self._image_limit = image_limit
        self._other_images = other_images
        self.slots = min(max_pages, image_limit - other_images)
        self.room = room
        self.max_pixels = min(engine.max_pixels, max_image_pixels)
        self.min_pixels = min(engine.min_pixels, self.max_pixels)
        # Beside a label: the vision markers and the grid margin (module docstring), in tokens.
        sides = 16 * (PAGE_ASPECT + 1) / math.sqrt(PAGE_ASPECT) * math.sqrt(self.max_pixels) + 256
        self._page_margin = IMAGE_MARKER_TOKENS + math.ceil(sides / pixels_per_token)

    def page_cost(self, name: str) -> int:
        """Tokens a page of document ``name`` costs beside its pixels (its label, markers, grid margin)."""
        longest = label(name, LONGEST_LABEL_NUMBER, LONGEST_LABEL_NUMBER)
        return text_tokens(utf8_bytes(longest)) + self._page_margin

    def least_tokens(self, name: str, pages: int) -> int:
        """Tokens ``pages`` pages take at ``min_pixels`` each."""
        return pages * (math.ceil(self.min_pixels / self._ppt) + self.page_cost(name))

    def limits(self, name: str, chosen: int | None, later: list[tuple[str, int]], where: str) -> PageLimits:
        """The renderer's limits for a document with ``chosen`` pages (None: every page, count unknown), followed
        in the request by documents ``later`` (name, their least page count); ``InvalidRequest`` when no page of it
        can be sent."""
        later_pages = sum(pages for _, pages in later)
        slots = self.slots - later_pages
        wanted = chosen or 1
        if slots < wanted:
            raise InvalidRequest(self._too_many(wanted, max(slots, 0)), param=where, code="too_many_pages")
        if self.room is None:
            return PageLimits(chosen or slots, self.max_pixels, self.min_pixels, None)
        room = self.room - sum(self.least_tokens(other, pages) for other, pages in later)
        fits = max(0, room) // self.least_tokens(name, 1)
        if fits < wanted:
            raise InvalidRequest(self._too_long(fits, chosen), param=where, code="document_too_long")
        pages = chosen or min(slots, fits)
        total = (room - pages * self.page_cost(name)) * self._ppt
        return PageLimits(pages, self.max_pixels, self.min_pixels, total)

    def spend(self, name: str, sizes: list[tuple[int, int]], labels_bytes: int, text_bytes: int,
              where: str) -> None:
        """Count a rendered document: its pages (``sizes``: width, height) as the engine's processor will resize
        them, their labels and text layers (their UTF-8 bytes). ``InvalidRequest`` when they overflow the room
        (only text layers, or pages more elongated than the margin allows, can)."""
        self.slots -= len(sizes)
        if self.room is None:
            return
        images = sum(self._engine.resized_pixels(width, height, self._ppt) // self._ppt + IMAGE_MARKER_TOKENS
                     for width, height in sizes)
        text = text_tokens(text_bytes)
        self.room -= images + text_tokens(labels_bytes) + text
        if self.room >= 0:
            return
        if text:
            raise InvalidRequest(
                f"the text layers of the document's pages (about {text:,} tokens) do not fit the model's context "
                "beside the pages' images, the rest of the request and the answer: choose fewer pages, or send "
                '"text_layer": false', param=where, code="document_too_long")
        raise InvalidRequest("the document's pages do not fit the model's context beside the rest of the request "
                             "and the answer: choose fewer pages", param=where, code="document_too_long")

    def _too_many(self, wanted: int, slots: int) -> str:
        what = f"{wanted} pages were chosen" if wanted > 1 else "a document was sent"
        images = (f", and pages count as images: at most {self._image_limit} a request, "
                  f"{self._other_images} of them taken by images" if self._other_images or
                  self._image_limit < self._max_pages else "")
        more = f"{slots} more page{'' if slots == 1 else 's'}"
        return (f"{what}, but this request may send {more} (documents.max_pages is {self._max_pages}"
                f"{images}): choose fewer pages with \"pages\", or send the documents in separate requests")

    def _too_long(self, fits: int, chosen: int | None) -> str:
        what = f"the {chosen} chosen pages do" if chosen and chosen > 1 else "the document does"
        fitting = {0: "no page of it fits", 1: "one page of it fits"}.get(fits, f"at most {fits} of its pages fit")
        return (f"{what} not fit the model's context beside the rest of the request and the room kept for the "
                f"answer: {fitting}, even at the smallest image size; choose fewer pages with \"pages\", shorten "
                "the request, or ask for a smaller max_tokens")
