"""Parallel Adapters: a side network beside the frozen backbone, trained from cached taps.

Only the side network (and the classification head) have requires_grad, so no gradient ever
flows into the backbone. The model reads taps - from the activation cache in phase 2, or from a
live backbone in evaluation and generation - and the frozen top of the backbone (final norm and
LM head) turns them into logits:

    causal LM:      logits = lm_head(final_norm(h_L) + y)
    classification: logits = Head(pool(final_norm(h_L) + y))     (readout "sum", the default)
                    logits = Head(pool(y))                       (readout "side": the side state alone,
                                                                   as Ladder Side-Tuning reads it)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pac.errors import PacError
from pac.methods.base import MethodModel, loss_count, task_loss
from pac.methods.defaults import TASKS
from pac.methods.parallel_adapters import tapped_layers
from pac.models.backbone import Backbone
from pac.models.heads import ClassificationHead, ReadoutMLP
from pac.models.lm_loss import chunked_lm_loss
from pac.models.loading import Checkpoint
from pac.models.retrieval import TokenMemory, next_token_rows, target_log_probs
from pac.models.shortlist import shortlist_lm_loss
from pac.models.side import SideNetwork

METHOD_TYPE = "PARALLEL_ADAPTERS"


@dataclass
class ParallelAdapterConfig:
    """Everything needed to rebuild the adapter next to its base model (saved as pac_adapter_config.json)."""

    task: str
    reduction: int = 8
    taps: list[int] | None = None  # None: every layer (0..L)
    tap_every: int = 1  # with taps None: tap every k-th layer (always 0 and L)
    gate_temperature: float = 0.1
    pooling: str = "mean"  # classification read-out over real tokens
    readout: str = "sum"  # classification: sum = final_norm(h_L) + Up(s_L); side = Up(s_L) alone
    side_init: str = "random"  # random | pruned (from the backbone's weights, Llama-like decoders)
    tap_norm: bool = False  # scale each tap to unit RMS per token before Down_i
    dropout: float = 0.0  # on the projected taps Down_i(h_i)
    train_final_norm: bool = False  # a trainable copy of the backbone's final norm (no backward into layers)
    vocab_bias: bool = False  # LM: a trainable per-token logit bias (domain word frequencies)
    side_heads: int | None = None  # attention heads of the side blocks (None: the backbone's count)
    readout_hidden: int = 0  # > 0: add a full-rank read-out MLP of [s; final_norm(h_L)] (models.heads.ReadoutMLP)
    retrieval: dict[str, float] | None = None  # LM: the token memory's settings (models.retrieval), if it has one
    side_network: bool = True  # False: no side network, only the head (+ final norm / vocab bias): the
    # baselines "linear probe" and "head + final norm only", on the same cache and trainer
    label_names: list[str] | None = None
    base_model_name_or_path: str = ""
    base_model_fingerprint: str = ""
    max_length: int = 128
    # How training wrote prompts and read its data, so evaluation and generation do the same by default.
    prompt_format: dict[str, Any] | None = None
    data_fields: dict[str, str] | None = None
    training_data_sha256: str = ""
    peft_type: str = field(default=METHOD_TYPE)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise PacError(f"--task must be one of {TASKS}, not {self.task!r}")
        if self.task == "classify" and not self.label_names:
            raise PacError("a classification adapter needs label names (the classes of the training data)")
        if self.readout not in ("sum", "side"):
            raise PacError(f"readout must be sum or side, not {self.readout!r}")
        if self.readout == "side" and (self.task != "classify" or not self.side_network):
            raise PacError(
                "readout=side (the side state alone) is for classification with a side network; a language "
                "model needs the backbone's own h_L, so use readout=sum"
            )
        if self.readout_hidden < 0:
            raise PacError(f"readout_hidden must be 0 (off) or a positive width, not {self.readout_hidden}")
        if self.readout_hidden and self.readout == "side":
            raise PacError("the read-out MLP reads final_norm(h_L), so it cannot go with readout=side; use readout=sum")
        if self.side_init not in ("random", "pruned"):
            raise PacError(f"side_init must be random or pruned, not {self.side_init!r}")
        if self.side_init == "pruned" and self.side_heads:
            raise PacError("pruned initialisation keeps the backbone's attention heads: leave side_heads unset")

    def resolved_taps(self, num_layers: int) -> list[int]:
        return tapped_layers(self.side_network, self.taps, self.tap_every, num_layers)

    def to_dict(self) -> dict[str, Any]:
        # "r" as peft names a reduced width; "reduction" is what from_dict reads back.
        return {**asdict(self), "r": self.reduction}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelAdapterConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ParallelAdapterModel(MethodModel):
    """Side network + head, on top of a frozen backbone slice that holds at least the final norm
    (and the LM head for language modelling)."""

    def __init__(self, top: Backbone, config: ParallelAdapterConfig):
        super().__init__()
        self.config = config
        self.task = config.task
        self.taps = config.resolved_taps(top.num_layers)
        self.top = top  # frozen: its parameters never get requires_grad
        self.side = (
            SideNetwork(
                top.config,
                self.taps,
                config.reduction,
                config.gate_temperature,
                config.tap_norm,
                config.dropout,
                config.side_heads,
            )
            if config.side_network
            else None
        )
        self.head = (
            ClassificationHead(top.hidden_size, len(config.label_names), config.pooling)
            if config.task == "classify"
            else None
        )
        self.final_norm = None
        if config.train_final_norm:
            if not top.family.causal:
                raise PacError("train_final_norm needs a decoder (BERT layers end in their own LayerNorm)")
            self.final_norm = copy.deepcopy(top.norm).requires_grad_(True)
        side_width = self.side.config.hidden_size if self.side is not None else 0
        self.readout_mlp = (
            ReadoutMLP(side_width, top.hidden_size, config.readout_hidden) if config.readout_hidden else None
        )
        lm_bias = config.vocab_bias and config.task == "lm"
        self.vocab_bias = nn.Parameter(torch.zeros(top.config.vocab_size)) if lm_bias else None
        # Language modelling: a memory of the training tokens mixed in at inference (pac.models.retrieval);
        # attached after training, saved in its own file, never trained.
        self.memory: TokenMemory | None = None

    def forward(
        self, taps: torch.Tensor, attention_mask: torch.Tensor, past_key_values: Any = None, last_only: bool = False
    ) -> torch.Tensor:
        """taps: [B, len(self.taps), T, d] (tap order as self.taps; the last one is h_L). With a token
        memory (language modelling) the result is the log-probabilities of the mixture. last_only (language
        modelling): only the last position's next-token distribution, [B, 1, V]; generation reads nothing
        else, and a long prompt would otherwise cost a vocabulary product and a memory search per token."""
        if last_only and self.head is not None:
            raise PacError("last_only is for language modelling: a classification head reads every position")
        side_state = self.side.state(taps, attention_mask, past_key_values) if self.side is not None else None
        h_last = taps[:, -1]
        if last_only:  # the side blocks still read every position: their KV cache needs them
            h_last = h_last[:, -1:]
            side_state = side_state[:, -1:] if side_state is not None else None
        if side_state is None:
            base = self._corrected(self._base(h_last), None)
            logits = self.head(base, attention_mask) if self.head is not None else self.top.logits(base)
            logits = logits if self.vocab_bias is None else logits + self.vocab_bias
        else:
            logits = self.logits_from_state(h_last, side_state, attention_mask)
        if self.memory is None:
            return logits
        return self.memory.mix_logits(logits, self.top.final_norm(h_last))

    def lm_hidden(self, taps: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: final_norm(h_L) + Up(s_L) (+ the read-out MLP's correction)."""
        side_state = self.side.state(taps, attention_mask) if self.side is not None else None
        return self._corrected(self._base(taps[:, -1]), side_state)

    def _base(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.final_norm(h_last) if self.final_norm is not None else self.top.final_norm(h_last)

    def _corrected(self, base: torch.Tensor, side_state: torch.Tensor | None) -> torch.Tensor:
        """base + Up(s) + ReadoutMLP([s; base]), each term where the adapter has it."""
        hidden = base if side_state is None else base + self.side.up(side_state)
        return hidden if self.readout_mlp is None else hidden + self.readout_mlp(side_state, base)

    def logits_from_state(
        self, h_last: torch.Tensor, side_state: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits from h_L and the side network's normed state (the part after the side blocks)."""
        base = self._base(h_last)
        if self.head is not None:
            if self.config.readout == "side":
                return self.head(self.side.up(side_state), attention_mask)
            return self.head(self._corrected(base, side_state), attention_mask)
        if self.readout_mlp is not None:
            logits = self.top.logits(self._corrected(base, side_state))
            return logits if self.vocab_bias is None else logits + self.vocab_bias
        # lm_head(base + Up(s)) = lm_head(base) + s (W U)^T + W b exactly: the head is linear without bias.
        # Factored so, backward never multiplies by the 49k x d head: with W frozen and `base` constant
        # (unless the final norm trains), the only large product left is the forward of lm_head(base).
        head, up = self.top.lm_head.weight, self.side.up
        logits = self.top.logits(base) + side_state @ (head @ up.weight).T + head @ up.bias
        return logits if self.vocab_bias is None else logits + self.vocab_bias

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["taps"], batch["attention_mask"])

    def metrics_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.task != "lm":
            return super().metrics_batch(batch)
        # The lean LM loss never holds the full logits (1/3 of the side network's peak memory went to
        # evaluating with them); its mean times the token count is the exact sum.
        count = loss_count("lm", batch["labels"])
        return {"loss_sum": self.loss_batch(batch).item() * count, "count": count}

    def loss_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss (mean over samples, or over next-token targets)."""
        if self.memory is not None and not self.training:  # evaluation of the mixture with the memory
            taps, mask = batch["taps"], batch["attention_mask"]
            hidden, queries = self.lm_hidden(taps, mask), self.top.final_norm(taps[:, -1])
            return self.memory.lm_loss(hidden, queries, self.top.lm_head.weight, self.vocab_bias, batch["labels"])
        if self.side is None:
            return super().loss_batch(batch)
        taps, mask = batch["taps"], batch["attention_mask"]
        # Under --precision bf16, CPU autocast stops at the side blocks: at width d/r their products are
        # too small to gain, while bf16 attention backward and the casts cost more than they save
        # (measured on SmolLM2 LM, one step: 1.10 s all fp32, 0.96 s all bf16, 0.76 s with the side
        # blocks in fp32 and the products with the vocabulary-sized head in bf16). GPU autocast is untouched.
        with torch.autocast("cpu", enabled=False):
            side_state = self.side.state(taps, mask)
            if "shortlist_index" in batch:  # a training batch of pac.runtime.sources.Shortlisted: no big products
                if self.readout_mlp is not None or self.vocab_bias is not None or self.final_norm is not None:
                    raise PacError(
                        "--shortlist trains the plain side network: drop the read-out MLP, the vocab bias "
                        "and the trainable final norm, or drop --shortlist"
                    )
                return shortlist_lm_loss(side_state, self.side.up, self.top.lm_head.weight, batch)
        return self.loss_from_state(taps[:, -1], side_state, mask, batch["labels"])

    def loss_from_state(
        self, h_last: torch.Tensor, side_state: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss from h_L and the side state. For language modelling it never materialises the full
        logits (pac.models.lm_loss): the same value and gradients at a fraction of the memory."""
        if self.task != "lm":
            return task_loss(self.task, self.logits_from_state(h_last, side_state, attention_mask), labels)
        base = self._base(h_last)
        head, up = self.top.lm_head.weight, self.side.up
        if self.readout_mlp is not None:
            # The correction has full rank, so the head cannot be folded into Up: one product of the
            # corrected hidden state with the head, and its gradient back to that state.
            bias = self.vocab_bias if self.vocab_bias is not None else head.new_zeros(head.shape[0])
            return chunked_lm_loss(self._corrected(base, side_state), None, None, bias, head, labels)
        bias = head @ up.bias if self.vocab_bias is None else head @ up.bias + self.vocab_bias
        return chunked_lm_loss(base, side_state, head @ up.weight, bias, head, labels)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds: the side network and the head, nothing of the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("top.")}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [m for m in missing if not m.startswith("top.")]
        if missing or unexpected:
            raise PacError(f"adapter weights do not match its config: missing {missing}, unexpected {unexpected}")

    def train(self, mode: bool = True) -> ParallelAdapterModel:
        super().train(mode)
        self.top.eval()  # the backbone stays deterministic
        return self


def initialize_pruned(model: ParallelAdapterModel, model_dir: Path, sample_taps: torch.Tensor) -> torch.Tensor:
    """Pruned initialisation of the side blocks from the checkpoint in `model_dir`, one layer at a time
    (the whole backbone is never loaded in phase 2); channel statistics from cached taps
    [S, len(model.taps), T, d]. Returns the kept channels."""
    checkpoint = Checkpoint(model_dir)
    family = model.top.family
    root = checkpoint.prefix_of(f"{family.layers_prefix}0.")

    def layer_weights(tap: int) -> dict[str, torch.Tensor]:
        prefix = f"{root}{family.layers_prefix}{tap - 1}."  # layer i-1 (0-based) produces tap i
        return {k[len(prefix) :]: v for k, v in checkpoint.load(checkpoint.with_prefix(prefix), torch.float32).items()}

    magnitude = sample_taps.abs().float()
    return model.side.init_pruned(
        layer_weights, model.top.norm.weight, magnitude.mean(dim=(0, 1, 2)), magnitude.amax(dim=(0, 1, 2))
    )


def attach_memory(model: ParallelAdapterModel, train_source: Any, seed: int = 0, fit_samples: int = 64) -> float:
    """Give a trained language-model adapter a memory of its training tokens (pac.models.retrieval) and fit
    the mixture on up to `fit_samples` training samples, each against the others' keys. Returns that fit's
    loss per token."""
    if model.task != "lm":
        raise PacError("retrieval mixes next-token distributions: it is for --task lm")
    # Keys need h_L alone: reading every tap for them would hold 31x the bytes per batch.
    memory = TokenMemory.from_source(train_source.with_taps([model.taps[-1]]), model.top.final_norm)
    rows = torch.randperm(len(train_source), generator=torch.Generator().manual_seed(seed))[:fit_samples]
    log_probs, queries, targets, owners = [], [], [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for chunk in rows.split(8):  # a training batch's worth of taps at a time
            batch = train_source.batch(chunk.tolist())
            taps, labels = batch["taps"], batch["labels"]
            target, hidden, query, owner = next_token_rows(
                labels,
                model.lm_hidden(taps, batch["attention_mask"]),
                model.top.final_norm(taps[:, -1]),
                chunk[:, None].expand_as(labels),
            )
            log_probs.append(target_log_probs(hidden, model.top.lm_head.weight, model.vocab_bias, target))
            queries.append(query)
            targets.append(target)
            owners.append(owner)
    model.train(was_training)
    loss = memory.fit(torch.cat(log_probs), torch.cat(queries), torch.cat(targets), torch.cat(owners))
    model.memory = memory
    return loss
