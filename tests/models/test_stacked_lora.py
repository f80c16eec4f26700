"""stacked_lora.stacked_adapters: the stacked A and block-diagonal Bd, exactly the per-projection
adapters (s_i B_i rounded once to the compute dtype), and rebuilt whenever an adapter changes."""

import pytest
import torch

from loraforge.models import stacked_lora
from loraforge.models.lora_autograd import LoRAProjection

bnb = pytest.importorskip("bitsandbytes")


def _projections(ranks=(4, 6, 2), outs=(16, 8, 8), inputs=32):
    projs = []
    for rank, out in zip(ranks, outs):
        base = bnb.nn.Linear4bit(inputs, out, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        base.weight = bnb.nn.Params4bit(torch.randn(out, inputs), requires_grad=False, quant_type="nf4")
        base = base.to("cpu")  # quantizes
        A, B = torch.nn.Parameter(torch.randn(rank, inputs)), torch.nn.Parameter(torch.randn(out, rank))
        projs.append(LoRAProjection(base, A, B, 0.37 * rank))
    return tuple(projs)


def _to_device(projs, device: str) -> None:
    """The projections' NF4 bases and adapters moved to `device` (built on CPU by _projections)."""
    if device == "cuda":
        for p in projs:
            p.base.cuda()
            p.A.data, p.B.data = p.A.data.cuda(), p.B.data.cuda()


def _expected(projs, dtype):
    a = torch.cat([p.A.detach().to(dtype) for p in projs])
    bd = torch.zeros(sum(p.B.shape[0] for p in projs), sum(p.A.shape[0] for p in projs), dtype=dtype)
    row = col = 0
    for p in projs:
        bd[row : row + p.B.shape[0], col : col + p.A.shape[0]] = p.B.detach() * p.scaling
        row, col = row + p.B.shape[0], col + p.A.shape[0]
    return a, bd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stacked_adapters_are_the_projections_adapters_exactly(dtype):
    projs = _projections()
    assert stacked_lora.stackable(projs)
    a, bd = stacked_lora.stacked_adapters(projs, dtype)
    expected_a, expected_bd = _expected(projs, dtype)
    assert a.dtype == bd.dtype == dtype
    assert torch.equal(a, expected_a) and torch.equal(bd, expected_bd)


def test_stacked_adapters_follow_every_adapter_change():
    projs = _projections()
    first = stacked_lora.stacked_adapters(projs, torch.bfloat16)
    assert stacked_lora.stacked_adapters(projs, torch.bfloat16)[1] is first[1]  # cached while unchanged
    with torch.no_grad():
        projs[2].B.add_(1.0)  # an in-place update of the last projection's B
    second = stacked_lora.stacked_adapters(projs, torch.bfloat16)
    assert second[1] is not first[1] and torch.equal(second[1], _expected(projs, torch.bfloat16)[1])
    projs[1].A.data = torch.randn_like(projs[1].A)  # new storage, no version bump
    third = stacked_lora.stacked_adapters(projs, torch.bfloat16)
    assert torch.equal(third[0], _expected(projs, torch.bfloat16)[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ranks", [(4, 6), (8, 8), (3, 2)])  # R = 10 (padded to 16), 16, 5 (to 8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_outputs_concatenate_the_inner_dimension(device, ranks, dtype, seed, monkeypatch):
    """Y = [X | H] [W | Bd]^T (one matmul, wide outputs) against Y = X W^T + H Bd^T, H the same."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    inputs = 64
    projs = _projections(ranks=ranks, outs=(5 * inputs // 2, 2 * inputs), inputs=inputs)
    _to_device(projs, device)
    x = torch.randn(37, inputs, device=device, dtype=dtype)
    results, calls = [], []
    real = stacked_lora._forward_concat
    monkeypatch.setattr(stacked_lora, "_forward_concat", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ratio in (10**9, 3):  # the two-matmul path, then the concatenated one (O = 4.5 x in)
        monkeypatch.setattr(stacked_lora, "CONCAT_MIN_RATIO", ratio)
        calls.clear()
        results.append(stacked_lora.stacked_forward_h(projs, x))
        assert len(calls) == (ratio == 3)
    (y_two, h_two), (y_one, h_one) = results
    assert torch.equal(h_one, h_two)
    _, bd = stacked_lora.stacked_adapters(projs, dtype)
    w = stacked_lora.stacked_weight(projs, torch.float32, x.device)
    reference = x.double() @ w.double().t() + (h_one.double() @ bd.double().t())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y_one.double(), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())
    torch.testing.assert_close(y_one.double(), y_two.double(), rtol=tolerance,
                               atol=tolerance * reference.abs().max().item())  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_into_rows_of_a_wider_buffer_matches_bit_for_bit(dtype, seed):
    """The CUDA kernel's row-strided output: W in the first columns of a wider buffer, nothing else
    written, the same bits as a contiguous dequantization."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from loraforge.models.base_weight import dense_weight, dequantize_into

    base = bnb.nn.Linear4bit(96, 37, bias=False, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(torch.randn(37, 96), requires_grad=False, quant_type="nf4")
    base = base.cuda()
    expected = dense_weight(base, dtype)
    wide = torch.full((37, 96 + 24), 7.0, dtype=dtype, device="cuda")
    dequantize_into(base, wide[:, :96])
    assert torch.equal(wide[:, :96], expected)
    assert bool((wide[:, 96:] == 7.0).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ranks, outs", [((8, 8), (128, 128)), ((16,), (64,))], ids=["gate-up", "one-projection"])
def test_one_rounding_keeps_lora_contributions_below_half_an_ulp(device, ranks, outs, seed, monkeypatch):
    """bf16, adapters adding ~0.03% of the base output (under half a bf16 ulp for most entries, as early
    in training): Y = round(round(X W^T) + delta) drops most of delta; the concatenated path, rounded
    once, keeps it. Measured as the share of delta that reaches Y: sum((Y - X W^T) delta) / sum(delta^2)
    in float64 (about 0.2 for two roundings, 1.0 for one, over 128k-512k outputs: 0.87-1.11 and at
    most 0.43 over 120 seeds at a quarter of that)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    projs = _projections(ranks=ranks, outs=outs, inputs=64)
    with torch.no_grad():
        for p in projs:
            p.B.mul_(1e-4 / p.B.abs().mean() / p.scaling)
    _to_device(projs, device)
    x = torch.randn(2048, 64, device=device).bfloat16()
    kept = {}
    for name, ratio in (("two roundings", float("inf")), ("one rounding", 1)):
        monkeypatch.setattr(stacked_lora, "CONCAT_MIN_RATIO", ratio)
        y, h = stacked_lora.stacked_forward_h(projs, x)
        _, bd = stacked_lora.stacked_adapters(projs, torch.bfloat16)
        base = x.double() @ stacked_lora.stacked_weight(projs, torch.float32, x.device).double().t()
        delta = h.double() @ bd.double().t()
        kept[name] = (((y.double() - base) * delta).sum() / (delta * delta).sum()).item()
    assert 0.8 < kept["one rounding"] < 1.2, kept
    assert kept["two roundings"] < 0.5, kept


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_input_written_into_a_wide_buffer_needs_no_copy(device, seed):
    """X already in the first columns of a wide_input buffer (how the MLP hands Hm to down): the same Y
    and H, bit for bit, as X passed on its own and copied into [X | H], at a ratio below the threshold."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    projs = _projections(ranks=(6,), outs=(24,), inputs=96)  # down-like: 4x narrower out than in
    _to_device(projs, device)
    x = torch.randn(29, 96, device=device).bfloat16()
    wide = stacked_lora.wide_input(29, projs, x)
    assert wide.shape == (29, 96 + 8)
    wide[:, :96] = x
    y_wide, h_wide = stacked_lora.stacked_forward_h(projs, wide[:, :96], wide)
    y_copy, h_copy = stacked_lora._forward_concat(projs, x, *stacked_lora.stacked_adapters(projs, x.dtype), None)
    assert torch.equal(h_wide, h_copy) and torch.equal(y_wide, y_copy)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_norm_writes_its_output_where_the_concatenation_reads_it(device, seed, monkeypatch):
    """The RMSNorm in front of a stacked product learns the row padding its reader's concatenation needs
    (first call: noted, X copied), then writes its output with rows that far apart, and the product reads
    [X | H] in place: the same Y and H, bit for bit, with no copy of X. A product that does not
    concatenate notes no padding."""
    from loraforge.ops.rmsnorm import rms_norm

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    projs = _projections(ranks=(4, 6, 2), outs=(96, 48, 48), inputs=96)  # Q/K/V-like: ratio 2, R = 12 -> 16
    _to_device(projs, device)
    x = torch.randn(3, 11, 96, device=device).bfloat16()
    weight = torch.randn(96, device=device).bfloat16()
    norm_state = {}
    copies = []
    real_concat = stacked_lora._forward_concat

    def counting_concat(projs, x, a, bd, bias, wide=None):
        if wide is None:
            copies.append(1)  # X is copied into a buffer of _forward_concat's own
        else:
            assert wide.data_ptr() == x.data_ptr() and wide.stride() == (112, 1)
        return real_concat(projs, x, a, bd, bias, wide)

    monkeypatch.setattr(stacked_lora, "_forward_concat", counting_concat)
    expected = None
    for call in range(3):
        y = rms_norm(x, weight, 1e-6, False, norm_state.get(stacked_lora.ROW_PADDING, 0))
        stacked_lora.offer_norm_output(y, norm_state)
        out = stacked_lora.stacked_forward_h(projs, y.reshape(-1, 96))
        assert norm_state[stacked_lora.ROW_PADDING] == 16
        expected = expected or out
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
        assert len(copies) == 1, f"call {call}: X copied {len(copies)} times"
    assert y.stride() == (11 * 112, 112, 1)
    y_plain = rms_norm(x, weight, 1e-6, False)
    assert torch.equal(y, y_plain)
    monkeypatch.setattr(stacked_lora, "CONCAT_MIN_RATIO", 1e9)  # no concatenation: no padding wanted
    stacked_lora.offer_norm_output(y, norm_state)
    stacked_lora.stacked_forward_h(projs, y.reshape(-1, 96))
    assert norm_state[stacked_lora.ROW_PADDING] == 0
    # An output that was not offered (or another tensor) is never written around.
    stacked_lora.offer_norm_output(y_plain, norm_state)
    monkeypatch.setattr(stacked_lora, "CONCAT_MIN_RATIO", 1.0)
    stacked_lora.stacked_forward_h(projs, y.reshape(-1, 96))
    assert norm_state[stacked_lora.ROW_PADDING] == 0 and len(copies) == 2
