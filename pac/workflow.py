"""The API of `pac train`, `pac eval` and `pac generate`, as functions the benchmarks call too: thin, because
each method says what it does through the registry (pac.methods.registry; docs/architecture.md).

train:  data (read, checked, split, tokenised) -> phase 1 for a method that trains from the activation cache
        (build or reuse it; the backbone is freed) -> the training loop on the method's model and step
        -> the method saves the adapter directory
load:   the adapter directory names its method; the method loads its model beside the base model
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pac.cache import cache_bytes_per_sample
from pac.cache.fingerprint import model_fingerprint
from pac.data.images import ImageSet, is_digits, read_image_data, read_images
from pac.data.records import Record
from pac.data.sources import data_digest
from pac.data.split import check_labels
from pac.data.tasks import IMAGE_TASK
from pac.data.tokenize import prompt_format, tokenize_records
from pac.errors import PacError
from pac.methods.base import MethodModel
from pac.methods.registry import BuildContext, Loaded, Method, adapter_config, get_method, methods
from pac.model_card import write_model_card
from pac.models.backbone import Backbone, load_backbone, load_config
from pac.models.families import family_for
from pac.models.loading import cache_root, resolve_model
from pac.runconfig import CacheOptions, DataOptions, OptimOptions, TrainOptions, summary_options, with_defaults
from pac.runtime.cache_build import CacheBuildResult, build_cache
from pac.runtime.device import cpu_only, move, on_device, resolve_device
from pac.runtime.heap import one_off_step, peak_rss_mb
from pac.runtime.prepare import (
    SUMMARY,
    PreparedData,
    adapter_meta_of,
    load_tokenizer,
    prepare_data,
    read_records,
    retain_mix_records,
    run_identity,
    split_data,
    train_config,
)
from pac.runtime.progress import RunClock, Watch
from pac.runtime.run_dir import claim
from pac.runtime.sources import CachedTaps, LiveTaps, Tokens, batches_of
from pac.runtime.step import method_step
from pac.runtime.storage import disk_full_message, is_disk_full
from pac.runtime.trainer import Trainer, evaluate

log = logging.getLogger(__name__)

# The run's configuration and data preparation, re-exported: the API's callers build runs from them.
__all__ = [
    "CacheOptions",
    "DataOptions",
    "OptimOptions",
    "TrainOptions",
    "load_tokenizer",
    "prepare_data",
    "read_records",
    "retain_mix_records",
    "split_data",
    "with_defaults",
]


def train(opts: TrainOptions, report: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train, evaluate after every epoch, save the adapter; returns (and writes) a summary.
    `report` receives the lines a user follows (the split, a resumed run, each epoch as it ends)."""
    opts = with_defaults(opts)
    method = get_method(opts.method)
    device = _training_device(method, opts)
    torch.manual_seed(opts.optim.seed)
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
        "options": summary_options(opts),
        "data_sha256": prepared.data_sha256,
        "train_samples": len(prepared.train) - len(prepared.holdout_ids),
        "holdout_samples": len(prepared.holdout_ids),
        "val_samples": len(prepared.val),
        "prompt_format": prepared.prompt_format,
    }
    cached = len(prepared.train) + len(prepared.val) if method.cached else 0
    watch = Watch(report, RunClock(cache_samples=cached))
    try:
        summary.update(_train_method(method, opts, prepared, out, watch, device))
    except Exception as exc:
        if is_disk_full(exc):
            raise PacError(disk_full_message(exc, opts, prepared, Path(opts.out))) from exc
        raise
    kept = [e["best_epoch"] for e in summary["epochs"] if "best_epoch" in e]
    if kept:  # the saved adapter holds this epoch's weights
        summary["best_epoch"] = kept[-1]
    summary["peak_rss_mb"] = peak_rss_mb()
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, summary)
    return summary


def _training_device(method: Method, opts: TrainOptions) -> torch.device:
    """Where the run computes (`--device`), refused before any work for a method or task not made to run there."""
    device = resolve_device(opts.device)
    if device.type != "cpu" and (why := cpu_only(method, opts.data.task)):
        able = ", ".join(m.name for m in methods().values() if m.accelerates)
        raise PacError(f"{why}: drop --device {opts.device}, or train {able} there")
    return device


def _train_method(
    method: Method, opts: TrainOptions, data: PreparedData, out: Path, watch: Watch, device: torch.device
) -> dict[str, Any]:
    """Phase 1 where the method trains from cached taps, then the loop on its model and step, then its save.
    On a device other than the CPU the model goes there for the loop only: it is built, and its data-dependent
    parts (shortlists, a memory) are made, on the CPU, where the sources read, and it comes back to be saved."""
    options, task = opts.method_options, opts.data.task
    ctx = BuildContext(data.model_dir, task, data.label_names, opts.optim.seed, opts.data.max_length)
    ctx.network = data.network
    extras: dict[str, Any] = {}
    if method.cached:
        num_layers = load_config(data.model_dir).num_hidden_layers
        built = _build_caches(opts, data, method.taps(options, task, num_layers), watch, device)
        train_source, val_source, holdout_source = _cached_sources(built, data)
        extras.update(_cache_summary(built))
    else:
        train_source = batches_of(data.train.subset(data.train_rows(holdout=False)))
        val_source = batches_of(data.val)
        holdout_source = batches_of(data.train.subset(data.train_rows(holdout=True))) if data.holdout_ids else None
    ctx.train_source = train_source
    model = method.build(options, ctx)
    training_source = train_source
    if method.training_source is not None:
        training_source, built_extras = method.training_source(options, model, train_source)
        extras.update(built_extras)
    config = train_config(opts)
    move(model, device)
    training_source = on_device(training_source, device)
    trainer = Trainer(
        model,
        task,
        training_source,
        config,
        out,
        val=on_device(val_source, device),
        holdout=on_device(holdout_source, device),
        train_step=method_step(method, options, model, task, training_source, config),
        **watch.trainer_hooks(opts.optim.epochs),
    )
    epochs = trainer.fit(resume=opts.resume)
    move(model, "cpu")
    # Recorded apart from the process's peak, which would also count a one-off fit after training.
    extras["training_peak_rss_mb"] = peak_rss_mb()
    if method.after_training is not None:
        with one_off_step():  # else a fit's blocks grow the heap past training's peak (pac.runtime.heap)
            extras.update(method.after_training(options, model, ctx, out, lambda m: evaluate(m, val_source, task)))
    saved = method.save(options, model, out, adapter_meta_of(opts, data))
    return {"epochs": epochs, **saved, **extras}


def _build_caches(
    opts: TrainOptions, data: PreparedData, taps: list[int], watch: Watch, device: torch.device
) -> dict[str, CacheBuildResult]:
    """Phase 1: one backbone pass over train and validation data on `device` (the backbone is freed after each)."""
    root = cache_root(opts.cache.dir)
    built = {}
    for name, part in (("train", data.train), ("val", data.val)):
        built[name] = build_cache(
            data.model_dir,
            part,
            root,
            taps,
            opts.cache.dtype,
            desc=f"cache build ({name})",
            clock=watch.clock,
            device=device,
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


# ----------------------------------------------------------------------------- inference
@dataclass
class LoadedAdapter:
    kind: str  # the method's name, or "base" (the base model alone, load_base)
    task: str
    model_dir: Path
    model: Any  # the method's model; None for the base model
    backbone: Any  # what feeds the model taps (None where it reads token ids itself, as LoRA does)
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

    @property
    def method(self) -> Method | None:
        """The method that trained the adapter (None for the base model)."""
        return None if self.kind == "base" else get_method(self.kind)


def adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter's recorded settings (task, prompt format, data fields...), read without loading any model."""
    return adapter_config(adapter_dir)[1]


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
    method = loaded.method
    if method is not None and not method.generates:
        raise PacError(f"generation with {method.name} adapters is not supported; train with parallel-adapters or lora")
    if method is not None and method.generate is not None:
        return method.generate(loaded, input_ids, max_new_tokens, temperature, top_p, seed)
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
    method, config = adapter_config(adapter_dir)
    images = config["task"] == IMAGE_TASK  # its CNN is named in the adapter's config (pac.methods.vision_model)
    model_dir = None if images else _base_model_dir(config, model)
    loaded = method.load(Path(adapter_dir), config, model_dir, retrieval)
    return LoadedAdapter(
        method.name,
        loaded.task,
        model_dir,
        loaded.model,
        loaded.backbone,
        None if images else load_tokenizer(model_dir),
        loaded.max_length,
        loaded.label_names,
        **_recorded(config),
    )


def export_merged(adapter_dir: str | Path, out: str | Path, model: str | None = None) -> dict[str, Any]:
    """The adapter merged into its base model, written where transformers loads it (`from_pretrained(out)`):
    safetensors weights, config and tokenizer; a classification adapter's head goes beside them
    (classification_head.safetensors, with its label names in pac_head.json)."""
    from safetensors.torch import save_file

    method, config = adapter_config(adapter_dir)
    if config.get("task") == IMAGE_TASK:
        raise PacError(
            "pac export writes a language model merged with its adapter for transformers; an image adapter's network "
            "is a torch module: `load_for_inference(ADAPTER).model.network` (full and galore save the whole "
            "network's state dict under torchvision's names in adapter_model.safetensors)"
        )
    if method.merged is None:
        mergeable = ", ".join(m.name for m in methods().values() if m.merged is not None)
        raise PacError(
            f"{method.name} adapters are not merged into the model's weights (they run beside it): `pac export` "
            f"takes adapters of {mergeable}"
        )
    out = Path(out)
    loaded = load_for_inference(adapter_dir, model, retrieval=False)
    network = method.merged(Loaded(loaded.model, None, loaded.task, loaded.max_length, loaded.label_names))
    network.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    written = {"out": str(out), "method": method.name, "task": loaded.task}
    head = getattr(loaded.model, "head", None)
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "classification_head.safetensors")
        (out / "pac_head.json").write_text(json.dumps({"label_names": loaded.label_names}, indent=2) + "\n")
        written["head"] = "classification_head.safetensors"
    return written


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
    """`pac eval` scores a file or folder it is given whole, and the bundled data's validation split."""
    bundled = opts.data is None or opts.task == IMAGE_TASK and is_digits(opts.data)
    return split or ("val" if bundled else "all")


def evaluation_records(opts: DataOptions, split: str) -> list[Record] | ImageSet:
    """The rows `pac eval` scores: every row of --data (split "all"), or its validation split ("val"),
    made as `pac train` made it with the same --split-seed and --val-size (images: an ImageSet)."""
    if opts.task == IMAGE_TASK:
        if split == "all":
            return read_images(opts.data)
        return read_image_data(opts.data, opts.seed, opts.val_size, opts.train_size)["val"]
    records = read_records(opts)
    check_labels(records, opts.task)
    return split_data(opts, records)[1] if split == "val" else records


def evaluate_adapter(
    loaded: LoadedAdapter, opts: DataOptions, split: str | None = None, records: list[Record] | ImageSet | None = None
) -> dict[str, Any]:
    """Metrics of a saved adapter on every row of the data, or on its validation split (the bundled corpus's
    default), computed from raw text through the live backbone (no cache). `records`: the rows, if already
    read (`pac eval` reads them before loading the model)."""
    opts = DataOptions(**{**asdict(opts), "task": loaded.task, "max_length": loaded.max_length})
    split = default_split(opts, split)
    records = records if records is not None else evaluation_records(opts, split)
    if isinstance(records, ImageSet):
        if records.label_names != loaded.label_names:
            raise PacError(
                f"the adapter tells apart {', '.join(loaded.label_names)}, and these images are labelled "
                f"{', '.join(records.label_names)}: score it on the classes it was trained on"
            )
        started = time.perf_counter()
        metrics = evaluate(loaded.model, records, loaded.task)
        return {**metrics, "samples": len(records), "split": split, "seconds": time.perf_counter() - started}
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
    source = LiveTaps(data, loaded.backbone, loaded.model.taps) if loaded.method.cached else Tokens(data)
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
