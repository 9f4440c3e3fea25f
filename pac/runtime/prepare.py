"""A run's data, ready to train on: read and checked before any model loads, split in the words of the options
that choose the split, tokenised for the model; and what identifies a run (its model, data and options).
Shared by single-device training (pac.workflow) and the coordinator of a collaborative run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pac.cache.fingerprint import model_fingerprint
from pac.data.images import ImageSet, is_digits, read_image_data, stratified_split
from pac.data.records import Record
from pac.data.sources import bundled_bbc_news_dir, data_digest, load_records
from pac.data.split import check_labels, split_records
from pac.data.tasks import IMAGE_TASK
from pac.data.tokenize import TokenizedSet, pad_with_eos, prompt_format, tokenize_records
from pac.errors import PacError
from pac.methods.registry import get_method
from pac.models.backbone import load_backbone
from pac.models.loading import model_name, resolve_model
from pac.models.vision import NetworkSpec, parse_network
from pac.runconfig import PLACEMENT_OPTIONS, DataOptions, TrainOptions, flat_options
from pac.runtime.trainer import TrainConfig

log = logging.getLogger(__name__)

SUMMARY = "summary.json"  # what a run wrote, in --out


@dataclass
class PreparedData:
    model_dir: Path | None  # None for an image task, which names its CNN in `network`
    tokenizer: Any
    train: TokenizedSet | ImageSet
    val: TokenizedSet | ImageSet
    label_names: list[str] | None
    holdout_ids: list[str] = field(default_factory=list)  # part of `train` that is never trained on
    prompt_format: dict[str, Any] = field(default_factory=lambda: prompt_format(None, chat=False))
    split_note: str = ""  # how the data was split, in the words of the options that choose it
    data_sha256: str = ""  # of the training data's bytes (pac.data.sources.data_digest), where they were read
    network: NetworkSpec | None = None  # the CNN of an image task (pac.models.vision)

    @cached_property  # read by the run's identity and its adapter's meta: a checkpoint's bytes are hashed once
    def model_fingerprint(self) -> str:
        return self.network.fingerprint() if self.network is not None else model_fingerprint(self.model_dir)

    def train_rows(self, holdout: bool) -> list[int]:
        """Rows of `train` in the holdout part (holdout=True) or in the part that trains."""
        held = set(self.holdout_ids)
        return [i for i, sid in enumerate(self.train.sample_ids) if (sid in held) == holdout]


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_with_eos(tokenizer)
    return tokenizer


def read_records(opts: DataOptions) -> list[Record]:
    if opts.data is None:
        return load_records(bundled_bbc_news_dir())
    return load_records(opts.data, text_field=opts.text_field, label_field=opts.label_field)


def default_val_size(opts: DataOptions) -> float:
    """What --val-size means when it is not given: 200 rows of the bundled corpus, 10% of a file, 0 beside
    --val-data."""
    if opts.val_size is not None:
        return opts.val_size
    return 0 if opts.val_data else 200 if opts.data is None else 0.1


def split_data(opts: DataOptions, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(train, validation): held out of `records` by --val-size, or all of --val-data."""
    bundled = opts.data is None
    train_size = opts.train_size if opts.train_size is not None else (400 if bundled else None)
    if opts.val_data and opts.val_size:
        raise PacError("--val-data is the validation set, so nothing is held out of --data: drop --val-size")
    train, val = split_records(
        records,
        val_size=default_val_size(opts),
        train_size=train_size,
        seed=opts.seed,
        stratify=opts.task == "classify",
    )
    if opts.val_data:
        val = load_records(opts.val_data, text_field=opts.text_field, label_field=opts.label_field)
        check_labels(val, opts.task)
    return train, val


def describe_split(opts: DataOptions, train: int, val: int, holdout: int) -> str:
    """'training on 360, validating on 40 (10% held out: --val-size)', in the words of the options."""
    if opts.val_data:
        where = f"{Path(opts.val_data).name} (--val-data)"
    else:
        size = default_val_size(opts)
        share = f"{size:.0%}" if isinstance(size, float) else f"{size} rows"
        where = f"{share} held out: --val-size" + (", the bundled corpus" if opts.data is None else "")
    note = f"training on {train - holdout}, validating on {val} ({where})"
    if holdout:
        note += f"; {holdout} more training rows held out to pick the epoch (--holdout)"
    return note


def prepare_data(model: str | None, opts: DataOptions) -> PreparedData:
    """Read, check and split the data (before any model is loaded, so bad data fails in a second), then
    resolve the model and tokenise both parts to fixed length (images: `prepare_images`)."""
    if opts.task == IMAGE_TASK:
        return prepare_images(model, opts)
    records = read_records(opts)
    check_labels(records, opts.task)
    train, val = split_data(opts, records)
    if not val:  # a few rows at 10%: train anyway, and say so (pac.runtime.trainer leaves val metrics out)
        asked = "the default 10%" if opts.val_size is None else f"--val-size {opts.val_size:g}"
        log.warning(
            "nothing to validate on: %s of %d rows is 0 rows; training goes on without validation figures "
            "(--val-size 1 or more keeps rows out to validate on, or pass --val-data)",
            asked,
            len(records),
        )
    # Every class seen in either split has a head output, even one with no training row in a tiny split.
    labels = {r.label for r in [*train, *val] if r.label is not None}
    label_names = sorted(labels) if opts.task == "classify" else None
    holdout: list[Record] = []
    if opts.holdout:  # carved from the training part (stratified), so validation stays untouched
        _, holdout = split_records(train, val_size=opts.holdout, seed=opts.seed, stratify=opts.task == "classify")
        if not holdout:
            raise PacError(
                f"--holdout {opts.holdout:g} of {len(train)} training rows is 0 rows: nothing to pick the best "
                "epoch on (--early-stopping holds out 0.1 unless told otherwise); give a larger --holdout or more data"
            )
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    chat = opts.chat if opts.chat is not None else getattr(tokenizer, "chat_template", None) is not None
    # The user's rows decide the prompt format the adapter records: retain-mix rows follow it, never change it.
    templated = any(r.text is None for r in train) and (chat or any(r.messages for r in train))
    if opts.retain_mix:  # trained on, never held out or validated on: those stay the user's data
        train = train + retain_mix_records(model_dir, opts.retain_mix, chat)
    kw = {"task": opts.task, "max_length": opts.max_length, "label_names": label_names, "chat": chat}
    return PreparedData(
        model_dir,
        tokenizer,
        tokenize_records(train, tokenizer, **kw),
        tokenize_records(val, tokenizer, **kw),
        label_names,
        [r.sample_id for r in holdout],
        prompt_format(tokenizer, chat=templated),
        describe_split(opts, len(train), len(val), len(holdout)),
        data_digest(opts.data),
    )


def prepare_images(model: str | None, opts: DataOptions) -> PreparedData:
    """An image task's train and val images (pac.data.images) and its CNN (`--model NAME[:CHECKPOINT]`)."""
    for given, flag in ((opts.val_data, "--val-data"), (opts.retain_mix, "--retain-mix"), (opts.chat, "--chat")):
        if given:
            raise PacError(f"{flag} is for text tasks: an image task holds out --val-size of its images to validate")
    network = parse_network(model)
    parts = read_image_data(opts.data, opts.seed, opts.val_size, opts.train_size)
    train, val = parts["train"], parts["val"]
    holdout: list[str] = []
    if opts.holdout:
        held = stratified_split(train.labels, opts.holdout, opts.seed, len(train.label_names))[1]
        holdout = [train.sample_ids[i] for i in held.tolist()]
    source = f"digits ({opts.data or 'digits'})" if is_digits(opts.data) else opts.data
    note = f"training on {len(train) - len(holdout)} images of {source}, validating on {len(val)}"
    if holdout:
        note += f"; {len(holdout)} more held out to pick the epoch (--holdout)"
    return PreparedData(
        None,
        None,
        train,
        val,
        train.label_names,
        holdout,
        prompt_format(None, chat=False),
        note,
        train.fingerprint(),
        network,
    )


def retain_mix_records(model_dir: Path, n: int, chat: bool) -> list[Record]:
    """`--retain-mix N`: the base model's own greedy answers to N general prompts bundled with pac, as
    prompt/completion rows rendered as training renders them, so the adapter also learns to keep answering
    off-task as the base model does."""
    from pac.generate import encode_prompt, generate_ids
    from pac.retain import base_answer_records

    backbone, tokenizer = load_backbone(model_dir), load_tokenizer(model_dir)
    return base_answer_records(
        lambda ids, max_new_tokens: generate_ids(
            backbone, None, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id
        ),
        lambda prompt: encode_prompt(tokenizer, prompt, chat)[0].tolist(),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        model_fingerprint(model_dir),
        n,
    )


def train_config(opts: TrainOptions) -> TrainConfig:
    """The training loop's settings; the learning rate defaults to the method's for the task."""
    optim = opts.optim
    return TrainConfig(
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        lr=optim.lr or get_method(opts.method).default_lr(opts.data.task),
        weight_decay=optim.weight_decay,
        precision=optim.precision,
        seed=optim.seed,
        checkpoint_every=opts.checkpoint_every,
        early_stopping=optim.early_stopping,
    )


def run_identity(opts: TrainOptions, data: PreparedData) -> dict[str, Any]:
    """What makes a run's result: the model's weights, the data's content, the method and its options
    (pac.runtime.run_dir keys --out by it, so a checkpoint resumes only the run that wrote it)."""
    options = {k: v for k, v in flat_options(opts).items() if k not in PLACEMENT_OPTIONS}
    options["data"] = {k: v for k, v in options["data"].items() if k not in ("data", "val_data")}
    return {
        "model": data.model_fingerprint,
        "data": {"train": data.train.fingerprint(), "validation": data.val.fingerprint()},
        "options": options,
    }


def adapter_meta_of(opts: TrainOptions, data: PreparedData) -> dict[str, Any]:
    """What every saved adapter records to be evaluated and served again next to its base model, prompting
    and reading data as training did."""
    return {
        "task": opts.data.task,
        "label_names": data.label_names,
        "max_length": opts.data.max_length,
        "base_model_name_or_path": data.network.label if data.network is not None else model_name(opts.model),
        "base_model_fingerprint": data.model_fingerprint,
        "prompt_format": data.prompt_format,
        "data_fields": {"text_field": opts.data.text_field, "label_field": opts.data.label_field},
        "training_data_sha256": data.data_sha256,
    }
