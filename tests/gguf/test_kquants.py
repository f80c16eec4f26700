"""GGUF block packing against llama.cpp itself (the format's owner), byte for byte.

The oracle is llama.cpp's `ggml_quantize_chunk` with no importance matrix and its `to_float`
dequantizers, from the `libggml-base` that `llama-cpp-python` builds (see _ggml_oracle.py). Inputs
are fresh random matrices each run (the seed is printed on failure), chosen to reach every branch
of the reference quantizers: all-zero groups and blocks, constant groups, one-signed data,
outliers, values on the integer grid (rounding ties), magnitudes from subnormal to near FLT_MAX
(where ggml's own arithmetic overflows to inf and NaN, which we must reproduce too).
"""

import numpy as np
import pytest
import torch

from loraforge import _core, gguf
from tests.gguf._ggml_oracle import GGML, find_libggml_base

QUANTIZED = ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K")
PLAIN = ("F32", "F16", "BF16")
ROWS = (1, 3, 17)
COLS = {32: (32, 96, 256, 4096), 256: (256, 512, 4096)}

# Round-trip RMS error relative to the RMS of standard-normal data: about 1.25x what llama.cpp's
# quantizers reach on such data (measured: Q8_0 0.0051, Q6_K 0.017, Q5_K 0.035, Q4_K 0.070,
# Q4_0 0.082, Q3_K 0.147, Q2_K 0.288).
MAX_RELATIVE_RMS = {"Q8_0": 0.0065, "Q6_K": 0.022, "Q5_K": 0.044, "Q4_K": 0.088, "Q4_0": 0.1,
                    "Q3_K": 0.185, "Q2_K": 0.36, "F16": 5e-4, "BF16": 4e-3, "F32": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the oracle) is not installed")
    path = find_libggml_base()
    if path is None:
        pytest.skip("llama-cpp-python is installed but its libggml-base was not found")
    return GGML(path)


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def _groups(rng, rows, cols, size):
    """One random standard-normal scale per group of `size` values, as a broadcastable array."""
    return rng.standard_normal((rows, cols // size, 1))


def make_input(kind, rng, rows, cols):
    shape = (rows, cols)
    normal = rng.standard_normal(shape)
    if kind == "normal":
        x = normal
    elif kind == "outliers":  # a few values 100-1000x the rest, as in real weight matrices
        x = normal.copy()
        hits = rng.random(shape) < 0.01
        x[hits] *= rng.uniform(100, 1000, hits.sum())
    elif kind == "lognormal":  # magnitudes spread over many decades within each block
        x = normal * np.exp(rng.standard_normal(shape) * 3)
    elif kind == "zeros":  # zero rows, zero 256-blocks, zero 16/32-groups, scattered zeros
        x = normal.copy()
        x[rng.random(shape) < 0.3] = 0
        for size in (16, 32, 256):
            g = x.reshape(rows, cols // size, size) if cols % size == 0 else None
            if g is not None:
                g[rng.random((rows, cols // size)) < 0.2] = 0
        x[rng.random(rows) < 0.3] = 0
    elif kind == "constant":  # constant groups of 16 and 32 (either sign), some whole blocks
        size = 16 if rng.random() < 0.5 else 32
        x = np.broadcast_to(_groups(rng, rows, cols, size), (rows, cols // size, size)).reshape(shape).copy()
        if cols % 256 == 0:
            blocks = x.reshape(rows, cols // 256, 256)
            blocks[rng.random((rows, cols // 256)) < 0.3] = rng.standard_normal()
    elif kind == "one_signed":
        x = np.abs(normal) * (1 if rng.random() < 0.5 else -1)
        x[:, ::7] = 0 if rng.random() < 0.5 else x[:, ::7]
    elif kind == "integers":  # exact grid values: ties in every rounding step
        x = rng.integers(-8, 9, shape).astype(np.float64) * rng.choice([0.25, 1.0, 3.0])
    elif kind == "huge":  # squares overflow fp32; scales may overflow fp16
        x = normal * 10.0 ** rng.uniform(15, 38)
    elif kind == "tiny":  # down to subnormals, where reciprocals overflow
        x = normal * 10.0 ** rng.uniform(-44, -25)
    elif kind == "mixed_magnitudes":  # each group of 32 its own decade, 1e-44 .. 1e38
        x = (normal.reshape(rows, cols // 32, 32) * 10.0 ** rng.integers(-44, 38, (rows, cols // 32, 1))).reshape(shape)
    else:
        raise AssertionError(kind)
    x = np.clip(x, -3.4e38, 3.4e38)
    return np.ascontiguousarray(x, dtype=np.float32)


KINDS = ("normal", "outliers", "lognormal", "zeros", "constant", "one_signed", "integers", "huge", "tiny",
         "mixed_magnitudes")  # fmt: skip


def shapes_for(qtype):
    return [(rows, cols) for rows in ROWS for cols in COLS[gguf.TYPES[qtype].block_elems]]


def assert_same_bits(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    same = ours.view(np.uint32) == theirs.view(np.uint32)
    assert same.all(), f"{(~same).sum()} values differ, first at {np.argwhere(~same)[0]}"


def bad_blocks(ours, theirs, block_bytes):
    differs = (ours != theirs).reshape(-1, block_bytes).any(axis=1)
    return np.flatnonzero(differs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_bytes_and_values_match_llama_cpp(ggml, rng, qtype, kind):
    t = gguf.TYPES[qtype]
    for rows, cols in shapes_for(qtype):
        x = make_input(kind, rng, rows, cols)
        ours = gguf.quantize(x, qtype)
        theirs = ggml.quantize(x, t.id)
        assert ours.shape == theirs.shape == (rows, cols // t.block_elems * t.block_bytes)
        bad = bad_blocks(ours, theirs, t.block_bytes)
        assert bad.size == 0, f"{qtype} {kind} {rows}x{cols}: {bad.size} blocks differ, first {bad[:5]}"
        assert_same_bits(gguf.dequantize(ours, qtype, (rows, cols)), ggml.dequantize(theirs, t.id, (rows, cols)))


@pytest.mark.parametrize("qtype", PLAIN)
def test_plain_types_match_llama_cpp(ggml, rng, qtype):
    t = gguf.TYPES[qtype]
    for kind in ("normal", "huge", "tiny", "integers"):
        x = make_input(kind, rng, 3, 512)
        x[0, :4] = [np.nan, -np.nan, np.inf, -np.inf]  # special values convert as ggml converts them
        ours = gguf.quantize(x, qtype)
        theirs = ggml.quantize(x, t.id)
        np.testing.assert_array_equal(ours, theirs)
        assert_same_bits(gguf.dequantize(ours, qtype, x.shape), ggml.dequantize(theirs, t.id, x.shape))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's own inf * 0 where an fp16 scale overflowed
@pytest.mark.parametrize("qtype", QUANTIZED + PLAIN)
def test_dequantize_matches_gguf_py(rng, qtype):
    """gguf-py (llama.cpp's own Python reader) decodes our bytes to the same float32 values."""
    gguf_py = pytest.importorskip("gguf")
    x = make_input("lognormal", rng, 5, 1024)
    ours = gguf.quantize(x, qtype)
    theirs = gguf_py.quants.dequantize(ours, gguf_py.GGMLQuantizationType(gguf.TYPES[qtype].id))
    assert_same_bits(gguf.dequantize(ours, qtype, x.shape), theirs.reshape(x.shape).astype(np.float32))


@pytest.mark.parametrize("qtype", QUANTIZED + PLAIN)
def test_round_trip_error(rng, qtype):
    x = make_input("normal", rng, 16, 4096)
    y = gguf.dequantize(gguf.quantize(x, qtype), qtype, x.shape)
    relative = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    assert relative <= MAX_RELATIVE_RMS[qtype], relative
    # Every block keeps its scale: no value is off by more than the block's own range.
    elems = max(gguf.TYPES[qtype].block_elems, 32)
    span = np.abs(x).reshape(-1, elems).max(axis=1, keepdims=True)
    assert (np.abs(y - x).reshape(-1, elems) <= span).all()


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_threads_do_not_change_the_result(rng, qtype):
    elems = gguf.TYPES[qtype].block_elems
    x = make_input("lognormal", rng, 64 if elems == 256 else 1024, 4096)  # enough blocks for 4 threads
    one = gguf.quantize(x, qtype, num_threads=1)
    np.testing.assert_array_equal(gguf.quantize(x, qtype, num_threads=4), one)
    assert_same_bits(gguf.dequantize(one, qtype, x.shape, num_threads=4),
                     gguf.dequantize(one, qtype, x.shape, num_threads=1))  # fmt: skip


# ---- the Python API: inputs, type names, errors ---------------------------------------------------


def test_type_table_matches_gguf_py():
    gguf_py = pytest.importorskip("gguf")
    for t in gguf.TYPES.values():
        assert gguf_py.GGMLQuantizationType[t.name] == t.id
        assert gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(t.id)] == (t.block_elems, t.block_bytes)


def test_qtype_spellings(rng):
    x = make_input("normal", rng, 2, 256)
    expected = gguf.quantize(x, "Q4_K")
    for spelling in ("q4_k", " Q4_K ", 12, np.int64(12), gguf.TYPES["Q4_K"]):
        np.testing.assert_array_equal(gguf.quantize(x, spelling), expected)
    gguf_py = pytest.importorskip("gguf")
    np.testing.assert_array_equal(gguf.quantize(x, gguf_py.GGMLQuantizationType.Q4_K), expected)


def test_torch_and_non_contiguous_inputs(rng):
    x = make_input("normal", rng, 4, 512)
    expected = gguf.quantize(x, "q6_k")
    np.testing.assert_array_equal(gguf.quantize(torch.from_numpy(x), "q6_k"), expected)
    np.testing.assert_array_equal(gguf.quantize(torch.from_numpy(x).requires_grad_(), "q6_k"), expected)
    # Non-contiguous input is copied, not rejected.
    wide = np.repeat(x, 2, axis=1)[:, ::2]
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(gguf.quantize(wide, "q6_k"), expected)
    np.testing.assert_array_equal(gguf.quantize(torch.from_numpy(np.ascontiguousarray(x.T)).T, "q6_k"), expected)
    # dequantize takes numpy, torch and bytes.
    values = gguf.dequantize(expected, "q6_k", x.shape)
    assert_same_bits(gguf.dequantize(torch.from_numpy(expected), "q6_k", x.shape), values)
    assert_same_bits(gguf.dequantize(expected.tobytes(), "q6_k", x.shape), values)


@pytest.mark.parametrize(
    "x, qtype, error, match",
    [
        (np.zeros((2, 256), np.float64), "q4_k", TypeError, "x must be float32"),
        (torch.zeros(2, 256, dtype=torch.bfloat16), "q4_k", TypeError, "x must be float32"),
        ([[0.0] * 256], "q4_k", TypeError, "x must be a numpy array or a torch tensor"),
        (np.zeros(256, np.float32), "q4_k", ValueError, "matrix"),
        (np.zeros((2, 1, 256), np.float32), "q4_k", ValueError, "matrix"),
        (np.zeros((0, 256), np.float32), "q4_k", ValueError, "at least one row"),
        (np.zeros((2, 384), np.float32), "q4_k", ValueError, "multiple of 256"),
        (np.zeros((2, 48), np.float32), "q8_0", ValueError, "multiple of 32"),
        (np.zeros((2, 256), np.float32), "q9_k", ValueError, "qtype 'q9_k'"),
        (np.zeros((2, 256), np.float32), 3, ValueError, "qtype 3"),
        (np.zeros((2, 256), np.float32), 4.0, TypeError, "qtype must be"),
        (np.full((2, 256), np.nan, np.float32), "q4_k", ValueError, "NaN or infinite"),
        (np.full((2, 256), np.inf, np.float32), "q8_0", ValueError, "NaN or infinite"),
    ],
)
def test_quantize_rejects_bad_arguments(x, qtype, error, match):
    with pytest.raises(error, match=match):
        gguf.quantize(x, qtype)


def test_dequantize_rejects_bad_arguments():
    data = gguf.quantize(np.zeros((2, 256), np.float32), "q4_k")
    with pytest.raises(ValueError, match="holds 288 bytes"):
        gguf.dequantize(data, "q4_k", (3, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf.dequantize(data, "q4_k", (1, 300))
    with pytest.raises(ValueError, match=r"shape must be \(rows, cols\)"):
        gguf.dequantize(data, "q4_k", (576,))
    with pytest.raises(TypeError, match="data must be uint8"):
        gguf.dequantize(data.view(np.int8), "q4_k", (2, 256))


def test_core_checks_sizes_again():
    """_core raises ValueError (never crashes) when called directly with bad sizes."""
    x = np.zeros((2, 256), np.float32)
    out = np.zeros(2 * 144, np.uint8)
    with pytest.raises(ValueError, match="multiple of 256"):
        _core.gguf_quantize_cpu(x.ctypes.data, 2, 128, 12, out.ctypes.data, 1)
    with pytest.raises(ValueError, match="not a GGUF type"):
        _core.gguf_quantize_cpu(x.ctypes.data, 2, 256, 99, out.ctypes.data, 1)
    with pytest.raises(ValueError, match="rows must be positive"):
        _core.gguf_dequantize_cpu(out.ctypes.data, 0, 256, 12, x.ctypes.data, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _core.gguf_quantize_cpu(0, 2, 256, 12, out.ctypes.data, 1)
    with pytest.raises(ValueError, match="not a GGUF type"):
        _core.gguf_block_info(1)
    assert _core.gguf_block_info(14) == (256, 210)
