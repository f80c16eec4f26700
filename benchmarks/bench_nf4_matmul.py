"""Decode-sized products with an NF4 weight: Y = X W^T for X of 1, 8 and 16 rows, W 14336 x 4096 and
4096 x 4096 (Llama-3.1-8B's MLP and attention shapes), double-quantized. loraforge's in-register kernel
(triton_kernels/nf4_matmul.py) beside dequantize-then-matmul (our dequant kernel + cuBLAS, what the
fused path does today) and bitsandbytes' own matmul_4bit, against the time to read the packed weight
and its statistics once at the copy rate measured in the same run. CUDA-graph timed.

    python benchmarks/bench_nf4_matmul.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

ROT = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import loraforge.nf4
    from loraforge.ops.nf4 import nf4_levels
    from loraforge.triton_kernels.nf4_matmul import nf4_matmul

    bandwidth = harness.copy_bandwidth_gbs()
    rows = []
    for n, k in ((14336, 4096), (4096, 4096)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, state = loraforge.nf4.quantize(w, blocksize=64, compress_statistics=True)
        s2 = state.state2
        stats = (state.absmax, s2.code.float(), s2.absmax.float(), state.offset.float().reshape(1), nf4_levels("cuda"))
        read_bytes = n * k / 2 + n * k / 64  # codes, and one absmax byte a block
        limit_us = read_bytes / (bandwidth * 1e9 / 2) * 1e6  # a read-only stream at half the read+write rate
        for m in (1, 8, 16):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(ROT)]
            dense = loraforge.nf4.dequantize(packed, state, out_dtype=torch.bfloat16)
            ours = nf4_matmul(xs[0], packed.reshape(-1), *stats, 64, s2.blocksize, n)
            ref = xs[0].float() @ dense.float().t()
            err = (ours.float() - ref).abs().max().item() / ref.abs().max().item()
            impls = {
                "loraforge in-register": lambda i: nf4_matmul(xs[i], packed.reshape(-1), *stats, 64, s2.blocksize, n),
                "dequantize + matmul": lambda i: xs[i] @ loraforge.nf4.dequantize(packed, state,
                                                                                    out_dtype=torch.bfloat16).t(),
            }  # fmt: skip
            try:
                import bitsandbytes as bnb
                import bitsandbytes.functional as F

                theirs_packed, theirs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                impls["bitsandbytes matmul_4bit"] = lambda i: bnb.matmul_4bit(xs[i], theirs_packed.t(), theirs)
            except ImportError:
                pass
            times = {}
            for impl, call in impls.items():
                try:
                    times[impl] = harness.time_cuda_graph(call, ROT)
                except RuntimeError as error:
                    print(impl, "failed:", str(error)[:200])
            ours_us = times.get("loraforge in-register", float("nan"))
            for impl, us in times.items():
                rows.append({"benchmark": "nf4_matmul_bf16", "case": f"M={m} {n}x{k}", "impl": impl, "median_us": us,
                             "limit_us": limit_us, "fraction_of_limit": limit_us / us, "vs_ours": us / ours_us,
                             "note": f"rel. max error vs fp32 of the dequantized W: {err:.2e}" if impl.startswith(
                                 "loraforge") else ""})  # fmt: skip
            print(f"M={m} {n}x{k}:", {i: round(t, 1) for i, t in times.items()}, f"limit {limit_us:.1f} us, err {err:.1e}")
    harness.write_rows("nf4_matmul", rows, args.out)
    harness.print_table(rows)


if __name__ == "__main__":
    main()
