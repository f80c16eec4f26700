"""What fast_generate decodes with: the generation settings merged the way `model.generate` merges them,
or the reason the call goes back to `model.generate`.

transformers (5.x) builds a call's GenerationConfig in three layers: the `generation_config` passed (or
an empty one), then every value it leaves None taken from `model.generation_config`, then the global
defaults for what is still None, and finally the keyword arguments of the call on top. We do the same
with GenerationConfig's public `update` and the handful of defaults our decoding reads.

The decode loop implements greedy search and multinomial sampling with temperature, top-k, top-p and
min-p (in transformers' order), EOS stopping with finished rows padded, and min_new_tokens /
min_length (EOS masked until then). Everything else that changes which tokens come out (beam search,
repetition penalties, bad words, forced tokens, stop strings, scores in the output, assisted decoding,
extra model inputs such as pixel values, ...) is a reason to hand the call back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# transformers' global defaults for the fields read below (GenerationConfig._get_default_generation_params,
# the same in 5.17 and 5.24), applied to what neither the call nor the model sets.
_DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
             "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "use_cache": True}  # fmt: skip

# Settings that change the output in ways the loop does not implement, with the value that means "off".
# A field a transformers version lacks reads as None, which counts as off.
_OFF_VALUES = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "penalty_alpha": (None,),
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "force_words_ids": (None,), "constraints": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1, 1.0), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,), "stop_strings": (None,), "max_time": (None,), "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,), "output_scores": (None, False),
    "output_logits": (None, False), "return_dict_in_generate": (None, False), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "token_healing": (None, False), "use_cache": (None, True),
    "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1), "low_memory": (None, False),
}  # fmt: skip


@dataclass(frozen=True)
class DecodeSettings:
    """The resolved settings of one call (hashable: part of a captured graph's key)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    min_p: float | None
    eos_token_ids: tuple[int, ...]  # empty: no EOS stopping
    pad_token_id: int  # written into finished rows (only used with EOS stopping)
    eos_blocked_steps: int  # min_new_tokens / min_length: the first this many tokens cannot be EOS

    def graph_key(self) -> tuple:
        """What a captured decode step bakes in (everything but the length of the run)."""
        return (self.do_sample, self.temperature, self.top_k, self.top_p, self.min_p, self.eos_token_ids,
                self.pad_token_id, self.eos_blocked_steps)  # fmt: skip


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def merged_generation_config(model_config, generation_config, kwargs: dict):
    """(GenerationConfig of the call, keyword arguments that are not generation settings)."""
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if model_config is not None:
        config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    for name, value in _DEFAULTS.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    unused = config.update(**kwargs)
    return config, unused


def resolve(config, prompt_length: int) -> tuple[DecodeSettings | None, str | None]:
    """(settings, None) when the loop can run this config, else (None, the reason)."""
    for name, off in _OFF_VALUES.items():
        value = getattr(config, name, None)
        if not any(value is o or (o is not None and value == o) for o in off):
            return None, f"{name}={value!r} is not implemented by the fast decode loop"
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length
    if not isinstance(max_new, int) or max_new <= 0:
        return None, f"max_new_tokens={max_new!r} (max_length={config.max_length}, prompt {prompt_length})"
    do_sample = bool(config.do_sample)
    temperature = 1.0 if config.temperature is None else float(config.temperature)
    top_k = 0 if config.top_k is None else config.top_k
    top_p = 1.0 if config.top_p is None else float(config.top_p)
    min_p = None if getattr(config, "min_p", None) is None else float(config.min_p)
    if do_sample and not (temperature > 0 and isinstance(top_k, int) and top_k >= 0 and 0 < top_p <= 1.0
                          and (min_p is None or 0 <= min_p <= 1)):  # fmt: skip
        return None, "sampling settings out of range (model.generate raises the exact error)"
    eos = _as_ids(config.eos_token_id)
    pad = config.pad_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None:
        pad = eos[0] if eos else 0  # what transformers does (with a warning) when only EOS is set
    blocked = 0
    if eos:
        blocked = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt_length, 0)
    settings = DecodeSettings(
        max_new_tokens=max_new, do_sample=do_sample, temperature=temperature, top_k=int(top_k), top_p=top_p,
        min_p=min_p, eos_token_ids=eos, pad_token_id=int(pad), eos_blocked_steps=int(blocked),
    )  # fmt: skip
    return settings, None
