"""How many directions does a language-model adapter need? The rank of LoRA's correction.

A parallel adapter corrects the final-normed hidden state z = final_norm(h_L) before the LM head; with a
linear Up of the side state, every correction lies in one fixed subspace of d/r directions (72 of 576 on
SmolLM2 at r = 8). This measures what that costs, on the quality harness's own split and LoRA adapter:

    delta = z_LoRA - z_base          (per token, from the trained LoRA adapter and the frozen model)
    mean cross-entropy of head(z_base + mu + P_k (delta - mu))

where mu is the mean correction and P_k projects onto the top k principal directions of the corrections on
training articles (an oracle: the best any rank-k linear read-out could do if it predicted LoRA's correction
perfectly). k = d is LoRA itself, k = 0 the mean shift alone. The share is of LoRA's log-perplexity gain.

Run after the quality harness has trained its LoRA LM adapter:
    python benchmarks/readout_rank.py [--adapter benchmarks/.work/quality/lm/train400-val400-epochs3/lora/seed0]
About 4 minutes on 2 CPU cores. Writes benchmarks/results/readout_rank.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pac.data.tokenize import tokenize_records  # noqa: E402
from pac.models.backbone import load_backbone  # noqa: E402
from pac.workflow import DataOptions, load_for_inference, read_records, split_data  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RANKS = (0, 8, 36, 72, 144, 288)


def corrections(adapter, base, records) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base final-normed states, LoRA's corrections of them and the next-token targets, over real tokens."""
    data = tokenize_records(records, adapter.tokenizer, task="lm", max_length=adapter.max_length)
    inner = adapter.model.peft.get_base_model().model  # LoRA injected; its last_hidden_state is final-normed
    states, deltas, targets = [], [], []
    with torch.inference_mode():
        for start in range(0, len(data), 8):
            ids, mask = data.input_ids[start : start + 8], data.attention_mask[start : start + 8]
            z_base = base.final_norm(base(ids, mask, taps=()).hidden)
            z_lora = inner(input_ids=ids, attention_mask=mask).last_hidden_state
            labels = data.labels[start : start + 8][:, 1:]
            keep = labels != -100
            states.append(z_base[:, :-1][keep])
            deltas.append((z_lora - z_base)[:, :-1][keep])
            targets.append(labels[keep])
    return torch.cat(states), torch.cat(deltas), torch.cat(targets)


def cross_entropy(head: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, len(hidden), 2048):
        rows = slice(start, start + 2048)
        total += torch.nn.functional.cross_entropy(hidden[rows] @ head.T, targets[rows], reduction="sum").item()
    return total / len(hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--adapter", type=Path, default=ROOT / "benchmarks/.work/quality/lm/train400-val400-epochs3/lora/seed0"
    )
    ap.add_argument("--fit-articles", type=int, default=160, help="training articles whose corrections give P_k")
    ap.add_argument("--eval-articles", type=int, default=120, help="validation articles scored")
    args = ap.parse_args()
    if not (args.adapter / "pac_lora.json").exists():
        sys.exit(f"{args.adapter} holds no LoRA adapter: run `python benchmarks/quality.py --task lm --configs lora`")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    adapter = load_for_inference(args.adapter)
    opts = DataOptions(task="lm", max_length=adapter.max_length, val_size=400, train_size=400, seed=0)
    train, val = split_data(opts, read_records(opts))  # the quality harness's split
    base = load_backbone(adapter.model_dir)
    head = base.lm_head.weight
    _, fit_deltas, _ = corrections(adapter, base, train[: args.fit_articles])
    states, deltas, targets = corrections(adapter, base, val[: args.eval_articles])
    mean = fit_deltas.mean(0)
    _, singular, directions = torch.linalg.svd(fit_deltas - mean, full_matrices=False)
    energy = (singular**2).cumsum(0) / (singular**2).sum()
    zero, lora = cross_entropy(head, states, targets), cross_entropy(head, states + deltas, targets)
    rows = []
    for k in (*RANKS, states.shape[1]):
        projection = directions[:k].T @ directions[:k]
        ce = cross_entropy(head, states + mean + (deltas - mean) @ projection, targets)
        rows.append(
            {
                "rank": k,
                "cross_entropy": ce,
                "perplexity": float(torch.tensor(ce).exp()),
                "share_of_lora_gain": (zero - ce) / (zero - lora),
                "variance_kept": float(energy[k - 1]) if k else 0.0,
            }
        )
        print(rows[-1], flush=True)
    result = {
        "adapter": str(args.adapter.relative_to(ROOT) if args.adapter.is_relative_to(ROOT) else args.adapter),
        "fit_tokens": len(fit_deltas),
        "eval_tokens": len(states),
        "base_cross_entropy": zero,
        "lora_cross_entropy": lora,
        "ranks": rows,
    }
    (RESULTS / "readout_rank.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# The rank of LoRA's correction of the final hidden state (SmolLM2-135M-Instruct, BBC News LM)",
        "",
        f"LoRA's correction projected onto its top-k principal directions (fitted on {len(fit_deltas)} training "
        f"tokens), scored on {len(states)} validation tokens. Base perplexity {torch.tensor(zero).exp():.2f}, "
        f"LoRA {torch.tensor(lora).exp():.2f} (the first {len(val[: args.eval_articles])} validation articles of the "
        "quality harness's split, so not its 400-article figures).",
        "",
        "| rank k | perplexity | share of LoRA's log-perplexity gain | variance kept |",
        "|---|---|---|---|",
        *(
            f"| {r['rank']} | {r['perplexity']:.2f} | {r['share_of_lora_gain']:.0%} | {r['variance_kept']:.0%} |"
            for r in rows
        ),
        "",
        "A linear Up of a d/8 side state reaches at most the k = 72 row; a read-out MLP is not so confined.",
    ]
    (RESULTS / "readout_rank.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
