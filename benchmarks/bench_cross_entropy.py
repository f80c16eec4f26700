"""Cross-entropy with the lm_head, forward + backward with the head trainable (the issue's case:
N=8,192 tokens, H=4,096, V=128,256, bf16): loraforge's fused linear cross-entropy beside plain torch
(logits = X @ W^T, then F.cross_entropy in fp32), Liger's fused linear cross-entropy and its
cross-entropy on materialised logits, Apple's Cut Cross-Entropy, loraforge's cross-entropy on
materialised logits, and Unsloth's fused loss (unsloth_zoo). Each is timed from X and W to X.grad and
W.grad (median ms) with the peak memory above what the inputs hold (GiB; W.grad, which stays, is part of it), against the matmul limit:
3 matmuls of 2 N H V FLOPs at the bf16 matmul rate measured in the same run (torch.matmul 8192^3).

A second table times the cross-entropy alone on precomputed bf16 logits, against the copy limit
(read the logits twice, write the gradient once, at the copy rate measured in the same run).

    python benchmarks/bench_cross_entropy.py [--out DIR] [--chunk-rows 512,1024,2048] [--tokens N ...]

Liger (liger_kernel) and Cut Cross-Entropy (cut_cross_entropy) are optional: missing ones are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness

GIB = 2**30


def first(out):
    """The loss of a call that returns it alone or first in a tuple (newer Liger versions)."""
    return out[0] if isinstance(out, tuple) else out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-rows", default="", help="comma-separated chunk sizes to try beside the default")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also profile one fused step (kernels, stream gaps)")
    parser.add_argument("--sustained", action="store_true", help="also measure the matmul rate held over ~3 s")
    return parser.parse_args()


def optional_baselines() -> dict[str, Callable]:
    """Liger's and CCE's entry points, where installed (each call returns the loss)."""
    found = {}
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        found["liger fused"] = lambda x, w, t: first(LigerFusedLinearCrossEntropyFunction.apply(x, w, t))
        found["liger CE on logits"] = lambda x, w, t: first(LigerCrossEntropyFunction.apply(x @ w.T, t, None))
    except ImportError as error:
        print("Liger not available:", error)
    try:
        from cut_cross_entropy import linear_cross_entropy

        found["cut cross-entropy"] = lambda x, w, t: linear_cross_entropy(x, w, t)
    except ImportError as error:
        print("Cut Cross-Entropy not available:", error)
    return found


def implementations(chunk_rows: list[int]) -> dict[str, Callable]:
    from loraforge.ops.cross_entropy import cross_entropy
    from loraforge.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    impls = {
        "loraforge fused": lambda x, w, t: fused_linear_cross_entropy(x, w, t),
        "loraforge fused, fp32 dW": lambda x, w, t: fused_linear_cross_entropy(x, w, t, grad_weight_fp32=True),
    }
    for rows in chunk_rows:
        impls[f"loraforge fused, chunk {rows}"] = lambda x, w, t, rows=rows: fused_linear_cross_entropy(
            x, w, t, chunk_rows=rows
        )
    impls["torch"] = lambda x, w, t: F.cross_entropy((x @ w.T).float(), t)
    impls.update(optional_baselines())
    impls["loraforge CE on logits"] = lambda x, w, t: cross_entropy(x @ w.T, t, inplace_backward=True)
    # Unsloth last and imported at its first call: unsloth_zoo patches libraries as it loads, and the
    # rows above must not run under its patches.
    impls["unsloth fused"] = lambda x, w, t: unsloth_fused(x, w, t)
    impls["unsloth fused, 1 GB budget"] = lambda x, w, t: unsloth_fused(x, w, t, target_gb=1)
    return impls


def unsloth_fused(x, w, t, **budget):
    """What Unsloth's patched models call for their loss: chunked and torch.compile'd, with a chunk
    budget from the free GPU memory (its default) or a given one. Targets are already aligned with
    the rows (shift_labels=False), as for the other rows. Raises ImportError where it is missing."""
    import unsloth  # noqa: F401  (unsloth_zoo refuses to import without it)
    from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss

    return unsloth_fused_ce_loss(None, x[None], w, None, t[None], shift_labels=False, **budget)


def matmul_tflops(size: int = 8192, repeat: int = 30) -> float:
    """bf16 matmul rate of 8192^3 products: a short burst by default (the limit's rate); with a large
    `repeat`, the rate the GPU holds under sustained load, as in a run of fused steps (clocks drop
    when the card reaches its power limit)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    times = harness.time_cuda(lambda _: torch.mm(a, b), rotations=1, warmup=5, repeat=repeat)
    return 2 * size**3 / (harness.median(times) * 1e-6) / 1e12


def fwd_bwd(loss_fn, x, w, t):
    """One training step's worth: forward from X and W, backward to X.grad and W.grad."""

    def step():
        x.grad = w.grad = None
        loss_fn(x, w, t).backward()

    return step


def profile_fused(x, w, t) -> None:
    """Where one loraforge fused step's wall time goes: kernel time by kernel, and stream idle gaps."""
    import json

    from benchmarks.profile_train_step import profile_step
    from loraforge.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    step = fwd_bwd(lambda x, w, t: fused_linear_cross_entropy(x, w, t), x, w, t)
    for _ in range(2):
        step()
    x.grad = w.grad = None
    report = profile_step(step)
    x.grad = w.grad = None
    print("profile of one loraforge fused step:", json.dumps(report, indent=1, default=str))


def linear_rows(args, tflops, case, sustained_tflops=None) -> list[dict]:
    n, h, v = args.tokens, args.hidden, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(1234)
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    limit_us = 3 * 2 * n * h * v / (tflops * 1e12) * 1e6
    chunk_rows = [int(r) for r in args.chunk_rows.split(",") if r]
    results, reference_loss = {}, None
    for impl, loss_fn in implementations(chunk_rows).items():
        try:
            with torch.no_grad():
                loss = loss_fn(x, w, t).item()
            reference_loss = loss if impl == "torch" else reference_loss
            step = fwd_bwd(loss_fn, x, w, t)
            step()  # compile / autotune outside the measurements
            x.grad = w.grad = None
            torch.cuda.empty_cache()
            peak_mib = harness.extra_peak_mib(step)
            x.grad = w.grad = None
            torch.cuda.empty_cache()
            times = harness.time_cuda(lambda _, step=step: step(), rotations=1, warmup=3, repeat=args.repeat)
            median_us = harness.median(times)
            results[impl] = (median_us, peak_mib, loss)
            spread = ", ".join(f"{t / 1e3:.1f}" for t in times[:3] + times[-3:])
            print(f"{time.strftime('%H:%M:%S')} {impl}: {median_us / 1e3:.1f} ms, +{peak_mib / 1024:.2f} GiB, "
                  f"loss {loss:.5f} (first and last three: {spread} ms)")  # fmt: skip
        except (RuntimeError, TypeError, ValueError, ImportError) as error:  # OOM, API drift, missing: go on
            print(f"{impl} failed: {error}")
        x.grad = w.grad = None
        torch.cuda.empty_cache()
    if args.profile:
        profile_fused(x, w, t)
    ours = results.get("loraforge fused", (float("nan"),))[0]
    rows = []
    for impl, (median_us, peak_mib, loss) in results.items():
        note = f"loss {loss:.5f}" + (f" (torch {reference_loss:.5f})" if reference_loss is not None else "")
        rows.append({"benchmark": "linear_cross_entropy_fwd_bwd", "case": case, "impl": impl, "median_us": median_us,
                     "extra_peak_mib": peak_mib, "limit_us": limit_us, "fraction_of_limit": limit_us / median_us,
                     "vs_ours": median_us / ours, "note": note})  # fmt: skip
    rows.append({"benchmark": "linear_cross_entropy_fwd_bwd", "case": case, "impl": "matmul-limit",
                 "median_us": limit_us, "limit_us": limit_us, "fraction_of_limit": 1.0, "vs_ours": limit_us / ours,
                 "note": f"3 x 2NHV FLOP at {tflops:.0f} TFLOP/s measured (bf16 8192^3)"})  # fmt: skip
    if sustained_tflops:
        sustained_us = 3 * 2 * n * h * v / (sustained_tflops * 1e12) * 1e6
        rows.append({"benchmark": "linear_cross_entropy_fwd_bwd", "case": case, "impl": "matmul-limit, sustained",
                     "median_us": sustained_us, "limit_us": sustained_us, "fraction_of_limit": 1.0,
                     "vs_ours": sustained_us / ours,
                     "note": f"3 x 2NHV FLOP at {sustained_tflops:.0f} TFLOP/s: the rate held over 2,000 back-to-back "
                             "8192^3 products (clocks fall at the power cap)"})  # fmt: skip
    return rows


def logits_only_rows(args, bandwidth, case) -> list[dict]:
    """Cross-entropy alone on precomputed bf16 logits, forward + backward to the logits' gradient."""
    from loraforge.ops.cross_entropy import cross_entropy

    n, v = args.tokens, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(99)
    logits = (torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=gen) * 2).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    limit_us = 3 * n * v * 2 / (bandwidth * 1e9) * 1e6  # read twice, write once, bf16

    def on_logits(loss_fn):
        def step():
            logits.grad = None
            loss_fn(logits, t).backward()

        return step

    # The in-place variants leave the gradient in the logits; the next call reads those values, which
    # are as good as any for timing.
    impls = {
        "loraforge": lambda z, t: cross_entropy(z, t),
        "loraforge, in-place backward": lambda z, t: cross_entropy(z, t, inplace_backward=True),
        "torch": lambda z, t: F.cross_entropy(z.float(), t),
    }
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        # Liger 0.8's signature: (input, target, weight, ignore_index, ...); weight=None is unweighted.
        impls["liger"] = lambda z, t: first(LigerCrossEntropyFunction.apply(z, t, None))
    except ImportError:
        pass
    results = {}
    for impl, loss_fn in impls.items():
        step = on_logits(loss_fn)
        try:
            step()
        except Exception as error:  # an anchor's API drift must not lose the other rows
            print(f"{impl} on logits failed: {error}")
            logits.grad = None
            continue
        logits.grad = None
        torch.cuda.empty_cache()
        peak_mib = harness.extra_peak_mib(step)
        logits.grad = None
        times = harness.time_cuda(lambda _, step=step: step(), rotations=1, warmup=3, repeat=args.repeat)
        results[impl] = (harness.median(times), peak_mib)
        logits.grad = None
        torch.cuda.empty_cache()
    ours = results["loraforge"][0]
    return [{"benchmark": "cross_entropy_on_logits_fwd_bwd", "case": case, "impl": impl, "median_us": median_us,
             "extra_peak_mib": peak_mib, "limit_us": limit_us, "fraction_of_limit": limit_us / median_us,
             "vs_ours": median_us / ours, "note": f"limit: 3 x N V x 2 B at {bandwidth:.0f} GB/s measured copy"}
            for impl, (median_us, peak_mib) in results.items()]  # fmt: skip


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cross_entropy needs a CUDA GPU")
    tflops = matmul_tflops()
    sustained = matmul_tflops(repeat=2000) if args.sustained else None
    if sustained:
        # ~3 s of back-to-back products: what the clocks hold once the power limit bites.
        print(f"bf16 matmul 8192^3 sustained (2,000 products): {sustained:.0f} TFLOP/s")
    torch.cuda.empty_cache()
    bandwidth = harness.copy_bandwidth_gbs()
    print(f"bf16 matmul 8192^3: {tflops:.0f} TFLOP/s; copy (read + write): {bandwidth:.0f} GB/s")
    case = f"N={args.tokens},H={args.hidden},V={args.vocab},bf16"
    logits_case = f"N={args.tokens},V={args.vocab},bf16"
    rows = linear_rows(args, tflops, case, sustained) + logits_only_rows(args, bandwidth, logits_case)
    path = harness.write_rows("cross_entropy", rows, args.out)
    harness.print_table(rows)
    print("written to", path)


if __name__ == "__main__":
    main()
