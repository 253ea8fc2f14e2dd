"""A request's images on their way in: where they sit in the prompt, remote ones downloaded before decoding, and
how many pixels may be decoded at once.

Downloads run in threads of their own, at most `max_fetches` at once across the server, each under the one hard
deadline of `processing.image_fetch` (ImageLimits.timeout_s). A request that finds every download slot taken is
refused at once (`DownloadSlotsFull`) rather than queued behind other requests' downloads.
Decoding is admitted by pixels (`PixelGate`), not by a small pool of threads: a request with small images starts at
once beside large ones, and only a request that would push the pixels in flight past the gate's capacity waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import anyio

from ..processing.images import ImageLimits, fetch_image, is_remote

__all__ = ["DownloadSlotsFull", "Downloader", "PixelGate", "image_sources", "with_sources"]


class DownloadSlotsFull(Exception):
    pass


def image_sources(prompt, images) -> list:
    """The image sources of a request, in order: `images` for a raw string prompt, else the messages' image parts."""
    if isinstance(prompt, str):
        return list(images or [])
    return [part["image"] for m in prompt for part in m["content"] if part.get("type") == "image"]


def with_sources(prompt, images, sources: list):
    """(prompt, images) with the image sources replaced, in the order `image_sources` gives them."""
    if isinstance(prompt, str):
        return prompt, list(sources)
    it = iter(sources)
    return [{**m, "content": [{**part, "image": next(it)} if part.get("type") == "image" else part
                              for part in m["content"]]} for m in prompt], images


class Downloader:
    def __init__(self, limits: ImageLimits, max_fetches: int = 16):
        self.limits = limits
        self.limiter = anyio.CapacityLimiter(max_fetches)  # download slots, taken without waiting
        self._threads = anyio.CapacityLimiter(max_fetches)  # never waited on (slots come first); off anyio's default

    async def fetch_all(self, sources: list) -> list:
        """`sources` with each http(s) URL replaced by its downloaded bytes (a FetchedImage); all of one request's
        downloads run at once. Raises ImageError (the first failing image) or DownloadSlotsFull."""
        remote = [i for i, src in enumerate(sources) if is_remote(src)]
        if not remote or not self.limits.allow_remote:
            return sources  # the loader refuses URLs with its usual message when they are disabled
        # One slot per download; a request with more URLs than there are slots takes them all and runs in waves.
        slots, taken = [object() for _ in range(min(len(remote), int(self.limiter.total_tokens)))], []
        try:
            for slot in slots:
                try:
                    self.limiter.acquire_on_behalf_of_nowait(slot)
                except anyio.WouldBlock:
                    raise DownloadSlotsFull(
                        f"server busy: {self.limiter.total_tokens:g} remote image downloads are in progress; retry "
                        "later or send the image inline (data: URI)") from None
                taken.append(slot)
            downloads = [anyio.to_thread.run_sync(lambda i=i: fetch_image(sources[i], limits=self.limits, index=i),
                                                  limiter=self._threads) for i in remote]
            results = await asyncio.gather(*downloads, return_exceptions=True)
        finally:
            for slot in taken:
                self.limiter.release_on_behalf_of(slot)
        fetched = list(sources)
        for i, result in zip(remote, results):
            if isinstance(result, BaseException):
                raise result
            fetched[i] = result
        return fetched


class PixelGate:
    """A counting gate over decoded pixels shared by the threads decoding requests' images."""

    def __init__(self, capacity: int):
        self.capacity, self.in_use = capacity, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def admit(self, pixels: int):
        need = min(pixels, self.capacity)  # a request over the capacity runs alone
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + need <= self.capacity)
            self.in_use += need
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= need
                self._changed.notify_all()
