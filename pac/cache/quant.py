"""int8 quantisation of cached hidden states.

Hidden states are ``[..., T, d]`` (``...`` = sample and tap dimensions). LLM hidden states carry a few
massive outlier channels (SmolLM2-135M: |h| ~ 2e4 in a handful of its 576 channels from layer ~12 on),
which ruins a single absmax scale per token. Three schemes are implemented; ``benchmarks/int8_cache_error.py``
measures them on real SmolLM2 taps (results in ``benchmarks/results/int8_cache_error.md``), and the best,
:data:`DEFAULT_SCHEME`, is the one the cache uses for ``dtype="int8"``.

* ``per_token``: one absmax scale per token (over all d channels).
* ``per_channel``: one absmax scale per channel (over the T tokens of one sample and tap).
* ``per_token_outlier``: the ``k`` channels with the largest max |x| (per sample and tap) are kept in fp16
  (their indices stored), the other channels get one absmax scale per token.
* ``per_token_topk``: like ``per_token_outlier`` but the ``k`` entries kept in fp16 are chosen per token
  (each token's k largest |x|, indices stored per token). The massive activations of SmolLM2 sit on the
  first token, while the other tokens have their own, different large channels; choosing per token halves
  the error of the per-channel choice at the same k (measured: 0.52% vs 0.90% mean per-token error, k=8).

The quantised form is a dict of tensors whose key set identifies the scheme, so :func:`dequantize` needs
nothing else and the dict can be stored as-is in a safetensors file (keys are prefixed by the caller).
"""

from __future__ import annotations

import torch

SCHEMES = ("per_token", "per_channel", "per_token_outlier", "per_token_topk")
DEFAULT_SCHEME = "per_token_topk"
DEFAULT_OUTLIERS = 8

_FP16_MAX = 65504.0
_QMAX = 127.0


def _scale(absmax: torch.Tensor) -> torch.Tensor:
    # fp32 scales: tiny or huge magnitudes lose nothing; costs 4 bytes per token (0.7% of a 576-wide row).
    return (absmax.float() / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)


def _q(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp_(-_QMAX, _QMAX).to(torch.int8)


def quantize(x: torch.Tensor, scheme: str = DEFAULT_SCHEME, k: int = DEFAULT_OUTLIERS) -> dict[str, torch.Tensor]:
    """Quantise ``x[..., T, d]`` (any float dtype) to int8 with the given scheme.

    Returns ``{"q": int8 [..., T, d], ...scales}``; see :func:`dequantize` for the key sets.
    """
    if x.dim() < 2:
        raise ValueError(f"quantize expects [..., T, d], got shape {tuple(x.shape)}")
    x = x.float()
    if scheme == "per_token":
        scale = _scale(x.abs().amax(dim=-1, keepdim=True))  # [..., T, 1]
        return {"q": _q(x, scale), "token_scale": scale}
    if scheme == "per_channel":
        scale = _scale(x.abs().amax(dim=-2, keepdim=True))  # [..., 1, d]
        return {"q": _q(x, scale), "channel_scale": scale}
    if scheme in ("per_token_outlier", "per_token_topk"):
        d = x.shape[-1]
        k = max(0, min(int(k), d - 1))
        if scheme == "per_token_outlier":  # the same k channels for every token of a sample and layer
            idx = x.abs().amax(dim=-2).topk(k, dim=-1).indices.sort(dim=-1).values  # [..., k]
            gather_idx = idx.unsqueeze(-2).expand(*x.shape[:-1], k)  # [..., T, k]
            prefix = "outlier"
        else:  # each token's own k largest channels
            idx = gather_idx = x.abs().topk(k, dim=-1).indices  # [..., T, k]
            prefix = "topk"
        vals = x.gather(-1, gather_idx)
        inliers = x.scatter(-1, gather_idx, 0.0)
        scale = _scale(inliers.abs().amax(dim=-1, keepdim=True))
        val_dtype = torch.float16 if (k == 0 or vals.abs().max() <= _FP16_MAX) else torch.float32
        return {
            "q": _q(inliers, scale),
            "token_scale": scale,
            f"{prefix}_idx": idx.to(torch.int16 if d <= 32767 else torch.int32),
            f"{prefix}_val": vals.to(val_dtype),
        }
    raise ValueError(f"unknown int8 scheme {scheme!r}; expected one of {SCHEMES}")


def scheme_of(d: dict[str, torch.Tensor]) -> str:
    """The scheme a quantised dict was made with (inferred from its keys)."""
    keys = set(d)
    if keys == {"q", "token_scale"}:
        return "per_token"
    if keys == {"q", "channel_scale"}:
        return "per_channel"
    if keys == {"q", "token_scale", "outlier_idx", "outlier_val"}:
        return "per_token_outlier"
    if keys == {"q", "token_scale", "topk_idx", "topk_val"}:
        return "per_token_topk"
    raise ValueError(f"not a quantised tensor dict (keys {sorted(keys)})")


def dequantize(d: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: returns float32 ``[..., T, d]`` (written into ``out`` if given)."""
    scheme = scheme_of(d)
    q = d["q"]
    scale = d["token_scale"] if scheme != "per_channel" else d["channel_scale"]
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    out.copy_(q)
    out.mul_(scale.float())
    if scheme == "per_token_outlier" and d["outlier_idx"].shape[-1] > 0:
        idx = d["outlier_idx"].long()
        gidx = idx.unsqueeze(-2).expand(*q.shape[:-1], idx.shape[-1])
        out.scatter_(-1, gidx, d["outlier_val"].float())
    elif scheme == "per_token_topk" and d["topk_idx"].shape[-1] > 0:
        out.scatter_(-1, d["topk_idx"].long(), d["topk_val"].float())
    return out


def quantized_nbytes(d: dict[str, torch.Tensor]) -> int:
    """Storage bytes of a quantised dict (tensor payloads only)."""
    return sum(t.numel() * t.element_size() for t in d.values())
