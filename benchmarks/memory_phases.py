"""Where the memory and the time of one training step go, phase by phase: the forward of each decoder
layer, the loss, the backward of each layer (its recompute, then its gradients), the optimizer step.
The bench_train_step model and settings, one variant per process (loraforge, unsloth, ...).

    python benchmarks/memory_phases.py [--impls loraforge,unsloth] [--layers 32] [--first-step] [--out DIR]

--first-step also marks the very first step (before the warmup steps), reported apart: that is where
one-time costs land (first calls, optimizer state creation), and a run must fit its peak too.

Hooks on every decoder layer (its attention's start, its MLP's end) mark the phase boundaries (a checkpointed layer runs twice: forward, then
its recompute in backward). At each mark: the allocated bytes, the allocator's peak since the last mark
(then reset), host time since the last mark, and a CUDA event. Per phase this gives its own peak, and
host time beside GPU time (event to event): where the two are equal the GPU waited for the host.
History recording (memory_at_peak.py) needs nothing of this but fails under some torch versions with
checkpoint recompute; these counters always work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_train_step, harness  # noqa: E402


class PhaseMarks:
    """Marks with memory counters, host time and CUDA events; `phases()` turns them into rows."""

    def __init__(self):
        self.marks: list[tuple] = []
        self.cuda = torch.cuda.is_available()

    def mark(self, label: str) -> None:
        allocated = peak = 0
        event = None
        if self.cuda:
            allocated, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((label, allocated, peak, time.perf_counter(), event))

    def phases(self) -> list[dict]:
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        for (label0, _, _, t0, e0), (label1, alloc1, peak1, t1, e1) in zip(self.marks, self.marks[1:]):
            gpu_ms = e0.elapsed_time(e1) if e0 is not None else float("nan")
            rows.append({"phase": f"{label0} -> {label1}", "peak_gib": peak1 / 2**30, "end_gib": alloc1 / 2**30,
                         "host_ms": (t1 - t0) * 1e3, "gpu_ms": gpu_ms})  # fmt: skip
        return rows


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "mlp"):
            return list(layers)
    raise ValueError("no decoder layers (a ModuleList `layers` of modules with an `mlp`) in the model")


class MarkTarget:
    """Where the hooks' marks go: the PhaseMarks of the step being marked, or nowhere (`current` None).
    `new_step()` resets the forward/recompute parity kept per layer."""

    def __init__(self):
        self.current: PhaseMarks | None = None
        self.calls: dict[int, int] = {}

    def new_step(self, marks: PhaseMarks | None) -> None:
        self.current = marks
        self.calls.clear()

    def mark(self, label: str) -> None:
        if self.current is not None:
            self.current.mark(label)


def instrument(model: torch.nn.Module, marks: MarkTarget) -> None:
    """Hooks that mark each layer's phases into the step `marks` currently points at."""
    calls = marks.calls

    def kind(index: int) -> str:
        return "fwd" if calls.get(index, 0) % 2 == 0 else "rec"

    for index, layer in enumerate(decoder_layers(model)):
        def pre(_module, _args, index=index):
            marks.mark(f"L{index} {kind(index)} in")

        def post(_module, _args, _output, index=index):
            marks.mark(f"L{index} {kind(index)} out")
            calls[index] = calls.get(index, 0) + 1

        # Not the layer's own hooks: transformers checkpoints `forward`, not `__call__`, so they would not
        # run in the recompute. Attention and MLP are called as modules by every stack (the norms are not
        # in Unsloth); the layer's last residual add falls into the next phase.
        layer.self_attn.register_forward_pre_hook(pre)
        layer.mlp.register_forward_hook(post)
        # The recompute stops early (after the last tensor the backward needs), so its MLP never returns;
        # the layer's backward is marked where the gradient reaches its MLP's output.
        layer.mlp.register_full_backward_pre_hook(lambda _m, _g, index=index: marks.mark(f"L{index} bwd"))


def run_variant(impl: str, folder: str, batch: int, seq: int, warmup: int, first_step: bool = False) -> dict:
    if impl == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    model = bench_train_step.load(impl, folder, seq)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)  # the Trainer's default, adamw_torch_fused
    input_ids = torch.randint(0, 128256, (batch, seq), device="cuda")

    def step(marks: PhaseMarks | None):
        if marks:
            marks.mark("start")
        loss = model(input_ids=input_ids, labels=input_ids).loss
        if marks:
            marks.mark("loss")
        loss.backward()
        if marks:
            marks.mark("backward done")
        optimizer.step()
        if marks:
            marks.mark("optimizer done")
        optimizer.zero_grad(set_to_none=True)
        if marks:
            marks.mark("zero_grad done")
        loss.item()

    target = MarkTarget()
    instrument(model, target)
    result = {}
    if first_step:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        target.new_step(PhaseMarks())
        step(target)
        result["first_rows"] = target.current.phases()
        result["first_step_peak_gib"] = max(r["peak_gib"] for r in result["first_rows"])
        target.new_step(None)
    for _ in range(warmup):
        step(None)
    torch.cuda.synchronize()
    target.new_step(PhaseMarks())
    step(target)
    rows = target.current.phases()
    return {**result, "rows": rows, "step_peak_gib": max(r["peak_gib"] for r in rows)}


def summarise(impl: str, rows: list[dict]) -> None:
    print(f"== {impl}: step peak {max(r['peak_gib'] for r in rows):.3f} GiB, host {sum(r['host_ms'] for r in rows):.1f} ms, "
          f"gpu {sum(r['gpu_ms'] for r in rows):.1f} ms")  # fmt: skip
    print("  top phases by peak:")
    for r in sorted(rows, key=lambda r: -r["peak_gib"])[:8]:
        print(f"    {r['phase']:34s} peak {r['peak_gib']:.3f}  end {r['end_gib']:.3f}  host {r['host_ms']:7.2f}  gpu {r['gpu_ms']:7.2f}")
    groups: dict[str, list[float]] = {}
    for r in rows:  # per kind of phase: forward of a layer, recompute, backward, the rest
        a, b = r["phase"].split(" -> ")
        # Layer marks without their index ("L3 rec in" -> "rec in"), so phases of one kind add up: with
        # torch's checkpoint the backward reaches a layer's MLP output ("bwd") before its recompute starts
        # ("rec in"), which stops early (no "rec out"); with loraforge's own it is "rec in", "rec out", "bwd".
        key = " -> ".join(part.split(" ", 1)[1] if part.startswith("L") and part[1:2].isdigit() else part
                          for part in (a, b))  # fmt: skip
        acc = groups.setdefault(key, [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += r["host_ms"]
        acc[2] += r["gpu_ms"]
        acc[3] = max(acc[3], r["peak_gib"])
    print("  per kind: count, host ms, gpu ms (event to event), max peak GiB")
    for key, (n, host, gpu, peak) in groups.items():
        print(f"    {key:34s} {n:3d} {host:8.2f} {gpu:8.2f} {peak:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="loraforge,unsloth")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--first-step", action="store_true", help="also mark the first step, before the warmup")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse/keep the random checkpoint here")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.folder, args.batch, args.seq, args.warmup, args.first_step)))
        return
    results = {}
    with bench_train_step.checkpoint_folder(args.checkpoint, args.layers) as folder:
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--variant", impl, "--folder", folder, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--warmup", str(args.warmup)]  # fmt: skip
            cmd += ["--first-step"] if args.first_step else []
            result, stderr = harness.run_json_process(cmd, timeout=900)
            if result is None:
                print(f"{impl} failed:\n{stderr[-3000:]}")
                continue
            results[impl] = result
            if "first_rows" in result:
                summarise(f"{impl}, first step", result["first_rows"])
            summarise(impl, results[impl]["rows"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_phases.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
