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
