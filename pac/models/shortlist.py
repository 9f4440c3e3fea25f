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
quality shows in every reported perplexity.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from pac.errors import PacError

SHORTLIST_KEYS = ("shortlist_index", "shortlist_logits", "tail_lse", "tail_mean")


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


class Shortlisted:
    """A cached training source whose batches also carry each next-token position's shortlist."""

    def __init__(self, source: Any, final_norm: torch.nn.Module, head: torch.Tensor, size: int, batch_size: int = 16):
        self.source = source
        per_sample: dict[str, list[torch.Tensor]] = {key: [] for key in SHORTLIST_KEYS}
        starts = range(0, len(source), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="shortlists", unit="batch", leave=False, dynamic_ncols=True):
                batch = source.batch(list(range(start, min(start + batch_size, len(source)))))
                base = final_norm(batch["taps"][:, -1, :-1])  # position t predicts token t+1
                targets = batch["labels"][:, 1:].clamp_min(0)  # padding gets a shortlist too, never used
                rows = shortlist_rows(base.flatten(0, 1), targets.flatten(), head, size)
                for key, value in rows.items():
                    per_sample[key].append(value.unflatten(0, targets.shape))
        self.shortlists = {key: torch.cat(value) for key, value in per_sample.items()}

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.tensor(indices)
        return {**self.source.batch(indices), **{key: value[rows] for key, value in self.shortlists.items()}}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shortlists.values())


def shortlist_lm_loss(
    side_state: torch.Tensor, up: torch.nn.Linear, head: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean (K+1)-way next-token cross-entropy over the batch's shortlists and tails (see the module).
    side_state [B, T, w] is the side network's normed state; up maps it to the hidden size."""
    keep = batch["labels"][:, 1:] != -100
    state = side_state[:, :-1][keep]  # [n, w]
    index = batch["shortlist_index"][keep].long()
    # Only the head rows some shortlist names: M = W U and c = W b for those (often under half the vocabulary).
    # One dense product with those rows beats gathering [n, K, w] rows per token: the gather is memory-bound.
    words, slot = index.unique(return_inverse=True)
    rows = head[words]
    m, c = rows @ up.weight, rows @ up.bias
    listed = batch["shortlist_logits"][keep].float() + (state @ m.T + c).gather(1, slot)
    tail = batch["tail_lse"][keep] + (batch["tail_mean"][keep].float() * up(state)).sum(-1)
    everything = torch.cat([listed, tail[:, None]], dim=1)
    return (torch.logsumexp(everything, dim=1) - listed[:, 0]).mean()
