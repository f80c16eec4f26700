"""One GRPO step of a Llama-3.1-8B-shaped model (random weights) in 4-bit: 1 prompt x 8 generations of
1,024 tokens, r=16 / alpha=16 LoRA on all seven projections, gradient checkpointing, bf16. Each variant
runs in its own process, all in one run:

    trl              transformers + bitsandbytes 4-bit + PEFT (peft_config), trl.GRPOTrainer
    loraforge        FastLanguageModel 4-bit + get_peft_model, loraforge.train.grpo.GRPOTrainer (rollouts
                     through loraforge.fast_generate: static KV cache, decode step replayed as a CUDA graph)
    loraforge_model  FastLanguageModel 4-bit + get_peft_model, trl.GRPOTrainer (TRL's own scoring and
                     model.generate: splits the effect of our model from that of our trainer)
    loraforge_hfgen  (not run by default) loraforge's GRPOTrainer with fast_generation=False: our scoring,
                     TRL's model.generate rollouts
    loraforge_streamed  (not run by default) loraforge with stream_base_weights=True: the NF4 base weights
                     in host memory, copied to the GPU a layer at a time (models/weight_streaming.py)

Reported per variant, for the last of the timed steps: the whole step (rollout + scoring + loss +
backward, seconds), the rollout alone (generation, then scoring the old policy / reference when
those are needed) and its peak, the training part (policy scoring, loss, backward) and its peak; peaks
are total GPU memory allocated, weights included. Generation is forced to the full length
(min_new_tokens), so every variant decodes the same number of tokens.

    python benchmarks/bench_grpo.py [--layers 32] [--completion-length 1024] [--generations 8]
                                    [--beta 0.0] [--loss-type dapo] [--impls trl,loraforge] [--out DIR]

Needs a CUDA GPU, TRL >= 1.15 and bitsandbytes (run_gpu.sh: LORAFORGE_BENCH=grpo). The parent writes
the random bf16 checkpoint once (bench_train_step's writer) and every variant loads it from disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train_step import TARGETS  # noqa: E402  (the seven projections every benchmark adapts)

IMPLS = ("trl", "loraforge", "loraforge_model", "loraforge_hfgen", "loraforge_streamed")
DEFAULT_IMPLS = ("trl", "loraforge", "loraforge_model")
PROMPT = ("You are a careful assistant. Think step by step about the question, then answer it. Question: a "
          "train leaves at nine and travels for three hours at sixty miles an hour; how far does it go?")  # fmt: skip
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 is Llama-3.1-8B)")
    parser.add_argument("--completion-length", type=int, default=1024, help="tokens generated per completion")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (one prompt per step)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight; > 0 also scores the reference")
    parser.add_argument("--loss-type", default="dapo", help="GRPOConfig.loss_type")
    parser.add_argument("--steps", type=int, default=1, help="timed steps (the last one is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="keep the random checkpoint in this folder "
                        "and reuse it when it is there (bench_train_step's --checkpoint writes the same one)")
    parser.add_argument("--variant", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args()


def load(impl: str, folder: str, max_seq: int):
    """(model, tokenizer, peft_config or None) the way each library's users load a QLoRA model."""
    import torch

    if impl.startswith("loraforge"):
        from loraforge import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=max_seq, load_in_4bit=True,
                                                             dtype=torch.bfloat16,
                                                             stream_base_weights=impl == "loraforge_streamed")  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        return model, tokenizer, None
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from benchmarks.bench_train_step import bnb_4bit_model

    model = bnb_4bit_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")


def varied_reward(prompts, completions, completion_ids=None, **kwargs):
    # Rewards that differ within the group, so the advantages (and the gradient) are not all zero.
    ids_list = completion_ids or [None] * len(completions)
    return [float(sum(ids[:8]) % 5) if ids is not None else 0.0 for ids in ids_list]


def run_variant(impl: str, folder: str, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    import trl

    model, tokenizer, peft_config = load(impl, folder, 256 + args.completion_length)
    trainer_class, extra = trl.GRPOTrainer, {}
    if impl in ("loraforge", "loraforge_hfgen", "loraforge_streamed"):
        from loraforge.train.grpo import GRPOTrainer as trainer_class

        extra = {"fast_generation": impl != "loraforge_hfgen"}
    with tempfile.TemporaryDirectory() as out_dir:
        config = trl.GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.generations, num_generations=args.generations,
            max_completion_length=args.completion_length, generation_kwargs={"min_new_tokens": args.completion_length},
            beta=args.beta, loss_type=args.loss_type, learning_rate=1e-5, max_steps=args.warmup + args.steps,
            bf16=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
            use_cpu=not torch.cuda.is_available(),  # only for a smoke run of the plumbing
        )  # fmt: skip
        dataset = datasets.Dataset.from_dict({"prompt": [PROMPT] * (args.warmup + args.steps)})
        trainer = trainer_class(model=model, reward_funcs=[varied_reward], args=config, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=peft_config, **extra)  # fmt: skip
        from loraforge.generation import decode

        graph_before = dict(decode.STATS)
        phases = instrument(trainer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the steps' peaks, not loading's (with --warmup 0 too)
        start = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = {name: values[-1] for name, values in phases.items() if values}
    graph = {k: v - graph_before[k] for k, v in decode.STATS.items() if v - graph_before[k]}
    from loraforge.models.weight_streaming import streamer_of

    streamer = streamer_of(trainer.model)
    if streamer is not None:  # layer copies over the whole run (warmup included)
        graph["layer_fills_issued"] = streamer.copies
    return {**last, "train_wall_s": wall, "fast_generate": graph, "loss": logs[-1]["loss"] if logs else None,
            "completion_length": logs[-1].get("completions/mean_length") if logs else None,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}  # fmt: skip


def instrument(trainer) -> dict[str, list[float]]:
    """Wrap the trainer's step and its rollout (instance attributes, this process only) to time both
    and take the memory peak of each phase."""
    import torch

    phases = {"step_s": [], "rollout_s": [], "rollout_peak_gib": [], "train_s": [], "train_peak_gib": []}
    rollout, step = trainer._generate_and_score_completions, trainer.training_step
    marks = {}

    def timed_rollout(*a, **k):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        out = rollout(*a, **k)
        torch.cuda.synchronize()
        phases["rollout_s"].append(time.perf_counter() - begin)
        phases["rollout_peak_gib"].append(torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
        marks["train_start"] = time.perf_counter()
        return out

    def timed_step(*a, **k):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin = marks["train_start"] = time.perf_counter()
        out = step(*a, **k)
        torch.cuda.synchronize()
        end = time.perf_counter()
        phases["step_s"].append(end - begin)
        phases["train_s"].append(end - marks["train_start"])
        phases["train_peak_gib"].append(torch.cuda.max_memory_allocated() / GIB)
        return out

    trainer._generate_and_score_completions, trainer.training_step = timed_rollout, timed_step
    return phases


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.folder, args)))
        return
    from benchmarks import harness
    from benchmarks.bench_train_step import checkpoint_folder

    tokens = args.generations * args.completion_length
    rows, results = [], {}
    with checkpoint_folder(args.checkpoint, args.layers) as folder:
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--variant", impl, "--folder", folder, "--layers", str(args.layers),
                   "--completion-length", str(args.completion_length), "--generations", str(args.generations),
                   "--beta", str(args.beta), "--loss-type", args.loss_type, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
            result, stderr = harness.run_json_process(cmd, timeout=3600)
            if result is None:
                print(f"{impl} failed:\n{stderr[-3000:]}")
                continue
            results[impl] = result
            print(impl, results[impl], flush=True)
    ours = results.get("loraforge", {}).get("step_s")
    for impl, r in results.items():
        rows.append({"benchmark": f"grpo_step_llama8b_{args.layers}l_{args.generations}x{args.completion_length}",
                     "case": f"qlora r16 all, {args.loss_type}, beta {args.beta}", "impl": impl,
                     "median_us": 1e6 * r["step_s"],
                     "extra_peak_mib": 1024 * max(r["rollout_peak_gib"], r["train_peak_gib"]),
                     "limit_us": "", "fraction_of_limit": "", "vs_ours": (r["step_s"] / ours) if ours else "",
                     "note": f"rollout {r['rollout_s']:.1f} s (peak {r['rollout_peak_gib']:.2f} GiB), train "
                             f"{r['train_s']:.2f} s (peak {r['train_peak_gib']:.2f} GiB), {tokens} completion tokens, "
                             f"mean length {r['completion_length']}; us = per step; peaks total"
                             + (f"; rollouts {r['fast_generate']}" if r.get("fast_generate") else "")})  # fmt: skip
    harness.write_rows("grpo_step", rows, args.out)
    harness.print_table(rows)


if __name__ == "__main__":
    main()
