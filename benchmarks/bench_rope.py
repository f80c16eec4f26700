"""RoPE on q and k, batch 4 x 4,096 tokens, 32 query and 8 key heads of 128, bf16, forward + backward
including a sum for the loss (the issue's case): loraforge beside transformers' apply_rotary_pos_emb and
Liger-Kernel's LigerRopeFunction, against the copy-bandwidth limit measured in the same run.

q and k come as transformers makes them, `proj(x).view(b, s, h, d).transpose(1, 2)`; cos and sin from
its LlamaRotaryEmbedding ([1, seq, 128], bf16). Bytes that must move, forward and backward together:
q and k read, q_embed and k_embed written, their gradients read, those of q and k written
(4 x (q + k) bytes), plus cos and sin read once. (With a sum for the loss the incoming gradients are
broadcast scalars; we still count them, as the limit in DESIGN.md's anchors does.)

    python benchmarks/bench_rope.py [--out DIR] [--batch B] [--seq S] [--heads-q H] [--heads-k H] [--head-dim D]
    python benchmarks/bench_rope.py --check       # no GPU needed: each implementation once, small, vs float64

Two timings per implementation: `kernel` replays a CUDA graph of the calls (device time alone, the
number to hold against the copy limit), `eager` times each call from Python as a training step makes
it. Liger is optional (the anchors' .devkit/anchors on PYTHONPATH): where it does not import, its rows
say why. Liger rotates q and k in place, so the inputs drift from call to call; a rotation keeps their
norms, and the timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

ROTATIONS = 3  # input sets cycled so that repeated calls do not find them in L2
DEVICE = "cuda"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-k", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--check", action="store_true", help="run each implementation once on small inputs "
                        "(CPU when there is no GPU) and compare with float64; no timing")  # fmt: skip
    return parser.parse_args()


def implementations() -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> rope(q, k, cos, sin) -> (q_embed, k_embed); and name -> why it is unavailable."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loraforge.ops import rope

    impls = {"loraforge": rope.apply_rotary_pos_emb, "transformers": apply_rotary_pos_emb}
    missing = {}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        impls["liger"] = LigerRopeFunction.apply
    except Exception as error:  # noqa: BLE001  (ImportError, or an incompatible triton)
        missing["liger"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    return impls, missing


def make_inputs(batch, seq, heads_q, heads_k, head_dim, device, seed=0):
    """Leaves in the projection layout [b, s, h, d], and cos/sin from transformers' rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, seq, heads_q, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, seq, heads_k, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    config = LlamaConfig(hidden_size=heads_q * head_dim, num_attention_heads=heads_q, num_key_value_heads=heads_k,
                         head_dim=head_dim, max_position_embeddings=max(seq, 8192))  # fmt: skip
    embedding = LlamaRotaryEmbedding(config).to(device)
    cos, sin = embedding(q, torch.arange(seq, device=device)[None, :])
    return q.requires_grad_(), k.requires_grad_(), cos, sin


def forward_backward(rope_fn, q_leaf, k_leaf, cos, sin, grads=None):
    """Forward, then backward from a sum for the loss (the anchors' case), or from given full
    gradients of q_embed and k_embed (a training step's case, the one the copy limit counts)."""
    q, k = q_leaf.transpose(1, 2), k_leaf.transpose(1, 2)  # [b, h, s, d] views, as attention holds them
    q_embed, k_embed = rope_fn(q, k, cos, sin)
    if grads is None:
        return (q_embed, k_embed), torch.autograd.grad(q_embed.sum() + k_embed.sum(), (q_leaf, k_leaf))
    return (q_embed, k_embed), torch.autograd.grad((q_embed, k_embed), (q_leaf, k_leaf), grads)


def exact(q_leaf, k_leaf, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q64, k64 = (t.detach().double().requires_grad_() for t in (q_leaf, k_leaf))
    return forward_backward(apply_rotary_pos_emb, q64, k64, cos.double(), sin.double())


def errors_vs_exact(rope_fn, inputs, exact_results) -> str:
    q_leaf, k_leaf, cos, sin = inputs
    fresh = [t.detach().clone().requires_grad_() for t in (q_leaf, k_leaf)]  # Liger writes over its inputs
    outs, grads = forward_backward(rope_fn, *fresh, cos, sin)
    outs64, grads64 = exact_results
    names = ("q_embed", "k_embed", "dq", "dk")
    pairs = zip(names, (*outs, *grads), (*outs64, *grads64))
    return "max err vs fp64: " + ", ".join(f"{n} {(a.double() - b).abs().max().item():.3g}" for n, a, b in pairs)


def check(impls, missing) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(2, 5, 4, 2, 80, device)
    exact_results = exact(*inputs)
    for name, rope_fn in impls.items():
        print(f"{name:14s} {errors_vs_exact(rope_fn, inputs, exact_results)}")
    for name, why in missing.items():
        print(f"{name:14s} {why}")


def main() -> None:
    args = parse_args()
    impls, missing = implementations()
    if args.check:
        check(impls, missing)
        return

    bandwidth = harness.copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    b, s, hq, hk, d = args.batch, args.seq, args.heads_q, args.heads_k, args.head_dim
    case = f"b{b} s{s} q{hq} k{hk} d{d}"
    qk_bytes = b * s * (hq + hk) * d * 2
    must_move = 4 * qk_bytes + 2 * s * d * 2
    limit_us = must_move / (bandwidth * 1e9) * 1e6

    inputs = [make_inputs(b, s, hq, hk, d, DEVICE, seed) for seed in range(ROTATIONS)]
    pristine = make_inputs(b, s, hq, hk, d, DEVICE, seed=ROTATIONS)  # for errors: Liger's timed inputs drift
    exact_results = exact(*pristine)
    timings, notes = {}, {}
    # Gradients as attention's backward hands them: [b, h, s, d] views of [b, s, h, d] storage.
    grads = [tuple(torch.randn(b, s, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for h in (hq, hk))
             for _ in range(ROTATIONS)]  # fmt: skip
    for name, rope_fn in impls.items():
        try:
            notes[name] = errors_vs_exact(rope_fn, pristine, exact_results)
            timings[name] = harness.measure(lambda i, rope_fn=rope_fn: forward_backward(rope_fn, *inputs[i]), ROTATIONS)
            measured = harness.measure(lambda i, f=rope_fn: forward_backward(f, *inputs[i], grads[i]), ROTATIONS)
            timings[name].update({"kernel_given_grad": measured["kernel"], "eager_given_grad": measured["eager"]})
        except Exception as error:  # noqa: BLE001  (one failing baseline must not lose the others' numbers)
            notes[name] = f"failed: {type(error).__name__}: {error}"[:300]
    del exact_results, pristine
    torch.cuda.empty_cache()

    rows = []
    # "kernel"/"eager": backward from a sum (DESIGN.md's anchor case; the sum reads q and k once more, a
    # pass the limit does not count). "*_given_grad": from given full gradients, the passes the limit counts.
    for mode in ("kernel", "eager", "kernel_given_grad", "eager_given_grad"):
        ours = timings["loraforge"][mode]
        for name in list(timings) + list(missing):
            t = timings.get(name)
            rows.append({
                "benchmark": f"rope_qk_fwd_bwd_bf16_{mode}", "case": case, "impl": name,
                "median_us": t[mode] if t else "", "extra_peak_mib": t["peak"] if t else "",
                "limit_us": limit_us, "fraction_of_limit": limit_us / t[mode] if t else "",
                "vs_ours": t[mode] / ours if t else "", "note": notes.get(name, missing.get(name, "")),
            })  # fmt: skip
    for name, note in notes.items():
        if name not in timings:
            rows.append({"benchmark": "rope_qk_fwd_bwd_bf16", "case": case, "impl": name, "note": note})
    rows.append({"benchmark": "rope_qk_fwd_bwd_bf16", "case": case, "impl": "copy-limit", "median_us": limit_us,
                 "limit_us": limit_us, "fraction_of_limit": 1.0,
                 "note": f"{must_move / 1e9:.3f} GB (4 x q and k, cos, sin) at {bandwidth:.0f} GB/s measured copy",
                 })  # fmt: skip
    path = harness.write_rows("rope", rows, args.out)
    harness.print_table(rows)
    print("written to", path)


if __name__ == "__main__":
    main()
