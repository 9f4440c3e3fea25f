"""TaskEdge's 2:4 update through torch's semi-structured sparse kernels, on a GPU (skipped without CUDA: run it
on a machine with one). It imports torch-level modules alone, so it runs wherever torch sees a GPU."""

from __future__ import annotations

import pytest
import torch

from pac.methods.taskedge.select import nm_limited, per_row
from pac.methods.taskedge.sparse import SparseDelta, _semi_structured

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (semi-structured sparse kernels)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_2_4_update_through_semi_structured_kernels_equals_the_dense_one(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False).to("cuda", dtype).requires_grad_(False)
    scores = torch.rand(128, 256)
    index = per_row(nm_limited(scores, 2, 4), 128 * 64).cuda()  # half of every row: 2 of each 4 inputs
    structured, dense = (SparseDelta(linear, index, structured=s).to("cuda") for s in (True, False))
    with torch.no_grad():
        values = torch.randn(index.numel(), device="cuda") * 0.02
        structured.values.copy_(values)
        dense.values.copy_(values)
    assert _semi_structured(linear.weight, index, structured.values) is not None  # the kernels do run here
    x = torch.randn(64, 256, device="cuda", dtype=dtype, requires_grad=True)
    out_s, out_d = structured(x), dense(x)
    torch.testing.assert_close(out_s, out_d, rtol=2e-2, atol=2e-2)
    out_s.float().square().sum().backward()
    grad_s = structured.values.grad.clone()
    out_d.float().square().sum().backward()
    torch.testing.assert_close(grad_s, dense.values.grad, rtol=5e-2, atol=5e-2)
    assert torch.equal(linear.weight, linear.weight.clone())  # the frozen weight is never written
