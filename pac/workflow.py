"""What `pac train`, `pac eval` and `pac generate` do, as functions the benchmarks call too.

train (parallel adapters):  data -> phase 1 (build or reuse the activation cache, backbone freed)
                            -> phase 2 (side network from the cache) -> adapter directory
train (lora / dora):        data -> peft training through the whole backbone -> adapter directory
"""

from __future__ import annotations

import errno
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pac.cache import cache_bytes_per_sample
from pac.data.records import Record
from pac.data.sources import bundled_bbc_news_dir, data_digest, load_records
from pac.data.split import check_labels, split_records
from pac.data.tokenize import TokenizedSet, prompt_format, tokenize_records
from pac.errors import PacError
from pac.methods.base import MethodModel, load_adapter, read_adapter_config, save_adapter
from pac.methods.boundary import METHOD_TYPE as BOUNDARY_TYPE
from pac.methods.boundary import BoundaryModel
from pac.methods.defaults import LORA_LR, PARALLEL_ADAPTER_DEFAULTS
from pac.methods.lora import LoraModel, LoraSettings
from pac.methods.parallel_adapters import (
    ParallelAdapterConfig,
    ParallelAdapterModel,
    attach_memory,
    initialize_pruned,
)
from pac.model_card import write_model_card
from pac.models.backbone import Backbone, load_backbone, load_config
from pac.models.families import family_for
from pac.models.loading import model_name, pac_home, resolve_model
from pac.models.retrieval import TokenMemory
from pac.models.shortlist import Shortlisted, with_shortlists
from pac.runtime.cache_build import CacheBuildResult, build_cache, model_fingerprint
from pac.runtime.heap import one_off_step
from pac.runtime.progress import RunClock, Watch
from pac.runtime.run_dir import claim
from pac.runtime.sources import CachedTaps, LiveTaps, Tokens
from pac.runtime.trainer import TrainConfig, Trainer, evaluate

log = logging.getLogger(__name__)

METHODS = ("parallel-adapters", "lora", "dora", "boundary")
SUMMARY = "summary.json"


@dataclass
class DataOptions:
    data: str | None = None  # None: the bundled BBC News corpus
    task: str = "classify"
    max_length: int = 128
    val_data: str | None = None  # a separate validation file; then nothing of `data` is held out
    val_size: float | None = None  # count or fraction; None: 200 for the bundled corpus, else 10%
    train_size: int | None = None  # None: 400 for the bundled corpus, else the rest
    seed: int = 0
    holdout: float = 0.0  # fraction of the training data kept out of training to pick the best epoch
    text_field: str = "text"
    label_field: str = "label"
    # Prompt/completion rows as a chat template's user and assistant turns (True), or as plain text (False);
    # None: the chat template where the tokenizer has one. The adapter records the format it was trained in.
    chat: bool | None = None
    retain_mix: int = 0  # lm: add the base model's answers to this many general prompts to training (pac.retain)


@dataclass
class TrainOptions:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    data: DataOptions = field(default_factory=DataOptions)
    method: str = "parallel-adapters"
    out: str = "runs/adapter"
    epochs: int = 3
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 0.0
    precision: str = "fp32"  # or "bf16": training steps' products in bfloat16 (pac.runtime.step.autocast)
    seed: int = 0
    checkpoint_every: int = 0
    resume: bool = True  # continue this run from its checkpoints in `out` (they must be this run's)
    overwrite: bool = False  # replace an earlier run's outputs in `out`
    require_resume: bool = False  # refuse to start unless `out` holds this run to continue
    early_stopping: int = 0  # patience in epochs, judged on the holdout part of the training data
    # parallel adapters
    reduction: int | None = None  # None: the task's default (PARALLEL_ADAPTER_DEFAULTS)
    tap_every: int = 1
    taps: list[int] | None = None  # explicit tapped layers (0 and L are always added); overrides tap_every
    pooling: str = "mean"
    readout: str = "sum"
    gate_temperature: float = 0.1
    side_init: str | None = None  # None: the task's default
    tap_norm: bool = False
    dropout: float = 0.0
    train_final_norm: bool = False
    vocab_bias: bool = False
    side_heads: int | None = None  # None: the backbone's head count
    readout_hidden: int | None = None  # None: the task's default (0: no read-out MLP)
    side_network: bool = True
    retrieval: bool | None = None  # None: the task's default; lm: mix in a memory of the training tokens
    shortlist: int | None = None  # None: the task's default; lm: train on per-token shortlists of K words
    cache_dir: str | None = None
    cache_dtype: str = "fp16"
    # lora / dora / boundary
    lora_r: int = 8
    boundary_layer: int | None = None  # boundary: cache h_k and train LoRA on layers k..L (default 2L/3)
    boundary_side: bool = False  # boundary: a side network (width d/reduction) beside layers k..L too
    boundary_side_below: bool = False  # boundary: a side network over layers 0..k whose output joins h_k


@dataclass
class PreparedData:
    model_dir: Path
    tokenizer: Any
    train: TokenizedSet
    val: TokenizedSet
    label_names: list[str] | None
    holdout_ids: list[str] = field(default_factory=list)  # part of `train` that is never trained on
    prompt_format: dict[str, Any] = field(default_factory=lambda: prompt_format(None, chat=False))
    split_note: str = ""  # how the data was split, in the words of the options that choose it
    data_sha256: str = ""  # of the training data's bytes (pac.data.sources.data_digest), where they were read

    def train_rows(self, holdout: bool) -> list[int]:
        """Rows of `train` in the holdout part (holdout=True) or in the part that trains."""
        held = set(self.holdout_ids)
        return [i for i, sid in enumerate(self.train.sample_ids) if (sid in held) == holdout]


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
    resolve the model and tokenise both parts to fixed length."""
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
    if opts.retain_mix:  # trained on, never held out or validated on: those stay the user's data
        train = train + retain_mix_records(model_dir, opts.retain_mix, chat)
    kw = {"task": opts.task, "max_length": opts.max_length, "label_names": label_names, "chat": chat}
    templated = any(r.text is None for r in train) and (chat or any(r.messages for r in train))
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


def retain_mix_records(model_dir: Path, n: int, chat: bool) -> list[Record]:
    """`--retain-mix N`: the base model's own greedy answers to N general prompts bundled with pac, as
    prompt/completion rows rendered as training renders them, so the adapter also learns to keep answering
    off-task as the base model does."""
    from pac.generate import encode_prompt
    from pac.retain import base_answer_records

    base = load_base(model_dir)
    return base_answer_records(
        lambda ids, max_new_tokens: generate_answer(base, ids, max_new_tokens),
        lambda prompt: encode_prompt(base.tokenizer, prompt, chat)[0].tolist(),
        lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
        model_fingerprint(model_dir),
        n,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def with_defaults(opts: TrainOptions) -> TrainOptions:
    """Options left unset take the task's measured defaults (parallel adapters)."""
    if opts.method not in METHODS:
        raise PacError(f"--method must be one of {', '.join(METHODS)}, not {opts.method!r}")
    if opts.retrieval and (opts.method != "parallel-adapters" or opts.data.task != "lm"):
        raise PacError("--retrieval is for --method parallel-adapters --task lm: drop it")
    if opts.shortlist and (opts.method != "parallel-adapters" or opts.data.task != "lm"):
        raise PacError("--shortlist is for --method parallel-adapters --task lm: drop it")
    if opts.data.retain_mix:
        from pac.retain import check_retain_mix

        if opts.data.task != "lm":
            raise PacError("--retain-mix adds prompt/completion rows: it is for --task lm")
        check_retain_mix(opts.data.retain_mix)
    if opts.lora_r == 0 and opts.method in ("lora", "dora"):
        raise PacError("--lora-r 0 trains nothing: it is for --method boundary (frozen top layers); use --lora-r 8")
    if opts.method != "parallel-adapters":
        return opts
    unset = {k: v for k, v in PARALLEL_ADAPTER_DEFAULTS[opts.data.task].items() if getattr(opts, k) is None}
    opts = replace(opts, **unset)
    if opts.shortlist and (opts.readout_hidden or opts.vocab_bias or opts.train_final_norm or not opts.side_network):
        if "shortlist" in unset:  # the default is for the plain side network: the others train on every word
            return replace(opts, shortlist=0)
        raise PacError(
            "--shortlist trains the plain side network: drop --readout-hidden, --vocab-bias, --train-final-norm "
            "and --no-side-network, or drop --shortlist"
        )
    return opts


# Options that say where things are, not what is trained: they do not change a run's identity (the model's
# weights and the data's content stand in for the paths that name them).
_PLACEMENT_OPTIONS = ("model", "out", "cache_dir", "checkpoint_every", "resume", "overwrite", "require_resume")


def run_identity(opts: TrainOptions, data: PreparedData) -> dict[str, Any]:
    """What makes a run's result: the model's weights, the data's content, the method and its options
    (pac.runtime.run_dir keys --out by it, so a checkpoint resumes only the run that wrote it)."""
    options = {k: v for k, v in asdict(opts).items() if k not in _PLACEMENT_OPTIONS}
    options["data"] = {k: v for k, v in options["data"].items() if k not in ("data", "val_data")}
    return {
        "model": model_fingerprint(data.model_dir),
        "data": {"train": data.train.fingerprint(), "validation": data.val.fingerprint()},
        "options": options,
    }


def train(opts: TrainOptions, report: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train, evaluate after every epoch, save the adapter; returns (and writes) a summary.
    `report` receives the lines a user follows (the split, a resumed run, each epoch as it ends)."""
    opts = with_defaults(opts)
    torch.manual_seed(opts.seed)
    prepared = prepare_data(opts.model, opts.data)
    out = Path(opts.out)
    run = claim(out, run_identity(opts, prepared), opts.overwrite, opts.require_resume)
    if run.finished:
        report(f"{out} already holds this finished run (same model, data and options); --overwrite trains it again")
        return {**json.loads((out / SUMMARY).read_text()), "already_trained": True}
    report(prepared.split_note)
    if run.continuing:
        report(f"continuing the interrupted run in {out} from its last checkpoint (--overwrite starts over)")
    summary: dict[str, Any] = {
        "method": opts.method,
        "task": opts.data.task,
        "options": asdict(opts),
        "data_sha256": prepared.data_sha256,
        "train_samples": len(prepared.train) - len(prepared.holdout_ids),
        "holdout_samples": len(prepared.holdout_ids),
        "val_samples": len(prepared.val),
        "prompt_format": prepared.prompt_format,
    }
    cached = opts.method in ("parallel-adapters", "boundary")
    watch = Watch(report, RunClock(cache_samples=len(prepared.train) + len(prepared.val) if cached else 0))
    phases = {"parallel-adapters": _train_parallel_adapters, "boundary": _train_boundary}
    try:
        summary.update(phases.get(opts.method, _train_lora)(opts, prepared, out, watch))
    except Exception as exc:
        if is_disk_full(exc):
            raise PacError(disk_full_message(exc, opts, prepared)) from exc
        raise
    kept = [e["best_epoch"] for e in summary["epochs"] if "best_epoch" in e]
    if kept:  # the saved adapter holds this epoch's weights
        summary["best_epoch"] = kept[-1]
    summary["peak_rss_mb"] = peak_rss_mb()
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, summary)
    return summary


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, from Python's own I/O or from a library that words it (safetensors, torch.save)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


def disk_full_message(exc: BaseException, opts: TrainOptions, data: PreparedData) -> str:
    """Where the disk filled up, how much the run needs there, and that nothing finished is lost."""
    cache_root = Path(opts.cache_dir) if opts.cache_dir else pac_home() / "cache"
    where = getattr(exc, "filename", None) or "the disk"
    config = load_config(data.model_dir)
    # Phase 1 stores every tapped layer's output for every token: 2 bytes a value (fp16/bf16), 1 (int8).
    per_value = 1 if opts.cache_dtype == "int8" else 2
    taps = {"parallel-adapters": config.num_hidden_layers + 1, "boundary": 1}.get(opts.method, 0)
    samples = len(data.train) + len(data.val)
    cache_mb = samples * opts.data.max_length * config.hidden_size * taps * per_value / 1e6
    free = {path: shutil.disk_usage(path).free / 1e6 for path in (cache_root, Path(opts.out)) if path.exists()}
    room = ", ".join(f"{free_mb:,.0f} MB free on the disk of {path}" for path, free_mb in free.items())
    parts = [f"the disk is full: writing {where} failed ({room})."]
    if taps:
        parts.append(f"The activation cache needs about {cache_mb:,.0f} MB in {cache_root}.")
    parts.append(
        "The adapter and its checkpoints need a few MB in --out. Free space, or pass --cache-dir / --out on a "
        "larger disk, then run the same command again: finished cache shards and checkpoints are kept, so it "
        "continues where it stopped."
    )
    return " ".join(parts)


def train_config(opts: TrainOptions, default_lr: float) -> TrainConfig:
    return TrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        lr=opts.lr or default_lr,
        weight_decay=opts.weight_decay,
        precision=opts.precision,
        seed=opts.seed,
        checkpoint_every=opts.checkpoint_every,
        early_stopping=opts.early_stopping,
    )


def parallel_adapter_config(opts: TrainOptions, data: PreparedData) -> ParallelAdapterConfig:
    """The adapter's config from the options (defaults already filled in): saved beside its weights."""
    config = load_config(data.model_dir)
    return ParallelAdapterConfig(
        reduction=opts.reduction,
        tap_every=opts.tap_every,
        taps=sorted({0, config.num_hidden_layers, *opts.taps}) if opts.taps else None,
        gate_temperature=opts.gate_temperature,
        readout=opts.readout,
        side_init=opts.side_init,
        tap_norm=opts.tap_norm,
        dropout=opts.dropout,
        train_final_norm=opts.train_final_norm,
        vocab_bias=opts.vocab_bias,
        side_heads=opts.side_heads,
        readout_hidden=opts.readout_hidden,
        side_network=opts.side_network,
        **_adapter_meta(opts, data),
    )


def build_parallel_adapter_model(
    opts: TrainOptions, data: PreparedData, adapter_config: ParallelAdapterConfig, train_source: CachedTaps
) -> ParallelAdapterModel:
    """Phase 2's model: the side network beside only the final norm / LM head of the backbone.
    Seeded here, so every device of a collaborative run starts from the same weights."""
    num_layers = load_config(data.model_dir).num_hidden_layers
    top = load_backbone(data.model_dir, num_layers, num_layers, with_head=True)
    torch.manual_seed(opts.seed)
    model = ParallelAdapterModel(top, adapter_config)
    # Channel statistics from a few cached samples; a peer without training rows of its own takes rank 0's
    # weights by broadcast (pac.runtime.collaborative).
    if opts.side_init == "pruned" and len(train_source):
        initialize_pruned(model, data.model_dir, train_source.batch(list(range(min(16, len(train_source)))))["taps"])
    return model


def save_parallel_adapter(
    out: Path, adapter_config: ParallelAdapterConfig, model: ParallelAdapterModel, epochs: list[dict[str, Any]]
) -> dict[str, Any]:
    adapter_config.taps = model.taps  # saved resolved: the adapter file says exactly which layers it reads
    save_adapter(out, adapter_config.to_dict(), model.trainable_state_dict())
    return {
        "epochs": epochs,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gates": [round(g, 4) for g in model.side.gates().tolist()] if model.side is not None else [],
    }


def _train_parallel_adapters(opts: TrainOptions, data: PreparedData, out: Path, watch: Watch) -> dict[str, Any]:
    adapter_config = parallel_adapter_config(opts, data)
    num_layers = load_config(data.model_dir).num_hidden_layers
    built = _build_caches(opts, data, adapter_config.resolved_taps(num_layers), watch)
    train_source, val_source, holdout_source = _cached_sources(built, data)
    model = build_parallel_adapter_model(opts, data, adapter_config, train_source)
    shortlist: dict[str, Any] = {}
    started = time.perf_counter()
    training_source = with_shortlists(train_source, model, opts.shortlist)
    if isinstance(training_source, Shortlisted):
        shortlist = {
            "size": opts.shortlist,
            "mb": training_source.nbytes() / 1e6,
            "built_files": training_source.built,  # 0: an earlier run on this cache built them
            "seconds": time.perf_counter() - started,
        }
    trainer = Trainer(
        model,
        opts.data.task,
        training_source,
        train_config(opts, PARALLEL_ADAPTER_DEFAULTS[opts.data.task]["lr"]),
        out,
        val=val_source,
        holdout=holdout_source,
        **watch.trainer_hooks(opts.epochs),
    )
    epochs = trainer.fit(resume=opts.resume)
    # Recorded apart from the process's peak, which would also count the memory's one-off fit below.
    training_peak = peak_rss_mb()
    retrieval: dict[str, Any] = {}
    if opts.retrieval:
        started = time.perf_counter()
        with one_off_step():  # else the fit's blocks grow the heap past training's peak (pac.runtime.heap)
            fit_loss = attach_memory(model, train_source, seed=opts.seed)
            adapter_config.retrieval = model.memory.settings()
            path = model.memory.save(out)
            scored = evaluate(model, val_source, opts.data.task)
        retrieval = {
            **adapter_config.retrieval,
            "tokens": len(model.memory.keys),
            "file_mb": path.stat().st_size / 1e6,
            "fit_loss": fit_loss,
            **{f"val_{k}": v for k, v in scored.items()},  # none without validation rows
            "seconds": time.perf_counter() - started,
        }
    saved = save_parallel_adapter(out, adapter_config, model, epochs)
    extras = {"retrieval": retrieval, "shortlist": shortlist}
    return {
        **saved,
        **_cache_summary(built),
        **{k: v for k, v in extras.items() if v},
        "training_peak_rss_mb": training_peak,
    }


def _build_caches(opts: TrainOptions, data: PreparedData, taps: list[int], watch: Watch) -> dict[str, CacheBuildResult]:
    """Phase 1: one backbone pass over train and validation data (the backbone is freed after each)."""
    cache_root = Path(opts.cache_dir) if opts.cache_dir else pac_home() / "cache"
    built = {}
    for name, part in (("train", data.train), ("val", data.val)):
        built[name] = build_cache(
            data.model_dir, part, cache_root, taps, opts.cache_dtype, desc=f"cache build ({name})", clock=watch.clock
        )
        done = built[name]
        what = f"cached in {done.seconds:.1f} s" if done.computed_samples else "already cached"
        watch.report(f"phase 1 ({name}): {len(part)} samples {what}  {watch.clock.left()}".rstrip())
    return built


def _cached_sources(
    built: dict[str, CacheBuildResult], data: PreparedData
) -> tuple[CachedTaps, CachedTaps, CachedTaps | None]:
    """(train, val, holdout): the holdout samples are read from the training cache, never trained on."""
    train = built["train"].open()
    ids = data.train.sample_ids
    holdout = CachedTaps(train, [ids[i] for i in data.train_rows(holdout=True)]) if data.holdout_ids else None
    return CachedTaps(train, [ids[i] for i in data.train_rows(holdout=False)]), CachedTaps(built["val"].open()), holdout


def _cache_summary(built: dict[str, CacheBuildResult]) -> dict[str, Any]:
    return {
        "cache_build_seconds": {k: v.seconds for k, v in built.items()},
        "cache_computed_samples": {k: v.computed_samples for k, v in built.items()},
        "cache_dir": {k: str(v.cache_dir) for k, v in built.items()},
        "cache_dtype": built["train"].spec.dtype,
        "cache_bytes_per_sample": cache_bytes_per_sample(built["train"].cache_dir),
    }


def _adapter_meta(opts: TrainOptions, data: PreparedData) -> dict[str, Any]:
    """What every saved adapter records to be evaluated and served again next to its base model, prompting
    and reading data as training did."""
    return {
        "task": opts.data.task,
        "label_names": data.label_names,
        "pooling": opts.pooling,
        "max_length": opts.data.max_length,
        "base_model_name_or_path": model_name(opts.model),
        "base_model_fingerprint": model_fingerprint(data.model_dir),
        "prompt_format": data.prompt_format,
        "data_fields": {"text_field": opts.data.text_field, "label_field": opts.data.label_field},
        "training_data_sha256": data.data_sha256,
    }


def _train_boundary(opts: TrainOptions, data: PreparedData, out: Path, watch: Watch) -> dict[str, Any]:
    """Cache h_k only; phase 2 trains LoRA on layers k..L from it (pac.methods.boundary)."""
    num_layers = load_config(data.model_dir).num_hidden_layers
    k = opts.boundary_layer if opts.boundary_layer is not None else 2 * num_layers // 3
    if not 0 < k < num_layers:
        raise PacError(f"--boundary-layer must be between 1 and {num_layers - 1}, not {k}")
    upper = load_backbone(data.model_dir, k, num_layers, with_head=True)
    side = (opts.reduction or 8) if opts.boundary_side else None
    below = (opts.reduction or 8) if opts.boundary_side_below else None
    model = BoundaryModel(upper, opts.data.task, data.label_names, opts.pooling, opts.lora_r, side, below)
    built = _build_caches(opts, data, model.taps, watch)
    train_source, val_source, holdout_source = _cached_sources(built, data)
    trainer = Trainer(
        model,
        opts.data.task,
        train_source,
        train_config(opts, LORA_LR),
        out,
        val=val_source,
        holdout=holdout_source,
        **watch.trainer_hooks(opts.epochs),
    )
    epochs = trainer.fit(resume=opts.resume)
    meta = {
        "peft_type": BOUNDARY_TYPE,
        "boundary_layer": k,
        "r": opts.lora_r,
        "side_reduction": side,
        "below_reduction": below,
        **_adapter_meta(opts, data),
    }
    save_adapter(out, meta, model.trainable_state_dict())
    return {
        "epochs": epochs,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **_cache_summary(built),
    }


def _train_lora(opts: TrainOptions, data: PreparedData, out: Path, watch: Watch) -> dict[str, Any]:
    settings = LoraSettings(
        task=opts.data.task,
        r=opts.lora_r,
        alpha=2 * opts.lora_r,
        use_dora=opts.method == "dora",
        pooling=opts.pooling,
        label_names=data.label_names,
    )
    model = LoraModel(data.model_dir, settings)
    holdout = Tokens(data.train.subset(data.train_rows(holdout=True))) if data.holdout_ids else None
    trainer = Trainer(
        model,
        opts.data.task,
        Tokens(data.train.subset(data.train_rows(holdout=False))),
        train_config(opts, LORA_LR),
        out,
        val=Tokens(data.val),
        holdout=holdout,
        **watch.trainer_hooks(opts.epochs),
    )
    epochs = trainer.fit(resume=opts.resume)
    model.save(out, model_name(opts.model))
    pac_meta = {"peft_type_pac": opts.method, **_adapter_meta(opts, data)}
    (out / "pac_lora.json").write_text(json.dumps(pac_meta, indent=2) + "\n")
    return {
        "epochs": epochs,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ----------------------------------------------------------------------------- inference
@dataclass
class LoadedAdapter:
    kind: str  # "parallel-adapters" | "lora" | "boundary" | "base" (the base model alone, load_base)
    task: str
    model_dir: Path
    model: Any  # ParallelAdapterModel, LoraModel or BoundaryModel; None for the base model
    backbone: Any  # full Backbone for parallel adapters and the base model, layers 0..k for boundary, None for LoRA
    tokenizer: Any
    max_length: int
    label_names: list[str] | None
    # As training recorded them (adapters from before pac recorded them: None / ""; see `chat`).
    prompt_format: dict[str, Any] | None = None
    data_fields: dict[str, str] | None = None
    training_data_sha256: str = ""

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template, as in training (older adapters: the chat template)."""
        return self.prompt_format is None or self.prompt_format.get("format") == "chat"


def adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter's recorded settings (task, prompt format, data fields...), read without loading any model."""
    lora = Path(adapter_dir) / "pac_lora.json"
    meta = json.loads(lora.read_text()) if lora.exists() else read_adapter_config(Path(adapter_dir))
    if meta is None:
        load_adapter(Path(adapter_dir))  # raises the message that says what an adapter directory holds
    return meta


def prompt_chat(asked: bool | None, loaded: LoadedAdapter) -> bool:
    """Whether the prompt goes through the chat template: as the adapter's prompts were trained, unless
    --chat / --no-chat says otherwise (with a warning: the adapter learned the other form)."""
    has_template = getattr(loaded.tokenizer, "chat_template", None) is not None
    trained = loaded.chat and has_template
    chat = trained if asked is None else asked and has_template
    if asked is not None and loaded.prompt_format is not None and chat != trained:
        log.warning(
            "the adapter was trained on %s prompts, and --%s asks for the other form: answers may be worse",
            "chat-template" if trained else "plain",
            "chat" if asked else "no-chat",
        )
    recorded = (loaded.prompt_format or {}).get("chat_template_sha256")
    if chat and recorded and prompt_format(loaded.tokenizer, chat=True)["chat_template_sha256"] != recorded:
        log.warning("this tokenizer's chat template is not the one the adapter was trained with")
    return chat


def _recorded(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("prompt_format", "data_fields")} | {
        "training_data_sha256": meta.get("training_data_sha256", "")
    }


def _base_model_dir(meta: dict[str, Any], model: str | None) -> Path:
    model_dir = resolve_model(model or meta.get("base_model_name_or_path"))
    expected = meta.get("base_model_fingerprint")
    if expected and model_fingerprint(model_dir) != expected:
        raise PacError(
            f"the adapter was trained on another model than {model_dir} (fingerprint mismatch); "
            "pass the base model it was trained on with --model"
        )
    return model_dir


def load_base(model: str | Path | None = None, adapter_dir: str | Path | None = None) -> LoadedAdapter:
    """The base model alone, served like an adapter (kind "base"; `pac generate --base`): `model`, else the
    model `adapter_dir` was trained on (then with that adapter's recorded prompt format), else the bundled one."""
    meta = adapter_meta(adapter_dir) if adapter_dir is not None else {}
    model_dir = _base_model_dir(meta, None if model is None else str(model))
    config = load_config(model_dir)
    if not family_for(config).causal:
        raise PacError(
            f"{model_dir} is an encoder ({family_for(config).name}) without an LM head: it has no next-token output "
            "to generate from or to compare with an adapter's"
        )
    context = getattr(config, "max_position_embeddings", 0)
    tokenizer = load_tokenizer(model_dir)  # prompted as the adapter's rows were trained, if one is named
    return LoadedAdapter(
        "base", "lm", model_dir, None, load_backbone(model_dir), tokenizer, context, None, **_recorded(meta)
    )


def generate_answer(
    loaded: LoadedAdapter,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int = 0,
) -> torch.Tensor:
    """The new token ids [1, N] after `input_ids` [1, T], decoded as `pac generate` does, for a language-model
    adapter or the base model (load_base)."""
    from pac.generate import generate_ids

    if loaded.task != "lm":
        raise PacError(f"a {loaded.task} adapter cannot generate: generation needs one trained with --task lm")
    if loaded.kind == "boundary":
        raise PacError("generation with boundary adapters is not supported; train with parallel-adapters or lora")
    if loaded.kind == "lora":
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        return loaded.model.peft.generate(
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )[:, input_ids.shape[1] :]
    return generate_ids(
        loaded.backbone,
        loaded.model,
        input_ids,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        loaded.tokenizer.eos_token_id,
    )


def load_for_inference(adapter_dir: str | Path, model: str | None = None, retrieval: bool = True) -> LoadedAdapter:
    """A saved adapter with its base model, ready for evaluation or generation; `retrieval=False` leaves a
    language-model adapter's memory of its training text (retrieval.safetensors) unloaded."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "pac_lora.json").exists():
        meta = json.loads((adapter_dir / "pac_lora.json").read_text())
        model_dir = _base_model_dir(meta, model)
        settings = LoraSettings(task=meta["task"], pooling=meta["pooling"], label_names=meta["label_names"])
        lora = LoraModel(model_dir, settings, adapter_dir=adapter_dir)
        lora.load_head(adapter_dir)
        return LoadedAdapter(
            "lora",
            meta["task"],
            model_dir,
            lora.eval(),
            None,
            load_tokenizer(model_dir),
            meta["max_length"],
            meta["label_names"],
            **_recorded(meta),
        )
    raw_config, tensors = load_adapter(adapter_dir)
    if raw_config.get("peft_type") == BOUNDARY_TYPE:
        model_dir = _base_model_dir(raw_config, model)
        k, num_layers = raw_config["boundary_layer"], load_config(model_dir).num_hidden_layers
        upper = load_backbone(model_dir, k, num_layers, with_head=True)
        boundary = BoundaryModel(
            upper,
            raw_config["task"],
            raw_config["label_names"],
            raw_config["pooling"],
            raw_config["r"],
            raw_config.get("side_reduction"),
            raw_config.get("below_reduction"),
        )
        missing, unexpected = boundary.load_state_dict(tensors, strict=False)
        if unexpected or any("lora_" in m or m.startswith(("head.", "side.", "below.")) for m in missing):
            raise PacError(f"{adapter_dir}: adapter weights do not match its config")
        lower = load_backbone(model_dir, 0, k)  # feeds h_k to the adapted top layers
        return LoadedAdapter(
            "boundary",
            raw_config["task"],
            model_dir,
            boundary.eval(),
            lower,
            load_tokenizer(model_dir),
            raw_config["max_length"],
            raw_config["label_names"],
            **_recorded(raw_config),
        )
    config = ParallelAdapterConfig.from_dict(raw_config)
    model_dir = _base_model_dir(raw_config, model)
    backbone = load_backbone(model_dir)
    adapter = ParallelAdapterModel(backbone, config)
    adapter.load_trainable(tensors)
    if config.retrieval and retrieval:
        adapter.memory = TokenMemory.load(adapter_dir, config.retrieval)
    return LoadedAdapter(
        "parallel-adapters",
        config.task,
        model_dir,
        adapter.eval(),
        backbone,
        load_tokenizer(model_dir),
        config.max_length,
        config.label_names,
        **_recorded(raw_config),
    )


class _BaseLM(MethodModel):
    """The untrained model as a method: next-token logits of the full backbone."""

    task = "lm"

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.eval()

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(batch["input_ids"], batch["attention_mask"], taps=())
        return self.backbone.logits(self.backbone.final_norm(out.hidden))


def evaluate_zero_shot(model: str | None, opts: DataOptions, split: str | None = None) -> dict[str, Any]:
    """The untrained model on the same rows: perplexity (lm), or accuracy by label likelihood
    (classify: each class name is scored after the text and a plain prompt, see methods.zero_shot)."""
    split = default_split(opts, split)
    records = evaluation_records(opts, split)
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    started = time.perf_counter()
    if opts.task == "lm":
        chat = opts.chat if opts.chat is not None else getattr(tokenizer, "chat_template", None) is not None
        data = tokenize_records(records, tokenizer, task="lm", max_length=opts.max_length, chat=chat)
        metrics = evaluate(_BaseLM(load_backbone(model_dir)), Tokens(data), "lm")
    else:
        from transformers import AutoModelForCausalLM

        from pac.methods.zero_shot import zero_shot_predict

        if not family_for(load_config(model_dir)).causal:
            raise PacError("zero-shot classification scores label names with a language model: use a decoder")
        names = sorted({r.label for r in records})
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        predicted = zero_shot_predict(lm, tokenizer, [r.text for r in records], names, opts.max_length)
        metrics = {"accuracy": sum(names[p] == r.label for p, r in zip(predicted, records, strict=True)) / len(records)}
    seconds = time.perf_counter() - started
    return {**metrics, "samples": len(records), "split": split, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def default_split(opts: DataOptions, split: str | None) -> str:
    """`pac eval` scores a file it is given whole, and the bundled corpus's validation split."""
    return split or ("val" if opts.data is None else "all")


def evaluation_records(opts: DataOptions, split: str) -> list[Record]:
    """The rows `pac eval` scores: every row of --data (split "all"), or its validation split ("val"),
    made as `pac train` made it with the same --split-seed and --val-size."""
    records = read_records(opts)
    check_labels(records, opts.task)
    return split_data(opts, records)[1] if split == "val" else records


def evaluate_adapter(
    loaded: LoadedAdapter, opts: DataOptions, split: str | None = None, records: list[Record] | None = None
) -> dict[str, Any]:
    """Metrics of a saved adapter on every row of the data, or on its validation split (the bundled corpus's
    default), computed from raw text through the live backbone (no cache). `records`: the rows, if already
    read (`pac eval` reads them before loading the model)."""
    opts = DataOptions(**{**asdict(opts), "task": loaded.task, "max_length": loaded.max_length})
    split = default_split(opts, split)
    records = records if records is not None else evaluation_records(opts, split)
    if split == "all" and loaded.training_data_sha256 in ("", data_digest(opts.data)):
        trained = "may include" if not loaded.training_data_sha256 else "include"
        memory = " and the adapter's memory holds their text" if getattr(loaded.model, "memory", None) else ""
        log.warning(
            "these rows %s the ones the adapter was trained on%s, so the score is optimistic about new text "
            "(pass --split val to score only the validation split%s)",
            trained,
            memory,
            ", and --no-retrieval" if memory else "",
        )
    data = tokenize_records(
        records,
        loaded.tokenizer,
        task=opts.task,
        max_length=opts.max_length,
        label_names=loaded.label_names,
        chat=prompt_chat(opts.chat, loaded),
    )
    source = Tokens(data) if loaded.kind == "lora" else LiveTaps(data, loaded.backbone, loaded.model.taps)
    started = time.perf_counter()
    metrics = evaluate(loaded.model, source, loaded.task)
    return {**metrics, "samples": len(data), "split": split, "seconds": time.perf_counter() - started}


def evaluate_retain(loaded: LoadedAdapter, chat: bool) -> dict[str, Any]:
    """How much the adapter changed the model off its training data (`pac eval --retain`, pac.retain): the
    base model's greedy answers to the bundled general prompts, teacher-forced through the adapter; prompts
    through the chat template or not (`chat`) as `pac generate` would prompt the adapter."""
    from pac.generate import encode_prompt
    from pac.retain import model_next_token_logits, retain_report

    base = load_base(loaded.model_dir)
    started = time.perf_counter()
    report = retain_report(
        model_next_token_logits("base", "lm", None, base.backbone),
        model_next_token_logits(loaded.kind, loaded.task, loaded.model, loaded.backbone),
        lambda ids, max_new_tokens: generate_answer(base, ids, max_new_tokens),
        lambda prompt: encode_prompt(base.tokenizer, prompt, chat)[0].tolist(),
        lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
        model_fingerprint(base.model_dir),
    )
    return {**report, "chat": chat, "seconds": time.perf_counter() - started}
