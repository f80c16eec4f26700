"""The eager fast path of ops with autograd (ops/_library.py, FastPathOp): the same kernel, setup_context
and backward through one plain autograd.Function instead of torch.library's autograd kernel. It must
give bit-identical outputs and gradients to the dispatcher path, be taken only where it may be, and
step aside for everything else (modes, tracing, keyword arguments)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraforge.ops import cross_entropy as ce_ops
from loraforge.ops import fused_linear_cross_entropy as flce_ops
from loraforge.ops import rmsnorm as rms_ops
from loraforge.ops import rope as rope_ops
from loraforge.ops import swiglu as glu_ops
from loraforge.ops._library import FastPathOp


def _fresh(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def _rope_case(gen):
    q = torch.randn(2, 3, 5, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 1, 5, 16, generator=gen, requires_grad=True)
    angles = torch.randn(2, 5, 8, generator=gen)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return rope_ops.rope, (q, k, cos, sin), (0, 1)


def _glu_case(gen):
    gate = torch.randn(7, 33, generator=gen, requires_grad=True)
    up = torch.randn(7, 33, generator=gen, requires_grad=True)
    return glu_ops.gated_activation, (gate, up, "gelu_tanh", False), (0, 1)


def _ce_case(gen):
    logits = torch.randn(9, 37, generator=gen, requires_grad=True)
    targets = torch.randint(0, 37, (9,), generator=gen)
    targets[2] = -100
    return ce_ops.cross_entropy_op, (logits, targets, -100, 1.0, 0.0, "mean", None, False), (0,)


def _flce_case(gen):
    x = torch.randn(11, 24, generator=gen, requires_grad=True)
    w = torch.randn(29, 24, generator=gen, requires_grad=True)
    t = torch.randint(0, 29, (11,), generator=gen)
    args = (x, w, None, t, -100, 1.0, 0.0, "sum", None, True, True, False, False, 4)
    return flce_ops.fused_linear_cross_entropy_op, args, (0, 1)


def _rms_case(gen):
    x = torch.randn(6, 40, generator=gen, requires_grad=True)
    w = torch.randn(40, generator=gen, requires_grad=True)
    return rms_ops.rms_norm_op, (x, w, 1e-6, False, 0), (0, 1)


def _rms_padded_case(gen):
    x = torch.randn(2, 3, 40, generator=gen, requires_grad=True)
    w = torch.randn(40, generator=gen, requires_grad=True)
    return rms_ops.rms_norm_op, (x, w, 1e-6, False, 24), (0, 1)


CASES = {"rms_norm": _rms_case, "rms_norm_padded": _rms_padded_case, "rope": _rope_case, "gated_activation": _glu_case, "cross_entropy": _ce_case,
         "fused_linear_cross_entropy": _flce_case}  # fmt: skip


def _run(call, args, wrt):
    out = call(*args)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)  # fmt: skip
    grads = torch.autograd.grad(loss, [args[i] for i in wrt])
    return outs, grads, type(outs[0].grad_fn).__name__


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_dispatcher_path_bit_for_bit(case):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    op, args, wrt = CASES[case](gen)
    assert isinstance(op, FastPathOp)
    args_fast = tuple(_fresh(a)[0] if isinstance(a, torch.Tensor) else a for a in args)
    args_slow = tuple(_fresh(a)[0] if isinstance(a, torch.Tensor) else a for a in args)
    outs_fast, grads_fast, node_fast = _run(op, args_fast, wrt)
    outs_slow, grads_slow, node_slow = _run(op._packet, args_slow, wrt)
    assert node_fast.endswith("_eagerBackward") and not node_slow.endswith("_eagerBackward"), (node_fast, node_slow)
    for a, b in zip((*outs_fast, *grads_fast), (*outs_slow, *grads_slow)):
        assert torch.equal(a, b)


def test_no_grad_calls_the_kernel_without_a_node():
    op, args, _ = _glu_case(torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = op(*args)
    assert out.grad_fn is None and torch.equal(out, op._packet(*args).detach())


class _CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_keyword_arguments_take_the_dispatcher():
    op, args, _ = _rope_case(torch.Generator().manual_seed(2))
    with _CountingMode() as mode:
        q_embed, _ = op(*args)
    assert any("loraforge.rope" in name for name in mode.seen)  # the mode saw the op itself
    assert not type(q_embed.grad_fn).__name__.endswith("_eagerBackward")
    q, k, cos, sin = args
    q_embed, _ = op(q, k, cos, sin=sin)
    assert not type(q_embed.grad_fn).__name__.endswith("_eagerBackward")


def test_compile_sees_the_op_as_one_node():
    op, args, _ = _glu_case(torch.Generator().manual_seed(3))
    gate, up = (t.detach() for t in args[:2])
    compiled = torch.compile(lambda g, u: op(g, u, "silu", False), fullgraph=True, backend="eager")
    assert torch.equal(compiled(gate, up), op._packet(gate, up, "silu", False))


def test_attributes_pass_through_to_the_packet():
    assert rope_ops.rope.default is torch.ops.loraforge.rope.default
    torch.library.opcheck(rope_ops.rope.default, _rope_case(torch.Generator().manual_seed(4))[1])


def test_only_plain_cpu_or_cuda_tensors_of_one_device_type_skip_the_dispatcher():
    from loraforge.ops._library import _eager_plain_device

    cpu, meta = torch.zeros(3), torch.zeros(3, device="meta")
    assert _eager_plain_device((cpu, 1.0, "s", cpu)) == "cpu"
    assert _eager_plain_device((meta,)) is None  # another device type: the dispatcher (its fake kernel)
    assert _eager_plain_device((cpu, meta)) is None
    assert _eager_plain_device((torch.nn.Parameter(cpu), cpu)) == "cpu"

    class Subclass(torch.Tensor):
        pass

    assert _eager_plain_device((cpu.as_subclass(Subclass),)) is None
    op, args, _ = _glu_case(torch.Generator().manual_seed(5))
    on_meta = op(*(a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    assert on_meta.device.type == "meta" and on_meta.shape == args[0].shape
