"""Multi-GPU QLoRA through torch's own engine, one torchrun launch per GPU count:

* `--mode ddp` (default): data-parallel scaling of a Llama-3.1-8B-shaped model (prepare_ddp: only the
  LoRA adapters are all-reduced), tokens/s per GPU on 1, 2, 4 and 8 GPUs against one GPU (target: 90%);
* `--mode fsdp2`: a Llama-3.1-70B-shaped model (`--shape 70b`, the default for this mode) sharded with
  prepare_fsdp2, its NF4 base weights sharded in their 4-bit storage, on 2 or more 80 GB GPUs.

Per GPU: batch 2 x 2,048 tokens (`--batch`, `--seq`), r=16 / alpha=16 on all seven projections, AdamW,
gradient checkpointing (offloaded under DDP), NF4 with double quantization, random weights.

    python benchmarks/bench_multi_gpu.py [--mode ddp|fsdp2] [--gpus 1,2,4,8] [--layers N] [--steps 5] [--out DIR]

The driver writes one random checkpoint already in 4 bits (random_checkpoint.py: ~5.5 GB for 8B,
~40 GB for 70B; `--checkpoint DIR` keeps it for the next run), then launches torchrun once per GPU
count and reports per count: tokens/s per GPU (mean over ranks), the total, the scaling efficiency
against one GPU (per-GPU rate at n / per-GPU rate at 1), the peak memory of the busiest GPU, and the
first and last loss. Every rank loads the checkpoint onto its own GPU (from_pretrained under a
launcher). `--device cpu --shape tiny` runs the same plumbing on CPU processes over gloo, as a smoke
test (tests/distributed/test_bench_multi_gpu.py); such runs are printed, never recorded.
"""

from __future__ import annotations

import argparse
import contextlib
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

MODES = ("ddp", "fsdp2")
SHAPES = ("8b", "70b", "tiny")


def model_config(shape: str, layers: int | None):
    """The Llama 3.1 shapes (8B, 70B: llama3 rope scaling, untied head) or a tiny one for smoke runs."""
    from transformers import LlamaConfig

    from benchmarks.bench_train_step import llama8b_config

    if shape == "8b":
        return llama8b_config(layers or 32)
    if shape == "70b":
        settings = {**llama8b_config(layers or 80).to_dict(), "hidden_size": 8192, "intermediate_size": 28672,
                    "num_attention_heads": 64, "head_dim": 128}  # fmt: skip
        return LlamaConfig(**settings)
    return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=layers or 2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False)  # fmt: skip


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


# --------------------------------------------------------------------------------------------
# One measurement: every rank runs this under torchrun
# --------------------------------------------------------------------------------------------


def measure(args) -> dict | None:
    """Train `warmup + steps` steps on every rank; rank 0 returns the summary, the others None."""
    import torch.distributed as dist

    from loraforge import FastLanguageModel
    from loraforge.distributed import init_distributed, prepare_ddp, prepare_fsdp2

    cuda = args.device == "cuda"
    info = init_distributed(backend=None if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, _ = FastLanguageModel.from_pretrained(args.folder, max_seq_length=args.seq, load_in_4bit=True,
                                                 dtype=dtype)  # fmt: skip
    loaded_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    # FSDP2: plain in-GPU checkpointing (offloading it under FSDP2 has not run on GPUs yet); 70B layer inputs
    # at 2 x 2,048 tokens are 5 GB for 80 layers, which a sharded 70B leaves room for.
    checkpointing = "unsloth" if args.mode == "ddp" else True
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing=checkpointing)  # fmt: skip
    wrapped = prepare_ddp(model) if args.mode == "ddp" else prepare_fsdp2(model)
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=2e-4)
    # A different batch on every rank, as a sampler would give.
    generator = torch.Generator(device=device).manual_seed(1 + info.rank)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=generator)
    losses = []

    def step():
        loss = wrapped(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    # [tokens/s of this rank, peak GiB of this rank]: mean and max over ranks.
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    rate_and_peak = torch.tensor([args.batch * args.seq * args.steps / elapsed, peak], device=device)
    rates = [torch.zeros_like(rate_and_peak) for _ in range(info.world_size)]
    dist.all_gather(rates, rate_and_peak)
    dist.barrier()
    if info.rank != 0:
        return None
    per_rank = torch.stack(rates).cpu()
    return {"gpus": info.world_size, "mode": args.mode, "tokens_per_s_per_gpu": per_rank[:, 0].mean().item(),
            "slowest_gpu_tokens_per_s": per_rank[:, 0].min().item(), "tokens_per_s": per_rank[:, 0].sum().item(),
            "peak_gib": per_rank[:, 1].max().item(), "loaded_gib": loaded_gib, "first_loss": losses[0].item(),
            "last_loss": losses[-1].item(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The driver: one torchrun launch per GPU count
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(gpus: int, folder: str, args) -> dict | None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, "--folder", folder,
               "--mode", args.mode, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", "lo")})
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False, env=env)
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"{gpus} GPU(s) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    return None


def rows_for(results: list[dict], args) -> list[dict]:
    one = next((r["tokens_per_s_per_gpu"] for r in results if r["gpus"] == 1), None)
    layers = model_config(args.shape, args.layers).num_hidden_layers
    rows = []
    for r in results:
        efficiency = r["tokens_per_s_per_gpu"] / one if one else ""
        rows.append({"benchmark": f"multi_gpu_{args.mode}_llama{args.shape}_{layers}l_b{args.batch}x{args.seq}",
                     "case": f"{r['gpus']} gpu", "impl": f"loraforge {args.mode}",
                     "median_us": 1e6 * args.batch * args.seq / r["tokens_per_s_per_gpu"],
                     "extra_peak_mib": r["peak_gib"] * 1024, "limit_us": "", "fraction_of_limit": efficiency,
                     "vs_ours": "",
                     "note": f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU (slowest "
                             f"{r['slowest_gpu_tokens_per_s']:.0f}), {r['tokens_per_s']:.0f} tok/s total, "
                             f"peak {r['peak_gib']:.2f} GiB (loaded {r['loaded_gib']:.2f}); us = per step per GPU; "
                             f"fraction = per-GPU rate vs 1 GPU; loss {r['first_loss']:.3f}->{r['last_loss']:.3f}"})  # fmt: skip
    return rows


@contextlib.contextmanager
def random_checkpoint_folder(args):
    """The random 4-bit checkpoint every launch loads: --checkpoint (written there once), else scratch."""
    from benchmarks.random_checkpoint import write_random_4bit_checkpoint

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        folder = Path(args.checkpoint or scratch)
        if not (folder / "config.json").exists():
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            write_random_4bit_checkpoint(folder, model_config(args.shape, args.layers), device=args.device,
                                         dtype=dtype)  # fmt: skip
        yield str(folder)


def drive(args) -> list[dict]:
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    counts = [n for n in (int(g) for g in args.gpus.split(",")) if n <= available]
    if not counts:
        sys.exit(f"no count in --gpus {args.gpus} fits the {available} {args.device} device(s) here")
    results = []
    with random_checkpoint_folder(args) as folder:
        for gpus in counts:
            result = launch(gpus, folder, args)
            if result is not None:
                print(json.dumps(result), flush=True)
                results.append(result)
    rows = rows_for(results, args)
    if args.device == "cuda" and not args.no_record:  # CPU smoke runs are not results
        harness.write_rows("multi_gpu", rows, args.out)
    harness.print_table(rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="ddp")
    parser.add_argument("--shape", choices=SHAPES, default=None, help="model shape (default: 8b for ddp, 70b for fsdp2)")
    parser.add_argument("--gpus", default=None, help="GPU counts to measure (driver only); default 1,2,4,8 for "
                        "ddp, 2,4,8 for fsdp2 (a 70B model does not fit one 80 GB GPU in 4 bits with training)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo processes (smoke run)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun launch (driver only)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="keep the random 4-bit checkpoint here")
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)  # the checkpoint, for the ranks
    parser.add_argument("--out", type=Path, default=None, help="also append the CSV rows under this folder")
    parser.add_argument("--no-record", action="store_true", help="print the rows only (tests, trial runs)")
    args = parser.parse_args()
    args.shape = args.shape or ("8b" if args.mode == "ddp" else "70b")
    args.gpus = args.gpus or ("1,2,4,8" if args.mode == "ddp" else "2,4,8")
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
