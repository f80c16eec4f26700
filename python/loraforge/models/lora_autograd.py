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

We save X (needed for dA) and H = X A^T ([n, r]: 1/128 of X at r = 16 and i = 4,096; recomputing it
in backward would read all of X once more, a memory-bound ~12 us per projection on an H100 for
2 x 2,048 tokens of an 8B model); W is re-materialised in backward (NF4 weights are dequantized again)
rather than saved, so a layer keeps only its input (and H) alive between forward and backward.

Q/K/V share X: the three projections are one function so X is saved once and dX is accumulated
from the three in one place.

Gated MLP (Llama/Mistral/Qwen: SwiGLU; Gemma: GeGLU with tanh GELU), each of gate/up/down a LoRA
projection as above:

    G = proj_g(X), U = proj_u(X), Hm = act(G) * U, Out = proj_d(Hm)

Backward from dOut: dHm from proj_d's rule (dHm = dOut W_d + s (dOut B_d) A_d needs no Hm), then
one kernel makes dG = dHm * U * act'(G), dU = dHm * act(G) and Hm = act(G) * U (recomputed from the
saved G and U, written where dHm was), then proj_d's dA and dB from Hm, then proj_g's and proj_u's
rules with input X, dX summed over both. Saved: X, G, U (G and U are needed for act'(G)).

Long sequences: the MLP in token chunks. G and U are the largest activations of a layer: for a
Llama-3.1-8B shape (H = 4,096, I = 14,336, bf16) they are 2 I x 2 bytes = 57 KB a token saved from
forward to backward, and backward adds dHm (28 KB a token), against 8 KB for the saved X: at 300k
tokens, ~25 GB for one layer's MLP, more than everything else the layer holds. Above a size the
function therefore runs on row chunks of the flattened tokens (rows are independent: only the
adapters' gradients sum over them):

    forward:  per chunk X_c: G_c, U_c, Hm_c = act(G_c) * U_c, Out_c = proj_d(Hm_c) into Out's rows
    saved:    X only
    backward: per chunk: G_c, U_c recomputed from X_c, then the rule above on the chunk, writing dX_c
              into dX's rows and adding the chunk's dA, dB into the adapters' gradients (kept in the
              adapters' own dtype, fp32 under PEFT, so the sum over chunks is not rounded to bf16)

Memory: 8 KB a token (X) between forward and backward instead of 65 KB, and in backward one chunk's
G, U and dHm (at most 1.5 MLP_CHUNK_BYTES, 768 MiB) instead of 85 KB a token. The dense bases are
dequantized once per call and held for all its chunks (3 x 117 MB for the 8B shape; the unchunked
path drops each after its matmul). Cost: G and U computed once more, in backward: 4 n H I FLOPs, 2/3
of the MLP forward's. For the 8B shape with gradient checkpointing that is ~10% of a layer's
training FLOPs at the threshold (18.7k tokens), less as attention's n^2 grows (~6% at 64k tokens,
~2% at 300k). Under the offloaded checkpoint ("unsloth") that cost is gone: its recompute, whose
output nothing reads, skips the chunked MLP forward whole (`output_unused`,
models/backward_recompute.py), and the unchunked one skips its activation and down projection.
Below the threshold (at most 2 MLP_CHUNK_BYTES of G and U: batch 2 x 2,048 tokens of the 8B shape is
far below) the function is exactly the unchunked one above, whose only addition is the size
comparison (the training step there is bound by the host).
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from loraforge.models import backward_recompute, stacked_lora
from loraforge.models.base_weight import base_bias, dense_weight, is_linear4bit
from loraforge.models.identity_cache import IdentityCache
from loraforge.ops import swiglu as swiglu_ops


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it is already (a dtype check is ~0.1 us, Tensor.to ~1.3 us even when it
    changes nothing, and the fused functions make ~1,000 such casts a step of an 8B model)."""
    return t if t.dtype == dtype else t.to(dtype)


def no_autocast(x: torch.Tensor):
    """Inside the fused functions every cast is explicit, so autocast is switched off (a no-op context
    when it is off already: entering torch.autocast costs ~5 us, ~300 times a step)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # holds no state: one serves every call


def autocast_off(x: torch.Tensor):
    """(the dtype the matmuls run in, a context with autocast off), with one look at the autocast state
    (each look ~0.5 us, and the fused functions ask in every forward). The dtype is autocast's when it
    is on for x's device (mixed-precision training, as TRL/transformers' Trainer set it up), else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), torch.autocast(device, enabled=False)
    return x.dtype, _NO_CONTEXT


def adapter_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A LoRA weight in the compute dtype. PEFT keeps adapters in fp32 while the matmuls run in
    bf16/fp16; the cast is made once per optimizer step (kept on the parameter, keyed by its version
    counter, which every in-place update bumps) instead of at each of the forward, recompute and
    backward uses: ~1,300 fewer small ops per step of an 8B model, whose step is bound by the host.
    Costs one compute-dtype copy of the adapters (84 MB at r=16 on all projections of an 8B model); under
    the offloaded checkpoint a layer's copies are dropped once its backward is done
    (stacked_lora.release_adapter_caches)."""
    if weight.dtype == dtype:
        return weight
    if torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return weight.to(dtype)  # traced graphs, and wrapper subclasses (FSDP2's DTensor): no cache
    key = (weight._version, weight.data_ptr(), dtype, optimizer_steps())
    cached = ADAPTER_CASTS.get(weight)
    if cached is not None and cached[0] == key:
        return cached[1]
    cast = weight.detach().to(dtype)
    ADAPTER_CASTS[weight] = (key, cast)
    return cast


# Keyed by the parameter object, held weakly: kept off the parameter itself so that pickling a
# module never carries the copies along.
ADAPTER_CASTS = IdentityCache()

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
    step is bound by the host). Elsewhere (CPU) 16-bit operands are multiplied in fp32 for an fp32
    adapter, so that the gradient is not rounded to 16 bits either: the same numbers as on CUDA, and
    sums of it over token chunks (the chunked MLP) do not add one 16-bit rounding per chunk."""
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
    if dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    grad = a @ b
    return (grad if scale == 1.0 else grad.mul_(scale)).to(dtype)


class LoRAProjection:
    """What the fused functions need of one PEFT LoRA-wrapped Linear: base layer, A, B, scaling.

    Also what they ask of the base on every call, read once here: whether its weight is NF4 (stacked_lora
    stacks those), whether it has a bias, its output size. patch.lora_projection builds a new one
    whenever the base's weight or bias is replaced, so these stay true for as long as one is in use."""

    __slots__ = ("A", "B", "base", "has_bias", "nf4", "out_features", "scaling")

    def __init__(self, base: torch.nn.Module, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float):
        self.base, self.A, self.B, self.scaling = base, A, B, scaling
        self.nf4 = is_linear4bit(base)
        self.has_bias = base_bias(base) is not None
        self.out_features = getattr(base, "out_features", None)


def _forward_h(proj: LoRAProjection, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Y, H = X A^T) for X [n, i]; H is None without an adapter. Backward takes H back (_backward).
    An NF4 base with an adapter, at least stacked_lora.CONCAT_MIN_RATIO times wider out than in, runs as
    a stack of one: Y = [X | H] [W | s B]^T, rounded once (see stacked_lora)."""
    if proj.nf4 and stacked_lora.concatenates((proj,), x.shape[1]):
        return stacked_lora.stacked_forward_h((proj,), x)
    dtype = x.dtype
    y = x @ dense_weight(proj.base, dtype).t()
    if proj.has_bias:
        y = y + cast(base_bias(proj.base), dtype)
    h = None
    if proj.A is not None:
        h = x @ adapter_in(proj.A, dtype).t()
        y = y.addmm_(h, adapter_in(proj.B, dtype).t(), alpha=proj.scaling)
    return y, h


def _backward(proj: LoRAProjection, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None,
              h: torch.Tensor | None = None):  # fmt: skip
    """Returns (dX (accumulated into dx when given), dA, dB). h: X A^T from the forward (else recomputed)."""
    w = dense_weight(proj.base, dy.dtype)
    grad_x = dy @ w if dx is None else dx.addmm_(dy, w)
    del w
    if proj.A is None:
        return grad_x, None, None
    a, b, s = adapter_in(proj.A, dy.dtype), adapter_in(proj.B, dy.dtype), proj.scaling
    if h is None:
        h = x @ a.t()
    grad_b = adapter_grad(dy.t(), h, proj.B.dtype, s)
    grad_h = (dy @ b).mul_(s)
    grad_a = adapter_grad(grad_h.t(), x, proj.A.dtype)
    grad_x.addmm_(grad_h, a)
    return grad_x, grad_a, grad_b


def _stacked_product(kind: str, projs, x: torch.Tensor, columns: int, dtype: torch.dtype):
    """stacked_lora.stacked_forward_h(projs, x), or the (Y, H) that this layer's checkpointed forward kept
    for its rerun (backward_recompute.keeping_products: no matmul then); handed on when this is a forward
    that keeps its products."""
    kept = backward_recompute.take_product(kind, x.shape[0], columns, dtype)
    y, h = kept if kept is not None else stacked_lora.stacked_forward_h(projs, x)
    sink = backward_recompute.product_sink(kind)
    if sink is not None:
        sink[kind] = (y, h)
    return y, h


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class LoRALinearFunction(torch.autograd.Function):
    """Y = X W^T + s (X A^T) B^T for one projection (used for the output projection)."""

    @staticmethod
    def forward(ctx, x, A, B, proj: LoRAProjection, output_unused: bool = False):
        """output_unused: nothing reads the output's values (the output projection in the rerun of an
        attention half, train/layer_split.py): only H = X A^T, which backward needs, is computed, and
        the output is a zero broadcast."""
        dtype, autocast = autocast_off(x)
        with autocast:
            xc = cast(x, dtype)
            ctx.proj, ctx.x_dtype = proj, x.dtype
            if output_unused:
                h = None if proj.A is None else _flat(xc) @ adapter_in(proj.A, dtype).t()
                ctx.save_for_backward(xc, h)
                return _unused_output(xc, (*x.shape[:-1], proj.out_features))
            y, h = _forward_h(proj, _flat(xc))
            ctx.save_for_backward(xc, h)
            return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, h = ctx.saved_tensors
        with no_autocast(x):
            dx, da, db = _backward(ctx.proj, _flat(x), cast(_flat(dy), x.dtype), None, h)
            return cast(dx.view_as(x), ctx.x_dtype), da, db, None, None


class LoRAQKVFunction(torch.autograd.Function):
    """Q, K, V = three LoRA projections of the same X, with X saved once."""

    @staticmethod
    def forward(ctx, x, qA, qB, kA, kB, vA, vB, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection):
        dtype, autocast = autocast_off(x)
        with autocast:
            xc = cast(x, dtype)
            projs = (q, k, v)
            ctx.projs, ctx.x_dtype = projs, x.dtype
            flat = _flat(xc)
            shape = (*x.shape[:-1], -1)
            ctx.stacked = stacked_lora.stackable(projs)
            if ctx.stacked:  # one [n, q+k+v] product; q, k, v are column views of it
                sizes = stacked_lora.out_sizes(projs)
                y, h = _stacked_product("qkv", projs, flat, sum(sizes), dtype)
                ctx.save_for_backward(xc, h)
                yq, yk, yv = y.split(sizes, dim=1)
                return yq.view(shape), yk.view(shape), yv.view(shape)
            outputs = [_forward_h(p, flat) for p in projs]
            ctx.save_for_backward(xc, *(h for _, h in outputs))
            return tuple(y.view(shape) for y, _ in outputs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, *hs = ctx.saved_tensors
        with no_autocast(x):
            flat = _flat(x)
            grads_out = [cast(_flat(d), x.dtype) for d in (dq, dk, dv)]
            if ctx.stacked:
                dx, grads_a, grads_b = stacked_lora.stacked_backward(ctx.projs, flat, torch.cat(grads_out, dim=1),
                                                                     h=hs[0])  # fmt: skip
                grads = [g for pair in zip(grads_a, grads_b) for g in pair]
                return (cast(dx.view_as(x), ctx.x_dtype), *grads, None, None, None)
            dx = None
            grads = []
            for proj, dy, h in zip(ctx.projs, grads_out, hs):
                dx, da, db = _backward(proj, flat, dy, dx, h)
                grads += [da, db]
            return (cast(dx.view_as(x), ctx.x_dtype), *grads, None, None, None)


# The MLP runs in token chunks when its whole [n, 2 I] G/U buffer would exceed twice this (module
# docstring); a chunk's G/U buffer is at most this.
MLP_CHUNK_BYTES = 512 * 2**20


def mlp_chunk_rows(n: int, intermediate: int, dtype: torch.dtype) -> int:
    """Rows (tokens) per chunk of the MLP on n tokens with I = intermediate in `dtype`; 0: unchunked."""
    row_bytes = 2 * intermediate * dtype.itemsize
    if n * row_bytes <= 2 * MLP_CHUNK_BYTES:
        return 0
    rows = MLP_CHUNK_BYTES // row_bytes
    return rows // 128 * 128 if rows >= 128 else max(rows, 1)


class _DenseProjection:
    """A projection as the chunked MLP uses it: the base W [o, i] dense and A [r, i], B [o, r] (None
    without LoRA) in the compute dtype, obtained once per call for all chunks; the gradients of A and
    B are made in a_dtype and b_dtype (the adapters' own). Gate and up stacked are one of these, with
    the stacked A and the block-diagonal Bd (scalings inside) as A and B, and scaling 1."""

    __slots__ = ("a", "a_dtype", "b", "b_dtype", "bias", "scaling", "w")

    def __init__(self, w, bias, a=None, b=None, scaling=1.0, adapters=(None, None)):
        self.w, self.bias, self.a, self.b, self.scaling = w, bias, a, b, scaling
        self.a_dtype, self.b_dtype = (None, None) if a is None else (adapters[0].dtype, adapters[1].dtype)

    @staticmethod
    def of(proj: LoRAProjection, dtype: torch.dtype) -> _DenseProjection:
        bias = base_bias(proj.base)
        w, bias = dense_weight(proj.base, dtype), None if bias is None else bias.to(dtype)
        if proj.A is None:
            return _DenseProjection(w, bias)
        a, b = adapter_in(proj.A, dtype), adapter_in(proj.B, dtype)
        return _DenseProjection(w, bias, a, b, proj.scaling, (proj.A, proj.B))

    @staticmethod
    def stacked(gate: LoRAProjection, up: LoRAProjection, dtype: torch.dtype, device) -> _DenseProjection:
        """Gate and up as one projection [W_g; W_u], as stacked_lora runs them."""
        bias = None
        if base_bias(gate.base) is not None:
            bias = torch.cat([base_bias(gate.base), base_bias(up.base)]).to(dtype)
        w = stacked_lora.stacked_weight((gate, up), dtype, device)
        if gate.A is None:
            return _DenseProjection(w, bias)
        a, bd = stacked_lora.stacked_adapters((gate, up), dtype)
        return _DenseProjection(w, bias, a, bd, 1.0, (gate.A, gate.B))


def _dense_projections(projs, stacked: bool, dtype: torch.dtype, device: torch.device):
    """([gate and up stacked as one] or [gate, up], down) as _DenseProjections."""
    gate, up, down = projs
    if stacked:
        return [_DenseProjection.stacked(gate, up, dtype, device)], _DenseProjection.of(down, dtype)
    return [_DenseProjection.of(gate, dtype), _DenseProjection.of(up, dtype)], _DenseProjection.of(down, dtype)


def _dense_forward(p: _DenseProjection, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X W^T (+ b) + s (X A^T) B^T, into `out` when given."""
    if p.bias is None:
        y = torch.mm(x, p.w.t(), out=out)
    else:
        y = torch.addmm(p.bias, x, p.w.t(), out=out)
    if p.a is not None:
        y.addmm_(x @ p.a.t(), p.b.t(), alpha=p.scaling)
    return y


def _gate_up_chunk(gate_up: list, x: torch.Tensor):
    """(G, U, their stacked [c, 2 I] buffer or None) of one chunk of rows."""
    if len(gate_up) == 1:
        gu = _dense_forward(gate_up[0], x)
        return (*gu.split(gu.shape[1] // 2, dim=1), gu)
    return _dense_forward(gate_up[0], x), _dense_forward(gate_up[1], x), None


def _input_grad(p: _DenseProjection, dy: torch.Tensor, dx: torch.Tensor | None = None, add: bool = False):
    """(dX = dY W + dH A, dH = s dY B (None without LoRA)); dX written into dx when given, or added to it
    when `add`."""
    if dx is None:
        dx = dy @ p.w
    elif add:
        dx.addmm_(dy, p.w)
    else:
        torch.mm(dy, p.w, out=dx)
    if p.a is None:
        return dx, None
    grad_h = (dy @ p.b).mul_(p.scaling)
    dx.addmm_(grad_h, p.a)
    return dx, grad_h


def _add_adapter_grads(p: _DenseProjection, x, dy, grad_h, grads: list, k: int) -> None:
    """Adds one chunk's dA = dH^T X and dB = s dY^T (X A^T) into grads[k] and grads[k + 1] (the first
    chunk's are taken as they are: fresh tensors in the adapters' dtype)."""
    if p.a is None:
        return
    grad_a = adapter_grad(grad_h.t(), x, p.a_dtype)
    grad_b = adapter_grad(dy.t(), x @ p.a.t(), p.b_dtype, p.scaling)
    for i, grad in ((k, grad_a), (k + 1, grad_b)):
        if grads[i] is None:
            grads[i] = grad
        else:
            grads[i].add_(grad)


def _chunked_mlp_forward(projs, stacked: bool, activation: str, x: torch.Tensor, rows: int) -> torch.Tensor:
    gate_up, down = _dense_projections(projs, stacked, x.dtype, x.device)
    out = x.new_empty((x.shape[0], down.w.shape[0]))
    for start in range(0, x.shape[0], rows):
        g, u, gu = _gate_up_chunk(gate_up, x[start : start + rows])
        h = swiglu_ops.gated_activation(g, u, activation, False)
        del g, u, gu
        _dense_forward(down, h, out[start : start + rows])
    return out


def _chunked_mlp_backward(projs, stacked: bool, activation: str, x: torch.Tensor, dout: torch.Tensor, rows: int):
    """[dX, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d] from the saved X and dOut (both [n, .]), chunk by chunk."""
    gate_up, down = _dense_projections(projs, stacked, x.dtype, x.device)
    dx = torch.empty_like(x)
    grads = [None] * 6  # dA, dB of gate_up[0], then of gate_up[1] (unstacked), then of down
    for start in range(0, x.shape[0], rows):
        x_c, dout_c, dx_c = x[start : start + rows], dout[start : start + rows], dx[start : start + rows]
        g, u, gu = _gate_up_chunk(gate_up, x_c)
        dh, grad_hd = _input_grad(down, dout_c)  # dHm, and dL/d(Hm A_d^T)
        torch.ops.loraforge.gated_activation_backward_h_(dh, g, u, activation)  # dh: Hm; g, u: dG, dU
        _add_adapter_grads(down, dh, dout_c, grad_hd, grads, 4)
        del dh, grad_hd
        if gu is not None:  # gu holds [dG | dU]
            _, grad_h = _input_grad(gate_up[0], gu, dx_c)
            _add_adapter_grads(gate_up[0], x_c, gu, grad_h, grads, 0)
            continue
        for i, (p, dy) in enumerate(zip(gate_up, (g, u))):
            _, grad_h = _input_grad(p, dy, dx_c, add=i == 1)
            _add_adapter_grads(p, x_c, dy, grad_h, grads, 2 * i)
    if stacked and grads[0] is not None:  # the stacked dA rows and the diagonal blocks of dB, per projection
        (d_gA, d_uA), (d_gB, d_uB) = stacked_lora.per_projection_grads(projs[:2], grads[0], grads[1])
        grads[:4] = [d_gA, d_gB, d_uA, d_uB]
    return [dx, *grads]


def _down_concatenates(down: LoRAProjection) -> bool:
    """Whether the MLP's down projection takes the concatenation from a wide Hm buffer (an NF4 base with
    an adapter): Y = [Hm | H] [W | s B]^T, rounded once. It costs no copy, so it goes with the threshold
    that concatenates every projection whose copy costs no more than the pass it saves (CONCAT_MIN_RATIO
    at most 1, the default); LORAFORGE_CONCAT_MIN_RATIO=3 keeps only gate/up's, as measured 2026-12-07."""
    return down.nf4 and down.A is not None and stacked_lora.CONCAT_MIN_RATIO <= 1


def _unused_output(like: torch.Tensor, shape) -> torch.Tensor:
    """A stand-in output whose values nobody reads: zeros, one element broadcast (no memory)."""
    return like.new_zeros(()).expand(shape)


class LoRAMLPFunction(torch.autograd.Function):
    """Out = down(act(gate(X)) * up(X)), each projection with LoRA, backward by hand."""

    @staticmethod
    def forward(ctx, x, gA, gB, uA, uB, dA, dB, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
                activation: str, output_unused: bool = False):  # fmt: skip
        """output_unused: the caller never reads the output's values, only backpropagates through it (a
        checkpoint's recompute, models/backward_recompute.py). Then only what backward saves is computed
        (G and U; nothing in token chunks, whose backward recomputes them) and the output is a zero
        broadcast: the activation and the down projection, a quarter of a Llama layer, are skipped.
        Backward is unchanged: it never reads the forward's Hm or output."""
        dtype, autocast = autocast_off(x)
        with autocast:
            xc = cast(x, dtype)
            flat = _flat(xc)
            ctx.stacked = stacked_lora.stackable((gate, up))
            ctx.chunk_rows = mlp_chunk_rows(flat.shape[0], up.base.out_features, dtype)
            ctx.projs, ctx.activation, ctx.x_dtype = (gate, up, down), activation, x.dtype
            out_shape = (*x.shape[:-1], int(down.base.out_features))
            if ctx.chunk_rows:  # long sequences: in token chunks, X alone saved (module docstring)
                ctx.save_for_backward(xc)
                if output_unused:
                    return _unused_output(xc, out_shape)
                out = _chunked_mlp_forward(ctx.projs, ctx.stacked, activation, flat, ctx.chunk_rows)
                return out.view(out_shape)
            # Saved: X, G and U (stacked: their [n, 2 I] buffer), and the adapters' X A^T of gate, up
            # (stacked: one [n, r_g + r_u]) and down (Hm A_d^T; None when down is skipped).
            if ctx.stacked:  # G and U as the two column halves of one [n, 2 I] product
                sizes = stacked_lora.out_sizes((gate, up))
                gu, h_gu = _stacked_product("gate_up", (gate, up), flat, sum(sizes), dtype)
                g, u = gu.split(sizes, dim=1)
                saved = (xc, gu, None, h_gu, None)
            else:
                (g, h_g), (u, h_u) = _forward_h(gate, flat), _forward_h(up, flat)
                saved = (xc, g, u, h_g, h_u)
            if output_unused:
                ctx.save_for_backward(*saved, None)
                return _unused_output(xc, out_shape)
            if _down_concatenates(down):  # Hm written next to down's adapter columns: one rounding, no copy
                wide = stacked_lora.wide_input(flat.shape[0], (down,), xc)
                h = wide[:, : g.shape[1]]
                torch.ops.loraforge.gated_activation_into(g, u, activation, h)
                out, h_d = stacked_lora.stacked_forward_h((down,), h, wide)
            else:
                h = swiglu_ops.gated_activation(g, u, activation, False)  # grad is off here: the kernel alone
                out, h_d = _forward_h(down, h)
            ctx.save_for_backward(*saved, h_d)
            return out.view(out_shape)

    @staticmethod
    def backward(ctx, dout):
        if ctx.chunk_rows:
            (x,) = ctx.saved_tensors
            with no_autocast(x):
                dx, *grads = _chunked_mlp_backward(ctx.projs, ctx.stacked, ctx.activation, _flat(x),
                                                   _flat(cast(dout, x.dtype)), ctx.chunk_rows)  # fmt: skip
                return cast(dx.view_as(x), ctx.x_dtype), *grads, None, None, None, None, None
        x, g, u, h_g, h_u, h_d = ctx.saved_tensors
        with no_autocast(x):
            return LoRAMLPFunction._backward(ctx, x, g, u, cast(dout, x.dtype), h_g, h_u, h_d)

    @staticmethod
    def _backward(ctx, x, g, u, dout, h_g=None, h_u=None, h_d=None):
        """h_g, h_u, h_d: X A^T of gate and up (stacked: h_g is both, [n, r_g + r_u]) and Hm A_d^T of down
        from the forward, each recomputed when None."""
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
            d_dB = adapter_grad(dout.t(), h @ a.t() if h_d is None else h_d, down.B.dtype, s)
            d_dA = adapter_grad(grad_hd.t(), h, down.A.dtype)
        del h, dh
        flat = _flat(x)
        if gu is not None:  # gu now holds [dG | dU]
            dx, (d_gA, d_uA), (d_gB, d_uB) = stacked_lora.stacked_backward((gate, up), flat, gu,
                                                                            weight_at_once=False, h=h_g)  # fmt: skip
            return cast(dx.view_as(x), ctx.x_dtype), d_gA, d_gB, d_uA, d_uB, d_dA, d_dB, None, None, None, None, None
        dx, d_gA, d_gB = _backward(gate, flat, dg, None, h_g)
        dx, d_uA, d_uB = _backward(up, flat, du, dx, h_u)
        return cast(dx.view_as(x), ctx.x_dtype), d_gA, d_gB, d_uA, d_uB, d_dA, d_dB, None, None, None, None, None
