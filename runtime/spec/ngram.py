"""Prompt-lookup n-gram drafting: the simple baseline for model-free speculation.

What it is: per request, the last n tokens of prompt + output (n from `max_n` down to
`min_n`) are looked up among the earlier n-grams of that same text; the most recent earlier
occurrence's continuation is the draft (vLLM's `ngram` / "prompt lookup decoding"). What it
is not: frequency-scored or cross-request (suffix.py is both).

Index: for each n, a dict from the n-gram to the end position of its most recent
occurrence that has at least one token after it. Appending token i makes the n-grams that
end at i - 1 continuable, so each append costs max_n - min_n + 1 dict writes (amortised
O(1) per token for fixed n), and a proposal is max_n - min_n + 1 lookups plus the slice.
"""
from __future__ import annotations


class NgramDrafter:
    def __init__(self, prompt: list[int] = (), max_n: int = 4, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramDrafter: need 1 <= min_n <= max_n, got min_n={min_n} "
                             f"max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.last_end: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(min_n, max_n + 1)}
        self.extend(list(prompt))

    def extend(self, tokens: list[int]) -> None:
        toks = self.tokens
        for t in tokens:
            toks.append(t)
            e = len(toks) - 2               # the n-grams ending here now have a next token
            for n, index in self.last_end.items():
                if e + 1 >= n:
                    index[tuple(toks[e + 1 - n:e + 1])] = e

    def propose(self, k: int) -> list[int]:
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(toks) < n:
                continue
            e = self.last_end[n].get(tuple(toks[-n:]))
            if e is not None:
                return toks[e + 1:e + 1 + k]
        return []
