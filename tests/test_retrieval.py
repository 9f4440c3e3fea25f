"""The token memory (kNN-LM over the activation cache): search, mixing, fitting, files."""

from __future__ import annotations

import math

import pytest
import torch

from pac.errors import PacError
from pac.models import retrieval
from pac.models.retrieval import RETRIEVAL_FILE, TokenMemory, target_log_probs


def _memory(n: int = 300, d: int = 16, vocab: int = 20, neighbours: int = 8, seed: int = 0) -> TokenMemory:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g)
    return TokenMemory(keys, torch.randint(vocab, (n,), generator=g), torch.arange(n) // 10, neighbours)


def test_search_finds_the_exact_nearest_keys_across_key_blocks(monkeypatch):
    monkeypatch.setattr(retrieval, "KEY_BLOCK", 64)  # several blocks and a ragged last one
    monkeypatch.setattr(retrieval, "QUERY_CHUNK", 7)
    memory = _memory()
    queries = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    dist, index = memory.search(queries)
    exact = torch.cdist(queries, memory.keys.float()).pow(2)
    want_d, want_i = exact.topk(8, dim=1, largest=False)
    assert torch.equal(index, want_i)
    torch.testing.assert_close(dist, want_d, atol=1e-3, rtol=1e-4)


def test_search_leaves_out_the_querys_own_article(monkeypatch):
    monkeypatch.setattr(retrieval, "KEY_BLOCK", 64)
    memory = _memory()
    queries = memory.keys[:40].float()  # each query is a key: without exclusion it finds itself
    assert torch.equal(memory.search(queries)[1][:, 0], torch.arange(40))
    rows = memory.rows[:40]
    _, index = memory.search(queries, exclude_rows=rows)
    assert not (memory.rows[index] == rows[:, None]).any()


def test_mixture_is_a_distribution_and_matches_the_target_form():
    memory = _memory()
    memory.weight, memory.temperature = 0.3, 5.0
    logits = torch.randn(2, 5, 20)
    queries = torch.randn(2, 5, 16)
    log_p = memory.mix_logits(logits, queries)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 5))
    targets = torch.randint(20, (10,))
    dist, index = memory.search(queries.reshape(10, 16))
    lm = torch.log_softmax(logits.reshape(10, 20), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(memory.mix_target(lm, dist, index, targets), log_p.reshape(10, 20)[range(10), targets])
    memory.weight = 0.0  # off: exactly the adapter's distribution
    torch.testing.assert_close(memory.mix_logits(logits, queries), torch.log_softmax(logits, -1))


def test_target_log_probs_in_chunks_equal_the_full_softmax():
    hidden, head, bias = torch.randn(37, 8), torch.randn(50, 8), torch.randn(50)
    targets = torch.randint(50, (37,))
    want = torch.log_softmax(hidden @ head.T + bias, -1)[range(37), targets]
    torch.testing.assert_close(target_log_probs(hidden, head, bias, targets, chunk=5), want)


def test_fit_turns_a_useful_memory_on_and_a_useless_one_off():
    """Text that repeats across articles: the memory knows each next token; random values: it knows nothing."""
    g = torch.Generator().manual_seed(0)
    contexts = torch.randn(50, 16, generator=g)  # 50 contexts, each followed by its own token
    keys = contexts.repeat(6, 1) + 0.01 * torch.randn(300, 16, generator=g)  # 6 articles of the same 50
    values, rows = torch.arange(50).repeat(6), torch.arange(300) // 50
    useful = TokenMemory(keys, values, rows, neighbours=8)
    lm = torch.full((300,), math.log(1 / 50))  # an adapter that knows nothing: uniform over 50 tokens
    loss = useful.fit(lm, keys, values, rows)
    assert useful.weight > 0.2 and loss < 0.5 * -lm.mean().item()
    noise = TokenMemory(keys, torch.randint(50, (300,), generator=g), rows, neighbours=8)
    confident = torch.full((300,), math.log(0.9))  # an adapter that is right: mixing can only hurt
    assert noise.fit(confident, keys, values, rows) == pytest.approx(-math.log(0.9))
    assert noise.weight == 0.0


def test_memory_file_round_trip_and_clear_errors(tmp_path):
    memory = _memory()
    memory.weight, memory.temperature = 0.1, 30.0
    memory.save(tmp_path)
    loaded = TokenMemory.load(tmp_path, memory.settings())
    assert torch.equal(loaded.keys, memory.keys) and torch.equal(loaded.values, memory.values)
    assert loaded.settings() == memory.settings()
    with pytest.raises(PacError, match="missing.*--no-retrieval"):
        TokenMemory.load(tmp_path / "elsewhere", memory.settings())
    data = (tmp_path / RETRIEVAL_FILE).read_bytes()
    (tmp_path / RETRIEVAL_FILE).write_bytes(data[: len(data) // 2])  # truncated copy
    with pytest.raises(PacError, match="not a readable token memory"):
        TokenMemory.load(tmp_path, memory.settings())
