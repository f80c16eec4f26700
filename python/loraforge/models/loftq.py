"""LoftQ initialisation of LoRA adapters on loraforge's 4-bit (NF4) models.

LoftQ (Li et al. 2023, arXiv:2310.08659) starts the adapters at the best rank-r correction of the
quantization error instead of at zero. For a projection with original weight W, frozen NF4 base Q,
adapters A [r, in], B [out, r] and LoRA scaling s, the effective weight is deq(Q) + s B A, and

    s B A = SVD_r(W - deq(Q))          (the truncated SVD: by Eckart-Young the minimiser over rank r
                                        of ||W - deq(Q) - s B A||_F, the sum of the dropped sigma_i^2)

so training starts as close to the 16-bit model as rank r allows. With loftq_iter = T > 1 the base is
re-chosen as well, alternating Q_t = quant(W - s B_{t-1} A_{t-1}) and s B_t A_t = SVD_r(W - deq(Q_t)),
as PEFT's `loftq_init` does; the model's NF4 weights are then replaced by Q_T.

Which base: the one the model trains on. `FastLanguageModel.from_pretrained(load_in_4bit=True)`
quantizes a 16-bit checkpoint with our NF4 kernel (bit-identical to bitsandbytes, double
quantization, blocksize 64); that Linear4bit is Q, dequantized here by the same kernel the fused
forwards use, and W is read back, one tensor at a time, from the checkpoint's safetensors (remembered
at load by `record_checkpoint`). Split as B = U_r S_r^1/2 / s^1/2, A = S_r^1/2 Vh_r / s^1/2.

Why not PEFT's own entry points (we keep its LoftQConfig and its adapter containers):
- LoraConfig(init_lora_weights="loftq") quantizes a 16-bit model's weights itself (bitsandbytes,
  without double quantization) and swaps them for their dequantized float values: the adapters then
  cancel the error of a base the QLoRA model never trains on, and the model stays 16-bit in memory.
- peft.utils.loftq_utils.replace_lora_weights_loftq does what this module does for T = 1, but moves
  every weight to "cuda" (no CPU), sets B A = SVD_r without the LoRA scaling (with lora_alpha != r the
  correction comes out alpha/r times too large or small: peft issue #1982) and has no T > 1.

Consequences worth knowing: with T = 1 the base is exactly a plain 4-bit load of the checkpoint, so
the adapter alone (save_pretrained) stays valid for anyone loading the checkpoint the same way. With
T > 1 the base differs from that, so keep the base with the adapter (save_pretrained_merged merges
into the model's own NF4 base). Merging LoftQ adapters into the *original* 16-bit weights is wrong:
they were made to add W - deq(Q) on top of deq(Q), not on top of W.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from loraforge import nf4
from loraforge.models.base_weight import dense_weight, is_linear4bit

CHECKPOINT_ATTRIBUTE = "_loraforge_checkpoint"  # on the transformers model: where its weights came from
LOFTQ_ATTRIBUTE = "_loraforge_loftq"  # on the transformers model, after LoftQ: {"loftq_bits", "loftq_iter"}


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """What from_pretrained loaded: `name` is an absolute local folder or a hub id."""

    name: str
    revision: str | None = None
    token: str | bool | None = dataclasses.field(default=None, repr=False)
    prequantized: bool = False  # the checkpoint itself was quantized: it holds no 16-bit weights


def record_checkpoint(model: torch.nn.Module, name, revision=None, token=None, prequantized: bool = False) -> None:
    local = Path(name).expanduser()
    name = str(local.resolve()) if local.is_dir() else str(name)  # absolute: the working directory may change
    model.__dict__[CHECKPOINT_ATTRIBUTE] = CheckpointSource(name, revision, token, prequantized)


def resolve_config(init_lora_weights, loftq_config) -> dict | None:
    """{"loftq_bits": 4, "loftq_iter": T} when LoftQ is asked for (init_lora_weights="loftq", or a
    loftq_config with the default init_lora_weights), else None. Accepts peft.LoftQConfig or a dict."""
    if init_lora_weights != "loftq" and not loftq_config:
        return None
    if loftq_config and init_lora_weights not in (True, "loftq"):
        raise ValueError(f"loftq_config asks for LoftQ but init_lora_weights={init_lora_weights!r}; pass "
                         "init_lora_weights='loftq' (or leave it at its default) or drop loftq_config")  # fmt: skip
    if dataclasses.is_dataclass(loftq_config):
        loftq_config = dataclasses.asdict(loftq_config)
    if loftq_config is None:
        loftq_config = {}
    if not isinstance(loftq_config, dict):
        raise TypeError(f"loftq_config must be a peft.LoftQConfig or a dict, got {type(loftq_config).__name__}")
    unknown = set(loftq_config) - {"loftq_bits", "loftq_iter"}
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {sorted(unknown)}; it takes loftq_bits and loftq_iter")
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits != 4:
        raise ValueError(f"loftq_bits={bits!r}: loraforge's LoftQ compensates the NF4 base of a load_in_4bit=True "
                         "model, so loftq_bits must be 4 (8-bit bases are not supported for LoftQ)")  # fmt: skip
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq_iter must be a positive int, got {iters!r}")
    return {"loftq_bits": 4, "loftq_iter": iters}


def check_model(model: torch.nn.Module) -> None:
    """Refuse, before any adapter is made, models on which LoftQ cannot work, saying what to do."""
    if getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("LoftQ on an 8-bit (load_in_8bit=True) base is not supported: load with load_in_4bit=True, "
                         "whose NF4 quantization error LoftQ compensates")  # fmt: skip
    if not any(is_linear4bit(m) for m in model.modules()):
        raise ValueError("LoftQ initialises the adapters to cancel the 4-bit quantization error of the base, and this "
                         "model has no NF4 layer (a 16-bit load, or another quantizer's), so there is no such error to cancel. "
                         "Load the 16-bit checkpoint with load_in_4bit=True: loraforge quantizes it to NF4 and LoftQ "
                         "then compensates exactly that base. (Unsloth's load_in_4bit=False + LoftQ recipe, which "
                         "swaps the 16-bit weights for their NF4 round trip, is not supported.)")  # fmt: skip
    source = model.__dict__.get(CHECKPOINT_ATTRIBUTE)
    if source is not None and source.prequantized:
        raise ValueError(f"{source.name!r} is a checkpoint already quantized to 4 bits: it lacks the 16-bit weights "
                         "that LoftQ needs. Load the 16-bit checkpoint with load_in_4bit=True instead, or attach the "
                         "adapters without LoftQ and call loraforge.models.loftq.loftq_initialize(model, "
                         "model_path=<folder of the 16-bit safetensors>)")  # fmt: skip


def _checkpoint_folder(transformer: torch.nn.Module, model_path) -> Path:
    source = transformer.__dict__.get(CHECKPOINT_ATTRIBUTE)
    if model_path is not None:
        name, revision, token = str(model_path), None, None
    elif source is not None:
        if source.prequantized:
            raise ValueError(f"{source.name!r} is a 4-bit checkpoint without the 16-bit weights that LoftQ needs; "
                             "pass model_path=<folder of the 16-bit safetensors>")  # fmt: skip
        name, revision, token = source.name, source.revision, source.token
    else:
        name, revision, token = getattr(transformer.config, "_name_or_path", "") or "", None, None
        if not name:
            raise ValueError("LoftQ needs the model's 16-bit safetensors; pass model_path=<their folder>")
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:  # a hub id: the files transformers downloaded into the local cache, never the network
        return Path(snapshot_download(name, revision=revision, token=token, local_files_only=True))
    except Exception as error:  # invalid ids, missing cache entries: one message for all
        raise ValueError(f"LoftQ reads the 16-bit weights from the checkpoint's safetensors, and {name!r} is neither a "
                         "local folder nor in the local Hugging Face cache; download it first (`hf download "
                         f"{name}`) or pass model_path=<folder of the 16-bit safetensors>") from error  # fmt: skip


class _SafetensorsCheckpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint by name, read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / file for key, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise ValueError(f"{str(folder)!r} holds no *.safetensors files; LoftQ reads the original weights from "
                             "safetensors (re-save a .bin checkpoint with save_pretrained to convert it)")  # fmt: skip

    def get(self, keys: list[str]) -> torch.Tensor | None:
        from safetensors import safe_open

        for key in keys:
            if key in self.files:
                with safe_open(str(self.files[key]), framework="pt") as handle:
                    return handle.get_tensor(key)
        return None


def _replace_nf4_weight(layer: torch.nn.Module, target: torch.Tensor) -> None:
    """Quantize `target` into `layer`'s NF4 weight, with the layer's own block size, double
    quantization, storage dtype and source dtype (what the model's load used)."""
    import bitsandbytes as bnb

    old = layer.weight
    state = old.quant_state
    storage = getattr(old, "quant_storage", torch.uint8)
    packed, new_state = nf4.quantize(target.to(state.dtype), blocksize=state.blocksize,
                                     compress_statistics=state.nested, quant_storage=storage)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                                     compress_statistics=state.nested, quant_type="nf4", quant_storage=storage,
                                     bnb_quantized=True, module=layer)  # fmt: skip
    layer.quant_state = new_state


def _rank_r(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R = SVD_r(residual): L = U_r S_r^1/2 [out, r], R = S_r^1/2 Vh_r [r, in]."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def _initialize_projection(module, name: str, adapter: str, iters: int, checkpoint, prefix: str) -> bool:
    """LoftQ for one LoRA layer; False (untouched) when its base is not NF4."""
    base = module.get_base_layer()
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4":
        return False
    keys = [f"{name}.weight"] + ([f"{name[len(prefix) + 1 :]}.weight"] if name.startswith(f"{prefix}.") else [])
    original = checkpoint.get(keys)
    shape = tuple(state.shape)
    folder = str(checkpoint.folder)
    if original is None:
        raise ValueError(f"LoftQ: {keys[0]!r} is not in the safetensors of {folder!r}")
    if not original.is_floating_point() or tuple(original.shape) != shape:
        raise ValueError(f"LoftQ: {keys[0]!r} in {folder!r} is {original.dtype} {tuple(original.shape)}, not a 16-bit "
                         f"weight of shape {shape}: LoftQ needs the original, unquantized checkpoint")  # fmt: skip
    r, scaling = module.r[adapter], float(module.scaling[adapter])
    if r > min(shape) or scaling <= 0:
        raise ValueError(f"LoftQ on {name}: needs r <= {min(shape)} and a positive LoRA scaling, got r={r}, "
                         f"scaling={scaling}")  # fmt: skip
    weight = original.to(device=base.weight.device, dtype=torch.float32)
    del original
    L, R = _rank_r(weight - dense_weight(base, torch.float32), r)
    for _ in range(iters - 1):  # re-choose the base, Q_t = quant(W - L R), and the adapters for it
        _replace_nf4_weight(base, weight - L @ R)
        L, R = _rank_r(weight - dense_weight(base, torch.float32), r)
    root = scaling**0.5  # s B A = L R, with B and A of the same scale
    # In place: bumps the version counters that the fused forwards' adapter casts are keyed on.
    module.lora_B[adapter].weight.copy_(L / root)
    module.lora_A[adapter].weight.copy_(R / root)
    return True


def loftq_initialize(model, loftq_iter: int = 1, model_path: str | os.PathLike | None = None,
                     adapter_name: str = "default") -> int:  # fmt: skip
    """Set the LoRA adapters of every NF4 projection of a PEFT `model` by LoftQ (module docstring);
    returns how many projections were initialised.

    model_path: the folder (or hub id, from the local cache) of the 16-bit safetensors checkpoint.
    Without it, the checkpoint FastLanguageModel.from_pretrained loaded, else config._name_or_path.
    Projections whose base is not NF4 keep their initialisation (with a warning)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ValueError(f"loftq_iter must be a positive int, got {loftq_iter!r}")
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [(name, m) for name, m in transformer.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})]  # fmt: skip
    if not layers:
        raise ValueError(f"no LoRA layer with adapter {adapter_name!r}: attach adapters (get_peft_model) first")
    checkpoint = _SafetensorsCheckpoint(_checkpoint_folder(transformer, model_path))
    prefix = getattr(transformer, "base_model_prefix", "")
    done, skipped = 0, []
    with torch.no_grad():
        for name, module in layers:
            if _initialize_projection(module, name, adapter_name, loftq_iter, checkpoint, prefix):
                done += 1
            else:
                skipped.append(name)
    if not done:
        raise ValueError("LoftQ: no LoRA projection of this model has an NF4 base; load with load_in_4bit=True")
    if skipped:
        warnings.warn(f"LoftQ: {len(skipped)} LoRA projection(s) have no NF4 base and keep their default "
                      f"initialisation: {skipped[:4]}{' ...' if len(skipped) > 4 else ''}", stacklevel=2)  # fmt: skip
    if done and loftq_iter > 1:
        warnings.warn(f"LoftQ with loftq_iter={loftq_iter} re-quantized the NF4 base weights: the adapters belong to "
                      "this base, not to a fresh 4-bit load of the checkpoint. Keep the base with them "
                      "(save_pretrained_merged), not the adapter alone.", stacklevel=2)  # fmt: skip
    transformer.__dict__[LOFTQ_ATTRIBUTE] = {"loftq_bits": 4, "loftq_iter": loftq_iter}
    return done
