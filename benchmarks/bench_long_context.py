"""The longest sequence that trains at batch 1: a Llama-3.1-8B-shaped model in 4-bit with r=16 LoRA
on all seven projections, loraforge beside Unsloth (each in its own process, in one run). A length
"trains" when one forward + backward + AdamW step finishes without running out of GPU memory.

    python benchmarks/bench_long_context.py [--impls loraforge,unsloth] [--start 65536] [--max 524288]
                                            [--layers 32] [--out DIR]

Search: from --start, double while the step fits, then bisect between the last length that fit and
the first that did not, down to --resolution tokens. Each probe runs in a fresh process (an OOM
leaves fragmented memory behind). Reported: the longest length that trained, its peak memory and
step time. Unsloth's published figure for Llama 3.1 8B on an 80 GB GPU is 342,733 tokens.

The card: --memory-gib (default 79.19 GiB, what torch reports for an 80 GB H100) caps the caching
allocator with set_per_process_memory_fraction, so a bigger card (an H200's 139 GiB) answers for an
80 GB one. Both stacks run under the same cap.

Fewer layers, same memory: at 300k tokens one step of 32 layers takes minutes (attention is quadratic),
and the longest length is set by one layer's recompute working set plus what every layer keeps on the
GPU (its 4-bit weights, LoRA weights and LoRA gradients; layer inputs go to host memory with offloaded
checkpointing in both stacks). `--layers 4 --stand-in-layers 32` builds 4 layers and, in each probe,
allocates a filler as large as the other 28 layers' share, measured on the loaded model: (allocated after
loading - embeddings - lm_head) / layers, plus the trainable bytes per layer once more for their
gradients. The note of each row says which of the two ran.
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

IMPLS = ("loraforge", "unsloth")


H100_80GB_GIB = 79.19  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3, in GiB


def stand_in_bytes(model: torch.nn.Module, layers: int, stand_in_layers: int) -> int:
    """GPU bytes that (stand_in_layers - layers) more decoder layers would hold through a step: their
    share of what is allocated after loading (4-bit weights with their statistics, LoRA weights), and
    their LoRA gradients."""
    if stand_in_layers <= layers:
        return 0
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    outside = sum(m.weight.numel() * m.weight.element_size()
                  for m in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()))  # fmt: skip
    per_layer = (torch.cuda.memory_allocated() - outside) / layers
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / layers
    return int((stand_in_layers - layers) * (per_layer + trainable))


def probe(impl: str, folder: str, seq: int, memory_gib: float, layers: int, stand_in_layers: int) -> dict:
    """One training step at batch 1 x seq tokens: {"ok": bool, "peak_gib", "step_s"} or the error."""
    if impl == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    total = torch.cuda.get_device_properties(0).total_memory
    if memory_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total))
    model = bench_train_step.load(impl, folder, seq)
    try:  # what the stack holds after loading for this max_seq_length counts: the stand-in can be what fails
        filler = torch.empty(stand_in_bytes(model, layers, stand_in_layers), dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as error:
        return {"ok": False, "why": "out of memory for the stand-in layers after loading: " + str(error)[:160]}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    input_ids = torch.randint(0, 128256, (1, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        return {"ok": False, "why": str(error).splitlines()[0][:200]}
    return {"ok": True, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "step_s": time.perf_counter() - start,
            "loss": float(loss), "stand_in_gib": filler.numel() / 2**30}  # fmt: skip


def run_probe(impl: str, folder: str, seq: int, options: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--probe", impl, "--folder", folder, "--seq", str(seq), *options]
    result, stderr = harness.run_json_process(cmd, timeout=1800)
    if result is not None:
        return result
    tail = stderr[-400:]
    return {"ok": False, "why": "out of memory" if "OutOfMemory" in tail else f"failed: {tail}"}


def longest(impl: str, folder: str, start: int, maximum: int, resolution: int, options: list[str]) -> tuple[int, dict]:
    best, best_result, low, high = 0, {}, 0, None
    seq = start
    while seq <= maximum:  # doubling
        result = run_probe(impl, folder, seq, options)
        print(impl, seq, result, flush=True)
        if not result["ok"]:
            high = seq
            break
        best, best_result, low = seq, result, seq
        seq *= 2
    if high is None:
        return best, best_result
    while high - low > resolution:  # bisection between a length that fit and one that did not
        seq = (low + high) // 2 // 64 * 64
        result = run_probe(impl, folder, seq, options)
        print(impl, seq, result, flush=True)
        if result["ok"]:
            best, best_result, low = seq, result, seq
        else:
            high = seq
    return best, best_result


def per_stack(value: str, impl: str) -> int:
    """An option given as N for every stack or as impl=N,impl=M (the search ranges of two stacks whose
    answers lie far apart; each probe near the limit costs minutes of quadratic attention)."""
    if "=" not in value:
        return int(value)
    pairs = dict(item.split("=") for item in value.split(","))
    if impl not in pairs:
        raise ValueError(f"no value for {impl} in {value!r}")
    return int(pairs[impl])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--start", default="65536", help="first length; N, or per stack: loraforge=N,unsloth=M")
    parser.add_argument("--max", default="524288", help="longest length tried; N or per stack like --start")
    parser.add_argument("--resolution", default="8192", help="bisection stops at this gap; N or per stack")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-gib", type=float, default=H100_80GB_GIB, help="cap on the GPU memory the "
                        "allocator may use (0: the whole card)")  # fmt: skip
    parser.add_argument("--stand-in-layers", type=int, default=0, help="hold the memory of this many layers "
                        "while building only --layers of them (see the docstring)")  # fmt: skip
    parser.add_argument("--probe", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.folder, args.seq, args.memory_gib, args.layers, args.stand_in_layers)))
        return
    options = ["--memory-gib", str(args.memory_gib), "--layers", str(args.layers),
               "--stand-in-layers", str(args.stand_in_layers)]  # fmt: skip
    rows = []
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        bench_train_step.write_checkpoint(Path(folder), args.layers)
        found = {impl: longest(impl, folder, per_stack(args.start, impl), per_stack(args.max, impl),
                               per_stack(args.resolution, impl), options)
                 for impl in args.impls.split(",")}  # fmt: skip
    card = f"allocator capped at {args.memory_gib:.2f} GiB of {total_gib:.0f}" if args.memory_gib else f"{total_gib:.0f} GiB"
    built = (f"{args.layers} layers built, memory of {args.stand_in_layers} held" if args.stand_in_layers > args.layers
             else f"{args.layers} layers")  # fmt: skip
    ours = found.get("loraforge", (0, {}))[0]
    for impl, (seq, result) in found.items():
        rows.append({"benchmark": f"longest_context_llama8b_{args.layers}l_b1", "case": "qlora r16 all, one AdamW step",
                     "impl": impl, "median_us": 1e6 * result.get("step_s", float("nan")),
                     "extra_peak_mib": 1024 * result.get("peak_gib", float("nan")),
                     "vs_ours": ours / seq if seq else "",
                     "note": f"{seq} tokens trained (resolution {per_stack(args.resolution, impl)}); {card}; {built}; "
                             f"us = that step"})  # fmt: skip
    harness.write_rows("long_context", rows, args.out)
    harness.print_table(rows)


if __name__ == "__main__":
    main()
