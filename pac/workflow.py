"""What `pac train`, `pac eval` and `pac generate` do, as functions the benchmarks call too.

train (parallel adapters):  data -> phase 1 (build or reuse the activation cache, backbone freed)
                            -> phase 2 (side network from the cache) -> adapter directory
train (lora / dora):        data -> peft training through the whole backbone -> adapter directory
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pac.cache import cache_bytes_per_sample
from pac.data.records import Record
from pac.data.sources import bundled_bbc_news_dir, load_records
from pac.data.split import check_labels, split_records
from pac.data.tokenize import TokenizedSet, tokenize_records
from pac.errors import PacError
from pac.methods.base import load_adapter, save_adapter
from pac.methods.boundary import METHOD_TYPE as BOUNDARY_TYPE
from pac.methods.boundary import BoundaryModel
from pac.methods.lora import LoraModel, LoraSettings
from pac.methods.parallel_adapters import (
    ParallelAdapterConfig,
    ParallelAdapterModel,
    attach_memory,
    initialize_pruned,
)
from pac.models.backbone import load_backbone, load_config
from pac.models.families import family_for
from pac.models.loading import BUNDLED_MODEL_ID, pac_home, resolve_model
from pac.models.retrieval import TokenMemory
from pac.models.shortlist import Shortlisted, with_shortlists
from pac.runtime.cache_build import CacheBuildResult, build_cache, model_fingerprint
from pac.runtime.heap import one_off_step
from pac.runtime.sources import CachedTaps, LiveTaps, Tokens
from pac.runtime.trainer import TrainConfig, Trainer, evaluate

log = logging.getLogger(__name__)

METHODS = ("parallel-adapters", "lora", "dora", "boundary")
SUMMARY = "summary.json"
# Defaults of --method parallel-adapters per task, chosen by the quality harness (benchmarks/quality.py,
# SmolLM2-135M on BBC News, 400 training / 400 validation articles, 3 seeds; tables in benchmarks/results/).
# The side network is small and starts at zero output, so it takes a larger step than LoRA (5e-4).
PARALLEL_ADAPTER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Classification: the plain side network (0.948 +- 0.001) already matches LoRA r=8 (0.950 +- 0.008), and no
    # lever beat it by more than its noise: dropout + weight decay 0.950 +- 0.004, read-out MLP 0.949 +- 0.012,
    # pruned init 0.943, 3x LR 0.945, last-token read-out 0.846, side-only read-out 0.941.
    "classify": {
        "lr": 3e-3,
        "reduction": 8,
        "side_init": "random",
        "readout_hidden": 0,
        "retrieval": False,
        "shortlist": 0,
    },
    # Language modelling: the plain side network plus a memory of the training tokens (retrieval, a kNN-LM over
    # the cache's last tap; pac.models.retrieval): perplexity 29.71 -> 27.02 +- 0.13, 65% of LoRA's
    # log-perplexity reduction where no trained lever passed 50%, at the plain epoch time plus ~1 minute once.
    # The best trained lever, a read-out MLP as wide as the model (29.07 +- 0.05, 49%), gains less with the
    # memory (27.38 +- 0.20, 62%): it fits the training text closer, so the weight fit on that text comes out
    # smaller. 3x LR 29.22 +- 0.08; width d/4 29.06 +- 0.06 at 1.4x the epoch and 36% of LoRA's memory.
    # Trained on shortlists of 256 words (pac.models.shortlist): 27.13 +- 0.14 with the memory (64%), at half the
    # epoch time (24-26 s against 51 s: 10.1-10.9x faster than LoRA's epoch, where the whole-vocabulary products
    # held it at 5x), once ~45 s per cache to build them; 1024 words matched the whole vocabulary (1 seed) at 34 s.
    # The whole run peaks at 23% of LoRA's memory (1.16 GB).
    "lm": {"lr": 1e-3, "reduction": 8, "side_init": "random", "readout_hidden": 0, "retrieval": True, "shortlist": 256},
}
LORA_LR = 5e-4


@dataclass
class DataOptions:
    data: str | None = None  # None: the bundled BBC News corpus
    task: str = "classify"
    max_length: int = 128
    val_size: float | None = None  # count or fraction; None: 200 for the bundled corpus, else 10%
    train_size: int | None = None  # None: 400 for the bundled corpus, else the rest
    seed: int = 0
    holdout: float = 0.0  # fraction of the training data kept out of training to pick the best epoch
    text_field: str = "text"
    label_field: str = "label"
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
    precision: str = "fp32"  # or "bf16": training steps' products in bfloat16 (pac.runtime.trainer.autocast)
    seed: int = 0
    checkpoint_every: int = 0
    resume: bool = True
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


def split_data(opts: DataOptions, records: list[Record]) -> tuple[list[Record], list[Record]]:
    bundled = opts.data is None
    val_size = opts.val_size if opts.val_size is not None else (200 if bundled else 0.1)
    train_size = opts.train_size if opts.train_size is not None else (400 if bundled else None)
    return split_records(
        records, val_size=val_size, train_size=train_size, seed=opts.seed, stratify=opts.task == "classify"
    )


def prepare_data(model: str | None, opts: DataOptions) -> PreparedData:
    """Resolve the model, read and split the data, tokenise both parts to fixed length."""
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    records = read_records(opts)
    check_labels(records, opts.task)
    train, val = split_data(opts, records)
    label_names = sorted({r.label for r in records if r.label is not None}) if opts.task == "classify" else None
    if opts.retain_mix:  # training only: validation stays the user's data
        train = train + retain_mix_records(model_dir, opts.retain_mix)
    holdout: list[Record] = []
    if opts.holdout:  # carved from the training part (stratified), so validation stays untouched
        _, holdout = split_records(train, val_size=opts.holdout, seed=opts.seed, stratify=opts.task == "classify")
    kw = {"task": opts.task, "max_length": opts.max_length, "label_names": label_names}
    return PreparedData(
        model_dir,
        tokenizer,
        tokenize_records(train, tokenizer, **kw),
        tokenize_records(val, tokenizer, **kw),
        label_names,
        [r.sample_id for r in holdout],
    )


def retain_mix_records(model_dir: Path, n: int) -> list[Record]:
    """`--retain-mix N`: the base model's own greedy answers to N general prompts bundled with pac, as
    prompt/completion rows rendered as training renders them, so the adapter also learns to keep answering
    off-task as the base model does."""
    from pac.generate import encode_prompt
    from pac.retain import base_answer_records

    base = load_base(model_dir)
    return base_answer_records(
        lambda ids, max_new_tokens: generate_answer(base, ids, max_new_tokens),
        lambda prompt: encode_prompt(base.tokenizer, prompt, chat=False)[0].tolist(),
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


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train, evaluate after every epoch, save the adapter; returns (and writes) a summary."""
    opts = with_defaults(opts)
    torch.manual_seed(opts.seed)
    prepared = prepare_data(opts.model, opts.data)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "method": opts.method,
        "task": opts.data.task,
        "options": asdict(opts),
        "train_samples": len(prepared.train) - len(prepared.holdout_ids),
        "holdout_samples": len(prepared.holdout_ids),
        "val_samples": len(prepared.val),
    }
    if opts.method == "parallel-adapters":
        summary.update(_train_parallel_adapters(opts, prepared, out))
    elif opts.method == "boundary":
        summary.update(_train_boundary(opts, prepared, out))
    else:
        summary.update(_train_lora(opts, prepared, out))
    kept = [e["best_epoch"] for e in summary["epochs"] if "best_epoch" in e]
    if kept:  # the saved adapter holds this epoch's weights
        summary["best_epoch"] = kept[-1]
    summary["peak_rss_mb"] = peak_rss_mb()
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
        task=opts.data.task,
        reduction=opts.reduction,
        tap_every=opts.tap_every,
        taps=sorted({0, config.num_hidden_layers, *opts.taps}) if opts.taps else None,
        gate_temperature=opts.gate_temperature,
        pooling=opts.pooling,
        readout=opts.readout,
        side_init=opts.side_init,
        tap_norm=opts.tap_norm,
        dropout=opts.dropout,
        train_final_norm=opts.train_final_norm,
        vocab_bias=opts.vocab_bias,
        side_heads=opts.side_heads,
        readout_hidden=opts.readout_hidden,
        side_network=opts.side_network,
        label_names=data.label_names,
        base_model_name_or_path=opts.model or BUNDLED_MODEL_ID,
        base_model_fingerprint=model_fingerprint(data.model_dir),
        max_length=opts.data.max_length,
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
    if opts.side_init == "pruned":  # channel statistics from a few cached samples
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


def _train_parallel_adapters(opts: TrainOptions, data: PreparedData, out: Path) -> dict[str, Any]:
    adapter_config = parallel_adapter_config(opts, data)
    num_layers = load_config(data.model_dir).num_hidden_layers
    built = _build_caches(opts, data, adapter_config.resolved_taps(num_layers))
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
            "val_loss": scored["loss"],
            "val_perplexity": scored["perplexity"],
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


def _build_caches(opts: TrainOptions, data: PreparedData, taps: list[int]) -> dict[str, CacheBuildResult]:
    """Phase 1: one backbone pass over train and validation data (the backbone is freed after each)."""
    cache_root = Path(opts.cache_dir) if opts.cache_dir else pac_home() / "cache"
    return {
        name: build_cache(data.model_dir, part, cache_root, taps, opts.cache_dtype, desc=f"cache build ({name})")
        for name, part in (("train", data.train), ("val", data.val))
    }


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
    """What every saved adapter records to be evaluated and served again next to its base model."""
    return {
        "task": opts.data.task,
        "label_names": data.label_names,
        "pooling": opts.pooling,
        "max_length": opts.data.max_length,
        "base_model_name_or_path": opts.model or BUNDLED_MODEL_ID,
        "base_model_fingerprint": model_fingerprint(data.model_dir),
    }


def _train_boundary(opts: TrainOptions, data: PreparedData, out: Path) -> dict[str, Any]:
    """Cache h_k only; phase 2 trains LoRA on layers k..L from it (pac.methods.boundary)."""
    num_layers = load_config(data.model_dir).num_hidden_layers
    k = opts.boundary_layer if opts.boundary_layer is not None else 2 * num_layers // 3
    if not 0 < k < num_layers:
        raise PacError(f"--boundary-layer must be between 1 and {num_layers - 1}, not {k}")
    upper = load_backbone(data.model_dir, k, num_layers, with_head=True)
    side = (opts.reduction or 8) if opts.boundary_side else None
    below = (opts.reduction or 8) if opts.boundary_side_below else None
    model = BoundaryModel(upper, opts.data.task, data.label_names, opts.pooling, opts.lora_r, side, below)
    built = _build_caches(opts, data, model.taps)
    train_source, val_source, holdout_source = _cached_sources(built, data)
    trainer = Trainer(
        model, opts.data.task, train_source, train_config(opts, LORA_LR), out, val=val_source, holdout=holdout_source
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


def _train_lora(opts: TrainOptions, data: PreparedData, out: Path) -> dict[str, Any]:
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
    )
    epochs = trainer.fit(resume=opts.resume)
    model.save(out)
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


def _base_model_dir(meta: dict[str, Any], model: str | None) -> Path:
    base = model or meta.get("base_model_name_or_path")
    model_dir = resolve_model(None if base in (None, BUNDLED_MODEL_ID) else base)
    expected = meta.get("base_model_fingerprint")
    if expected and model_fingerprint(model_dir) != expected:
        raise PacError(
            f"the adapter was trained on another model than {model_dir} (fingerprint mismatch); "
            "pass the base model it was trained on with --model"
        )
    return model_dir


def load_base(model: str | Path | None = None, adapter_dir: str | Path | None = None) -> LoadedAdapter:
    """The base model alone, served like an adapter (kind "base"; `pac generate --base`): `model`, else the
    model `adapter_dir` was trained on, else the bundled one."""
    if adapter_dir is not None:
        lora_meta = Path(adapter_dir) / "pac_lora.json"
        meta = json.loads(lora_meta.read_text()) if lora_meta.exists() else load_adapter(Path(adapter_dir))[0]
        model_dir = _base_model_dir(meta, None if model is None else str(model))
    else:
        model_dir = resolve_model(model)
    config = load_config(model_dir)
    if not family_for(config).causal:
        raise PacError(
            f"{model_dir} is an encoder ({family_for(config).name}) without an LM head: it has no next-token output "
            "to generate from or to compare with an adapter's"
        )
    context = getattr(config, "max_position_embeddings", 0)
    return LoadedAdapter(
        "base", "lm", model_dir, None, load_backbone(model_dir), load_tokenizer(model_dir), context, None
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
        return loaded.model.peft.generate(
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_p=top_p,
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
    )


class _BaseLM:
    """The untrained model as a method: next-token logits of the full backbone."""

    def __init__(self, backbone: Any):
        self.backbone, self.training = backbone, False

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(batch["input_ids"], batch["attention_mask"], taps=())
        return self.backbone.logits(self.backbone.final_norm(out.hidden))

    def eval(self) -> _BaseLM:
        return self

    def train(self, mode: bool = True) -> _BaseLM:
        return self


def evaluate_zero_shot(model: str | None, opts: DataOptions, split: str = "val") -> dict[str, Any]:
    """The untrained model on the same split: perplexity (lm), or accuracy by label likelihood
    (classify: each class name is scored after the text and a plain prompt, see methods.zero_shot)."""
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    records = read_records(opts)
    check_labels(records, opts.task)
    if split == "val":
        records = split_data(opts, records)[1]
    started = time.perf_counter()
    if opts.task == "lm":
        data = tokenize_records(records, tokenizer, task="lm", max_length=opts.max_length)
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
    return {**metrics, "samples": len(records), "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def evaluate_adapter(loaded: LoadedAdapter, opts: DataOptions, split: str = "val") -> dict[str, Any]:
    """Metrics of a saved adapter on the validation split (same seed) or on all of the data,
    computed from raw text through the live backbone (no cache)."""
    opts = DataOptions(**{**asdict(opts), "task": loaded.task, "max_length": loaded.max_length})
    records = read_records(opts)
    check_labels(records, opts.task)
    if split == "val":
        records = split_data(opts, records)[1]
    elif getattr(loaded.model, "memory", None) is not None:
        log.warning(
            "the adapter's memory holds its training text, which --split all scores too: that perplexity says "
            "little about new text (pass --no-retrieval, or use --split val)"
        )
    data = tokenize_records(
        records, loaded.tokenizer, task=opts.task, max_length=opts.max_length, label_names=loaded.label_names
    )
    source = Tokens(data) if loaded.kind == "lora" else LiveTaps(data, loaded.backbone, loaded.model.taps)
    started = time.perf_counter()
    metrics = evaluate(loaded.model, source, loaded.task)
    return {**metrics, "samples": len(data), "seconds": time.perf_counter() - started}


def evaluate_retain(loaded: LoadedAdapter, chat: bool = True) -> dict[str, Any]:
    """How much the adapter changed the model off its training data (`pac eval --retain`, pac.retain): the
    base model's greedy answers to the bundled general prompts, teacher-forced through the adapter."""
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
    return {**report, "seconds": time.perf_counter() - started}
