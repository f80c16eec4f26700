"""Decode throughput of a Llama-3.1-8B-shaped 4-bit model (random weights) with r=16 LoRA on all seven
projections, as GRPO rollouts run it: a batch of 8 left-padded prompts of ~128 tokens, 1,024 sampled new
tokens each (min_new_tokens forces the full length), bf16. Each library in its own process:

    loraforge   FastLanguageModel 4-bit + get_peft_model:
                  fast        loraforge.fast_generate, first call (capture of the decode step included:
                              what a GRPO rollout pays, since it captures afresh after each optimizer step)
                  fast_reuse  the same call again (the kept graph replayed)
                  hf          model.generate on the same model
    plain       transformers + bitsandbytes 4-bit + PEFT, model.generate

Reported per row: wall time of the call, new tokens/s (batch x new tokens / time), peak GPU memory
allocated during the call (weights included). model.generate decodes --hf-new-tokens (default 256) to keep
the run short: its per-token cost barely depends on the position at this length, and the note says so.

    python benchmarks/bench_generate.py [--layers 32] [--batch 8] [--prompt 128] [--new-tokens 1024]
                                        [--hf-new-tokens 256] [--impls loraforge,plain] [--out DIR]

Needs a CUDA GPU and bitsandbytes. The parent writes the random bf16 checkpoint once (bench_train_step's
writer); every variant loads it from disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train_step import TARGETS  # noqa: E402  (the seven projections every benchmark adapts)

IMPLS = ("loraforge", "plain")
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 is Llama-3.1-8B)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--prompt", type=int, default=128, help="longest prompt; rows are left-padded 0..15 tokens")
    parser.add_argument("--new-tokens", type=int, default=1024, help="tokens fast_generate decodes per row")
    parser.add_argument("--hf-new-tokens", type=int, default=256, help="tokens model.generate decodes per row")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse (or keep) the random checkpoint in "
                        "this folder, e.g. bench_train_step.py --checkpoint's")  # fmt: skip
    parser.add_argument("--variant", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args()


def load(impl: str, folder: str, max_seq: int):
    import torch

    if impl == "loraforge":
        from loraforge import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=max_seq, load_in_4bit=True,
                                                     dtype=torch.bfloat16)  # fmt: skip
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                init_lora_weights=False)  # fmt: skip
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_train_step import bnb_4bit_model

    model = bnb_4bit_model(folder)
    config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, config)


def prompts(batch: int, length: int):
    """Random ids (no EOS among them), rows left-padded by 0, 2, 4, ... tokens (at most 15)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 120000, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = (2 * row) % 16
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids.cuda(), mask.cuda()


def timed(call) -> dict:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / GIB, "shape": list(out.shape)}


def run_variant(impl: str, folder: str, args: argparse.Namespace) -> dict:
    import torch

    model = load(impl, folder, args.prompt + args.new_tokens)
    model.eval()
    ids, mask = prompts(args.batch, args.prompt)
    eos = model.get_base_model().config.eos_token_id
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "eos_token_id": eos,
                "pad_token_id": 0}  # fmt: skip
    results = {}
    if impl == "loraforge":
        from loraforge import fast_generate
        from loraforge.generation import decode

        new = args.new_tokens
        for name in ("fast", "fast_reuse"):
            before = dict(decode.STATS)
            results[name] = timed(lambda: fast_generate(model, ids, mask, max_new_tokens=new, min_new_tokens=new,
                                                        **sampling))  # fmt: skip
            results[name]["stats"] = {k: decode.STATS[k] - before[k] for k in before}
            results[name]["new_tokens"] = new
    new = args.hf_new_tokens
    with torch.no_grad():
        results["hf"] = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                                     min_new_tokens=new, **sampling))  # fmt: skip
    results["hf"]["new_tokens"] = new
    return results


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.folder, args)))
        return
    from benchmarks import harness
    from benchmarks.bench_train_step import checkpoint_folder

    results = {}
    with checkpoint_folder(args.checkpoint, args.layers) as folder:
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--variant", impl, "--folder", folder, "--layers", str(args.layers),
                   "--batch", str(args.batch), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
                   "--hf-new-tokens", str(args.hf_new_tokens)]  # fmt: skip
            result, stderr = harness.run_json_process(cmd, timeout=1200)
            if result is None:
                print(f"{impl} failed:\n{stderr[-3000:]}")
                continue
            results[impl] = result
            print(impl, results[impl], flush=True)
    rows = []
    rate = {}
    for impl, calls in results.items():
        for call, r in calls.items():
            name = "loraforge_" + call if impl == "loraforge" else "plain_hf"
            rate[name] = args.batch * r["new_tokens"] / r["s"]
            stats = r.get("stats")
            rows.append({"name": name, "r": r, "stats": stats})
    ours = rate.get("loraforge_fast")
    out_rows = []
    for row in rows:
        r, name = row["r"], row["name"]
        extra = f", graph {row['stats']}" if row["stats"] else ""
        out_rows.append({"benchmark": f"generate_llama8b_{args.layers}l_b{args.batch}_p{args.prompt}",
                         "case": f"qlora r16 all, sampling, {r['new_tokens']} new tokens", "impl": name,
                         "median_us": 1e6 * r["s"] / r["new_tokens"], "extra_peak_mib": 1024 * r["peak_gib"],
                         "limit_us": "", "fraction_of_limit": "",
                         "vs_ours": (ours / rate[name]) if ours else "",
                         "note": f"{rate[name]:.0f} new tok/s, {r['s']:.2f} s per call, peak {r['peak_gib']:.2f} GiB "
                                 f"total; us = per decode step (batch {args.batch}){extra}"})  # fmt: skip
    harness.write_rows("generate", out_rows, args.out)
    harness.print_table(out_rows)


if __name__ == "__main__":
    main()
