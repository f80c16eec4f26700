"""A random-weight checkpoint already quantized to 4 bits, in bitsandbytes' format (what
`unsloth/...-bnb-4bit` and `save_pretrained_merged(..., "merged_4bit")` checkpoints hold), written
without ever building the 16-bit model: a 70B model is 140 GB in 16 bits, more than the disk of a
2-GPU machine here and, loaded once per rank, more than its host memory; in 4 bits it is ~40 GB.

Each weight is drawn on `device` (normal, std 0.02; norms 1), every Linear of the decoder layers is
quantized there by loraforge's NF4 kernel (double quantization, blocksize 64, uint8 storage), and one
safetensors file per decoder layer is written as soon as that layer is done, with the index that
transformers reads. The lm_head and embeddings stay 16-bit, as bitsandbytes loads leave them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _random(shape, dtype, device, seed: int, std: float) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)


def write_random_4bit_checkpoint(folder: Path, config, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                                 seed: int = 0, std: float = 0.02) -> Path:  # fmt: skip
    """Write config.json (with its bitsandbytes quantization_config), the weights and a tokenizer to
    `folder`; returns it. `config`: a transformers config of a causal LM (e.g. the Llama 70B shape)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge import nf4
    from loraforge.testing import build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    quantized = {f"{name}.weight" for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and module is not head}  # fmt: skip

    weight_map, group, pending = {}, None, {}

    def flush():
        if pending:
            file = f"model-{len(set(weight_map.values())):05d}-{group}.safetensors"  # "other" comes twice
            save_file(pending, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, file))
            pending.clear()

    for index, (name, param) in enumerate(model.named_parameters()):
        found = _LAYER.search(name)
        this_group = f"layer{int(found.group(1)):05d}" if found else "other"
        if this_group != group:
            flush()
            group = this_group
        if name in quantized:
            weight = _random(param.shape, dtype, device, seed + index, std)
            packed, state = nf4.quantize(weight, blocksize=64, compress_statistics=True)
            del weight
            pending[name] = packed.cpu()
            for key, value in state.as_dict(packed=True).items():
                pending[f"{name}.{key}"] = value.cpu().contiguous()
        elif name.endswith("norm.weight") or "layernorm" in name:
            pending[name] = torch.ones(param.shape, dtype=dtype)
        else:
            pending[name] = _random(param.shape, dtype, device, seed + index, std).cpu()
    flush()
    index_json = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in set(weight_map.values()))},
                  "weight_map": weight_map}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1, sort_keys=True))

    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
    ).to_dict()  # fmt: skip
    config.save_pretrained(folder)
    # Loaders want a tokenizer beside the weights; benchmarks feed random ids, so any will do.
    build_tokenizer().save_pretrained(folder)
    return folder
