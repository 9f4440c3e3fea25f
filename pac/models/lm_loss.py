"""Cross-entropy through a frozen LM head without holding the full logits.

For a batch of 8 x 128 tokens, SmolLM2's 49,152-way logits take 201 MB in float32, and a plain
loss keeps several such tensors alive (logits, log-softmax, their gradient): that alone made the
side network's language-model phase 2 need 1.8 GB. Here the logits

    logits = base @ W^T + side @ M^T + c          (W frozen; M = W U and c = W b + bias carry the grads)

are built, turned into a loss and differentiated a chunk of tokens at a time in the forward pass,
which keeps only the small gradients (for side [N, w], M [V, w], c [V] and, when the final norm
trains, base [N, d]). Backward then just scales them. Same value and gradients as the plain loss.

Under autocast (`--precision bf16`) the products run in the autocast dtype, as a plain bf16 loss
would, softmax included; the gradients are kept in each input's own dtype.
On language modelling these products over the 49k-word vocabulary are most of a cached epoch.
"""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, side, m, c, head, targets, chunk):  # noqa: D102 (autograd API)
        # Autocast cannot reach into the in-place products below: cast once here, explicitly.
        device = base.device.type
        autocasting = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocasting else base.dtype
        base_c, side_c, m_c, head_c, c_c = (None if t is None else t.to(compute) for t in (base, side, m, head, c))
        valid = targets != -100
        count = valid.sum().clamp_min(1)
        loss = base.new_zeros((), dtype=torch.float32)
        grads = {
            "side": torch.zeros_like(side) if side is not None and ctx.needs_input_grad[1] else None,
            "m": torch.zeros_like(m) if m is not None and ctx.needs_input_grad[2] else None,
            "c": torch.zeros_like(c) if ctx.needs_input_grad[3] else None,
            "base": torch.zeros_like(base) if ctx.needs_input_grad[0] else None,
        }
        for start in range(0, base.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = torch.addmm(c_c, base_c[rows], head_c.T)
            if side_c is not None:
                logits.addmm_(side_c[rows], m_c.T)
            keep, tgt = valid[rows], targets[rows].clamp_min(0)
            if torch.finfo(compute).bits >= 32:
                logp = torch.log_softmax(logits, dim=-1)
                target_logp = logp.gather(1, tgt[:, None]).squeeze(1)
                g = logp.exp_()
            else:
                # The softmax in the low dtype: these [chunk, vocab] passes are memory-bound, and a bf16
                # pass is ~7x faster than a float32 one on CPU. Only the training loss's value sees the
                # rounding (2^-9 relative on p); evaluation runs in float32.
                g = torch.softmax(logits, dim=-1)
                target_logp = g.gather(1, tgt[:, None]).squeeze(1).float().clamp_min(1e-30).log()
            loss -= (target_logp * keep).sum()
            # d(mean CE)/d logits = (softmax - onehot) / count on kept rows
            g[torch.arange(g.shape[0]), tgt] -= 1
            g *= (keep / count)[:, None]
            if grads["c"] is not None:
                grads["c"] += g.sum(0).to(c.dtype)  # a float32 sum of bf16 rows is 25x slower
            if grads["side"] is not None:
                grads["side"][rows] = g @ m_c
            if grads["m"] is not None:
                grads["m"] += g.T @ side_c[rows]
            if grads["base"] is not None:
                grads["base"][rows] = g @ head_c
        ctx.grads = grads
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102 (autograd API)
        g = ctx.grads
        scale = lambda t: None if t is None else t * grad_loss  # noqa: E731
        return scale(g["base"]), scale(g["side"]), scale(g["m"]), scale(g["c"]), None, None, None


def chunked_lm_loss(
    base: torch.Tensor,
    side: torch.Tensor | None,
    m: torch.Tensor | None,
    c: torch.Tensor,
    head: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits = base W^T + side M^T + c.

    base [B, T, d], side [B, T, w] or None (no factored term), labels [B, T] (-100: no loss);
    position t predicts token t+1."""
    d = base.shape[-1]
    side = None if side is None else side[:, :-1].reshape(-1, side.shape[-1])
    return ChunkedLinearCrossEntropy.apply(
        base[:, :-1].reshape(-1, d), side, m, c, head, labels[:, 1:].reshape(-1), chunk
    )
