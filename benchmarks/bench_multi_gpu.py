"""Data-parallel QLoRA scaling: tokens/s per GPU on 1, 2, 4 and 8 GPUs of one host, for a
Llama-3.1-8B-shaped model (random weights) trained with loraforge + torch DDP (prepare_ddp: only
the LoRA adapters are all-reduced). Per GPU: batch 2 x 2,048 tokens, r=16 / alpha=16 on all seven
projections, AdamW, offloaded gradient checkpointing, NF4 with double quantization.

    python benchmarks/bench_multi_gpu.py [--gpus 1,2,4,8] [--layers 32] [--steps 5] [--out DIR]

writes one random bf16 checkpoint, then launches torchrun once per GPU count and reports, per
count: tokens/s per GPU (the mean over ranks), the total, the scaling efficiency against one GPU
(per-GPU rate at n / per-GPU rate at 1) and the peak memory of the busiest GPU. One measurement
can also be run directly, e.g.

    torchrun --nproc_per_node=8 benchmarks/bench_multi_gpu.py --folder CHECKPOINT

(without --folder, rank 0 writes the checkpoint into a temporary folder first).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
from benchmarks.bench_train_step import TARGETS  # noqa: E402  (the seven projections every benchmark adapts)

VOCAB = 128256


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


# --------------------------------------------------------------------------------------------
# One measurement: every rank runs this under torchrun
# --------------------------------------------------------------------------------------------


def shared_checkpoint(folder: str | None, layers: int) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """The checkpoint folder every rank loads: the given one, or one rank 0 writes now."""
    import torch.distributed as dist

    from benchmarks.bench_train_step import write_checkpoint

    if folder:
        return folder, None
    holder, name = None, [None]
    if dist.get_rank() == 0:
        holder = tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR"))
        write_checkpoint(Path(holder.name), layers)
        name = [holder.name]
    dist.broadcast_object_list(name, src=0)
    return name[0], holder


def measure(args) -> dict | None:
    """Train `warmup + steps` steps on every rank; rank 0 returns the summary, the others None."""
    import torch.distributed as dist

    from loraforge import FastLanguageModel
    from loraforge.distributed import init_distributed, prepare_ddp

    info = init_distributed()
    folder, holder = shared_checkpoint(args.folder, args.layers)
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=args.seq, load_in_4bit=True,
                                                 dtype=torch.bfloat16)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth")  # fmt: skip
    ddp = prepare_ddp(model)
    ddp.train()
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=2e-4)
    # A different batch on every rank, as a sampler would give.
    generator = torch.Generator(device="cuda").manual_seed(1 + info.rank)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), device="cuda", generator=generator)
    losses = []

    def step():
        loss = ddp(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # [tokens/s of this rank, peak GiB of this rank]: mean and max over ranks.
    rate_and_peak = torch.tensor([args.batch * args.seq * args.steps / elapsed,
                                  torch.cuda.max_memory_allocated() / 2**30], device="cuda")  # fmt: skip
    rates = [torch.zeros_like(rate_and_peak) for _ in range(info.world_size)]
    dist.all_gather(rates, rate_and_peak)
    dist.barrier()
    if holder is not None:
        holder.cleanup()
    if info.rank != 0:
        return None
    per_rank = torch.stack(rates).cpu()
    return {"gpus": info.world_size, "tokens_per_s_per_gpu": per_rank[:, 0].mean().item(),
            "slowest_gpu_tokens_per_s": per_rank[:, 0].min().item(), "tokens_per_s": per_rank[:, 0].sum().item(),
            "peak_gib": per_rank[:, 1].max().item(), "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
            "trainable": sum(p.numel() for p in ddp.parameters() if p.requires_grad)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The driver: one torchrun launch per GPU count
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(gpus: int, folder: str, args) -> dict | None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "--nnodes=1",
               f"--master-port={free_port()}", __file__, "--folder", folder, "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                          check=False)  # fmt: skip
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"{gpus} GPU(s) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    return None


def rows_for(results: list[dict], args) -> list[dict]:
    one = next((r["tokens_per_s_per_gpu"] for r in results if r["gpus"] == 1), None)
    rows = []
    for r in results:
        efficiency = r["tokens_per_s_per_gpu"] / one if one else ""
        rows.append({"benchmark": f"multi_gpu_ddp_llama8b_{args.layers}l_b{args.batch}x{args.seq}",
                     "case": f"{r['gpus']} gpu", "impl": "loraforge ddp",
                     "median_us": 1e6 * args.batch * args.seq / r["tokens_per_s_per_gpu"],
                     "extra_peak_mib": r["peak_gib"] * 1024, "limit_us": "", "fraction_of_limit": efficiency,
                     "vs_ours": "",
                     "note": f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU (slowest "
                             f"{r['slowest_gpu_tokens_per_s']:.0f}), {r['tokens_per_s']:.0f} tok/s total, "
                             f"peak {r['peak_gib']:.2f} GiB; us = per step per GPU; fraction = per-GPU rate "
                             f"vs 1 GPU; loss {r['first_loss']:.3f}->{r['last_loss']:.3f}"})  # fmt: skip
    return rows


def drive(args) -> None:
    from benchmarks.bench_train_step import write_checkpoint

    available = torch.cuda.device_count()
    counts = [n for n in (int(g) for g in args.gpus.split(",")) if n <= available]
    if not counts:
        sys.exit(f"no GPU count in --gpus {args.gpus} fits the {available} GPU(s) here")
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        write_checkpoint(Path(folder), args.layers)
        for gpus in counts:
            result = launch(gpus, folder, args)
            if result is not None:
                print(json.dumps(result), flush=True)
                results.append(result)
    rows = rows_for(results, args)
    harness.write_rows("multi_gpu", rows, args.out)
    harness.print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts to measure (driver only); default 1,2,4,8")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (32 = full)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun launch (driver only)")
    parser.add_argument("--folder", default=None, help="checkpoint to load (under torchrun; default: write one)")
    parser.add_argument("--out", type=Path, default=None, help="also append the CSV rows under this folder")
    args = parser.parse_args()
    if under_torchrun():
        result = measure(args)
        if result is not None:
            print(json.dumps(result), flush=True)
        import torch.distributed as dist

        dist.destroy_process_group()
        return
    drive(args)


if __name__ == "__main__":
    main()
