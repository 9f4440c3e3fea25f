"""Forgetting: what fine-tuning on narrow data does to the model off that data (issue 19, point 4).

Two settings on the bundled SmolLM2-135M-Instruct, each with parallel adapters (the LM default, with its
memory of the training tokens) and LoRA r=8:
  facts  benchmarks/data/facts.jsonl: 48 fictional prompt/completion facts ("What is the capital of
         Zorbania?" -> "Quillport."), 8 epochs, as the user of issue 19 trained them (default split: 10% held out)
  bbc    the bundled BBC News, --task lm, 100 training articles (so LoRA stays affordable on 2 cores), 3 epochs
Every adapter is trained with `pac train` in its own process, then measured in another one:
  retain       `pac eval --retain` (pac.retain): the base model's greedy answers to 50 general prompts,
               teacher-forced through the adapter: top-1 agreement, KL(base || adapter) per token, answers kept
  fact recall  facts: greedy `pac generate` on each training prompt starts with its completion
  perplexity   bbc: validation perplexity as `pac train` reported it (with the memory where the row has it)
  France       what the adapter answers to "What is the capital of France?" (the symptom of issue 19)
Rows "memory off" are the same parallel adapter used with `--no-retrieval`; rows "+ mix N" train with
`--retain-mix N` (the base model's own answers to N general prompts mixed into training).

    python benchmarks/forgetting.py             # every run not yet in results/forgetting.json, then the tables
    python benchmarks/forgetting.py --redo facts/lora    # those runs again
    python benchmarks/forgetting.py --report    # the tables from what is recorded

Writes benchmarks/results/forgetting.json and forgetting.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "forgetting"
FACTS = HERE / "data" / "facts.jsonl"
FRANCE = "What is the capital of France?"
SETTINGS = {
    "facts": ["--task", "lm", "--data", str(FACTS), "--epochs", "8"],
    "bbc": ["--task", "lm", "--train-size", "100", "--epochs", "3"],
}


@dataclass
class Run:
    setting: str
    label: str
    train: list[str] = field(default_factory=list)  # `pac train` options beyond the setting's
    retrieval: bool = True  # False: the adapter used without its memory (--no-retrieval)
    adapter_of: str | None = None  # use the adapter another run trained (same weights, other inference options)


RUNS: dict[str, Run] = {
    "facts/base": Run("facts", "base model (no adapter)"),
    "facts/parallel-adapters": Run("facts", "parallel adapters (LM default)"),
    "facts/parallel-adapters-no-memory": Run(
        "facts", "parallel adapters, memory off", retrieval=False, adapter_of="facts/parallel-adapters"
    ),
    "facts/lora": Run("facts", "LoRA r=8", ["--method", "lora"]),
    "bbc/base": Run("bbc", "base model (no adapter)"),
    "bbc/parallel-adapters": Run("bbc", "parallel adapters (LM default)"),
    "bbc/parallel-adapters-no-memory": Run(
        "bbc", "parallel adapters, memory off", retrieval=False, adapter_of="bbc/parallel-adapters"
    ),
    "bbc/lora": Run("bbc", "LoRA r=8", ["--method", "lora"]),
    "facts/parallel-adapters-mix32": Run("facts", "parallel adapters + mix 32", ["--retain-mix", "32"]),
    "bbc/parallel-adapters-mix32": Run("bbc", "parallel adapters + mix 32", ["--retain-mix", "32"]),
    "facts/lora-mix32": Run("facts", "LoRA r=8 + mix 32", ["--method", "lora", "--retain-mix", "32"]),
}


def adapter_dir(name: str) -> Path:
    return WORK / (RUNS[name].adapter_of or name)


def train(name: str) -> dict:
    """`pac train` for the run, in its own process; returns its wall time and summary."""
    run, out = RUNS[name], adapter_dir(name)
    cmd = [sys.executable, "-m", "pac.cli", "train", *SETTINGS[run.setting], *run.train]
    cmd += ["--out", str(out), "--cache-dir", str(WORK / "cache"), "--overwrite"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return {"train_seconds": time.perf_counter() - started, "command": " ".join(["pac", *cmd[3:]])}


def training_facts() -> list[tuple[str, str]]:
    """The (prompt, completion) rows of facts.jsonl that `pac train` trains on (its default split)."""
    from pac.workflow import DataOptions, read_records, split_data

    opts = DataOptions(data=str(FACTS), task="lm")
    trained, _ = split_data(opts, read_records(opts))
    return [(r.prompt, r.completion) for r in trained]


def measure(name: str) -> dict:
    """Retain figures, fact recall and the answer to FRANCE for one run (in this process)."""
    from pac.generate import encode_prompt
    from pac.workflow import (
        DataOptions,
        evaluate_retain,
        evaluate_zero_shot,
        generate_answer,
        load_base,
        load_for_inference,
        prompt_chat,
    )

    run = RUNS[name]
    base = name.endswith("/base")
    loaded = load_base() if base else load_for_inference(adapter_dir(name), retrieval=run.retrieval)

    chat = prompt_chat(None, loaded)  # as `pac generate` prompts it: the adapter's recorded format

    def answer(prompt: str, max_new_tokens: int = 24) -> str:
        ids = encode_prompt(loaded.tokenizer, prompt, chat)
        return loaded.tokenizer.decode(generate_answer(loaded, ids, max_new_tokens)[0], skip_special_tokens=True)

    result: dict = {"france": answer(FRANCE).strip()}
    if not base:
        result["retain"] = evaluate_retain(loaded, chat)
    elif run.setting == "bbc":
        result["val_perplexity"] = evaluate_zero_shot(None, DataOptions(task="lm", train_size=100))["perplexity"]
    if run.setting == "facts":
        facts = training_facts()
        recalled = [answer(p, 16).strip().startswith(c.strip()) for p, c in facts]
        result["fact_recall"] = sum(recalled) / len(facts)
        result["facts"] = len(facts)
    return result


def collect(name: str, redo: bool) -> dict:
    run = RUNS[name]
    record: dict = {}
    if not name.endswith("/base"):
        summary_file = adapter_dir(name) / "summary.json"
        if run.adapter_of is None and (redo or not summary_file.exists()):
            record.update(train(name))
        summary = json.loads(summary_file.read_text())
        record["epoch_seconds"] = [e["epoch_seconds"] for e in summary["epochs"] if e["epoch"] > 0]
        if run.setting == "bbc":
            memory = summary.get("retrieval") if run.retrieval else None
            record["val_perplexity"] = memory["val_perplexity"] if memory else summary["epochs"][-1]["val_perplexity"]
    cmd = [sys.executable, __file__, "--measure", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    record.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return record


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def report(results: dict) -> str:
    lines = [
        "# Forgetting: what an adapter changes off its training data",
        "",
        "`python benchmarks/forgetting.py` (SmolLM2-135M-Instruct, bundled). Retain: the base model's greedy answers "
        "(up to 48 tokens) to 50 general prompts bundled with pac, teacher-forced through the adapter (`pac eval "
        "--retain`): agreement = share of answer tokens where the adapter's top-1 token is the base model's; KL = "
        "mean KL(base || adapter) per answer token, nats; kept = share of the 50 answers greedy decoding with the "
        "adapter still gives token for token. The base model scores 1 / 0 / 1 by definition.",
        "",
    ]
    for setting, quality, title in (
        ("facts", "fact recall", "48 fictional facts, 8 epochs"),
        ("bbc", "val perplexity", "BBC News language modelling, 100 training articles, 3 epochs"),
    ):
        rows = [(n, r) for n, r in RUNS.items() if r.setting == setting and n in results]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            f'| configuration | {quality} | agreement | KL | kept | s/epoch | "{FRANCE}" |',
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in rows:
            rec, retain = results[name], results[name].get("retain", {})
            if setting == "facts":
                q = f"{rec['fact_recall']:.2f} ({round(rec['fact_recall'] * rec['facts'])}/{rec['facts']})"
            else:
                q = _cell(rec.get("val_perplexity"), 2)
            epochs = rec.get("epoch_seconds")
            seconds = f"{sorted(epochs)[len(epochs) // 2]:.1f}" if epochs else "—"
            france = rec["france"].replace("|", "/").replace("\n", " ")
            agreement, kl, kept = (retain.get(k) for k in ("agreement", "kl", "answers_kept"))
            lines.append(
                f"| {run.label} | {q} | {_cell(agreement)} | {_cell(kl)} | {_cell(kept, 2)} | {seconds} | {france} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="which runs (default: all)")
    ap.add_argument("--redo", nargs="*", default=[], choices=list(RUNS), help="run these again")
    ap.add_argument("--report", action="store_true", help="only write the tables from what is recorded")
    ap.add_argument("--measure", choices=list(RUNS), help=argparse.SUPPRESS)  # the child process of one run
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    store = RESULTS / "forgetting.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.report:
        for name in [*args.runs, *(n for n in args.redo if n not in args.runs)]:
            if name in results and name not in args.redo:
                continue
            print(f"--- {name}", flush=True)
            results[name] = collect(name, redo=name in args.redo)
            store.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "forgetting.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
