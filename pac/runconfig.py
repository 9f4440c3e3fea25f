"""A run's configuration, as `pac train`, `pac-launch` and the Python API build it: the data, the training
loop's settings, where things go, and the method with its own options (a dataclass the method registered,
pac.methods.registry). Plain data; `with_defaults` fills in what the method and the task decide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pac.errors import PacError
from pac.methods.registry import get_method

DEFAULT_METHOD = "parallel-adapters"


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
class OptimOptions:
    """The training loop: how long, how large a step, and how it is taken."""

    epochs: int = 3
    batch_size: int = 8
    lr: float | None = None  # None: the method's default for the task
    weight_decay: float = 0.0
    precision: str = "fp32"  # or "bf16": training steps' products in bfloat16 (pac.runtime.step.autocast)
    seed: int = 0  # initialisation and sample order
    early_stopping: int = 0  # patience in epochs, judged on the holdout part of the training data


@dataclass
class CacheOptions:
    """The activation cache (pac.cache): where it lives and the precision it stores."""

    dir: str | None = None  # None: $PAC_HOME/cache (pac.models.loading.cache_root)
    dtype: str = "fp16"  # fp16 | bf16 | int8


@dataclass
class TrainOptions:
    """One run: the model, its data, the method with its options, the loop, the cache, and where results go."""

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    data: DataOptions = field(default_factory=DataOptions)
    method: str = DEFAULT_METHOD
    method_options: Any = None  # the method's options dataclass (registry.Method.options); None: its defaults
    optim: OptimOptions = field(default_factory=OptimOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    out: str = "runs/adapter"
    checkpoint_every: int = 0
    resume: bool = True  # continue this run from its checkpoints in `out` (they must be this run's)
    overwrite: bool = False  # replace an earlier run's outputs in `out`
    require_resume: bool = False  # refuse to start unless `out` holds this run to continue
    # Where phase 1 and the training loop compute (pac.runtime.device): cpu, cuda[:N], mps, auto, or the lazy
    # stand-in. CPU by default: it is what every pac device has, and the only one this project's CI trains on.
    device: str = "cpu"

    @property
    def options(self) -> Any:
        """The method's options (its defaults where none were given)."""
        return self.method_options if self.method_options is not None else get_method(self.method).default_options()


@dataclass
class ClusterOptions:
    """How `pac-launch` places a run on the peers (pac.plan.placement) and waits for them."""

    mode: str | None = None  # shuffle | side-pipeline | replicated; None: the planner's choice (shuffle with stages)
    stages: str | None = None  # layers per peer, e.g. "0-9,10-19,20-29"; None: planned, or in proportion to memory
    refresh_profiles: bool = False  # measure every peer again rather than read its cached profile
    data_plane: str = "zmq"  # zmq | torch
    shares: tuple[int, ...] | None = None  # samples each peer owns, whole-number weights in rank order
    schedule: str = "gpipe"  # side-pipeline's phase 2 (pac.plan.schedule)
    micro_batches: int = 2
    # Gradients of data-parallel phase 2 on the wire: none | fp16 (torch's DDP communication
    # hooks); None: the planner's choice where it plans, else none.
    grad_compression: str | None = None
    # Data-parallel phase 2's all-reduces over the CURVE-encrypted data plane instead of gloo (which is in clear).
    encrypt_gradients: bool = False
    join_timeout: float = 120.0
    # Start once this many peers have joined when the join timeout passes (None: all of them); the others are
    # planned in when they answer, at the start of training or at a checkpoint of it.
    min_peers: int | None = None
    peer_timeout: float = 60.0
    store_host: str | None = None  # the address peers reach the coordinator at (default: found per route)


# Options that say where things are, not what is trained: they do not change a run's identity (the model's
# weights and the data's content stand in for the paths that name them).
PLACEMENT_OPTIONS = (
    "model",
    "out",
    "cache_dir",
    "checkpoint_every",
    "resume",
    "overwrite",
    "require_resume",
    "device",
)


def flat_options(opts: TrainOptions) -> dict[str, Any]:
    """The run as one record, each loop and cache option under its `pac train` name (lr, cache_dir, ...), the
    data options under "data" and the method's under "method_options": what run identities and summaries hold."""
    top = {f.name: getattr(opts, f.name) for f in fields(TrainOptions) if f.name not in ("optim", "cache")}
    return {
        **{k: v for k, v in top.items() if k not in ("data", "method_options")},
        **asdict(opts.optim),
        "cache_dir": opts.cache.dir,
        "cache_dtype": opts.cache.dtype,
        "data": asdict(opts.data),
        "method_options": asdict(opts.options),
    }


def with_defaults(opts: TrainOptions) -> TrainOptions:
    """The method's options resolved for the task (its measured defaults filled in, impossible combinations
    refused), and the data options checked against the task."""
    method = get_method(opts.method)
    if opts.data.retain_mix:
        from pac.retain import check_retain_mix

        if opts.data.task != "lm":
            raise PacError("--retain-mix adds prompt/completion rows: it is for --task lm")
        check_retain_mix(opts.data.retain_mix)
    options = method.resolved(opts.method_options, opts.data.task)  # first: it refuses a task the method lacks
    optim = replace(opts.optim, lr=opts.optim.lr or method.default_lr(opts.data.task))
    return replace(opts, optim=optim, method_options=options)


def summary_options(opts: TrainOptions) -> dict[str, Any]:
    """Every option as `pac train` spells it (the method's under their flag names), for summary.json and the
    model card: one flat, readable record."""
    generic = {k: v for k, v in flat_options(opts).items() if k != "method_options"}
    return {**generic, **get_method(opts.method).flat_options(opts.options)}


# ----------------------------------------------------------------------------- on the wire
# A collaborative run's configuration travels to the peers explicitly, field by field, under its own version:
# a new option changes this schema on purpose (and RUN_CONFIG_VERSION), never by accident.
RUN_CONFIG_VERSION = 2  # 2: the loop's and the cache's options in their own sections
_SECTIONS = {"data": DataOptions, "optim": OptimOptions, "cache": CacheOptions}
# Each peer computes where it was started to (`pac peer`), never where the coordinator does: no device on the wire.
_GENERIC = tuple(f.name for f in fields(TrainOptions) if f.name not in (*_SECTIONS, "method_options", "device"))


def run_config_to_wire(opts: TrainOptions) -> dict[str, Any]:
    return {
        "version": RUN_CONFIG_VERSION,
        "train": {name: getattr(opts, name) for name in _GENERIC},
        **{name: asdict(getattr(opts, name)) for name in _SECTIONS},
        "method_options": asdict(opts.options),
    }


def run_config_from_wire(raw: Any) -> TrainOptions:
    """The run configuration a coordinator sent; anything unknown, missing or of another version is refused."""
    if not isinstance(raw, dict) or raw.get("version") != RUN_CONFIG_VERSION:
        version = raw.get("version") if isinstance(raw, dict) else None
        raise PacError(f"run configuration of version {version!r}, this side reads {RUN_CONFIG_VERSION}: run one pac")
    _exact_keys(raw, ("version", "train", *_SECTIONS, "method_options"), "run configuration")
    train = _exact_keys(raw["train"], _GENERIC, "run configuration's training options")
    sections = {
        name: kind(**_exact_keys(raw[name], [f.name for f in fields(kind)], f"run configuration's {name} options"))
        for name, kind in _SECTIONS.items()
    }
    method = get_method(train["method"])
    names = [f.name for f in fields(method.options)]
    options = method.options(**_exact_keys(raw["method_options"], names, f"--method {method.name} options"))
    return TrainOptions(**train, **sections, method_options=options)


def _exact_keys(raw: Any, names: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PacError(f"{what}: a mapping was expected, not {type(raw).__name__}")
    unknown, missing = sorted(set(raw) - set(names)), sorted(set(names) - set(raw))
    if unknown or missing:
        raise PacError(f"{what}: unknown fields {unknown}, missing fields {missing}: run the same pac everywhere")
    return raw
