"""A 4-bit tiny model with LoRA adapters that change its output, one training step's loss and LoRA
gradients, and a padded batch of prompts to generate from: what the equality tests of loading options
(streamed weights, the embedding in host memory) compare between the option on and off."""

import torch

from loraforge import FastLanguageModel


def load_with_adapters(path, dtype=torch.float32, checkpointing="unsloth", peft=True, **load_options):
    """(model, tokenizer) loaded in 4 bits with `load_options` (device_map, stream_base_weights, ...); with
    `peft`, r=8 adapters whose B is random (seeded), so that the adapters' path changes the output."""
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=dtype, load_in_4bit=True, **load_options)
    if peft:
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                                 use_gradient_checkpointing=checkpointing)  # fmt: skip
        g = torch.Generator().manual_seed(11)
        for name, param in model.named_parameters():  # adapters that change the output
            if "lora_B" in name:
                param.data = (torch.randn(param.shape, generator=g) * 0.05).to(param.device, param.dtype)
    return model, tokenizer


def loss_and_grads(model, ids):
    """One training forward and backward on `ids` (its own labels): (loss, {name: gradient}), grads cleared."""
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def padded_prompts(tokenizer, device="cuda") -> dict:
    """Two prompts of different lengths, padded into one batch on `device`, for greedy generation."""
    batch = tokenizer(["Tell me about rain.", "Hi"], return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}
