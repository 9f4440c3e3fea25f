"""The `pac` command: train, evaluate and generate with personal adapters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from pac import __version__
from pac.argtypes import layer_list, number  # noqa: F401  (layer_list: the CLI's, for tests and callers)
from pac.errors import PacError
from pac.methods.defaults import ALL_TASKS
from pac.methods.registry import get_method, methods, option_flag, option_key
from pac.runconfig import DEFAULT_METHOD

DEVICE_ENV = "PAC_DEVICE"  # `pac peer --device`'s default: a service file or a launcher's local peers set it

DESCRIPTION = """\
pac fine-tunes a language model on your own data, on your own devices.

Parallel adapters (the default method) train a small side network beside the frozen model:
phase 1 runs the model once over your data and caches every layer's output; phase 2 trains
the side network for all epochs from that cache, which is many times faster than LoRA and
needs a fraction of its memory.

With no --model and --data, pac uses the bundled SmolLM2-135M-Instruct model and the bundled
BBC News corpus (5 topics; 400 training / 200 validation articles).

examples:
  pac train                                   # the bundled demo: train, evaluate, save to runs/adapter
  pac train --data notes.jsonl --task lm --out runs/notes
  pac train --method lora                     # the LoRA baseline on the same model and data
  pac train --method taskedge --out runs/sparse   # only the 0.1% of weights that matter change
  pac export --adapter runs/sparse --out runs/merged   # merged into the model, for transformers
  pac eval --adapter runs/adapter             # accuracy / perplexity on the validation split
  pac generate --adapter runs/notes --prompt "Summarise my week"
  pac generate --base --prompt "Summarise my week"          # the same prompt to the base model
  pac eval --adapter runs/notes --retain      # how much the adapter changed the model off its data
  pac report runs/adapter                     # the run as pictures: curves, who was busy when, memory, traffic
  pac train --task image-classify --data digits:pretrain --model resnet18 --method full --out runs/cnn
  pac train --task image-classify --data digits:unseen --model resnet18:runs/cnn --method lora --out runs/cnn-lora
"""

NO_RETRIEVAL_HELP = "use a language-model adapter without its memory of the training text (retrieval.safetensors)"
DATA_HELP = """\
data formats (--data):
  JSONL   one object per line: {"text","label"} | {"text"} | {"prompt","completion"} | {"messages"}
  CSV/TSV with a header; columns named by --text-field / --label-field
  .txt    plain text, one sample per paragraph (--task lm)
  folder  one sub-folder per class, holding .txt files (the folder name is the label); for --task lm,
          a folder of .txt files
  hf:FORMAT:PATH   a local file through the `datasets` library, e.g. hf:parquet:train.parquet
  --task image-classify: digits (the bundled 8x8 digits), digits:pretrain|unseen|shift (five classes each:
          0-4, 5-9, 0-4 corrupted), or a folder with one sub-folder of images per class
"""


def val_size(text: str) -> int | float:
    """--val-size: a row count (a whole number >= 1, or 0) or a fraction in (0, 1)."""
    value = number(float, minimum=0)(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"must be a row count (a whole number) or a fraction below 1, not {text}")
    return int(value) if value >= 1 or value == 0 else value


def _add_data_args(p: argparse.ArgumentParser, evaluating: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--model",
        help="Hugging Face id, model directory or .gguf file (default: bundled SmolLM2); for --task image-classify "
        "a CNN: mobilenet_v2 or resnet18, fresh or NAME:CHECKPOINT (a torchvision state dict or an earlier pac run)",
    )
    g.add_argument(
        "--data",
        help="JSONL, CSV, .txt, a folder or hf:FORMAT:PATH (default: the bundled BBC News corpus)"
        + ("; every row is scored unless --split val" if evaluating else ""),
    )
    g.add_argument(
        "--task",
        choices=list(ALL_TASKS),
        default="classify",
        help="classify: predict the label; lm: learn to write like the text; image-classify: fine-tune an edge CNN "
        "on images (default: classify)",
    )
    g.add_argument(
        "--max-length",
        type=number(int, minimum=2),
        default=128,
        help="tokens per sample; longer text is cut (default 128)",
    )
    if not evaluating:
        g.add_argument(
            "--val-data", metavar="FILE", help="a separate validation file (then nothing of --data is held out)"
        )
    g.add_argument(
        "--val-size",
        type=val_size,
        help="rows held out of --data for validation: a count, or a fraction if < 1 (default: 10%% of --data; "
        "200 rows of the bundled corpus; 0 with --val-data)",
    )
    g.add_argument("--train-size", type=number(int, minimum=1), help="use only this many training rows (stratified)")
    g.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/validation split; keep it fixed to compare runs (default 0)",
    )
    recorded = " or what the adapter was trained with" if evaluating else ""
    g.add_argument("--text-field", help=f"text column/key (default: text{recorded})")
    g.add_argument("--label-field", help=f"label column/key (default: label{recorded})")
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="write prompt/completion rows as a user and an assistant turn of the model's chat template (--chat) "
        "or as plain prompt + completion (--no-chat)"
        + (" (default: as the adapter was trained)" if evaluating else " (default: --chat where the model has one)"),
    )


def _data_options(args: argparse.Namespace, recorded: dict[str, str] | None = None):
    """DataOptions from the data flags; field names not given come from `recorded` (an adapter's)."""
    from pac.runconfig import DataOptions

    recorded_fields = recorded or {}
    return DataOptions(
        data=args.data,
        task=args.task,
        max_length=args.max_length,
        val_data=getattr(args, "val_data", None),
        val_size=args.val_size,
        train_size=args.train_size,
        seed=args.split_seed,
        text_field=args.text_field or recorded_fields.get("text_field", "text"),
        label_field=args.label_field or recorded_fields.get("label_field", "label"),
        chat=args.chat,
    )


def _default_lrs() -> str:
    """Each method's default learning rate, per task where it differs: '1e-3 for lm' style, for --lr's help."""
    parts = []
    for name, method in methods().items():
        rates = {task: method.default_lr(task) for task in method.tasks}
        same = len(set(rates.values())) == 1
        per_task = ", ".join(f"{r:g} for {t}" for t, r in rates.items())
        parts.append(f"{name} {next(iter(rates.values())):g}" if same else f"{name} {per_task}")
    return "; ".join(parts)


GIVEN = "method_options_given"  # the namespace attribute naming the method options given on the command line


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), dest})


class _GivenOption(argparse.Action):
    """Stores the value (a switch: its const) and notes that the option was given, so that an option of
    another method can be refused even where its value equals the default."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102 (argparse API)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _note_given(namespace, self.dest)


class _GivenSwitch(argparse.BooleanOptionalAction):
    """--x / --no-x, noting that it was given."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102 (argparse API)
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def _add_method_options(t: argparse.ArgumentParser) -> None:
    """Every registered method's options, generated from its options dataclass, in a group per method. A flag
    several methods share (--lora-r, --pooling) is listed once, under the first, and says which take it."""
    owners: dict[str, list[str]] = {}
    for name, method in methods().items():
        for option in fields(method.options):
            owners.setdefault(option_flag(option), []).append(name)
    listed: set[str] = set()
    for name, method in methods().items():
        group = t.add_argument_group(f"--method {name} options")
        for option in fields(method.options):
            flag = option_flag(option)
            if flag in listed:
                continue
            listed.add(flag)
            others = owners[flag][1:]
            note = f" [also --method {', '.join(others)}]" if others else ""
            group.add_argument(flag, dest=option_key(option), default=option.default, **_argument(option, note))


def _argument(option: Any, note: str) -> dict[str, Any]:
    """argparse keywords for a method option from its field metadata (registry.method_option)."""
    meta = option.metadata
    kw: dict[str, Any] = {"help": meta["help"].replace("%", "%%") + note}
    if meta.get("negate"):
        return {**kw, "action": _GivenOption, "nargs": 0, "const": False}
    if meta.get("parse") is None and meta.get("choices") is None:
        switch = {"action": _GivenOption, "nargs": 0, "const": True} if option.default is False else {}
        return {**kw, **(switch or {"action": _GivenSwitch})}
    kw.update(action=_GivenOption, type=meta.get("parse"), choices=meta.get("choices"))
    return {**kw, "metavar": meta["metavar"]} if meta.get("metavar") else kw


def add_train_arguments(t: argparse.ArgumentParser, launch: bool = False) -> None:
    """The options of `pac train`; `pac-launch` (`launch`) takes the same ones for a collaborative run, except
    that its --resume names the run directory to continue."""
    _add_data_args(t)
    m = t.add_argument_group("training")
    m.add_argument(
        "--method",
        choices=list(methods()),
        default=DEFAULT_METHOD,
        help="; ".join(f"{name}: {method.summary}" for name, method in methods().items())
        + " (each method's own options are listed under it below)",
    )
    m.add_argument("--epochs", type=number(int, minimum=1), default=3, help="training epochs (default 3)")
    m.add_argument("--seed", type=int, default=0, help="seed of initialisation and sample order (default 0)")
    m.add_argument("--batch-size", type=number(int, minimum=1), default=8, help="samples per step (default 8)")
    m.add_argument("--lr", type=number(float, above=0), help=f"peak learning rate (default: {_default_lrs()})")
    m.add_argument("--weight-decay", type=number(float, minimum=0), default=0.0, help="AdamW weight decay (default 0)")
    m.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: the training steps' matrix products in bfloat16 (weights, optimizer and evaluation stay "
        "float32): faster on CPUs with bf16 instructions (AVX512-BF16, AMX) and GPUs, slower elsewhere; the "
        "README has the figures (default fp32)",
    )
    if launch:  # the peers of a collaborative run compute on their CPUs
        t.set_defaults(device="cpu")
    else:
        m.add_argument(
            "--device",
            default="cpu",
            metavar="DEVICE",
            help="where phase 1 and training compute: cpu (default), cuda or cuda:N (an NVIDIA GPU, a Jetson's), "
            "mps (Apple silicon), auto (a GPU if torch sees one, else the CPU), or lazy (torch's lazy-tensor "
            "backend on the CPU, standing in for a GPU in tests). Off the CPU: --method "
            + ", ".join(n for n, method in methods().items() if method.accelerates)
            + "; the data stays on the CPU, and the adapter is saved from it",
        )
    m.add_argument(
        "--holdout",
        type=number(float, above=0, below=1),
        help="fraction of the training data kept out of training; the adapter keeps the epoch with the best "
        "loss on it, so the validation set never picks (default 0.1 with --early-stopping, else 0)",
    )
    m.add_argument(
        "--early-stopping",
        type=number(int, minimum=0),
        default=0,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a better holdout loss (default 0: train every epoch)",
    )
    m.add_argument(
        "--retain-mix",
        type=number(int, minimum=0),
        default=0,
        metavar="N",
        help="lm: also train on the base model's own answers to N general prompts bundled with pac (up to 64), so "
        "the adapter keeps answering off-task as the base model does; `pac eval --retain` measures that on other "
        "prompts (default 0: off)",
    )
    _add_method_options(t)
    o = t.add_argument_group("cache and output")
    o.add_argument("--cache-dir", help="activation cache root (default: $PAC_HOME/cache, ~/.cache/pac/cache)")
    o.add_argument(
        "--cache-dtype",
        choices=["fp16", "bf16", "int8"],
        default="fp16",
        help="cache precision: fp16 (default), bf16 (huge activations), int8 (half the size)",
    )
    o.add_argument("--out", default="runs/adapter", help="output directory (default runs/adapter)")
    o.add_argument(
        "--checkpoint-every",
        type=number(int, minimum=0),
        default=0,
        help="also checkpoint every N steps (default 0: at the end of every epoch, and about every 5 minutes of "
        "work, counted in steps from the first steps' pace)",
    )
    again = o.add_mutually_exclusive_group()
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier run left in --out (without it, pac refuses to train a different run there)",
    )
    if launch:
        again.add_argument(
            "--resume",
            metavar="RUN_DIR",
            help="continue the run whose --out is RUN_DIR, however it stopped (this machine or a peer crashed, "
            "the network went down): its command line is read from RUN_DIR/launch.json, so give no other options; "
            "finished cache shards and checkpoints are found and reused",
        )
        return
    again.add_argument(
        "--resume",
        action="store_true",
        help="insist on continuing the interrupted run in --out (same model, data and options); an interrupted "
        "run also continues without it when started again the same way",
    )


PROFILE_HELP = """\
Before training: what one training step of a method costs on a model, measured on a synthetic batch of the
run's shape, each method in a fresh process. FLOPs per step split into forward, backward and the optimizer
step (torch's FlopCounterMode); memory at the step's peak by category: parameters, gradients, optimizer state,
activations, temporaries (torch's MemTracker), over the runtime's own floor; the predicted peak resident memory
of a training run; trainable against total parameters per layer type (depthwise, pointwise and standard
convolutions, linear maps...). A method that trains from the activation cache (parallel adapters, boundary)
is profiled on its phase-2 step; phase 1 adds one forward of the model per sample, once.

examples:
  pac profile --method lora                                   # the bundled SmolLM2, LoRA, batch 8 x 128 tokens
  pac profile --task image-classify --model mobilenet_v2 --compare lora,dora,galore,full,head-bn --out prof/
  pac profile --task image-classify --model resnet18 --compare lora,full --lora-r 4 --batch-size 64
"""


def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="what a training step of each method costs on a model (FLOPs, memory), before training",
        description=PROFILE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        help="a model as `pac train --model` takes it (default: bundled SmolLM2; image-classify: mobilenet_v2)",
    )
    p.add_argument("--task", choices=list(ALL_TASKS), default="classify", help="the run's task (default: classify)")
    p.add_argument("--max-length", type=number(int, minimum=2), default=128, help="tokens per sample (default 128)")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=8, help="samples per step (default 8)")
    p.add_argument("--method", choices=list(methods()), default=DEFAULT_METHOD, help="the method to profile")
    p.add_argument(
        "--compare",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        metavar="M1,M2,...",
        help="profile these methods side by side instead (a method option given applies to each that takes it)",
    )
    p.add_argument("--out", help="also write profile.json, profile.md and profile.png (a bar chart) here")
    _add_method_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pac", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pac {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what pac is doing")
    parser.add_argument(
        "--threads",
        type=number(int, minimum=1),
        help="CPU threads for torch (default: all cores, or one per core of a CPU quota: a container's --cpus)",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,generate,export,profile,report,peer,plan}"
    )

    t = sub.add_parser(
        "train",
        help="fine-tune an adapter (phase 1 cache build + phase 2 training)",
        description="Fine-tune an adapter and save it to --out.\n\n" + DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(t)

    add_profile_parser(sub)

    e = sub.add_parser(
        "eval",
        help="evaluate a saved adapter on the validation split",
        description="Evaluate an adapter from raw text (accuracy for classify, perplexity for lm).",
    )
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="directory written by `pac train --out`")
    which.add_argument(
        "--zero-shot",
        action="store_true",
        help="evaluate the untrained model: classify by label likelihood, lm by perplexity",
    )
    _add_data_args(e, evaluating=True)
    e.add_argument("--no-retrieval", action="store_true", help=NO_RETRIEVAL_HELP)
    e.add_argument(
        "--retain",
        action="store_true",
        help="instead of scoring data, measure how much the adapter changed the model off its training data: the "
        "base model's greedy answers to 50 general prompts bundled with pac, read through the adapter; reports the "
        "share of answer tokens where the adapter's top-1 token is the base model's (agreement), the mean "
        "KL(base || adapter) per token, and the share of answers it still gives word for word (answers_kept)",
    )
    e.add_argument(
        "--split",
        choices=["val", "all"],
        help="all: every row of --data; val: only the validation split `pac train` held out of it (same "
        "--split-seed and --val-size) (default: all for --data, val for the bundled corpus)",
    )

    g = sub.add_parser(
        "generate",
        help="generate text with a saved language-model adapter",
        description="Generate text with an adapter (KV caches for the model and the side network).",
    )
    g.add_argument("--adapter", help="directory written by `pac train --task lm --out` (without it: the base model)")
    g.add_argument(
        "--base",
        action="store_true",
        help="ask the base model without the adapter (--model, else the adapter's base model, else the bundled one)",
    )
    g.add_argument("--prompt", required=True, help="what to say to the model")
    g.add_argument("--model", help="base model, if not where the adapter was trained (default: the bundled one)")
    g.add_argument("--max-new-tokens", type=number(int, minimum=1), default=64, help="tokens to generate (default 64)")
    g.add_argument(
        "--temperature", type=number(float, minimum=0), default=0.0, help="0 = greedy (default); > 0 samples"
    )
    g.add_argument(
        "--top-p",
        type=number(float, above=0, maximum=1),
        default=0.9,
        help="with --temperature > 0: nucleus sampling mass, at most 1 (default 0.9)",
    )
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap the prompt in the model's chat template (--chat) or not (--no-chat) (default: as the adapter's "
        "prompt/completion rows were trained)",
    )
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-retrieval", action="store_true", help=NO_RETRIEVAL_HELP)

    p = sub.add_parser(
        "peer",
        help="serve as one device of a collaborative run (started by or for `pac-launch`)",
        description=PEER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", default="tcp://0.0.0.0:29600", help="ZeroMQ endpoint (default tcp://0.0.0.0:29600)")
    p.add_argument("--name", default=socket.gethostname(), help="this device's name in the run (default: hostname)")
    p.add_argument("--max-mem", type=_size, help="memory this device may use, e.g. 4g (default: all of it)")
    p.add_argument(
        "--device",
        default=os.environ.get(DEVICE_ENV, "cpu"),
        metavar="DEVICE",
        help="where this peer's data-parallel phase 2 computes (--mode replicated or shuffle; methods as for `pac "
        "train --device`): cpu, cuda, cuda:N, mps, auto or lazy; phase 1 and pipelined stages run on the CPU "
        f"(default: ${DEVICE_ENV}, else cpu)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=argparse.SUPPRESS,
        help="CPU threads for torch (default: all cores, or a CPU quota's)",
    )
    p.add_argument("--work-dir", help="where this peer keeps its outputs and log (default: $PAC_HOME/peers/NAME)")
    p.add_argument(
        "--coordinator-timeout",
        type=number(float, above=0),
        default=60.0,
        help="abandon a run after this many seconds without a word from its coordinator (default 60)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="serve one run, then exit with its outcome (how `pac-launch --local` and `--ssh` start peers); "
        "by default the agent serves run after run until stopped, as a service does",
    )
    p.add_argument(
        "--no-advertise",
        dest="advertise",
        action="store_false",
        help="do not announce this peer on the network's mDNS (`pac-launch --discover` finds advertised peers; "
        "the announcement carries its name, port, pac version and a device summary, never the join token)",
    )
    p.add_argument(
        "--phase1-only",
        action="store_true",
        help="run only this device's layers of the backbone in phase 1 (the activation cache) and train nothing: "
        "for a device that cannot train, such as a phone (deploy/android-termux.md); the planner then gives it "
        "layers in shuffle mode and no samples, and phase 2 goes on without it",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="show what this device measured for the runs it was profiled for (kept in $PAC_HOME/profiles; a "
        "coordinator planning a run asks for them, `pac-launch --refresh-profiles` measures again) and exit",
    )
    x = sub.add_parser(
        "export",
        help="write an adapter merged into its base model, as transformers loads it (taskedge, lora, dora, full)",
        description="Merge an adapter's changes into its base model's weights and save the model (safetensors, "
        "config, tokenizer) where `AutoModelForCausalLM.from_pretrained(OUT)` loads it; a classification "
        "adapter's head is saved beside it.",
    )
    x.add_argument("--adapter", required=True, help="directory written by `pac train --out`")
    x.add_argument("--out", required=True, help="directory for the merged model")
    x.add_argument("--model", help="base model, if not where the adapter was trained")
    r = sub.add_parser(
        "report",
        help="draw a run's curves, phases per peer, memory and traffic as PNGs, with a markdown summary",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="the --out of a `pac train` or `pac-launch` run")
    r.add_argument("--out", metavar="DIR", help="where to write the pictures and report.md (default: RUN_DIR/report)")
    sub.add_parser(
        "plan",
        help="plan a collaborative run without running it: `pac plan --peers hosts.txt [pac-launch options]`",
        add_help=False,
    )
    return parser


REPORT_HELP = """\
Draw a finished, failed or still running run from the files in its directory, as PNGs a person would rather
look at than read, and a short report.md that names them:

  curves.png     training and validation loss per epoch (validation accuracy beside it for classify),
                 each step's loss faintly behind
  timeline.png   who was busy when: a row per peer coloured by phase, the run's states on top
  memory.png     resident memory per peer over time
  traffic.png    bytes each peer sent, over time and by phase (phase 1, phase 2, the gradient all-reduce)

The last three need a collaborative run (`pac-launch` writes timeline.jsonl and each peer's counters); a
`pac train` run on one device gets its curves and the summary, and report.md says what is absent and why.
Nothing is trained or loaded: it takes a second or two.

examples:
  pac report runs/adapter                     # writes runs/adapter/report/{curves.png,report.md}
  pac report runs/home --out /tmp/home-report # a pac-launch run, drawn elsewhere
"""

PEER_HELP = """\
Serve as one device of collaborative runs: listen for a coordinator (`pac-launch`), prove the
join token, run the layers and samples it assigns, send the results, and wait for the next run
(`--once`: exit after one). A run whose coordinator falls silent is abandoned; the cache stays.
deploy/pac-peer.service runs the agent as a systemd service.

The join token comes from the environment variable PAC_JOIN_TOKEN (never from the command line,
where other users of this machine could read it). Start this on every device, then run
`pac-launch --peers hosts.txt` on the one that holds the data:

  export PAC_JOIN_TOKEN=...            # the same secret on every device
  pac peer --name laptop --max-mem 4g  # listens on tcp://0.0.0.0:29600
"""


# `pac peer`'s exit codes, as the agent reports a run's end.
PEER_OUTCOMES = {0: "done", 1: "it failed", 2: "refused by the coordinator", 3: "the coordinator was lost"}


def _size(text: str) -> int:
    from pac.net.hosts import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_peer(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.profile:
        from pac.runtime.profiler import describe_profiles

        print(describe_profiles())
        return 0

    from pac.models.loading import pac_home
    from pac.net.auth import token_from_env
    from pac.runtime.device import resolve_device
    from pac.runtime.peer import PeerAgent, PeerSettings

    work_dir = Path(args.work_dir) if args.work_dir else pac_home() / "peers" / args.name
    work_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(work_dir / "peer.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    settings = PeerSettings(
        listen=args.listen,
        name=args.name,
        token=token_from_env(),
        work_dir=work_dir,
        max_mem=args.max_mem,
        threads=args.threads,
        coordinator_timeout=args.coordinator_timeout,
        stays=not args.once,
        advertise=args.advertise,
        phase1_only=args.phase1_only,
        device=str(resolve_device(args.device)),  # refused now, not when a run comes
    )
    code = PeerAgent(settings).serve()
    # A worker thread may still sit in a collective whose peers are gone (the run failed elsewhere): leave
    # without waiting for it; everything worth keeping (the cache, the profiles) is on disk or already sent.
    # An agent that stays starts afresh in the same process (same pid, for a service manager), not stuck
    # behind that thread or the run's process group.
    logging.shutdown()
    if not args.once:
        print(
            f"pac peer {args.name}: the run is over ({PEER_OUTCOMES.get(code, code)}); serving the next one", flush=True
        )
        time.sleep(1.0)  # a run that ends at once cannot spin the agent
        os.execv(sys.executable, sys.orig_argv)
    sys.stdout.flush()
    os._exit(code)


def train_options(args: argparse.Namespace):
    """TrainOptions from the flags of `add_train_arguments`; a method option given for another method is refused,
    naming the methods it belongs to."""
    from dataclasses import replace

    from pac.runconfig import CacheOptions, OptimOptions, TrainOptions

    method = get_method(args.method)
    keys, given = method.option_keys(), getattr(args, GIVEN, set())
    for other in methods().values():
        for key in other.option_keys():
            if key not in keys and key in given:
                owners = [n for n, m in methods().items() if key in m.option_keys()]
                flag = next(option_flag(f) for f in fields(other.options) if option_key(f) == key)
                raise PacError(
                    f"{flag} is an option of --method {' / '.join(owners)}, not of {args.method}: drop it, or "
                    f"pass --method {owners[0]}"
                )
    chosen = {field: getattr(args, key) for key, field in keys.items() if key in given}
    holdout = args.holdout if args.holdout is not None else (0.1 if args.early_stopping else 0.0)
    return TrainOptions(
        model=args.model,
        data=replace(_data_options(args), holdout=holdout, retain_mix=args.retain_mix),
        method=args.method,
        method_options=method.options(**chosen),
        optim=OptimOptions(**{f.name: getattr(args, f.name) for f in fields(OptimOptions)}),
        cache=CacheOptions(dir=args.cache_dir, dtype=args.cache_dtype),
        out=args.out,
        checkpoint_every=args.checkpoint_every,
        resume=True,  # a run's own checkpoints always resume it; --resume insists that there are some
        overwrite=args.overwrite,
        require_resume=args.resume is True,  # pac-launch's --resume names a run directory instead
        device=args.device,
    )


def print_epochs(epochs: list[dict]) -> None:
    """One line per epoch of a training summary (`pac-launch`; `pac train` prints each as it ends)."""
    from pac.runtime.progress import epoch_line

    trained = len([e for e in epochs if e["epoch"]])
    for ep in epochs:
        print(epoch_line(ep, trained))


def cmd_train(args: argparse.Namespace) -> int:
    from pac.workflow import train

    opts = train_options(args)
    summary = train(opts, report=print)
    if summary.get("already_trained"):
        print_epochs(summary["epochs"])
    print(
        f"\n{opts.method} on {summary['train_samples']} samples, {summary['trainable_params']:,} trainable parameters"
    )
    if "cache_build_seconds" in summary:
        print(
            f"cache build: {sum(summary['cache_build_seconds'].values()):.1f} s, "
            f"{summary['cache_bytes_per_sample'] / 1e6:.2f} MB/sample ({summary['cache_dtype']})"
        )
    if "retrieval" in summary:
        r = summary["retrieval"]
        print(
            f"with retrieval from {r['tokens']:,} training tokens (weight {r['weight']}, temperature "
            f"{r['temperature']:.3g}, {r['file_mb']:.0f} MB)"
            + (f": val_perplexity {r['val_perplexity']:.4f}" if "val_perplexity" in r else "")
        )
    if "shortlist" in summary:
        s = summary["shortlist"]
        made = f"built in {s['seconds']:.1f} s" if s["built_files"] else "from an earlier run"
        print(f"shortlists of {s['size']} words per training token: {s['mb']:.0f} MB beside the cache, {made}")
    if "best_epoch" in summary:
        print(f"kept epoch {summary['best_epoch']} (best loss on {summary['holdout_samples']} held-out samples)")
    if summary.get("already_trained"):
        print(f"nothing trained: the adapter in {args.out}/ is that run's")
    else:
        print(f"peak memory {summary['peak_rss_mb']:.0f} MB; adapter saved to {args.out}/")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pac.workflow import (
        adapter_meta,
        default_split,
        evaluate_adapter,
        evaluate_retain,
        evaluate_zero_shot,
        evaluation_records,
        load_for_inference,
        prompt_chat,
    )

    if args.retain:
        if args.zero_shot:
            raise PacError("--retain compares an adapter with its base model: pass --adapter instead of --zero-shot")
        loaded = load_for_inference(args.adapter, args.model, not args.no_retrieval)
        print(json.dumps(evaluate_retain(loaded, prompt_chat(args.chat, loaded)), indent=2))
        return 0
    meta = {} if args.zero_shot else adapter_meta(args.adapter)
    opts = _data_options(args, meta.get("data_fields"))
    if not args.zero_shot:
        opts.task = meta["task"]  # the adapter's own; --task is for --zero-shot
    split = default_split(opts, args.split)
    if args.zero_shot:
        result = evaluate_zero_shot(args.model, opts, split)
    else:
        records = evaluation_records(opts, split)  # read and checked before the model loads
        loaded = load_for_inference(args.adapter, args.model, not args.no_retrieval)
        result = evaluate_adapter(loaded, opts, split, records)
    source = "the bundled corpus" if opts.data is None else opts.data
    which = "every row" if split == "all" else "the validation split (--split val)"
    print(f"scored {result['samples']} rows of {source}: {which}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pac.generate import encode_prompt
    from pac.workflow import generate_answer, load_base, load_for_inference, prompt_chat

    if args.base or args.adapter is None:
        loaded = load_base(args.model, args.adapter)
    else:
        loaded = load_for_inference(args.adapter, args.model, not args.no_retrieval)
    chat = prompt_chat(args.chat, loaded)
    ids = encode_prompt(loaded.tokenizer, args.prompt, chat=chat)
    out = generate_answer(loaded, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    text = loaded.tokenizer.decode(out[0], skip_special_tokens=True)
    print(text)
    if not text.strip() and not chat:  # an instruct model given a bare question in plain text often ends at once
        print(
            "pac: the model generated nothing (it ended at once): the prompt went in as plain text, which the "
            "model continues (as the adapter was trained); start the text you want continued, or pass --chat to "
            "ask in the chat template",
            file=sys.stderr,
        )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from pac.runconfig import DataOptions, OptimOptions, TrainOptions
    from pac.runtime.step_profile import layer_type_table, profile_methods, profile_table, with_method, write_profiles

    names = args.compare or [args.method]
    for name in names:
        get_method(name)  # an unknown name is refused before anything is measured
    given = {key: getattr(args, key) for key in getattr(args, GIVEN, set())}
    base = TrainOptions(
        model=args.model,
        data=DataOptions(task=args.task, max_length=args.max_length),
        optim=OptimOptions(batch_size=args.batch_size),
    )
    runs = [with_method(base, name, given) for name in names]
    for run in runs:
        get_method(run.method).resolved(run.method_options, args.task)  # refuses a task the method lacks
    print(f"pac: profiling {', '.join(names)}, each in a fresh process (a few training steps)", file=sys.stderr)
    profiles = profile_methods(runs)
    print(profile_table(profiles) + "\n\n" + layer_type_table(profiles))
    if args.out:
        written = write_profiles(profiles, Path(args.out))
        print(f"pac: wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pac.workflow import export_merged

    written = export_merged(args.adapter, args.out, args.model)
    print(f"pac: wrote {written['method']} merged into its base model to {written['out']}", file=sys.stderr)
    print(json.dumps(written, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pac.report import write_report

    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Progress lines reach a log file as they are printed, not when a block buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # the coordinator's planning alone: pac-launch's options, without the run
        from launcher.main import main as launch

        return launch([*argv[1:], "--plan-only"])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad option (code 2, message printed) or --help / --version (0)
        return int(exc.code or 0)
    except PacError as exc:  # a plug-in method ($PAC_METHODS) that cannot load
        print(f"pac: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "report":  # reads files and draws: no torch to load, no threads to set
        return _reporting_errors(cmd_report, args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: a second's work that pac's own lines cover

    from pac.runtime.cgroup import quota_threads

    threads = args.threads or quota_threads()
    if threads:
        torch.set_num_threads(threads)
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "export": cmd_export,
        "profile": cmd_profile,
        "peer": cmd_peer,
    }
    return _reporting_errors(commands[args.command], args)


def _reporting_errors(command: Any, args: argparse.Namespace) -> int:
    """Run a command; a PacError (what the user did wrong and what to do) is printed, exit code 2."""
    try:
        return command(args)
    except PacError as exc:
        print(f"pac: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
