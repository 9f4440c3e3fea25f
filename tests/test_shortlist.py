"""Shortlists (pac.models.shortlist): the (K+1)-way training loss against the whole-vocabulary one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pac.errors import PacError
from pac.methods.parallel_adapters import ParallelAdapterOptions
from pac.models.shortlist import ListedCorrection, shortlist_lm_loss, shortlist_rows
from pac.runtime.sources import with_shortlists
from pac.workflow import DataOptions, TrainOptions, with_defaults

VOCAB, HIDDEN, WIDTH = 40, 12, 4


def _problem(seed: int = 0, up_scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(VOCAB, HIDDEN, generator=g)
    base = torch.randn(2, 6, HIDDEN, generator=g)
    state = torch.randn(2, 6, WIDTH, generator=g).requires_grad_(True)
    labels = torch.randint(VOCAB, (2, 6), generator=g)
    labels[1, 4:] = -100  # padding at the end of the second row
    up = torch.nn.Linear(WIDTH, HIDDEN)
    with torch.no_grad():
        up.weight.copy_(torch.randn(HIDDEN, WIDTH, generator=g) * up_scale)
        up.bias.copy_(torch.randn(HIDDEN, generator=g) * up_scale)
    return head, base, state, labels, up


def _exact(head, base, state, labels, up) -> torch.Tensor:
    logits = (base + up(state)) @ head.T
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _shortlisted(head, base, state, labels, up, size: int, chunk: int = 256) -> torch.Tensor:
    targets = labels[:, 1:].clamp_min(0)
    rows = shortlist_rows(base[:, :-1].flatten(0, 1), targets.flatten(), head, size)
    batch = {"labels": labels, **{k: v.unflatten(0, targets.shape) for k, v in rows.items()}}
    return shortlist_lm_loss(state, up, head, batch, chunk)


def _grads(loss: torch.Tensor, up: torch.nn.Linear, state: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, [up.weight, up.bias, state])


def test_a_shortlist_of_all_but_one_word_is_the_exact_loss():
    """With one word left in the tail, its log-sum-exp and mean row are exact: so is the loss."""
    head, base, state, labels, up = _problem()
    exact = _exact(head, base, state, labels, up)
    listed = _shortlisted(head, base, state, labels, up, VOCAB - 1, chunk=3)  # the tokens in several chunks
    # fp16 base logits in the shortlist: agreement to their rounding
    torch.testing.assert_close(listed, exact, rtol=1e-3, atol=1e-3)
    for a, b in zip(_grads(listed, up, state), _grads(exact, up, state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_at_zero_correction_value_and_gradient_are_exact_for_any_size():
    """The tail term is the first-order expansion: where training starts (Up = 0) it is exact to first order."""
    head, base, state, labels, up = _problem(up_scale=0.0)
    exact, listed = _exact(head, base, state, labels, up), _shortlisted(head, base, state, labels, up, 5)
    torch.testing.assert_close(listed, exact, rtol=1e-3, atol=1e-3)
    for a, b in zip(_grads(listed, up, state), _grads(exact, up, state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_the_listed_correction_has_the_gradient_of_the_dense_product_it_gathers_from():
    """Its backward rebuilds each chunk's gradient by a scatter instead of keeping the products (gradcheck)."""
    g = torch.Generator().manual_seed(0)
    state = torch.randn(7, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(9, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    slot = torch.randint(9, (7, 3), generator=g)
    slot[0] = 4  # a word listed twice in a row: both slots' gradients add up
    torch.testing.assert_close(ListedCorrection.apply(state, m, c, slot, 2), (state @ m.T + c).gather(1, slot))
    assert torch.autograd.gradcheck(lambda s, w, b: ListedCorrection.apply(s, w, b, slot, 2), (state, m, c))


@pytest.mark.parametrize("size", [2, 5, 20])
def test_away_from_zero_the_shortlist_loss_is_a_lower_bound(size):
    head, base, state, labels, up = _problem(seed=size)
    assert _shortlisted(head, base, state, labels, up, size) <= _exact(head, base, state, labels, up) + 1e-4


def test_slot_zero_holds_the_target_and_the_rest_the_likeliest_other_words():
    head, base, _, labels, _ = _problem()
    rows = shortlist_rows(base[0], labels[0].clamp_min(0), head, 4)
    logits = base[0] @ head.T
    for t, target in enumerate(labels[0].tolist()):
        assert rows["shortlist_index"][t, 0] == target
        others = logits[t].clone()
        others[target] = -torch.inf
        assert set(rows["shortlist_index"][t, 1:].tolist()) == set(others.topk(3).indices.tolist())


@pytest.mark.parametrize("size", [1, VOCAB])
def test_sizes_that_leave_no_choice_or_no_tail_are_refused(size):
    head, base, _, labels, _ = _problem()
    with pytest.raises(PacError, match="between 2 and"):
        shortlist_rows(base[0], labels[0].clamp_min(0), head, size)


def test_the_default_shortlist_is_for_the_plain_lm_side_network():
    lm = DataOptions(task="lm")
    wide = ParallelAdapterOptions(readout_hidden=576)
    assert with_defaults(TrainOptions(data=lm)).options.shortlist == 256
    assert with_defaults(TrainOptions(data=lm, method_options=wide)).options.shortlist == 0  # trains on every word
    assert with_defaults(TrainOptions(data=DataOptions(task="classify"))).options.shortlist == 0
    with pytest.raises(PacError, match="--shortlist trains the plain side network"):
        with_defaults(TrainOptions(data=lm, method_options=ParallelAdapterOptions(readout_hidden=576, shortlist=256)))


def test_a_shortlist_as_large_as_the_vocabulary_trains_on_every_word():
    source = object()
    top = SimpleNamespace(final_norm=torch.nn.Identity(), lm_head=torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    model = SimpleNamespace(taps=[0, 4], top=top)
    assert with_shortlists(source, model, VOCAB - 1) is source
    assert with_shortlists(source, model, 0) is source
