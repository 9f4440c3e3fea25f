"""Fairness check for retrieval: LoRA with the same memory of the training tokens as the LM default.

pac's language-model default mixes a memory of the training tokens (pac.models.retrieval) into the side
network's distribution. The memory does not care what model it is mixed into, so the comparison with LoRA
is only fair if LoRA gets it too: this script mixes it into a trained LoRA adapter, fit the same way (64
training articles, each against the other articles' keys), and scores the validation articles.

    python benchmarks/retrieval_lora.py --adapter benchmarks/.work/quality/lm/train400-val400-epochs3/lora/seed1

Writes benchmarks/results/retrieval_lora.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pac.models.backbone import load_backbone, load_config
from pac.models.retrieval import TokenMemory, next_token_rows
from pac.runtime.cache_build import build_cache
from pac.runtime.sources import CachedTaps, Tokens
from pac.workflow import DataOptions, load_for_inference, prepare_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def token_scores(lora, tokens: Tokens, cached: CachedTaps, norm, rows: list[int]):
    """LoRA's log p of every real next token of `rows`, with its query final_norm(h_L), target and row."""
    log_probs, queries, targets, owners = [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(rows), 8):
            chunk = rows[start : start + 8]
            cache = cached.batch(chunk)
            labels = cache["labels"]
            target, logits, query, owner = next_token_rows(
                labels,
                lora.forward_batch(tokens.batch(chunk)).float(),
                norm(cache["taps"][:, -1]),
                torch.tensor(chunk)[:, None].expand_as(labels),
            )
            log_probs.append(torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1))
            queries.append(query)
            targets.append(target)
            owners.append(owner)
    return torch.cat(log_probs), torch.cat(queries), torch.cat(targets), torch.cat(owners)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True, help="a LoRA LM adapter from benchmarks/quality.py")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks/.work/quality/cache")
    ap.add_argument("--fit-samples", type=int, default=64)
    args = ap.parse_args()
    options = json.loads((args.adapter / "summary.json").read_text())["options"]
    data = prepare_data(None, DataOptions(**options["data"]))
    lora = load_for_inference(args.adapter).model
    layers = load_config(data.model_dir).num_hidden_layers
    norm = load_backbone(data.model_dir, layers, layers, with_head=True).final_norm
    train, val = (
        CachedTaps(build_cache(data.model_dir, part, args.cache_dir, [layers]).open())
        for part in (data.train, data.val)
    )
    started = time.perf_counter()
    memory = TokenMemory.from_source(train, norm)
    fit_rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.fit_samples].tolist()
    memory.fit(*token_scores(lora, Tokens(data.train), train, norm, fit_rows))
    log_probs, queries, targets, _ = token_scores(lora, Tokens(data.val), val, norm, list(range(len(val))))
    mixed = memory.mix_target(log_probs, *memory.search(queries), targets)
    result = {
        "adapter": str(args.adapter),
        "lora_val_perplexity": math.exp(-log_probs.mean().item()),
        "with_memory_val_perplexity": math.exp(-mixed.mean().item()),
        **memory.settings(),
        "tokens": len(memory.keys),
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrieval_lora.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| model | val perplexity | with the memory of the training tokens | weight, temperature |\n|---|---|---|---|\n"
        f"| LoRA r=8 ({args.adapter.name}) | {result['lora_val_perplexity']:.3f} | "
        f"{result['with_memory_val_perplexity']:.3f} | {memory.weight}, {memory.temperature:.3g} |\n"
    )
    (RESULTS / "retrieval_lora.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
