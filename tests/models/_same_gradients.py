"""The tolerance for fp32 gradients of one computation whose sums run in another order.

A checkpoint's rerun that never forms a residual sum (train/layer_split.py) adds the residual's share of a
layer input's gradient after the branch's, where autograd added it first: the same terms, summed in
another order. On the tiny test models the gradients then differ by up to ~2.4e-6 of each tensor's
largest entry (about 20 units of fp32 rounding at that entry; 4 architectures x 6 seeds, 2026-12-07),
where a wrong gradient is off by the order of the gradient itself.
"""

import torch

RELATIVE_TO_LARGEST = 2e-5


def assert_same_gradients(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=RELATIVE_TO_LARGEST * scale + 1e-12, msg=msg)
