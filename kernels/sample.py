"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds.

`tscompile::sample(logits [S, V], temperature [S], top_k [S], top_p [S], min_p [S],
seeds [S], offsets [S]) -> ids [S] int64`, one row per sequence being sampled.

* temperature == 0 is greedy (argmax); otherwise logits / temperature, then the filters in
  vLLM's order: top-k (k <= 0 or k >= V: off), top-p (nucleus; 1.0: off), min-p (drop tokens
  whose probability is below min_p * max probability; 0: off).
* Randomness is counter-based: the draw for row s depends only on (seeds[s], offsets[s],
  token id), through an integer hash, never on a global generator or on the other rows of
  the batch. The same seed therefore gives the same text whatever else is batched with it;
  the runtime passes the number of tokens generated so far as the offset.
* The draw is the exponential race (Gumbel-max in another form): argmax_v p_v / E_v with
  E_v = -log U_v, which samples v with probability p_v and needs no cumulative sum.
Not here: penalties and logprobs (the runtime applies them to the logits it passes in).
"""
from __future__ import annotations

import torch

from .registry import dispatch, kernel_op, register

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2^32.
    Products may overflow int64; they wrap, and the low 32 bits stay exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) of shape [S, V], a pure function of (seed, offset, token id)."""
    s = seeds.long()
    key = _mix32((s & _M32) ^ _mix32((s >> 32) & _M32))
    key = _mix32(key ^ _mix32(offsets.long() & _M32))[:, None]                  # [S, 1]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]  # [1, V]
    bits = _mix32(key ^ _mix32(ids + 0x9E3779B9 & _M32))
    return (bits.double() + 0.5) / 4294967296.0


def apply_filters(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits with filtered tokens set to -inf (rows with temperature 0
    are scaled by 1; the caller takes their argmax)."""
    vocab = logits.shape[-1]
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    x = logits.float() / temp[:, None]
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)[None, :]
    drop = rank >= k[:, None].long()                                  # top-k
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None].float()                     # top-p (keeps rank 0)
    drop |= probs < (min_p[:, None].float() * probs[:, :1])           # min-p (keeps rank 0)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


@register("sample", "reference")
def sample_reference(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    greedy = logits.argmax(dim=-1)
    x = apply_filters(logits, temperature, top_k, top_p, min_p)
    probs = x.softmax(dim=-1).double()
    race = probs / -torch.log(uniform_noise(seeds, offsets, logits.shape[-1]))
    drawn = race.argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


@kernel_op("sample")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
           offsets: torch.Tensor) -> torch.Tensor:
    s = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("min_p", min_p), ("seeds", seeds), ("offsets", offsets)):
        if t.shape != (s,):
            raise ValueError(f"sample: {name} must have shape [{s}], got {list(t.shape)}")
    return dispatch("sample", logits, temperature, top_k, top_p, min_p, seeds, offsets)


@sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
