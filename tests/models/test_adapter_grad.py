"""lora_autograd.adapter_grad: scale * (a @ b) in the adapter's dtype. With 16-bit operands and an fp32
adapter it is an fp32 product, not rounded to 16 bits (on CUDA one fp32-accumulating, fp32-writing cuBLAS
call; on CPU the operands in fp32)."""

from __future__ import annotations

import pytest
import torch

from loraforge.models.lora_autograd import adapter_grad


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_cpu_fp32_adapter_gets_an_unrounded_product(scale):
    """On CPU, 16-bit operands for an fp32 adapter are multiplied in fp32 (as cuBLAS does on CUDA): no
    16-bit rounding of the gradient, which chunked sums would otherwise add once per chunk."""
    a, b = torch.randn(13, 70, dtype=torch.bfloat16), torch.randn(70, 5, dtype=torch.bfloat16)
    got = adapter_grad(a, b, torch.float32, scale)
    assert got.dtype == torch.float32
    assert torch.equal(got, (a.float() @ b.float()).mul_(scale))
    exact = (a.double() @ b.double()) * scale
    rounded = (a @ b).double() * scale
    assert (got.double() - exact).norm() < (rounded - exact).norm()


def test_cpu_16bit_adapter_product_in_its_dtype():
    a, b = torch.randn(13, 70, dtype=torch.bfloat16), torch.randn(70, 5, dtype=torch.bfloat16)
    got = adapter_grad(a, b, torch.bfloat16, 0.5)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (a @ b).mul_(0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_accumulates_and_writes_fp32(dtype):
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    a = torch.randn(4099, 16, device="cuda", dtype=dtype, generator=gen).t()  # [16, n]: dY^T / dH^T as used
    b = torch.randn(4099, 333, device="cuda", dtype=dtype, generator=gen)
    got = adapter_grad(a, b, torch.float32, 0.5)
    exact = (a.double() @ b.double()) * 0.5
    assert got.dtype == torch.float32 and got.shape == (16, 333)
    error = (got.double() - exact).norm() / exact.norm()
    rounded = ((a @ b).float() * 0.5).double()  # the 16-bit product: rounded once to 16 bits
    assert error <= (rounded - exact).norm() / exact.norm()
    assert error < 1e-5
