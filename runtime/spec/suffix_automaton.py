"""An online suffix automaton over token ids, with the end positions of any matched string.

What it is: the index under the suffix drafter (suffix.py). `append(token)` is Blumer et
al.'s online construction, amortised O(1) per token (the automaton has <= 2n states and
<= 3n transitions, and a clone's copied transitions count towards those 3n, so the whole
build of n tokens is O(n) dictionary operations). What it is not: a drafter (no scoring, no
tiers) and not deletable (the bounded global index rebuilds instead; suffix.py).

Why an automaton rather than SuffixDecoding's depth-bounded suffix trie: the trie stores a
node per (position, depth <= D), O(n * D) nodes (a 30K-token agent prompt at D = 64 is ~2M
Python objects per request), while the automaton is O(n) with no depth bound, so an
arbitrarily long match (a re-emitted file) is still found. The trie's node counts (the
frequency of a continuation) are recovered here by enumerating the matched state's end
positions through the suffix-link tree: each state's `endpos` set is the union of its
link-tree children's plus its own position when it is not a clone, so a DFS over the
subtree lists the occurrences, O(occurrences) (capped by the caller; a weak, very frequent
match is not worth drafting from anyway).

    state s:  len[s]    longest string of s        link[s]  its suffix link (shorter strings)
              pos[s]    an end position of s (the first, fixed at creation)
              kids[s]   link-tree children (states whose link is s), an ordered set
              own[s]    True for the state created for a position (not a clone)
"""
from __future__ import annotations


class SuffixAutomaton:
    __slots__ = ("tokens", "next", "link", "len", "pos", "own", "kids", "last")

    def __init__(self, tokens: list[int] | None = None):
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.len: list[int] = [0]
        self.pos: list[int] = [-1]
        self.own: list[bool] = [False]
        self.kids: list[dict[int, None]] = [{}]
        self.last = 0
        if tokens:
            self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def _new_state(self, length: int, pos: int, own: bool) -> int:
        self.next.append({})
        self.link.append(-1)
        self.len.append(length)
        self.pos.append(pos)
        self.own.append(own)
        self.kids.append({})
        return len(self.len) - 1

    def _set_link(self, s: int, parent: int) -> None:
        old = self.link[s]
        if old >= 0:
            del self.kids[old][s]       # an insertion-ordered set: O(1) either way
        self.link[s] = parent
        self.kids[parent][s] = None

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.append(t)

    def append(self, t: int) -> None:
        i = len(self.tokens)
        self.tokens.append(t)
        nxt, ln = self.next, self.len
        cur = self._new_state(ln[self.last] + 1, i, True)
        p = self.last
        while p >= 0 and t not in nxt[p]:
            nxt[p][t] = cur
            p = self.link[p]
        if p < 0:
            self._set_link(cur, 0)
        else:
            q = nxt[p][t]
            if ln[p] + 1 == ln[q]:
                self._set_link(cur, q)
            else:                       # split q: the clone holds q's shorter strings
                clone = self._new_state(ln[p] + 1, self.pos[q], False)
                nxt[clone] = dict(nxt[q])
                self._set_link(clone, self.link[q])
                self._set_link(q, clone)
                self._set_link(cur, clone)
                while p >= 0 and nxt[p].get(t) == q:
                    nxt[p][t] = clone
                    p = self.link[p]
        self.last = cur

    def longest_repeat_suffix(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also ends earlier. The
        whole text's state has endpos {n-1} alone; its suffix link is the longest suffix
        with a second end position."""
        s = self.link[self.last]
        return (s, self.len[s]) if s > 0 else (0, 0)

    def match_tail(self, query: list[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of `query` that occurs in the text:
        stream the query through the automaton, falling back along suffix links on a
        mismatch (O(len(query)) amortised)."""
        s, length = 0, 0
        nxt, link, ln = self.next, self.link, self.len
        for t in query:
            while s > 0 and t not in nxt[s]:
                s = link[s]
                length = ln[s]
            if t in nxt[s]:
                s = nxt[s][t]
                length += 1
        return s, length

    def end_positions(self, s: int, limit: int) -> list[int]:
        """Up to `limit` end positions of state s's strings, most recent first among those
        found (a DFS over the link subtree; each own state is one position)."""
        out: list[int] = []
        stack = [s]
        while stack and len(out) < limit:
            u = stack.pop()
            if self.own[u]:
                out.append(self.pos[u])
            stack.extend(self.kids[u])
        out.sort(reverse=True)
        return out
