"""The stacked MLP's activation backward with its three LoRA products: folded into one pass
(loraforge::gated_lora_backward_) against the unfolded sequence the MLP backward otherwise runs
(gated_activation_backward_h_, then dY^T H over [dG | dU] and dHd^T Hm as fp32-output matmuls), at
2 x 2,048 tokens of the Llama-3.1-8B MLP (I = 14,336), r = 16, bf16.

Limit: the elementwise part must move 6 n I x 2 bytes (dHm, G, U read; Hm, dG, dU written); the folded
pass moves little more (the narrow operands). Reported against the copy bandwidth measured in the same run.

    python benchmarks/bench_gated_lora_backward.py [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness


def make_inputs(n: int, cols: int, rank: int, rotations: int):
    sets = []
    for _ in range(rotations):
        gu = torch.randn(n, 2 * cols, device="cuda", dtype=torch.bfloat16)
        sets.append((torch.randn(n, cols, device="cuda", dtype=torch.bfloat16), gu,
                     torch.randn(n, 2 * rank, device="cuda", dtype=torch.bfloat16),
                     torch.randn(n, rank, device="cuda", dtype=torch.bfloat16)))  # fmt: skip
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes of the folded kernel")
    args = parser.parse_args()
    import loraforge.ops  # noqa: F401  (registers the ops)
    from loraforge.models.lora_autograd import adapter_grad
    from loraforge.triton_kernels import gated_lora_backward as kernels

    n, cols, rank = args.rows, args.cols, args.rank
    rotations = 3
    sets = make_inputs(n, cols, rank, rotations)

    def unfolded(i):
        dh, gu, h_gu, ghd = sets[i]
        torch.ops.loraforge.gated_activation_backward_h_(dh, gu[:, :cols], gu[:, cols:], "silu")
        adapter_grad(gu.t(), h_gu, torch.float32)  # dY^T H, both halves (stacked_backward's grad_b_all)
        adapter_grad(ghd.t(), dh, torch.float32)  # dHd^T Hm (down's dA)

    def activation_only(i):
        dh, gu, _, _ = sets[i]
        torch.ops.loraforge.gated_activation_backward_h_(dh, gu[:, :cols], gu[:, cols:], "silu")

    def folded(i):
        dh, gu, h_gu, ghd = sets[i]
        torch.ops.loraforge.gated_lora_backward_(dh, gu[:, :cols], gu[:, cols:], "silu", h_gu[:, :rank],
                                                 h_gu[:, rank:], ghd)  # fmt: skip

    copy = harness.copy_bandwidth_gbs()
    limit_us = 6 * n * cols * 2 / (copy * 1e9) * 1e6
    timed = {"unfolded (activation backward + 2 matmuls)": unfolded, "activation backward alone": activation_only,
             "folded": folded}  # fmt: skip
    results = {name: harness.measure(fn, rotations) for name, fn in timed.items()}
    best = None
    if args.sweep:
        default = (kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS, kernels.PROGRAMS_PER_SM)
        for block_m, block_n, warps, per_sm in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (2, 4, 8)):
            kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS, kernels.PROGRAMS_PER_SM = block_m, block_n, warps, per_sm
            try:
                us = harness.time_cuda_graph(folded, rotations)
            except Exception as error:  # noqa: BLE001  (a shape the compiler rejects: say so, go on)
                print(f"BM={block_m} BN={block_n} warps={warps} per_sm={per_sm}: {type(error).__name__}")
                continue
            print(f"BM={block_m} BN={block_n} warps={warps} per_sm={per_sm}: {us:.1f} us", flush=True)
            if best is None or us < best[0]:
                best = (us, block_m, block_n, warps, per_sm)
        kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS, kernels.PROGRAMS_PER_SM = default
        print("best:", best)
    ours = results["folded"]["kernel"]
    rows = []
    for name, r in results.items():
        rows.append({"benchmark": f"gated_lora_backward_{n}x{cols}_r{rank}", "case": "bf16 silu", "impl": name,
                     "median_us": r["kernel"], "extra_peak_mib": r["peak"], "limit_us": limit_us,
                     "fraction_of_limit": limit_us / r["kernel"], "vs_ours": r["kernel"] / ours,
                     "note": f"eager {r['eager']:.1f} us; copy {copy:.0f} GB/s; limit = 6 n I x 2 bytes"
                             + (f"; sweep best {best}" if best and name == "folded" else "")})  # fmt: skip
    harness.write_rows("gated_lora_backward", rows, args.out)
    harness.print_table(rows)


if __name__ == "__main__":
    main()
