"""Shortlists: a cached digest of the frozen LM head's output per training token, so that a side
network's language-model epoch skips the products with the whole vocabulary.

With the plain side network the logits at position t are

    logits_t = W base_t + M s_t + c,   M = W U, c = W b    (W: the frozen head [V, d]; U, b: the side's Up)

and base_t = final_norm(h_L) comes from the cache: W base_t is the same in every epoch, and its
product with the 49k-word head is most of a cached epoch's time. So it is computed once, before the
first epoch, and kept as a shortlist per token: the target and the K-1 words the backbone finds
likeliest, with their base logits, plus two numbers' worth for the rest of the vocabulary (the tail):
its log-sum-exp and the mean of its head rows under the base distribution restricted to it, w_t.
Training then minimises a (K+1)-way cross-entropy:

    shortlist words v: b_tv + M_v s_t + c_v        the tail: lse_tail(b_t) + w_t . (U s_t + b)

The tail term is the first-order expansion of the tail's log-sum-exp in the side's correction:
exact at the start (a zero-initialised Up), a lower bound later (Jensen). Only training uses the
shortlists; evaluation always scores the whole vocabulary, so whatever the approximation costs in
quality shows in every reported perplexity. The shortlists are stored beside the cache
(pac.cache.shortlist_store) and joined to training batches by pac.runtime.sources.Shortlisted.
Measured on SmolLM2 + 400 BBC articles (benchmarks/results/quality_lm.md): 256 words halve the cached
epoch (24 s against 51 s) for 0.1 perplexity (27.13 against 27.02 with retrieval, 3 seeds); 1024 words
lose nothing (1 seed, 34 s); 64 lose 0.8 (1 seed, 21 s).
"""

from __future__ import annotations

import torch

from pac.cache.shortlist_store import SHORTLIST_KEYS
from pac.errors import PacError


def shortlist_rows(
    base: torch.Tensor, targets: torch.Tensor, head: torch.Tensor, size: int, chunk: int = 256
) -> dict[str, torch.Tensor]:
    """Shortlists of `size` words for rows base [n, d] (final_norm(h_L)) with next tokens targets [n]:
    slot 0 holds the target. Returns the SHORTLIST_KEYS tensors, [n, size], [n, size], [n], [n, d]."""
    if not 1 < size < head.shape[0]:
        raise PacError(f"a shortlist needs between 2 and {head.shape[0] - 1} words, not {size}")
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in SHORTLIST_KEYS}
    head_f = head.float()
    for start in range(0, len(base), chunk):
        logits = base[start : start + chunk].float() @ head_f.T
        target = targets[start : start + chunk, None]
        target_logit = logits.gather(1, target)
        logits.scatter_(1, target, -torch.inf)
        top_logits, top_index = logits.topk(size - 1, dim=1)
        logits.scatter_(1, top_index, -torch.inf)  # what is left is the tail
        tail = torch.softmax(logits, dim=1)
        parts["shortlist_index"].append(torch.cat([target, top_index], 1).int())
        parts["shortlist_logits"].append(torch.cat([target_logit, top_logits], 1).half())
        parts["tail_lse"].append(torch.logsumexp(logits, dim=1))
        parts["tail_mean"].append((tail @ head_f).half())
    return {key: torch.cat(value) for key, value in parts.items()}


class ListedCorrection(torch.autograd.Function):
    """(state @ m.T + c)[i, slot[i, j]]: the side's correction to each listed word's logit, from state [n, w],
    the listed words' rows m [U, w] and c [U], and each token's slots [n, K] into them.

    A dense product with the U words beats gathering [n, K, w] rows per token (memory-bound); `chunk` tokens
    at a time, it never spans the whole batch ([1016, 49k] floats: 200 MB). Plain autograd would still keep
    every chunk's product until backward (gather saves its input): here backward rebuilds each chunk's
    gradient by a scatter instead. 256 tokens, not fewer: glibc keeps blocks under 32 MB on its heap,
    where they stayed resident."""

    @staticmethod
    def forward(ctx, state, m, c, slot, chunk):  # noqa: D102 (autograd API)
        ctx.save_for_backward(state, m, slot)
        ctx.chunk = chunk
        rows = [slice(i, i + chunk) for i in range(0, len(state), chunk)]
        if not rows:  # no next-token targets in the batch: no corrections
            return state.new_zeros(slot.shape)
        return torch.cat([torch.addmm(c, state[r], m.T).gather(1, slot[r]) for r in rows])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 (autograd API)
        state, m, slot = ctx.saved_tensors
        grad_state, grad_m, grad_c = torch.empty_like(state), torch.zeros_like(m), m.new_zeros(len(m))
        for i in range(0, len(state), ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            dense = grad.new_zeros(len(slot[rows]), len(m)).scatter_add_(1, slot[rows], grad[rows])
            grad_state[rows] = dense @ m
            grad_m.addmm_(dense.T, state[rows])
            grad_c += dense.sum(0)
        return grad_state, grad_m, grad_c, None, None


def shortlist_lm_loss(
    side_state: torch.Tensor, up: torch.nn.Linear, head: torch.Tensor, batch: dict[str, torch.Tensor], chunk: int = 256
) -> torch.Tensor:
    """Mean (K+1)-way next-token cross-entropy over the batch's shortlists and tails (see the module).
    side_state [B, T, w] is the side network's normed state; up maps it to the hidden size."""
    keep = batch["labels"][:, 1:] != -100
    state = side_state[:, :-1][keep]  # [n, w]
    index = batch["shortlist_index"][keep].long()
    # M = W U and c = W b over the vocabulary ([V, w] is small; a copy of the head's rows would be as large as
    # the head, and kept for backward), then the rows of the words some shortlist names.
    words, slot = index.unique(return_inverse=True)
    m, c = (head @ up.weight)[words], (head @ up.bias)[words]
    listed = batch["shortlist_logits"][keep].float() + ListedCorrection.apply(state, m, c, slot, chunk)
    tail = batch["tail_lse"][keep] + (batch["tail_mean"][keep].float() * up(state)).sum(-1)
    everything = torch.cat([listed, tail[:, None]], dim=1)
    return (torch.logsumexp(everything, dim=1) - listed[:, 0]).mean()
