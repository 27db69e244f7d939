"""Incremental detokenization, stop-string hold-back and per-choice bookkeeping, on the
real SmolLM2 tokenizer (byte-level BPE: CJK and emoji split over several tokens)."""
from __future__ import annotations

import random

import pytest

from tscompile.runtime.protocol import RequestOutput, TokenLogprob
from tscompile.runtime.server.detokenizer import (MAX_HELD_TOKENS, IncrementalDetokenizer,
                                                  StopMatcher, TokenTable)
from tscompile.runtime.server.output import ChoiceProcessor

TEXTS = [
    "Hello world! Ça va? 你好 😀 The answer is 42.",
    "  leading spaces\n\nand\ttabs  ",
    "naïve café — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧 Ελληνικά русский 日本語のテキスト",
    "def f(x):\n    return x ** 2  # 🐍\n",
]


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(tokenizer, text):
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "x"}]))
    ids = tokenizer.encode(text)
    counting = CountingTokenizer(tokenizer)
    d = IncrementalDetokenizer(counting, prompt)
    deltas = [d.add(t) for t in ids]
    assert "".join(deltas) + d.flush() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)           # never half a character
    assert counting.decoded <= 12 * len(ids)                # a window, not the whole output


def test_flush_emits_trailing_partial_character(tokenizer):
    ids = tokenizer.encode("ok 你")
    d = IncrementalDetokenizer(tokenizer)
    got = "".join(d.add(t) for t in ids[:-1])
    tail = d.flush()
    assert got.startswith("ok") and "\ufffd" not in got and tail.endswith("\ufffd")
    assert got + tail == tokenizer.decode(ids[:-1])


def test_token_table_bytes(tokenizer):
    table = TokenTable(tokenizer)
    ids = tokenizer.encode("Ça 😀")
    assert b"".join(bytes(table.info(t)[1]) for t in ids).decode() == "Ça 😀"
    shown = [table.info(t)[0] for t in ids]
    assert any(s.startswith("bytes:\\x") for s in shown) and "a" in shown


def _stream(stops, pieces):
    m = StopMatcher(stops)
    sent = []
    for p in pieces:
        matched = m.feed(p)
        sent.append(m.take(final=matched))
        if matched:
            break
    else:
        sent.append(m.take(final=True))
    return m, sent


def test_stop_holds_back_then_cuts():
    m, sent = _stream(["lo w"], ["Hel", "lo", " wor", "ld"])
    assert sent == ["He", "l", ""] and m.length == 3 and m.matched == "lo w"


def test_stop_near_miss_is_released():
    m, sent = _stream(["answer was"], ["The ans", "wer ", "is 42"])
    assert sent == ["The ", "", "answer is 42", ""] and m.matched is None


def test_first_completed_of_several_stops_wins():
    m, sent = _stream(["world", "o w"], ["Hello world"])
    assert "".join(sent) == "Hell" and m.matched == "o w"
    # "bc" completes before "abcd" does, whether the text comes at once or in pieces.
    for pieces in (["abcd"], ["ab", "cd"], list("abcd")):
        m, sent = _stream(["abcd", "bc"], pieces)
        assert ("".join(sent), m.matched) == ("a", "bc"), pieces
    m, sent = _stream(["bc", "abc"], ["xabc"])        # same end: the longer one
    assert ("".join(sent), m.matched) == ("x", "abc")


def first_stop(text: str, stops: list[str]) -> str:
    """The oracle: the shortest prefix of `text` that ends with a stop string, less it."""
    for end in range(1, len(text) + 1):
        if done := [s for s in stops if text[:end].endswith(s)]:
            return text[:end - max(map(len, done))]
    return text


def test_stop_matcher_random():
    rng = random.Random(0)
    alphabet = "ab c你😀"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 5)))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        m, sent = _stream(stops, pieces)
        want = first_stop(text, stops)
        assert "".join(sent) == want and m.length == len(want), (text, stops, pieces)


def test_choice_processor_drops_tokens_after_stop(tokenizer):
    ids = tokenizer.encode("Hello world! The answer")
    proc = ChoiceProcessor(0, tokenizer, [], ["world!"], want_logprobs=True)
    lps = tuple(TokenLogprob(t, -1.0) for t in ids)
    d1 = proc.process(RequestOutput("r", tuple(ids[:1]), lps[:1]))
    d2 = proc.process(RequestOutput("r", tuple(ids[1:]), lps[1:]))
    assert (d1.text + d2.text, d2.finish_reason, proc.stopped_by_string) == ("Hello ", "stop",
                                                                            True)
    assert proc.completion_tokens == 3 == len(d1.logprobs) + len(d2.logprobs)  # Hello, world, !
    assert d2.usage.completion_tokens == 3


def test_choice_processor_engine_finish_and_error(tokenizer):
    ids = tokenizer.encode("Hi 你")
    proc = ChoiceProcessor(1, tokenizer, [], [])
    d = proc.process(RequestOutput("r", tuple(ids), finish_reason="length", prompt_tokens=4,
                                   cached_tokens=3))
    assert d.text == "Hi 你" and d.finish_reason == "length"
    assert (d.usage.prompt_tokens, d.usage.cached_tokens) == (0, 3)   # prompt: ids given
    bad = ChoiceProcessor(0, tokenizer, [1, 2], []).process(
        RequestOutput("r", finish_reason="error", error="boom"))
    assert (bad.finish_reason, bad.error) == ("error", "boom")


def test_stop_matching_is_linear_in_the_text():
    """100k characters one at a time against 4 near-matching 1024-character stop strings
    (the API's limits): rescanning the held-back tail per token would cost ~10^11 steps."""
    import time
    stops = ["a" * 1023 + "b", "a" * 1000 + "c", "ab" * 512, "a" * 1022 + "d"]
    m = StopMatcher(stops)
    t0 = time.perf_counter()
    sent = sum(len(m.take()) for _ in range(100_000) if not m.feed("a"))
    seconds = time.perf_counter() - t0
    print(f"stop matching: 100000 chars x 4 stops in {seconds:.2f} s")
    assert (m.matched, m.length, sent) == (None, 100_000, 100_000 - 1023)
    assert seconds < 5


def test_detokenizer_window_is_bounded(tokenizer):
    """Tokens that add no text (special tokens, skipped) do not grow the decode window."""
    special = tokenizer.encode("<|im_start|>")
    assert len(special) == 1 and tokenizer.decode(special) == ""
    counting = CountingTokenizer(tokenizer)
    d = IncrementalDetokenizer(counting)
    ids = special * 500 + tokenizer.encode(" ok")
    assert "".join(d.add(t) for t in ids) + d.flush() == " ok"
    assert counting.decoded <= 4 * MAX_HELD_TOKENS * len(ids)     # unbounded: ~len(ids)**2 / 2
