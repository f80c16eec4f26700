"""NF4 ops against bitsandbytes (the format's owner) and against our pure-torch reference."""

import warnings

import pytest
import torch

import loraforge
from loraforge.ops import nf4 as nf4_ops

F = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd sizes on purpose: element counts not a multiple of the blocksize, odd element counts, one element.
SHAPES = ((77, 130), (4097,), (5, 192), (1,), (3, 7, 33), (64, 4096 + 64))


def random_weight(shape, dtype, device="cpu"):
    """Normal values with magnitudes spread over many decades (kept inside the dtype's range)."""
    spread = 6.0 if dtype == torch.float32 else 2.0
    w = torch.randn(shape, device=device) * torch.exp(torch.randn(shape, device=device) * spread)
    info = torch.finfo(dtype)
    return w.clamp(-info.max / 4, info.max / 4).to(dtype)


def bnb_dequantize_flat(packed, state, dtype=None):
    """bitsandbytes' dequantization over the flat layout. (Its CPU C++ kernel in 0.50.2 mis-indexes
    2-D shapes whose rows are not a whole number of blocks; its default and CUDA kernels, and the
    format itself, index the flat tensor, which is what we match.)"""
    n = state.shape.numel()
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    out = torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.view(torch.uint8).reshape(-1, 1), absmax.float(), state.blocksize, "nf4", (n,), dtype or state.dtype
    )
    return out.reshape(state.shape)


def _equal(a, b):
    return a.device == b.device and torch.equal(a, b)


def assert_same_state(ours, theirs):
    assert _equal(ours.absmax, theirs.absmax), "absmax: " + _first_diff(ours.absmax, theirs.absmax)
    assert ours.blocksize == theirs.blocksize and ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert _equal(ours.code, theirs.code) and ours.quant_type == theirs.quant_type == "nf4"
    assert ours.nested == theirs.nested
    if theirs.nested:
        assert _equal(ours.offset, theirs.offset)
        assert _equal(ours.state2.absmax, theirs.state2.absmax)
        assert _equal(ours.state2.code, theirs.state2.code)
        assert ours.state2.blocksize == theirs.state2.blocksize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("compress", (False, True))
def test_quantize_and_dequantize_match_bitsandbytes(seed, dtype, blocksize, compress):
    for shape in SHAPES:
        w = random_weight(shape, dtype)
        theirs_packed, theirs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
        packed, state = loraforge.nf4.quantize(w, blocksize=blocksize, compress_statistics=compress)
        assert packed.dtype == torch.uint8 and packed.shape == theirs_packed.shape
        assert torch.equal(packed, theirs_packed), shape
        assert_same_state(state, theirs)
        for out_dtype in DTYPES:
            ours = loraforge.nf4.dequantize(packed, state, out_dtype=out_dtype)
            expected = bnb_dequantize_flat(theirs_packed, theirs, out_dtype)
            assert ours.dtype == out_dtype and ours.shape == w.shape
            assert torch.equal(ours, expected), (shape, out_dtype)


def test_dequantize_matches_bitsandbytes_public_call_where_its_cpu_kernel_is_right(seed):
    # Rows that are whole blocks: bitsandbytes' own dequantize_4bit on CPU is right, and we equal it.
    w = random_weight((96, 256), torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(loraforge.nf4.dequantize(packed, state), F.dequantize_4bit(packed, state))


def test_reference_kernel_equals_compiled_kernel(seed):
    for shape in SHAPES:
        w = random_weight(shape, torch.float32)
        for blocksize in (32, 256, 4096):
            ref_packed, ref_absmax = nf4_ops.nf4_quantize_reference(w, blocksize)
            packed, absmax = torch.ops.loraforge.nf4_quantize(w, blocksize)
            assert torch.equal(ref_packed, packed) and torch.equal(ref_absmax, absmax)
            for dtype in DTYPES:
                ref = nf4_ops.nf4_dequantize_reference(packed, absmax, blocksize, w.shape, dtype)
                assert torch.equal(ref, torch.ops.loraforge.nf4_dequantize(packed, absmax, blocksize, w.shape, dtype))


def test_edge_values(seed):
    """All-zero blocks, a constant block, tiny and huge magnitudes, exact NF4 levels and midpoints."""
    levels = nf4_ops.nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2
    pieces = [
        torch.zeros(64 * 3),  # all-zero blocks
        torch.full((64,), 0.37),  # constant block
        torch.randn(64) * 1e-30,
        torch.randn(64) * 1e30,
        torch.randn(64) * 1e-40,  # subnormal
        torch.cat([levels, -levels, levels * 0.5, levels * 3.0]),  # levels land exactly
        torch.cat([midpoints, torch.tensor([1.0]), -midpoints, torch.tensor([-1.0])]) * 7.0,
        torch.zeros(33),  # all-zero partial tail block
    ]
    w = torch.cat(pieces)
    for compress in (False, True):
        for blocksize in (32, 64):
            theirs_packed, theirs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress,
                                                    quant_type="nf4")  # fmt: skip
            packed, state = loraforge.nf4.quantize(w, blocksize=blocksize, compress_statistics=compress)
            assert torch.equal(packed, theirs_packed)
            assert_same_state(state, theirs)
            assert torch.equal(loraforge.nf4.dequantize(packed, state), bnb_dequantize_flat(theirs_packed, theirs))


def test_quant_storage_and_params4bit(seed):
    bnb = pytest.importorskip("bitsandbytes")
    w = random_weight((64, 96), torch.bfloat16)
    for storage in (torch.uint8, torch.bfloat16, torch.float32):
        packed, state = loraforge.nf4.quantize(w, quant_storage=storage)
        theirs_packed, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                           quant_storage=storage)  # fmt: skip
        assert packed.dtype == storage and packed.shape == theirs_packed.shape
        assert torch.equal(packed.view(torch.uint8), theirs_packed.view(torch.uint8))
        assert torch.equal(loraforge.nf4.dequantize(packed, state), bnb_dequantize_flat(theirs_packed, state))

    layer = bnb.nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=128,
                                     compress_statistics=False)  # fmt: skip
    packed, state = loraforge.nf4.quantize(layer)  # not yet quantized: uses its own settings
    assert state.blocksize == 128 and not state.nested
    # bitsandbytes quantizes on moving to a device; on CPU, do it through its own quantize_4bit.
    qpacked, qstate = F.quantize_4bit(w, blocksize=128, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed, qpacked)
    param = bnb.nn.Params4bit(qpacked, requires_grad=False, quant_state=qstate, quant_type="nf4",
                              blocksize=128, bnb_quantized=True)  # fmt: skip
    assert torch.equal(loraforge.nf4.dequantize(param), bnb_dequantize_flat(qpacked, qstate))
    layer.weight = param
    assert torch.equal(loraforge.nf4.dequantize(layer), bnb_dequantize_flat(qpacked, qstate))
    with pytest.raises(ValueError, match="already quantized"):
        loraforge.nf4.quantize(param)


def test_opcheck_and_compile(seed):
    w = random_weight((40, 96), torch.float32)
    packed, absmax = torch.ops.loraforge.nf4_quantize(w, 64)
    packed_n, state = loraforge.nf4.quantize(w, compress_statistics=True)
    s2 = state.state2
    cases = [
        (torch.ops.loraforge.nf4_quantize.default, (w, 64)),
        (torch.ops.loraforge.nf4_dequantize.default, (packed, absmax, 64, [40, 96], torch.bfloat16)),
        (torch.ops.loraforge.nf4_dequantize_nested.default,
         (packed_n.view(-1), state.absmax, s2.code, s2.absmax, state.offset.reshape(1), 64, 256, [40, 96],
          torch.float16)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args)

    def dequant_then_matmul(packed, absmax, x):
        weight = torch.ops.loraforge.nf4_dequantize(packed, absmax, 64, [40, 96], torch.float32)
        return x @ weight.t()

    x = torch.randn(3, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(dequant_then_matmul, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(packed, absmax, x), dequant_then_matmul(packed, absmax, x))


def test_bad_input_raises_clear_errors():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        loraforge.nf4.quantize(w, blocksize=48)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        loraforge.nf4.quantize(w.to(torch.int32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        loraforge.nf4.quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="at least one element"):
        loraforge.nf4.quantize(torch.empty(0))
    with pytest.raises(ValueError, match="on cpu or cuda"):
        loraforge.nf4.quantize(torch.randn(4, 64, device="meta"))
    packed, state = loraforge.nf4.quantize(w, compress_statistics=False)
    with pytest.raises(ValueError, match="quant_state is required"):
        loraforge.nf4.dequantize(packed)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        loraforge.nf4.dequantize(packed.reshape(4, 64).t(), state)
    with pytest.raises(ValueError, match="needs 256"):
        loraforge.nf4.dequantize(packed[:-2], state)
    with pytest.raises(TypeError, match="out_dtype"):
        loraforge.nf4.dequantize(packed, state, out_dtype=torch.int8)
    state.quant_type = "fp4"
    with pytest.raises(NotImplementedError, match="only NF4"):
        loraforge.nf4.dequantize(packed, state)
    state.quant_type = "nf4"
    with pytest.raises(ValueError, match="absmax holds"):
        torch.ops.loraforge.nf4_dequantize(packed.view(-1), state.absmax[:-1], 64, [8, 64], torch.float32)
    with pytest.raises(TypeError, match="absmax must be float32"):
        torch.ops.loraforge.nf4_dequantize(packed.view(-1), state.absmax.half(), 64, [8, 64], torch.float32)


def test_core_rechecks_sizes():
    from loraforge import _core

    with pytest.raises(ValueError, match="blocksize must be one of"):
        _core.nf4_dequantize_cpu(1, 1, 10, 65, 1, 0, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _core.nf4_dequantize_cpu(0, 1, 10, 64, 1, 0, 1)
    with pytest.raises(ValueError, match="dtype code"):
        _core.nf4_quantize_cpu(1, 7, 10, 64, 1, 1, 1)
    with pytest.raises(ValueError, match="absmax2 holds"):
        _core.nf4_dequantize_nested_cpu(1, 1, 1, 1, 1, 5, 256, 64 * 300, 64, 1, 0, 1)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", (False, True))
def test_cuda_matches_bitsandbytes_cuda_and_our_cpu(seed, dtype, compress):
    for blocksize in BLOCKSIZES:
        for shape in SHAPES + ((1024, 1000),):
            w = random_weight(shape, dtype, device="cuda")
            packed, state = loraforge.nf4.quantize(w, blocksize=blocksize, compress_statistics=compress)
            theirs_packed, theirs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress,
                                                    quant_type="nf4")  # fmt: skip
            where = f"blocksize {blocksize}, shape {shape}"
            assert torch.equal(packed, theirs_packed), f"packed bytes vs bitsandbytes CUDA, {where}: " + _first_diff(
                packed, theirs_packed, w)
            assert_same_state(state, theirs)
            cpu_packed, _ = loraforge.nf4.quantize(w.cpu(), blocksize=blocksize, compress_statistics=compress)
            _assert_codes_nearly_equal(packed.cpu(), cpu_packed, where)
            for out_dtype in DTYPES:
                ours = loraforge.nf4.dequantize(packed, state, out_dtype=out_dtype)
                theirs_out = (F.dequantize_4bit(theirs_packed, theirs).to(out_dtype) if out_dtype == dtype
                              else bnb_dequantize_flat(theirs_packed, theirs, out_dtype))  # fmt: skip
                assert torch.equal(ours, theirs_out), f"dequantized to {out_dtype} vs bitsandbytes, {where}: " + (
                    _first_diff(ours, theirs_out))
                cpu_state = _state_to(state, "cpu")
                cpu_out = loraforge.nf4.dequantize(packed.cpu(), cpu_state, out_dtype=out_dtype)
                assert torch.equal(ours.cpu(), cpu_out), f"dequantized to {out_dtype} vs our CPU, {where}: " + (
                    _first_diff(ours.cpu(), cpu_out))


def _assert_codes_nearly_equal(cuda_packed, cpu_packed, where):
    """Our CUDA codes against our CPU codes, which follow bitsandbytes' CUDA and CPU paths: those differ
    where the CUDA path's approximate reciprocal moves x / absmax across a midpoint, a neighbouring
    code in about one element in ten million. Anything else (another code, many elements) is a bug."""
    def nibbles(packed):
        b = packed.reshape(-1).to(torch.int16)
        return torch.stack([b >> 4, b & 15], 1).reshape(-1)

    a, b = nibbles(cuda_packed), nibbles(cpu_packed)
    differ = a != b
    assert int(differ.sum()) <= max(2, a.numel() // 100_000), f"CUDA vs our CPU codes, {where}: {int(differ.sum())}"
    assert bool(((a - b).abs()[differ] == 1).all()), f"CUDA vs our CPU codes more than one level apart, {where}"


def _first_diff(a, b, source=None) -> str:
    """Where two tensors first differ, for a failure message (with the input element(s) behind it)."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    flat_a, flat_b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
    where = (flat_a != flat_b) & ~(flat_a.isnan() & flat_b.isnan()) if a.is_floating_point() else flat_a != flat_b
    i = int(where.nonzero()[0]) if where.any() else -1
    text = f"{int(where.sum())} differ; first at {i}: {flat_a[i].item()!r} vs {flat_b[i].item()!r}"
    if source is not None and i >= 0:
        text += f"; input {source.reshape(-1)[2 * i : 2 * i + 2].tolist()}"  # the two elements of that byte
    return text


def _state_to(state, device):
    import copy

    moved = copy.deepcopy(state)  # QuantState.to moves in place, nested state included
    moved.to(device)
    return moved


def _around_midpoints_at_unit_absmax(midpoints: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """Each fp32 midpoint and its neighbours up to `ulps` ulps either side, in groups of 31 followed by a
    1.0, so that every 32-element block (and so every larger one) has absmax 1 and x * (1 / absmax) is x:
    the quantizer's thresholds are then compared with exactly these values. Padded to 128 elements."""
    near, up, down = [midpoints], midpoints, midpoints
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    values = torch.cat(near)
    groups = [torch.cat([chunk, torch.zeros(31 - chunk.numel()), torch.ones(1)]) for chunk in values.split(31)]
    out = torch.cat(groups)
    return torch.cat([out, torch.zeros(-out.numel() % 128)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_edge_values_match_bitsandbytes_cuda(seed, dtype):
    """Where bitsandbytes' CUDA quantizer (fast math) and its CPU one part ways: all-zero full and
    partial blocks (0 * inf = NaN, code 0), subnormals (flushed to zero), tiny and huge magnitudes,
    values exactly on levels and midpoints, values within two ulps of each midpoint at absmax 1 (where its
    compiled thresholds, not quite the fp32 midpoints, decide), an odd length (the pad nibble)."""
    levels = nf4_ops.nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2
    pieces = [torch.zeros(64 * 3), torch.full((64,), 0.37), torch.randn(64) * 1e-30, torch.randn(64) * 1e30,
              torch.randn(64) * 1e-40, torch.cat([levels, -levels, levels * 0.5, levels * 3.0]),
              torch.cat([midpoints, torch.tensor([1.0]), -midpoints, torch.tensor([-1.0])]) * 7.0,
              torch.zeros(96), _around_midpoints_at_unit_absmax(midpoints), torch.zeros(33)]  # fmt: skip
    info = torch.finfo(dtype)
    w = torch.cat(pieces).clamp(-info.max / 4, info.max / 4).to(dtype).cuda()
    for blocksize in (32, 64, 128):
        theirs_packed, theirs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
        packed, state = loraforge.nf4.quantize(w, blocksize=blocksize, compress_statistics=False)
        where = f"blocksize {blocksize}"
        assert torch.equal(packed, theirs_packed), f"packed vs bitsandbytes CUDA, {where}: " + _first_diff(
            packed, theirs_packed, w)
        assert torch.equal(state.absmax, theirs.absmax), f"absmax, {where}: " + _first_diff(state.absmax, theirs.absmax)
        ours = loraforge.nf4.dequantize(packed, state)
        assert torch.equal(ours, F.dequantize_4bit(theirs_packed, theirs)), f"dequantized, {where}"


@pytest.mark.gpu
def test_cuda_unaligned_view_and_streams(seed):
    w = random_weight((33, 64), torch.bfloat16, device="cuda")
    packed, state = loraforge.nf4.quantize(w, compress_statistics=False)
    storage = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    storage[1:].copy_(packed.view(-1))
    unaligned = storage[1:]  # data_ptr not 16-byte aligned: the scalar path must serve it
    assert torch.equal(loraforge.nf4.dequantize(unaligned, state), loraforge.nf4.dequantize(packed, state))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = loraforge.nf4.dequantize(packed, state)
    stream.synchronize()
    assert torch.equal(out, loraforge.nf4.dequantize(packed, state))
