"""Host (CPU) time per call of the ops the training step calls per layer, beside an aten op, and where
it goes (cProfile). The 8B train step is bound by the host: on the H200 (2026-12-03) one RMSNorm
forward cost 82 us of host time through the op (114 us with autograd) against 33 us for the Triton
launcher alone and 8 us for an aten add. Needs a CUDA GPU.

    python benchmarks/host_overhead.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def cases() -> dict:
    from loraforge.ops import rmsnorm, rope, swiglu
    from loraforge.triton_kernels import rmsnorm as rms_kernels

    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g, u = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16), torch.randn_like(x[:, :1024])
    q = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 64, 128, device="cuda", dtype=torch.bfloat16), torch.randn(1, 64, 128, device="cuda")
    sin = sin.to(torch.bfloat16)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    return {
        "aten add": lambda: x.add(x),
        "rms_norm triton launcher": lambda: rms_kernels.rms_norm_forward(x, w, 1e-5, False, torch.bfloat16),
        "rms_norm op, no grad": lambda: (torch.set_grad_enabled(False), rmsnorm.rms_norm(x, w, 1e-5),
                                         torch.set_grad_enabled(True)),
        "rms_norm op, autograd": lambda: rmsnorm.rms_norm(xg, wg, 1e-5),
        "gated_activation op": lambda: swiglu.gated_activation(g, u, "silu", False),
        "rope op, autograd": lambda: rope.rope(qg, kg, cos, sin),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="also cProfile each op's calls (top 12 by own time)")
    args = parser.parse_args()
    for name, fn in cases().items():
        print(f"{name:32s} {per_call_us(fn):8.1f} us host per call")
        if args.profile and name != "aten add":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(500):
                fn()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
