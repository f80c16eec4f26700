"""Fused LoRA forward and backward for one projection, for Q/K/V together, and for the gated MLP.

Notation, for one projection with frozen base weight W [o, i] (16-bit or NF4), adapters
A [r, i], B [o, r] and scaling s; input X [n, i] (tokens flattened):

    H = X A^T            [n, r]
    Y = X W^T + s H B^T  [n, o]          (+ b, the base bias, when the layer has one)

Given dY [n, o]:

    dB = s dY^T H                        [o, r]
    dH = s dY B                          [n, r]
    dA = dH^T X                          [r, i]
    dX = dY W + dH A                     [n, i]

We save X (needed for dA) and recompute H = X A^T in backward (n*r*i FLOPs, cheap next to the
base matmul); W is re-materialised in backward (NF4 weights are dequantized again) rather than
saved, so a layer keeps only its input alive between forward and backward.

Q/K/V share X: the three projections are one function so X is saved once and dX is accumulated
from the three in one place.

Gated MLP (Llama/Mistral/Qwen: SwiGLU; Gemma: GeGLU with tanh GELU), each of gate/up/down a LoRA
projection as above:

    G = proj_g(X), U = proj_u(X), Hm = act(G) * U, Out = proj_d(Hm)

Backward from dOut: dHm from proj_d's rule (dHm = dOut W_d + s (dOut B_d) A_d needs no Hm), then
one kernel makes dG = dHm * U * act'(G), dU = dHm * act(G) and Hm = act(G) * U (recomputed from the
saved G and U, written where dHm was), then proj_d's dA and dB from Hm, then proj_g's and proj_u's
rules with input X, dX summed over both. Saved: X, G, U (G and U are needed for act'(G)).
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from loraforge.models import stacked_lora
from loraforge.models.base_weight import base_bias, dense_weight
from loraforge.ops import swiglu as swiglu_ops


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device (mixed-precision
    training, as TRL/transformers Trainer set it up), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def no_autocast(x: torch.Tensor):
    """Inside the fused functions every cast is explicit, so autocast is switched off (a no-op context
    when it is off already: entering torch.autocast costs ~5 us, ~300 times a step)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def adapter_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A LoRA weight in the compute dtype. PEFT keeps adapters in fp32 while the matmuls run in
    bf16/fp16; the cast is made once per optimizer step (kept on the parameter, keyed by its version
    counter, which every in-place update bumps) instead of at each of the forward, recompute and
    backward uses: ~1,300 fewer small ops per step of an 8B model, whose step is bound by the host.
    Costs one compute-dtype copy of the adapters (84 MB at r=16 on all projections of an 8B model)."""
    if weight.dtype == dtype:
        return weight
    if torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return weight.to(dtype)  # traced graphs, and wrapper subclasses (FSDP2's DTensor): no cache
    key = (weight._version, weight.data_ptr(), dtype, optimizer_steps())
    cached = _ADAPTER_CASTS.get(weight)
    if cached is not None and cached[0] == key:
        return cached[1]
    cast = weight.detach().to(dtype)
    _ADAPTER_CASTS[weight] = (key, cast)
    return cast


# Keyed by the parameter object, held weakly: kept off the parameter itself so that pickling a
# module never carries the copies along.
_ADAPTER_CASTS = WeakIdKeyDictionary()

# The version counter alone is not enough: torch's fused AdamW (transformers Trainer's default,
# "adamw_torch_fused") writes the parameters without bumping it. So the key also carries a count of
# optimizer steps, from a global post-step hook that every torch.optim.Optimizer (bitsandbytes' too)
# runs. An update made outside an optimizer must be an in-place op on the parameter (which bumps
# its version) or replace its storage.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(_optimizer, _args, _kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many optimizer steps have run in this process (any torch.optim.Optimizer)."""
    return _OPTIMIZER_STEPS[0]


_MM_OUT_DTYPE = {"works": None}  # whether torch.mm takes out_dtype=float32 for 16-bit CUDA operands


def adapter_grad(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """scale * (a @ b) in `dtype`, the adapter's own (fp32 under PEFT). For 16-bit CUDA operands and an
    fp32 adapter: one cuBLAS call that accumulates in fp32 and writes fp32 (torch.mm's out_dtype), so
    neither a bf16 rounding of the gradient nor a cast kernel (~450 of them a step of an 8B model, whose
    step is bound by the host); elsewhere the product in the operands' dtype, then the cast."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) \
            and _MM_OUT_DTYPE["works"] is not False:  # fmt: skip
        try:
            grad = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE["works"] = True
            return grad if scale == 1.0 else grad.mul_(scale)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm(out_dtype=...)
            if _MM_OUT_DTYPE["works"]:
                raise
            _MM_OUT_DTYPE["works"] = False
    grad = a @ b
    return (grad if scale == 1.0 else grad.mul_(scale)).to(dtype)


class LoRAProjection:
    """What the fused functions need of one PEFT LoRA-wrapped Linear: base layer, A, B, scaling."""

    __slots__ = ("base", "A", "B", "scaling")

    def __init__(self, base: torch.nn.Module, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float):
        self.base, self.A, self.B, self.scaling = base, A, B, scaling


def _forward(proj: LoRAProjection, x: torch.Tensor) -> torch.Tensor:
    y = x @ dense_weight(proj.base, x.dtype).t()
    bias = base_bias(proj.base)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if proj.A is not None:
        y = y.addmm_((x @ adapter_in(proj.A, x.dtype).t()), adapter_in(proj.B, x.dtype).t(), alpha=proj.scaling)
    return y


def _backward(proj: LoRAProjection, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None):
    """Returns (dX (accumulated into dx when given), dA, dB)."""
    w = dense_weight(proj.base, dy.dtype)
    grad_x = dy @ w if dx is None else dx.addmm_(dy, w)
    del w
    if proj.A is None:
        return grad_x, None, None
    a, b, s = adapter_in(proj.A, dy.dtype), adapter_in(proj.B, dy.dtype), proj.scaling
    h = x @ a.t()
    grad_b = adapter_grad(dy.t(), h, proj.B.dtype, s)
    grad_h = (dy @ b).mul_(s)
    grad_a = adapter_grad(grad_h.t(), x, proj.A.dtype)
    grad_x.addmm_(grad_h, a)
    return grad_x, grad_a, grad_b


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class LoRALinearFunction(torch.autograd.Function):
    """Y = X W^T + s (X A^T) B^T for one projection (used for the output projection)."""

    @staticmethod
    def forward(ctx, x, A, B, proj: LoRAProjection):
        dtype = compute_dtype(x)
        with no_autocast(x):
            xc = x.to(dtype)
            ctx.proj, ctx.x_dtype = proj, x.dtype
            ctx.save_for_backward(xc)
            return _forward(proj, _flat(xc)).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        with no_autocast(x):
            dx, da, db = _backward(ctx.proj, _flat(x), _flat(dy).to(x.dtype), None)
            return dx.view_as(x).to(ctx.x_dtype), da, db, None


class LoRAQKVFunction(torch.autograd.Function):
    """Q, K, V = three LoRA projections of the same X, with X saved once."""

    @staticmethod
    def forward(ctx, x, qA, qB, kA, kB, vA, vB, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection):
        dtype = compute_dtype(x)
        with no_autocast(x):
            xc = x.to(dtype)
            ctx.projs, ctx.x_dtype = (q, k, v), x.dtype
            ctx.save_for_backward(xc)
            flat = _flat(xc)
            ctx.stacked = stacked_lora.stackable((q, k, v))
            if ctx.stacked:  # one [n, q+k+v] product; q, k, v are column views of it
                y = stacked_lora.stacked_forward((q, k, v), flat)
                return tuple(t.view(*x.shape[:-1], -1) for t in y.split(stacked_lora.out_sizes((q, k, v)), dim=1))
            return tuple(_forward(p, flat).view(*x.shape[:-1], -1) for p in (q, k, v))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (x,) = ctx.saved_tensors
        with no_autocast(x):
            flat = _flat(x)
            grads_out = [_flat(d).to(x.dtype) for d in (dq, dk, dv)]
            if ctx.stacked:
                dx, grads_a, grads_b = stacked_lora.stacked_backward(ctx.projs, flat, torch.cat(grads_out, dim=1))
                grads = [g for pair in zip(grads_a, grads_b) for g in pair]
                return (dx.view_as(x).to(ctx.x_dtype), *grads, None, None, None)
            dx = None
            grads = []
            for proj, dy in zip(ctx.projs, grads_out):
                dx, da, db = _backward(proj, flat, dy, dx)
                grads += [da, db]
            return (dx.view_as(x).to(ctx.x_dtype), *grads, None, None, None)


class LoRAMLPFunction(torch.autograd.Function):
    """Out = down(act(gate(X)) * up(X)), each projection with LoRA, backward by hand."""

    @staticmethod
    def forward(ctx, x, gA, gB, uA, uB, dA, dB, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
                activation: str):  # fmt: skip
        dtype = compute_dtype(x)
        with no_autocast(x):
            xc = x.to(dtype)
            flat = _flat(xc)
            ctx.stacked = stacked_lora.stackable((gate, up))
            if ctx.stacked:  # G and U as the two column halves of one [n, 2 I] product
                gu = stacked_lora.stacked_forward((gate, up), flat)
                g, u = gu.split(stacked_lora.out_sizes((gate, up)), dim=1)
            else:
                gu, g, u = None, _forward(gate, flat), _forward(up, flat)
            h = swiglu_ops.gated_activation(g, u, activation, False)  # grad is off here: the kernel alone
            out = _forward(down, h)
            ctx.projs, ctx.activation, ctx.x_dtype = (gate, up, down), activation, x.dtype
            ctx.save_for_backward(xc, gu if ctx.stacked else g, None if ctx.stacked else u)
            return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dout):
        x, g, u = ctx.saved_tensors
        with no_autocast(x):
            return LoRAMLPFunction._backward(ctx, x, g, u, dout.to(x.dtype))

    @staticmethod
    def _backward(ctx, x, g, u, dout):
        gu = None
        if ctx.stacked:  # saved as one [n, 2 I] buffer; its halves receive dG and dU in place
            gu = g
            g, u = gu.split(stacked_lora.out_sizes(ctx.projs[:2]), dim=1)
        gate, up, down = ctx.projs
        dout = _flat(dout)
        # dHm first (it needs no Hm), then one fused kernel turns (dHm, G, U) into (dG, dU) in G's and
        # U's own storage and writes Hm over dHm: the MLP's largest activations are never allocated
        # twice, and Hm is not recomputed in a pass of its own. Hm then serves down's LoRA gradients.
        w = dense_weight(down.base, dout.dtype)
        dh = dout @ w
        del w
        if down.A is not None:
            a, b, s = adapter_in(down.A, dout.dtype), adapter_in(down.B, dout.dtype), down.scaling
            grad_hd = (dout @ b).mul_(s)  # dL/d(Hm A^T), [n, r]
            dh.addmm_(grad_hd, a)
        torch.ops.loraforge.gated_activation_backward_h_(dh, g, u, ctx.activation)
        h, dg, du = dh, g, u
        d_dA = d_dB = None
        if down.A is not None:
            d_dB = adapter_grad(dout.t(), h @ a.t(), down.B.dtype, s)
            d_dA = adapter_grad(grad_hd.t(), h, down.A.dtype)
        del h, dh
        flat = _flat(x)
        if gu is not None:  # gu now holds [dG | dU]
            dx, (d_gA, d_uA), (d_gB, d_uB) = stacked_lora.stacked_backward((gate, up), flat, gu)
            return dx.view_as(x).to(ctx.x_dtype), d_gA, d_gB, d_uA, d_uB, d_dA, d_dB, None, None, None, None
        dx, d_gA, d_gB = _backward(gate, flat, dg, None)
        dx, d_uA, d_uB = _backward(up, flat, du, dx)
        return dx.view_as(x).to(ctx.x_dtype), d_gA, d_gB, d_uA, d_uB, d_dA, d_dB, None, None, None, None
