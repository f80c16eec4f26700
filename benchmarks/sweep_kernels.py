"""Launch-parameter sweeps for the bandwidth-bound Triton kernels, forward and backward timed apart
(CUDA-graph replay), each against the bytes it must move at the copy rate measured in the same run.
Used to choose the defaults in triton_kernels/{rmsnorm,rope}.py; not a benchmark of record.

    python benchmarks/sweep_kernels.py [rmsnorm] [rope] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

ROT = 3


def timed(fn) -> float:
    return harness.time_cuda_graph(fn, ROT)


def sweep_rmsnorm(bandwidth: float) -> list[dict]:
    from loraforge.triton_kernels import rmsnorm as k

    rows, hidden = 8192, 4096
    xs = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(ROT)]
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    dys = [torch.randn_like(x) for x in xs]
    dy_bcast = torch.ones((), device="cuda", dtype=torch.bfloat16).expand(rows, hidden)
    pass_us = rows * hidden * 2 / (bandwidth * 1e9) * 1e6  # one read or write of x (bandwidth: read + write)
    out = []
    for block_rows, warps in itertools.product((1, 2), (1, 2, 4, 8)):
        k.FWD_BLOCK_ROWS, k.FWD_NUM_WARPS = block_rows, warps
        t = timed(lambda i: k.rms_norm_forward(xs[i], w, 1e-6, False, torch.bfloat16))
        out.append({"kernel": "rmsnorm_fwd", "block_rows": block_rows, "warps": warps, "us": t,
                    "fraction": 2 * pass_us / t})  # fmt: skip
    k.FWD_BLOCK_ROWS = k.FWD_NUM_WARPS = 0
    default_pps = k.BWD_PROGRAMS_PER_SM
    for pps, warps, stages in itertools.product((2, 4, 8, 16, 32), (1, 2, 4, 8), (1, 2)):
        k.BWD_PROGRAMS_PER_SM, k.BWD_NUM_WARPS, k.BWD_STAGES = pps, warps, stages
        config = {"kernel": "rmsnorm_bwd", "pps": pps, "warps": warps, "stages": stages}
        try:
            full = timed(lambda i: k.rms_norm_backward(dys[i], xs[i], w, 1e-6, False, True))
            bcast = timed(lambda i: k.rms_norm_backward(dy_bcast, xs[i], w, 1e-6, False, True))
        except Exception as error:  # noqa: BLE001  (out of resources for a config: note it, go on)
            out.append({**config, "error": str(error)[:120]})
            continue
        out.append({**config, "us_full_dy": full, "fraction": 3 * pass_us / full, "us_bcast_dy": bcast,
                    "fraction_bcast": 2 * pass_us / bcast})  # fmt: skip
    k.BWD_PROGRAMS_PER_SM, k.BWD_NUM_WARPS, k.BWD_STAGES = default_pps, 0, 2
    return out


def sweep_rope(bandwidth: float) -> list[dict]:
    from loraforge.triton_kernels import rope as k

    b, s, hq, hk, d = 4, 4096, 32, 8, 128
    qs = [torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(ROT)]
    ks = [torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(ROT)]
    cos = torch.randn(1, s, d, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(1, s, d, device="cuda", dtype=torch.bfloat16)
    q_out = [torch.empty_like(q) for q in qs]
    k_out = [torch.empty_like(x) for x in ks]
    grads_q = [torch.randn_like(q) for q in qs]
    grads_k = [torch.randn_like(x) for x in ks]
    pass_us = b * s * (hq + hk) * d * 2 / (bandwidth * 1e9) * 1e6
    out = []
    for warps in (1, 2, 4, 8):
        k.NUM_WARPS = warps
        t = timed(lambda i: k.rope_forward(qs[i], ks[i], cos, sin, q_out[i], k_out[i]))
        out.append({"kernel": "rope_fwd", "warps": warps, "us": t, "fraction": 2 * pass_us / t})
        t = timed(lambda i: k.rope_backward(grads_q[i], grads_k[i], cos, sin, q_out[i], k_out[i]))
        out.append({"kernel": "rope_bwd", "warps": warps, "us": t, "fraction": 2 * pass_us / t})
    k.NUM_WARPS = 0
    return out


def profile_fused_ce(bandwidth: float) -> list[dict]:
    """Peak extra memory and kernel time by kernel of one forward + backward of the fused linear CE
    (8,192 x 4,096 x 128,256 bf16, trainable head), for a few chunk sizes."""
    from torch.profiler import ProfilerActivity, profile

    from loraforge.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    n, h, v = 8192, 4096, 128256
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    out = []
    for chunk in (1024, 2048):

        def step():
            x.grad = w.grad = None
            fused_linear_cross_entropy(x, w, t, chunk_rows=chunk).backward()

        step()
        x.grad = w.grad = None
        torch.cuda.empty_cache()
        peak = harness.extra_peak_mib(step)
        x.grad = w.grad = None
        ms = (
            harness.median(harness.time_cuda(lambda _: step(), 1, warmup=2, repeat=10))
            / 1e3
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name[:90]] = (
                    kernels.get(e.name[:90], 0.0) + e.device_time / 1e3
                )
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
        out.append({"kernel": "fused_ce", "chunk": chunk, "ms": ms, "peak_gib": peak / 1024, "fraction": 0,
                    "kernel_ms": [(name, round(t_ms, 3)) for name, t_ms in top]})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", nargs="*", default=["rmsnorm", "rope", "fused_ce"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bandwidth = harness.copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    results = {}
    for name in args.which:
        results[name] = {
            "rmsnorm": sweep_rmsnorm,
            "rope": sweep_rope,
            "fused_ce": profile_fused_ce,
        }[name](bandwidth)
        for row in sorted(
            results[name], key=lambda r: -r.get("fraction", r.get("fraction_bcast", 0))
        ):
            print(
                json.dumps(
                    {
                        key: round(v, 3) if isinstance(v, float) else v
                        for key, v in row.items()
                    }
                )
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_kernels.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
