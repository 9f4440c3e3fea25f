"""Zero-shot classification by label likelihood: the untrained baseline.

The article (truncated to max_length tokens) is followed by a plain prompt; each class name is
scored by the mean log-probability of its tokens after the prompt, and the most likely one wins.
The prefix runs once; its KV cache is repeated for the class names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from pac.models.backbone import CACHE_ARG

PROMPT = "\n\nTopic of the article above (one word):"


@torch.inference_mode()
def zero_shot_predict(model, tokenizer, texts: list[str], label_names: list[str], max_length: int) -> list[int]:
    """Index into `label_names` of the most likely label for each text (decoder LMs)."""
    suffix = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    label_ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in label_names]
    width = max(len(ids) for ids in label_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cont = torch.tensor([ids + [pad] * (width - len(ids)) for ids in label_ids])
    cont_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in label_ids])
    predictions = []
    for text in tqdm(texts, desc="zero-shot", unit="sample", leave=False, disable=None):
        body = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        prefix = torch.tensor([body + suffix])
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prefix, use_cache=True, **{CACHE_ARG: cache})
        first = F.log_softmax(out.logits[0, -1].float(), -1)  # predicts each label's first token
        cache.batch_repeat_interleave(len(label_names))
        mask = torch.cat([torch.ones(len(label_names), prefix.shape[1], dtype=torch.long), cont_mask], 1)
        rest = F.log_softmax(model(input_ids=cont, attention_mask=mask, **{CACHE_ARG: cache}).logits.float(), -1)
        scores = []
        for k, ids in enumerate(label_ids):
            logp = first[ids[0]] + sum(rest[k, j - 1, ids[j]] for j in range(1, len(ids)))
            scores.append(float(logp) / len(ids))
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions
