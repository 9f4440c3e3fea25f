"""Deterministic, stratified train/validation splits and per-task record checks."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pac.data.records import Record
from pac.errors import DataError

TASKS = ("classify", "lm")


def check_labels(records: Sequence[Record], task: str) -> None:
    """Fail before any work is done, naming the first record that `task` cannot train on."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    for r in records:
        if task == "classify":
            if r.text is None:
                raise DataError(
                    f"{r.sample_id}: classification needs a text field, but this record is a "
                    f"{'chat' if r.messages is not None else 'prompt/completion'} example; "
                    "give every row a text and a label, or use --task lm."
                )
            if r.label is None:
                raise DataError(
                    f"{r.sample_id}: the record has no label, and --task classify needs one on every record; "
                    "add a label field (a 'label' key or column, or put the file in a class sub-directory), "
                    "or use --task lm to train a language model on the text."
                )
        elif r.text is None and r.messages is None and (r.prompt is None or r.completion is None):
            raise DataError(
                f"{r.sample_id}: nothing to train a language model on; give the record a text, "
                "a prompt and completion, or messages."
            )


def split_records(
    records: Sequence[Record],
    *,
    val_size: int | float,
    train_size: int | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[list[Record], list[Record]]:
    """Split into (train, val), both sorted by sample_id.

    The result depends only on the set of records and `seed`, never on input order: records are sorted by
    sample_id, then shuffled within each class by one `random.Random(seed)`. With labels present and
    `stratify`, each class gets its proportional share of val (and of `train_size`), rounded by largest
    remainder so the totals are exact.
    """
    if not records:
        raise DataError("no records to split; the dataset is empty.")
    ordered = sorted(records, key=lambda r: r.sample_id)
    for a, b in zip(ordered, ordered[1:], strict=False):
        # Duplicate ids would make the order (and the activation cache key) ambiguous.
        if a.sample_id == b.sample_id:
            raise DataError(
                f"sample id {a.sample_id!r} appears twice; sample ids must be unique, so load each file "
                "once (and give files in different folders different names)."
            )
    n = len(ordered)
    n_val = _count(val_size, n)
    if n_val >= n:
        raise DataError(
            f"val_size={val_size!r} takes {n_val} of the {n} records and leaves none to train on; make it smaller."
        )

    by_label = stratify and any(r.label is not None for r in ordered)
    groups: dict[str | None, list[Record]] = {}
    for r in ordered:
        groups.setdefault(r.label if by_label else None, []).append(r)
    keys = sorted(groups, key=lambda k: (k is None, k or ""))  # unlabeled records, if any, come last
    rng = random.Random(seed)
    for k in keys:
        rng.shuffle(groups[k])

    val_counts = _allocate(n_val, [len(groups[k]) for k in keys])
    val = [r for k, c in zip(keys, val_counts, strict=True) for r in groups[k][:c]]
    rest = [groups[k][c:] for k, c in zip(keys, val_counts, strict=True)]
    if train_size is None:
        train = [r for group in rest for r in group]
    else:
        available = sum(len(group) for group in rest)
        valid = isinstance(train_size, int) and not isinstance(train_size, bool)
        if not valid or not 1 <= train_size <= available:
            raise DataError(
                f"train_size={train_size!r} must be a whole number from 1 to {available} "
                f"(the records left after taking {n_val} for validation)."
            )
        train_counts = _allocate(train_size, [len(group) for group in rest])
        train = [r for group, c in zip(rest, train_counts, strict=True) for r in group[:c]]
    return sorted(train, key=lambda r: r.sample_id), sorted(val, key=lambda r: r.sample_id)


def _count(size: int | float, n: int) -> int:
    """val_size as a count (int) or a fraction of n (float in [0, 1))."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"val_size={size!r} must be a count (int) or a fraction (float between 0 and 1).")
    if isinstance(size, int):
        if size < 0:
            raise DataError(f"val_size={size} must not be negative.")
        return size
    if not 0.0 <= size < 1.0:
        raise DataError(f"val_size={size} as a fraction must be in [0, 1); pass an int for a record count.")
    return math.floor(size * n + 0.5)


def _allocate(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over groups in proportion to `sizes` (largest remainder, ties to the earlier group)."""
    n = sum(sizes)
    counts = [total * s // n for s in sizes]
    # Integer remainders avoid float rounding making the result differ between machines.
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % n), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
