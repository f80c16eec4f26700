"""GGUF packing on CUDA against the CPU packer, byte for byte.

The CPU packer is checked against llama.cpp itself in test_kquants.py; here the GPU must write the
same bytes as the CPU for every type, on fresh random inputs of every kind that test uses (zero and
constant groups, outliers, rounding ties, magnitudes from subnormal to near FLT_MAX, where ggml's own
arithmetic overflows to inf and NaN), in float32, float16 and bfloat16, for row counts that leave the
last CTA partly empty. The error paths that need no GPU run everywhere.
"""

import numpy as np
import pytest
import torch
from loraforge import _core, gguf
from loraforge.gguf import quants

from tests.gguf.test_kquants import KINDS, QUANTIZED, make_input

ROWS = (1, 3, 17, 130)  # with 256 (or 32) columns, 17 and 130 rows leave the last CTA partly empty
COLS = {32: (32, 96, 4096), 256: (256, 4096)}


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def cuda_bytes(x, qtype) -> np.ndarray:
    out = gguf.quantize(x, qtype)
    assert isinstance(out, torch.Tensor) and out.device.type == "cuda" and out.dtype == torch.uint8
    return out.cpu().numpy()


def assert_same_blocks(ours, expected, qtype, what):
    t = gguf.TYPES[qtype]
    assert ours.shape == expected.shape, (what, ours.shape, expected.shape)
    differs = np.flatnonzero((ours != expected).reshape(-1, t.block_bytes).any(axis=1))
    assert differs.size == 0, f"{qtype} {what}: {differs.size} blocks differ, first {differs[:5].tolist()}"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_float32_matches_cpu(rng, qtype, kind):
    for rows in ROWS:
        for cols in COLS[gguf.TYPES[qtype].block_elems]:
            x = make_input(kind, rng, rows, cols)
            if kind == "zeros":  # negative zeros too: the sign of a zero reaches the fp16 scales
                x[rng.random(x.shape) < 0.1] = -0.0
            ours = cuda_bytes(torch.from_numpy(x).cuda(), qtype)
            assert_same_blocks(ours, gguf.quantize(x, qtype), qtype, f"{kind} {rows}x{cols}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_half_inputs_match_cpu_on_their_float32_values(rng, qtype, dtype):
    kinds = ["normal", "outliers", "zeros", "constant", "integers", "tiny"]
    if dtype == torch.bfloat16:  # float16 cannot hold these (they would become inf and be refused)
        kinds += ["huge", "mixed_magnitudes"]
    limit = torch.finfo(dtype).max  # keep the rounded values finite (3.4e38 rounds to inf in bfloat16)
    for kind in kinds:
        x = torch.from_numpy(make_input(kind, rng, 17, 4096)).clamp(-limit, limit).to(dtype)
        assert torch.isfinite(x).all()
        expected = gguf.quantize(x.float().numpy(), qtype)  # widening is exact
        assert_same_blocks(cuda_bytes(x.cuda(), qtype), expected, qtype, f"{dtype} {kind}")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_large_tensor_matches_cpu(rng, qtype):
    """Many CTAs and every branch frequency of a real weight matrix (outliers, lognormal spread)."""
    x = make_input("outliers", rng, 1024, 4096) * np.float32(0.02)
    x[512:] = make_input("lognormal", rng, 512, 4096)
    assert_same_blocks(cuda_bytes(torch.from_numpy(x).cuda(), qtype), gguf.quantize(x, qtype), qtype, "large")


@pytest.mark.gpu
def test_views_streams_and_devices(rng):
    x = make_input("normal", rng, 64, 512)
    expected = gguf.quantize(x, "q4_k")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    # Non-contiguous input is copied, as on the CPU.
    transposed = torch.from_numpy(np.ascontiguousarray(x.T)).to(device).T
    assert not transposed.is_contiguous()
    np.testing.assert_array_equal(cuda_bytes(transposed, "q4_k"), expected)
    # A side stream: the result is written on the current stream, and correct once it is synchronised.
    stream = torch.cuda.Stream(device)
    source = torch.from_numpy(x).to(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out = gguf.quantize(source, "q4_k")
    stream.synchronize()
    assert out.device == device
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
    # Plain types accept CUDA input too (converted on the CPU) and return a tensor on its device.
    for qtype in ("F32", "F16", "BF16"):
        np.testing.assert_array_equal(cuda_bytes(source, qtype), gguf.quantize(x, qtype))


@pytest.mark.gpu
def test_cuda_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or infinite"):
        gguf.quantize(torch.full((2, 256), float("inf"), device="cuda"), "q4_k")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        gguf.quantize(torch.zeros(2, 256, dtype=torch.float64, device="cuda"), "q4_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf.quantize(torch.zeros(2, 384, device="cuda"), "q6_k")
    with pytest.raises(ValueError, match="qtype 'q9_k'"):
        gguf.quantize(torch.zeros(2, 256, device="cuda"), "q9_k")


# ---- error paths that need no GPU -----------------------------------------------------------------


@pytest.mark.parametrize(
    "x, qtype, error, match",
    [
        (torch.zeros(2, 256, dtype=torch.float64), "Q4_K", TypeError, "x must be float32, float16 or bfloat16"),
        (torch.zeros(2, 256, dtype=torch.int32), "Q8_0", TypeError, "x must be float32, float16 or bfloat16"),
        (torch.zeros(256), "Q4_K", ValueError, r"x must be a matrix \[rows, cols\]"),
        (torch.zeros(2, 1, 256), "Q4_K", ValueError, r"x must be a matrix \[rows, cols\]"),
        (torch.zeros(0, 256), "Q4_K", ValueError, "at least one row"),
        (torch.zeros(2, 384, dtype=torch.bfloat16), "Q4_K", ValueError, "x has 384 columns.*multiple of 256"),
        (torch.zeros(2, 48, dtype=torch.float16), "Q8_0", ValueError, "x has 48 columns.*multiple of 32"),
    ],
)
def test_cuda_input_checks(x, qtype, error, match):
    """The checks quantize() makes of a CUDA tensor before it touches the GPU (run here on CPU stand-ins)."""
    with pytest.raises(error, match=match):
        quants._check_cuda_input(x, gguf.TYPES[qtype])


def test_core_cuda_entry_checks_sizes():
    """_core.gguf_quantize_cuda raises ValueError (never crashes) for bad sizes, before any CUDA call."""
    dst = 1 << 20  # never dereferenced: every call below fails its checks first
    with pytest.raises(ValueError, match="multiple of 256"):
        _core.gguf_quantize_cuda(dst, 0, 2, 128, 12, dst, 0)
    with pytest.raises(ValueError, match="not a GGUF type"):
        _core.gguf_quantize_cuda(dst, 0, 2, 256, 99, dst, 0)
    with pytest.raises(ValueError, match="rows must be positive"):
        _core.gguf_quantize_cuda(dst, 0, 0, 256, 12, dst, 0)
    with pytest.raises(ValueError, match="src is a null pointer"):
        _core.gguf_quantize_cuda(0, 0, 2, 256, 12, dst, 0)
    with pytest.raises(ValueError, match="dst is a null pointer"):
        _core.gguf_quantize_cuda(dst, 0, 2, 256, 12, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        _core.gguf_quantize_cuda(dst, 7, 2, 256, 12, dst, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this call would launch on made-up pointers")
def test_core_cuda_entry_raises_without_a_gpu():
    """Without a usable GPU the CUDA entry point raises RuntimeError: the stub of a CPU-only build,
    or the launch error of a CUDA build."""
    with pytest.raises(RuntimeError, match="built without CUDA|gguf pack_kquant_kernel launch failed"):
        _core.gguf_quantize_cuda(1 << 20, 0, 2, 256, 12, 1 << 21, 0)
