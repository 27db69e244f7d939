"""Model-free speculative drafting (issue 18): suffix decoding over the request, its session
and recent outputs (suffix.py on suffix_automaton.py), the prompt-lookup n-gram baseline
(ngram.py) and the per-request draft-length policy (policy.py). No model, no verification,
no scheduler here; the engine calls `extend` with accepted tokens and `propose(k)` per step.
"""
from __future__ import annotations

from tscompile.runtime.spec.ngram import NgramDrafter
from tscompile.runtime.spec.policy import AdaptiveDraftLength, LinearStepCost
from tscompile.runtime.spec.suffix import SuffixConfig, SuffixDrafter, SuffixRequest
from tscompile.runtime.spec.suffix_automaton import SuffixAutomaton

__all__ = ["AdaptiveDraftLength", "LinearStepCost", "NgramDrafter", "SuffixAutomaton",
           "SuffixConfig", "SuffixDrafter", "SuffixRequest"]
