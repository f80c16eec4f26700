"""The NF4 small-batch matmul kernel (triton_kernels/nf4_matmul.py): Y = X W^T with W dequantized in
registers, against loraforge's dequantize (bit-exact with bitsandbytes) followed by a matmul. Under
TRITON_INTERPRET=1 on CPU tensors, and on CUDA where there is one."""

import pytest
import torch

import loraforge.nf4
from loraforge.ops.nf4 import nf4_levels
from loraforge.triton_kernels import nf4_matmul as kernels


def _quantized(n, k, device, blocksize=64):
    w = torch.randn(n, k, device=device) * 0.05
    w[0, :blocksize] = 0.0  # an all-zero block
    packed, state = loraforge.nf4.quantize(w.to(torch.bfloat16), blocksize=blocksize, compress_statistics=True)
    return packed, state


def _call(x, packed, state, n, **kw):
    s2 = state.state2
    return kernels.nf4_matmul(x, packed.reshape(-1), state.absmax, s2.code.float(), s2.absmax.float(),
                              state.offset.float().reshape(1), nf4_levels(x.device), state.blocksize, s2.blocksize,
                              n, **kw)  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("m, n, k, blocksize", [(1, 40, 128, 64), (7, 96, 512, 64), (16, 50, 256, 128),
                                                (3, 33, 192, 64)])  # fmt: skip
def test_each_element_of_w_is_the_dequantized_one(device, m, n, k, blocksize, seed):
    """With one-hot rows, each output is one W element times 1: exactly the dequantized weight."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    packed, state = _quantized(n, k, device, blocksize)
    dense = loraforge.nf4.dequantize(packed, state, out_dtype=torch.bfloat16)
    columns = torch.randperm(k, device=device)[:m]
    x = torch.zeros(m, k, dtype=torch.bfloat16, device=device)
    x[torch.arange(m, device=device), columns] = 1.0
    y = _call(x, packed, state, n)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert torch.equal(y, dense[:, columns].t())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("m", (1, 8, 16))
def test_matches_dequantize_then_matmul(device, m, seed):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n, k = 72, 320  # K not a multiple of 256: the 64-wide tile
    packed, state = _quantized(n, k, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    dense = loraforge.nf4.dequantize(packed, state, out_dtype=torch.bfloat16)
    exact = x.double() @ dense.double().t()
    y = _call(x, packed, state, n)
    plain = (x.float() @ dense.float().t()).to(torch.bfloat16)  # one rounding of an fp32 sum, as ours
    err_ours = (y.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_plain + 1e-6, (err_ours, err_plain)


def test_refuses_shapes_it_does_not_serve():
    packed, state = _quantized(8, 128, "cpu")
    with pytest.raises(ValueError, match="16 rows"):
        _call(torch.zeros(17, 128, dtype=torch.bfloat16), packed, state, 8)
    assert kernels.block_k_for(100, 64) is None and kernels.block_k_for(4096, 64) == 256
    assert kernels.block_k_for(192, 64) == 64 and kernels.block_k_for(4096, 512) is None
