"""Backbones (both families), layer ranges, partial loading, the side network and generation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from pac.errors import ModelError
from pac.generate import generate_ids
from pac.methods.parallel_adapters import ParallelAdapterConfig, ParallelAdapterModel
from pac.models.backbone import load_backbone, load_config
from pac.models.loading import Checkpoint
from pac.models.retrieval import TokenMemory
from pac.models.side import SideNetwork, TapDown


def _inputs(vocab: int, batch: int = 2, length: int = 12):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length - 4 :] = 0  # right padding on the second row
    return ids, mask


def _reference(model_dir):
    config = load_config(model_dir)
    loader = AutoModelForCausalLM if config.model_type != "bert" else AutoModel
    return loader.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval(), config


def test_backbone_matches_transformers(tiny_model):
    ref, config = _reference(tiny_model)
    backbone = load_backbone(tiny_model)
    ids, mask = _inputs(config.vocab_size)
    with torch.inference_mode():
        ours = backbone(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert sorted(ours.taps) == list(range(config.num_hidden_layers + 1))
    real = mask.bool()
    for i in range(config.num_hidden_layers):  # the last hidden state of decoders is post-norm in HF
        torch.testing.assert_close(ours.taps[i][real], theirs.hidden_states[i][real])
    if config.model_type == "bert":
        torch.testing.assert_close(ours.hidden[real], theirs.last_hidden_state[real])
    else:
        logits = backbone.logits(backbone.final_norm(ours.hidden))
        torch.testing.assert_close(logits[real], theirs.logits[real])


def test_stages_chain_to_the_full_model(tiny_model):
    config = load_config(tiny_model)
    full = load_backbone(tiny_model)
    cut = config.num_hidden_layers // 2
    first, second = load_backbone(tiny_model, 0, cut), load_backbone(tiny_model, cut)
    ids, mask = _inputs(config.vocab_size)
    with torch.inference_mode():
        whole = full(ids, mask)
        a = first(ids, mask)
        b = second(a.hidden, mask)
    assert set(a.taps) == set(range(cut + 1)) and set(b.taps) == set(range(cut + 1, config.num_hidden_layers + 1))
    for tap, value in {**a.taps, **b.taps}.items():
        torch.testing.assert_close(value, whole.taps[tap])


def test_stage_loads_only_its_layers(tiny_llama):
    stage = load_backbone(tiny_llama, 1, 3)
    names = {n for n, _ in stage.named_parameters()}
    assert not any(n.startswith(("embed_tokens", "lm_head", "norm")) for n in names)
    assert not any(p.is_meta for p in stage.parameters())
    checkpoint = Checkpoint(tiny_llama)
    layer_numel = sum(
        checkpoint.load([k], torch.float32)[k].numel()
        for k in checkpoint.files
        if k.startswith(("model.layers.1.", "model.layers.2."))
    )
    assert sum(p.numel() for p in stage.parameters()) == layer_numel
    with pytest.raises(ModelError, match="without the embeddings"):
        stage.embed(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ModelError, match="outside"):
        load_backbone(tiny_llama, 2, 9)


def test_unknown_architecture_is_refused(tmp_path, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"not supported.*bert, llama, mistral, qwen2"):
        load_config(tmp_path)


def test_no_backbone_gradient_and_step0_equals_backbone(tiny_model):
    config = load_config(tiny_model)
    backbone = load_backbone(tiny_model)
    task = "lm" if config.model_type == "llama" else "classify"
    adapter = ParallelAdapterModel(backbone, ParallelAdapterConfig(task=task, reduction=4, label_names=["a", "b", "c"]))
    ids, mask = _inputs(config.vocab_size)
    with torch.no_grad():
        out = backbone(ids, mask)
    taps = torch.stack([out.taps[t] for t in adapter.taps], 1)
    logits = adapter(taps, mask)
    if task == "lm":  # Up starts at zero: the adapted model answers exactly like the backbone
        torch.testing.assert_close(logits, backbone.logits(backbone.final_norm(out.hidden)), rtol=0, atol=0)
    logits.float().pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    trainable = {n for n, p in adapter.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("side.", "head.")) for n in trainable)
    assert adapter.side.up.weight.grad.abs().sum() > 0


def test_side_network_configuration(tiny_llama):
    config = load_config(tiny_llama)
    side = SideNetwork(config, taps=[0, 2, 4], reduction=4)
    assert len(side.blocks) == 2 and side.config.hidden_size == 16 and side.config.head_dim == 4
    assert type(side.blocks[0]).__name__ == "LlamaDecoderLayer"
    torch.testing.assert_close(side.gates(), torch.full((2,), 0.5))
    with pytest.raises(ModelError, match="must include 0"):
        SideNetwork(config, taps=[1, 4])
    with pytest.raises(ModelError, match="try one of"):
        SideNetwork(config, taps=[0, 4], reduction=5)
    cfg = ParallelAdapterConfig(task="lm", tap_every=3)
    assert cfg.resolved_taps(4) == [0, 3, 4]


def test_pipeline_stages_own_every_side_block_element_exactly_once(tiny_llama):
    """Stages (taps 0-1 / 2-3 / 4 of [0..4]) split the pipelined weights by structure, not by name."""
    side = SideNetwork(load_config(tiny_llama), taps=[0, 1, 2, 3, 4], reduction=4)
    parts = [(slice(0, 2), range(0, 1)), (slice(2, 4), range(1, 3)), (slice(4, 5), range(3, 4))]
    counts = {id(p): torch.zeros(p.shape[0]) for p in side.parameters()}
    for rows, blocks in parts:
        for param, mask in side.stage_parameters(rows, blocks):
            counts[id(param)] += 1 if mask is None else mask.float()
    pipelined = [side.down_weight, side.down_bias, side.gate_logits, *side.blocks.parameters()]
    for param in pipelined:
        assert counts[id(param)].eq(1).all()
    rest = [p for p in side.parameters() if all(p is not q for q in pipelined)]
    assert rest and all(counts[id(p)].eq(0).all() for p in rest)  # Norm and Up: the last stage's, by default
    owned = dict((id(p), m) for p, m in side.stage_parameters(slice(2, 4), range(1, 3)))
    assert owned[id(side.down_weight)].tolist() == [False, False, True, True, False]
    assert owned[id(side.gate_logits)].tolist() == [False, True, True, False]


def test_tap_down_is_the_batched_down_projection_and_its_gradient():
    """Tap by tap, reading the [B, n, T, d] batch in place: the einsum's values and gradients (gradcheck)."""
    g = torch.Generator().manual_seed(0)
    taps = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    expected = torch.einsum("bntd,nkd->bntk", taps, weight) + bias[:, None, :]
    torch.testing.assert_close(TapDown.apply(taps, weight, bias), expected)
    assert torch.autograd.gradcheck(TapDown.apply, (taps, weight, bias))


def test_generation_with_kv_cache_equals_recompute(tiny_llama):
    backbone = load_backbone(tiny_llama)
    adapter = ParallelAdapterModel(backbone, ParallelAdapterConfig(task="lm", reduction=4)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        adapter.side.up.weight.normal_(0, 0.5)  # make the side network matter
    prompt = torch.tensor([[5, 9, 17, 33]])
    cached = generate_ids(backbone, adapter, prompt, max_new_tokens=8)
    recomputed = generate_ids(backbone, adapter, prompt, max_new_tokens=8, use_cache=False)
    assert cached.shape == (1, 8)
    assert cached.tolist() == recomputed.tolist()


@pytest.mark.parametrize("side", [True, False])
def test_last_only_forward_is_the_last_position_of_the_full_one(tiny_llama, side):
    """What generation reads: the last position's mixture with the memory, without the others' head products."""
    backbone = load_backbone(tiny_llama)
    config = ParallelAdapterConfig(task="lm", reduction=4, side_network=side, readout_hidden=0 if side else 16)
    adapter = ParallelAdapterModel(backbone, config).eval()
    ids, mask = _inputs(backbone.config.vocab_size)
    taps = torch.stack([backbone(ids, mask, taps=adapter.taps).taps[t] for t in adapter.taps], 1)
    keys = torch.randn(40, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    adapter.memory = TokenMemory(keys, torch.arange(40) % 7, neighbours=5, weight=0.3, temperature=10.0)
    with torch.no_grad():
        full, last = adapter(taps, mask), adapter(taps, mask, last_only=True)
    assert last.shape == (2, 1, backbone.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


MEMORY_PROBE = """
import json, sys, torch
from pac.models.backbone import load_backbone
import transformers.models.llama.modeling_llama  # imported before measuring: not weight memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
torch.set_num_threads(1)
before = rss()
stage = load_backbone(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
# Weights are mmap-backed (zero-copy from safetensors): they become resident when used, so touch them.
unique = {p.data_ptr(): p for p in stage.parameters()}.values()
total = sum(float(p.sum()) for p in unique)
weights = sum(p.numel() * p.element_size() for p in unique)
print(json.dumps({"rss_delta": rss() - before, "weight_bytes": weights}))
"""


@pytest.mark.slow
def test_a_third_of_the_layers_takes_a_third_of_the_memory(smollm2_dir):
    """Measured in fresh processes on the real SmolLM2 (30 layers): the middle stage, layers
    [10, 20), against the whole model. The middle third holds 26% of the weights (the tied
    embedding / LM head is 21% of the model and lives on the first and last stages)."""

    def probe(start: int, end: int) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(smollm2_dir), str(start), str(end)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, middle = probe(0, 30), probe(10, 20)
    assert middle["rss_delta"] / whole["rss_delta"] == pytest.approx(
        middle["weight_bytes"] / whole["weight_bytes"], abs=0.06
    )
    assert 0.2 < middle["rss_delta"] / whole["rss_delta"] < 0.36


def test_hub_ids_fail_clearly_offline(monkeypatch):
    from pac.models.loading import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch 'someone/missing-model'.*--model"):
        resolve_model("someone/missing-model")
