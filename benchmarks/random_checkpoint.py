"""A random-weight checkpoint already quantized to 4 bits, in bitsandbytes' format (what
`unsloth/...-bnb-4bit` and `save_pretrained_merged(..., "merged_4bit")` checkpoints hold), written
without ever building the 16-bit model: a 70B model is 140 GB in 16 bits, more than the disk of a
2-GPU machine here and, loaded once per rank, more than its host memory; in 4 bits it is ~40 GB.

Each weight is drawn on `device` (normal, std 0.02; norms 1), every Linear of the decoder layers is
quantized there by loraforge's NF4 kernel (double quantization, blocksize 64, uint8 storage), and the
tensors go to safetensors shards of at most 5 GB as they are made (the merged_4bit export's writer,
index included), so host memory holds one shard. The lm_head and embeddings stay 16-bit, as
bitsandbytes loads leave them.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _random(shape, dtype, device, seed: int, std: float) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)


def write_random_4bit_checkpoint(folder: Path, config, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                                 seed: int = 0, std: float = 0.02) -> Path:  # fmt: skip
    """Write config.json (with its bitsandbytes quantization_config), the weights and a tokenizer to
    `folder`; returns it. `config`: a transformers config of a causal LM (e.g. the Llama 70B shape)."""
    from transformers import AutoModelForCausalLM

    from loraforge import nf4
    from loraforge.export.merge import DEFAULT_MAX_SHARD_BYTES, _ShardWriter  # the merged_4bit export's writer
    from loraforge.testing import build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    quantized = {f"{name}.weight" for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and module is not head}  # fmt: skip

    shards = _ShardWriter(folder, DEFAULT_MAX_SHARD_BYTES)
    for index, (name, param) in enumerate(model.named_parameters()):
        if name in quantized:
            weight = _random(param.shape, dtype, device, seed + index, std)
            packed, state = nf4.quantize(weight, blocksize=64, compress_statistics=True)
            del weight
            for key, tensor in nf4.checkpoint_entries(name, packed, state).items():
                shards.add(key, tensor)
        elif name.endswith("norm.weight") or "layernorm" in name:
            shards.add(name, torch.ones(param.shape, dtype=dtype))
        else:
            shards.add(name, _random(param.shape, dtype, device, seed + index, std).cpu())
    shards.finish()

    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.quantization_config = nf4.transformers_config(dtype).to_dict()
    config.save_pretrained(folder)
    # Loaders want a tokenizer beside the weights; benchmarks feed random ids, so any will do.
    build_tokenizer().save_pretrained(folder)
    return folder
