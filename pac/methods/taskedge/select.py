"""Which weights TaskEdge trains: importance scores and the budget's allocation over the model (pure functions).

Importance is Wanda's statistic, S_ij = |W_ij| * ||X_j||_2, with X_j the j-th input feature over the calibration
tokens. The budget (a count of weights) is spread over the model as TaskEdge spreads it: every chosen linear map
gets its share by size, and inside a map every output neuron (row) gets the same number of entries, its top
scores; where the share is not a multiple of the rows, the remainder goes to the rows whose next-best score is
highest (at 0.1% of SmolLM2-135M that is most rows with one entry each). The comparisons at equal budget are a
global top-k of the same scores, magnitude alone (|W|), and random scores, each with the same row-wise spread
except the global one. An N:M pattern keeps at most N entries in each block of M consecutive inputs of a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pac.errors import PacError

SELECTIONS = ("taskedge", "global", "magnitude", "random")


def importance(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 from the running sums of squared inputs (float64, one per input feature)."""
    return weight.detach().abs().double() * input_sq_sums.sqrt().unsqueeze(0)


def layer_shares(sizes: dict[str, int], total: int) -> dict[str, int]:
    """`total` entries split over the layers in proportion to their sizes (largest remainders round up)."""
    whole = sum(sizes.values())
    exact = {name: total * size / whole for name, size in sizes.items()}
    shares = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: shares[n] - exact[n])[: total - sum(shares.values())]:
        shares[name] += 1
    return shares


def nm_limited(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The scores with every entry outside its block's top `n` (blocks of `m` consecutive inputs) at -inf."""
    rows, cols = scores.shape
    if cols % m:
        raise PacError(f"an N:M pattern needs inputs in whole blocks of {m}, and a layer here has {cols} inputs")
    blocks = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, blocks.topk(n, dim=-1).indices, True)
    return blocks.masked_fill(~keep, float("-inf")).reshape(rows, cols)


def per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices (row * inputs + column, sorted) of `count` entries spread evenly over the rows of `scores`."""
    rows, cols = scores.shape
    each, extra = divmod(count, rows)
    allowed = int(torch.isfinite(scores).sum(1).min())
    if each + (extra > 0) > allowed:
        raise PacError(
            f"a budget of {count} entries asks for {each + (extra > 0)} per row of a {rows}x{cols} layer, which "
            f"allows {allowed}: lower --budget-percent (or drop --nm)"
        )
    top = scores.topk(each + (extra > 0), dim=1)
    picked = [(torch.arange(rows).unsqueeze(1) * cols + top.indices[:, :each]).reshape(-1)]
    if extra:
        rows_with_one_more = top.values[:, each].topk(extra).indices
        picked.append(rows_with_one_more * cols + top.indices[rows_with_one_more, each])
    return torch.cat(picked).sort().values


def global_top(scores: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Flat indices per layer of the `count` highest scores over every layer at once (no spread)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    if count > int(torch.isfinite(flat).sum()):
        raise PacError(f"a budget of {count} entries is more than the layers allow: lower --budget-percent")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(count).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start : start + s.numel()].nonzero().reshape(-1)
        start += s.numel()
    return out


def select(
    selection: str,
    scores: Callable[[str], torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    total: int,
    nm: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices per layer of `total` entries under `selection`. `scores(name)` gives a layer's scores
    (importance for taskedge and global, |W| for magnitude, uniform draws for random); it is asked one layer at
    a time, so only the global top-k holds every layer's scores at once (in float32)."""
    if selection not in SELECTIONS:
        raise PacError(f"--selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")

    def limited(name: str) -> torch.Tensor:
        return scores(name) if nm is None else nm_limited(scores(name), *nm)

    if selection == "global":
        return global_top({name: limited(name).float() for name in shapes}, total)
    shares = layer_shares({name: rows * cols for name, (rows, cols) in shapes.items()}, total)
    return {name: per_row(limited(name), shares[name]) for name in shapes}
