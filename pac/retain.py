"""What an adapter changed off its training data: the base model's own greedy answers to general prompts,
teacher-forced through the adapter.

The prompts ship with pac (retain_prompts.json): "eval", 50 general-knowledge and instruction prompts that
`pac eval --retain` scores, and "mix", a disjoint set whose base-model answers `pac train --retain-mix N` adds
to the training data (so the measure never scores what was trained on). The base model answers each prompt
greedily once; the answers are cached under $PAC_HOME/retain/, keyed by the model's fingerprint and each
prompt's token ids (so the prompt format is part of the key). Then the base model and the adapter each read
prompt + answer in one pass, and at every answer position (the base's end-of-text token included, where it
stopped) their next-token distributions are compared:

  agreement     the adapter's likeliest token is the base model's (the base's greedy token)
  kl            KL(base || adapter), nats per answer token
  answers_kept  prompts whose every answer position agrees: greedy decoding with the adapter then gives the
                base model's answer token for token (teacher forcing and free decoding coincide while they agree)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from pac.data.records import Record
from pac.errors import PacError
from pac.models.loading import pac_home

# (ids [B, T], attention mask [B, T]) -> next-token logits (or log-probabilities) [B, T, V] at every position
NextTokenLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (prompt ids [1, T], at most this many new tokens) -> the new token ids [1, N] of a greedy answer
Answer = Callable[[torch.Tensor, int], torch.Tensor]

ANSWER_TOKENS = 48  # a short answer, or the start of a long one: enough to see what changed
MIX_ANSWER_TOKENS = 128  # --retain-mix rows: whole answers
PROMPT_SETS = ("eval", "mix")


def answers_dir() -> Path:
    """Where the base models' answers are cached."""
    return pac_home() / "retain"


def general_prompts(part: str) -> list[str]:
    """The bundled general prompts: "eval" (what --retain scores) or "mix" (what --retain-mix trains on)."""
    if part not in PROMPT_SETS:
        raise PacError(f"the general prompts come in the sets {PROMPT_SETS}, not {part!r}")
    return json.loads(files("pac").joinpath("retain_prompts.json").read_text(encoding="utf-8"))[part]


def cached_answers(
    answer: Answer, prompt_ids: Sequence[list[int]], model_fingerprint: str, max_new_tokens: int = ANSWER_TOKENS
) -> list[list[int]]:
    """The base model's answers (token ids) to `prompt_ids`: each prompt is answered once per model and answer
    length, then read from $PAC_HOME/retain/ (one file per model and length, keyed by the prompt's token ids)."""
    path = answers_dir() / f"{model_fingerprint[:32]}-{max_new_tokens}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    known = stored.get("answers", {}) if stored.get("model_fingerprint") == model_fingerprint else {}
    keys = [hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:32] for ids in prompt_ids]
    missing = [i for i, key in enumerate(keys) if key not in known]
    if missing:
        with torch.inference_mode():
            for i in missing:
                known[keys[i]] = answer(torch.tensor([prompt_ids[i]]), max_new_tokens)[0].tolist()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # renamed into place: a reader never sees half a file
        partial.write_text(json.dumps({"model_fingerprint": model_fingerprint, "answers": known}))
        partial.replace(path)
    return [known[key] for key in keys]


@dataclass
class PromptScore:
    """One prompt's comparison over its answer positions."""

    tokens: int
    agreeing: int  # positions where the adapter's top-1 token is the base model's
    kl_sum: float  # KL(base || adapter) summed over the positions, nats
    first_difference: int | None  # the first position where they disagree (None: the answer is kept)
    adapter_token: int | None  # the adapter's top-1 token there


@torch.inference_mode()
def compare(
    base: NextTokenLogits,
    adapter: NextTokenLogits,
    sequences: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
) -> list[PromptScore]:
    """Base model and adapter on each (prompt ids, answer ids), teacher-forced: one pass each over
    prompt + answer, compared at the positions that predict the answer's tokens. Sequences go in right-padded
    batches: a causal model's positions never see the padding after them."""
    if any(not prompt or not answer for prompt, answer in sequences):
        raise PacError("each compared sequence needs a prompt and an answer of at least one token")
    scores = []
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        inputs = [prompt + answer[:-1] for prompt, answer in chunk]  # the last answer token is predicted, never read
        width = max(len(ids) for ids in inputs)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in inputs])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in inputs])
        base_logits, adapter_logits = base(ids, mask), adapter(ids, mask)
        for row, (prompt, answer) in enumerate(chunk):
            where = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
            scores.append(_score(base_logits[row, where], adapter_logits[row, where]))
    return scores


def _score(base_logits: torch.Tensor, adapter_logits: torch.Tensor) -> PromptScore:
    """One answer's figures from both models' next-token logits at its positions [N, V]."""
    base_lp, adapter_lp = torch.log_softmax(base_logits.float(), -1), torch.log_softmax(adapter_logits.float(), -1)
    base_top, adapter_top = base_lp.argmax(-1), adapter_lp.argmax(-1)
    kl = (base_lp.exp() * (base_lp - adapter_lp)).sum(-1).clamp_min(0)  # >= 0; rounding can dip below
    differ = (base_top != adapter_top).nonzero().flatten()
    first = int(differ[0]) if len(differ) else None
    return PromptScore(
        tokens=len(base_top),
        agreeing=int((base_top == adapter_top).sum()),
        kl_sum=float(kl.sum()),
        first_difference=first,
        adapter_token=int(adapter_top[first]) if first is not None else None,
    )


def summarize(scores: Sequence[PromptScore]) -> dict[str, float | int]:
    """Agreement and KL per answer token (every token of every prompt weighs the same), answers kept per prompt."""
    tokens = sum(s.tokens for s in scores)
    kept = sum(s.first_difference is None for s in scores)
    return {
        "prompts": len(scores),
        "answer_tokens": tokens,
        "agreement": sum(s.agreeing for s in scores) / tokens,
        "kl": sum(s.kl_sum for s in scores) / tokens,
        "answers_kept": kept / len(scores),
        "answers_kept_count": kept,
    }


def retain_report(
    base: NextTokenLogits,
    adapter: NextTokenLogits,
    answer: Answer,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    model_fingerprint: str,
    examples: int = 3,
) -> dict[str, Any]:
    """The retain measure over the bundled "eval" prompts (`pac eval --retain`): summary figures, and the
    prompts the adapter changed most (by KL) with the base model's answer and where the adapter departs."""
    prompts = general_prompts("eval")
    prompt_ids = [encode(p) for p in prompts]
    answers = cached_answers(answer, prompt_ids, model_fingerprint)
    scores = compare(base, adapter, list(zip(prompt_ids, answers, strict=True)))
    changed = sorted(range(len(scores)), key=lambda i: -scores[i].kl_sum / scores[i].tokens)[:examples]
    most_changed = []
    for i in changed:
        s, ans = scores[i], answers[i]
        entry = {"prompt": prompts[i], "base_answer": decode(ans), "kl": s.kl_sum / s.tokens}
        if s.first_difference is not None:
            entry["base_continues"] = decode(ans[: s.first_difference + 1])
            entry["adapter_continues"] = decode([*ans[: s.first_difference], s.adapter_token])
        most_changed.append(entry)
    return {**summarize(scores), "most_changed": most_changed}


def check_retain_mix(n: int) -> None:
    """`--retain-mix N` takes between 1 and all of the bundled "mix" prompts."""
    available = len(general_prompts("mix"))
    if not 0 < n <= available:
        raise PacError(f"--retain-mix takes 1 to {available} general prompts (the ones pac ships), not {n}")


def base_answer_records(
    answer: Answer,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    model_fingerprint: str,
    n: int,
) -> list[Record]:
    """The first `n` "mix" prompts with the base model's own answers, as prompt/completion rows
    (`pac train --retain-mix N`): training on them holds the adapter to what the base model says off-task.
    The answers have room to run longer than the measure reads: a row teaches where its answer stops."""
    check_retain_mix(n)
    prompts = general_prompts("mix")[:n]
    answers = cached_answers(answer, [encode(p) for p in prompts], model_fingerprint, MIX_ANSWER_TOKENS)
    return [
        Record(sample_id=f"retain-mix/{i}", prompt=p, completion=decode(a).strip())
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]


def model_next_token_logits(kind: str, task: str, model: Any, backbone: Any) -> NextTokenLogits:
    """The next-token output of a loaded model (the parts of pac.workflow.LoadedAdapter) as a NextTokenLogits.

    kind "base": the backbone alone. Else the method's own next-token output (registry.Method.lm_logits):
    for language-model adapters what `pac generate` samples from; for classifiers the model's LM head over its
    layers as the adapter leaves them (LoRA changes them; a parallel-adapter classifier only reads the frozen
    backbone beside it)."""
    from pac.methods.registry import Loaded, get_method

    if kind != "base":
        method = get_method(kind)
        if method.lm_logits is None:
            raise PacError(f"--method {kind} has no next-token output to compare with the base model's")
        loaded = Loaded(model, backbone, task, 0, None)

    @torch.inference_mode()
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if kind == "base":
            return backbone.logits(backbone.final_norm(backbone(ids, mask, taps=()).hidden))
        return method.lm_logits(loaded, ids, mask)

    return run
