"""Token ids -> text, one token at a time, and stop strings matched on that text.

What it is: `IncrementalDetokenizer` (vLLM's prefix-offset/read-offset technique: decode only
a short window of the newest ids, never emit a partial UTF-8 character), `StopMatcher`
(stop strings that may span tokens, with hold-back so a streamed client never sees the start
of a stop string that later matches) and `TokenTable` (a token's display text and raw bytes
for logprobs). What it is not: the per-choice bookkeeping (output.py) or the engine's own
stop rules (EOS, stop token ids, max_tokens are decided by the engine).

Why windows: decode(ids[:k]) costs O(k), so re-decoding the whole output every token is
O(T^2) per request; decoding ids[prefix_offset:] keeps each step O(window) (~2-6 tokens).
Why a prefix at all: byte-level BPE splits one character over several tokens (a CJK
character is 3 bytes, an emoji 4), and SentencePiece drops the leading space of the first
token it decodes, so the window starts a few tokens *before* the new ones and we emit only
the text past what the prefix decodes to. The window is bounded (MAX_HELD_TOKENS): tokens that
add no text (special tokens skipped) or never complete a character (stray UTF-8 continuation
bytes from a confused model) are let go rather than re-decoded forever.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

# How many prompt tokens seed the window: enough context for a leading space or a
# character split over up to 4 byte tokens.
INITIAL_PREFIX_TOKENS = 5
REPLACEMENT = "\ufffd"      # what decode() yields for an incomplete UTF-8 sequence
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens; past this many tokens
# without new text, what the window decodes to is final.
MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-INITIAL_PREFIX_TOKENS:])
        self.prefix_offset = 0              # window start: decoded only for context
        self.read_offset = len(self.ids)    # text up to here has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text ("" while a character is
        still incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        complete = len(full) > len(prefix) and not full.endswith(REPLACEMENT)
        if complete or len(self.ids) - self.read_offset >= MAX_HELD_TOKENS:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (a trailing incomplete
        character decodes to U+FFFD, which is then the honest output)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopMatcher:
    """Finds the first stop string in a choice's text as it streams, in amortized O(1) per
    character and stop string (one Knuth-Morris-Pratt automaton per stop string), keeping
    only the text not sent yet: a long output or a long stop string never costs more than
    the characters it brings.

    `feed(delta)` -> True once a stop string matched: the text ends before it, and the
    stop string that completes first wins (the longest, if several complete at the same
    character), however the text was cut into deltas.
    `take(final)` -> the text that is safe to send now: all of it when final, otherwise
    everything except the longest tail that is a proper prefix of some stop string (it
    might grow into a match with the next token).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must be non-empty")
        self.stops = tuple(dict.fromkeys(stops))
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)   # per stop: chars of it the text ends with
        self.length = 0                        # chars of text so far (cut at a match)
        self.sent = 0                          # of which handed out by take()
        self._unsent = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> bool:
        if self.matched is not None:
            return True
        if not self.stops:
            self._unsent += delta
            self.length += len(delta)
            return False
        for i, c in enumerate(delta):
            done = None
            for j, s in enumerate(self.stops):
                k, fail = self._state[j], self._fail[j]
                while k and s[k] != c:
                    k = fail[k - 1]
                k += s[k] == c
                if k == len(s) and (done is None or len(s) > len(done)):
                    done = s
                self._state[j] = k
            if done is not None:
                self.matched = done
                end = self.length + i + 1 - len(done)     # where the stop string starts
                # Held-back text guarantees the cut never falls inside text already sent.
                assert end >= self.sent, (end, self.sent)
                self._unsent = (self._unsent + delta[:i + 1])[:end - self.sent]
                self.length = end
                return True
        self._unsent += delta
        self.length += len(delta)
        return False

    def take(self, final: bool = False) -> str:
        held = 0 if final or self.matched else min(max(self._state, default=0),
                                                      len(self._unsent))
        out = self._unsent[:len(self._unsent) - held]
        self._unsent = self._unsent[len(out):]
        self.sent += len(out)
        return out


def _failure(s: str) -> list[int]:
    """KMP's table: fail[i] = length of the longest proper prefix of s[:i+1] that is also
    its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        k += s[i] == s[k]
        fail[i] = k
    return fail


# ---------------------------------------------------------------- token text for logprobs

def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins for the 256 byte values, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTable:
    """A token's text and UTF-8 bytes as OpenAI logprobs show them. A token that is part
    of a multi-byte character has no text of its own: it is shown as `bytes:\\xe4\\xbd`
    (OpenAI's convention) and its `bytes` are the raw bytes."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        # Tokenizer (tscompile/tokenizer.py) has no public id->piece lookup yet; the
        # underlying `tokenizers` object does. Without it we fall back to decoded text.
        hf = getattr(tokenizer, "_tok", None)
        self._id_to_piece = getattr(hf, "id_to_token", None)
        self.info = lru_cache(maxsize=1 << 16)(self._info)

    def _raw_bytes(self, token_id: int, text: str) -> bytes:
        if REPLACEMENT not in text or self._id_to_piece is None:
            return text.encode()
        piece = self._id_to_piece(token_id) or ""
        if m := _BYTE_FALLBACK.fullmatch(piece):              # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        if piece and all(c in _BYTE_DECODER for c in piece):  # byte-level BPE
            return bytes(_BYTE_DECODER[c] for c in piece)
        return text.encode()

    def _info(self, token_id: int) -> tuple[str, list[int]]:
        text = self._tok.decode([token_id], skip_special_tokens=False)
        raw = self._raw_bytes(token_id, text)
        try:
            shown = raw.decode()
        except UnicodeDecodeError:
            shown = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return shown, list(raw)
