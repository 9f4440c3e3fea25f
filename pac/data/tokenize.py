"""Turn Records into fixed-length tensors for classification or language modelling."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pac.data.records import Record
from pac.data.split import check_labels
from pac.errors import DataError, ModelError

IGNORE_INDEX = -100  # labels value that torch's cross-entropy (and HF models) skip


@dataclass
class TokenizedSet:
    """Right-padded token tensors of one dataset split, row i belonging to sample_ids[i]."""

    sample_ids: list[str]
    input_ids: torch.LongTensor  # [N, T], T = max_length
    attention_mask: torch.LongTensor  # [N, T], 1 = real token
    labels: torch.LongTensor  # classify: [N] class index; lm: [N, T] token ids, -100 where no loss
    label_names: list[str] | None  # classify: class names, index = label; lm: None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def fingerprint(self) -> str:
        """sha256 hex of everything a model sees; it keys the activation cache, so it must be stable."""
        h = hashlib.sha256(b"pac.TokenizedSet.v1\0")
        h.update(json.dumps({"sample_ids": self.sample_ids, "label_names": self.label_names}).encode())
        for name in ("input_ids", "attention_mask", "labels"):
            t = getattr(self, name)
            h.update(f"\0{name}{tuple(t.shape)}\0".encode())
            # Fixed dtype and byte order so the same values always hash the same.
            h.update(t.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes())
        return h.hexdigest()

    def sample_digests(self) -> list[str]:
        """Per sample, a digest of what the model sees of it (its tokens, mask and labels): a cache takes in
        another cache's activations of a sample only where the digests agree (pac.cache.writer.adopt), since a
        sample id names a row of a file, which may have changed."""
        if not len(self):  # an empty share (a peer with no rows of a small split)
            return []
        labels = self.labels.reshape(len(self), -1)
        rows = torch.cat([self.input_ids, self.attention_mask, labels], dim=1).to(torch.int64)
        data = rows.contiguous().numpy().astype("<i8", copy=False)
        return [hashlib.sha256(b"%d\0" % labels.shape[1] + row.tobytes()).hexdigest()[:32] for row in data]

    def subset(self, idx: Sequence[int] | torch.Tensor | slice) -> TokenizedSet:
        """Rows `idx` (indices, a bool mask, or a slice), in that order, as a new set."""
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        index = torch.as_tensor(idx if isinstance(idx, torch.Tensor) else list(idx))
        index = index.nonzero().flatten() if index.dtype == torch.bool else index.long().flatten()
        return TokenizedSet(
            sample_ids=[self.sample_ids[i] for i in index.tolist()],
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            labels=self.labels[index],
            label_names=None if self.label_names is None else list(self.label_names),
        )


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    task: str,
    max_length: int,
    label_names: list[str] | None = None,
    chat: bool = False,
) -> TokenizedSet:
    """Tokenize `records` for task "classify" (text -> class index) or "lm" (next-token loss).

    lm: text and chat messages get loss on every real token; prompt/completion only on the completion.
    chat=True renders prompt/completion rows as a user turn and an assistant turn of the chat template
    (the form `pac generate` prompts in), else as `prompt + completion + eos`; see `prompt_format`.
    Sets `tokenizer.pad_token` to its eos token when it has no pad token.
    """
    check_labels(records, task)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length={max_length!r} must be a whole number of tokens, at least 2.")
    pad_with_eos(tokenizer)
    if tokenizer.pad_token_id is None:
        raise ModelError(
            "the tokenizer has neither a pad nor an eos token, so sequences cannot be padded; "
            "set tokenizer.pad_token before tokenizing."
        )
    sample_ids = [r.sample_id for r in records]
    n = len(records)
    if task == "classify":
        names = sorted({r.label for r in records}) if label_names is None else list(label_names)
        class_index = {name: i for i, name in enumerate(names)}
        for r in records:
            if r.label not in class_index:
                raise DataError(
                    f"{r.sample_id}: label {r.label!r} is not one of the classes {names}; the class list was "
                    "fixed when the model was set up, so correct the label or remove the row."
                )
        if n == 0:  # e.g. val_size=0: an empty set, not a tokenizer call on an empty batch
            empty = torch.zeros((0, max_length), dtype=torch.long)
            return TokenizedSet([], empty, empty.clone(), torch.zeros(0, dtype=torch.long), names)
        enc = _encode(tokenizer, [r.text for r in records], max_length, add_special_tokens=True)
        labels = torch.tensor([class_index[r.label] for r in records], dtype=torch.long)
        return TokenizedSet(sample_ids, enc["input_ids"], enc["attention_mask"], labels, names)

    input_ids = torch.full((n, max_length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    prompt_mask = torch.zeros((n, max_length), dtype=torch.bool)  # True where a prompt token gets no loss
    plain = [i for i, r in enumerate(records) if r.text is not None]
    turns = [i for i, r in enumerate(records) if r.text is None and r.messages is not None]
    paired = [i for i, r in enumerate(records) if r.text is None and r.messages is None]
    if plain:
        enc = _encode(tokenizer, [records[i].text for i in plain], max_length, add_special_tokens=True)
        input_ids[plain], attention_mask[plain] = enc["input_ids"], enc["attention_mask"]
    if turns:
        rendered = [_render_chat(tokenizer, records[i]) for i in turns]
        # The template already writes the special tokens it wants; adding them again would double BOS.
        enc = _encode(tokenizer, rendered, max_length, add_special_tokens=False)
        input_ids[turns], attention_mask[turns] = enc["input_ids"], enc["attention_mask"]
    if paired:
        if chat and getattr(tokenizer, "chat_template", None) is None:
            raise ModelError(
                "chat formatting of prompt/completion rows needs a tokenizer with a chat template; "
                "use --no-chat (plain prompt + completion) or a model that ships a template (an Instruct model)."
            )
        prompt_mask[paired] = _encode_paired(
            tokenizer, [records[i] for i in paired], max_length, input_ids, attention_mask, paired, chat
        )
    labels = input_ids.masked_fill((attention_mask == 0) | prompt_mask, IGNORE_INDEX)
    return TokenizedSet(sample_ids, input_ids, attention_mask, labels, None)


def pad_with_eos(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its eos token as one (where it has one)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        # Padding is told apart by the attention mask, not the id, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token


def _encode(
    tokenizer: Any, texts: list[str], max_length: int, *, add_special_tokens: bool, offsets: bool = False
) -> Any:
    return tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        padding_side="right",
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
        return_token_type_ids=False,
        return_offsets_mapping=offsets,
        return_special_tokens_mask=offsets,
    )


def _render_chat(tokenizer: Any, record: Record) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{record.sample_id}: the record has chat messages but the tokenizer has no chat template; "
            "use a model that ships one (an Instruct model) or convert the rows to prompt/completion."
        )
    try:
        return tokenizer.apply_chat_template(list(record.messages), tokenize=False)
    except Exception as e:  # template errors (jinja, raise_exception on a bad role order) are data problems
        raise DataError(
            f"{record.sample_id}: the chat template could not render these messages ({e}); "
            "fix the roles/turn order of this row."
        ) from e


def prompt_format(tokenizer: Any, chat: bool) -> dict[str, str | None]:
    """How prompts are written, as an adapter records it so generation and evaluation prompt as training did:
    {"format": "chat", "chat_template_sha256": ...} or {"format": "plain", "chat_template_sha256": None}."""
    template = getattr(tokenizer, "chat_template", None) if chat else None
    if not isinstance(template, str):
        return {"format": "plain", "chat_template_sha256": None}
    return {"format": "chat", "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def render_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The prompt as the model reads it before its answer: a user turn plus the assistant's header, or as is."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _render_paired(tokenizer: Any, record: Record, chat: bool) -> tuple[str, str]:
    """(prefix, whole text) of a prompt/completion row; the loss covers whole[len(prefix):]."""
    prefix = render_prompt(tokenizer, record.prompt, chat)
    if chat:
        turns = [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion}]
        whole = tokenizer.apply_chat_template(turns, tokenize=False)
        if whole.startswith(prefix):  # the template's own end-of-turn marks where the answer stops
            return prefix, whole
    # The completion ends in eos so a fine-tuned assistant learns where its answer stops.
    return prefix, prefix + record.completion + (tokenizer.eos_token or "")


def _encode_paired(
    tokenizer: Any,
    records: list[Record],
    max_length: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: list[int],
    chat: bool,
) -> torch.Tensor:
    """Tokenize prompt+completion into `rows` of the output tensors; returns the prompt-token mask.

    Tokenizing the joined string (not the parts) gives the same tokens the model sees at inference; character
    offsets then tell which tokens belong to the completion.
    """
    if not tokenizer.is_fast:
        raise ModelError(
            "prompt/completion data needs a fast tokenizer (one with tokenizer.json) to find where the "
            "completion starts; use the model's fast tokenizer."
        )
    rendered = [_render_paired(tokenizer, r, chat) for r in records]
    # A chat template writes its own special tokens; adding them again would double BOS.
    enc = _encode(tokenizer, [whole for _, whole in rendered], max_length, add_special_tokens=not chat, offsets=True)
    input_ids[rows], attention_mask[rows] = enc["input_ids"], enc["attention_mask"]
    prompt_chars = torch.tensor([len(prefix) for prefix, _ in rendered]).unsqueeze(1)
    # A token ending past the prompt belongs to the completion (including one that straddles the boundary).
    completion = (
        (enc["special_tokens_mask"] == 0)
        & (enc["attention_mask"] == 1)
        & (enc["offset_mapping"][..., 1] > prompt_chars)
    )
    missing = (~completion.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise DataError(
            f"{records[missing[0]].sample_id}: the prompt fills all {max_length} tokens, so nothing of the "
            "completion is left to learn from; raise max_length or shorten the prompt."
        )
    first = completion.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    return torch.arange(max_length).unsqueeze(0) < first
