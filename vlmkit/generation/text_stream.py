"""The one incremental text stream: generated token ids in, answer text out, as `generate`, its streaming form and
the server's jobs all need it.

Stop strings follow the OpenAI API: the text stops at the first occurrence and the stop string itself is not part
of it. Text that might be the start of a stop string is held back until decided, so a stop string never appears
in the pieces. The full decode of the kept ids is the ground truth: `rest()` sends what the pieces have not.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

__all__ = ["TextStream", "incremental_decoder", "find_stop", "held_back", "cut_at_stop"]


class _WindowDecoder:
    """Streaming detokenisation for a tokenizer that only has decode() (same scheme as vlmkit's
    IncrementalDecoder): decode a short window with and without the new ids and emit the difference. Both decodes
    start at the same token, the last one that showed text (not a skipped special token), so a decoder that strips
    the first token's leading space does it to both alike. Text ending in U+FFFD (an incomplete UTF-8 character)
    waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.start, self.emitted_end = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done, text = self._decode(self.ids[self.start : self.emitted_end]), self._decode(self.ids[self.start :])
        if len(text) <= len(done) or text.endswith("\ufffd") or not text.startswith(done):
            return ""
        # The token that just made text appear is a visible one: the next window starts there.
        self.start, self.emitted_end = len(self.ids) - 1, len(self.ids)
        return text[len(done) :]


def incremental_decoder(tokenizer):
    """A streaming detokeniser: `push(token_id)` returns the new text (special tokens skipped)."""
    make = getattr(tokenizer, "incremental_decoder", None)  # vlmkit's Tokenizer has one
    return make(skip_special_tokens=True) if make is not None else _WindowDecoder(tokenizer)


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> Optional[int]:
    """Index where the earliest stop string begins in text[start:] (as an index into text), or None."""
    hits = [i for s in stop_strings if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (not streamed yet)."""
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) its first stop string."""
    i = find_stop(text, stop_strings)
    return text if i is None else text[:i]


class TextStream:
    """One answer's text, token by token.

        stream = TextStream(tokenizer, stop_strings, eos_ids)
        piece = stream.push(token_id)   # text that is safe to show now (maybe ""); stream.done after eos / stop
        stream.rest()                   # at the end: what the pieces have not sent yet
        stream.text()                   # the whole answer: decode(ids, skip_special_tokens=True) cut at a stop

    An eos id ends the stream and is not kept. With pieces=False the stream only watches for stop strings (no
    detokenising at all when there are none) and `push` returns "": for callers that want `text()` alone.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), eos_ids: Iterable[int] = (), *,
                 pieces: bool = True):
        self.tokenizer, self.stops, self.eos = tokenizer, list(stop_strings), set(eos_ids)
        self.pieces = pieces
        self.decoder = incremental_decoder(tokenizer) if pieces or self.stops else None
        self.ids: list[int] = []  # the answer's ids: before any eos, up to the token that completed a stop string
        self.current = ""  # the incremental decode of `ids`
        self.emitted = 0  # characters of `current` already handed out (or, with pieces=False, checked)
        self.done = False  # an eos or a stop string ended the answer
        self.stopped = False  # a stop string did

    def push(self, token_id: int) -> str:
        if self.done:
            return ""
        if token_id in self.eos:
            self.done = True
            return ""
        self.ids.append(token_id)
        if self.decoder is None:
            return ""
        piece = self.decoder.push(token_id)
        if not piece:
            return ""
        self.current += piece
        # Nothing before `emitted` can start a stop string: such a start would have been held back.
        stop_at = find_stop(self.current, self.stops, self.emitted)
        if stop_at is not None:
            self.done = self.stopped = True
            end = stop_at
        else:
            end = len(self.current) - held_back(self.current, self.stops)
        out = self.current[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out if self.pieces else ""

    def text(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)

    def rest(self) -> str:
        """The end of `text()` that the pieces have not sent. (Only a decode that rewrites earlier text as more
        comes, e.g. a space clean-up, could make the pieces and the full decode disagree: then nothing.)"""
        final = self.text()
        if len(final) > self.emitted and final.startswith(self.current[: self.emitted]):
            return final[self.emitted :]
        return ""
