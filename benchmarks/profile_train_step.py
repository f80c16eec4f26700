"""Where the time of one QLoRA training step goes: torch.profiler over one step of the
bench_train_step model, per variant in its own process, kernels grouped by kind.

    python benchmarks/profile_train_step.py [--impls loraforge,unsloth] [--layers 32] [--out DIR]

Prints, per variant: step wall time, GPU busy time (sum of kernel time), and the time per kernel
group (GEMM, attention, NF4 dequant, norm, rope, activation, loss, copies, elementwise, other),
plus the 25 most expensive kernels. The groups tell where a variant spends more than another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_train_step, harness  # noqa: E402

GROUPS = (  # first match wins; lower-case substrings of kernel names
    ("gemm", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("nf4_dequant", ("dequant", "nf4", "kdequantize")),
    ("norm", ("rms", "norm")),
    ("rope", ("rope", "rotary")),
    ("activation", ("swiglu", "geglu", "gated", "silu", "gelu")),
    ("loss", ("cross_entropy", "logsumexp", "fused_linear", "_ce_")),
    ("memcpy", ("memcpy", "memset", "copy_")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def stream_gaps(prof, top: int = 30) -> dict:
    """Idle time of the busiest stream between consecutive kernels, and the largest gaps with the
    kernels on either side and the CPU ops running when the gap began (what the GPU waited for)."""
    import tempfile as _tempfile

    with _tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        trace = json.load(open(handle.name))["traceEvents"]
    kernels = [e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e.get("args", {}).get("stream"), []).append(e)
    if not by_stream:
        return {}
    stream, events = max(by_stream.items(), key=lambda kv: sum(e["dur"] for e in kv[1]))
    events.sort(key=lambda e: e["ts"])
    cpu_ops = sorted((e for e in trace if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    gaps = []
    for before, after in zip(events, events[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 0:
            gaps.append((gap, before, after))
    total = sum(g for g, _, _ in gaps)
    largest = sorted(gaps, key=lambda t: -t[0])[:top]
    described = []
    for gap, before, after in largest:
        start = before["ts"] + before["dur"]
        running = [e["name"][:60] for e in cpu_ops if e["ts"] <= start <= e["ts"] + e["dur"]][-4:]
        described.append((round(gap, 1), before["name"][:50], after["name"][:50], running))
    small = sum(g for g, _, _ in gaps if g < 20)
    return {"busiest_stream": stream, "stream_idle_ms": total / 1e3, "idle_in_gaps_under_20us_ms": small / 1e3,
            "gaps_over_100us": sum(1 for g, _, _ in gaps if g > 100), "largest_gaps": described}  # fmt: skip


def profile_variant(impl: str, folder: str, batch: int, seq: int) -> dict:
    if impl == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    model = bench_train_step.load(impl, folder, seq)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)  # the Trainer's default, adamw_torch_fused
    gen = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(0, 128256, (batch, seq), device="cuda", generator=gen)

    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    plain_ms = 1e3 * (time.perf_counter() - start)
    return {"impl": impl, "step_ms": plain_ms, **profile_step(step),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def profile_step(step) -> dict:
    """Profile one call of step(): kernel time by group, top kernels and CPU ops, stream gaps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        profiled_ms = 1e3 * (time.perf_counter() - start)
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 1e3  # ms
            entry[1] += 1
    groups: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    cpu_ops = sorted(
        (
            (e.key, e.cpu_time_total / 1e3, e.count)
            for e in prof.key_averages()
            if e.count
        ),
        key=lambda t: -t[1],
    )[:20]
    gaps = stream_gaps(prof)
    return {
        **gaps,
        "profiled_step_ms": profiled_ms,
        "gpu_busy_ms": sum(groups.values()),
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels": [(name[:110], round(ms, 2), n) for name, (ms, n) in top],
        "top_cpu_ops": [(k[:80], round(ms, 2), n) for k, ms, n in cpu_ops],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--impls", default="loraforge,unsloth")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(
            json.dumps(profile_variant(args.variant, args.folder, args.batch, args.seq))
        )
        return
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        bench_train_step.write_checkpoint(Path(folder), args.layers)
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--variant", impl, "--folder", folder, "--batch", str(args.batch),
                   "--seq", str(args.seq)]  # fmt: skip
            result, stderr = harness.run_json_process(cmd, timeout=900)
            if result is None:
                print(f"{impl} failed:\n{stderr[-3000:]}")
                continue
            results.append(result)
            print(json.dumps(result, indent=1), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_train_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
