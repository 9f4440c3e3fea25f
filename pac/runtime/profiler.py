"""What this device costs a run: each backbone layer's forward time, the method's training step and evaluation,
and the model's sizes, measured here on synthetic batches of the run's shape (docs/architecture.md, "Planning").

The planner (pac.plan.planner) reads these as a pac.plan.costs.DeviceProfile and ModelCosts. Each layer is loaded
alone (a device never holds more than one layer of the model for this), timed over a micro-batch after a warm-up
pass (the median of `repeats`), and its FLOPs counted with torch's FlopCounterMode under no_grad (it counts
nothing under inference_mode) as a cross-check: the achieved FLOP/s of every layer should agree. Working memory
of a layer's forward is computed from the config (hidden states, attention scores and MLP activations in
float32), not measured: CPUs have no allocator high-water mark to read.

Profiles are cached in $PAC_PROFILES (default $PAC_HOME/profiles), keyed by the model's weights, the shapes, the
method's options and this device (processor, threads, CPU quota, torch); `refresh=True` measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from pac.cache import CacheReader
from pac.cache.fingerprint import model_fingerprint
from pac.cache.format import CacheSpec
from pac.cache.writer import CacheWriter
from pac.methods.registry import BuildContext, get_method
from pac.models.backbone import load_backbone, load_config
from pac.models.loading import pac_home
from pac.plan.costs import CACHE_MICRO_BATCH, DeviceProfile, ModelCosts
from pac.runconfig import TrainOptions
from pac.runtime.cgroup import cpu_share
from pac.runtime.prepare import train_config
from pac.runtime.sources import CachedTaps
from pac.runtime.step import method_step

# 2: load and build times; 4: times sustained under a CPU quota; 5: micro-batch factors; 6: the side blocks' share;
# 7: the step also timed on the method's training source (shortlists), and that source's one-off digest
PROFILE_VERSION = 7
# The training step's figures of a phase-1-only device, which never builds the method's model.
NO_STEP: dict[str, float] = dict.fromkeys(
    (
        "train_seconds",
        "eval_seconds",
        "build_seconds",
        "digest_seconds",
        "digested_train_seconds",
        "flops",
        "trainable_bytes",
        "frozen_bytes",
        "state_bytes",
        "sample_bytes",
    ),
    0,
) | {"blocks_share": 1.0}
CACHE_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "int8": 1}


class SyntheticBatches:
    """Random batches of a run's shape: token ids, or the cached taps a method reads, with labels."""

    def __init__(
        self, size: int, seq_len: int, vocab: int, task: str, classes: int, taps: list[int] | None, width: int
    ):
        self.sample_ids = [f"synthetic:{i}" for i in range(size)]
        self.seq_len, self.vocab, self.task, self.classes = seq_len, vocab, task, classes
        self.taps, self.width = taps, width
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        n, t, g = len(indices), self.seq_len, self.generator
        batch = {"attention_mask": torch.ones(n, t, dtype=torch.long)}
        if self.task == "classify":
            batch["labels"] = torch.randint(0, self.classes, (n,), generator=g)
        else:
            batch["labels"] = torch.randint(0, self.vocab, (n, t), generator=g)
        if self.taps is None:
            batch["input_ids"] = torch.randint(0, self.vocab, (n, t), generator=g)
        else:
            batch["taps"] = torch.randn(n, len(self.taps), t, self.width, generator=g)
        return batch


def profile_device(
    model_dir: Path,
    opts: TrainOptions,
    name: str,
    memory: int,
    *,
    repeats: int = 3,
    refresh: bool = False,
    phase1_only: bool = False,
) -> dict[str, Any]:
    """This device's profile for the run `opts` (its model, --max-length, --batch-size, method and options):
    {"device": DeviceProfile fields, "model": ModelCosts fields, "layers": per-layer detail, "measured": ...}.
    `name` and `memory` are what the planner calls this device and what it may use. A `phase1_only` device
    measures its layers alone: it never builds the method's model, whose figures read 0 (the coordinator takes
    the model's sizes from a training peer)."""
    key = _profile_key(model_dir, opts, phase1_only)
    cached = profiles_dir() / f"{key}.json"
    if cached.exists() and not refresh:
        profile = json.loads(cached.read_text())
        profile["device"].update(name=name, memory=memory)
        return profile
    runtime_bytes = psutil.Process().memory_info().rss
    config = load_config(model_dir)
    seq_len, micro = opts.data.max_length, opts.optim.batch_size
    layers = [
        _profile_layer(model_dir, i, seq_len, micro, config.vocab_size, repeats)
        for i in range(config.num_hidden_layers)
    ]
    side = NO_STEP if phase1_only else _profile_step(model_dir, opts, config, repeats)
    factors = _micro_batch_factors(model_dir, config, seq_len, micro, layers, repeats)
    d, bytes_per_value = config.hidden_size, CACHE_DTYPE_BYTES[opts.cache.dtype]
    device = DeviceProfile(
        name,
        memory,
        tuple(layer["seconds"] / micro for layer in layers),
        side["train_seconds"] / micro,
        side["eval_seconds"] / micro,
        layer_load_seconds=tuple(layer["load_seconds"] for layer in layers),
        build_seconds=side["build_seconds"],
        digest_seconds=side["digest_seconds"],
        digested_train_seconds=side["digested_train_seconds"] / micro,
        micro_batch_factors=factors,
        phase1_only=phase1_only,
    )
    costs = ModelCosts(
        layer_weight_bytes=tuple(layer["weight_bytes"] for layer in layers),
        head_bytes=side["frozen_bytes"],
        layer_activation_bytes=_layer_activation_bytes(config, seq_len),
        hidden_bytes=seq_len * d * 4,
        tap_bytes=seq_len * d * bytes_per_value,
        side_state_bytes=side["state_bytes"],
        side_param_bytes=side["trainable_bytes"],
        side_sample_bytes=side["sample_bytes"],
        runtime_bytes=runtime_bytes,
        side_blocks_share=side["blocks_share"],
    )
    profile = {
        "version": PROFILE_VERSION,
        "device": {k: v for k, v in asdict(device).items() if k not in ("bandwidth", "rtt")},
        "model": asdict(costs),
        "layers": layers,
        "measured": {
            "seq_len": seq_len,
            "micro_batch": micro,
            "method": opts.method,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "cpu_share": cpu_share(),
            "side_flops_per_sample": side["flops"] / micro,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # peers of one machine may measure the same key at once
    tmp.write_text(json.dumps(profile, indent=1))
    os.replace(tmp, cached)
    return profile


def profiles_dir() -> Path:
    return Path(os.environ["PAC_PROFILES"]) if os.environ.get("PAC_PROFILES") else pac_home() / "profiles"


def describe_profiles() -> str:
    """The profiles this device keeps, one block each: the run's shape, every layer's time, the method's step."""
    folder = profiles_dir()
    found = sorted(folder.glob("*.json")) if folder.exists() else []
    if not found:
        return f"no profiles in {folder}: a coordinator planning a run (`pac plan`, `pac-launch`) asks for one"
    blocks = []
    for path in found:
        p = json.loads(path.read_text())
        m, d, layers = p["measured"], p["device"], p["layers"]
        per_layer = " ".join(f"{layer['seconds'] / m['micro_batch'] * 1e3:.2f}" for layer in layers)
        rates = [layer["flops_per_second"] / 1e9 for layer in layers if layer["flops_per_second"]]
        sizes = "".join(f", x{f:.2f} in micro-batches of {size}" for size, f in d.get("micro_batch_factors", ()))
        blocks.append(
            f"{path.stem}: {m['method']}, {m['seq_len']} tokens, batch {m['micro_batch']}, {m['threads']} threads, "
            f"{m['processor']}, measured {m['at']}\n"
            f"  ms per sample through each layer: {per_layer}\n"
            f"  whole model {sum(d['layer_seconds']) * 1e3:.1f} ms per sample{sizes}, "
            f"{min(rates, default=0):.1f}-{max(rates, default=0):.1f} GFLOP/s per layer\n"
            f"  training step {d['side_train_seconds'] * 1e3:.1f} ms"
            + (
                f" ({d['digested_train_seconds'] * 1e3:.1f} ms on its digest)"
                if d.get("digested_train_seconds")
                else ""
            )
            + f" and evaluation {d['side_eval_seconds'] * 1e3:.1f} ms per sample"
        )
    return "\n".join(blocks)


def device_profile_of(profile: dict[str, Any], bandwidth: float, rtt: float) -> DeviceProfile:
    """The planner's view of a profile, with the link the coordinator measured to this device."""
    device = dict(profile["device"])
    device["layer_seconds"] = tuple(device["layer_seconds"])
    device["layer_load_seconds"] = tuple(device["layer_load_seconds"])
    device["micro_batch_factors"] = tuple((int(m), float(f)) for m, f in device.get("micro_batch_factors", ()))
    return DeviceProfile(**device, bandwidth=bandwidth, rtt=rtt)


def model_costs_of(profile: dict[str, Any]) -> ModelCosts:
    model = dict(profile["model"])
    model["layer_weight_bytes"] = tuple(model["layer_weight_bytes"])
    return ModelCosts(**model)


def _profile_key(model_dir: Path, opts: TrainOptions, phase1_only: bool = False) -> str:
    method = get_method(opts.method)
    parts = {
        "version": PROFILE_VERSION,
        "model": model_fingerprint(model_dir),
        "task": opts.data.task,
        "seq_len": opts.data.max_length,
        "batch": opts.optim.batch_size,
        "precision": opts.optim.precision,
        "cache_dtype": opts.cache.dtype,
        "method": opts.method,
        "options": method.flat_options(opts.options),
        "device": [platform.node(), platform.processor() or platform.machine(), torch.get_num_threads(), cpu_share()],
        "torch": torch.__version__,
        "phase1_only": phase1_only,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of `fn`, as sustained on this device: under a CPU quota (cgroup), a call shorter than the
    quota's period runs at the full speed of the cores and is throttled only later, so its wall time flatters
    the device; the process's CPU time divided by its quota is what a long phase sustains."""
    share = cpu_share()
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, used = time.perf_counter() - start, time.process_time() - cpu
        times.append(max(wall, used / share) if share else wall)
    return statistics.median(times)


def _profile_layer(model_dir: Path, index: int, seq_len: int, micro: int, vocab: int, repeats: int) -> dict[str, Any]:
    """One backbone layer (with the embeddings for layer 0), alone in memory."""
    started = time.perf_counter()
    stage = load_backbone(model_dir, index, index + 1, with_head=False)
    load_seconds = time.perf_counter() - started
    g = torch.Generator().manual_seed(index)
    if index == 0:
        inputs = torch.randint(0, vocab, (micro, seq_len), generator=g)
    else:
        inputs = torch.randn(micro, seq_len, stage.config.hidden_size, generator=g)
    mask = torch.ones(micro, seq_len, dtype=torch.long)
    with torch.inference_mode():
        seconds = _timed(lambda: stage(inputs, mask), repeats)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        stage(inputs, mask)
    weight_bytes = sum(p.numel() * p.element_size() for p in stage.parameters())
    flops = counter.get_total_flops()
    return {
        "layer": index,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "weight_bytes": weight_bytes,
        "flops": flops,
        "flops_per_second": flops / seconds if seconds > 0 else 0.0,
    }


def _micro_batch_factors(
    model_dir: Path, config: Any, seq_len: int, micro: int, layers: list[dict[str, Any]], repeats: int
) -> tuple[tuple[int, float], ...]:
    """Phase 1's time per sample at CACHE_MICRO_BATCH against the run's micro-batch (`layers`, as timed at it),
    on a middle layer (the layers are alike): what the planner weighs against a pipeline's longer fill."""
    if micro == CACHE_MICRO_BATCH:
        return ()
    middle = config.num_hidden_layers // 2
    larger = _profile_layer(model_dir, middle, seq_len, CACHE_MICRO_BATCH, config.vocab_size, repeats)
    return ((CACHE_MICRO_BATCH, (larger["seconds"] / CACHE_MICRO_BATCH) / (layers[middle]["seconds"] / micro)),)


def _synthetic_cache(root: Path, batches: SyntheticBatches, dtype: str) -> CachedTaps:
    """`batches` written as a real activation cache, so that what a run does with its cache (the method's
    training source: shortlists for language modelling) is timed as it runs."""
    spec = CacheSpec("synthetic", "synthetic", "synthetic", batches.seq_len, tuple(batches.taps), batches.width, dtype)
    writer = CacheWriter(root, spec, batches.sample_ids)
    every = batches.batch(list(range(len(batches))))
    writer.write(batches.sample_ids, every["taps"], every["attention_mask"], every["labels"])
    return CachedTaps(CacheReader(writer.finalize()))


def _profile_step(model_dir: Path, opts: TrainOptions, config: Any, repeats: int) -> dict[str, Any]:
    """The method's training step and evaluation on batches of synthetic data of the run's shape, read from a
    synthetic cache through the method's training source, as phase 2 reads them."""
    with tempfile.TemporaryDirectory(prefix="pac-profile-") as scratch:
        return _profile_step_in(model_dir, opts, config, repeats, Path(scratch))


def _profile_step_in(model_dir: Path, opts: TrainOptions, config: Any, repeats: int, scratch: Path) -> dict[str, Any]:
    method = get_method(opts.method)
    options, task, micro = method.resolved(opts.method_options, opts.data.task), opts.data.task, opts.optim.batch_size
    classes = 2
    taps = method.taps(options, task, config.num_hidden_layers) if method.cached else None
    synthetic = SyntheticBatches(
        micro * 2, opts.data.max_length, config.vocab_size, task, classes, taps, config.hidden_size
    )
    source: Any = _synthetic_cache(scratch, synthetic, opts.cache.dtype) if method.cached else synthetic
    labels = [f"class{i}" for i in range(classes)] if task == "classify" else None
    ctx = BuildContext(model_dir, task, labels, opts.optim.seed, opts.data.max_length, source)
    started = time.perf_counter()
    model = method.build(options, ctx)
    build_seconds = time.perf_counter() - started
    indices = list(range(micro))
    batch = source.batch(indices)  # what evaluation, and a side pipeline's step, read: the cache as it is
    config_loop = train_config(opts)

    def step_seconds(source: Any) -> float:
        step = method_step(method, options, model, task, source, config_loop)
        return _timed(lambda: step(indices, 0), repeats)

    train_seconds = step_seconds(source)
    blocks_share = _side_blocks_share(model, batch)
    digest_seconds = digested_seconds = 0.0
    if method.training_source is not None:  # what data-parallel phase 2 trains on (shortlists: a cheaper step)
        started = time.perf_counter()
        digested = method.training_source(options, model, source)[0]
        digest_seconds = (time.perf_counter() - started) / len(source)
        if digested is not source:
            digested_seconds = step_seconds(digested)
    model.eval()
    with torch.no_grad():
        eval_seconds = _timed(lambda: model.metrics_batch(batch), repeats)
        with FlopCounterMode(display=False) as counter:
            model.forward_batch(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    width = getattr(getattr(model, "side", None), "config", None)
    state_width = width.hidden_size if width is not None else config.hidden_size
    sample = source.batch([0])
    return {
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "blocks_share": blocks_share,
        "build_seconds": build_seconds,
        "digest_seconds": digest_seconds,
        "digested_train_seconds": digested_seconds,
        "flops": counter.get_total_flops(),
        "trainable_bytes": sum(p.numel() * 4 for p in trainable),
        "frozen_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "state_bytes": opts.data.max_length * state_width * 4,
        # What one sample brings into a step: its inputs in float32, and activations about as large again.
        "sample_bytes": 2 * sum(t.numel() * 4 for t in sample.values()),
    }


def _side_blocks_share(model: Any, batch: dict[str, Any]) -> float:
    """The share of a training step's FLOPs (forward and backward) in the side network's blocks, which a side
    pipeline spreads over its stages; 1.0 for a method without them."""
    blocks = getattr(getattr(model, "side", None), "blocks", None)
    if not blocks:
        return 1.0
    with FlopCounterMode(display=False) as counter:
        model.loss_batch(batch).backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()  # by module class name: the side blocks are the only decoder layers run
    total = sum(counts["Global"].values())
    in_blocks = sum(sum(counts.get(name, {}).values()) for name in {type(b).__name__ for b in blocks})
    return in_blocks / total if total else 1.0


def _layer_activation_bytes(config: Any, seq_len: int) -> int:
    """One sample's float32 working memory in one decoder layer's forward: the hidden state in and out, the
    query/key/value projections, the attention scores, and the MLP's two intermediate activations."""
    d, heads = config.hidden_size, config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", 4 * d)
    return 4 * (5 * seq_len * d + heads * seq_len * seq_len + 2 * seq_len * intermediate)
