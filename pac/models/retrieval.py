"""Retrieval from the activation cache: a k-nearest-neighbour language model over the training text.

Phase 1 already stored h_L for every training token. final_norm(h_L) at position t is a key and the
token at t+1 its value (kNN-LM, Khandelwal et al. 2020). At inference the adapter's next-token
distribution is mixed with that of the values of the k keys nearest to the query final_norm(h_L):

    p(y) = (1 - w) p_adapter(y) + w * sum_j softmax(-|q - key_j|^2 / T)_j [value_j = y]

Keys and queries come from the frozen backbone, so the memory is the cache's last tap (no extra
pass), and nothing in it trains. A side network reads the backbone's states and cannot copy
a rare name or phrase it saw once; the memory can. On SmolLM2 + 400 BBC articles it took the LM
default from perplexity 29.05 to 27.05. The adapter's own corrected states as keys gave 27.05 too,
so the frozen keys lose nothing (benchmarks/results/quality_lm.md).

w and T are fit on training tokens scored against the other articles' keys (leave-article-out),
never on the validation set; w = 0 is one of the choices, so a memory that does not help is off.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pac.errors import PacError

RETRIEVAL_FILE = "retrieval.safetensors"
DEFAULT_NEIGHBOURS = 64
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
TEMPERATURES = tuple(10.0 ** (e / 2) for e in range(-2, 9))  # 0.1 .. 10^4: distances scale with the model
QUERY_CHUNK = 256  # [256, KEY_BLOCK] float32 distances: 8 MB
KEY_BLOCK = 8192  # keys stay float16; a block at a time is widened for the distance products


class TokenMemory:
    """Keys [N, d] (float16), next-token values [N], and the row (article) each key came from."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor | None = None,
        neighbours: int = DEFAULT_NEIGHBOURS,
        weight: float = 0.0,
        temperature: float = 1.0,
    ):
        if keys.ndim != 2 or values.shape != keys.shape[:1]:
            raise PacError(
                f"a token memory needs keys [N, d] and values [N], got {tuple(keys.shape)}, {tuple(values.shape)}"
            )
        if len(keys) == 0:
            raise PacError("a token memory needs at least one training token")
        self.keys, self.values = keys.to(torch.float16).contiguous(), values.long()
        self.rows = rows
        self.neighbours = min(neighbours, len(keys))
        self.weight, self.temperature = weight, temperature
        self._key_sq = torch.cat([block.float().pow(2).sum(1) for block in self.keys.split(KEY_BLOCK)])

    @classmethod
    def from_source(cls, source, final_norm: torch.nn.Module, batch_size: int = 16) -> TokenMemory:
        """Keys final_norm(h_L) and values (next tokens) of every real token of a cached source, whose
        last tap is h_L; `rows` records each key's sample for leave-article-out fitting."""
        keys = None  # filled in place: a list of parts and their concatenation would hold the keys twice
        values, rows, filled = [], [], 0
        with torch.inference_mode():
            for start in range(0, len(source), batch_size):
                index = list(range(start, min(start + batch_size, len(source))))
                batch = source.batch(index)
                labels = batch["labels"]
                owner = torch.tensor(index)[:, None].expand_as(labels)
                targets, states, owner = next_token_rows(labels, final_norm(batch["taps"][:, -1]), owner)
                if keys is None:  # at most every position of every sample
                    keys = states.new_empty(len(source) * labels.shape[1], states.shape[-1], dtype=torch.float16)
                keys[filled : filled + len(states)] = states
                filled += len(states)
                values.append(targets)
                rows.append(owner)
        if keys is None:
            raise PacError("a token memory needs at least one training token")
        return cls(keys[:filled], torch.cat(values), torch.cat(rows))

    # ---------------------------------------------------------------- search and mixing
    def search(
        self, queries: torch.Tensor, exclude_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of each query's nearest keys, nearest first; a query never
        meets keys of its own entry of `exclude_rows` (leave-article-out).

        Key blocks are the outer loop, so each is widened to float32 once per search, not once per query
        chunk; each [chunk, block] distance tensor gives up only its own top k before the running best
        takes them: fewer scattered temporaries of 8-20 MB, which grow glibc's heap (pac train runs the
        memory's fit in pac.runtime.heap.one_off_step for the same reason)."""
        queries = queries.float()
        chunks = [slice(q0, q0 + QUERY_CHUNK) for q0 in range(0, len(queries), QUERY_CHUNK)]
        best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunks)
        for k0 in range(0, len(self.keys), KEY_BLOCK):
            block = self.keys[k0 : k0 + KEY_BLOCK].float()
            key_sq = self._key_sq[k0 : k0 + KEY_BLOCK]
            for c, rows in enumerate(chunks):
                q = queries[rows]
                d = torch.addmm(key_sq, q, block.T, alpha=-2)  # |k|^2 - 2 q.k: |q|^2 is added at the end
                if exclude_rows is not None:
                    d.masked_fill_(self.rows[k0 : k0 + KEY_BLOCK][None] == exclude_rows[rows, None], math.inf)
                found_d, found_i = d.topk(min(self.neighbours, d.shape[1]), dim=1, largest=False)
                found_i += k0
                if best[c] is not None:
                    found_d, found_i = torch.cat([best[c][0], found_d], 1), torch.cat([best[c][1], found_i], 1)
                    found_d, pick = found_d.topk(min(self.neighbours, found_d.shape[1]), dim=1, largest=False)
                    found_i = found_i.gather(1, pick)
                best[c] = found_d, found_i
        if not chunks:
            return queries.new_zeros(0, self.neighbours), torch.zeros(0, self.neighbours, dtype=torch.long)
        dist = torch.cat([b[0] for b in best]) + queries.pow(2).sum(1, keepdim=True)
        return dist, torch.cat([b[1] for b in best])

    def _neighbour_weights(self, dist: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(-dist / temperature, dim=-1)  # excluded keys (inf) get weight 0

    @staticmethod
    def _mix(lm_log_p: torch.Tensor, memory_p: torch.Tensor, weight: float) -> torch.Tensor:
        """log((1 - w) p_adapter + w p_memory), from log p_adapter and p_memory."""
        return torch.logaddexp(lm_log_p + math.log1p(-weight), (weight * memory_p).log())

    def mix_target(
        self,
        lm_log_probs: torch.Tensor,
        dist: torch.Tensor,
        index: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """log p(target) of the mixture, from the adapter's log p(target) [n] and the neighbours."""
        hits = self.values[index] == targets[:, None]
        return self._mix(lm_log_probs, (self._neighbour_weights(dist, self.temperature) * hits).sum(1), self.weight)

    def mix_logits(self, logits: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """log p over the whole vocabulary ([..., V]) for queries [..., d]: what generation samples from."""
        shape = logits.shape
        log_p = torch.log_softmax(logits.reshape(-1, shape[-1]).float(), dim=-1)
        if self.weight == 0.0:
            return log_p.reshape(shape)
        dist, index = self.search(queries.reshape(-1, queries.shape[-1]))
        memory_p = torch.zeros_like(log_p).scatter_add_(
            1, self.values[index], self._neighbour_weights(dist, self.temperature)
        )
        return self._mix(log_p, memory_p, self.weight).reshape(shape)

    def lm_loss(
        self,
        hidden: torch.Tensor,
        queries: torch.Tensor,
        head: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int = 128,
    ) -> torch.Tensor:
        """Mean next-token loss of the mixture: hidden [B, T, d] is what the LM head reads, queries [B, T, d]
        are final_norm(h_L). Only each target's probability is built, a chunk of tokens at a time."""
        targets, hidden, queries = next_token_rows(labels, hidden, queries)
        lm_log_probs = target_log_probs(hidden, head, bias, targets, chunk)
        if self.weight == 0.0:
            return -lm_log_probs.mean()
        dist, index = self.search(queries)
        return -self.mix_target(lm_log_probs, dist, index, targets).mean()

    # ---------------------------------------------------------------- fitting
    def fit(
        self, lm_log_probs: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
    ) -> float:
        """Pick the weight and temperature that minimise the loss of training tokens (`rows`: their samples),
        each scored against the other samples' keys. Returns that loss."""
        dist, index = self.search(queries, exclude_rows=rows)
        hits = self.values[index] == targets[:, None]
        best = (math.inf, 0.0, 1.0)
        for temperature in TEMPERATURES:
            memory_p = (self._neighbour_weights(dist, temperature) * hits).sum(1)
            for weight in WEIGHTS:
                loss = -self._mix(lm_log_probs, memory_p, weight).mean().item()
                best = min(best, (loss, weight, temperature))
        _, self.weight, self.temperature = best
        return best[0]

    def settings(self) -> dict[str, float]:
        return {"neighbours": self.neighbours, "weight": self.weight, "temperature": self.temperature}

    # ---------------------------------------------------------------- files
    def save(self, adapter_dir: Path) -> Path:
        path = Path(adapter_dir) / RETRIEVAL_FILE
        save_file({"keys": self.keys, "values": self.values.to(torch.int32)}, path)
        return path

    @classmethod
    def load(cls, adapter_dir: Path, settings: dict[str, float]) -> TokenMemory:
        path = Path(adapter_dir) / RETRIEVAL_FILE
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            raise PacError(
                f"{path} is missing: this adapter mixes in a memory of its training text. Copy the file "
                "along with the adapter, or pass --no-retrieval to use the adapter without it"
            ) from None
        except Exception as exc:  # safetensors raises its own errors for truncated or foreign files
            raise PacError(f"{path} is not a readable token memory ({exc}): retrain, or pass --no-retrieval") from None
        return cls(
            tensors["keys"],
            tensors["values"],
            None,
            int(settings["neighbours"]),
            settings["weight"],
            settings["temperature"],
        )


def next_token_rows(labels: torch.Tensor, *per_position: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The targets (labels [B, T] shifted by one, -100 dropped) and, for each [B, T, ...] tensor, its rows at
    the positions that predict them."""
    targets = labels[:, 1:]
    keep = targets != -100
    return (targets[keep], *(t[:, :-1][keep] for t in per_position))


def target_log_probs(
    hidden: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """log softmax(hidden @ head^T + bias)[target] for rows of hidden [n, d], without the [n, V] logits at once."""
    out = []
    for start in range(0, len(hidden), chunk):
        logits = hidden[start : start + chunk].float() @ head.T.float()
        if bias is not None:
            logits += bias
        out.append(torch.log_softmax(logits, dim=-1).gather(1, targets[start : start + chunk, None]).squeeze(1))
    return torch.cat(out) if out else hidden.new_zeros(0)
