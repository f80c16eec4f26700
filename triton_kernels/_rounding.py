"""`round_to(x, dtype)`: fp32 -> dtype with round-to-nearest-even, the same on a GPU and in the interpreter.

On a GPU, `x.to(tl.bfloat16)` rounds to nearest even. Triton's CPU interpreter (TRITON_INTERPRET=1, how
CI tests every kernel) truncates instead, and its `fp_downcast_rounding="rtne"` rounds ties up and can
carry the mantissa into the wrong exponent. Truncation doubles the error of every bf16 output, so tests
on CPU would judge the kernels on numerics the GPU never produces. Under the interpreter, bf16 is
therefore rounded by hand (add 0x7FFF plus the lowest kept bit, keep the high half: round-to-nearest-even
on the bit pattern; NaN and inf keep their class); compiled kernels keep the single hardware conversion.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when triton would read it too

if INTERPRETED:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

else:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        return x.to(dtype)
