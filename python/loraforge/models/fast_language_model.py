"""FastLanguageModel: the Unsloth-style entry point (from_pretrained, get_peft_model, for_training,
for_inference), built on transformers, bitsandbytes and PEFT containers with loraforge's fused
forwards installed by rule table (patch.py).
"""

from __future__ import annotations

import os
import warnings

import torch

from loraforge.models import loading as _loading
from loraforge.models import loftq as _loftq
from loraforge.models import patch as _patch
from loraforge.models.architectures import RULES
from loraforge.train.offloaded_checkpointing import enable_gradient_checkpointing

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_bfloat16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _pick_dtype(dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got {dtype}")
        return dtype
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if is_bfloat16_supported() else torch.float16


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _rope_is_scaled(config) -> bool:
    """transformers 5 keeps rope settings in rope_parameters (rope_scaling is its alias); the
    'default' type means no scaling."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) not in ("default", None)


def _8bit_load_arguments(config, prequantized: bool, device_map, device: str, kwargs: dict) -> dict:
    """from_pretrained arguments for an 8-bit (LLM.int8()) load through transformers and bitsandbytes."""
    from transformers import BitsAndBytesConfig

    if "quantization_config" in kwargs:
        raise ValueError("load_in_8bit=True builds its own quantization_config; pass one or the other")
    placement = {"device_map": device_map if device_map is not None else {"": device}}
    if not prequantized:
        return {**placement, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    quantization = config.quantization_config
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    if not quantization.get("load_in_8bit"):
        kind = f"{quantization.get('quant_method')}{' 4-bit' if quantization.get('load_in_4bit') else ''}"
        raise ValueError(f"load_in_8bit=True, but this checkpoint is already quantized ({kind}); load it without "
                         "load_in_8bit")  # fmt: skip
    return placement


_BANNER_SHOWN = False


def _print_banner_once() -> None:
    """What runs where, once per process, as a model loads (LORAFORGE_QUIET=1 silences it)."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN or os.environ.get("LORAFORGE_QUIET"):
        return
    _BANNER_SHOWN = True
    from loraforge.env_report import banner

    print(banner())


def _no_hub_kernels(kwargs: dict) -> dict:
    """{"use_kernels": False} where transformers knows the argument and the caller did not set it: its hub
    kernels would replace the layers that get_peft_model patches (patch._hub_kernels_off turns them off
    there anyway), so fetching them at load is wasted."""
    from transformers import PreTrainedModel

    return {} if "use_kernels" in kwargs or not hasattr(PreTrainedModel, "use_kernels") else {"use_kernels": False}


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int | None = None,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool | None = None,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: str | dict | None = "auto",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        stream_base_weights: bool | int = False,
        offload_embedding: bool | str = "auto",
        **kwargs,
    ):
        """Load (model, tokenizer). 4-bit loads quantize Linear layers to NF4 with loraforge's kernel
        (bitsandbytes format); a checkpoint that is already bitsandbytes-4-bit loads as it is.

        load_in_4bit: None (the default) means 4-bit unless load_in_8bit or full_finetuning is set.
        load_in_8bit: bitsandbytes LLM.int8() through transformers (BitsAndBytesConfig(load_in_8bit=True),
        Linear8bitLt layers); LoRA on those runs PEFT's own forward (loraforge's fused LoRA kernels take
        NF4 or 16-bit bases), with loraforge's norms and fused cross-entropy around it.

        max_seq_length defaults to 2048, or the model's own context when that is shorter; asking
        for more than the model's context needs rope_scaling.

        stream_base_weights: keep the NF4 base weights of the decoder layers in pinned host memory and
        copy them to the GPU a layer at a time as they are used (models/weight_streaming.py): the GPU
        holds two layers' instead of all (an 8B model: ~0.2 instead of 3.4 GiB). Generation becomes bound
        by the copies; training steps overlap them with compute. Needs load_in_4bit. An int N
        streams the first N decoder layers only; the others stay on the GPU.

        offload_embedding: keep the input embedding table in pinned host memory, where the GPU reads the
        rows of each batch's tokens (models/host_embedding.py): frees the table's GPU memory (Llama-3 8B:
        0.98 GiB) for the rows' bytes over PCIe once a forward, and that memory keeps more layers out of
        the checkpoint (train/kept_layer_budget.py). True needs a CUDA device, a frozen table (not
        full_finetuning) and one not tied to the output head, and raises otherwise; "auto" (the default)
        offloads where those hold in a single process and leaves the table on the GPU elsewhere; False
        never offloads."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        _print_banner_once()

        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit=True and load_in_8bit=True: pick one (load_in_4bit defaults to on unless "
                             "load_in_8bit is set; for 8-bit pass load_in_8bit=True alone or with load_in_4bit=False)")  # fmt: skip
        if full_finetuning and (load_in_4bit or load_in_8bit):
            bits = 4 if load_in_4bit else 8
            warnings.warn(f"full_finetuning=True trains every weight: loading in 16-bit instead of {bits}-bit",
                          stacklevel=2)  # fmt: skip
            load_in_4bit = load_in_8bit = False
        if load_in_4bit is None:
            load_in_4bit = not (load_in_8bit or full_finetuning)
        if not isinstance(stream_base_weights, int) or (
            not isinstance(stream_base_weights, bool) and stream_base_weights <= 0
        ):
            raise TypeError(f"stream_base_weights must be True, False or a number of layers >= 1, "
                            f"got {stream_base_weights!r}")  # fmt: skip
        stream_layers = None if isinstance(stream_base_weights, bool) else stream_base_weights
        if stream_base_weights:
            from loraforge.models.weight_streaming import stream_base_weights as stream
        if stream_base_weights and not load_in_4bit:
            raise NotImplementedError("stream_base_weights streams NF4 base weights: it needs load_in_4bit=True")
        if stream_base_weights and isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise NotImplementedError("stream_base_weights streams to one GPU; a device_map over several devices "
                                      f"is not supported (got {device_map!r})")  # fmt: skip
        if not isinstance(offload_embedding, bool) and offload_embedding != "auto":
            raise TypeError(f'offload_embedding must be True, False or "auto", got {offload_embedding!r}')
        if offload_embedding is True and full_finetuning:
            raise ValueError("offload_embedding=True keeps a frozen embedding table in host memory; with "
                             "full_finetuning=True the table trains (leave offload_embedding=False)")  # fmt: skip
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
        compute_dtype = _pick_dtype(dtype)
        config = AutoConfig.from_pretrained(model_name, token=token, trust_remote_code=trust_remote_code)
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict) or "rope_type" not in rope_scaling and "type" not in rope_scaling:
                raise ValueError(f"rope_scaling must be a dict with a 'rope_type' key, got {rope_scaling!r}")
            base = dict(getattr(config, "rope_parameters", None) or {})
            config.rope_parameters = {**base, **rope_scaling}
        trained = _max_positions(config)
        if max_seq_length is None:
            max_seq_length = min(2048, trained) if trained else 2048
        if trained is not None and max_seq_length > trained and not _rope_is_scaled(config):
            raise ValueError(f"max_seq_length={max_seq_length} is beyond the {trained} positions this model was "
                             "trained for; pass rope_scaling={'rope_type': 'linear', 'factor': ...} (or dynamic/yarn)")  # fmt: skip
        if config.model_type not in RULES:
            warnings.warn(f"model_type={config.model_type!r} has no loraforge fast path; it trains through plain PEFT",
                          stacklevel=2)  # fmt: skip
        prequantized = getattr(config, "quantization_config", None) is not None
        device = _loading.load_device(device_map)
        placed_map = _loading.transformers_device_map(device_map, device)
        placement = {"device_map": placed_map} if prequantized and device_map is not None else {}
        if load_in_8bit:
            placement = _8bit_load_arguments(config, prequantized, placed_map, device, kwargs)
        # A 4-bit checkpoint to stream: read into host memory (bitsandbytes loads 4-bit weights on CPU), so
        # the GPU only ever holds the streamer's two slots of it.
        stream_from_host = stream_base_weights and prequantized and not load_in_8bit
        if stream_from_host:
            placement = {"device_map": {"": "cpu"}}
        # A 16-bit checkpoint too big for host memory (once per process here) is quantized as it is read.
        streamed = load_in_4bit and not prequantized and _loading.stream_quantize(config, compute_dtype)
        if streamed:
            placement = _loading.streamed_4bit_arguments(compute_dtype, device, kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            model_name, config=config, dtype=compute_dtype, token=token, trust_remote_code=trust_remote_code,
            **placement, **_no_hub_kernels(kwargs), **kwargs,
        )  # fmt: skip
        _loftq.record_checkpoint(model, model_name, kwargs.get("revision"), token, prequantized)
        if stream_from_host:
            stream(model, device=device, layers=stream_layers)  # codes to pinned memory, weights views into slots
            model.to(device)
        if not (prequantized or load_in_8bit or streamed):  # those: quantized and placed by transformers
            if load_in_4bit:
                from loraforge.models.quantize_model import quantize_linears

                # Layer by layer onto the device, so the 16-bit model never sits on the GPU whole; when
                # streaming, the packed codes go back to host memory at once, so the 4-bit one does not either.
                quantize_linears(model, compute_dtype, device=device,
                                 packed_device="cpu" if stream_base_weights else None)  # fmt: skip
                if stream_base_weights:
                    stream(model, device=device, layers=stream_layers)  # before model.to: views into GPU slots
            model.to(device)
            if load_in_4bit:
                # What transformers sets for its own bitsandbytes loads; PEFT keys its 4-bit LoRA
                # layer (and merge_and_unload) on it.
                model.is_loaded_in_4bit = True
        model.max_seq_length = max_seq_length
        for param in model.parameters():
            param.requires_grad_(full_finetuning)
        if stream_base_weights:  # (a no-op where the load above streamed already)
            stream(model, layers=stream_layers)
        if offload_embedding:  # (True or "auto"; "auto" leaves a trained table, as under full_finetuning, alone)
            from loraforge.models.host_embedding import apply_offload_setting

            apply_offload_setting(model, offload_embedding)
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, trust_remote_code=trust_remote_code)
        if fix_tokenizer and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = max_seq_length
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=DEFAULT_TARGETS,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing="unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config=None,
        modules_to_save=None,
        init_lora_weights=True,
        **kwargs,
    ):
        """Attach LoRA adapters (a PEFT LoraModel underneath) and install the fused forwards.

        LoftQ: init_lora_weights="loftq" and/or loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=T)
        (or the same as a dict) start the adapters at the rank-r SVD of the NF4 quantization error of a
        load_in_4bit=True model, with the 16-bit weights read from the checkpoint it was loaded from;
        see models/loftq.py for what is supported."""
        from peft import LoraConfig, get_peft_model

        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if lora_dropout < 0 or lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise ValueError(f"target_modules {unknown} are not modules of this model; it has e.g. "
                             f"{sorted(n for n in names if n.endswith('_proj'))}")  # fmt: skip
        loftq = _loftq.resolve_config(init_lora_weights, loftq_config)
        if loftq is not None:
            _loftq.check_model(model)
            # PEFT's own "loftq" init would quantize the weights itself; ours is set below (see loftq.py).
            init_lora_weights = True
        if lora_dropout > 0 or bias != "none":
            warnings.warn("lora_dropout > 0 or a LoRA bias: those projections take PEFT's unfused path", stacklevel=2)
        torch.manual_seed(random_state)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=lora_dropout,
                            bias=bias, use_rslora=use_rslora, modules_to_save=modules_to_save,
                            init_lora_weights=init_lora_weights, task_type="CAUSAL_LM", **kwargs)  # fmt: skip
        peft_model = get_peft_model(model, config)
        if loftq is not None:
            _loftq.loftq_initialize(peft_model, loftq_iter=loftq["loftq_iter"])
        enable_gradient_checkpointing(peft_model, use_gradient_checkpointing)
        _patch.patch_model(peft_model)
        from loraforge.models import weight_streaming

        if weight_streaming.streamer_of(peft_model) is not None:
            weight_streaming.guard_merges(peft_model)
        from loraforge.export import attach_export_methods

        attach_export_methods(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        """Eval mode with the KV cache on. `model.generate` stays transformers' own; for batched decoding
        several times faster on CUDA (static KV cache, decode step replayed as a CUDA graph, adapters
        attached) call `loraforge.fast_generate(model, input_ids, attention_mask, **generate_kwargs)`."""
        model.eval()
        if hasattr(model, "config"):
            model.config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        model.train()
        if hasattr(model, "config"):
            model.config.use_cache = False
        return model

    patch = staticmethod(_patch.patch_model)
    unpatch = staticmethod(_patch.unpatch_model)
