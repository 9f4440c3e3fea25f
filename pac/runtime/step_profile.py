"""What one training step of a method costs on a model, before any training (`pac profile`): FLOPs split into
forward, backward and the optimizer step; peak memory by category; trainable against total parameters per layer type.

Each method is profiled in a fresh process (a process's peak resident memory only grows, so methods compared in one
process would each report the largest so far): the process imports what `pac train` imports, notes its resident
memory (the runtime floor: Python, torch, the libraries), builds the method's model as a run would, and takes real
training steps on a synthetic batch of the run's shape (random images, token ids, or cached taps):

  memory   two plain steps, after which the process's peak resident memory is the predicted peak of a training
           process (tests/test_step_profile.py holds it to within 15% of a real one's); then two steps under
           torch's MemTracker (pac.runtime.memtrack; its bookkeeping grows the heap, so it comes second): bytes at
           the peak by category (parameters, buffers, gradients, optimizer state, activations, temporaries);
           "untracked" is what the peak holds beyond the floor and those (libraries loaded with the model, the
           allocator's free blocks, oneDNN's buffers)
  flops    a third step under torch's FlopCounterMode (shape formulas of matrix products and convolutions, under
           no_grad, never inference_mode, where it counts nothing): the loss's forward, its backward, and the
           optimizer's step (GaLore's projections are matrix products), plus ADAM_FLOPS_PER_ELEMENT for each
           element of Adam's moments (elementwise work FlopCounterMode does not count); a method without backward
           (zeroth-order) counts its whole step as forward
  params   per layer type: depthwise, pointwise and standard convolutions, linear maps, embeddings, norms; the
           trainable share includes the adapters a method attaches to a layer (LoRA's pairs)

The profiler of pac.runtime.profiler is the planner's (times per layer on this device); this one is a user's.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pac.data.tasks import IMAGE_TASK
from pac.runconfig import TrainOptions
from pac.runtime.heap import peak_rss_mb

# Adam's elementwise work per element of its moments: the two moving averages (5), the denominator (2), the
# normalised step (1), the update and the decoupled weight decay (4).
ADAM_FLOPS_PER_ELEMENT = 12
MB = 2**20
IMAGE_CLASSES = 10
TEXT_CLASSES = 5
LAYER_TYPES = ("depthwise", "pointwise", "standard conv", "linear", "embedding", "norm")


class SyntheticImages:
    """Random images of the run's shape and labels: an image task's batch source for profiling."""

    def __init__(self, size: int, classes: int, side: int = 32):
        self.sample_ids = [f"synthetic:{i}" for i in range(size)]
        self.classes, self.side = classes, side
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        n, g = len(indices), self.generator
        images = torch.randn(n, 3, self.side, self.side, generator=g)
        return {"images": images, "labels": torch.randint(0, self.classes, (n,), generator=g)}


def layer_type(module: nn.Module) -> str | None:
    """The kind of a layer whose parameters the profile counts, or None (containers, activations...)."""
    if isinstance(module, nn.Conv2d):
        if module.groups > 1:
            return "depthwise"
        return "pointwise" if module.kernel_size == (1, 1) else "standard conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "Norm" in type(module).__name__:
        return "norm"
    return None


def parameters_by_layer_type(model: nn.Module) -> dict[str, dict[str, int]]:
    """{type: {"layers", "total", "trainable"}}: a layer's own weights (frozen or not) as its total; as trainable,
    its trainable weights and those of the adapters attached to it (peft keeps the layer as `.base_layer` beside
    its `lora_A`/`lora_B`/magnitude, which count for it, not as layers of their own)."""
    counts = {kind: {"layers": 0, "total": 0, "trainable": 0} for kind in LAYER_TYPES}
    named = dict(model.named_parameters())
    seen: set[int] = set()  # a tied weight (an LM head sharing the embeddings) counts once
    for name, module in model.named_modules():
        kind = layer_type(module)
        if kind is None or ".lora_" in f".{name}" or "lora_magnitude" in name:
            continue
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        owner = name.removesuffix(".base_layer")
        attached = [p for n, p in named.items() if n.startswith(f"{owner}.lora_") and p.requires_grad]
        counts[kind]["layers"] += 1
        counts[kind]["total"] += sum(p.numel() for p in own)
        counts[kind]["trainable"] += sum(p.numel() for p in own if p.requires_grad) + sum(p.numel() for p in attached)
    return {kind: c for kind, c in counts.items() if c["layers"]}


def profile_methods(runs: list[TrainOptions]) -> list[dict[str, Any]]:
    """One profile per run (its model, task, method with options, batch size and length), each in its own process
    (spawned: a clean heap and a peak of its own) with this process's torch threads."""
    return [in_fresh_process(profile_in_this_process, opts) for opts in runs]


def in_fresh_process(function: Any, *args: Any) -> Any:
    """`function(*args)` in a spawned process with this process's torch threads: its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:  # fmt: skip
        return pool.submit(function, *args).result()


def measured_training_steps(opts: TrainOptions, steps: int = 4) -> dict[str, float]:
    """What `profile_in_this_process` predicts, measured: `steps` real training steps of the run `opts` on its
    real data (read and split as `pac train` does), in this process; its peak resident memory and the floor."""
    import psutil

    import pac.workflow  # noqa: F401  (as in the profile: what `pac train` has loaded)
    from pac.methods.registry import BuildContext, get_method
    from pac.runconfig import with_defaults
    from pac.runtime.prepare import prepare_data, train_config
    from pac.runtime.sources import batches_of
    from pac.runtime.step import method_step
    from pac.runtime.trainer import epoch_order

    floor = psutil.Process().memory_info().rss
    opts = with_defaults(opts)
    method, task = get_method(opts.method), opts.data.task
    if method.cached:
        raise ValueError(f"{method.name} trains from the activation cache: measure it with a `pac train` run")
    data = prepare_data(opts.model, opts.data)
    source = batches_of(data.train)
    ctx = BuildContext(data.model_dir, task, data.label_names, opts.optim.seed, opts.data.max_length, source)
    ctx.network = data.network
    model = method.build(opts.method_options, ctx)
    config = train_config(opts)
    step = method_step(method, opts.method_options, model, task, source, config)
    order, size = epoch_order(len(source), opts.optim.seed, 0), opts.optim.batch_size
    for index in range(steps):
        step(order[index * size : (index + 1) * size], index)
    return {"peak_rss_mb": peak_rss_mb(), "runtime_floor_mb": floor / MB}


def profile_in_this_process(opts: TrainOptions) -> dict[str, Any]:
    """The profile of `opts`'s training step, measured in this process (whose peak memory it reads: call it in a
    fresh one, as `profile_methods` does)."""
    import psutil

    import pac.workflow  # noqa: F401  (what `pac train` has loaded before it builds a model: part of the floor)
    from pac.methods.registry import get_method
    from pac.runtime.memtrack import peak_by_category
    from pac.runtime.prepare import train_config
    from pac.runtime.step import method_step

    floor = psutil.Process().memory_info().rss
    method = get_method(opts.method)
    options = method.resolved(opts.method_options, opts.data.task)
    with tempfile.TemporaryDirectory(prefix="pac-profile-") as scratch:
        source, ctx, model_label = _synthetic_run(opts, method, options, Path(scratch))
        model = method.build(options, ctx)
        config = train_config(opts)
        step = method_step(method, options, model, opts.data.task, source, config)
        indices = list(range(opts.optim.batch_size))
        for index in range(2):  # plain steps first: MemTracker's own bookkeeping grows the heap it measures
            step(indices, index)
        peak = peak_rss_mb() * MB
        memory = peak_by_category(model, getattr(step, "optimizer", None), lambda: step(indices, 0))
        flops = _step_flops(step, source.batch(indices), indices)
    memory["runtime_floor"] = floor
    memory["untracked"] = max(0, peak - floor - memory["total"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": opts.method,
        "model": model_label,
        "task": opts.data.task,
        "batch_size": opts.optim.batch_size,
        "max_length": None if opts.data.task == IMAGE_TASK else opts.data.max_length,
        "flops": flops,
        "memory_mb": {k: v / MB for k, v in memory.items() if k != "total"},
        "tracked_peak_mb": memory["total"] / MB,
        "predicted_peak_rss_mb": peak / MB,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "layer_types": parameters_by_layer_type(model),
    }


def _synthetic_run(opts: TrainOptions, method: Any, options: Any, scratch: Path) -> tuple[Any, Any, str]:
    """(batch source, BuildContext, the model's name) for a profile: random data of the run's shape."""
    from pac.methods.registry import BuildContext

    task, size = opts.data.task, 2 * opts.optim.batch_size
    if task == IMAGE_TASK:
        from pac.models.vision import NetworkSpec, build_network, parse_network

        spec = parse_network(opts.model)
        labels = [str(i) for i in range(IMAGE_CLASSES)]
        if spec.checkpoint is None:  # the adapting methods want a trained start: fresh weights cost the same
            fresh = scratch / f"{spec.name}.pth"
            torch.save(build_network(spec.name, IMAGE_CLASSES).state_dict(), fresh)
            spec = NetworkSpec(spec.name, fresh)
        ctx = BuildContext(None, task, labels, opts.optim.seed, 0, network=spec)
        return SyntheticImages(size, IMAGE_CLASSES), ctx, parse_network(opts.model).label
    from pac.models.backbone import load_config
    from pac.models.loading import model_name, resolve_model
    from pac.runtime.profiler import SyntheticBatches

    model_dir = resolve_model(opts.model)
    config = load_config(model_dir)
    taps = method.taps(options, task, config.num_hidden_layers) if method.cached else None
    source = SyntheticBatches(
        size, opts.data.max_length, config.vocab_size, task, TEXT_CLASSES, taps, config.hidden_size
    )
    labels = [f"class{i}" for i in range(TEXT_CLASSES)] if task == "classify" else None
    ctx = BuildContext(model_dir, task, labels, opts.optim.seed, opts.data.max_length, source)
    return source, ctx, model_name(opts.model)


def grouped_conv_backward_flop(
    grad_out_shape: Any, x_shape: Any, w_shape: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int, output_mask: list[bool], out_shape: Any, **kwargs: Any,
) -> int:  # fmt: skip
    """torch's count of a convolution's backward, with the weight gradient of a grouped convolution divided by its
    groups: torch 2.13 counts it as an ungrouped one's, `groups` times too many (a depthwise layer's by its channel
    count, which made MobileNetV2's backward read 20x its forward)."""
    from torch.utils.flop_counter import conv_backward_flop

    shared = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*shared, [output_mask[0], False], out_val=out_shape, **kwargs)
    grad_weight = conv_backward_flop(*shared, [False, output_mask[1]], out_val=out_shape, **kwargs)
    return grad_input + grad_weight // groups


def flop_counter() -> Any:
    """torch's FlopCounterMode with pac's correction for grouped convolutions' backward."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    )


def _step_flops(step: Any, batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, int]:
    """FLOPs of one step: forward, backward, optimizer (see the module's docstring), and their total."""
    from pac.runtime.step import BackpropStep

    if not isinstance(step, BackpropStep):  # forward passes only (zeroth-order): the whole step is forward work
        with flop_counter() as whole:
            step(indices, 0)
        counted = {"forward": whole.get_total_flops(), "backward": 0, "optimizer": 0}
    else:
        step.optimizer.zero_grad(set_to_none=True)
        with flop_counter() as forward:
            loss = step.loss(batch)
        with flop_counter() as backward:
            loss.backward()
        with flop_counter() as update:
            step.optimizer.step()
        moments = sum(
            state["exp_avg"].numel()
            for state in step.optimizer.state.values()
            if isinstance(state, dict) and "exp_avg" in state
        )
        counted = {
            "forward": forward.get_total_flops(),
            "backward": backward.get_total_flops(),
            "optimizer": update.get_total_flops() + ADAM_FLOPS_PER_ELEMENT * moments,
        }
    return {**counted, "total": sum(counted.values())}


def profile_table(profiles: list[dict[str, Any]]) -> str:
    """A markdown table of the profiles, one row per method."""
    lines = [
        "| method | trainable / total params | forward GFLOPs | backward GFLOPs | optimizer GFLOPs | parameters MB | "
        "gradients MB | optimizer state MB | activations MB | temporaries MB | untracked MB | predicted peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        f, m = p["flops"], p["memory_mb"]
        share = p["trainable_params"] / p["total_params"]
        lines.append(
            f"| {p['method']} | {p['trainable_params']:,} / {p['total_params']:,} ({share:.2%}) | "
            f"{f['forward'] / 1e9:.2f} | {f['backward'] / 1e9:.2f} | {f['optimizer'] / 1e9:.3f} | "
            f"{m['parameters'] + m['buffers']:.1f} | {m['gradients']:.1f} | {m['optimizer_state']:.1f} | "
            f"{m['activations']:.1f} | {m['temporaries']:.1f} | {m['untracked']:.1f} | "
            f"{p['predicted_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def layer_type_table(profiles: list[dict[str, Any]]) -> str:
    """Trainable against total parameters per layer type, one row per method and type."""
    lines = [
        "| method | layer type | layers | total params | trainable params | trainable / total |",
        "|---|---|---|---|---|---|",
    ]
    for p in profiles:
        for kind, c in p["layer_types"].items():
            lines.append(
                f"| {p['method']} | {kind} | {c['layers']} | {c['total']:,} | {c['trainable']:,} | "
                f"{c['trainable'] / max(c['total'], 1):.2f} |"
            )
    return "\n".join(lines)


def write_profiles(profiles: list[dict[str, Any]], out: Path) -> list[Path]:
    """profile.json, profile.md (both tables) and profile.png (FLOPs and memory per method, side by side)."""
    out.mkdir(parents=True, exist_ok=True)
    first = profiles[0]
    shape = f"batch {first['batch_size']}" + (f" x {first['max_length']} tokens" if first["max_length"] else "")
    title = f"{first['model']}, {first['task']}, {shape}"
    (out / "profile.json").write_text(json.dumps(profiles, indent=2) + "\n")
    (out / "profile.md").write_text(
        f"# One training step: {title}\n\n{profile_table(profiles)}\n\n## Parameters per layer type\n\n"
        f"{layer_type_table(profiles)}\n"
    )
    plot_profiles(profiles, out / "profile.png", title)
    return [out / "profile.json", out / "profile.md", out / "profile.png"]


def plot_profiles(profiles: list[dict[str, Any]], png: Path, title: str) -> None:
    from pac.report import bars, pyplot, save

    names = [p["method"] for p in profiles]
    fig, (flops_ax, memory_ax) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    flops = {part: [p["flops"][part] / 1e9 for p in profiles] for part in ("forward", "backward", "optimizer")}
    bars(flops_ax, names, flops, ylabel="GFLOPs per training step", stacked=True)
    flops_ax.set_title("compute")
    memory = {part.replace("_", " "): [p["memory_mb"][part] for p in profiles]
              for part in ("runtime_floor", "parameters", "buffers", "gradients", "optimizer_state", "activations",
                           "temporaries", "untracked")}  # fmt: skip
    bars(memory_ax, names, memory, ylabel="MB at the step's peak", stacked=True)
    memory_ax.set_title("memory")
    fig.suptitle(title)
    save(fig, png, dpi=110)


def with_method(opts: TrainOptions, method: str, given: dict[str, Any]) -> TrainOptions:
    """`opts` for another method, with those of `given` (option field -> value) that the method takes."""
    from pac.methods.registry import get_method

    fields = get_method(method).option_keys()
    chosen = {field: given[key] for key, field in fields.items() if key in given}
    return replace(opts, method=method, method_options=get_method(method).options(**chosen))
