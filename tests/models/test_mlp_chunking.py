"""LoRAMLPFunction on long sequences: in token chunks (X alone saved, G and U recomputed in backward),
against its unchunked path, with lora_autograd.MLP_CHUNK_BYTES made small so that tiny inputs chunk."""

import math

import pytest
import torch

from loraforge.models import lora_autograd, stacked_lora
from loraforge.models.base_weight import dense_weight
from loraforge.models.lora_autograd import LoRAMLPFunction, LoRAProjection, mlp_chunk_rows
from loraforge.ops import swiglu as swiglu_ops
from tests.ops._tolerance import abs_error

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, N = 32, 64, 37  # N tokens: not a multiple of the chunk rows, so the last chunk is short


def _base(i, o, nf4: bool, bias: bool, dtype, device="cpu"):
    """A frozen base layer: NF4 Linear4bit (what stacked_lora stacks) or a 16-bit nn.Linear."""
    weight = torch.randn(o, i) / math.sqrt(i)
    if nf4:
        layer = bnb.nn.Linear4bit(i, o, bias=bias, quant_type="nf4", compute_dtype=dtype)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)  # quantizes
    else:
        layer = torch.nn.Linear(i, o, bias=bias, dtype=dtype)
        layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.normal_(0.0, 0.1)
    return layer.to(device).requires_grad_(False)


def _projection(i, o, nf4: bool, rank: int | None, bias: bool = False, dtype=torch.float32, device="cpu"):
    """A LoRA projection with fp32 adapters (as PEFT keeps them) of `rank`, or without LoRA (rank None)."""
    base = _base(i, o, nf4, bias, dtype, device)
    if rank is None:
        return LoRAProjection(base, None, None, 0.0)
    A = torch.nn.Parameter(torch.randn(rank, i, device=device) / math.sqrt(i))
    B = torch.nn.Parameter(torch.randn(o, rank, device=device) / math.sqrt(rank))
    return LoRAProjection(base, A, B, 2.0 / rank)


# name -> (gate, up, down) as (nf4, rank, bias), and whether gate/up then run stacked
CASES = {
    "nf4 stacked, ranks differ": (((True, 4, False), (True, 6, False), (True, 4, False)), True),
    "nf4 stacked, biases": (((True, 4, True), (True, 4, True), (True, 4, False)), True),
    "nf4 stacked, no gate/up LoRA": (((True, None, False), (True, None, False), (True, 4, False)), True),
    "nf4, up without LoRA": (((True, 4, False), (True, None, False), (True, 4, False)), False),
    "16-bit, down without LoRA": (((False, 4, True), (False, 8, False), (False, None, False)), False),
    "mixed bases": (((False, 4, False), (True, 4, False), (True, 8, False)), False),
}


def _mlp(case, dtype, device="cpu"):
    specs, stacked = CASES[case]
    sizes = ((H, I), (H, I), (I, H))
    projs = tuple(_projection(i, o, nf4, rank, bias, dtype, device) for (i, o), (nf4, rank, bias) in zip(sizes, specs))
    assert stacked_lora.stackable(projs[:2]) == stacked
    return projs


def _run(projs, activation, x, dout):
    """Out, then the gradients of X and of every adapter (None where there is none)."""
    gate, up, down = projs
    x = x.clone().requires_grad_()
    adapters = [t for p in projs for t in (p.A, p.B)]
    out = LoRAMLPFunction.apply(x, *adapters, gate, up, down, activation)
    inputs = [x, *(t for t in adapters if t is not None)]
    grads = iter(torch.autograd.grad(out, inputs, dout))
    dx = next(grads)
    return out.detach(), dx, [None if t is None else next(grads) for t in adapters]


def _reference(projs, activation, x, dout):
    """The same in float64 through plain autograd, on W as it dequantizes in fp32."""
    params = {}

    def project(p, inputs):
        y = inputs @ dense_weight(p.base, torch.float32).double().t()
        if p.base.bias is not None:
            y = y + p.base.bias.double()
        if p.A is None:
            return y
        a, b = (params.setdefault(id(t), t.detach().double().requires_grad_()) for t in (p.A, p.B))
        return y + p.scaling * (inputs @ a.t()) @ b.t()

    x = x.detach().double().requires_grad_()
    gate, up, down = projs
    out = project(down, swiglu_ops.activation_reference(project(gate, x), activation) * project(up, x))
    adapters = [t for p in projs for t in (p.A, p.B)]
    inputs = [x, *(params[id(t)] for t in adapters if t is not None)]
    grads = iter(torch.autograd.grad(out, inputs, dout.double()))
    dx = next(grads)
    return out.detach(), dx, [None if t is None else next(grads) for t in adapters]


def _count_chunks(monkeypatch):
    """How many chunks of G and U the chunked path computes (forward and backward together)."""
    calls = [0]
    original = lora_autograd._gate_up_chunk

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(lora_autograd, "_gate_up_chunk", counted)
    return calls


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", swiglu_ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("rows", (8, 16))
def test_chunked_equals_unchunked(case, activation, dtype, rows, seed, monkeypatch):
    projs = _mlp(case, dtype)
    x = torch.randn(1, N, H).to(dtype)
    dout = torch.randn(1, N, H).to(dtype)
    plain = _run(projs, activation, x, dout)

    monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", rows * 2 * I * dtype.itemsize)
    assert mlp_chunk_rows(N, I, dtype) == rows
    chunks = _count_chunks(monkeypatch)
    ours = _run(projs, activation, x, dout)
    assert chunks[0] == 2 * math.ceil(N / rows)  # forward, then the recompute in backward

    names = ["out", "dX"] + [f"{p}.{m}" for p in ("gate", "up", "down") for m in ("A", "B")]
    pairs = list(zip(names, [ours[0], ours[1], *ours[2]], [plain[0], plain[1], *plain[2]]))
    assert [n for n, o, p in pairs if p is None] == [n for n, o, p in pairs if o is None]
    adapters = [t for p in projs for t in (p.A, p.B)]
    for (name, o, p), t in zip(pairs[2:], adapters):
        assert o is None or o.dtype == t.dtype == torch.float32, name  # gradients in the adapter's dtype
    if dtype == torch.float32:
        for name, o, p in pairs:
            if p is not None:
                torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5 * p.abs().max().item(), msg=name)
        return
    exact = _reference(projs, activation, x, dout)
    for (name, o, p), e in zip(pairs, [exact[0], exact[1], *exact[2]]):
        if p is not None:
            _assert_as_precise(o, p, e, name)


def _assert_as_precise(chunked, unchunked, exact, name):
    """DESIGN.md's rule (mean error at most twice the other's), with the unchunked path in plain torch's
    place. Both are the same bf16 arithmetic on different row blocks (the CPU matmul's blocking, hence
    some roundings, follows the row count), so their errors are alike; which of the two has the larger
    *single* worst element in a few hundred is luck: over 150 seeds the ratio of the maxima had its 99th
    percentile at 1.26 and its worst at 1.62, and one CI seed (2006633239) gave 2.2 on a 64 x 4 gradient
    whose means were 0.0044 and 0.0043. So the maximum is held to three times the unchunked one's, or
    to two bf16 ulps of the gradient's largest entry (2**-6 of it), whichever is larger: seed 3100500589
    gave down.A (4 x 64, largest entry 26.8) a worst element of 0.343 against the unchunked 0.113 (3.0x),
    with mean errors 0.030 and 0.024."""
    ours, theirs = abs_error(chunked, exact), abs_error(unchunked, exact)
    scale = exact.abs().max().item()
    assert ours.mean().item() <= 2 * max(theirs.mean().item(), 2**-10 * exact.abs().mean().item()), name
    assert ours.max().item() <= max(3 * theirs.max().item(), 2**-6 * scale), name


def test_chunk_rows_threshold():
    """The decision, for a Llama-3.1-8B MLP (I = 14,336) in bf16, with the default 512 MiB."""
    assert lora_autograd.MLP_CHUNK_BYTES == 512 * 2**20
    bf16 = torch.bfloat16
    assert mlp_chunk_rows(2 * 2048, 14336, bf16) == 0  # batch 2 x 2,048 tokens: today's path
    assert mlp_chunk_rows(18724, 14336, bf16) == 0  # G/U 18,724 x 57,344 bytes: just under 1 GiB
    assert mlp_chunk_rows(18725, 14336, bf16) == 9344  # 512 MiB / 57,344 bytes = 9,362 rows, to 128s
    assert mlp_chunk_rows(32768, 14336, bf16) == 9344
    assert mlp_chunk_rows(32768, 14336, torch.float32) == 4608  # 4,681 rows of 114,688 bytes
    assert mlp_chunk_rows(0, 14336, bf16) == 0


def test_chunk_rows_small_chunks(monkeypatch):
    """Below 128 rows a chunk is not rounded (down to one row at least)."""
    monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", 100 * 2 * 64 * 4 + 5)
    assert mlp_chunk_rows(201, 64, torch.float32) == 100
    assert mlp_chunk_rows(200, 64, torch.float32) == 0
    monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", 10)
    assert mlp_chunk_rows(3, 64, torch.float32) == 1


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ("llama", "gemma"))  # SwiGLU, GeGLU (tanh)
@pytest.mark.parametrize("load_in_4bit", (True, False))  # gate/up stacked, or not
def test_patched_model_in_chunks_equals_unchunked(saved_models, arch, load_in_4bit, seed, monkeypatch):
    from loraforge.models import FastLanguageModel
    from loraforge.models import patch as lf_patch

    pytest.importorskip("peft")
    model, tokenizer = FastLanguageModel.from_pretrained(saved_models[arch], load_in_4bit=load_in_4bit,
                                                         dtype=torch.float32)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed % 1000,
                                             init_lora_weights=False, use_gradient_checkpointing="unsloth")  # fmt: skip
    assert lf_patch.is_patched(model)
    model.train()
    batch = tokenizer(["The cat sat on the warm mat and looked at the rain outside the window.",
                       "Rain falls softly on the roof today"], return_tensors="pt", padding=True)  # fmt: skip
    tokens = batch["input_ids"].numel()
    loss_plain, grads_plain = _loss_and_grads(model, batch)

    intermediate = model.config.intermediate_size
    rows = 8
    monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", rows * 2 * intermediate * 4)
    assert mlp_chunk_rows(tokens, intermediate, torch.float32) == rows and tokens > 2 * rows
    chunks = _count_chunks(monkeypatch)
    loss_ours, grads_ours = _loss_and_grads(model, batch)
    # Each layer: the forward and the backward's recompute of G and U. The checkpoint's recompute skips
    # the chunked MLP (its output is only summed into the residual: models/backward_recompute.py).
    assert chunks[0] == 2 * model.config.num_hidden_layers * math.ceil(tokens / rows)

    torch.testing.assert_close(loss_ours, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_ours.keys() == grads_plain.keys() and any("mlp" in n for n in grads_ours)
    for name in grads_ours:
        atol = max(1e-7, 1e-5 * grads_plain[name].abs().max().item())
        torch.testing.assert_close(grads_ours[name], grads_plain[name], rtol=1e-5, atol=atol, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["nf4 stacked, ranks differ", "nf4, up without LoRA", "16-bit, down without LoRA"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_chunked_equals_unchunked_on_cuda(case, dtype, seed, monkeypatch):
    """The chunked path's CUDA pieces: fp32 adapter gradients from bf16 operands (adapter_grad), the
    in-place activation backward on slices of a chunk's buffer, products written into row slices."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    projs = _mlp(case, dtype, "cuda")
    x = torch.randn(1, 1000, H, device="cuda").to(dtype)
    dout = torch.randn(1, 1000, H, device="cuda").to(dtype)
    plain = _run(projs, "silu", x, dout)
    monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", 256 * 2 * I * dtype.itemsize)
    assert mlp_chunk_rows(1000, I, dtype) == 256
    ours = _run(projs, "silu", x, dout)
    for o, p in zip([ours[0], ours[1], *ours[2]], [plain[0], plain[1], *plain[2]]):
        assert (o is None) == (p is None)
        if p is not None:
            # Both paths round the same products; chunking changes only the summation order of the
            # adapters' gradients over rows (and cuBLAS's split of the sums).
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(o.float(), p.float(), rtol=tol, atol=tol * p.abs().max().item())
