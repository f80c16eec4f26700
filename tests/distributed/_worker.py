"""The script every rank runs for tests/distributed (under torchrun, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/_worker.py --scenario ddp --out DIR

Each scenario trains a tiny Llama (FastLanguageModel, fused forwards patched in) twice: in one
process on the whole batch (the reference; the ranks share that work out: each computes one
mode's reference) and data-parallel with each rank on its share of the batch. It writes what it
measured under DIR (torch.save / JSON); the tests read the files and make the assertions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from loraforge import distributed as lfd

GLOBAL_BATCH, SEQ_LEN = 4, 16
ADAPTER_SEED = 7


def load_lora_model(path: Path, load_in_4bit: bool):
    from loraforge.models import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=load_in_4bit, dtype=torch.float32)
    # init_lora_weights=False: B is random rather than zero, so A gets a gradient from step one.
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=ADAPTER_SEED,
                                             init_lora_weights=False)  # fmt: skip
    model.train()
    return model


def global_batch(vocab_size: int, masked: bool) -> dict[str, torch.Tensor]:
    """Random ids (no padding). masked: some targets set to -100, more in the second half, so the
    two ranks' shares hold different numbers of targets."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(6, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    labels = ids.clone()
    if masked:
        labels[0, :3] = -100
        labels[2, :9] = -100
        labels[3, 5:8] = -100
    return {"input_ids": ids, "labels": labels}


def share(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    rows = GLOBAL_BATCH // world_size
    return {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}


def make_optimizer(name: str, params):
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    # eps=1e-6: Adam's first steps turn near-zero gradients into full-size updates, which would
    # amplify fp32 reduction-order differences between two correct runs into noise.
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6)


def train(model, batch, optimizer_name: str, steps: int, num_items=None) -> list[float]:
    """Losses of `steps` optimizer steps; with several ranks, the mean over ranks of each step.

    num_items: None for the mean over this batch's targets, else the loss is summed over targets
    and divided by it (num_items_in_batch)."""
    optimizer = make_optimizer(optimizer_name, model.parameters())
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    losses = []
    for _ in range(steps):
        loss = model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        if dist.is_initialized() and model_is_distributed(model):
            # Ranks' losses are each normalised for averaging (see data_parallel_num_items).
            dist.all_reduce(reported)
            reported /= dist.get_world_size()
        losses.append(reported.item())
    return losses


def model_is_distributed(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule))


def adapters(model) -> dict[str, torch.Tensor]:
    return lfd.gather_trainable_state_dict(model)


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------

# name -> (load_in_4bit, optimizer, sum_loss, steps)
DDP_MODES = {"16bit": (False, "adamw", False, 3), "4bit": (True, "sgd", True, 3)}
FSDP2_MODES = {"16bit": (False, "adamw", False, 5), "4bit": (True, "adamw", False, 5)}


def references(modes: dict, model_path: Path, out: Path, rank: int, world_size: int) -> None:
    """One process, whole batch: rank i computes the i-th mode (mod world size)."""
    for index, (mode, (load_in_4bit, optimizer, sum_loss, steps)) in enumerate(modes.items()):
        if index % world_size != rank:
            continue
        model = load_lora_model(model_path, load_in_4bit)
        initial = adapters(model)
        batch = global_batch(model.config.vocab_size, masked=sum_loss)
        # One process: no collective here, the normaliser is simply the batch's target count.
        num_items = (batch["labels"][:, 1:] != -100).sum() if sum_loss else None
        losses = train(model, batch, optimizer, steps, num_items)
        torch.save({"losses": losses, "adapters": adapters(model), "initial": initial}, out / f"reference_{mode}.pt")
    dist.barrier()


def run_ddp(model_path: Path, out: Path, rank: int, world_size: int) -> None:
    references(DDP_MODES, model_path, out, rank, world_size)
    for mode, (load_in_4bit, optimizer, sum_loss, steps) in DDP_MODES.items():
        model = load_lora_model(model_path, load_in_4bit)
        ddp = lfd.prepare_ddp(model)
        logged = ddp._get_ddp_logging_data()  # what DDP's reducer was built over
        trainable = [p for p in model.parameters() if p.requires_grad]
        reducer = {
            "reducer_tensors": logged["num_parameter_tensors"],
            "reducer_bytes": logged["total_parameter_size_bytes"],
            "trainable_tensors": len(trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "frozen_tensors": sum(1 for p in model.parameters() if not p.requires_grad),
        }
        batch = share(global_batch(model.config.vocab_size, masked=sum_loss), rank, world_size)
        num_items = lfd.data_parallel_num_items(batch["labels"]) if sum_loss else None
        losses = train(ddp, batch, optimizer, steps, num_items)
        result = {"losses": losses, "adapters": adapters(ddp), "reducer": reducer}
        torch.save(result, out / f"ddp_{mode}_rank{rank}.pt")
    save_once(lfd.unwrap_model(ddp), out / "ddp_save", rank)


def run_fsdp2(model_path: Path, out: Path, rank: int, world_size: int) -> None:
    references(FSDP2_MODES, model_path, out, rank, world_size)
    for mode, (load_in_4bit, optimizer, sum_loss, steps) in FSDP2_MODES.items():
        model = load_lora_model(model_path, load_in_4bit)
        try:
            lfd.prepare_fsdp2(model)
        except NotImplementedError as error:
            if rank == 0:
                (out / f"fsdp2_{mode}_not_implemented.txt").write_text(str(error))
            continue
        sharded = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
        batch = share(global_batch(model.config.vocab_size, masked=sum_loss), rank, world_size)
        num_items = lfd.data_parallel_num_items(batch["labels"]) if sum_loss else None
        losses = train(model, batch, optimizer, steps, num_items)
        state = adapters(model)  # collective: every rank
        if rank == 0:
            result = {"losses": losses, "adapters": state, "dtensor_params": sharded,
                      "params": sum(1 for _ in model.parameters())}  # fmt: skip
            torch.save(result, out / f"fsdp2_{mode}.pt")
        if mode == "16bit":
            save_once(model, out / "fsdp2_save", rank, state)
            if rank == 0:
                (out / "fsdp2_export_refusals.txt").write_text("\n".join(export_refusals(model, out / "export")))


def export_refusals(model, folder: Path) -> list[str]:
    """What the merged and GGUF exports say about a sharded model (they must refuse, not write pieces)."""
    from loraforge.export.gguf_convert import save_pretrained_gguf
    from loraforge.export.merge import save_pretrained_merged
    from loraforge.testing import build_tokenizer

    said = []
    for export in (lambda: save_pretrained_merged(model, folder / "merged", None, save_method="merged_16bit"),
                   lambda: save_pretrained_merged(model, folder / "lora", None, save_method="lora"),
                   lambda: save_pretrained_gguf(model, folder / "gguf", build_tokenizer(), "f16")):  # fmt: skip
        try:
            export()
            said.append("written")
        except ValueError as error:
            said.append(str(error).replace("\n", " "))
    return said + [f"folder exists: {folder.exists()}"]


def save_once(model, folder: Path, rank: int, state_dict=None) -> None:
    """Save the adapter through save_on_main; log who wrote and what each rank saw on return."""
    log = folder.parent / f"{folder.name}_writers.log"

    def write_adapter(path):
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
        return str(path)

    returned = lfd.save_on_main(write_adapter)(folder)

    def failing_export():
        raise OSError("disk full (simulated)")

    try:
        lfd.save_on_main(failing_export)()
        failure = None
    except Exception as error:  # noqa: BLE001  (any error is the expected outcome)
        failure = f"{type(error).__name__}: {error}"
    seen = {"returned": returned, "adapter_exists_on_return": (folder / "adapter_model.safetensors").exists(),
            "failure": failure}  # fmt: skip
    (folder.parent / f"{folder.name}_rank{rank}.json").write_text(json.dumps(seen))


SCENARIOS = {"ddp": run_ddp, "fsdp2": run_fsdp2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # A bounded collective timeout, so a rank that died cannot leave the other waiting for long.
    info = lfd.init_distributed(backend="gloo", timeout_s=45)
    model_path = args.out / "tiny_llama"
    if info.rank == 0:
        from loraforge import testing

        testing.save_tiny_model(model_path, arch="llama", seed=3)
    dist.barrier()
    SCENARIOS[args.scenario](model_path, args.out, info.rank, info.world_size)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
