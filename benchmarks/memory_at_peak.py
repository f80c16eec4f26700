"""What is alive on the GPU at the peak of one training step, grouped by where it was allocated.

    python benchmarks/memory_at_peak.py [--impl loraforge] [--layers 32] [--out DIR]

Records the CUDA caching allocator's history (torch.cuda.memory._record_memory_history) over one
step of the bench_train_step model (after warm-up steps), replays the trace to find the moment the
allocated total peaks, and prints the blocks alive then, summed by the first stack frame inside
loraforge / transformers / peft / trl / unsloth / torch.optim (else the innermost Python frame).
Weights and optimizer state allocated before the step are counted as one "before the step" line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INTERESTING = ("loraforge", "transformers", "peft", "trl", "unsloth", "torch/optim", "torch/utils/checkpoint")


def _where(frames: list[dict]) -> str:
    """The first frame (innermost first, as the allocator records them) in code we care about."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    for frame in python:
        name = frame["filename"]
        if any(key in name for key in INTERESTING):
            short = name.split("site-packages/")[-1].split("python/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if python:
        return f"{python[0]['filename'].rsplit('/', 1)[-1]}:{python[0].get('line')} {python[0].get('name')}"
    return "(no python frame)"


def alive_at_peak(trace: list[dict], baseline: int = 0) -> tuple[int, dict[str, int]]:
    """Replay allocator trace entries ({"action": "alloc" | "free_completed" | ..., "addr", "size",
    "frames"}); returns (peak bytes above `baseline`, {where: bytes alive at that peak})."""
    alive: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for entry in trace:
        action = entry.get("action")
        if action == "alloc":
            alive[entry["addr"]] = (entry["size"], _where(entry.get("frames", [])))
            total += entry["size"]
            if total > peak:
                peak, at_peak = total, dict(alive)
        elif action == "free_completed":
            size, _ = alive.pop(entry["addr"], (0, ""))
            total -= size
    groups: dict[str, int] = {}
    for size, where in at_peak.values():
        groups[where] = groups.get(where, 0) + size
    return peak + baseline, dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def main() -> None:
    import os
    import tempfile

    import torch

    from benchmarks import bench_train_step

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="loraforge", choices=bench_train_step.IMPLS)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--folder", help="an existing bench_train_step checkpoint (else one is written)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        folder = args.folder or scratch
        if not args.folder:
            bench_train_step.write_checkpoint(Path(folder), args.layers)
        if args.impl == "unsloth":
            import unsloth  # noqa: F401
        model = bench_train_step.load(args.impl, folder, args.seq)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        ids = torch.randint(0, 128256, (args.batch, args.seq), device="cuda")

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        # Python frames only: with the default C++ stacks too, torch 2.11 raised a SystemError inside the
        # checkpoint recompute on the H200 (2026-12-03); the call sites we group by are Python ones.
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = [e for device in snapshot["device_traces"] for e in device]
    peak, groups = alive_at_peak(trace, baseline)
    report = {"impl": args.impl, "before_step_gib": baseline / 2**30, "peak_gib": peak / 2**30,
              "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "alive_at_peak_mib": {k: round(v / 2**20, 1) for k, v in list(groups.items())[: args.top]}}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"memory_at_peak_{args.impl}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
