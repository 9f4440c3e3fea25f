"""The one in-memory shape every data source is converted to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One training example; exactly one of the input shapes (text, prompt/completion, messages) is set.

    ``sample_id`` is stable across runs (it keys the activation cache) and is what error messages cite.
    """

    sample_id: str
    text: str | None = None  # plain text (classification input, or LM text)
    label: str | None = None  # class name (classification)
    prompt: str | None = None  # LM prompt/completion pairs: loss only on the completion
    completion: str | None = None
    messages: tuple[dict, ...] | None = None  # chat turns {"role","content"}, rendered by the chat template
