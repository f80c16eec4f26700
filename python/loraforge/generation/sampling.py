"""The next token from fp32 logits [B, V]: greedy, or sampled after temperature, top-k, top-p and min-p.

The filters follow transformers' logits warpers, in the order `model.generate` applies them
(temperature, then top-k, top-p, min-p; each keeps at least one token):

    top-k   drop every logit below the k-th largest (ties at the k-th kept)
    top-p   sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p
    min-p   drop the tokens whose probability is below min_p times the largest probability

Sampling draws from softmax(filtered logits) by the exponential race: argmax(p_i / E_i) with E_i
i.i.d. Exp(1) picks token i with probability p_i, the distribution torch.multinomial draws from, without
its host-side validity check (a device-to-host read on every token) and with static shapes, so the whole
choice runs inside a CUDA graph. Filtered tokens have p_i = 0 and are never chosen.

Every operation here has a static shape and reads no value on the host.
"""

from __future__ import annotations

import torch

from loraforge.generation.settings import DecodeSettings


def filter_logits(scores: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to fp32 scores [B, V] (removed tokens at -inf)."""
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    vocab = scores.shape[-1]
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, vocab), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - settings.top_p)
        drop_sorted.narrow(-1, vocab - 1, 1).fill_(False)  # the most likely token always stays
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if settings.min_p is not None:
        probs = scores.softmax(dim=-1)
        drop = probs < settings.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """Next token ids [B] (int64) from fp32 logits [B, V]."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, settings).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)
