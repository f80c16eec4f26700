"""Host time of one training step on a tiny model on the CPU: the Python and dispatch work of the fused
path (LoRA functions, caches, checkpointing, op wrappers) with almost no arithmetic, to try host-side
changes without a GPU. On the GPU the 8B step is bound by this kind of work as much as by the kernels;
confirm any saving there (bench_train_step.py --cprofile). CPU kernels differ from the CUDA ones (no
Triton launcher, no offload copies), so only the shared Python layers are represented.

    python benchmarks/host_step_cpu.py [--arch llama] [--layers 4] [--steps 50] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 bases (bitsandbytes' CPU path)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps (top 30 by own time)")
    args = parser.parse_args()

    from loraforge import FastLanguageModel
    from loraforge.testing import save_tiny_model

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp()
    save_tiny_model(folder, args.arch, num_hidden_layers=args.layers)
    model, _ = FastLanguageModel.from_pretrained(folder, load_in_4bit=args.load_in_4bit, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="unsloth")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 200, (2, 16))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = (time.perf_counter() - start) / args.steps
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    print(f"{args.arch}, {args.layers} layers: {elapsed * 1e3:.2f} ms host a step ({elapsed * 1e3 / args.layers:.2f} per layer)")


if __name__ == "__main__":
    main()
