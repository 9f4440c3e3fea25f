"""Shared fixtures: tiny real models (built from a config, saved as safetensors with a trained
tokenizer) for both families, tiny data sets on disk, and the bundled SmolLM2 for the slow tests."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runs that plan measure their peers; the profiles stay out of the user's $PAC_HOME (the peers inherit this).
os.environ.setdefault("PAC_PROFILES", tempfile.mkdtemp(prefix="pac-test-profiles-"))

WORDS = [
    "the",
    "market",
    "shares",
    "rose",
    "as",
    "the",
    "bank",
    "cut",
    "rates",
    "football",
    "team",
    "won",
    "the",
    "cup",
    "final",
    "match",
    "goal",
    "new",
    "phone",
    "chip",
    "software",
    "launch",
    "film",
    "star",
    "music",
    "award",
    "show",
    "minister",
    "election",
    "vote",
    "party",
]
TOPICS = {
    "business": "market shares rose bank cut rates",
    "sport": "football team won cup final match goal",
    "tech": "new phone chip software launch",
}


def run_ranks(child: str, world: int, out: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """`child` (Python source) in `world` processes of a real gloo group over loopback, each given its rank, the
    port of a TCPStore held here, `out` and this folder as argv; fails with their output unless all exit 0."""
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    here = str(Path(__file__).parent)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(rank), str(store.port), str(out), here],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    for proc in children:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            raise
    assert all(c.returncode == 0 for c in children), "\n".join(logs)


def train_argv(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """`pac train` argv on a tiny model: 2 epochs, 12 validation rows, and width d/4 for the methods that have a
    side network (LoRA refuses --reduction); `extra` comes last, so it overrides."""
    method = extra[extra.index("--method") + 1] if "--method" in extra else "parallel-adapters"
    width = ["--reduction", "4"] if method in ("parallel-adapters", "boundary") else []
    where = ["--model", str(model), "--data", str(data), "--out", str(out), "--cache-dir", str(cache)]
    return ["train", *where, *width, "--epochs", "2", "--val-size", "12", *extra]


def eval_on_validation(adapter: Path, model: Path, data: Path) -> list[str]:
    """`pac eval` argv scoring the validation split that `pac train --val-size 12` held out of `data`."""
    where = ["--model", str(model), "--data", str(data), "--val-size", "12", "--split", "val"]
    return ["eval", "--adapter", str(adapter), *where]


def _tokenizer(vocab_corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(vocab_corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<s>")


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer([" ".join(WORDS)] * 4)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer([" ".join(WORDS)] * 4)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save(BertModel(config), tokenizer, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=["llama", "bert"])
def tiny_model(request, tiny_llama, tiny_bert) -> Path:
    return {"llama": tiny_llama, "bert": tiny_bert}[request.param]


@pytest.fixture(scope="session")
def topic_jsonl(tmp_path_factory) -> Path:
    """60 labelled rows of three separable topics, some short enough to need padding."""
    rng = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    with path.open("w") as f:
        for i in range(60):
            label = list(TOPICS)[i % 3]
            words = TOPICS[label].split()
            n = 3 + int(torch.randint(0, 12, (1,), generator=rng))
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=rng))
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once to safetensors (~20 s the first time)."""
    from pac.models.loading import resolve_model

    return resolve_model(None)
