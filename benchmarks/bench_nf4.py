"""NF4 dequantization with double quantization, bf16 out: loraforge beside bitsandbytes'
`dequantize_4bit` and Unsloth's `fast_dequantize`, and beside the copy-bandwidth limit measured in
the same run. Bytes that must move per element: 0.5 (packed) + 1/64 (8-bit absmax) + 2 (bf16 out),
plus a few hundred bytes of nested state.

    python benchmarks/bench_nf4.py [--out DIR]

Two timings per implementation: `kernel` replays a CUDA graph of the calls (device time alone,
the number to hold against the copy limit), `eager` times each call from Python as a training
step makes it (device time, or the Python and launch overhead where that is larger).

Unsloth must be imported before transformers in its own process, so its timings come from a
subprocess (`--unsloth-only`) that rebuilds the same weights from the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096), (128256, 4096)]
BYTES_PER_ELEMENT = 0.5 + 1 / 64 + 2
ROTATIONS = 3


def make_states(shape, bnb_functional):
    """ROTATIONS independent bnb-quantized weights (quantized by bitsandbytes itself)."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    states = []
    for _ in range(ROTATIONS):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        states.append(bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        del w
    return states


def same_size_copy_us(elements: int) -> float:
    """A device-to-device copy of 1.2578 bytes per element moves (read + write) what the dequantize
    moves; graph-timed like the kernels. At ~150 MB the copy itself runs below the 2 GiB rate."""
    src = torch.empty(int(elements * BYTES_PER_ELEMENT / 2), dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    result = harness.time_cuda_graph(lambda _: dst.copy_(src), rotations=1)
    del src, dst
    torch.cuda.empty_cache()
    return result


def unsloth_times() -> dict:
    import unsloth  # noqa: F401  (before transformers)
    import bitsandbytes.functional as F
    from unsloth.kernels.utils import fast_dequantize

    result = {}
    for shape in SHAPES:
        states = make_states(shape, F)
        call = lambda i: fast_dequantize(states[i][0], states[i][1])  # noqa: E731
        result[f"{shape[0]}x{shape[1]}"] = harness.measure(call, ROTATIONS)
        del states
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--unsloth-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unsloth_only:
        print(json.dumps(unsloth_times()))
        return

    import bitsandbytes.functional as F

    import loraforge

    unsloth = {}
    try:
        proc = subprocess.run([sys.executable, __file__, "--unsloth-only"], capture_output=True, text=True,
                              timeout=600, env=os.environ.copy())  # fmt: skip
        unsloth = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        if proc.returncode != 0:
            print("unsloth run failed:", proc.stderr[-2000:])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        print("unsloth run failed:", error)

    bandwidth = harness.copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    rows = []
    for shape in SHAPES:
        case = f"{shape[0]}x{shape[1]}"
        states = make_states(shape, F)
        exact = all(torch.equal(loraforge.nf4.dequantize(p, s), F.dequantize_4bit(p, s)) for p, s in states)
        limit_us = shape[0] * shape[1] * BYTES_PER_ELEMENT / (bandwidth * 1e9) * 1e6
        timings = {
            "loraforge": harness.measure(lambda i: loraforge.nf4.dequantize(*states[i]), ROTATIONS),
            "bitsandbytes": harness.measure(lambda i: F.dequantize_4bit(*states[i]), ROTATIONS),
        }
        if case in unsloth:
            timings["unsloth"] = unsloth[case]
        notes = {"loraforge": f"bit-exact vs bnb: {exact}", "unsloth": "separate process, same weights"}
        for mode in ("kernel", "eager"):
            ours = timings["loraforge"][mode]
            for impl, t in timings.items():
                rows.append({"benchmark": f"nf4_dequant_bf16_dq_{mode}", "case": case, "impl": impl,
                             "median_us": t[mode], "extra_peak_mib": "", "limit_us": limit_us,
                             "fraction_of_limit": limit_us / t[mode], "vs_ours": t[mode] / ours,
                             "note": notes.get(impl, "")})  # fmt: skip
        rows.append({"benchmark": "nf4_dequant_bf16_dq", "case": case, "impl": "copy-limit", "median_us": limit_us,
                     "limit_us": limit_us, "fraction_of_limit": 1.0, "vs_ours": limit_us / timings["loraforge"]["kernel"],
                     "note": f"{BYTES_PER_ELEMENT:.4f} B/elem at {bandwidth:.0f} GB/s measured copy"})  # fmt: skip
        same = same_size_copy_us(shape[0] * shape[1])
        rows.append({"benchmark": "nf4_dequant_bf16_dq", "case": case, "impl": "same-bytes-copy", "median_us": same,
                     "limit_us": limit_us, "fraction_of_limit": limit_us / same,
                     "vs_ours": same / timings["loraforge"]["kernel"],
                     "note": "a device copy moving the same bytes, graph-timed: what this size can reach"})  # fmt: skip
        del states
        torch.cuda.empty_cache()
    path = harness.write_rows("nf4", rows, args.out)
    harness.print_table(rows)
    print("written to", path)


if __name__ == "__main__":
    main()
