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
quality shows in every reported perplexity. Measured on SmolLM2 + 400 BBC articles
(benchmarks/results/quality_lm.md): 256 words halve the cached epoch (24 s against 51 s) for 0.1
perplexity (27.13 against 27.02 with retrieval, 3 seeds); 1024 words lose nothing (1 seed, 34 s);
64 lose 0.8 (1 seed, 21 s).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from pac.cache.format import atomic_write_bytes
from pac.cache.reader import _ShardFile
from pac.errors import PacError
from pac.runtime.sources import CachedTaps

log = logging.getLogger(__name__)

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


SHARD_SAMPLES = 32  # samples per shortlist file: a build holds one file's worth, an interrupted one resumes


class Shortlisted:
    """A cached training source whose batches also carry each next-token position's shortlist.

    Shortlists are a function of the frozen backbone and the data, like the taps, so they live beside them:
    `<cache dir>/shortlists-K/`, a safetensors file per SHARD_SAMPLES samples of the cache, built the first
    time a run asks for that K and reused by every later run on the cache (other seeds, other options).
    Batches read their rows with positional reads (pac.cache.reader), so the process never holds them all:
    at K=1024 they take 0.9 MB per 128-token sample, a fifth of the taps'. A file that cannot be read
    back (truncated, foreign) is rebuilt, never trained on."""

    def __init__(self, source: CachedTaps, last_tap: int, final_norm: torch.nn.Module, head: torch.Tensor, size: int):
        self.source = source
        reader = source.reader
        self.directory = Path(reader.cache_dir) / f"shortlists-{size}"
        self.directory.mkdir(exist_ok=True)
        self.row_of = {sample: row for row, sample in enumerate(reader.sample_ids)}
        self.files: dict[int, _ShardFile] = {}
        self.built = 0  # files this run computed (0: all were there)
        h_last = CachedTaps(reader, reader.sample_ids, [last_tap])
        starts = range(0, len(reader.sample_ids), SHARD_SAMPLES)
        with torch.inference_mode():
            for start in tqdm(
                starts, desc=f"shortlists ({size} words)", unit="file", leave=False, dynamic_ncols=True, disable=None
            ):
                path = self._path(start)
                if self._readable(path, min(SHARD_SAMPLES, len(reader.sample_ids) - start)):
                    continue
                batch = h_last.batch(list(range(start, min(start + SHARD_SAMPLES, len(reader.sample_ids)))))
                base = final_norm(batch["taps"][:, -1, :-1])  # position t predicts token t+1
                targets = batch["labels"][:, 1:].clamp_min(0)  # padding gets a shortlist too, never used
                rows = shortlist_rows(base.flatten(0, 1), targets.flatten(), head, size)
                tensors = {key: value.unflatten(0, targets.shape).contiguous() for key, value in rows.items()}
                atomic_write_bytes(path, save(tensors))
                self.built += 1

    def _path(self, start: int) -> Path:
        return self.directory / f"{start:07d}.safetensors"

    def _readable(self, path: Path, samples: int) -> bool:
        if not path.exists():
            return False
        try:
            file = _ShardFile(path)
            try:
                ends = [info["data_offsets"][1] for info in file.tensors.values()]
                whole = set(file.keys()) == set(SHORTLIST_KEYS) and file.base + max(ends) == path.stat().st_size
                whole = whole and all(file.get_slice(key).get_shape()[0] == samples for key in SHORTLIST_KEYS)
            finally:
                file.close()
        except (OSError, ValueError, KeyError, TypeError):
            whole = False
        if not whole:
            log.warning("rebuilding %s: it cannot be read back (truncated or not a shortlist file)", path)
        return whole

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.row_of[self.source.sample_ids[i]] for i in indices]
        parts = {key: [] for key in SHORTLIST_KEYS}
        for row in rows:
            start = row - row % SHARD_SAMPLES
            if start not in self.files:
                self.files[start] = _ShardFile(self._path(start))
            offset = row - start
            for key in SHORTLIST_KEYS:
                parts[key].append(self.files[start].get_slice(key)[offset : offset + 1])
        return {**self.source.batch(indices), **{key: torch.cat(value) for key, value in parts.items()}}

    def nbytes(self) -> int:
        """Bytes of this source's shortlists on disk (the files of every sample of the cache)."""
        return sum(path.stat().st_size for path in self.directory.glob("*.safetensors"))


def with_shortlists(source: CachedTaps, model: Any, size: int) -> CachedTaps | Shortlisted:
    """`source` with shortlists of `size` words for a language-model ParallelAdapterModel (its last tap, final
    norm and head), or as it is where they would save nothing: size 0, or a vocabulary no larger than the
    shortlist (a small model's; training then scores every word, exactly)."""
    if not size:
        return source
    head = model.top.lm_head.weight
    if size >= head.shape[0] - 1:
        log.info("a shortlist of %d words covers the %d-word vocabulary: training on all of it", size, head.shape[0])
        return source
    return Shortlisted(source, model.taps[-1], model.top.final_norm, head, size)


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
