"""The method registry: every fine-tuning method pac can train, under its `--method` name.

A method is one module plus one `register_method(Method(...))` call (in the spirit of peft's
`register_peft_method`). It says what it is at each point of a run, and the run itself — data, phase 1,
the training loop, the adapter directory — looks it up here, so a new method edits neither the API nor the
CLI (docs/architecture.md, "Adding a method"):

  options      a dataclass of the method's own options; each field becomes a `pac train` flag, with the help,
               bounds and flag name in its metadata (`method_option`), shown under the method in `--help`
  taps         which backbone layers phase 1 caches for it, or None: it trains on token ids
  build        its model, given what the run knows (`BuildContext`)
  step         how one batch updates the model; None: backprop + AdamW (pac.runtime.trainer's default)
  save / load  the adapter directory: it writes its weights and config; `pac_adapter_config.json` names the
               method under "pac_method", so loading finds it here again
  lm_logits    its next-token output (generation, `pac eval --retain`); None: it cannot generate
  merged       the base model with the adapter folded into its weights (`pac export`); None: it runs beside them
  collaborative  whether and how `pac-launch` runs it across devices: its options for a placement mode
  tasks        the --task values it trains (default: classify and lm; image-classify for the methods that
               fine-tune edge CNNs, pac.methods.vision_model)
  accelerates  whether it trains on a GPU (`--device`, pac.runtime.device); default: on the CPU only

Methods outside pac register when their module is imported: before calling pac in Python, or, for the `pac`
and `pac peer` commands, by naming the modules in $PAC_METHODS (comma-separated `module` or
`module:function`, imported, and the function called, when the registry is first read).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pac.errors import PacError
from pac.methods.defaults import TASKS
from pac.plan.placement import PIPELINE

METHOD_KEY = "pac_method"  # the key of pac_adapter_config.json that names an adapter's method


def method_option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: list[str] | None = None,
    negate: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A field of a method's options dataclass that `pac train` offers as `--flag` (default: the field name with
    dashes). A bool field is a switch (`negate`: its flag turns a True default off instead); `parse` turns the
    text into a value and may refuse it (an argparse type); `help` is the flag's help text."""
    metadata = {"help": help, "flag": flag, "parse": parse, "choices": choices, "negate": negate, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def lazy(reference: str) -> Callable[..., Any]:
    """The function at "module:name", imported on its first call: a registration stays light (no torch) while
    what it names does the heavy work."""
    module, _, name = reference.partition(":")
    target: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    call.__qualname__ = call.__name__ = reference
    return call


def option_flag(option: dataclasses.Field) -> str:
    """The `pac train` flag of a method option: `--field-name`, unless its metadata names another."""
    return option.metadata.get("negate") or option.metadata.get("flag") or "--" + option.name.replace("_", "-")


def option_key(option: dataclasses.Field) -> str:
    """The name a method option goes by outside its dataclass (the CLI's dest, a summary's key): its flag's, or
    the field's where the flag only negates it (--no-side-network -> side_network)."""
    flag = option.metadata.get("flag")
    return flag[2:].replace("-", "_") if flag else option.name


def lazy_attributes(module: str, names: tuple[str, ...]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) that imports `names` from `module` on first use: a registration module
    re-exports its model's classes without importing torch itself."""

    def attribute(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {module.rpartition('.')[0]!r} has no attribute {name!r}")

    return attribute


@dataclass
class BuildContext:
    """What a run knows when a method builds its model."""

    model_dir: Path
    task: str
    label_names: list[str] | None
    seed: int
    max_length: int
    train_source: Any = None  # the training batches (cached taps or token ids), for data-dependent initialisation
    whole_train: Any = None  # the whole training set where train_source is one peer's share (token ids), else None
    # The layers [start, end) this peer holds where the model itself is pipelined over the peers (`pipeline` mode,
    # forward-only methods); None: the whole model.
    stage: tuple[int, int] | None = None
    network: Any = None  # an image task's CNN (pac.models.vision.NetworkSpec); model_dir is then None


@dataclass
class Loaded:
    """A saved adapter's model, ready for evaluation or generation, and the backbone that feeds it taps (None
    where the model reads token ids itself)."""

    model: Any
    backbone: Any
    task: str
    max_length: int
    label_names: list[str] | None


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # as people write it ("LoRA")
    summary: str  # one line for `pac train --help` and the model card
    options: type  # a dataclass; its `method_option` fields are the method's flags
    build: Callable[[Any, BuildContext], Any]  # (options, context) -> model
    save: Callable[[Any, Any, Path, dict[str, Any]], dict[str, Any]]  # (options, model, out, meta)
    load: Callable[[Path, dict[str, Any], Path, bool], Loaded]  # (adapter_dir, config, model_dir, retrieval)
    default_lr: Callable[[str], float]  # task -> the learning rate when --lr is not given
    taps: Callable[[Any, str, int], list[int]] | None = None  # (options, task, num_layers); None: token ids
    resolve: Callable[[Any, str], Any] | None = None  # (options, task) -> options with task defaults, checked
    # (options, model, task, batches, train config) -> a TrainStep; None: backprop
    step: Callable[..., Any] | None = None
    training_source: Callable[[Any, Any, Any], Any] | None = None  # (options, model, batches) -> batches
    after_training: Callable[..., dict[str, Any]] | None = None  # (options, model, context, out, evaluate_val)
    lm_logits: Callable[[Loaded, Any, Any], Any] | None = None  # (loaded, ids, mask) -> next-token logits
    generate: Callable[..., Any] | None = None  # own decoding (peft's); None: pac.generate over taps
    generates: bool = True  # False: its adapters cannot generate (pac generate refuses them)
    merged: Callable[[Loaded], Any] | None = None  # loaded -> the base transformers model with the adapter merged in
    # (options, task, placement mode) -> the options a cluster run trains with; raises PacError for what cannot
    # run there. None: single-device only. `data_parallel_only` serves a method with no pipelined stage.
    collaborative: Callable[[Any, str, str], Any] | None = None
    tasks: tuple[str, ...] = TASKS  # the --task values it trains
    # Whether it trains on an accelerator (`pac train --device`): its model and step keep every tensor on the
    # weights' device, as training on the lazy stand-in device checks (tests/test_device.py). False: CPU only.
    accelerates: bool = False

    @property
    def cached(self) -> bool:
        """Whether phase 1 caches backbone outputs for it (else it trains on token ids)."""
        return self.taps is not None

    def default_options(self) -> Any:
        return self.options()

    def option_keys(self) -> dict[str, str]:
        """Outside name (option_key) -> field name, for every option of the method."""
        return {option_key(f): f.name for f in dataclasses.fields(self.options)}

    def flat_options(self, options: Any) -> dict[str, Any]:
        """The options as plain values under their outside names (a summary's, a model card's)."""
        return {option_key(f): getattr(options, f.name) for f in dataclasses.fields(options)}

    def resolved(self, options: Any, task: str) -> Any:
        if task not in self.tasks:
            able = ", ".join(m.name for m in methods().values() if task in m.tasks)
            raise PacError(f"--method {self.name} does not train --task {task}: the methods that do are {able}")
        options = options if options is not None else self.default_options()
        if not isinstance(options, self.options):
            raise PacError(f"--method {self.name} takes {self.options.__name__} options, not {type(options).__name__}")
        return self.resolve(options, task) if self.resolve is not None else options


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` trainable as `--method NAME` and its adapters loadable. A name registers once."""
    if not dataclasses.is_dataclass(method.options):
        raise TypeError(f"{method.name}: options must be a dataclass, not {method.options!r}")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Forget a method (a test's own, after the test)."""
    _METHODS.pop(name, None)


# pac's own, listed first wherever methods are listed
BUILTIN = ("parallel-adapters", "lora", "dora", "boundary", "taskedge", "zo", "galore", "head-bn", "full")


PLUGINS_ENV = "PAC_METHODS"


def _load_builtin() -> None:
    # pac's own methods register on import; importing them here keeps the registry complete wherever it is read.
    import pac.methods.boundary  # noqa: F401
    import pac.methods.full  # noqa: F401
    import pac.methods.galore  # noqa: F401
    import pac.methods.head_bn  # noqa: F401
    import pac.methods.lora  # noqa: F401
    import pac.methods.parallel_adapters  # noqa: F401
    import pac.methods.taskedge  # noqa: F401
    import pac.methods.zo  # noqa: F401

    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        if spec not in _PLUGINS_LOADED:
            _PLUGINS_LOADED.add(spec)  # before loading: a plug-in that reads the registry must not load itself again
            try:
                _load_plugin(spec)
            except PacError:
                _PLUGINS_LOADED.discard(spec)  # refused every time it is asked for, not only the first
                raise


_PLUGINS_LOADED: set[str] = set()


def _load_plugin(spec: str) -> None:
    module, _, function = spec.partition(":")
    try:
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    except Exception as exc:
        raise PacError(
            f"${PLUGINS_ENV} names {spec!r}, which could not be loaded ({type(exc).__name__}: {exc}): install it on "
            f"this device, put it on PYTHONPATH, or drop it from ${PLUGINS_ENV}"
        ) from exc


def data_parallel_only(options: Any, task: str, mode: str) -> Any:
    """`Method.collaborative` for a method with no pipelined stage: the data-parallel modes, as it is."""
    if mode == "side-pipeline":
        raise PacError("this method has no pipelined stage: use --mode shuffle or replicated")
    if mode == PIPELINE:
        raise PacError(
            "--mode pipeline runs forward-only methods (--method zo); this one runs backward through the whole model "
            "on each peer: use --mode replicated"
        )
    return options


def methods() -> dict[str, Method]:
    """Every registered method by name: pac's own first, then the others in registration order."""
    _load_builtin()
    return {name: _METHODS[name] for name in sorted(_METHODS, key=lambda n: BUILTIN.index(n) if n in BUILTIN else 99)}


def get_method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise PacError(f"--method must be one of {', '.join(known)}, not {name!r}")
    return known[name]


# Adapters from before the registry named their method by peft_type or by file.
_LEGACY_TYPES = {"PARALLEL_ADAPTERS": "parallel-adapters", "BOUNDARY_LORA": "boundary"}
LEGACY_LORA_META = "pac_lora.json"


def adapter_config(adapter_dir: str | Path) -> tuple[Method, dict[str, Any]]:
    """The method that saved `adapter_dir` and the config it wrote there, read without loading any model."""
    from pac.methods.base import ADAPTER_CONFIG, read_adapter_config

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    legacy_lora = adapter_dir / LEGACY_LORA_META
    if config is None and legacy_lora.exists():
        config = json.loads(legacy_lora.read_text())
        config.setdefault(METHOD_KEY, config.get("peft_type_pac", "lora"))
    if config is None:
        raise PacError(
            f"{adapter_dir} is not a pac adapter: it has no {ADAPTER_CONFIG} (the --out directory of `pac train` has)"
        )
    name = config.get(METHOD_KEY) or _LEGACY_TYPES.get(config.get("peft_type", ""))
    if name not in methods():
        raise PacError(
            f"{adapter_dir} was saved by method {name!r}, which this pac does not have (it has "
            f"{', '.join(methods())}): load it with the pac, or the plug-in, that trained it"
        )
    return methods()[name], config
