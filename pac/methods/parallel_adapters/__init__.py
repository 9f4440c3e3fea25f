"""Parallel adapters, the default method: a side network beside the frozen backbone, trained from the
activation cache (phase 1 caches the tapped layers' outputs once; every epoch reads them from disk).

This module is the registration (light: `pac --help` reads it without loading torch): the options and their
task defaults. The model is in `.model`, what a run does with it in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pac.argtypes import layer_list, number
from pac.errors import PacError
from pac.methods.defaults import PARALLEL_ADAPTER_DEFAULTS
from pac.methods.registry import Method, lazy, lazy_attributes, method_option, register_method

_PA = PARALLEL_ADAPTER_DEFAULTS
_REDUCTIONS = ", ".join(map(str, sorted({d["reduction"] for d in _PA.values()})))
_INITS = "/".join(sorted({d["side_init"] for d in _PA.values()}))
POOLING_HELP = "classification read-out over real tokens (default mean)"


@dataclass
class ParallelAdapterOptions:
    """`--method parallel-adapters` options. None: the task's measured default (pac.methods.defaults)."""

    reduction: int | None = method_option(
        None, f"side network width = model width / r (default {_REDUCTIONS})", parse=number(int, minimum=1)
    )
    tap_every: int = method_option(
        1,
        "tap every k-th layer (always the first and last); fewer taps, smaller cache (default 1)",
        parse=number(int, minimum=1),
    )
    taps: list[int] | None = method_option(
        None,
        "tap exactly these layers, e.g. 15-30 for the last half (0 = embeddings and the last layer are always "
        "tapped); overrides --tap-every",
        parse=layer_list,
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])
    readout: str = method_option(
        "sum",
        "classification: the head reads final_norm(h_L) + side output (sum, default) or the side output alone "
        "(side, as Ladder Side-Tuning)",
        choices=["sum", "side"],
    )
    gate_temperature: float = method_option(
        0.1,
        "temperature of the side network's gates: lower moves them faster (default 0.1)",
        parse=number(float, above=0),
    )
    side_init: str | None = method_option(
        None,
        f"side blocks start random, or from the model's own weights pruned to width d/r (default {_INITS})",
        choices=["random", "pruned"],
    )
    tap_norm: bool = method_option(
        False, "scale every cached layer output to unit RMS before the side network reads it"
    )
    dropout: float = method_option(
        0.0, "dropout on the side network's inputs (default 0)", parse=number(float, minimum=0, below=1)
    )
    train_final_norm: bool = method_option(
        False, "also train the model's final norm (cheap; no backward into the layers)"
    )
    vocab_bias: bool = method_option(False, "lm: also learn a per-token logit bias")
    side_heads: int | None = method_option(
        None,
        "attention heads of the side blocks (default: the model's; fewer heads are wider, e.g. 3 heads of 24 "
        "dimensions instead of 9 of 8 on SmolLM2 at r=8)",
        parse=number(int, minimum=1),
        metavar="N",
    )
    readout_hidden: int | None = method_option(
        None,
        "add a read-out MLP (H hidden units) that corrects final_norm(h_L) from it and the side state; its "
        "correction has full rank, where Up's is confined to d/r directions (default 0: off)",
        parse=number(int, minimum=0),
        metavar="H",
    )
    side_network: bool = method_option(
        True,
        "baselines: train only the head (a linear probe) and, with --train-final-norm, the final norm",
        negate="--no-side-network",
    )
    retrieval: bool | None = method_option(
        None,
        "lm: after training, mix the adapter's next-token distribution with that of the nearest training tokens "
        "in the activation cache (a kNN-LM; its weight is fit on training text, 0 if it does not help). The "
        "adapter then carries retrieval.safetensors, the cached states and token ids of the training text: share "
        "that file only where the text may go (default: on for --task lm)",
    )
    shortlist: int | None = method_option(
        None,
        "lm, plain side network: before the first epoch, keep for every training token the K words the frozen "
        "backbone finds likeliest (and the target), and train on those plus one term for the rest of the "
        "vocabulary, instead of the whole vocabulary at every step; evaluation always scores the whole "
        "vocabulary. The shortlists are stored beside the activation cache and reused (default: 256 for --task "
        "lm with the plain side network; 0: train on every word)",
        parse=number(int, minimum=0),
        metavar="K",
    )


def resolve(options: ParallelAdapterOptions, task: str) -> ParallelAdapterOptions:
    """Options left unset take the task's measured defaults; combinations that cannot train are refused."""
    if options.retrieval and task != "lm":
        raise PacError("--retrieval is for --method parallel-adapters --task lm: drop it")
    if options.shortlist and task != "lm":
        raise PacError("--shortlist is for --method parallel-adapters --task lm: drop it")
    unset = {k: v for k, v in _PA[task].items() if k != "lr" and getattr(options, k) is None}
    options = replace(options, **unset)
    plain = not (options.readout_hidden or options.vocab_bias or options.train_final_norm or not options.side_network)
    if options.shortlist and not plain:
        if "shortlist" in unset:  # the default is for the plain side network: the others train on every word
            return replace(options, shortlist=0)
        raise PacError(
            "--shortlist trains the plain side network: drop --readout-hidden, --vocab-bias, --train-final-norm "
            "and --no-side-network, or drop --shortlist"
        )
    return options


def collaborative(options: ParallelAdapterOptions, task: str, mode: str) -> ParallelAdapterOptions:
    """A cluster run's options: every mode, without the token memory; shortlists in the data-parallel modes."""
    if options.retrieval:
        # The memory would need every peer's share of the training cache in one place.
        raise PacError("--retrieval runs in `pac train` for now: drop it (collaborative LM adapters go without)")
    if options.shortlist and mode == "side-pipeline":
        raise PacError("--shortlist runs in the shuffle and replicated modes, not side-pipeline: drop one")
    # Side-pipeline's last stage alone computes the loss, from side states the other peers send it: no shortlists.
    return replace(options, retrieval=False, shortlist=0 if mode == "side-pipeline" else options.shortlist)


def tapped_layers(side_network: bool, taps: list[int] | None, tap_every: int, num_layers: int) -> list[int]:
    """The layers whose outputs the side network reads (0: the embeddings; num_layers, the last, always), so
    the ones phase 1 caches. Without a side network the head reads the last layer alone."""
    if not side_network:
        return [num_layers]
    if taps:
        return sorted({0, num_layers, *taps})
    return sorted(set(range(0, num_layers + 1, max(1, tap_every))) | {0, num_layers})


def taps(options: ParallelAdapterOptions, task: str, num_layers: int) -> list[int]:
    return tapped_layers(options.side_network, options.taps, options.tap_every, num_layers)


RUN = f"{__name__}.run"
METHOD = register_method(
    Method(
        name="parallel-adapters",
        title="parallel adapters",
        summary="a side network beside the frozen model, trained from the activation cache (default)",
        options=ParallelAdapterOptions,
        resolve=resolve,
        taps=taps,
        default_lr=lambda task: _PA[task]["lr"],
        build=lazy(f"{RUN}:build"),
        training_source=lazy(f"{RUN}:training_source"),
        after_training=lazy(f"{RUN}:after_training"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{RUN}:load"),
        lm_logits=lazy(f"{RUN}:lm_logits"),
        collaborative=collaborative,
        accelerates=True,
    )
)

# The model's names, imported on first use (they need torch; the registration does not).
__getattr__ = lazy_attributes(
    f"{__name__}.model",
    ("METHOD_TYPE", "ParallelAdapterConfig", "ParallelAdapterModel", "attach_memory", "initialize_pruned"),
)
