"""Text deltas of a streamed row: the decode loop hands over one token per step; a client gets the
text that can no longer change.

A row's text so far is decode(tokens up to EOS, at most max_new_tokens), cut at its first stop
string, the same rule as `Sampler.results`. What may still change is held back: a partial UTF-8
character (the tokenizer shows U+FFFD), trailing whitespace (detokenizers may merge it with the
next token) and, with stop strings, the last len(longest stop) − 1 characters (a stop string's
start). `finish(text)` sends the rest of the engine's final text, so the deltas always add up to
it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dglm.engine.decoding.sampling import first_stop

logger = logging.getLogger(__name__)


class TextStream:
    def __init__(
        self,
        decode: Callable[[list[int]], str],  # token ids → text (special tokens skipped)
        eos: list[int],
        max_new_tokens: int,
        stop: tuple[str, ...] = (),
    ) -> None:
        self.decode, self.eos, self.max_new_tokens, self.stop = (
            decode,
            set(eos),
            max_new_tokens,
            stop,
        )
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""  # the text sent so far
        self.ended = False  # EOS, a stop string or max_new_tokens seen: later tokens are pad

    def push(self, token: int) -> str:
        """The new text `token` makes final ("" if none)."""
        if self.ended:
            return ""
        if token in self.eos:
            self.ended = True
            return ""
        self.tokens.append(token)
        self.ended = len(self.tokens) >= self.max_new_tokens
        text = self.decode(self.tokens)
        cut = first_stop(text, self.stop) if self.stop else -1
        if cut >= 0:
            text, self.ended = text[:cut], True
        else:
            text = text[: len(text) - self.hold] if self.hold else text
        text = text.rstrip("\ufffd").rstrip()  # a partial character; whitespace may merge
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, text: str) -> str:
        """The rest of the row's final `text` (the engine's): what was not sent yet."""
        if not text.startswith(self.sent):  # a detokenizer that rewrote the past: say so once
            logger.warning("streamed text %r is not a prefix of the final %r", self.sent, text)
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
