"""The script test_grpo_ddp.py launches: `loraforge grpo` (grpo_run.run_grpo, untouched) under a
launcher, two CPU ranks over gloo. TRL's GRPOTrainer (our subclass) wraps the model in DDP through
accelerate; each rank generates its share of the completions, and the rewards and advantages are
gathered across ranks by TRL.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/_grpo_worker.py --model DIR --out DIR

Spies, looked up by run_grpo in its modules: the trainer build_grpo_trainer makes is kept (to read
the DDP wrapper it built and the adapters after training), each rank that calls save_adapter is
logged (run_grpo saves through save_on_main, so rank 0 alone should), and each rank writes
rank<r>.pt: the wrapper's name, find_unused_parameters, the LoRA weights before and after training,
and the rewards it logged.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

PROMPTS = ("Name a colour.", "Say something about rain.", "Count to three.", "What is bread?")


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def run(model_path: Path, out: Path) -> None:
    from transformers import TrainerCallback

    from loraforge.train import grpo_run, sft

    rank = int(os.environ.get("RANK", "0"))
    kept = {}
    build, save = grpo_run.build_grpo_trainer, sft.save_adapter

    def build_and_keep(model, *args, **kwargs):
        kept["initial"] = lora_weights(model)
        kept["trainer"] = build(model, *args, **kwargs)
        return kept["trainer"]

    def logged_save(*args, **kwargs):
        with open(out / "savers.log", "a") as log:  # no collective: save_on_main calls this on rank 0 alone
            log.write(f"{rank}\n")
        return save(*args, **kwargs)

    grpo_run.build_grpo_trainer, sft.save_adapter = build_and_keep, logged_save

    class AfterTraining(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            trainer = kept["trainer"]
            ddp = trainer.model_wrapped
            record = {"wrapper": type(ddp).__name__, "find_unused": getattr(ddp, "find_unused_parameters", None),
                      "initial": kept["initial"], "trained": lora_weights(trainer.model),
                      "rewards": grpo_run.logged(trainer, "reward")}  # fmt: skip
            torch.save(record, out / f"rank{rank}.pt")

    (out / "prompts.jsonl").exists() or (out / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    settings = grpo_run.GRPOSettings(
        model=str(model_path), dataset=str(out / "prompts.jsonl"), output_dir=str(out / "run"), dtype="float32",
        load_in_4bit=True, r=4, lora_alpha=8, rewards=("length",), length_target=3, length_unit="words",
        num_generations=2, per_device_train_batch_size=2, max_steps=2, max_prompt_length=48,
        max_completion_length=8, learning_rate=5e-2, warmup_ratio=0.0, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=5,
    )  # fmt: skip
    grpo_run.run_grpo(settings, callbacks=[AfterTraining()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run(args.model, args.out)
    if torch.distributed.is_initialized():  # see _trainer_worker.main: gloo threads at teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
