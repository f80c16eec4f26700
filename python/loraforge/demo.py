"""The tiny-model demo: what `loraforge demo` runs, on CPU, offline, in about a minute.

It builds a tiny Llama and its tokenizer (loraforge.testing), quantizes every linear weight to
NF4 with loraforge's kernels and checks the bytes against bitsandbytes, then trains the model for
a few steps on a bundled sentence with the NF4-rounded weights, showing the loss fall and a
greedy answer before and after. (The full quickstart, LoRA and export included, replaces it once
those parts exist.)
"""

from __future__ import annotations

import time

import torch

import loraforge
from loraforge import testing

PROMPT = "The sky on a clear day is"
TARGET = " The sky on a clear day is blue, and the grass in spring is green."


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 12) -> str:
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def quantize_linear_weights(model, blocksize: int = 64) -> dict:
    """Replace each nn.Linear weight by its NF4 round trip; return counts and the bit-exact check."""
    import bitsandbytes.functional as F

    stats = {"layers": 0, "elements": 0, "packed_bytes": 0, "bit_exact": True, "max_rel_error": 0.0}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight is model.get_output_embeddings().weight:
            continue
        weight = module.weight.data
        packed, state = loraforge.nf4.quantize(weight, blocksize=blocksize, compress_statistics=True)
        theirs, _ = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        restored = loraforge.nf4.dequantize(packed, state)
        stats["bit_exact"] &= torch.equal(packed, theirs)
        stats["max_rel_error"] = max(stats["max_rel_error"], float((restored - weight).norm() / weight.norm()))
        stats["layers"] += 1
        stats["elements"] += weight.numel()
        stats["packed_bytes"] += packed.numel() * packed.element_size()
        module.weight.data = restored
    return stats


def run(steps: int = 40, seed: int = 0) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = testing.tiny_model_and_tokenizer("llama", seed=seed, hidden_size=256, intermediate_size=512)
    print(f"loraforge {loraforge.__version__}: tiny Llama, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"CUDA kernels built: {loraforge.cuda_kernels_built()}")  # fmt: skip

    stats = quantize_linear_weights(model)
    print(f"NF4: {stats['layers']} linear layers, {stats['elements']:,} weights -> {stats['packed_bytes']:,} bytes; "
          f"bit-exact with bitsandbytes: {stats['bit_exact']}; relative error {stats['max_rel_error']:.3f}")  # fmt: skip

    print(f"before training: {PROMPT!r} ->{_greedy(model, tokenizer, PROMPT)!r}")
    batch = tokenizer(TARGET, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {losses[-1]:.4f}")
    model.eval()
    print(f"after training:  {PROMPT!r} ->{_greedy(model, tokenizer, PROMPT)!r}")
    print(f"done in {time.perf_counter() - start:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"losses": losses, **stats}
