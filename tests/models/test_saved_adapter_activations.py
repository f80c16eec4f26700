"""The fused LoRA functions keep H = X A^T from the forward for dB in backward instead of recomputing it
(a product that reads all of X again): no X A^T product runs in backward, and the gradients are those of
plain autograd on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraforge.models.base_weight import dense_weight
from loraforge.models.lora_autograd import LoRALinearFunction, LoRAMLPFunction, LoRAProjection, LoRAQKVFunction

bnb = pytest.importorskip("bitsandbytes")

ROWS, HIDDEN = 7, 32


class _MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every mm / addmm (addmm: its two matrix operands)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        elif func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default, torch.ops.aten.addmm.out):
            self.shapes.append((tuple(args[1].shape), tuple(args[2].shape)))
        return func(*args, **(kwargs or {}))


def _projection(inputs: int, out: int, rank: int, nf4: bool) -> LoRAProjection:
    if nf4:
        base = bnb.nn.Linear4bit(inputs, out, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        base.weight = bnb.nn.Params4bit(torch.randn(out, inputs), requires_grad=False, quant_type="nf4")
        base = base.to("cpu")  # quantizes
    else:
        base = torch.nn.Linear(inputs, out, bias=False).requires_grad_(False)
    A = torch.nn.Parameter(torch.randn(rank, inputs) / inputs**0.5)
    B = torch.nn.Parameter(torch.randn(out, rank) / rank**0.5)
    return LoRAProjection(base, A, B, 0.37 * rank)


def _reference(proj: LoRAProjection, x: torch.Tensor) -> torch.Tensor:
    return x @ dense_weight(proj.base, x.dtype).t() + proj.scaling * (x @ proj.A.t()) @ proj.B.t()


def _x_times_a_products(shapes, rows: int, inputs: int, ranks) -> int:
    return sum(a == (rows, inputs) and b == (inputs, r) for a, b in shapes for r in ranks)


def _assert_close(got, want):
    """fp32 products summed in another order: the tolerance on the gradient's own scale."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * want.abs().max().item())


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def test_output_projection_reuses_h():
    proj = _projection(HIDDEN, 40, 5, nf4=False)
    x = torch.randn(ROWS, HIDDEN, requires_grad=True)
    dy = torch.randn(ROWS, 40)
    forward, backward = _MatmulShapes(), _MatmulShapes()
    with forward:
        y = LoRALinearFunction.apply(x, proj.A, proj.B, proj)
    with backward:
        got = _grads((y * dy).sum(), (x, proj.A, proj.B))
    assert _x_times_a_products(forward.shapes, ROWS, HIDDEN, [5]) == 1
    assert _x_times_a_products(backward.shapes, ROWS, HIDDEN, [5]) == 0
    want = _grads((_reference(proj, x) * dy).sum(), (x, proj.A, proj.B))
    for g, w in zip(got, want):
        _assert_close(g, w)


@pytest.mark.parametrize("nf4", [True, False], ids=["stacked-nf4", "per-projection-16bit"])
def test_qkv_reuses_h(nf4):
    projs = (_projection(HIDDEN, 16, 4, nf4), _projection(HIDDEN, 8, 6, nf4), _projection(HIDDEN, 12, 2, nf4))
    params = [t for p in projs for t in (p.A, p.B)]
    x = torch.randn(ROWS, HIDDEN, requires_grad=True)
    dys = [torch.randn(ROWS, p.B.shape[0]) for p in projs]
    forward, backward = _MatmulShapes(), _MatmulShapes()
    with forward:
        ys = LoRAQKVFunction.apply(x, *params, *projs)
    with backward:
        got = _grads(sum((y * dy).sum() for y, dy in zip(ys, dys)), (x, *params))
    ranks = [12] if nf4 else [4, 6, 2]  # stacked: one X [A_q; A_k; A_v]^T
    assert _x_times_a_products(forward.shapes, ROWS, HIDDEN, ranks) == len(ranks)
    assert _x_times_a_products(backward.shapes, ROWS, HIDDEN, ranks) == 0
    want = _grads(sum((_reference(p, x) * dy).sum() for p, dy in zip(projs, dys)), (x, *params))
    for g, w in zip(got, want):
        _assert_close(g, w)


@pytest.mark.parametrize("nf4", [True, False], ids=["stacked-nf4", "per-projection-16bit"])
def test_mlp_reuses_h_of_gate_up_and_down(nf4):
    inter = 24
    gate, up, down = _projection(HIDDEN, inter, 4, nf4), _projection(HIDDEN, inter, 6, nf4), _projection(inter, HIDDEN, 3, nf4)
    params = [t for p in (gate, up, down) for t in (p.A, p.B)]
    x = torch.randn(ROWS, HIDDEN, requires_grad=True)
    dout = torch.randn(ROWS, HIDDEN)
    forward, backward = _MatmulShapes(), _MatmulShapes()
    with forward:
        out = LoRAMLPFunction.apply(x, *params, gate, up, down, "silu")
    with backward:
        got = _grads((out * dout).sum(), (x, *params))
    gate_up_ranks = [10] if nf4 else [4, 6]
    assert _x_times_a_products(forward.shapes, ROWS, HIDDEN, gate_up_ranks) == len(gate_up_ranks)
    assert _x_times_a_products(forward.shapes, ROWS, inter, [3]) == 1  # Hm A_d^T
    assert _x_times_a_products(backward.shapes, ROWS, HIDDEN, gate_up_ranks) == 0
    assert _x_times_a_products(backward.shapes, ROWS, inter, [3]) == 0
    hm = torch.nn.functional.silu(_reference(gate, x)) * _reference(up, x)
    want = _grads((_reference(down, hm) * dout).sum(), (x, *params))
    for g, w in zip(got, want):
        _assert_close(g, w)
