"""The tolerance rule of DESIGN.md, for the cross-entropy tests: against a float64 reference computed
from the same low-precision inputs, our error is at most twice the error of plain torch (the logits
upcast to fp32 and F.cross_entropy, as transformers does; for the fused op, the logits made by a
low-precision matmul first), both measured as the largest absolute error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP32_EPS = torch.finfo(torch.float32).eps


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def assert_within_torch_error(ours: torch.Tensor, plain_torch: torch.Tensor, exact: torch.Tensor, what: str,
                              factor: float = 2.0) -> None:  # fmt: skip
    """ours' error <= factor x plain torch's error, plus a floor of 8 fp32 roundings of the largest
    exact value: where plain torch happens to be (nearly) exact, both errors are fp32 noise."""
    assert ours.shape == exact.shape, (what, ours.shape, exact.shape)
    ours_error, torch_error = max_error(ours, exact), max_error(plain_torch, exact)
    floor = 8 * FP32_EPS * (exact.double().abs().max().item() if exact.numel() else 0.0)
    assert ours_error <= factor * torch_error + floor, (
        f"{what}: our error {ours_error:.3e} exceeds {factor} x plain torch's {torch_error:.3e} (+ floor {floor:.1e})"
    )


def softcapped(z: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    z = z * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def plain_torch_cross_entropy(logits, targets, grad_loss, *, ignore_index=-100, logit_scale=1.0, softcap=0.0,
                              reduction="mean", num_items_in_batch=None):  # fmt: skip
    """(loss, dL/dlogits) the way plain torch gets them: upcast to fp32, F.cross_entropy, backward; the
    gradient comes back in the logits' dtype through the upcast."""
    leaf = logits.detach().clone().requires_grad_()
    z = softcapped(leaf.float(), logit_scale, softcap)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
    else:
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)
    loss.backward(grad_loss)
    return loss.detach(), leaf.grad


def plain_torch_linear_cross_entropy(x, weight, bias, targets, *, ignore_index=-100, logit_scale=1.0, softcap=0.0,
                                     reduction="mean", num_items_in_batch=None):  # fmt: skip
    """(loss, dL/dx, dL/dweight, dL/dbias) of plain torch: logits = F.linear(x, W, b) (an lm_head) in
    the inputs' dtype, then upcast and F.cross_entropy, then autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    x_, w_, b_ = leaves
    logits = F.linear(x_, w_, b_)
    z = softcapped(logits.float(), logit_scale, softcap)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
    else:
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)
    loss.backward()
    return loss.detach(), x_.grad, w_.grad, (b_.grad if b_ is not None else None)
