"""The numerics rule of DESIGN.md for ops without format-defined bits: the error against a float64
reference is at most twice the error of plain torch computing the same thing in the same low precision.

Two readings of "error", both checked against twice plain torch's:
- the mean absolute error over the tensor: the rule itself, stable from run to run;
- the largest absolute error, allowed at least two units in the last place at the largest reference
  value. The maximum alone cannot be the rule: where a form rounds twice (Llama's RMSNorm rounds the
  normalised row, then the product), a last-bit difference in an fp32 intermediate flips the first
  rounding of some element, and whether plain torch happens to flip one too is luck. The bound still
  catches any element that is really wrong.
Floors, all resolutions rather than errors of a method: a quarter of a unit in the last place of the
output dtype under the mean (for when plain torch happens to be exact), one unit under the maximum; and
for fp32 outputs, fp32 being the precision every kernel computes in, two fp32 units (at the mean
magnitude) under the mean and four (at the largest) under the maximum. A per-row statistic such as
RMSNorm's rstd carries one rounding shared by its whole row, and a column sum such as its weight
gradient a few dozen: over a row or two the mean error is one draw of those, for torch as for us
(60 single rows of 4,100: both between 0.24 and 1.1 such units), and which draw is smaller is luck.
In bf16 and fp16 these floors are below the output's own resolution and change nothing.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FP32_UNITS_UNDER_MEAN = 2  # fp32 reductions: a few roundings whose sum ends where it ends, for us as for torch
FP32_UNITS_UNDER_MAX = 4


def abs_error(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (value.detach().cpu().double() - exact.detach().cpu().double()).abs()


def assert_within_rule(ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """ours and plain (torch in the low precision) against exact (float64, computed from the same inputs)."""
    assert ours.shape == exact.shape, f"{what}: shape {list(ours.shape)} != {list(exact.shape)}"
    assert ours.dtype == plain.dtype, f"{what}: dtype {ours.dtype} != plain torch's {plain.dtype}"
    if exact.numel() == 0:
        return
    assert torch.isfinite(ours).all() or not torch.isfinite(exact).all(), f"{what}: non-finite values"
    eps = torch.finfo(ours.dtype).eps
    ours_error, plain_error = abs_error(ours, exact), abs_error(plain, exact)
    magnitude = exact.abs().double()

    mean, plain_mean = ours_error.mean().item(), plain_error.mean().item()
    eps32 = torch.finfo(torch.float32).eps
    resolution = max(0.25 * eps, FP32_UNITS_UNDER_MEAN * eps32) * magnitude.mean().item()
    allowed_mean = max(FACTOR * plain_mean, resolution)
    assert mean <= allowed_mean, (
        f"{what}: mean error {mean:.3g} against float64, plain torch {plain_mean:.3g} (allowed {allowed_mean:.3g})"
    )
    largest, plain_largest = ours_error.max().item(), plain_error.max().item()
    resolution_largest = max(eps, FP32_UNITS_UNDER_MAX * eps32) * magnitude.max().item()
    allowed_largest = FACTOR * max(plain_largest, resolution_largest)
    assert largest <= allowed_largest, (
        f"{what}: max error {largest:.3g} against float64, plain torch {plain_largest:.3g} "
        f"(allowed {allowed_largest:.3g})"
    )
