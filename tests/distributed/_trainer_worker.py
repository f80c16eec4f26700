"""The script test_trainer_ddp.py launches: SFT training driven by transformers' Trainer (our TRL
SFTTrainer subclass), which wraps the model in DDP itself when started by a launcher.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/_trainer_worker.py \
        --mode trainer --model DIR --out DIR --per-device-batch 2
    accelerate launch --multi_gpu --num_processes 2 ... (same arguments)
    python tests/distributed/_trainer_worker.py --mode run_sft --model DIR --out DIR ...

mode "trainer": the notebook path (FastLanguageModel through sft.load_model, our trainer class with
an SFTConfig that sets ddp_find_unused_parameters=False), recording per rank what every step saw;
the adapter is saved once, by rank 0, through loraforge.distributed.save_on_main. The test calls
`train` from this file in its own process too, as the one-process reference.
mode "run_sft": the whole `loraforge sft` function, untouched, as a user would start it under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

# Eight rows of unequal lengths: a global batch of 4 splits into rank shares with different
# numbers of targets (and different padding), which is what makes the loss normaliser matter.
LENGTHS = (9, 15, 6, 12, 14, 5, 11, 10)
STEPS = 4  # sequential order, 2 global batches per epoch: steps 3 and 4 repeat the batches of 1 and 2
LEARNING_RATE = 0.5
SEED = 11
LORA_B_SEED = 5


def sequences(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(6, vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


def settings_for(model_path, out: Path, per_device_batch: int, **overrides):
    from loraforge.train import sft

    values = {"model": str(model_path), "dataset": str(model_path), "output_dir": str(out), "dtype": "float32",
              "load_in_4bit": True, "r": 4, "lora_alpha": 8, "per_device_train_batch_size": per_device_batch,
              "gradient_accumulation_steps": 1, "max_steps": STEPS, "learning_rate": LEARNING_RATE,
              "warmup_steps": 0, "lr_scheduler_type": "constant", "weight_decay": 0.0, "optim": "sgd", "seed": SEED,
              "use_gradient_checkpointing": "unsloth"}  # fmt: skip
    return sft.SFTSettings(**{**values, **overrides})


def load_model(model_path, out: Path, per_device_batch: int):
    """The CLI's model: 4-bit base, LoRA on every linear, offloaded ("unsloth") checkpointing; lora_B
    made random (the same on every rank) so lora_A has a gradient from the first step."""
    from loraforge.train import sft

    # settings' dataset is only checked to exist here (the data is built in `train`).
    model, tokenizer = sft.load_model(settings_for(model_path, out, per_device_batch))
    generator = torch.Generator().manual_seed(LORA_B_SEED)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return model, tokenizer


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad}


def build_trainer(model, tokenizer, dataset, out: Path, per_device_batch: int):
    """Our SFTTrainer subclass with build_trainer's settings, plus what a DDP run should set and what
    makes the comparison exact: fp32 (TRL's SFTConfig defaults to bf16, which on CPU means bf16
    autocast; build_trainer turns it off there too), no clipping (SGD's step is then -lr * gradient,
    so a wrongly scaled or unsynchronised gradient shows in the weights) and sequential sampling."""
    import trl

    from loraforge.train import sft

    class RecordingTrainer(sft._trainer_class()):
        """Records, per step, the rows this rank trained on, the normaliser and the loss it got."""

        seen: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs["attention_mask"].bool()
            rows = [ids[keep].tolist() for ids, keep in zip(inputs["input_ids"], mask)]
            targets = int((inputs["labels"][:, 1:] != -100).sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            value = (loss[0] if return_outputs else loss).detach().item()
            self.seen.append({"rows": rows, "targets": targets, "num_items": float(num_items_in_batch),
                              "loss": value, "wrapper": type(model).__name__,
                              "find_unused": getattr(model, "find_unused_parameters", None)})  # fmt: skip
            return loss

    args = trl.SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=STEPS, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, warmup_steps=0, lr_scheduler_type="constant",
        weight_decay=0.0, optim="sgd", max_grad_norm=0.0, seed=SEED, logging_steps=1, save_strategy="no",
        max_length=64, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, report_to=[],
        disable_tqdm=True, dataset_num_proc=None, ddp_find_unused_parameters=False,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = RecordingTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    trainer.seen = []
    return trainer


def train(model_path, out: Path, per_device_batch: int) -> dict:
    """Train STEPS steps; returns what this process saw and its final adapters (fp32, CPU)."""
    import datasets

    from loraforge import distributed as lfd
    from loraforge.train import sft

    model, tokenizer = load_model(model_path, out, per_device_batch)
    dataset = datasets.Dataset.from_dict({"input_ids": sequences(len(tokenizer))})
    trainer = build_trainer(model, tokenizer, dataset, out, per_device_batch)
    # TRL turns a quantized model's adapters to bf16 (QLoRA paper's advice); back to fp32 so that
    # the two runs can be compared tightly: in bf16 one rounding step is 0.4% of a weight.
    adapter_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    initial = adapters(model)
    trainer.train()
    saved = lfd.save_on_main(sft.save_adapter)(model, tokenizer, out, False)  # out/adapter, by rank 0
    return {"seen": trainer.seen, "logged": sft.logged_losses(trainer), "initial": initial, "final": adapters(model),
            "adapter_dtypes_from_trl": adapter_dtypes, "saved": saved, "vocab_size": len(tokenizer),
            "world_size": trainer.args.world_size, "process_index": trainer.args.process_index,
            "backend": trainer.accelerator.state.backend,
            "accelerate_env": sorted(k for k in os.environ if k.startswith("ACCELERATE_"))}  # fmt: skip


def run_sft(model_path, out: Path, per_device_batch: int) -> None:
    """`loraforge sft` as it is (sft.run_sft), on out/data.jsonl (text rows, written by the test),
    under the launcher. Two spies, looked up by run_sft in sft's module: build_trainer's trainer is
    kept (to read the DDP wrapper it built), and each rank that calls save_adapter is logged (run_sft
    saves through save_on_main, so rank 0 alone should)."""
    from transformers import TrainerCallback

    from loraforge.train import sft

    rank = int(os.environ.get("RANK", "0"))
    kept = {}
    build, save = sft.build_trainer, sft.save_adapter

    def build_and_keep(*args, **kwargs):
        kept["trainer"] = build(*args, **kwargs)
        return kept["trainer"]

    def logged_save(*args, **kwargs):
        # No collective here: run_sft calls save_adapter through save_on_main, on rank 0 alone.
        with open(out / "run_sft_savers.log", "a") as log:
            log.write(f"{rank}\n")
        return save(*args, **kwargs)

    sft.build_trainer, sft.save_adapter = build_and_keep, logged_save

    class AfterTraining(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            ddp = kept["trainer"].model_wrapped
            record = {"wrapper": type(ddp).__name__, "find_unused": getattr(ddp, "find_unused_parameters", None)}
            (out / f"run_sft_trained_rank{rank}.json").write_text(json.dumps(record))

    settings = settings_for(model_path, out / "run", per_device_batch, dataset=str(out / "data.jsonl"),
                            max_seq_length=32, optim="adamw_torch", learning_rate=1e-2)  # fmt: skip
    sft.run_sft(settings, callbacks=[AfterTraining()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("trainer", "run_sft"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-device-batch", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "run_sft":
        run_sft(args.model, args.out, args.per_device_batch)
    else:
        result = train(args.model, args.out, args.per_device_batch)
        torch.save(result, args.out / f"rank{result['process_index']}.pt")
    # Neither the Trainer nor accelerate destroys the process group it started. Without this, gloo's
    # worker threads can outlive the interpreter's teardown and abort the process ("terminate called
    # without an active exception", SIGABRT) after all the work is done: seen here about once in 40
    # launches (pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
