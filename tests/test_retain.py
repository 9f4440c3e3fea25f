"""The retain measure (pac.retain) on tiny real models: the base model against itself, against an adapter that
starts at zero output, against one that changed; the cache of the base model's answers; and `pac eval --retain`,
`pac generate --base` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_argv

from pac.cli import main
from pac.generate import generate_ids
from pac.methods.parallel_adapters import ParallelAdapterConfig, ParallelAdapterModel
from pac.models.backbone import load_backbone
from pac.retain import cached_answers, compare, general_prompts, model_next_token_logits, summarize
from pac.workflow import load_tokenizer

PROMPTS = [[5, 9, 17, 33], [2, 40, 41], [7], [60, 61, 62, 63, 64, 65]]


@pytest.fixture(autouse=True)
def pac_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PAC_HOME", str(tmp_path / "home"))


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' products are too small to split: a second thread only waits for the first (a tiny
    forward pass took 4 ms on one thread and 100 ms on two while other jobs shared this 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter(backbone, up_scale: float = 0.0) -> ParallelAdapterModel:
    adapter = ParallelAdapterModel(backbone, ParallelAdapterConfig(task="lm", reduction=4)).eval()
    if up_scale:
        torch.manual_seed(0)
        with torch.no_grad():
            adapter.side.up.weight.normal_(0, up_scale)  # Up starts at zero: make the side network matter
    return adapter


def _sequences(backbone, n: int = 12):
    return [(p, generate_ids(backbone, None, torch.tensor([p]), n)[0].tolist()) for p in PROMPTS]


def test_the_base_model_against_itself_agrees_everywhere(tiny_llama):
    backbone = load_backbone(tiny_llama)
    base = model_next_token_logits("base", "lm", None, backbone)
    figures = summarize(compare(base, base, _sequences(backbone)))
    assert figures["agreement"] == 1.0 and figures["kl"] == 0.0 and figures["answers_kept"] == 1.0
    assert figures["prompts"] == len(PROMPTS) and figures["answer_tokens"] == 12 * len(PROMPTS)
    # The answers are the base model's greedy tokens: teacher-forced, its top-1 is each next answer token.
    for prompt, answer in _sequences(backbone):
        ids = torch.tensor([prompt + answer])
        assert base(ids, torch.ones_like(ids))[0, len(prompt) - 1 : -1].argmax(-1).tolist() == answer


def test_a_fresh_parallel_adapter_is_the_base_model(tiny_llama):
    """Up starts at zero, so before training the adapter answers exactly like the model it sits beside."""
    backbone = load_backbone(tiny_llama)
    base = model_next_token_logits("base", "lm", None, backbone)
    adapter = model_next_token_logits("parallel-adapters", "lm", _adapter(backbone), backbone)
    figures = summarize(compare(base, adapter, _sequences(backbone)))
    assert figures["agreement"] == 1.0 and figures["answers_kept"] == 1.0
    assert figures["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_changed_adapter_loses_agreement_and_kept_answers_are_its_own_greedy_answers(tiny_llama):
    backbone = load_backbone(tiny_llama)
    base = model_next_token_logits("base", "lm", None, backbone)
    changed = _adapter(backbone, up_scale=0.3)
    sequences = _sequences(backbone)
    scores = compare(base, model_next_token_logits("parallel-adapters", "lm", changed, backbone), sequences)
    figures = summarize(scores)
    assert figures["agreement"] < 1.0 and figures["kl"] > 0.01
    for (prompt, answer), score in zip(sequences, scores, strict=True):
        own = generate_ids(backbone, changed, torch.tensor([prompt]), len(answer))[0].tolist()
        # Free greedy decoding follows the base model's answer exactly as far as teacher forcing agrees.
        assert (own == answer) == (score.first_difference is None)
        if score.first_difference is not None:
            d = score.first_difference
            assert own[:d] == answer[:d] and own[d] == score.adapter_token != answer[d]
    # Right-padded batches give each sequence's figures as it gets alone.
    one_by_one = summarize(
        compare(base, model_next_token_logits("parallel-adapters", "lm", changed, backbone), sequences, batch_size=1)
    )
    assert one_by_one["agreement"] == figures["agreement"] and one_by_one["answers_kept"] == figures["answers_kept"]
    assert one_by_one["kl"] == pytest.approx(figures["kl"], rel=1e-4)
    # A bigger change drifts further from the base model.
    further = _adapter(backbone, up_scale=1.0)
    bigger = summarize(compare(base, model_next_token_logits("parallel-adapters", "lm", further, backbone), sequences))
    assert bigger["kl"] > figures["kl"]


def test_the_base_model_answers_once_per_model_and_prompts(tiny_llama, tmp_path):
    backbone = load_backbone(tiny_llama)
    calls = []

    def answer(ids, n):
        calls.append(ids)
        return generate_ids(backbone, None, ids, n)

    first = cached_answers(answer, PROMPTS[:2], "model-a", max_new_tokens=6)
    assert len(calls) == 2 and all(0 < len(a) <= 6 for a in first)
    assert list((tmp_path / "home" / "retain").glob("*.json"))
    # Read back from $PAC_HOME/retain: only the prompts never answered are asked.
    both = cached_answers(answer, PROMPTS, "model-a", max_new_tokens=6)
    assert both[:2] == first and len(calls) == len(PROMPTS)
    assert cached_answers(answer, PROMPTS, "model-a", max_new_tokens=6) == both and len(calls) == len(PROMPTS)
    cached_answers(answer, PROMPTS[:1], "model-b", max_new_tokens=6)  # another model: asked again
    cached_answers(answer, PROMPTS[:1], "model-a", max_new_tokens=9)  # another length: asked again
    cached_answers(answer, [[*PROMPTS[0], 3]], "model-a", max_new_tokens=6)  # another prompt (or format): again
    assert len(calls) == len(PROMPTS) + 3


def test_the_bundled_prompt_sets_are_disjoint():
    scored, mixed = general_prompts("eval"), general_prompts("mix")
    assert len(scored) == 50 and len(mixed) >= 48
    assert len(set(scored)) == len(scored) and not set(scored) & set(mixed)
    assert "What is the capital of France?" in scored


def _train(model, data, out, cache, *extra):
    return main(train_argv(model, data, out, cache, "--lr", "1e-2", *extra))


def _retain(adapter, model, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--model", str(model), "--retain", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_pac_eval_retain_for_every_method(tiny_llama, topic_jsonl, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _train(tiny_llama, topic_jsonl, tmp_path / "lm", cache, "--task", "lm") == 0
    lm = _retain(tmp_path / "lm", tiny_llama, capsys)
    assert lm["prompts"] == 50 and lm["answer_tokens"] >= 50
    assert 0 <= lm["agreement"] < 1 and lm["kl"] > 0 and 0 <= lm["answers_kept"] <= 1
    changed = lm["most_changed"][0]
    assert changed["prompt"] in general_prompts("eval") and changed["kl"] > 0 and "base_answer" in changed
    without_memory = _retain(tmp_path / "lm", tiny_llama, capsys, "--no-retrieval")
    assert without_memory["kl"] != lm["kl"]  # the memory of the training text is part of what changed

    # A parallel-adapter classifier never touches the model's next-token output: measured, not assumed.
    assert _train(tiny_llama, topic_jsonl, tmp_path / "classify", cache) == 0
    classify = _retain(tmp_path / "classify", tiny_llama, capsys)
    assert classify["agreement"] == 1.0 and classify["kl"] == 0.0 and classify["answers_kept"] == 1.0

    # LoRA changes the layers themselves, for a classifier too (the LM path is the one LoRA LM adapters take);
    # so does boundary LoRA on the top layers.
    for method in ("lora", "boundary"):
        assert _train(tiny_llama, topic_jsonl, tmp_path / method, cache, "--method", method, "--epochs", "1") == 0
        figures = _retain(tmp_path / method, tiny_llama, capsys)
        assert figures["kl"] > 0 and figures["agreement"] <= 1, method


def test_retain_needs_an_adapter_and_a_decoder(tiny_bert, topic_jsonl, tmp_path, capsys):
    assert main(["eval", "--zero-shot", "--retain"]) == 2
    assert "pass --adapter" in capsys.readouterr().err
    assert _train(tiny_bert, topic_jsonl, tmp_path / "bert", tmp_path / "cache", "--epochs", "1") == 0
    assert main(["eval", "--adapter", str(tmp_path / "bert"), "--model", str(tiny_bert), "--retain"]) == 2
    assert "encoder" in capsys.readouterr().err


def test_pac_generate_asks_the_base_model(tiny_llama, topic_jsonl, tmp_path, capsys):
    out = tmp_path / "lm"
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--task", "lm") == 0
    ask = ["generate", "--prompt", "the market", "--no-chat", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main([*ask, "--model", str(tiny_llama)]) == 0  # no --adapter: the base model
    alone = capsys.readouterr().out
    assert main([*ask, "--adapter", str(out), "--model", str(tiny_llama), "--base"]) == 0
    assert capsys.readouterr().out == alone
    # The same decoding as an adapter's, with the backbone alone: what the model itself says.
    tokenizer = load_tokenizer(tiny_llama)
    prompt = tokenizer("the market", return_tensors="pt")["input_ids"]
    expected = generate_ids(load_backbone(tiny_llama), None, prompt, 6, eos_token_id=tokenizer.eos_token_id)
    assert alone.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_retain_mix_trains_on_the_base_models_own_answers(tiny_llama, topic_jsonl, tmp_path, capsys):
    from pac.workflow import load_base, retain_mix_records

    out = tmp_path / "mixed"
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--task", "lm", "--retain-mix", "3") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples"] == 48 + 3 and summary["val_samples"] == 12  # validation stays the user's data
    rows = retain_mix_records(tiny_llama, 3, chat=False)
    assert [r.prompt for r in rows] == general_prompts("mix")[:3]
    # The completions are the base model's greedy answers, rendered as training renders prompts (plain here).
    base = load_base(tiny_llama)
    prompt = base.tokenizer(rows[0].prompt, return_tensors="pt")["input_ids"]
    own = generate_ids(base.backbone, None, prompt, 128, eos_token_id=base.tokenizer.eos_token_id)
    assert rows[0].completion == base.tokenizer.decode(own[0], skip_special_tokens=True).strip()
    for bad in (["--retain-mix", "65"], ["--retain-mix", "-1"], ["--retain-mix", "2", "--task", "classify"]):
        assert _train(tiny_llama, topic_jsonl, tmp_path / "bad", tmp_path / "cache", *bad) == 2
        assert "--retain-mix" in capsys.readouterr().err
